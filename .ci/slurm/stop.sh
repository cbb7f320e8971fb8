#!/usr/bin/env bash
# .ci/slurm/stop.sh - stop the one-node cluster started by .ci/slurm/start.sh (pid files under
# $SLURM_BASE). Cancels the remaining jobs first so no job processes are left behind.
# Idempotent: stopping a cluster that is not running only says so.
#
# Edit these (environment):
#   SLURM_BASE=/tmp/tiedlora-slurm   the same folder start.sh used
set -uo pipefail

BASE=${SLURM_BASE:-/tmp/tiedlora-slurm}
VAR=$BASE/var
RUN=$VAR/run

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm stop %d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pidfiles() { # stop_pidfiles NAME:PIDFILE ...  (TERM all, wait up to 10 s each, then KILL)
  local spec name pf pid i pids=() names=()
  for spec in "$@"; do
    name=${spec%%:*}; pf=${spec#*:}
    if alive "$pf"; then pids+=("$(cat "$pf")"); names+=("$name"); kill -TERM "$(cat "$pf")"
    else log "$name not running"; fi
    rm -f "$pf"
  done
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then log "${names[$i]} (pid $pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid"; fi
    log "${names[$i]} (pid $pid) stopped"
  done
}

# 1. cancel all jobs while slurmctld is up, and wait for them to leave
if alive "$RUN/slurmctld.pid"; then
  jobs=$(squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# 2. daemons in reverse start order
stop_pidfiles "slurmd:$RUN/slurmd.pid" "slurmctld:$RUN/slurmctld.pid"
stop_pidfiles "slurmdbd:$RUN/slurmdbd.pid"
stop_pidfiles "mariadbd:$VAR/mysql-run/mysqld.pid" "munged:/run/munge/munged.pid"
exit 0
