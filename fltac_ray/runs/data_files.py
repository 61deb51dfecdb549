"""The user's data files a run was built from: `<run>/data_files.json`.

A checkpoint fixes the config, not the data behind it: a resume from another working directory
would read whatever a relative `data.files` path means there, and a file edited between the
interruption and `--resume` would be used as it is. So a run records, once its data is prepared,
each local file or folder it read (`data.files.<task>.<train|test>`, `data.custom_tasks.<name>.
<train|test|dataset>`) by absolute path, size and SHA-256; a resume reads the recorded absolute
paths (from any working directory) and refuses a file that changed, naming it. Hub datasets and
the packaged tasks are not local files of the user's and are not recorded; neither are images
that a data file names by path (only the table itself).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fltac_ray.errors import DataFileError, RunFolderError
from fltac_ray.runs.files import read_regular_text, sha256_of

DATA_FILES = "data_files.json"


@dataclass(frozen=True)
class DataFile:
    setting: str  # the config field that names it, e.g. data.custom_tasks.reviews.train
    path: str  # absolute, as resolved when the run started
    size: int  # bytes (a folder: of all its files)
    sha256: str  # of the file (a folder: of each file's relative path, size and SHA-256, in order)


def local_sources(config: Any) -> dict[str, Path]:
    """setting -> the local file or folder it names, for every data path of the config that is
    on this machine (a custom task's `dataset` only when it is an existing folder, not a hub id)."""
    found = {}
    for task, roles in sorted(config.data.files.items()):
        for role, path in sorted(roles.items()):
            found[f"data.files.{task}.{role}"] = Path(path).expanduser()
    for name, custom in sorted(config.data.custom_tasks.items()):
        for role in ("train", "test"):
            if getattr(custom, role) is not None:
                found[f"data.custom_tasks.{name}.{role}"] = Path(getattr(custom, role)).expanduser()
        if custom.dataset is not None and Path(custom.dataset).expanduser().is_dir():
            found[f"data.custom_tasks.{name}.dataset"] = Path(custom.dataset).expanduser()
    return found


def fingerprint(setting: str, path: Path) -> DataFile:
    """Size and SHA-256 of a file, or of a folder's files (relative path, size and digest of each,
    in sorted order: a renamed, added or removed file changes it too)."""
    path = path.resolve()
    if path.is_dir():
        digest, total = hashlib.sha256(), 0
        for root, folders, files in os.walk(path):
            folders.sort()
            for name in sorted(files):
                file = Path(root, name)
                # a user's data may be links (a Hugging Face cache snapshot is): fingerprint the
                # file each names; a pipe or a device is still refused
                size, sha = sha256_of(file.resolve())
                digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0{sha}\n".encode())
                total += size
        return DataFile(setting, str(path), total, digest.hexdigest())
    size, sha = sha256_of(path)
    return DataFile(setting, str(path), size, sha)


def record_data_files(run_dir: Path, config: Any) -> list[DataFile]:
    """Fingerprint the config's local data (just read by the run) into data_files.json."""
    records = [fingerprint(setting, path) for setting, path in local_sources(config).items()]
    (Path(run_dir) / DATA_FILES).write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    return records


def load_data_files(run_dir: Path) -> list[DataFile] | None:
    """The records a run wrote; None for a run folder without them (written before they existed,
    or stopped before its data was prepared)."""
    path = Path(run_dir) / DATA_FILES
    if not path.is_file():
        return None
    try:
        raw = json.loads(read_regular_text(path))
        records = [DataFile(**{key: entry[key] for key in ("setting", "path", "size", "sha256")}) for entry in raw]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RunFolderError(run_dir, f"{DATA_FILES} is not a list of data file records ({exc}); restore it, or "
                             "delete it to resume without checking the data files") from None
    return records


def check_and_pin(run_dir: Path, config: Any) -> list[DataFile] | None:
    """On resume: refuse a recorded file that changed or is gone, naming it; then point the
    config's data settings at the recorded absolute paths, so the resume reads the files the
    run was built from whatever its working directory. Returns the records (None: none kept)."""
    records = load_data_files(run_dir)
    if records is None:
        return None
    sources = local_sources(config)
    for record in records:
        path = Path(record.path)
        if not path.exists():
            raise DataFileError(path, f"({record.setting}) the run was built from this file and it is gone; restore "
                                "it to resume, or start a new run")
        now = fingerprint(record.setting, path)
        if (now.size, now.sha256) != (record.size, record.sha256):
            change = (f"{record.size:,} -> {now.size:,} bytes" if now.size != record.size
                      else "same size, different content")
            raise DataFileError(path, f"({record.setting}) changed since the run started ({change}; SHA-256 was "
                                f"{record.sha256[:12]}..., now {now.sha256[:12]}...); a resume continues on the data "
                                "the run was built from: restore it, or start a new run")
        if record.setting in sources:
            _set(config, record.setting, record.path)
    return records


def _set(config: Any, setting: str, value: str) -> None:
    """config.<setting> = value for the data paths local_sources names."""
    section, rest = setting.removeprefix("data.").split(".", 1)
    task, role = rest.rsplit(".", 1)  # a task name may hold dots; the role is the last part
    if section == "files":
        config.data.files[task][role] = value
    else:
        setattr(config.data.custom_tasks[task], role, value)
