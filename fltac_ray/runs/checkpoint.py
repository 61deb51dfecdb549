"""Atomic per-round checkpoints in safetensors + JSON (never pickle).

A checkpoint is a folder `checkpoints/round_NNNNN/` holding one safetensors file per state group
(the deduplicated client store: distinct adapter rows and the (client, slot) index; private
client state such as FLoRAL routers; the algorithm's server state; the newest global adapters),
`state.json` (the round, the format version, the groups' files and the run's resolved config) and
`manifest.json`, the SHA-256 of every other file in the folder, state.json included. It is
written into a temporary folder and renamed into place, so a crash leaves either the whole
checkpoint or none (and the next save removes the temporary folder); a damaged one (truncated,
edited, a file added or missing, a file name pointing outside the folder, a symbolic link or a
special file in place of a file) fails the check and the previous one is used instead.

The run's randomness is seeded per (seed, round, client, task), so nothing else is needed to
continue a run exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fltac_ray.errors import FltacError
from fltac_ray.runs.files import entry_problem, read_regular_text, sha256_of

# 2: the server side's deduplicated client store (clients: rows + index), no per-worker groups
# 3: manifest.json covering every file (state.json included); the resolved config in state.json
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
StateGroup = dict[str, np.ndarray]


class CheckpointError(FltacError):
    """No usable checkpoint where one was expected."""

    heading = "checkpoint"


@dataclass
class Checkpoint:
    round: int
    groups: dict[str, StateGroup] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: Path | None = None


def _sha256(path: Path) -> str:
    return sha256_of(path)[1]  # a link or a pipe is refused, never followed or waited on


def save_checkpoint(folder: Path, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write `checkpoint` under folder/round_NNNNN atomically; keep the newest `keep` of them."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp_round_*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"round_{checkpoint.round:05d}"
    temporary = folder / f".tmp_round_{checkpoint.round:05d}_{os.getpid()}"
    temporary.mkdir()
    files = {}
    for name, group in checkpoint.groups.items():
        path = temporary / f"{name}.safetensors"
        # safetensors wants C-contiguous arrays (object-store views and slices may not be)
        save_file({k: np.ascontiguousarray(v) for k, v in group.items()}, str(path))
        files[name] = {"file": path.name}
    state = {"format": FORMAT_VERSION, "round": checkpoint.round, "files": files, "meta": checkpoint.meta}
    (temporary / "state.json").write_text(json.dumps(state, indent=1, default=str))
    manifest = {"format": FORMAT_VERSION, "sha256": {p.name: _sha256(p) for p in sorted(temporary.iterdir())}}
    (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in temporary.iterdir():  # data on disk before the rename makes it visible
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    for old in sorted(folder.glob("round_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _confined(name: object) -> bool:
    """A plain file name inside the checkpoint folder (no separators, no .., not hidden)."""
    return isinstance(name, str) and bool(name) and Path(name).name == name and not name.startswith(".")


def read_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint folder, verifying the manifest (every file, state.json included, and
    nothing else) and that every named file is inside the folder; raises CheckpointError if not."""
    try:
        if (problem := entry_problem(path, folder_allowed=True)) is not None or not path.is_dir():
            raise CheckpointError(f"{path}: {problem or 'is not a folder'}")
        # every entry a regular file of this folder before anything is read: a link is not
        # followed (even to the same bytes), a pipe or device never read (it could block forever)
        for entry in sorted(path.iterdir()):
            if (problem := entry_problem(entry)) is not None:
                raise CheckpointError(f"{path}: {entry.name} {problem}")
        manifest = json.loads(read_regular_text(path / MANIFEST)) if (path / MANIFEST).is_file() else {}
        if manifest.get("format") != FORMAT_VERSION:
            state = json.loads(read_regular_text(path / "state.json"))
            found = manifest.get("format", state.get("format"))
            raise CheckpointError(f"{path}: checkpoint format {found}, this fltac-ray reads format "
                                  f"{FORMAT_VERSION} (written by another version; start the run anew)")
        listed = manifest["sha256"]
        if not all(_confined(name) for name in listed):
            raise CheckpointError(f"{path}: the manifest names a file outside the checkpoint folder")
        present = {p.name for p in path.iterdir()} - {MANIFEST}
        if present != set(listed):
            extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
            raise CheckpointError(f"{path}: files differ from the manifest (unlisted {extra}, missing {missing})")
        for name, digest in listed.items():
            if _sha256(path / name) != digest:
                raise CheckpointError(f"{path}: {name} does not match its checksum (damaged or edited)")
        state = json.loads(read_regular_text(path / "state.json"))
        groups = {}
        for name, info in state["files"].items():
            if not _confined(info["file"]) or info["file"] not in listed:
                raise CheckpointError(f"{path}: state.json names {info['file']!r}, not a file of this checkpoint")
            groups[name] = load_file(str(path / info["file"]))
        return Checkpoint(int(state["round"]), groups, state.get("meta", {}), path)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # missing, truncated, not JSON
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc


def latest_checkpoint(folder: Path, warn=print) -> Checkpoint:
    """The newest checkpoint that loads and verifies; damaged newer ones are skipped, saying so."""
    candidates = sorted(folder.glob("round_*"), reverse=True) if folder.is_dir() else []
    problems = []
    for path in candidates:
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            warn(f"warning: skipping checkpoint {exc}; trying the previous one")
            continue
        return checkpoint
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"no usable checkpoint in {folder}{detail}")
