"""How every command-line entry point ends on a user's mistake, a diverged training or a full
disk (one place for all of them; the statuses are :data:`tiedlora.errors.EXIT_STATUSES`).

A mistake in what the user gave us ends with one message on stderr and exit status 2,
without a traceback::

    $ python -m tiedlora.finetune trainer.max_stepz=10
    error: Could not override 'trainer.max_stepz'. ...
    Key 'max_stepz' not in 'TrainerConfig' ...

Two failures that are nobody's mistake end the same way, with their own status: a training
that diverged (:class:`~tiedlora.errors.RunDiverged`, status 4) and an output the storage
refused to take (:class:`~tiedlora.errors.WriteFailed`, status 5: disk full, quota,
read-only). Everything else is a bug in our code or a library and keeps its full traceback
(status 1).
``HYDRA_FULL_ERROR=1`` shows the full traceback of a user's mistake too, for the Hydra
commands and the plain ones alike. Under torchrun or srun only rank 0 prints the message;
every rank exits with status 2.

What counts as a user's mistake is decided by the exception's type (:func:`is_user_error`):

- :class:`UserError` -- raise it (or a subclass) for a mistake no other type below fits,
  e.g. :class:`MissingPackageError` for an optional package the user's choice needs;
- ``ValueError`` and its subclasses: a field value a typed config's ``__post_init__``
  refuses, a malformed data file (``tiedlora.data.sft.DataError``), an unreadable or
  mismatched checkpoint (``CheckpointError``, ``CheckpointFormatError``), bad JSON;
- a path that is missing or of the wrong kind: ``FileNotFoundError``, ``FileExistsError``,
  ``IsADirectoryError``, ``NotADirectoryError``, ``PermissionError``;
- OmegaConf's errors (unknown key, wrong type, missing value) and Hydra's (override syntax,
  unknown config group option, missing config file).

So code that checks the user's input raises one of these with a message that names the
file, line, field and value; code that finds its own invariant broken uses ``assert``,
``RuntimeError``, ``TypeError`` or ``KeyError``, which keep their traceback.

Two wrappers apply this: :func:`run` for a plain ``main()`` (argparse commands), and
:func:`hydra_main` for a Hydra task function; a ``main()`` that returns its status itself
calls :func:`report_error` from its ``except`` clause. Hydra catches a task's
exceptions itself and prints its own report ("Error executing job ...", a trimmed traceback); the wrapper
catches a user's mistake inside the task, before Hydra sees it, and turns on Hydra's
``HYDRA_FULL_ERROR`` re-raising around Hydra's own steps (override parsing, composition),
so those reach :func:`run` too. A Hydra multirun stops at the first job with a mistake; a
job that diverged does not stop it (one rate of a learning-rate sweep may well diverge): its
message is printed, the other jobs run, and the multirun exits with status 4 at the end, except
under the bracketing learning-rate sweep (``hydra/sweeper=lr_bracket``), where a diverged rate is
an outcome, the upper end of a bracket, and its results are handed back like any other job's.
A job that a launcher runs in another process (``hydra/launcher=slurm``) raises the
mistake as usual; the launcher hands it back and the submitting process reports it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable, Iterator, NoReturn, Optional

from tiedlora.errors import (EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_WRITE_FAILED, MissingPackageError,
                             RunDiverged, UserError, WriteFailed)

__all__ = ["EXIT_USER_ERROR", "MissingPackageError", "UserError", "describe", "exit_status", "hydra_main",
           "is_user_error", "report_error", "run"]

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


def _user_error_types() -> tuple:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (UserError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
            NotADirectoryError, PermissionError, OmegaConfBaseException, HydraException)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, _user_error_types())


def exit_status(exc: BaseException) -> Optional[int]:
    """The status of an exception that ends a command with one message; None for a bug."""
    if isinstance(exc, RunDiverged):
        return EXIT_DIVERGED
    if isinstance(exc, WriteFailed):
        return EXIT_WRITE_FAILED
    return EXIT_USER_ERROR if is_user_error(exc) else None


def full_trace_requested() -> bool:
    """``HYDRA_FULL_ERROR=1`` (Hydra's own switch, honoured by every command)."""
    return os.environ.get(FULL_ERROR_ENV) == "1"


def describe(exc: BaseException) -> str:
    """The message of a user's mistake, with the OmegaConf error a Hydra error wraps."""
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OverrideParseException) and exc.override not in text:
        text = f"cannot parse the override {exc.override!r}: {text}"
    cause = exc.__cause__
    if isinstance(exc, HydraException) and isinstance(cause, OmegaConfBaseException):
        extra = str(cause).strip()
        if extra and extra not in text:
            text += "\n" + extra
    return text


def _is_rank0() -> bool:
    """Rank 0 of the process group, else of torchrun's/srun's environment (one process: yes)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return os.environ[var].strip() in ("0", "")
    return True


def _print_message(exc: BaseException) -> None:
    if _is_rank0():
        sys.stdout.flush()
        print(f"error: {describe(exc)}", file=sys.stderr, flush=True)


def report_error(exc: BaseException) -> int:
    """For a ``main()`` that returns its exit status, from its ``except Exception`` clause:
    a user's mistake, a divergence or a refused write is printed (rank 0) and its status
    returned (:func:`exit_status`); anything else is re-raised."""
    status = exit_status(exc)
    if full_trace_requested() or status is None:
        raise exc
    _print_message(exc)
    return status


def run(main: Callable[[], Any]) -> NoReturn:
    """Call ``main()`` and exit the process: with ``main``'s return value when it is an
    int (None or anything else: 0), with status 2 and one ``error: ...`` message on a
    user's mistake, with the usual traceback on any other exception."""
    try:
        status = main()
    except Exception as e:  # noqa: BLE001 - sorted by report_error
        status = report_error(e)
    sys.exit(status if isinstance(status, int) and not isinstance(status, bool) else 0)


_ENTRY_PID: Optional[int] = None  # the process whose command line hydra_main parsed


def _in_entry_process() -> bool:
    """False inside a job that a Hydra launcher runs in another process (Slurm, submitit):
    there a mistake is raised as usual, so the launcher hands it back to the process that
    submitted it, which reports it. (Module-level, so a pickled job reads its own process.)"""
    return _ENTRY_PID == os.getpid()


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweeper_takes_divergence() -> bool:
    """True in a job of the bracketing learning-rate sweep (hydra/sweeper=lr_bracket), which reads
    a diverged rate as the upper end of a bracket: a diverged job then returns its results like
    any other (also where a launcher runs it elsewhere, Slurm) and the multirun does not end
    with status 4 for it."""
    from hydra.core.hydra_config import HydraConfig

    return _in_multirun() and str(HydraConfig.get().sweeper.get("_target_", "")).endswith(".LRBracketSweeper")


@contextlib.contextmanager
def _full_error_env(value: Optional[str]) -> Iterator[None]:
    old = os.environ.get(FULL_ERROR_ENV)
    if value is None:
        os.environ.pop(FULL_ERROR_ENV, None)
    else:
        os.environ[FULL_ERROR_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FULL_ERROR_ENV, None)
        else:
            os.environ[FULL_ERROR_ENV] = old


def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], NoReturn]]:
    """Decorator: ``@hydra.main`` over ``conf/<config_name>.yaml`` with the handling above.

    The decorated task function ``task(dcfg)`` becomes a no-argument entry point that
    parses ``sys.argv`` as Hydra does, runs the task and exits the process::

        @cli.hydra_main("params")
        def _run(dcfg): ...

        _run()
    """

    def decorate(task: Callable[[Any], Any]) -> Callable[[], NoReturn]:
        def entry() -> NoReturn:
            import hydra

            from tiedlora.config import CONF_DIR, register_configs

            global _ENTRY_PID
            _ENTRY_PID = os.getpid()
            users_setting = os.environ.get(FULL_ERROR_ENV)

            diverged = []  # jobs of a multirun that diverged (the sweep goes on without them)

            @functools.wraps(task)  # Hydra unwraps it: job name and paths come from `task`
            def job(dcfg):
                with _full_error_env(users_setting):  # the task sees the user's environment
                    try:
                        return task(dcfg)
                    except Exception as e:  # noqa: BLE001 - sorted by report_error
                        if not _in_entry_process():
                            if isinstance(e, RunDiverged) and _sweeper_takes_divergence():
                                report_error(e)
                                return e.results  # an outcome of the sweep, handed back as a result
                            raise
                        status = report_error(e)
                        if status == EXIT_DIVERGED and _in_multirun():
                            if not _sweeper_takes_divergence():
                                diverged.append(e)
                            return e.results  # the comparison table shows it as diverged
                        # SystemExit passes through Hydra's job runner (it catches Exception only)
                        raise SystemExit(status) from None

            register_configs()
            app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(job)

            def call():
                with _full_error_env("1"):  # Hydra re-raises instead of printing its own report
                    app()
                return EXIT_DIVERGED if diverged else None

            run(call)

        return entry

    return decorate
