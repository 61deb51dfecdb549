"""User-facing errors. Each names what is wrong, the value given and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConfigIssue:
    """One invalid setting: the dotted field path, the value given and what is allowed."""

    field: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value!r}: {self.allowed}"


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


class EngineError(FltacError):
    """The distributed run failed (an actor died, timed out, or returned unusable results)."""

    heading = "engine"
