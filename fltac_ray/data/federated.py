"""Build the federated data set of an experiment: tasks loaded, split, partitioned and encoded.

Everything here runs in the driver before Ray starts, so a missing data package or an impossible
split fails early. The result is plain numpy (shipped to workers once through the object store).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from fltac_ray.config import ExperimentConfig
from fltac_ray.data import fortunes, images, synthetic, wordnet
from fltac_ray.data.encoding import Featurizer
from fltac_ray.data.partition import dirichlet_shares, split_counts, split_indices
from fltac_ray.data.registry import TASKS
from fltac_ray.data.types import Examples

ALL_EXAMPLES = 2**40  # "as many as the source has": every loader draws min(n, its pool)


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
    # the examples before encoding (train, test), kept only when asked (client_examples)
    raw: tuple[Examples, Examples] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_generation(self) -> bool:
        return self.num_classes == 0

    @property
    def majority_rate(self) -> float:
        """Test accuracy of always predicting the most frequent training class (NaN: generation)."""
        if self.is_generation:
            return float("nan")
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


def load_task(name: str, config: ExperimentConfig, rng: np.random.Generator,
              cluster: int | None = None) -> Examples | tuple[Examples, Examples]:
    """A task's examples in random order (or, for hub tasks, its own (train, test) splits).
    `cluster` (concept shift rank1 only) selects the teacher of that cluster."""
    data = config.data
    # train_per_task: all takes a source's every example (the loaders draw min(n, pool))
    n = ALL_EXAMPLES if data.train_limit is None else data.train_limit + data.test_per_task
    wn = data.wordnet_dir
    if name in data.custom_tasks:  # declared in YAML (data/custom.py)
        from fltac_ray.data.custom import load_custom_task

        return load_custom_task(name, data.custom_tasks[name], config, rng)
    if name in TASKS and TASKS[name].loader is not None:  # a plug-in (data/registry.register_task)
        return _checked_plugin(TASKS[name], TASKS[name].loader(config, rng))
    if name in TASKS and TASKS[name].source == "hf":
        from fltac_ray.data.hf import load_hub_task

        return load_hub_task(name, TASKS[name].kind, data.train_limit, data.test_per_task, rng,
                             data.files.get(name))
    if name in ("wordnet_define", "wordnet_synonym", "wordnet_category", "wordnet_hypernym"):
        from fltac_ray.data.instructions import build_category

        return build_category(name, wn, n, rng)
    loaders: dict[str, Callable[[], Examples]] = {
        "wordnet_noun_supersense": lambda: wordnet.load_supersense("noun", wn, n, rng),
        "wordnet_verb_supersense": lambda: wordnet.load_supersense("verb", wn, n, rng),
        "wordnet_pos": lambda: wordnet.load_part_of_speech(wn, n, rng),
        "fortunes_category": lambda: fortunes.load_fortune_category(data.fortunes_dir, n, rng),
        "synthetic_sentiment": lambda: synthetic.sentiment(n, rng),
        "synthetic_topic": lambda: synthetic.topic(n, rng),
        "synthetic_tense": lambda: synthetic.tense(n, rng),
        "fashion_mnist": lambda: images.load_fashion_mnist(data.fashion_mnist_dir, n, rng),
        "fashion_mnist_group": lambda: images.load_fashion_mnist(data.fashion_mnist_dir, n, rng, grouped=True),
        "digits": lambda: images.load_digits_task(n, rng),
        "synthetic_linear": lambda: synthetic.vector_task("linear", n, data.feature_dim, rng, cluster),
        "synthetic_mlp": lambda: synthetic.vector_task("mlp", n, data.feature_dim, rng, cluster),
    }
    if name not in loaders:  # a registry entry without a loader is a programming error
        raise RuntimeError(f"no loader for task {name!r}")
    return loaders[name]()


def _checked_plugin(spec, loaded) -> Examples | tuple[Examples, Examples]:
    """A plug-in loader's result, checked against what it registered."""
    parts = loaded if isinstance(loaded, tuple) else (loaded,)
    for part in parts:
        if not isinstance(part, Examples):
            raise ValueError(f"task {spec.name}: its loader returned {type(part).__name__}, expected "
                             "Examples or a (train, test) pair of Examples (fltac_ray.data.types)")
        if part.kind != spec.kind or len(part.class_names) != spec.num_classes:
            raise ValueError(f"task {spec.name}: registered as {spec.kind} with {spec.num_classes} classes, "
                             f"its loader returned {part.kind} with {len(part.class_names)} classes")
        if len(part) and (part.labels.min() < 0 or (spec.num_classes and part.labels.max() >= spec.num_classes)):
            raise ValueError(f"task {spec.name}: labels must be in 0..{spec.num_classes - 1}")
    return loaded


def _split_train_test(examples: Examples, n_train: int | None, n_test: int) -> tuple[Examples, Examples]:
    """Loaders return examples in random order; when a source is smaller than asked, keep the
    requested train:test proportion. n_train None (train_per_task: all): n_test examples (at most
    half the source) are the test set, every other one trains."""
    total = len(examples)
    if n_train is None:
        n_train = total - min(n_test, total // 2)
    elif total < n_train + n_test:
        n_train = round(total * n_train / (n_train + n_test))
    return examples.subset(slice(0, n_train)), examples.subset(slice(n_train, min(total, n_train + n_test)))


def _concept_shift_examples(config: ExperimentConfig, cluster: int, rng: np.random.Generator) -> Examples:
    """Cluster c's data (FLoRAL's concept shift): images rotated by 360 c / C degrees, labels
    shifted y -> (y + c) mod classes, or a rank-1 shifted teacher (vector tasks)."""
    shift = config.data.concept_shift
    base = config.data.tasks[0]
    if shift.kind == "rank1":
        return load_task(base, config, rng, cluster=cluster)
    loaded = load_task(base, config, rng)
    examples = loaded if isinstance(loaded, Examples) else _concat(*loaded)
    if shift.kind == "rotation":
        return replace(examples, images=images.rotate_images(examples.images, 360 * cluster / shift.clusters))
    return replace(examples, labels=(examples.labels + cluster) % len(examples.class_names))


def _concat(a: Examples, b: Examples) -> Examples:
    def join(x, y):
        if x is None:
            return None
        return np.concatenate([x, y]) if isinstance(x, np.ndarray) else list(x) + list(y)

    return replace(a, labels=np.concatenate([a.labels, b.labels]), texts=join(a.texts, b.texts),
                   pairs=join(a.pairs, b.pairs), images=join(a.images, b.images),
                   features=join(a.features, b.features))


def _cluster_shares(num_clients: int, clusters: int) -> np.ndarray:
    """(clusters, num_clients): client k belongs to cluster k mod C, equal shares within it."""
    member = np.arange(num_clients)[None, :] % clusters == np.arange(clusters)[:, None]
    return member / member.sum(axis=1, keepdims=True)


def build_federated_data(config: ExperimentConfig, featurize: Featurizer, keep_raw: bool = False) -> FederatedData:
    """`keep_raw`: each TaskBundle also keeps its examples before encoding (client_examples)."""
    data = config.data
    num_clients = data.num_clients
    names = config.data.task_names
    bundles: dict[str, TaskBundle] = {}
    clients = [ClientShard(client_id) for client_id in range(num_clients)]
    if data.concept_shift is not None:
        shares = _cluster_shares(num_clients, data.concept_shift.clusters)
    else:
        shares = np.zeros((len(names), num_clients))
    for task_index, name in enumerate(names):
        rng = np.random.default_rng([config.seed, 1, task_index])
        if data.concept_shift is not None:
            loaded: Examples | tuple[Examples, Examples] = _concept_shift_examples(config, task_index, rng)
        else:
            loaded = load_task(name, config, rng)
        train, test = (loaded if isinstance(loaded, tuple)
                       else _split_train_test(loaded, data.train_limit, data.test_per_task))
        bundles[name] = TaskBundle(
            name=name,
            class_names=train.class_names,
            train=EncodedSplit(featurize(train), train.labels),
            test=EncodedSplit(featurize(test), test.labels),
            raw=(train, test) if keep_raw else None,
        )
        # Train and test sets are cut with the same shares, so a client tests on its own mix.
        rng = np.random.default_rng([config.seed, 2, task_index])
        if data.concept_shift is None:
            shares[task_index] = dirichlet_shares(rng, num_clients, data.dirichlet_alpha, data.resolved_min_share)
        train_parts = split_indices(rng.permutation(len(train)), split_counts(len(train), shares[task_index]))
        test_parts = split_indices(rng.permutation(len(test)), split_counts(len(test), shares[task_index]))
        for client, train_idx, test_idx in zip(clients, train_parts, test_parts, strict=True):
            if len(train_idx) > 0:  # a client with no training example does not hold the task
                client.tasks[name] = (np.sort(train_idx), np.sort(test_idx))
    return FederatedData(bundles, clients, shares)


def client_examples(config: ExperimentConfig, client: int, task: str, split: str = "test") -> tuple[np.ndarray, Examples]:
    """(indices into the task's `split`, those examples before encoding) that `client` holds of
    `task` in this experiment: the partition rebuilt from the config (it is seeded), without
    encoding. A client that does not hold the task gets none. The caller checks the arguments
    against the experiment (api.Result.client_examples names a bad one in a ConfigError)."""
    data = build_federated_data(config, lambda examples: {}, keep_raw=True)
    bundle, held = data.tasks[task], data.clients[client].tasks.get(task)
    examples = bundle.raw[0 if split == "train" else 1]
    indices = held[0 if split == "train" else 1] if held is not None else np.zeros(0, np.int64)
    return indices, examples.subset(indices)
