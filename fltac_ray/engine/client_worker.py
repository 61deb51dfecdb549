"""ClientWorker: one Ray actor hosting many simulated clients over one frozen base model.

The base model is loaded once per actor; a simulated client's state is only its adapters (flat
float32 vectors) and the indices of its examples, so hundreds of clients fit in a few actors.
This class holds no Ray code itself: the simulation wraps it with `ray.remote` and options.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np

from fltac_ray.config import ExperimentConfig
from fltac_ray.data.federated import ClientShard, TaskBundle
from fltac_ray.engine.memory import HeapTrimmer
from fltac_ray.engine.messages import (
    AdapterKey,
    AggregationOutcome,
    EvalRecord,
    TrainReport,
    UploadBatch,
)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


class ClientWorker:
    def __init__(
        self,
        worker_index: int,
        config: dict,
        shards: list[ClientShard],
        tasks: dict[str, TaskBundle],
        head_classes: int,
        threads: int,
        base_weights=None,
    ) -> None:
        """`base_weights`: the frozen base as shared numpy arrays (models/shared_weights.py, from
        the object store: attached without a copy); None loads the base here."""
        _quiet_libraries()
        import torch

        from fltac_ray.algorithms import create_algorithm
        from fltac_ray.models.adapter_model import AdapterModel
        from fltac_ray.models.builders import backbone_from_weights, load_backbone

        self.worker_index = worker_index
        self.config = ExperimentConfig.model_validate(config)
        torch.set_num_threads(max(1, threads))
        wants_cuda = self.config.engine.device in ("auto", "cuda")
        self.device = torch.device("cuda" if wants_cuda and torch.cuda.is_available() else "cpu")
        self.tasks = tasks  # read-only arrays shared through the object store
        self.shards = {shard.client_id: shard for shard in shards}
        self.algorithm = create_algorithm(self.config)  # client-side hooks and flags only
        # client -> list of task groups; slot i of a client trains on groups[i]
        self.groups = {cid: self.algorithm.client_adapters(list(s.tasks)) for cid, s in self.shards.items()}
        modality = self.config.data.modality
        name, feature_dim = self.config.model.name, self.config.data.feature_dim
        if base_weights is not None:
            encoder = backbone_from_weights(name, modality, base_weights, feature_dim)
        else:
            encoder = load_backbone(name, modality, seed=self.config.seed, feature_dim=feature_dim)
        floral = self.config.floral if self.algorithm.uses_mixture else None
        self.model = AdapterModel(encoder, self.config.model, head_classes, self.config.seed,
                                  floral=floral, num_adaptors=self.config.resolved_num_adaptors,
                                  modality=modality)
        self.model.to(self.device)
        self.batched = self.config.engine.batched_training and self._batchable()
        self.trim_heap = HeapTrimmer()  # freed activations back to the OS when they pile up
        self.generation = self._generation_settings() if modality == "causal_lm" else None
        # The server's global adapters as last received: (1, d) v^0 for most algorithms,
        # (K, d) for IFCA, whose clients start each round from the best-fitting one.
        self.globals: np.ndarray | None = None
        # Adapters of this worker's clients; a missing key means "still v^0".
        self.adapters: dict[AdapterKey, np.ndarray] = {}
        # State that never leaves the client (FLoRAL's router); missing: freshly initialised.
        self.private: dict[AdapterKey, np.ndarray] = {}
        # This round's training results, committed by download() and dropped by discard(), so
        # a round the driver rejects leaves every client as it was.
        self.pending: dict[AdapterKey, np.ndarray] = {}
        self.pending_private: dict[AdapterKey, np.ndarray] = {}

    def _batchable(self) -> bool:
        from fltac_ray.models.multi_adapter import UnsupportedBatching, check_batchable

        try:
            check_batchable(self.model)
        except UnsupportedBatching:
            return False  # e.g. FLoRAL: trains one adapter at a time (describe() says so)
        return True

    def _generation_settings(self):
        from fltac_ray.models.builders import eos_token_id, load_tokenizer
        from fltac_ray.training import GenerationSettings, load_judge

        train = self.config.train
        if not train.generate:
            return None
        tokenizer = load_tokenizer(self.config.model.name)
        return GenerationSettings(
            max_new_tokens=train.max_new_tokens, pad_id=int(tokenizer.pad_token_id),
            eos_id=eos_token_id(tokenizer),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            judge=load_judge(train.judge))

    # --- set-up -----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "worker": self.worker_index,
            "pid": os.getpid(),
            "device": str(self.device),
            "clients": sorted(self.shards),
            "adapter_size": self.model.adapter_size,
            "batched": self.batched,
            "layout": self.model.adapter_layout(),
        }

    def adaptor_index(self) -> np.ndarray:
        return self.model.adaptor_index()

    def initial_adapters(self, count: int) -> np.ndarray:
        """(count, d): v^0 (the seeded initial adapter) and, for IFCA, count - 1 more draws."""
        first = self.model.get_adapter()
        rows = [first]
        for index in range(1, count):
            self.model.reset_adapter(seed=int(np.random.default_rng([self.config.seed, 5, index]).integers(2**31)))
            rows.append(self.model.get_adapter())
        self.model.set_adapter(first)
        return np.stack(rows)

    def set_initial_adapters(self, adapters: np.ndarray) -> None:
        self.globals = np.array(adapters, dtype=np.float32)  # private copy: object-store views are read-only

    def _start(self, key: AdapterKey, group: list[str], shard: ClientShard) -> tuple[np.ndarray, int]:
        """Where an adapter's local training starts, and which global adapter that was (IFCA)."""
        if not self.algorithm.client_selects_global:
            return self.adapters.get(key, self.globals[0]), -1
        from fltac_ray.training import evaluate_adapter

        # IFCA: the global adapter with the lowest loss on (a fixed probe of) the client's data.
        losses = []
        for candidate in self.globals:
            total = 0.0
            for task in group:
                bundle = self.tasks[task]
                probe = shard.tasks[task][0][: self.config.train.eval_batch_size]
                total += evaluate_adapter(self.model, candidate, bundle.train, probe, bundle.num_classes,
                                          self.config.train.eval_batch_size, self.device).loss_sum / len(probe)
            losses.append(total)
        choice = int(np.argmin(losses))
        return self.globals[choice], choice

    # --- a round ----------------------------------------------------------------------------
    def _job_rng(self, round_index: int, key: AdapterKey, task_index: int) -> tuple[np.random.Generator, int]:
        # Seeded per (round, client, slot, task): the batches a client draws do not depend on
        # which worker hosts it or in which order it runs. The first draw seeds torch (dropout).
        rng = np.random.default_rng([self.config.seed, 3, round_index, key[0], key[1], task_index])
        return rng, int(rng.integers(2**31))

    def _train_one_by_one(self, round_index: int, starts: dict[AdapterKey, np.ndarray], out: np.ndarray
                          ) -> dict[AdapterKey, list[float]]:
        """Each adapter alone through its tasks (FLoRAL, or engine.batched_training off). Trained
        adapters go to the rows of `out` (in the order of `starts`); returns the losses."""
        import torch

        from fltac_ray.training import train_adapter

        train, results = self.config.train, {}
        for row, (key, vector) in enumerate(starts.items()):
            shard = self.shards[key[0]]
            self.model.set_private(self.private.get(key))
            losses = []
            for task_index, task in enumerate(self.groups[key[0]][key[1]]):
                rng, torch_seed = self._job_rng(round_index, key, task_index)
                torch.manual_seed(torch_seed)
                bundle = self.tasks[task]
                outcome = train_adapter(
                    self.model, vector, bundle.train, shard.tasks[task][0], bundle.num_classes,
                    shard.steps.get(task, train.local_steps), train.batch_size, train.lr,
                    train.weight_decay, rng, self.device,
                )
                vector = outcome.adapter
                losses.append(outcome.mean_loss)
            if self.algorithm.uses_mixture:
                self.pending_private[key] = self.model.get_private()
            out[row] = vector
            results[key] = losses
            if (row + 1) % self.config.engine.max_batched_adapters == 0:
                self.trim_heap()  # one unit: as many adapters as a batched pass holds
        return results

    def _train_batched(self, round_index: int, starts: dict[AdapterKey, np.ndarray], out: np.ndarray
                       ) -> dict[AdapterKey, list[float]]:
        """All hosted adapters together (batched_training.py): phase p trains every adapter's
        p-th task (one task each for FL-TAC; FedIT's multi-task adapters run several phases),
        in passes of at most engine.max_batched_adapters adapters with equal input shapes."""
        import torch

        from fltac_ray.batched_training import AdapterJob, train_batched

        train = self.config.train
        current = dict(starts)
        row_of = {key: row for row, key in enumerate(starts)}
        losses: dict[AdapterKey, list[float]] = {key: [] for key in starts}
        depth = max((len(self.groups[c][s]) for c, s in starts), default=0)
        for phase in range(depth):
            by_signature: dict[tuple, list[tuple[AdapterKey, AdapterJob, int]]] = {}
            for key in starts:
                group = self.groups[key[0]][key[1]]
                if phase >= len(group):
                    continue
                task, shard = group[phase], self.shards[key[0]]
                rng, torch_seed = self._job_rng(round_index, key, phase)
                bundle = self.tasks[task]
                job = AdapterJob(current[key], bundle.train, shard.tasks[task][0], bundle.num_classes,
                                 shard.steps.get(task, train.local_steps), rng)
                by_signature.setdefault(job.signature(), []).append((key, job, torch_seed))
            size = self.config.engine.max_batched_adapters
            for entries in by_signature.values():
                for lo in range(0, len(entries), size):
                    chunk = entries[lo:lo + size]
                    torch.manual_seed(chunk[0][2])
                    outcomes = train_batched(self.model, [job for _, job, _ in chunk], train.batch_size,
                                             train.lr, train.weight_decay, self.device)
                    for (key, _, _), outcome in zip(chunk, outcomes, strict=True):
                        out[row_of[key]] = outcome.adapter  # the pass's own matrix is freed after
                        current[key] = out[row_of[key]]
                        losses[key].append(outcome.mean_loss)
                    del outcomes
                    self.trim_heap()  # engine/memory.py: keeps a worker adapter-sized
        return losses

    def train(self, round_index: int, client_ids: list[int]) -> tuple[UploadBatch, TrainReport]:
        """Algorithm 2 for every given client: tau local steps per adapter, then upload."""
        if self.globals is None:
            raise RuntimeError("train() before set_initial_adapters(): v^0 was never broadcast")
        started = time.perf_counter()
        starts: dict[AdapterKey, np.ndarray] = {}
        choices_of: dict[AdapterKey, int] = {}
        for client_id in client_ids:
            for slot, group in enumerate(self.groups[client_id]):
                key = (client_id, slot)
                starts[key], choices_of[key] = self._start(key, group, self.shards[client_id])
        stepping = time.perf_counter()
        # One (n, d) matrix receives the trained adapters: it is the upload, and its rows are this
        # round's pending adapters, so a worker holds one copy of its round's adapters.
        matrix = np.empty((len(starts), self.model.adapter_size), np.float32)
        trained = (self._train_batched if self.batched else self._train_one_by_one)(round_index, starts, matrix)
        step_seconds = time.perf_counter() - stepping
        keys, samples, task_names, losses, choices, mixtures = [], [], [], [], [], []
        for row, (key, group_losses) in enumerate(trained.items()):
            shard, group = self.shards[key[0]], self.groups[key[0]][key[1]]
            self.pending[key] = matrix[row]
            if self.algorithm.uses_mixture:
                self.model.set_private(self.pending_private[key])
                mixtures.append(self.model.mixture_weights())
            keys.append(key)
            samples.append(sum(shard.num_train(task) for task in group))
            task_names.append("+".join(group))
            losses.append(float(np.mean(group_losses)))
            choices.append(choices_of[key])
        algorithm = self.algorithm
        if algorithm.communicates and keys:
            upload = UploadBatch(
                keys=keys,
                vectors=matrix,
                num_samples=np.asarray(samples, dtype=np.int64),
                task_labels=task_names if algorithm.needs_task_labels else None,
                choices=np.asarray(choices, dtype=np.int64) if algorithm.client_selects_global else None,
                mixture=np.stack(mixtures) if algorithm.uses_mixture else None,
            )
        else:  # nothing leaves the client
            upload = UploadBatch([], np.zeros((0, self.model.adapter_size), np.float32), np.zeros(0, np.int64))
        report = TrainReport(keys, task_names, losses, time.perf_counter() - started, step_seconds)
        return upload, report

    def download(self, outcome: AggregationOutcome | None, evaluate: bool) -> list[EvalRecord]:
        """Commit the round: each uploaded adapter becomes the server's answer (None: the
        algorithm does not communicate, the trained adapter is kept); an upload the server
        rejected leaves its adapter as it was before the round. Then optionally evaluate."""
        if outcome is None:
            self.adapters.update(self.pending)
        else:
            for key, row in outcome.assignment().items():
                if key[0] in self.shards:
                    self.adapters[key] = outcome.adapters[row]
            if self.algorithm.client_selects_global and len(outcome.adapters):
                self.globals = outcome.adapters
        self.private.update(self.pending_private)
        self.discard()
        records = self.evaluate() if evaluate else []
        self.trim_heap()
        return records

    def discard(self) -> None:
        """Forget this round's training (the driver rejected the round)."""
        self.pending.clear()
        self.pending_private.clear()

    # --- checkpoint state -------------------------------------------------------------------
    def export_state(self) -> dict[str, dict[str, np.ndarray]]:
        """Committed client state, as named arrays for a safetensors checkpoint."""
        return {
            "adapters": {f"{c}/{s}": v for (c, s), v in self.adapters.items()},
            "private": {f"{c}/{s}": v for (c, s), v in self.private.items()},
            "globals": {"globals": self.globals},
        }

    def import_state(self, groups: dict[str, dict[str, np.ndarray]]) -> None:
        """Restore this worker's clients from a checkpoint (other clients' entries are ignored)."""
        def mine(group: str) -> dict[AdapterKey, np.ndarray]:
            out = {}
            for name, value in groups.get(group, {}).items():
                client, slot = (int(part) for part in name.split("/"))
                if client in self.shards:
                    out[(client, slot)] = np.array(value, dtype=np.float32)
            return out

        self.adapters = mine("adapters")
        self.private = mine("private")
        self.globals = np.array(groups["globals"]["globals"], dtype=np.float32)
        self.discard()

    def evaluate(self) -> list[EvalRecord]:
        """Every hosted client's current adapter on that client's own test examples, per task."""
        from fltac_ray.training import evaluate_adapter

        records = []
        for client_id, shard in self.shards.items():
            for slot, group in enumerate(self.groups[client_id]):
                vector = self.adapters.get((client_id, slot), self.globals[0])
                self.model.set_private(self.private.get((client_id, slot)))
                for task in group:
                    bundle = self.tasks[task]
                    result = evaluate_adapter(
                        self.model, vector, bundle.test, shard.tasks[task][1], bundle.num_classes,
                        self.config.train.eval_batch_size, self.device, self.generation,
                    )
                    if result.count:
                        records.append(EvalRecord(client_id, task, result.correct, result.loss_sum,
                                                  result.count, result.predictions, result.rouge_sum,
                                                  result.judge_sum))
        return records
