"""A run folder's files, read safely (only regular files inside the folder) and folders written
whole (an export appears complete or not at all).

A run folder is read back on `--resume` and by the report. A symbolic link in it (to the same
bytes elsewhere, or to a secret) or a special file (a FIFO, a device) is never something a run
wrote: a FIFO or /dev/zero would make a read wait or run forever, a link would make the run read
what the folder does not hold. So entries are examined with lstat (links not followed), files are
opened with O_NOFOLLOW | O_NONBLOCK (no link, no wait on a pipe) and their size is bounded before
anything is read or hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

# What the run's text files can reasonably be: config.yaml and decisions.json are a few KiB,
# a checkpoint's state.json holds the resolved config and the evaluation records (KiB to MiB).
MAX_TEXT_BYTES = 256 << 20

_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symbolic link"}


def holds_something(path: Path) -> bool:
    """`path` exists and is not an empty folder: no place to write new results into."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def entry_problem(path: Path, folder_allowed: bool = False) -> str | None:
    """Why `path` is not a file the run wrote (a symbolic link, a pipe, a device, a socket; a
    folder unless `folder_allowed`), or None. Links are not followed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "is missing"
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if stat.S_ISREG(mode) or (folder_allowed and stat.S_ISDIR(mode)):
        return None
    return f"is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not a file this run wrote"


def foreign_entries(folder: Path) -> list[tuple[Path, str]]:
    """The entries directly in `folder` that no run writes: links and special files."""
    found = []
    for path in sorted(folder.iterdir()):
        problem = entry_problem(path, folder_allowed=True)
        if problem is not None:
            found.append((path, problem))
    return found


def open_regular(path: Path, max_bytes: int | None = None):
    """`path` opened for binary reading if it is a regular file (not a link) of at most
    `max_bytes`; raises OSError (ValueError for the size) saying why not."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path.name} is {_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ValueError(f"{path.name} is {info.st_size:,} bytes, more than the {max_bytes:,} it can be")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def sha256_of(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a regular file (see open_regular), read in 1 MiB
    blocks."""
    digest, size = hashlib.sha256(), 0
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def read_regular_text(path: Path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file (see open_regular)."""
    with open_regular(path, max_bytes) as handle:
        return handle.read().decode("utf-8")


def partial_name(target: Path) -> Path:
    """Where a folder is written before it takes `target`'s place: a hidden sibling, so a write
    killed midway never looks like the finished folder."""
    return target.with_name(f".{target.name}.partial")


@contextlib.contextmanager
def written_whole(target: Path) -> Iterator[Path]:
    """Yields an empty folder beside `target` to write into; when the block ends normally it takes
    `target`'s place (an existing `target`, e.g. the previous round's export, is replaced); when it
    raises, it is removed and `target` is left as it was. A folder a killed write left behind is
    removed on the next write."""
    partial = partial_name(target)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.rename(target, previous)
    os.rename(partial, target)
    shutil.rmtree(previous, ignore_errors=True)
