"""The frozen base, loaded once per node and memory-mapped by every worker there. No Ray.

The driver never loads the base: it hands each worker a `BaseDescription` (model name, modality,
seed of the tiny random models, feature size). The first worker on a node loads the weights
from that node's own copy (the packaged models, or its Hugging Face cache) and writes them as
one `.npy` file per tensor plus a manifest into the node's cache folder; every other worker of
the node, and every later run with the same base, maps those files read-only. The page cache
then holds one physical copy per node, shared by its workers (each process's PSS counts its
share), a replacement worker maps the files again instead of reloading, and nothing about the
weights crosses the network.

Files: <cache_dir>/<key>/manifest.json and <key>/<index>.npy, key = a digest of the description
and of the model files' names, sizes and modification times (a reinstalled model gets a new key).
An exclusive lock file (<key>.lock, fcntl) makes the first worker load while the others wait.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fltac_ray.errors import ResourceUnavailableError
from fltac_ray.models.shared_weights import BaseWeights

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class BaseDescription:
    """What identifies a base model: all a worker needs to load it or find it on its node."""

    name: str
    modality: str
    seed: int  # the tiny random models are drawn from it; loaded checkpoints ignore it
    feature_dim: int
    dtype: str = "float32"  # the frozen base's precision (model.dtype resolved on the worker's device)


def _source_fingerprint(name: str) -> list:
    """Names, sizes and modification times of the model's local files ([] for a hub id or a
    model built in code): a reinstalled or edited model changes the cache key."""
    from fltac_ray.models.builders import model_source

    try:
        source = Path(model_source(name))
    except Exception:  # noqa: BLE001 - models built in code (tiny, plug-ins) have no files
        return []
    if not source.is_dir():
        return [str(source)]
    return sorted([str(path.relative_to(source)), path.stat().st_size, int(path.stat().st_mtime)]
                  for path in source.rglob("*") if path.is_file())


def cache_key(description: BaseDescription) -> str:
    text = json.dumps({"format": FORMAT, **asdict(description),
                       "files": _source_fingerprint(description.name)}, sort_keys=True)
    return f"{description.name}-{hashlib.blake2b(text.encode(), digest_size=10).hexdigest()}"


def write_weights(weights: BaseWeights, folder: Path) -> None:
    """Every array as <index>.npy and the manifest last, into a fresh folder renamed into place
    (a reader never sees a half-written base)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        names = list(weights.arrays)
        for index, name in enumerate(names):
            np.save(staging / f"{index}.npy", weights.arrays[name], allow_pickle=False)
        manifest = {"format": FORMAT, "names": names, "dtypes": weights.dtypes,
                    "buffers": sorted(weights.buffers), "aliases": weights.aliases}
        (staging / MANIFEST).write_text(json.dumps(manifest))
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_weights(folder: Path) -> BaseWeights:
    """The base as read-only memory maps of the folder's files (no copy)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}")
    arrays = {name: np.load(folder / f"{index}.npy", mmap_mode="r", allow_pickle=False)
              for index, name in enumerate(manifest["names"])}
    return BaseWeights(arrays, manifest["dtypes"], set(manifest["buffers"]), manifest["aliases"])


def default_cache_dir() -> Path:
    """<this node's temporary folder>/fltac-ray/bases: node-local (a home folder may be a network
    share, where memory maps are slow and locks unreliable)."""
    return Path(tempfile.gettempdir()) / "fltac-ray" / "bases"


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def cache_dir_problem(cache_dir: str | Path | None) -> str | None:
    """None when this node can create and write the cache folder, else what is wrong."""
    root = _cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"{root} is not writable")
    except OSError as exc:
        return f"cannot create or write {root} ({exc}); give a writable node-local folder"
    return None


def writable_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache folder (created); ResourceUnavailableError naming engine.base_cache_dir when this
    node cannot write there."""
    problem = cache_dir_problem(cache_dir)
    if problem is not None:
        raise ResourceUnavailableError(f"engine.base_cache_dir = {cache_dir!r} on this node: {problem}")
    return _cache_root(cache_dir)


def node_base_weights(description: BaseDescription, cache_dir: str | Path | None = None
                      ) -> tuple[BaseWeights, bool]:
    """(the base, mapped from this node's cache; True when this call loaded and wrote it).
    `cache_dir` None: default_cache_dir()."""
    from fltac_ray.models.builders import load_backbone
    from fltac_ray.models.shared_weights import export_weights

    root = writable_cache_dir(cache_dir)
    folder = root / cache_key(description)
    loaded = False
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (folder / MANIFEST).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # never complete without its manifest
            from fltac_ray.client.precision import DTYPES

            backbone = load_backbone(description.name, description.modality, seed=description.seed,
                                     feature_dim=description.feature_dim, dtype=DTYPES[description.dtype])
            try:
                write_weights(export_weights(backbone), folder)
            except OSError as exc:  # a full disk, most likely: the base is as large as on disk
                raise ResourceUnavailableError(
                    f"engine.base_cache_dir: could not write the base ({description.name}) to "
                    f"{folder} on this node: {exc}") from exc
            del backbone
            loaded = True
    return read_weights(folder), loaded
