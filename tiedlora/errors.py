"""The exception types that mark a user's mistake (see :mod:`tiedlora.cli` for how every
command line ends on one). They live apart from the command-line machinery so that the
lowest layers (data, tokenizers) can raise them without importing it."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input that the message alone explains (no traceback)."""


class MissingPackageError(UserError, ImportError):
    """An optional package that the user's choice needs is not installed (the message says
    which extra to install)."""
