"""Build the federated data set of an experiment: tasks loaded, split, partitioned and encoded.

Everything here runs in the driver before Ray starts, so a missing data package or an impossible
split fails early. The result is plain numpy (shipped to workers once through the object store).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fltac_ray.config import ExperimentConfig
from fltac_ray.data import synthetic, wordnet
from fltac_ray.data.partition import dirichlet_shares, split_counts, split_indices
from fltac_ray.data.registry import TASKS
from fltac_ray.data.types import LabelledTexts

# text tokenizer: list of texts -> {"input_ids": (n, L) int32, "lengths": (n,) int32}
Encoder = Callable[[list[str]], dict[str, np.ndarray]]


@dataclass
class EncodedSplit:
    inputs: dict[str, np.ndarray]  # model inputs, first axis = example
    labels: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskBundle:
    name: str
    class_names: list[str]
    train: EncodedSplit
    test: EncodedSplit

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def majority_rate(self) -> float:
        """Test accuracy of always predicting the most frequent training class."""
        majority = np.bincount(self.train.labels, minlength=self.num_classes).argmax()
        return float(np.mean(self.test.labels == majority))


@dataclass
class ClientShard:
    client_id: int
    # task -> (train indices, test indices) into that task's splits
    tasks: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # task -> local steps per round when not train.local_steps (the pooled centralized client)
    steps: dict[str, int] = field(default_factory=dict)

    def num_train(self, task: str) -> int:
        return len(self.tasks[task][0])


@dataclass
class FederatedData:
    tasks: dict[str, TaskBundle]
    clients: list[ClientShard]
    shares: np.ndarray  # (num_tasks, num_clients) Dirichlet shares after thresholding

    @property
    def head_classes(self) -> int:
        """Width of the shared classifier head: the largest class count over tasks."""
        return max(bundle.num_classes for bundle in self.tasks.values())

    def pooled(self, local_steps: int, client_fraction: float) -> FederatedData:
        """All clients' data in one client (centralized reference). Each task keeps the step
        budget the federation spends on it per round: holders x local_steps x client_fraction."""
        pooled = ClientShard(0)
        for task in self.tasks:
            holders = [c.tasks[task] for c in self.clients if task in c.tasks]
            pooled.tasks[task] = (
                np.sort(np.concatenate([train for train, _ in holders])),
                np.sort(np.concatenate([test for _, test in holders])),
            )
            pooled.steps[task] = max(1, round(len(holders) * local_steps * client_fraction))
        return FederatedData(self.tasks, [pooled], np.ones((len(self.tasks), 1)))

    def partition_rows(self) -> list[dict[str, object]]:
        rows = []
        for client in self.clients:
            for task_index, task in enumerate(self.tasks):
                train, test = client.tasks.get(task, (np.empty(0), np.empty(0)))
                rows.append({
                    "client": client.client_id,
                    "task": task,
                    "share": float(self.shares[task_index, client.client_id]),
                    "train_samples": len(train),
                    "test_samples": len(test),
                })
        return rows


def load_task_texts(name: str, config: ExperimentConfig, rng: np.random.Generator) -> LabelledTexts:
    n = config.data.train_per_task + config.data.test_per_task
    wordnet_dir = config.data.wordnet_dir
    loaders: dict[str, Callable[[], LabelledTexts]] = {
        "wordnet_noun_supersense": lambda: wordnet.load_supersense("noun", wordnet_dir, n, rng),
        "wordnet_verb_supersense": lambda: wordnet.load_supersense("verb", wordnet_dir, n, rng),
        "wordnet_pos": lambda: wordnet.load_part_of_speech(wordnet_dir, n, rng),
        "synthetic_sentiment": lambda: synthetic.sentiment(n, rng),
        "synthetic_topic": lambda: synthetic.topic(n, rng),
        "synthetic_tense": lambda: synthetic.tense(n, rng),
    }
    if set(loaders) != set(TASKS):  # a registry entry without a loader is a programming error
        raise RuntimeError(f"task loaders out of sync with the registry: {set(loaders) ^ set(TASKS)}")
    return loaders[name]()


def _split_train_test(texts: LabelledTexts, n_train: int, n_test: int) -> tuple[LabelledTexts, LabelledTexts]:
    # Loaders return examples in random order; when a source is smaller than asked, keep the
    # requested train:test proportion.
    total = len(texts)
    if total < n_train + n_test:
        n_train = round(total * n_train / (n_train + n_test))
    parts = []
    for lo, hi in ((0, n_train), (n_train, min(total, n_train + n_test))):
        parts.append(LabelledTexts(texts.texts[lo:hi], texts.labels[lo:hi], texts.class_names))
    return parts[0], parts[1]


def build_federated_data(config: ExperimentConfig, encode: Encoder) -> FederatedData:
    data = config.data
    num_clients = data.num_clients
    bundles: dict[str, TaskBundle] = {}
    clients = [ClientShard(client_id) for client_id in range(num_clients)]
    shares = np.zeros((len(data.tasks), num_clients))
    for task_index, name in enumerate(data.tasks):
        texts = load_task_texts(name, config, np.random.default_rng([config.seed, 1, task_index]))
        train, test = _split_train_test(texts, data.train_per_task, data.test_per_task)
        bundles[name] = TaskBundle(
            name=name,
            class_names=texts.class_names,
            train=EncodedSplit(encode(train.texts), train.labels),
            test=EncodedSplit(encode(test.texts), test.labels),
        )
        # Train and test sets are cut with the same shares, so a client tests on its own mix.
        rng = np.random.default_rng([config.seed, 2, task_index])
        shares[task_index] = dirichlet_shares(rng, num_clients, data.dirichlet_alpha, data.min_share)
        train_parts = split_indices(rng.permutation(len(train)), split_counts(len(train), shares[task_index]))
        test_parts = split_indices(rng.permutation(len(test)), split_counts(len(test), shares[task_index]))
        for client, train_idx, test_idx in zip(clients, train_parts, test_parts, strict=True):
            if len(train_idx) > 0:  # a client with no training example does not hold the task
                client.tasks[name] = (np.sort(train_idx), np.sort(test_idx))
    return FederatedData(bundles, clients, shares)
