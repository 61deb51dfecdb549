"""Plain containers shared by the data loaders.

A task's raw examples come in one of five kinds (the task registry says which); the model family
that can read them follows from the kind (see `MODALITY`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

TaskKind = Literal["text", "text_pair", "image", "vector", "instruction"]

# Local data files a task may come from: suffix -> the `datasets` builder that reads it.
DATA_FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Which family of base model reads each kind of task.
MODALITY: dict[str, str] = {
    "text": "text",
    "text_pair": "text",
    "image": "image",
    "vector": "vector",
    "instruction": "causal_lm",
}


@dataclass
class Examples:
    """Labelled examples of one task; exactly the fields of its kind are set.

    text:        texts
    text_pair:   texts, pairs (second sentence, e.g. MRPC's sentence2)
    image:       images (n, channels, height, width) uint8
    vector:      features (n, d) float32
    instruction: texts (prompt), pairs (reference response); labels are all 0, no classes
    """

    kind: TaskKind
    labels: np.ndarray  # (n,) int64 class ids in [0, len(class_names))
    class_names: list[str]
    texts: list[str] | None = None
    pairs: list[str] | None = None
    images: np.ndarray | None = None
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | slice) -> Examples:
        def pick(values):
            if values is None:
                return None
            if isinstance(values, np.ndarray):
                return values[index]
            positions = range(len(values))[index] if isinstance(index, slice) else index
            return [values[int(i)] for i in positions]

        return replace(self, labels=self.labels[index], texts=pick(self.texts), pairs=pick(self.pairs),
                       images=pick(self.images), features=pick(self.features))


def LabelledTexts(texts: list[str], labels: np.ndarray, class_names: list[str]) -> Examples:  # noqa: N802
    """Single-text classification examples (the WordNet, fortunes and synthetic text tasks)."""
    return Examples("text", np.asarray(labels, dtype=np.int64), class_names, texts=list(texts))


def instructions(prompts: list[str], responses: list[str]) -> Examples:
    return Examples("instruction", np.zeros(len(prompts), np.int64), [], texts=list(prompts),
                    pairs=list(responses))
