"""Generated text tasks that need no data package: the fallback demo and the engine's tests.

Sentences are assembled from small word lists so that each label is learnable from the words
while the three tasks share vocabulary (subjects, fillers), which keeps them from being trivially
separable by surface statistics alone.
"""

from __future__ import annotations

import numpy as np

from fltac_ray.data.types import LabelledTexts

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


def sentiment(n: int, rng: np.random.Generator) -> LabelledTexts:
    labels = rng.integers(0, 2, size=n)
    texts = [
        f"{_pick(rng, _SUBJECTS)} said {_pick(rng, _THINGS)} was "
        f"{_pick(rng, _POSITIVE if y == 0 else _NEGATIVE)}"
        for y in labels
    ]
    return LabelledTexts(texts, labels.astype(np.int64), ["positive", "negative"])


def topic(n: int, rng: np.random.Generator) -> LabelledTexts:
    names = list(_TOPICS)
    labels = rng.integers(0, len(names), size=n)
    texts = [
        f"{_pick(rng, _SUBJECTS)} mentioned {_pick(rng, _TOPICS[names[y]])} and "
        f"{_pick(rng, _TOPICS[names[y]])}"
        for y in labels
    ]
    return LabelledTexts(texts, labels.astype(np.int64), names)


def tense(n: int, rng: np.random.Generator) -> LabelledTexts:
    names = list(_TENSES)
    labels = rng.integers(0, len(names), size=n)
    texts = [
        f"{_pick(rng, _SUBJECTS)} {_pick(rng, _TENSES[names[y]])} {_pick(rng, _THINGS)}"
        for y in labels
    ]
    return LabelledTexts(texts, labels.astype(np.int64), names)
