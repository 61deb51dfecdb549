"""Prepared data put in the object store once and used by several runs (a Ray Tune sweep's trials).

A sweep's trials usually differ only in what they train (LoRA rank, cluster count, learning
rate), not in their data: loading, splitting and tokenising it in every trial, then putting
every trial's copy in the object store, costs minutes and one copy per concurrent trial. The
sweep's driver builds it once (`share_data`); each trial whose data key matches reads it from
the object store (zero-copy numpy views on its node) and hands the same references to its
workers, so the store holds one copy per node whatever the number of trials.

The data key covers everything the federated data is built from: the `data` section, the seed
and the model name (its tokenizer). A trial whose key differs (a sweep over data.num_clients or
seed) builds its own, as a run does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fltac_ray.config import ExperimentConfig
    from fltac_ray.data.federated import FederatedData

# searched keys that change the data (everything else leaves it as the base experiment builds it)
DATA_KEYS = ("data.", "seed", "model.name")


def changes_data(key: str) -> bool:
    """Whether a dotted config key is one the federated data is built from."""
    return any(key == prefix or key.startswith(prefix) for prefix in DATA_KEYS)


def data_key(config: ExperimentConfig) -> str:
    """A digest of what build_federated_data reads: equal keys give identical data."""
    text = json.dumps({"data": config.data.model_dump(mode="json"), "seed": config.seed,
                       "model": config.model.name}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class SharedData:
    """References to one prepared data set in the object store. `tasks` and `clients` are the
    FederatedData fields the workers read (shipped to them as these same references)."""

    key: str
    tasks: Any  # ray.ObjectRef -> dict[str, TaskBundle]
    clients: Any  # ray.ObjectRef -> list[ClientShard]
    shares: Any  # (num_tasks, num_clients) numpy: small, travels by value
    nbytes: int  # the arrays' bytes in the store (one copy)

    def matches(self, config: ExperimentConfig) -> bool:
        return self.key == data_key(config)

    def get(self) -> FederatedData:
        """The data itself, read from the object store (numpy arrays are read-only views)."""
        import ray

        from fltac_ray.data.federated import FederatedData

        tasks, clients = ray.get([self.tasks, self.clients])
        return FederatedData(tasks, clients, self.shares)


def data_bytes(data: FederatedData) -> int:
    """Bytes of the numpy arrays in the prepared data (what the object store holds of it)."""
    total = 0
    for bundle in data.tasks.values():
        for split in (bundle.train, bundle.test):
            total += split.labels.nbytes + sum(a.nbytes for a in split.inputs.values())
    for shard in data.clients:
        total += sum(train.nbytes + test.nbytes for train, test in shard.tasks.values())
    return total


def share_data(config: ExperimentConfig) -> SharedData:
    """Build the run's data as a run would (before its algorithm federates it) and put it in the
    object store of the connected Ray. The caller's copy is dropped: only the store keeps it."""
    import ray

    from fltac_ray.engine.run_setup import build_data

    data = build_data(config)
    return SharedData(data_key(config), ray.put(data.tasks), ray.put(data.clients), data.shares,
                      data_bytes(data))
