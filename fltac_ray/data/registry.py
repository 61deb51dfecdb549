"""The task registry: every task fltac-ray can load, by name, without importing its loader."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_classes: int
    source: str  # which loader module provides it
    description: str


_SPECS = [
    TaskSpec("wordnet_noun_supersense", 26, "wordnet",
             "WordNet noun gloss -> its lexicographer file (noun.animal, noun.artifact, ...)"),
    TaskSpec("wordnet_verb_supersense", 15, "wordnet",
             "WordNet verb gloss -> its lexicographer file (verb.motion, verb.change, ...)"),
    TaskSpec("wordnet_pos", 4, "wordnet",
             "WordNet gloss -> part of speech (noun, verb, adjective, adverb), class-balanced"),
    TaskSpec("synthetic_sentiment", 2, "synthetic",
             "generated review sentences -> positive / negative"),
    TaskSpec("synthetic_topic", 4, "synthetic",
             "generated sentences -> topic (sport, food, weather, music)"),
    TaskSpec("synthetic_tense", 3, "synthetic",
             "generated sentences -> past / present / future tense"),
]

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
