"""Errors a user can act on. The CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations


class CompressError(Exception):
    """Base for expected failures: bad input, refused run folder, failed gate."""

    exit_code = 1


class RecipeError(CompressError):
    """The recipe is wrong: names the field path and the file:line of the offending YAML node."""

    exit_code = 2


class ConfigError(CompressError):
    """Something the recipe points at is wrong (unknown architecture, empty selection, bad data)."""

    exit_code = 2


class WriteError(CompressError):
    """A file could not be written (disk full, file too large, I/O error). Nothing partial is kept as an
    artifact; `--resume` after freeing space finishes the run."""

    exit_code = 4


class InternalError(CompressError):
    """Something unexpected failed; the message names the traceback file kept in the run folder."""

    exit_code = 5


def first_line(exc: BaseException) -> str:
    """'Type: first non-empty line of the message': a library error as one line of ours."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
