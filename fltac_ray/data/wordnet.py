"""Offline text tasks from WordNet 3.0's data files (Debian package `wordnet-base`).

Each synset line carries its lexicographer file number (the supersense) and a gloss; the text of
an example is "lemma: definition" with the usage examples cut off (they often repeat the lemma).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fltac_ray.data.types import Examples, LabelledTexts
from fltac_ray.errors import ResourceUnavailableError

# WordNet's lexnames file: index = lexicographer file number.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
]
NOUN_FILES = range(3, 29)  # 26 noun supersenses
VERB_FILES = range(29, 44)  # 15 verb supersenses
POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}
INSTALL_HINT = (
    "install it with `sudo apt-get install wordnet-base` (Debian/Ubuntu), set data.wordnet_dir to "
    "a folder holding WordNet 3.0's data.* files, or run the synthetic demo "
    "(experiments/synthetic_text.yaml), which needs no data package"
)


def parse_data_file(path: Path) -> tuple[list[int], list[str]]:
    """Return (lexicographer file numbers, texts) of every synset in one data.* file."""
    lexfiles: list[int] = []
    texts: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith(" ") or "|" not in line:
                continue  # licence header lines start with two spaces
            fields, _, gloss = line.partition("|")
            parts = fields.split()
            # offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] ...
            lemma = parts[4].replace("_", " ")
            if parts[2] in ("a", "s"):
                lemma = lemma.split("(")[0]  # adjective markers such as "(a)", "(p)"
            definition = gloss.strip().split('; "')[0].strip()
            lexfiles.append(int(parts[1]))
            texts.append(f"{lemma}: {definition}")
    return lexfiles, texts


def _data_path(wordnet_dir: str, filename: str) -> Path:
    path = Path(wordnet_dir) / filename
    if not path.is_file():
        raise ResourceUnavailableError(
            f"WordNet data file {path} not found (data.wordnet_dir = {wordnet_dir!r}); {INSTALL_HINT}"
        )
    return path


def _sample(rng: np.random.Generator, n_available: int, n_wanted: int) -> np.ndarray:
    return rng.choice(n_available, size=min(n_available, n_wanted), replace=False)


def load_supersense(
    pos: str, wordnet_dir: str, n_examples: int, rng: np.random.Generator
) -> Examples:
    filename, files = ("data.noun", NOUN_FILES) if pos == "noun" else ("data.verb", VERB_FILES)
    lexfiles, texts = parse_data_file(_data_path(wordnet_dir, filename))
    chosen = _sample(rng, len(texts), n_examples)
    labels = np.array([lexfiles[i] - files.start for i in chosen], dtype=np.int64)
    return LabelledTexts(
        texts=[texts[i] for i in chosen],
        labels=labels,
        class_names=[LEXNAMES[f] for f in files],
    )


def load_part_of_speech(wordnet_dir: str, n_examples: int, rng: np.random.Generator) -> Examples:
    # Class-balanced: nouns are 70% of WordNet, which would make "always noun" a strong baseline.
    per_class = -(-n_examples // len(POS_FILES))
    texts: list[str] = []
    labels: list[int] = []
    for label, filename in enumerate(POS_FILES.values()):
        _, class_texts = parse_data_file(_data_path(wordnet_dir, filename))
        chosen = _sample(rng, len(class_texts), per_class)
        texts.extend(class_texts[i] for i in chosen)
        labels.extend([label] * len(chosen))
    order = rng.permutation(len(texts))[:n_examples]
    return LabelledTexts(
        texts=[texts[i] for i in order],
        labels=np.asarray(labels, dtype=np.int64)[order],
        class_names=list(POS_FILES),
    )
