"""FLoRA: federated fine-tuning with heterogeneous LoRA ranks by stacking (Wang, Shen, Chen, Li,
Liu, Stoica, Luo; NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", arXiv 2409.05976).

Averaging A and B separately is not averaging the updates they stand for (server/lora_products.py
measures by how much). FLoRA sends back the stacks instead, per LoRA layer

    A_stack = [p_1 A_1; ...; p_n A_n]  (sum_k r_k, d_in)     B_stack = [B_1, ..., B_n]  (d_out, sum_k r_k)

whose product is exactly sum_k p_k B_k A_k, whatever each client's rank r_k. Every client folds
that product (times the LoRA scale) into its frozen base and starts the next round from a fresh
LoRA at its own rank. In the simulation the clients of a round share one base, so the folded
update is kept once, as the running sum over rounds (d_out, d_in) per layer
(`base_update`), and each worker adds it to its base's weights when it changes
(models/adapter_model.AdapterModel.fold_into_base): never a copy per client. The fresh LoRA has
B zero and an A drawn afresh every round, as peft initialises it (kaiming-uniform,
U(-1/sqrt(d_in), 1/sqrt(d_in))), seeded per (seed, round) and the same for every client, then
truncated to each client's rank by the engine. A fresh A matters: B starts at zero, so A hardly
moves in a round's few steps and the round's update lies in A's row space; with one A for every
round (v^0's) all rounds would stack into the same rank-r subspace. Entries outside LoRA pairs
(the classifier head) are averaged with the FedAvg weights and kept in the adapter.

Traffic counts what FLoRA sends: each client uploads its own rank's A and B (and the head); each
receives the round's whole stacks, sum_k r_k (d_in + d_out) numbers per layer plus the head, so
its download grows with the round's uploads (the paper's stated cost). Client side: FedIT's (one
adapter per client over its tasks). The global model is the base plus the folded update, which no
LoRA adapter of rank r holds: FLoRA exports no adapters (the run's checkpoint keeps the update).
"""

from __future__ import annotations

import numpy as np

from fltac_ray.algorithms.base import Aggregate, ClientJob, Upload, Uploads
from fltac_ray.algorithms.hetlora import LayerRuleAlgorithm
from fltac_ray.algorithms.robust import weighted_cluster_means
from fltac_ray.models.ranks import client_ranks
from fltac_ray.server.lora_products import named_lora_pairs

UPDATE_PREFIX = "base_update/"  # state() keys of the folded update, one per layer
FRESH_A_STREAM = 41  # np.random.default_rng([seed, FRESH_A_STREAM, round]): each round's fresh A


def stacked_update(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(d_out, d_in) float64 product of one layer's stacks, B_stack A_stack = sum_k p_k B_k A_k:
    `a` (n, r, d_in), `b` (n, d_out, r), `weights` (n,) summing to 1. Zero rows beyond a client's
    rank add nothing, so padded adapters stack as their own ranks would."""
    n, r, d_in = a.shape
    stacked_a = (a.astype(np.float64) * weights[:, None, None]).reshape(n * r, d_in)  # [p_k A_k]
    stacked_b = np.concatenate(list(b.astype(np.float64)), axis=1)  # (d_out, n r) [B_k]
    return stacked_b @ stacked_a


class FLoRA(LayerRuleAlgorithm):
    name = "flora"
    summary = "FLoRA: heterogeneous ranks; stacked A and B, their exact product folded into every base"
    counts_rank_traffic = True  # every client receives the whole stacks, whatever its rank

    def __init__(self, config) -> None:
        super().__init__(config)
        self.update: dict[str, np.ndarray] = {}  # layer -> (d_out, d_in) float32, the folded sum
        self._ranks: np.ndarray | None = None
        self._received: int | None = None  # what one client received in the newest round

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.model.quantization != "none":
            raise ValueError(f"model.quantization = {config.model.quantization!r}: FLoRA folds each round's "
                             "update into the base weights, which a quantised base cannot take; use none")

    def setup(self, spec) -> None:
        super().setup(spec)
        lora = [name for name, _ in spec.layout if ".lora_A." in name or ".lora_B." in name]
        folded = {pair[0] for pair in named_lora_pairs(spec.layout)}
        unfoldable = sorted({name.split(".lora_")[0] for name in lora} - folded)
        if unfoldable:
            raise ValueError(f"algorithm = 'flora': it folds updates into linear layers only; "
                             f"{unfoldable[0]} is not one (use model.lora.target_modules of linear layers)")

    # --- client side ------------------------------------------------------------------------
    def _client_rank(self, client: int) -> int:
        if self._ranks is None:
            self._ranks = client_ranks(self.config)
        return int(self._ranks[client])

    def upload(self, job: ClientJob, trained: np.ndarray, private: np.ndarray, meta) -> Upload | None:
        upload = super().upload(job, trained, private, meta)
        upload.meta["rank"] = self._client_rank(job.key[0])  # the rows it adds to the stacks
        return upload

    # --- server side ------------------------------------------------------------------------
    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        vectors = uploads.vectors
        weights = self.weights(uploads.num_samples)
        labels = np.zeros(len(vectors), dtype=np.int64)
        head = weighted_cluster_means(vectors, labels, weights)  # every entry; LoRA's replaced below
        answer = head.adapters[0].astype(np.float32)
        p = weights / weights.sum()
        fresh = np.random.default_rng([self.config.seed, FRESH_A_STREAM, round_index])
        ranks = np.asarray(uploads.meta.get("rank", [self.config.model.lora.rank] * len(vectors)), dtype=np.int64)
        for name, a_slice, a_shape, b_slice, b_shape in named_lora_pairs(self.spec.layout):
            a = vectors[:, a_slice].reshape(len(vectors), *a_shape)
            b = vectors[:, b_slice].reshape(len(vectors), *b_shape)
            step = stacked_update(a, b, p)
            previous = self.update.get(name)
            self.update[name] = (step if previous is None else previous + step).astype(np.float32)
            # the fresh LoRA every client restarts from: A as peft draws it (kaiming-uniform with
            # a = sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))), B zero
            bound = 1.0 / np.sqrt(a_shape[1])
            answer[a_slice] = fresh.uniform(-bound, bound, size=a_shape[0] * a_shape[1]).astype(np.float32)
            answer[b_slice] = 0.0
        self._received = self.received_entries(int(ranks.sum()))
        return Aggregate(head.labels, answer[None, :], head.weights)

    def base_update(self) -> dict[str, np.ndarray] | None:
        return self.update or None

    def global_adapters(self, outcome: Aggregate) -> np.ndarray | None:
        return None  # the model is the base plus `update`: no rank-r adapter holds it

    def received_entries(self, stacked_rank: int) -> int:
        """What one client receives in a round whose uploads' ranks sum to `stacked_rank`: per LoRA
        layer the stacks, stacked_rank x (d_in + d_out), and every entry outside LoRA pairs."""
        pairs = named_lora_pairs(self.spec.layout)
        lora = sum(a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1] for _, _, a_shape, _, b_shape in pairs)
        stacks = sum(stacked_rank * (a_shape[1] + b_shape[0]) for _, _, a_shape, _, b_shape in pairs)
        return int(self.spec.size - lora + stacks)

    def download_params(self, outcome: Aggregate, clients: int) -> int:
        """Each accepted upload's client receives the round's stacks. Before any round (`fltac-ray
        params`): a round of config.clients_per_round clients at the federation's mean rank."""
        received = self._received
        if received is None:
            expected = self.config.clients_per_round * client_ranks(self.config).mean()
            received = self.received_entries(int(round(expected)))
        return int(len(outcome.labels) * received)

    def state(self) -> dict[str, np.ndarray]:
        state = super().state()
        state.update({UPDATE_PREFIX + name: value for name, value in self.update.items()})
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        self.update = {key[len(UPDATE_PREFIX):]: np.asarray(value, dtype=np.float32)
                       for key, value in state.items() if key.startswith(UPDATE_PREFIX)}
