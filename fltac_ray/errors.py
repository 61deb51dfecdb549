"""User-facing errors. Each names what is wrong, the value given and what is allowed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_SHOWN_VALUE = 200  # characters of a value an error message quotes


@dataclass(frozen=True)
class ConfigIssue:
    """One invalid setting: the dotted field path, the value given and what is allowed."""

    field: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        shown = repr(self.value)
        if len(shown) > MAX_SHOWN_VALUE:  # a value pasted by mistake (a whole file) stays one line
            shown = f"{shown[:MAX_SHOWN_VALUE]}... ({len(shown):,} characters)"
        return f"{self.field} = {shown}: {self.allowed}"


class FltacError(Exception):
    """Base class of every error fltac-ray raises on purpose (the CLI prints these without a trace).
    Configuration, run-folder, experiment-file and data-file errors begin with their kind and
    path; the others carry it in `heading`, which the CLI prints first."""

    heading = ""


class ConfigError(FltacError, ValueError):
    """The experiment configuration is invalid; raised before any Ray process starts."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(f"invalid experiment configuration{where}:\n{lines}")


class RunFolderError(FltacError):
    """A run, sweep or output folder cannot be used (exists, is a file, is not writable, is held by
    another run, holds no run). The message names the path and what would work."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"run folder {self.path}: {problem}")


class ExperimentFileError(FltacError):
    """An experiment or sweep file that is missing or not a file (its contents: ConfigError)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"experiment file {self.path}: {problem}")


class DataFileError(FltacError):
    """A data file cannot be used as a task's data: names the file, the row or column, what was
    found and what is expected."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"data file {self.path}: {problem}")


class ResourceUnavailableError(FltacError):
    """A model, data set, package, memory or hardware resource the experiment needs is missing
    or too small; says how to get it or what to lower."""

    heading = "resources"


class AlgorithmError(FltacError):
    """An algorithm's server half answered with something unusable (NaN, a wrong shape, labels
    out of range); names the algorithm and its hook. Nothing of that round was committed."""

    heading = "algorithm"


class ScreeningError(FltacError):
    """federation.screening_stop: a round's screening may not have held (server/screening.py);
    the run ended before that round was committed."""

    heading = "screening"


class EngineError(FltacError):
    """The distributed run failed (an actor died, timed out, or returned unusable results)."""

    heading = "engine"


# What an error may quote from a user's file: short names and values that look like labels or
# column names, escaped; never a whole line (a data file that is a link to a credentials file
# must not print its first line into a terminal or a CI log).
_HEADER_NAME = re.compile(r"[\w .()/-]{1,40}")
_LABEL_LIKE = re.compile(r"[\w .()/+-]{0,24}")


def excerpt(value: object) -> str:
    """A cell of a user's file as an error quotes it: a number, or a short label-like text
    (at most 24 letters, digits, spaces and . ( ) / + - _), repr-escaped; other text only by its
    length."""
    if isinstance(value, str) and not _LABEL_LIKE.fullmatch(value):
        return f"(a text of {len(value):,} characters, not shown)"
    return repr(value)


def header_excerpt(columns: list[str]) -> str:
    """A table's column names as an error quotes them, when they look like a header (short names
    of letters, digits, spaces and . ( ) / - _), at most 12; otherwise only how many there are:
    a file that is not a table has its first line read as column names."""
    if not all(isinstance(name, str) and _HEADER_NAME.fullmatch(name) for name in columns):
        return (f"{len(columns)} column(s) whose names do not look like a table's header "
                "(not shown; is this a data file?)")
    shown = columns[:12]
    return f"{shown}{f' ... ({len(columns)} columns in all)' if len(columns) > 12 else ''}"
