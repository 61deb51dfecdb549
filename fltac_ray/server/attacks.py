"""Malicious clients (`federation.attack`), to study how aggregation and screening hold up.

A seeded share of the clients is malicious for the whole run (the same clients every round, as
a compromised device stays compromised). Each of their (client, slot) jobs trains as usual and
then sends, in place of its honest upload v (the vector the algorithm sends, shape (p,)):

  sign_flip   v' = -scale * v               (Byzantine sign flipping; scale 10 in issue 18)
  scaling     v' = scale * v                (model-replacement "boosting")
  random      v' ~ N(0, (scale * std(v))^2) per coordinate, fresh every round
  cross_task  the adapter it trained on another task's examples, sent as its own task's: it
              trains on the next task of data.tasks (cyclically), as many examples as it holds
              for its own task, drawn from that task's training pool (a client lying about
              which task its data is). `scale` is not used.

Sign flipping a whole LoRA vector leaves the attacker's own product B A unchanged ((-B)(-A)),
but not a server average of A's and B's: the aggregate is what the attack aims at.

`honest_damage` measures what an attack did to the honest clients in one round (engine tables).
No Ray here: the worker and the server call these as plain functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fltac_ray.algorithms.base import AdapterKey
from fltac_ray.server.clustering import hungarian_accuracy

KINDS = ("none", "sign_flip", "scaling", "random", "cross_task")

# stream tags of np.random.default_rng([seed, tag, ...]): distinct from the engine's other draws
_WHO_TAG, _NOISE_TAG, _DECOY_TAG = 17, 18, 19


def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """round(fraction * num_clients) client ids drawn without replacement from the run's seed."""
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng([seed, _WHO_TAG])
    return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))


@dataclass(frozen=True)
class Attack:
    """The run's attack: who is malicious and what they send."""

    kind: str
    scale: float
    seed: int
    malicious: frozenset[int]
    tasks: tuple[str, ...]  # data.tasks, in order: cross_task's decoys

    @classmethod
    def from_config(cls, config) -> Attack | None:
        """None when the config has no attack (federation.attack.kind: none)."""
        spec = config.federation.attack
        if spec.kind == "none":
            return None
        return cls(spec.kind, spec.scale, config.seed,
                   malicious_clients(config.data.num_clients, spec.fraction, config.seed),
                   tuple(config.data.task_names))

    def targets(self, client: int) -> bool:
        return client in self.malicious

    # --- cross_task: what a malicious job trains on --------------------------------------------
    def decoy_task(self, task: str) -> str:
        """The task whose examples a cross_task attacker trains in place of `task`."""
        return self.tasks[(self.tasks.index(task) + 1) % len(self.tasks)]

    def decoy_examples(self, key: AdapterKey, task: str, pool_size: int, count: int) -> np.ndarray:
        """(min(count, pool_size),) sorted indices into the decoy task's training split: the
        attacker holds as many decoy examples as it holds of its own task."""
        rng = np.random.default_rng([self.seed, _DECOY_TAG, key[0], key[1], self.tasks.index(task)])
        return np.sort(rng.choice(pool_size, size=min(count, pool_size), replace=False))

    # --- what a malicious job sends ------------------------------------------------------------
    def tamper(self, vector: np.ndarray, round_index: int, key: AdapterKey) -> np.ndarray:
        """The vector a malicious (client, slot) sends in place of its honest `vector` (p,)."""
        if self.kind == "sign_flip":
            return (-self.scale * vector).astype(np.float32)
        if self.kind == "scaling":
            return (self.scale * vector).astype(np.float32)
        if self.kind == "random":
            rng = np.random.default_rng([self.seed, _NOISE_TAG, round_index, key[0], key[1]])
            spread = self.scale * float(np.std(vector))
            return rng.normal(0.0, spread, size=vector.shape).astype(np.float32)
        return vector  # cross_task: the poison is in the data it trained on


def honest_damage(
    keys: list[AdapterKey],
    vectors: np.ndarray,
    starts: np.ndarray,
    weights: np.ndarray,
    accepted: np.ndarray,
    labels: np.ndarray,
    answers: np.ndarray,
    truth: dict[AdapterKey, str],
    malicious: frozenset[int],
    recovers_tasks: bool,
) -> dict[str, float]:
    """What the round's malicious uploads did to the honest ones.

    keys, vectors (n, p), weights (n,): every upload that passed the server's checks; starts
    (n, p): what each one's training started from, in the same entries; accepted (n,) bool: kept
    by screening; labels (m,) and answers (k, p): the aggregate over the m accepted ones, in
    order; truth: each key's task.

    The ideal answer of an honest upload is the weighted mean of the honest uploads of its group:
    its task (algorithms whose labels recover tasks) or its answer row (the others): what an
    attack-free server would send it. honest_aggregate_error: mean over the accepted honest
    uploads of ||answer - ideal|| / ||ideal - start||, the start being the weighted mean of the
    group's starts: the error in units of the round's honest progress, since whole adapters are
    dominated by the shared initialisation (||ideal|| would make any error look small). 0: the
    honest clients got what they would have without attackers; 1: an error as large as the
    round's whole update. honest_clustering_accuracy: the labels of the accepted honest uploads
    against their tasks (Hungarian matching); NaN where labels are no task grouping.
    """
    honest = np.array([key[0] not in malicious for key in keys], dtype=bool)
    answer_of = np.full(len(keys), -1)
    answer_of[np.flatnonzero(accepted)] = labels
    kept_honest = np.flatnonzero(honest & accepted)
    if recovers_tasks:
        group = np.array([truth[key] for key in keys], dtype=object)
        members_of = {g: np.flatnonzero(honest & (group == g)) for g in set(group[kept_honest])}
    else:
        group = answer_of
        members_of = {g: np.flatnonzero(honest & accepted & (group == g)) for g in set(group[kept_honest])}
    ideal, progress = {}, {}
    for g, rows in members_of.items():
        ideal[g] = np.average(np.asarray(vectors[rows], np.float64), axis=0, weights=weights[rows])
        start = np.average(np.asarray(starts[rows], np.float64), axis=0, weights=weights[rows])
        progress[g] = max(float(np.linalg.norm(ideal[g] - start)), 1e-12)
    errors = [np.linalg.norm(answers[answer_of[i]] - ideal[group[i]]) / progress[group[i]] for i in kept_honest]
    clustering = float("nan")
    if recovers_tasks and len(kept_honest):
        clustering = hungarian_accuracy([truth[keys[i]] for i in kept_honest], answer_of[kept_honest])
    return {
        "malicious_uploads": int((~honest).sum()),
        "malicious_accepted": int((~honest & accepted).sum()),
        "honest_screened": int((honest & ~accepted).sum()),
        "honest_clustering_accuracy": clustering,
        "honest_aggregate_error": float(np.mean(errors)) if errors else float("nan"),
    }
