"""Offline instruction-tuning categories derived from WordNet (the Dolly mirror).

Each category is a kind of instruction with a reference response read off WordNet 3.0:
  wordnet_define     "Define the word 'X'."                 -> its gloss
  wordnet_synonym    "Give a synonym of 'X'."               -> another word of the same synset
  wordnet_category   "What kind of thing is 'X'?"           -> its noun supersense (animal, ...)
  wordnet_hypernym   "Name a more general word for 'X'."    -> a word of its hypernym synset
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fltac_ray.data.types import Examples, instructions
from fltac_ray.data.wordnet import LEXNAMES, _data_path


def format_prompt(instruction: str, context: str = "") -> str:
    """The instruction template (Alpaca style, as FedIT uses for Dolly); the response follows."""
    if context.strip():
        return f"### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class Synset:
    offset: int
    lexfile: int
    words: list[str]
    gloss: str
    hypernyms: list[int]  # offsets of '@' pointers into the same file


def parse_synsets(path: Path) -> list[Synset]:
    synsets = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith(" ") or "|" not in line:
                continue
            fields, _, gloss = line.partition("|")
            parts = fields.split()
            # offset lex_filenum ss_type w_cnt(hex) [word lex_id]*w_cnt p_cnt [ptr off pos st]*p_cnt
            count = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            at = 4 + 2 * count
            pointers = int(parts[at])
            hypernyms = [int(parts[at + 1 + 4 * i + 1]) for i in range(pointers)
                         if parts[at + 1 + 4 * i] == "@"]
            definition = gloss.strip().split('; "')[0].strip()
            synsets.append(Synset(int(parts[0]), int(parts[1]), words, definition, hypernyms))
    return synsets


def _plain(word: str) -> bool:
    return word.isascii() and word.replace(" ", "").replace("-", "").isalpha()


def build_category(category: str, wordnet_dir: str, n_examples: int,
                   rng: np.random.Generator) -> Examples:
    synsets = parse_synsets(_data_path(wordnet_dir, "data.noun"))
    by_offset = {s.offset: s for s in synsets}
    pairs: list[tuple[str, str]] = []
    for synset in synsets:
        word = synset.words[0]
        if not _plain(word):
            continue
        if category == "wordnet_define":
            pairs.append((f"Define the word '{word}'.", synset.gloss))
        elif category == "wordnet_synonym":
            others = [w for w in synset.words[1:] if _plain(w) and w.lower() != word.lower()]
            if others:
                pairs.append((f"Give a synonym of '{word}'.", others[0]))
        elif category == "wordnet_category":
            pairs.append((f"What kind of thing is '{word}'? Answer with one word.",
                          LEXNAMES[synset.lexfile].split(".")[1].lower()))
        elif category == "wordnet_hypernym":
            parents = [by_offset[o] for o in synset.hypernyms if o in by_offset]
            if parents:
                pairs.append((f"Name a more general word for '{word}'.", parents[0].words[0]))
        else:
            raise KeyError(category)
    chosen = rng.choice(len(pairs), size=min(n_examples, len(pairs)), replace=False)
    return instructions([format_prompt(pairs[i][0]) for i in chosen], [pairs[i][1] for i in chosen])
