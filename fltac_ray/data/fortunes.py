"""Offline text task from the Debian `fortunes` package: which collection a quote comes from.

Each collection file holds quotes separated by lines containing only "%". We use topical
collections of at least ~150 quotes so that the label is about content, not style.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fltac_ray.data.types import Examples, LabelledTexts
from fltac_ray.errors import ResourceUnavailableError

CATEGORIES = ["computers", "education", "food", "law", "love", "politics", "science", "sports",
              "work"]
INSTALL_HINT = "install it with `sudo apt-get install fortunes` or set data.fortunes_dir"


def read_collection(path: Path) -> list[str]:
    """Quotes of one collection with whitespace collapsed (tab-aligned tables become one line)."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    quotes = (" ".join(block.split()) for block in raw.split("\n%\n"))
    return [q for q in quotes if len(q) > 10]


def load_fortune_category(fortunes_dir: str, n_examples: int, rng: np.random.Generator) -> Examples:
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(CATEGORIES):
        path = Path(fortunes_dir) / name
        if not path.is_file():
            raise ResourceUnavailableError(
                f"fortunes collection {path} not found (data.fortunes_dir = {fortunes_dir!r}); "
                f"{INSTALL_HINT}")
        quotes = read_collection(path)
        texts.extend(quotes)
        labels.extend([label] * len(quotes))
    order = rng.permutation(len(texts))[:n_examples]
    return LabelledTexts([texts[i] for i in order], np.asarray(labels, np.int64)[order], CATEGORIES)
