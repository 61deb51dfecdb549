"""Plain containers shared by the data loaders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: np.ndarray  # (n,) int64 class ids in [0, len(class_names))
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)
