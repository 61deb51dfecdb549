"""A user's plug-in module, as a researcher would write one outside fltac-ray: a task read from
a local CSV, a model family, and an algorithm. Experiments load it with `plugins:
[tests.plugin_example]`; tests/test_plugins.py runs them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from fltac_ray.algorithms import Aggregate, FederatedAlgorithm, Uploads
from fltac_ray.data.registry import register_task
from fltac_ray.data.types import LabelledTexts
from fltac_ray.models.registry import register_model

REVIEWS = Path(__file__).parent / "fixtures" / "reviews.csv"  # columns: review, stars (1-5)


@register_task("fixture_reviews", num_classes=2, description="a product review -> liked (4-5 stars) or not")
def load_reviews(config, rng: np.random.Generator):
    table = pd.read_csv(REVIEWS)
    order = rng.permutation(len(table))  # the engine cuts train/test from the front
    liked = (table["stars"].to_numpy()[order] >= 4).astype(np.int64)
    return LabelledTexts(table["review"].to_numpy()[order].tolist(), liked, ["disliked", "liked"])


@register_model("plugin-mlp", modality="vector", targets=["hidden"])
def build_mlp(seed: int, feature_dim: int) -> nn.Module:
    """A frozen random one-hidden-layer MLP of width 24 for vector tasks."""

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(feature_dim, 24)
            self.config = SimpleNamespace(hidden_size=24, model_type="plugin-mlp")

        def forward(self, features: torch.Tensor) -> torch.Tensor:  # (batch, d) -> (batch, 24)
            return torch.tanh(self.hidden(features))

    torch.manual_seed(seed)
    return Body()


class MeanOfHalves(FederatedAlgorithm):
    """Not a registered name: experiments say `algorithm: tests.plugin_example:MeanOfHalves`.
    FedAvg that moves the clients only halfway to the average: answer = (mean + own) / 2."""

    name = "mean_of_halves"
    summary = "each client moves halfway towards the FedAvg of all uploads"

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        mean = self.cluster_means(uploads.vectors, np.zeros(len(uploads.vectors), np.int64),
                                  uploads.num_samples).adapters[0]
        answers = (uploads.vectors + mean[None]) / 2  # (n, d): one answer per upload
        return Aggregate(np.arange(len(answers)), answers.astype(np.float32), np.ones(len(answers)))
