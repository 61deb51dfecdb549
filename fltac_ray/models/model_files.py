"""What describes a model read from files, shipped by the driver so workers never ask the hub.

For a Hugging Face hub id or a local model folder, the driver reads the model's small files
(config, tokenizer, generation config; kilobytes to a few MB) once, and for a hub id the exact
revision (commit) they came from. Every worker writes them into its node's cache folder and
builds the architecture and the tokenizer from there. The weights stay where they are: the
node's base cache (models/base_cache.py) is filled from the node's own copy, a local folder or
the node's Hugging Face cache at that revision, read with `local_files_only` (a node without
them gets an error saying how to provide them). Packaged models and the tiny test models need
no files (every node has them installed); a plug-in built in code ships its tokenizer's files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fltac_ray.errors import ResourceUnavailableError

# The small files of a transformers model folder (what AutoConfig and AutoTokenizer read).
SMALL_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja",
)
BUILT_IN = ("minilm", "smollm2-135m", "efficientnet-lite0", "random-mlp")


@dataclass(frozen=True)
class ModelFiles:
    """A model's small files as bytes; `revision`: the hub commit they came from (None: a
    local folder, whose weights every node reads at the same path)."""

    name: str
    revision: str | None
    files: tuple[tuple[str, bytes], ...]

    @property
    def digest(self) -> str:
        hasher = hashlib.blake2b(digest_size=10)
        hasher.update(f"{self.name}\0{self.revision}".encode())
        for filename, content in self.files:
            hasher.update(filename.encode() + b"\0" + content)
        return hasher.hexdigest()

    def install(self, root: Path) -> Path:
        """Write the files into root/model-files/<digest>/ (once per node: a folder renamed into
        place, so a reader never sees half of it) and return that folder."""
        folder = root / "model-files" / self.digest
        if folder.is_dir():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.digest}-", dir=folder.parent))
        for filename, content in self.files:
            (staging / filename).write_bytes(content)
        try:
            os.replace(staging, folder)
        except OSError:  # another worker of this node installed it first
            shutil.rmtree(staging, ignore_errors=True)
        return folder


def file_source(name: str) -> tuple[str | None, bool]:
    """(where `name`'s files are: a hub id or a folder, whether they include config.json):
    (None, False) for models every node has built in; a plug-in built in code ships only its
    tokenizer (model.name's registered `tokenizer`)."""
    from fltac_ray.models.registry import MODELS

    if name in BUILT_IN or name.startswith(("tiny-random-", "random-")):
        return None, False
    plugin = MODELS.get(name)
    if plugin is not None and plugin.build is not None:
        return plugin.tokenizer, False
    return name, True


def collect_model_files(name: str) -> ModelFiles | None:
    """The driver's side: the model's small files (a hub id: downloaded or taken from this
    machine's Hugging Face cache, with their revision), or None when nothing needs shipping."""
    source, with_config = file_source(name)
    if source is None:
        return None
    local = Path(source).expanduser()
    if local.is_dir():
        folder, revision = local, None
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, allow_patterns=list(SMALL_FILES)))
        except Exception as exc:  # noqa: BLE001 - offline, unknown id, no access: all say the same
            raise ResourceUnavailableError(
                f"model.name = {name!r}: could not get the files of {source!r} (config, tokenizer) from "
                f"the Hugging Face hub or this machine's cache ({type(exc).__name__}: {exc})") from exc
        revision = folder.name  # snapshots/<commit>
    files = tuple((filename, (folder / filename).read_bytes()) for filename in SMALL_FILES
                  if (folder / filename).is_file())
    if with_config and not any(filename == "config.json" for filename, _ in files):
        raise ResourceUnavailableError(f"model.name = {name!r}: no config.json in {folder}")
    return ModelFiles(name, revision, files)
