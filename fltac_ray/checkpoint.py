"""Atomic per-round checkpoints in safetensors + JSON (never pickle).

A checkpoint is a folder `checkpoints/round_NNNNN/` holding one safetensors file per state group
(the deduplicated client store: distinct adapter rows and the (client, slot) index; private
client state such as FLoRAL routers; the algorithm's server state; the newest global adapters)
and `state.json` with the round, the format version and the SHA-256 of every file. It is written into a temporary folder and renamed into place, so a crash
leaves either the whole checkpoint or none; a damaged one (truncated, edited) fails its checksum
and the previous one is used instead.

The run's randomness is seeded per (seed, round, client, task), so nothing else is needed to
continue a run exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fltac_ray.errors import FltacError

# 2: the server side's deduplicated client store (clients: rows + index), no per-worker groups
FORMAT_VERSION = 2
StateGroup = dict[str, np.ndarray]


class CheckpointError(FltacError):
    """No usable checkpoint where one was expected."""


@dataclass
class Checkpoint:
    round: int
    groups: dict[str, StateGroup] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: Path | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: Path, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write `checkpoint` under folder/round_NNNNN atomically; keep the newest `keep` of them."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"round_{checkpoint.round:05d}"
    temporary = folder / f".tmp_round_{checkpoint.round:05d}_{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    files = {}
    for name, group in checkpoint.groups.items():
        path = temporary / f"{name}.safetensors"
        # safetensors wants C-contiguous arrays (object-store views and slices may not be)
        save_file({k: np.ascontiguousarray(v) for k, v in group.items()}, str(path))
        files[name] = {"file": path.name, "sha256": _sha256(path)}
    state = {"format": FORMAT_VERSION, "round": checkpoint.round, "files": files, "meta": checkpoint.meta}
    (temporary / "state.json").write_text(json.dumps(state, indent=1))
    for path in temporary.iterdir():  # data on disk before the rename makes it visible
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    for old in sorted(folder.glob("round_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint folder, verifying every checksum; raises CheckpointError if damaged."""
    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {state.get('format')}, this fltac-ray reads "
                                  f"format {FORMAT_VERSION} (written by another version; start the run anew)")
        groups = {}
        for name, info in state["files"].items():
            file = path / info["file"]
            if _sha256(file) != info["sha256"]:
                raise CheckpointError(f"{path}: {file.name} does not match its checksum (damaged)")
            groups[name] = load_file(str(file))
        return Checkpoint(int(state["round"]), groups, state.get("meta", {}), path)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:  # missing, truncated, not JSON
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
