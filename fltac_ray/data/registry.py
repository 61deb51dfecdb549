"""The task registry: every task fltac-ray can load, by name, without importing its loader.

`kind` says what the examples are (types.TaskKind) and so which model family reads them;
`source` names the loader: offline packages (wordnet, fortunes, fashion_mnist, sklearn), generated
data (synthetic), or the Hugging Face hub / local files in the hub's format (hf).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fltac_ray.data.types import MODALITY


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_classes: int  # 0 for instruction tasks (generation, no classes)
    source: str
    description: str
    kind: str = "text"
    # plug-in tasks: (config, rng) -> Examples in random order, or (train, test) Examples
    loader: Callable[..., Any] | None = None

    @property
    def modality(self) -> str:
        return MODALITY[self.kind]


_DOLLY = {
    "brainstorming": "open-ended idea lists",
    "classification": "sort items into given classes",
    "closed_qa": "answer from a given passage",
    "creative_writing": "poems, stories, letters",
    "general_qa": "open questions, broad knowledge",
    "information_extraction": "pull facts out of a passage",
    "open_qa": "factual questions without a passage",
    "summarization": "summarise a passage",
}

_SPECS = [
    # --- offline, text classification (MiniLM) ---
    TaskSpec("wordnet_noun_supersense", 26, "wordnet",
             "WordNet noun gloss -> its lexicographer file (noun.animal, noun.artifact, ...)"),
    TaskSpec("wordnet_verb_supersense", 15, "wordnet",
             "WordNet verb gloss -> its lexicographer file (verb.motion, verb.change, ...)"),
    TaskSpec("wordnet_pos", 4, "wordnet",
             "WordNet gloss -> part of speech (noun, verb, adjective, adverb), class-balanced"),
    TaskSpec("fortunes_category", 9, "fortunes",
             "a quote from the fortunes package -> its collection (computers, food, law, ...)"),
    TaskSpec("synthetic_sentiment", 2, "synthetic",
             "generated review sentences -> positive / negative"),
    TaskSpec("synthetic_topic", 4, "synthetic",
             "generated sentences -> topic (sport, food, weather, music)"),
    TaskSpec("synthetic_tense", 3, "synthetic",
             "generated sentences -> past / present / future tense"),
    # --- offline, image classification (EfficientNet-lite0) ---
    TaskSpec("fashion_mnist", 10, "fashion_mnist", "Fashion-MNIST article -> its 10 classes", "image"),
    TaskSpec("fashion_mnist_group", 4, "fashion_mnist",
             "Fashion-MNIST article -> top / bottom or dress / footwear / bag", "image"),
    TaskSpec("digits", 10, "sklearn", "scikit-learn's 8x8 handwritten digits -> 0..9", "image"),
    # --- offline, vectors (FLoRAL's synthetic tasks; random-mlp) ---
    TaskSpec("synthetic_linear", 4, "synthetic",
             "x ~ N(0, I) -> argmax of a random linear teacher (rank-1 shift per cluster)", "vector"),
    TaskSpec("synthetic_mlp", 4, "synthetic",
             "x ~ N(0, I) -> argmax of a random 2-layer ReLU teacher (rank-1 shift per cluster)",
             "vector"),
    # --- offline, instruction tuning (SmolLM2-135M) ---
    TaskSpec("wordnet_define", 0, "wordnet", "instruction: define a word -> its WordNet gloss",
             "instruction"),
    TaskSpec("wordnet_synonym", 0, "wordnet", "instruction: give a synonym -> a synset sibling",
             "instruction"),
    TaskSpec("wordnet_category", 0, "wordnet",
             "instruction: what kind of thing is X -> its noun supersense", "instruction"),
    TaskSpec("wordnet_hypernym", 0, "wordnet",
             "instruction: a more general word for X -> its hypernym", "instruction"),
    # --- the paper's data sets (Hugging Face hub or local files in its format) ---
    TaskSpec("glue_sst2", 2, "hf", "GLUE SST-2: movie review sentence -> sentiment"),
    TaskSpec("glue_mrpc", 2, "hf", "GLUE MRPC: sentence pair -> paraphrase or not", "text_pair"),
    TaskSpec("glue_qqp", 2, "hf", "GLUE QQP: question pair -> duplicate or not", "text_pair"),
    TaskSpec("glue_qnli", 2, "hf", "GLUE QNLI: question, sentence -> sentence answers it or not",
             "text_pair"),
    TaskSpec("glue_rte", 2, "hf", "GLUE RTE: premise, hypothesis -> entailment or not", "text_pair"),
    TaskSpec("cifar10", 10, "hf", "CIFAR-10: 32x32 colour image -> 10 classes", "image"),
    TaskSpec("cifar100", 100, "hf", "CIFAR-100: 32x32 colour image -> 100 fine classes", "image"),
    *[TaskSpec(f"dolly_{c}", 0, "hf", f"Databricks-Dolly-15k category '{c}': {what}", "instruction")
      for c, what in _DOLLY.items()],
]

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}


def task_name_problem(name: str) -> str | None:
    """Why `name` cannot name a task (`@` marks a concept-shift cluster task, `:` and `/` would
    break run folder and tracker names), or None."""
    if not name or any(c in name for c in " @:/"):
        return "a task name has no spaces, '@', ':' or '/'"
    return None


def register_task(name: str, num_classes: int, kind: str = "text", description: str = ""):
    """Decorator: make a loader function available as task `name` in `data.tasks`.

        @register_task("my_reviews", num_classes=2, description="my product reviews -> stars")
        def load_my_reviews(config, rng) -> Examples: ...

    The loader gets the ExperimentConfig and a seeded numpy Generator and returns Examples
    (data/types.py) in random order, which the engine cuts into data.train_per_task /
    test_per_task, or a (train, test) pair of Examples. `num_classes` is the label space (0 for
    instruction tasks); `kind` one of text, text_pair, image, vector, instruction. The module
    must be imported before the config is read: list it in the config's `plugins`."""
    if kind not in MODALITY:
        raise ValueError(f"register_task({name!r}): kind {kind!r}; allowed: {sorted(MODALITY)}")
    if (problem := task_name_problem(name)) is not None:
        raise ValueError(f"register_task({name!r}): {problem}")
    if name in TASKS and TASKS[name].loader is None:
        raise ValueError(f"register_task({name!r}): taken by a built-in task")
    if num_classes < 0 or (kind == "instruction") != (num_classes == 0):
        raise ValueError(f"register_task({name!r}): num_classes = {num_classes}; instruction tasks "
                         "have 0 classes, the others at least 1")

    def decorate(loader: Callable[..., Any]) -> Callable[..., Any]:
        TASKS[name] = TaskSpec(name, num_classes, "plugin", description or (loader.__doc__ or "").strip()
                               .split("\n")[0], kind, loader)
        return loader

    return decorate
