"""The exit statuses of every command, and the exception types that end a command with one
message instead of a traceback (see :mod:`tiedlora.cli` for how every command line ends on
one). They live apart from the command-line machinery so that the lowest layers (data,
tokenizers, file writes, the Slurm scripts) can use them without importing it."""

from __future__ import annotations

# One table for every command (the README's "Exit statuses" repeats it; a test compares them).
EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2  # the usual status for a usage error (argparse exits with it too)
EXIT_PREEMPTED = 3  # trainer.preempt_exit_code's default: the Slurm scripts requeue on it
EXIT_DIVERGED = 4
EXIT_WRITE_FAILED = 5
EXIT_STATUSES = {
    EXIT_OK: "success",
    EXIT_BUG: "a bug: a traceback is printed (please report it)",
    EXIT_USER_ERROR: "a mistake in the input (override, config value, file, a folder in use by another run): "
                     "one `error:` line, no traceback",
    EXIT_PREEMPTED: "preempted: a signal asked for a checkpoint, it was saved; rerun (the Slurm scripts "
                    "requeue) to resume",
    EXIT_DIVERGED: "the training diverged (non-finite loss or gradients): it wrote no adapter and no scores; "
                   "results.json says \"status\": \"diverged\"",
    EXIT_WRITE_FAILED: "an output could not be written (disk full, quota, read-only or failing storage): "
                       "the previous checkpoint stays `latest`; free space and rerun to resume",
}



def preempt_exit_code_problem(code) -> str | None:
    """Why ``code`` cannot be the preemption status (the requeue trigger), or None when it can:
    it must fit an exit status and not be one that means something else."""
    taken = sorted(set(EXIT_STATUSES) - {EXIT_PREEMPTED})
    if not isinstance(code, int) or not 0 < code < 256 or code in taken:
        return (f"must be in 1..255 and not {', '.join(map(str, taken))}, which mean something else "
                "(README, 'Errors and exit statuses')")
    return None


class UserError(Exception):
    """A mistake in the user's input that the message alone explains (no traceback)."""


class MissingPackageError(UserError, ImportError):
    """An optional package that the user's choice needs is not installed (the message says
    which extra to install)."""


class RunDiverged(Exception):
    """The training stopped on non-finite values (exit status 4). ``results`` is what the run
    wrote to results.json (``"status": "diverged"``), when it got that far."""

    def __init__(self, message: str, results: dict | None = None):
        super().__init__(message)
        self.results = results


class WriteFailed(Exception):
    """An output could not be written because the storage refused (exit status 5).

    ``path`` is what was being written, ``operation`` what for; the message adds the
    operating system's reason and the free space left. :meth:`elsewhere` is what the other
    ranks raise when rank 0's write failed (only rank 0 prints).
    """

    def __init__(self, message: str, path: str = "", operation: str = ""):
        super().__init__(message)
        self.path, self.operation = path, operation

    @classmethod
    def elsewhere(cls) -> "WriteFailed":
        return cls("rank 0 could not write an output (its error says which)")

    def with_hint(self, hint: str) -> "WriteFailed":
        if hint and hint not in str(self):
            self.args = (f"{self.args[0]}; {hint}",)
        return self
