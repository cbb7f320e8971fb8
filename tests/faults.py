"""``python tests/faults.py <finetune overrides>``: ``python -m tiedlora.finetune`` with faults
injected where real ones strike, for the tests of non-finite steps, disk-full saves and kills.

The faults are chosen by environment variables (each optional):

* ``FAULT_NAN_STEPS=3,8,9``: one adapter gradient element becomes NaN in these steps (1-based),
  after the gradient sum and before clipping, so the global norm the loop checks is a real NaN.
* ``FAULT_NAN_VAL_STEPS=2``: the validation loss of these steps is NaN.
* ``FAULT_NAN_PARAM_STEP=5``: after step 5's update one adapter value becomes NaN (an update
  that overflowed).
* ``FAULT_ENOSPC=<glob>[@<n>]``: the ``n``-th (default first) write to a path matching the glob
  (fnmatch on the absolute path) writes half its bytes and then fails with ``OSError(ENOSPC)``,
  as a full disk does; ``os.write`` (appends to metrics.jsonl) and ``Path.write_bytes`` (every
  atomic write) are covered.
* ``FAULT_KILL_AFTER_CHECKPOINT=8``: SIGKILL right after step 8's checkpoint is committed.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import pathlib
import signal
import sys

import torch


def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def install() -> None:
    from tiedlora import checkpoint, finetune
    from tiedlora.data import sft

    step = [0]
    orig_next = sft.MicroBatchSampler.__next__

    def counting_next(self):  # the sampler's position is restored on resume: so is the step number
        out = orig_next(self)
        step[0] = self.epoch * self.steps_per_epoch + self.position
        return out
    sft.MicroBatchSampler.__next__ = counting_next

    nan_steps = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s}
    if nan_steps:
        orig_finalize = finetune.finalize_adapter_grads

        def poisoned(chunks, **kw):
            orig_finalize(chunks, **kw)
            if step[0] in nan_steps:
                from tiedlora.peft.model import trainable_params

                grad = next(r.param.grad for r in trainable_params(chunks) if r.param.grad is not None)
                grad.view(-1)[0] = float("nan")
        finetune.finalize_adapter_grads = poisoned

    nan_val = {int(s) for s in os.environ.get("FAULT_NAN_VAL_STEPS", "").split(",") if s}
    if nan_val:
        orig_val = finetune.validation_loss

        def val_loss(run):
            loss = orig_val(run)
            return float("nan") if step[0] in nan_val else loss
        finetune.validation_loss = val_loss

    nan_param = int(os.environ.get("FAULT_NAN_PARAM_STEP", "0"))
    if nan_param:
        orig_sync = finetune.sync_tied_copies

        def overflowed(chunks):
            orig_sync(chunks)
            if step[0] == nan_param:
                from tiedlora.peft.model import trainable_params

                with torch.no_grad():
                    trainable_params(chunks)[0].param.view(-1)[0] = float("inf")
        finetune.sync_tied_copies = overflowed

    spec = os.environ.get("FAULT_ENOSPC")
    if spec:
        pattern, _, nth = spec.partition("@")
        seen = [0]

        def hit(path) -> bool:
            if not fnmatch.fnmatch(os.path.abspath(str(path)), pattern):
                return False
            seen[0] += 1
            return seen[0] == int(nth or 1)

        orig_write_bytes = pathlib.Path.write_bytes

        def write_bytes(self, data):
            if hit(self):
                orig_write_bytes(self, bytes(data)[: len(data) // 2])
                raise _enospc(str(self))
            return orig_write_bytes(self, data)
        pathlib.Path.write_bytes = write_bytes

        orig_os_write = os.write

        def os_write(fd, data):  # files.append_line's writes: a short write, then a full disk
            path = os.readlink(f"/proc/self/fd/{fd}") if fd > 2 else ""
            if path and hit(path):
                orig_os_write(fd, bytes(data)[: len(data) // 2])
                raise _enospc(path)
            return orig_os_write(fd, data)
        os.write = os_write

    kill_at = int(os.environ.get("FAULT_KILL_AFTER_CHECKPOINT", "0"))
    if kill_at:
        orig_commit = checkpoint.commit_checkpoint

        def commit_then_die(output_dir, step_no, *a, **kw):
            out = orig_commit(output_dir, step_no, *a, **kw)
            if step_no == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        checkpoint.commit_checkpoint = commit_then_die


if __name__ == "__main__":
    install()
    from tiedlora.finetune import main

    sys.argv = ["tiedlora.finetune", *sys.argv[1:]]
    main()
