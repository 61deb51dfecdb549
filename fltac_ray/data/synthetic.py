"""Generated text tasks that need no data package: the fallback demo and the engine's tests.

Sentences are assembled from small word lists so that each label is learnable from the words
while the three tasks share vocabulary (subjects, fillers), which keeps them from being trivially
separable by surface statistics alone.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.data.types import Examples, LabelledTexts

_SUBJECTS = ["the critic", "my neighbour", "a tourist", "our teacher", "the team", "his sister",
             "a stranger", "the chef", "my friend", "the reporter"]
_THINGS = ["the film", "the meal", "the hotel", "the concert", "the game", "the book",
           "the trip", "the show", "the class", "the market"]
_POSITIVE = ["wonderful", "delightful", "excellent", "brilliant", "pleasant", "superb",
             "charming", "lovely", "great", "fantastic"]
_NEGATIVE = ["terrible", "awful", "dreadful", "boring", "disappointing", "horrible",
             "poor", "dull", "annoying", "mediocre"]
_TOPICS = {
    "sport": ["football", "the referee", "a goal", "the stadium", "tennis", "the match", "a medal"],
    "food": ["the soup", "fresh bread", "a recipe", "the oven", "spicy noodles", "dessert", "cheese"],
    "weather": ["the rain", "a storm", "the forecast", "sunshine", "the wind", "snow", "thunder"],
    "music": ["the guitar", "a melody", "the choir", "drums", "the orchestra", "a song", "jazz"],
}
_TENSES = {
    "past": ["visited", "talked about", "watched", "described", "enjoyed", "noticed"],
    "present": ["visits", "talks about", "watches", "describes", "enjoys", "notices"],
    "future": ["will visit", "will talk about", "will watch", "will describe", "will enjoy",
               "will notice"],
}


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[int(rng.integers(len(words)))]


def sentiment(n: int, rng: np.random.Generator) -> Examples:
    labels = rng.integers(0, 2, size=n)
    texts = [
        f"{_pick(rng, _SUBJECTS)} said {_pick(rng, _THINGS)} was "
        f"{_pick(rng, _POSITIVE if y == 0 else _NEGATIVE)}"
        for y in labels
    ]
    return LabelledTexts(texts, labels.astype(np.int64), ["positive", "negative"])


def topic(n: int, rng: np.random.Generator) -> Examples:
    names = list(_TOPICS)
    labels = rng.integers(0, len(names), size=n)
    texts = [
        f"{_pick(rng, _SUBJECTS)} mentioned {_pick(rng, _TOPICS[names[y]])} and "
        f"{_pick(rng, _TOPICS[names[y]])}"
        for y in labels
    ]
    return LabelledTexts(texts, labels.astype(np.int64), names)


def tense(n: int, rng: np.random.Generator) -> Examples:
    names = list(_TENSES)
    labels = rng.integers(0, len(names), size=n)
    texts = [
        f"{_pick(rng, _SUBJECTS)} {_pick(rng, _TENSES[names[y]])} {_pick(rng, _THINGS)}"
        for y in labels
    ]
    return LabelledTexts(texts, labels.astype(np.int64), names)


# --- FLoRAL's synthetic tasks with rank-1 concept shifts ---------------------------------------
# Inputs x ~ N(0, I_d); a fixed random teacher labels them; cluster c perturbs the teacher's first
# layer by a rank-1 term strength * u_c v_c^T, so clusters differ by exactly the kind of change a
# rank-1 adaptor can express (FLoRAL, synthetic experiments). Classification by argmax keeps the
# engine's accuracy metrics; the teacher itself is seeded independently of the data seed.
VECTOR_CLASSES = 4
MLP_TEACHER_HIDDEN = 32
SHIFT_STRENGTH = 3.0


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n)
    return v / np.linalg.norm(v)


def teacher_first_layer(kind: str, dim: int, cluster: int | None) -> np.ndarray:
    """(out, dim) first-layer teacher weight of cluster `cluster` (None: no shift)."""
    out = VECTOR_CLASSES if kind == "linear" else MLP_TEACHER_HIDDEN
    base = np.random.default_rng([2024, dim, out]).standard_normal((out, dim)) / np.sqrt(dim)
    if cluster is None:
        return base
    shift_rng = np.random.default_rng([2024, dim, out, 1 + cluster])
    # scaled like the base (entries ~ 1/sqrt(dim)) so the shift is comparable to the teacher itself
    shift = np.outer(_unit(shift_rng, out), _unit(shift_rng, dim)) * np.sqrt(out / dim)
    return base + SHIFT_STRENGTH * shift


def vector_task(kind: str, n: int, dim: int, rng: np.random.Generator,
                cluster: int | None = None) -> Examples:
    """`kind` "linear": y = argmax(W_c x); "mlp": y = argmax(V relu(W_c x))."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    first = teacher_first_layer(kind, dim, cluster)
    scores = x @ first.T
    if kind == "mlp":
        second = np.random.default_rng([2025, dim]).standard_normal((VECTOR_CLASSES, MLP_TEACHER_HIDDEN))
        scores = np.maximum(scores, 0.0) @ second.T
    labels = scores.argmax(axis=1).astype(np.int64)
    return Examples("vector", labels, [f"class {i}" for i in range(VECTOR_CLASSES)], features=x)
