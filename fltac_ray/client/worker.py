"""ClientWorker: a stateless executor of client jobs over one frozen base model.

The base model is loaded once per worker; a worker holds no client state between calls. Each
round it receives training passes (lists of (client, slot) jobs) with the round's committed
state (StateView, from the server side), runs the algorithm's client hooks (start, local
training, upload) and returns the uploads and the trained adapters. Any worker can run any job,
and a job's result depends only on the job, its starting state and the seed (round, client,
slot, task), so jobs are load-balanced per round and a lost worker's jobs are simply retried.
This class holds no Ray code: the Ray backend wraps it with `ray.remote`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Any

import numpy as np

from fltac_ray.algorithms import ClientJob, create_algorithm
from fltac_ray.algorithms.base import AdapterKey, AdapterSpec, Upload
from fltac_ray.config import ExperimentConfig, import_plugins
from fltac_ray.data.federated import ClientShard, EncodedSplit, TaskBundle
from fltac_ray.engine.memory import HeapTrimmer
from fltac_ray.engine.messages import (
    EvalJob,
    EvalRecord,
    PassReport,
    PassResult,
    StateView,
    TrainJob,
)
from fltac_ray.models.model_files import ModelFiles
from fltac_ray.models.ranks import RankMasks
from fltac_ray.privacy.mechanism import PRIVACY_STREAM, privatize_upload
from fltac_ray.server.attacks import Attack

TRIM_EVERY_ADAPTERS = 32  # one-by-one training gives freed memory back after this many adapters


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


def longest_rows(split: EncodedSplit, count: int) -> np.ndarray:
    """`count` rows of the split's longest examples, in index order (repeated when it holds
    fewer): the batch whose padded step costs the most memory."""
    lengths = split.inputs.get("lengths")
    order = np.argsort(-lengths, kind="stable") if lengths is not None else np.arange(len(split.labels))
    return np.sort(np.resize(order, count)) if len(order) else order


class ClientWorker:
    def __init__(
        self,
        worker_index: int,
        config: ExperimentConfig,
        algorithm_class: type,
        clients: list[ClientShard],
        tasks: dict[str, TaskBundle],
        head_classes: int,
        threads: int,
        node_cache: bool = False,
        model_files: ModelFiles | None = None,
    ) -> None:
        """`clients`: every client's shard (indices only, small); `tasks`: the encoded data
        (read-only arrays shared through the object store); `node_cache`: map the base from this
        node's cache (engine.base_cache_dir, models/base_cache.py: the first worker of a node
        loads it there, the others map it), else load it into this process; `model_files`: the
        model's config and tokenizer from the driver (hub ids and folders), so this worker never
        asks the hub (models/model_files.py)."""
        _quiet_libraries()
        import torch

        from fltac_ray.client.cuda_device import choose_device
        from fltac_ray.client.precision import LossScale, configure_cuda_math, resolve_dtype
        from fltac_ray.models.base_cache import writable_cache_dir
        from fltac_ray.models.builders import use_shipped_files

        import_plugins(config.plugins)  # the user's tasks and models, in this process too
        if model_files is not None:
            folder = model_files.install(writable_cache_dir(config.engine.base_cache_dir))
            use_shipped_files(model_files.name, folder, model_files.revision)
        self.worker_index = worker_index
        self.config = config
        torch.set_num_threads(max(1, threads))
        # engine.device auto: CUDA when this process sees a GPU; a Ray worker without a GPU of
        # its own sees none (engine/ray/gpu_visibility.py hides the others before this runs). A GPU
        # it holds but cannot use is an error, never a quiet fall back to the CPU.
        assigned, detected = self.gpu_grant()
        self.device = choose_device(config.engine.device, assigned, detected)
        configure_cuda_math(self.device, config.engine.tf32, config.engine.deterministic)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.example_privacy = self._example_privacy()
        # float16: one loss scale for the worker's life (GradScaler's rule), across passes
        self.loss_scale = LossScale.for_dtype(self.dtype)
        self.tasks = tasks
        self.shards = {shard.client_id: shard for shard in clients}
        self.algorithm = create_algorithm(config, cls=algorithm_class)  # its client hooks
        self.attack = Attack.from_config(config)  # federation.attack: who lies, and how
        # The node's cache shares one host copy of the base among CPU workers. A GPU worker's
        # host copy is only on its way to the device, and a quantised base is bitsandbytes'
        # own layout on the GPU: both load straight onto the device, no disk round trip.
        node_cache = node_cache and self.device.type != "cuda"
        with self._gpu_turn():
            self._build_model(head_classes, node_cache)
        self.generation = self._generation_settings() if config.data.modality == "causal_lm" else None
        self.folded_digest = b""  # StateView.base_digest of the base update folded in (b"": none)

    def _example_privacy(self):
        """privacy.mode example: DP-SGD's settings (privacy/dp_sgd.py); None otherwise. Its
        per-example gradients are not loss-scaled, so a float16 base (model.dtype auto on a GPU
        without native bfloat16) is refused here, before the base is loaded."""
        import torch

        from fltac_ray.privacy.dp_sgd import ExamplePrivacy

        settings = self.config.privacy
        if settings.mode != "example":
            return None
        if self.dtype == torch.float16:
            raise ValueError(f"model.dtype = {self.config.model.dtype!r} resolves to float16 on {self.device}, "
                             "whose loss scaling DP-SGD's per-example clipping does not support; set "
                             "model.dtype: float32 (or bfloat16 on a GPU that computes it natively)")
        return ExamplePrivacy(settings.clip_norm, settings.noise_multiplier, self.config.train.batch_size)

    def _noise_rng(self, round_index: int, key: AdapterKey, task_index: int):
        """DP-SGD's noise stream of one (round, client, slot, task), or None without DP-SGD."""
        if self.example_privacy is None:
            return None
        return np.random.default_rng([self.config.seed, PRIVACY_STREAM, round_index, key[0], key[1], task_index])

    def _gpu_turn(self) -> contextlib.AbstractContextManager:
        """On CUDA, this GPU's lock (client/gpu_fit.gpu_lock): one worker at a time checks its
        memory, loads its base, moves it to the device and measures its pass."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from fltac_ray.client.gpu_fit import gpu_lock

        return gpu_lock(self.device)

    def _build_model(self, head_classes: int, node_cache: bool) -> None:
        """The frozen base (loaded, or mapped from the node's cache) with the algorithm's adapter
        model on this worker's device, and what depends on it: the adapter layout, the batched
        path, the adapters a pass may hold."""
        from fltac_ray.client.precision import dtype_name
        from fltac_ray.models.adapter_model import AdapterModel
        from fltac_ray.models.base_cache import BaseDescription, node_base_weights
        from fltac_ray.models.builders import backbone_from_weights, load_backbone

        config = self.config
        modality = config.data.modality
        name, feature_dim = config.model.name, config.data.feature_dim
        quantized = config.model.quantization != "none"
        if self.device.type == "cuda":
            from fltac_ray.client.gpu_fit import check_worker_gpu

            check_worker_gpu(config, self.device, self.dtype)  # before a byte of the base reaches the GPU
        self.loaded_base = not node_cache
        if node_cache:
            description = BaseDescription(name, modality, config.seed, feature_dim, dtype_name(self.dtype))
            weights, self.loaded_base = node_base_weights(description, config.engine.base_cache_dir)
            encoder = backbone_from_weights(name, modality, weights, feature_dim)
        else:
            encoder = load_backbone(name, modality, seed=config.seed, feature_dim=feature_dim, dtype=self.dtype,
                                    quantization=config.model.quantization, device=self.device)
        tensors = {t.data_ptr(): t.numel() * t.element_size() for t in encoder.state_dict().values()}
        self.base_bytes = sum(tensors.values())  # tied tensors once
        self.model = AdapterModel(encoder, config.model, head_classes, config.seed, modality=modality,
                                  **self.algorithm.model_options())
        if not quantized:  # bitsandbytes placed the quantised base already
            self.model.to(self.device)
        else:
            self.model.place_beside_quantized_base(self.device)
        self.spec = AdapterSpec(tuple(self.model.adapter_layout()), self.model.adaptor_index(),
                                self.model.fixed_tensors())
        self.algorithm.setup(self.spec)
        self.local_rule = self.algorithm.local_training()  # how local steps run (FedProx, SCAFFOLD...)
        self.frozen = self._frozen_entries()
        # model.lora.rank_profile: each client's rank, its adapters zero beyond it (models/ranks.py)
        self.rank_masks = RankMasks.for_config(config, self.model.adapter_layout())
        self.batched = config.engine.batched_training and self._batchable()
        self.trim_heap = HeapTrimmer()  # freed activations back to the OS when they pile up
        self.adapters_fit = self._adapters_that_fit()

    def gpu_grant(self) -> tuple[list[str] | None, bool]:
        """(GPU ids Ray assigned this process, or None outside Ray; whether this node really has
        a GPU). In process: no Ray, and a loaded NVIDIA driver says a GPU is here. The Ray
        backend's worker answers from Ray (engine/ray/actors.RayClientWorker)."""
        from fltac_ray.client.cuda_device import nvidia_driver

        return None, nvidia_driver() is not None

    def _frozen_entries(self) -> np.ndarray | None:
        trainable = self.algorithm.trainable_entries()
        return None if trainable is None else ~np.asarray(trainable, dtype=bool)

    def _batchable(self) -> bool:
        from fltac_ray.models.multi_adapter import UnsupportedBatching, check_batchable

        try:
            check_batchable(self.model)
        except UnsupportedBatching:
            return False  # e.g. FLoRAL: trains one adapter at a time (describe() says so)
        return True

    def _adapters_that_fit(self) -> int | None:
        """On CUDA, for engine.max_batched_adapters: auto: the adapters whose batched step fits
        this worker's part of its GPU, from one measured pass (client/gpu_fit.PassMemory) on
        train.batch_size of the longest examples of the widest task; refuses to start when not
        even one fits. None on the CPU (the driver then uses gpu_fit.AUTO_ADAPTERS_CPU)."""
        if self.device.type != "cuda" or not self.batched or self.config.engine.max_batched_adapters != "auto":
            return None
        import torch

        from fltac_ray.client.batched_training import measure_pass_memory
        from fltac_ray.client.gpu_fit import (
            CUDA_CONTEXT_BYTES,
            adapters_that_fit,
            pass_does_not_fit,
            worker_budget,
        )

        def width(bundle: TaskBundle) -> int:
            lengths = bundle.train.inputs.get("lengths")
            return int(lengths.max()) if lengths is not None else 0

        bundle = max(self.tasks.values(), key=width)
        rows = longest_rows(bundle.train, self.config.train.batch_size)
        memory = measure_pass_memory(self.model, bundle.train, rows, bundle.num_classes, self.device,
                                     self.example_privacy)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = worker_budget(total, free, self.config.engine.gpus_per_worker,
                               CUDA_CONTEXT_BYTES + torch.cuda.memory_allocated(self.device))
        fit = adapters_that_fit(budget, memory)
        if fit == 0:
            raise pass_does_not_fit(self.config, memory, budget, torch.cuda.get_device_name(self.device))
        self.pass_memory = memory  # describe() reports it
        return fit

    def _generation_settings(self):
        from fltac_ray.client.training import GenerationSettings, load_judge
        from fltac_ray.models.builders import eos_token_id, load_tokenizer

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
    def describe(self) -> dict[str, Any]:
        from fltac_ray.client.precision import dtype_name

        return {
            "worker": self.worker_index,
            "pid": os.getpid(),
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "spec": self.spec,
            "batched": self.batched,
            "loaded_base": self.loaded_base,  # False: mapped the node's copy another worker wrote
            "base_bytes": self.base_bytes,
            "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),  # what Ray left this process
            "adapters_fit": self.adapters_fit,  # engine.max_batched_adapters: auto on CUDA, else None
            "pass_memory": getattr(self, "pass_memory", None),  # what adapters_fit was planned from
        }

    def initial_adapters(self, count: int) -> np.ndarray:
        """(count, d): v^0 (the seeded initial adapter) and, for IFCA, count - 1 more draws."""
        first = self.model.get_adapter()
        rows = [first]
        for index in range(1, count):
            self.model.reset_adapter(seed=int(np.random.default_rng([self.config.seed, 5, index]).integers(2**31)))
            rows.append(self.model.get_adapter())
        self.model.set_adapter(first)
        return np.stack(rows)

    # --- training ---------------------------------------------------------------------------
    def _job_rng(self, round_index: int, key: AdapterKey, task_index: int) -> tuple[np.random.Generator, int]:
        # Seeded per (round, client, slot, task): the batches a client draws do not depend on
        # which worker runs it or in which order. The first draw seeds torch (dropout).
        rng = np.random.default_rng([self.config.seed, 3, round_index, key[0], key[1], task_index])
        return rng, int(rng.integers(2**31))

    def _training_examples(self, job: TrainJob, task: str) -> tuple[TaskBundle, np.ndarray]:
        """The task data and training indices a job trains `task` on: the client's own, or for a
        cross_task attacker (attacks.py) as many examples of the decoy task."""
        own = self.shards[job.key[0]].tasks[task][0]
        attack = self.attack
        if attack is None or attack.kind != "cross_task" or not attack.targets(job.key[0]):
            return self.tasks[task], own
        decoy = self.tasks[attack.decoy_task(task)]
        return decoy, attack.decoy_examples(job.key, task, len(decoy.train), len(own))

    def _probe_loss(self, job: TrainJob):
        """The client's loss with a given adapter on a fixed probe of its training data (the
        first eval_batch_size examples of each task), summed over its tasks: IFCA's choice."""
        from fltac_ray.client.training import evaluate_adapter

        shard = self.shards[job.key[0]]

        def loss(vector: np.ndarray) -> float:
            total = 0.0
            for task in job.tasks:
                bundle = self.tasks[task]
                probe = shard.tasks[task][0][: self.config.train.eval_batch_size]
                total += evaluate_adapter(self.model, vector, bundle.train, probe, bundle.num_classes,
                                          self.config.train.eval_batch_size, self.device).loss_sum / len(probe)
            return total

        return loss

    def _train_one_by_one(self, round_index: int, jobs: list[TrainJob], starts: np.ndarray,
                          private: dict[AdapterKey, np.ndarray | None], out: np.ndarray,
                          inputs: list[dict[str, np.ndarray]]) -> list[list[float]]:
        """Each adapter alone through its tasks (FLoRAL, or engine.batched_training off). Trained
        adapters go to the rows of `out`; private state is updated in place; returns the losses.
        `inputs`: each job's local_inputs for the algorithm's local-training rule."""
        import torch

        from fltac_ray.client.training import train_adapter

        train, losses_of = self.config.train, []
        for row, job in enumerate(jobs):
            vector = starts[row]
            self.model.set_private(private[job.key])
            losses = []
            for task_index, (task, steps) in enumerate(zip(job.tasks, job.steps, strict=True)):
                rng, torch_seed = self._job_rng(round_index, job.key, task_index)
                torch.manual_seed(torch_seed)
                bundle, examples = self._training_examples(job, task)
                outcome = train_adapter(
                    self.model, vector, bundle.train, examples, bundle.num_classes,
                    steps, train.batch_size, train.lr, train.weight_decay, rng, self.device, self.frozen,
                    self.loss_scale, self.local_rule, anchor=starts[row], inputs=inputs[row],
                    privacy=self.example_privacy, noise_rng=self._noise_rng(round_index, job.key, task_index),
                )
                vector = outcome.adapter
                losses.append(outcome.mean_loss)
            private[job.key] = self.model.get_private()
            out[row] = vector
            losses_of.append(losses)
            if (row + 1) % TRIM_EVERY_ADAPTERS == 0:
                self.trim_heap()  # one unit: as many adapters as a batched pass holds
        return losses_of

    def _train_batched(self, round_index: int, jobs: list[TrainJob], starts: np.ndarray,
                       out: np.ndarray, inputs: list[dict[str, np.ndarray]]) -> list[list[float]]:
        """All of the pass's adapters together (batched_training.py): phase p trains every
        adapter's p-th task (one task each for FL-TAC; FedIT's multi-task adapters run several
        phases), in sub-passes of adapters with equal input shapes. The pass's composition is
        fixed by the round loop, so the result does not depend on the worker that runs it."""
        import torch

        from fltac_ray.client.batched_training import AdapterJob, train_batched

        train = self.config.train
        current = [starts[row] for row in range(len(jobs))]
        losses: list[list[float]] = [[] for _ in jobs]
        depth = max((len(job.tasks) for job in jobs), default=0)
        for phase in range(depth):
            by_signature: dict[tuple, list[tuple[int, AdapterJob, int]]] = {}
            for row, job in enumerate(jobs):
                if phase >= len(job.tasks):
                    continue
                rng, torch_seed = self._job_rng(round_index, job.key, phase)
                bundle, examples = self._training_examples(job, job.tasks[phase])
                adapter_job = AdapterJob(current[row], bundle.train, examples, bundle.num_classes,
                                         job.steps[phase], rng, anchor=starts[row], inputs=inputs[row],
                                         noise_rng=self._noise_rng(round_index, job.key, phase))
                by_signature.setdefault(adapter_job.signature(), []).append((row, adapter_job, torch_seed))
            for entries in by_signature.values():
                torch.manual_seed(entries[0][2])
                outcomes = train_batched(self.model, [aj for _, aj, _ in entries], train.batch_size,
                                         train.lr, train.weight_decay, self.device, self.frozen,
                                         self.loss_scale, self.local_rule, self.example_privacy)
                for (row, _, _), outcome in zip(entries, outcomes, strict=True):
                    out[row] = outcome.adapter  # the pass's own matrix is freed after
                    current[row] = out[row]
                    losses[row].append(outcome.mean_loss)
                del outcomes
                self.trim_heap()  # engine/memory.py: keeps a worker adapter-sized
        return losses

    def train(self, round_index: int, jobs: list[TrainJob], state: StateView) -> tuple[PassResult, PassReport]:
        """Algorithm 2 for one pass of jobs: start, tau local steps per task, upload."""
        started = time.perf_counter()
        self._fold_base(state)
        algorithm = self.algorithm
        starts = np.empty((len(jobs), self.spec.size), np.float32)
        metas, private, inputs = [], {}, []
        client_jobs = [ClientJob(job.key, job.tasks, job.num_samples, job.steps, state.client_state(job.key))
                       for job in jobs]  # the clients' view
        for row, (job, client_job) in enumerate(zip(jobs, client_jobs, strict=True)):
            starts[row], meta = algorithm.start(client_job, state.adapter(job.key), state.broadcast,
                                                self._probe_loss(job))
            if self.rank_masks is not None:  # the client holds only its own rank of what it received
                starts[row] = self.rank_masks.truncate(job.key[0], starts[row])
            metas.append(meta)
            inputs.append(algorithm.local_inputs(client_job, meta))
            private[job.key] = algorithm.private_start(client_job, state.private.get(job.key))
        stepping, skipped_before = time.perf_counter(), self.loss_scale.skipped
        # One (n, d) matrix receives the trained adapters; uploads are views or parts of its rows.
        trained = np.empty_like(starts)
        if self.batched:
            losses = self._train_batched(round_index, jobs, starts, trained, inputs)
            private = {key: self.model.get_private() for key in private}  # plain LoRA: empty
        else:
            losses = self._train_one_by_one(round_index, jobs, starts, private, trained, inputs)
        step_seconds = time.perf_counter() - stepping
        uploads, kept_state = [], {}
        for row, (job, client_job) in enumerate(zip(jobs, client_jobs, strict=True)):
            kept = algorithm.keep_state(client_job, trained[row], metas[row])
            if kept is not None:
                kept_state[job.key] = np.asarray(kept, dtype=np.float32)
            upload = algorithm.upload(client_job, trained[row], private[job.key], metas[row])
            if upload is not None and self.config.privacy.mode in ("client_local", "client_central"):
                self._privatize(upload, algorithm.upload(client_job, starts[row], private[job.key], metas[row]),
                                round_index, job.key, state.clip_norm)
            if upload is not None and self.rank_masks is not None:
                self._send_own_rank(upload, job.key[0])
            if upload is not None and self.attack is not None and self.attack.targets(job.key[0]):
                upload.vector = self.attack.tamper(upload.vector, round_index, job.key)
            if upload is not None:
                uploads.append(upload)
        keys = [job.key for job in jobs]
        result = PassResult(uploads, keys, trained, {k: v for k, v in private.items() if v.size}, kept_state)
        report = PassReport(keys, ["+".join(job.tasks) for job in jobs],
                            [float(np.mean(group)) for group in losses],
                            time.perf_counter() - started, step_seconds, self.worker_index,
                            self.loss_scale.skipped - skipped_before)
        return result, report

    def _fold_base(self, state: StateView) -> None:
        """The algorithm's base update (FLoRA: the folded stacks) into this worker's base, when
        it differs from the one folded last."""
        if state.base_digest != self.folded_digest:
            self.model.fold_into_base(state.base_update)
            self.folded_digest = state.base_digest

    def _send_own_rank(self, upload: Upload, client: int) -> None:
        """model.lora.rank_profile: the upload is what a client of its rank sends: the entries
        beyond its rank are zero (client-level noise never lands there) and not counted."""
        shared = self.algorithm.shared_entries()
        mask = self.rank_masks.mask(client)
        kept = mask if shared is None else mask[shared]
        upload.vector = np.where(kept, upload.vector, np.float32(0)).astype(np.float32)
        upload.padding = int((~kept).sum())

    def _privatize(self, upload: Upload, untrained: Upload, round_index: int, key: AdapterKey,
                   clip_norm: float | None = None) -> None:
        """Client-level DP (privacy/mechanism.py): the update against what the client would have
        sent untrained, clipped to privacy.clip_norm; client_local also adds the noise here
        (client_central: the server adds it to the means), seeded per (seed, round, client,
        slot), so the run stays reproducible. With privacy.sketch the upload also carries its
        noised sketch (privacy/sketch.py), the budget split between the two. `clip_norm`: the
        round's bound from the server (privacy.adaptive_clipping moves it; None: clip_norm); with
        adaptive clipping the upload says whether its update fitted under it (meta "unclipped")."""
        from fltac_ray.privacy.sketch import SKETCH_STREAM, noised_sketch, split_noise

        settings = self.config.privacy
        bound = settings.clip_norm if clip_norm is None else clip_norm
        noise = settings.noise_multiplier if settings.mode == "client_local" else 0.0
        if settings.sketch != "none":
            noise, sketch_noise = split_noise(noise, settings.sketch_share)
            rng = np.random.default_rng([self.config.seed, SKETCH_STREAM, round_index, key[0], key[1]])
            upload.extras["sketch"] = noised_sketch(settings.sketch, upload.vector, untrained.vector,
                                                    list(self.spec.layout), self.config.seed, settings.sketch_dim,
                                                    bound, sketch_noise, rng)
        rng = np.random.default_rng([self.config.seed, PRIVACY_STREAM, round_index, key[0], key[1]])
        upload.vector, norm = privatize_upload(upload.vector, untrained.vector, bound, noise, rng)
        if settings.adaptive_clipping:
            upload.meta["unclipped"] = norm <= bound

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, jobs: list[EvalJob], state: StateView, max_adapters: int,
                 max_examples: int) -> list[EvalRecord]:
        """Each job's committed adapter (v^0 if never trained) on its client's own test
        examples, per task. Classification tasks of a batching worker go through the batched
        (routed) path, many adapters per forward pass (batched_evaluation.py); instruction
        tasks, and workers that train one adapter at a time, evaluate adapter by adapter.
        `max_adapters`, `max_examples`: the run's resolved engine.max_batched_adapters and
        engine.max_pass_examples (the driver's, so every worker cuts alike)."""
        from fltac_ray.client.batched_evaluation import EvalItem, evaluate_batched
        from fltac_ray.client.training import EvalOutcome, evaluate_adapter

        train = self.config.train
        self._fold_base(state)
        outcomes: dict[tuple[int, str], EvalOutcome] = {}
        batchable: dict[tuple, list[tuple[tuple[int, str], EvalItem]]] = {}  # by input signature
        for position, job in enumerate(jobs):
            shard = self.shards[job.key[0]]
            vector = state.evaluated_adapter(job.key)
            for task in job.tasks:
                bundle, indices = self.tasks[task], shard.tasks[task][1]
                if self.batched and bundle.num_classes > 0:
                    if len(indices):
                        item = EvalItem(vector, bundle.test, indices, bundle.num_classes)
                        batchable.setdefault(item.signature(), []).append(((position, task), item))
                    continue
                self.model.set_private(self.algorithm.private_start(ClientJob(job.key, job.tasks, 0),
                                                                    state.private.get(job.key)))
                outcomes[position, task] = evaluate_adapter(
                    self.model, vector, bundle.test, indices, bundle.num_classes, train.eval_batch_size,
                    self.device, self.generation)
        for group in batchable.values():
            for lo in range(0, len(group), max_adapters):
                part = group[lo:lo + max_adapters]
                results = evaluate_batched(self.model, [item for _, item in part], max_examples, self.device)
                outcomes.update(zip([where for where, _ in part], results, strict=True))
        records = []
        for position, job in enumerate(jobs):  # the one-by-one order: job, then its tasks
            for task in job.tasks:
                result = outcomes.get((position, task))
                if result is not None and result.count:
                    records.append(EvalRecord(job.key[0], task, result.correct, result.loss_sum,
                                              result.count, result.predictions, result.rouge_sum,
                                              result.judge_sum))
        self.trim_heap()
        return records
