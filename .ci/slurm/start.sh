#!/usr/bin/env bash
# .ci/slurm/start.sh - a real one-node Slurm cluster on loopback for the `slurm` tests and for
# trying `python -m tiedlora.submit` by hand (Debian/Ubuntu, root, no systemd needed).
#
# Installs munge + slurmctld + slurmd (+ slurmdbd and MariaDB when SLURM_WITH_DBD=1), writes
# /etc/slurm/slurm.conf (partition "debug", this machine's CPUs, no GPUs, no cgroups), starts
# the daemons by hand and waits until the node is idle. Idempotent: if the cluster it started
# is already up and idle it says so and exits 0.  Stop it with .ci/slurm/stop.sh.
#
# Edit these (environment):
#   SLURM_BASE=/tmp/tiedlora-slurm   state, spool, logs and pid files (wiped on a fresh start)
#   SLURM_WITH_DBD=0                 1: MariaDB + slurmdbd, so `sacct` works (slower to install)
#   SLURM_PARTITION=debug            name of the single partition
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/tiedlora-slurm}
WITH_DBD=${SLURM_WITH_DBD:-0}
PARTITION=${SLURM_PARTITION:-debug}
VAR=$BASE/var
RUN=$VAR/run
LOG=$VAR/log
CONF=/etc/slurm/slurm.conf
DBCONF=/etc/slurm/slurmdbd.conf
CLUSTER=tiedlora
DBPASS=slurmdbpass    # loopback-only test database

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm start %d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() { echo "[slurm start] ERROR: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # wait_for SECONDS WHAT COMMAND...
  local end=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$end" ] && die "timeout waiting for $what (logs: $LOG)"
    sleep 0.2
  done
}
node_state() { sinfo -h -n "$(hostname -s)" -o '%t' 2>/dev/null || true; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
mkdir -p "$BASE"

# ------------------------------------------------------------------ 0. already running?
if alive "$RUN/slurmctld.pid" && alive "$RUN/slurmd.pid" && alive /run/munge/munged.pid \
   && { [ "$WITH_DBD" != 1 ] || alive "$RUN/slurmdbd.pid"; } && [ "$(node_state)" = idle ]; then
  log "cluster already running (config $CONF, logs $LOG)"
  sinfo
  exit 0
fi

# ------------------------------------------------------------------ 1. packages
PKGS="munge slurmctld slurmd slurm-client"
[ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "installing:$missing"
  # No init system: keep the packages' postinst scripts from starting services (we start them).
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq > "$BASE/apt-update.log" 2>&1 || { tail -20 "$BASE/apt-update.log"; die "apt-get update failed"; }
  # shellcheck disable=SC2086
  apt-get -y -qq -o Dpkg::Use-Pty=0 install --no-install-recommends $missing > "$BASE/apt-install.log" 2>&1 \
    || { tail -20 "$BASE/apt-install.log"; die "apt-get install failed"; }
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "packages installed"
else
  log "packages already installed"
fi

# ------------------------------------------------------------------ 2. leftovers, state dirs
# Daemons of an earlier, half-working start: stop them cleanly first.
if alive "$RUN/slurmctld.pid" || alive "$RUN/slurmd.pid" || alive "$RUN/slurmdbd.pid"; then
  log "stopping a partly running cluster"
  SLURM_BASE=$BASE "$(dirname "$0")/stop.sh"
fi
rm -rf "$VAR"
mkdir -p "$RUN" "$LOG" "$VAR/spool/ctld" "$VAR/spool/d" /etc/slurm

# ------------------------------------------------------------------ 3. munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
  else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/log/munge; chmod 0600 /etc/munge/munge.key
chmod 0711 /var/lib/munge; chmod 0755 /run/munge
if alive /run/munge/munged.pid; then
  log "munged already running (pid $(cat /run/munge/munged.pid))"
else
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 "munged" bash -c 'test -s /run/munge/munged.pid && munge -n | unmunge'
  log "munged started (pid $(cat /run/munge/munged.pid))"
fi

# ------------------------------------------------------------------ 4. slurm.conf
NODE=$(hostname -s)
# e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
HW=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ UpTime=.*//')
MEM=$(echo "$HW" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
HW=$(echo "$HW" | sed -e "s/RealMemory=[0-9]*/RealMemory=$(( MEM * 95 / 100 ))/")  # never drain for "Low RealMemory"
if [ "$WITH_DBD" = 1 ]; then
  ACCT=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819'
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi
cat > "$CONF" <<CONF
# generated by tiedlora .ci/slurm/start.sh
ClusterName=$CLUSTER
# addresses pinned to loopback: no DNS or /etc/hosts entry needed
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$VAR/spool/ctld
SlurmdSpoolDir=$VAR/spool/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
# no cgroups or systemd:
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule at submit time (the default 3 s delay makes every sbatch wait)
SchedulerParameters=batch_sched_delay=0
# reject requests larger than the partition instead of leaving them pending forever
EnforcePartLimits=ALL
ReturnToService=2
# keep finished jobs visible to scontrol/squeue for 5 minutes (the tests read their exit codes)
MinJobAge=300
KillWait=5
JobRequeue=1
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
$ACCT
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
NodeName=$NODE NodeAddr=127.0.0.1 $HW State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
log "wrote $CONF (node $NODE: $HW)"

# ------------------------------------------------------------------ 5. MariaDB + slurmdbd (optional)
if [ "$WITH_DBD" = 1 ]; then
  DATADIR=$VAR/mysql
  mkdir -p "$DATADIR" "$VAR/mysql-run" /run/mysqld
  chown mysql:mysql "$DATADIR" "$VAR/mysql-run" /run/mysqld
  mariadb-install-db --user=mysql --datadir="$DATADIR" --skip-test-db \
    --auth-root-authentication-method=socket > "$LOG/mariadb-install-db.log" 2>&1 \
    || { cat "$LOG/mariadb-install-db.log"; die "mariadb-install-db failed"; }
  # pid and error log must be in a mysql-writable folder, else mariadbd exits silently
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DATADIR" \
    --socket=/run/mysqld/mysqld.sock --pid-file="$VAR/mysql-run/mysqld.pid" \
    --log-error="$VAR/mysql-run/mysqld.log" --skip-networking \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
  wait_for 60 "mariadbd" mariadb -e 'select 1'
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  log "mariadbd started (pid $(cat "$VAR/mysql-run/mysqld.pid"))"
  cat > "$DBCONF" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
CONF
  chown root:root "$DBCONF"; chmod 600 "$DBCONF"
  slurmdbd
  wait_for 60 "slurmdbd on :6819" bash -c "test -s $RUN/slurmdbd.pid && </dev/tcp/127.0.0.1/6819"
  log "slurmdbd started (pid $(cat "$RUN/slurmdbd.pid"))"
fi

# ------------------------------------------------------------------ 6. slurmctld + slurmd
slurmctld      # daemonizes and writes its pid file
wait_for 30 "slurmctld" bash -c "test -s $RUN/slurmctld.pid && scontrol ping"
log "slurmctld started (pid $(cat "$RUN/slurmctld.pid"))"
slurmd         # daemonizes; the child writes the pid file a little later
wait_for 10 "slurmd pid file" test -s "$RUN/slurmd.pid"
log "slurmd started (pid $(cat "$RUN/slurmd.pid"))"

end=$(( $(date +%s) + 60 ))
until [ "$(node_state)" = idle ]; do
  st=$(node_state)
  case "$st" in down*|drain*|drng*|fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;; esac
  [ "$(date +%s)" -ge "$end" ] && { sinfo -R; die "node $NODE not idle (state: $st; logs: $LOG)"; }
  sleep 0.2
done
if [ "$WITH_DBD" = 1 ]; then
  wait_for 30 "cluster registration in slurmdbd" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
fi
sinfo
log "cluster ready (logs: $LOG; stop: .ci/slurm/stop.sh)"
