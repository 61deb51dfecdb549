"""A run's set-up, before its round loop: the machine's preflight checks (before Ray starts),
the experiment's data (built once, then seen through the algorithm), each round's client
sample, and the backend. Pure of the round loop, so a sweep's driver (engine/ray/shared_data.py)
and the benchmarks build data exactly as a run does."""

from __future__ import annotations

import gc
import sys

import numpy as np

from fltac_ray.algorithms import FederatedAlgorithm
from fltac_ray.config import ExperimentConfig, clients_per_round
from fltac_ray.data.federated import FederatedData, build_federated_data
from fltac_ray.engine.memory import release_free_memory
from fltac_ray.errors import ConfigError, ConfigIssue

__all__ = ["build_data", "clients_per_round", "make_backend", "preflight", "prepare_data",
           "sample_clients"]


def sample_clients(seed: int, round_index: int, active: list[int], fraction: float) -> list[int]:
    """Seeded choice of ceil(fraction * |active|) clients for one round (all when fraction = 1)."""
    count = clients_per_round(len(active), fraction)
    if count >= len(active):
        return list(active)
    rng = np.random.default_rng([seed, 4, round_index])
    return sorted(int(c) for c in rng.choice(active, size=count, replace=False))


def plan_privacy(config: ExperimentConfig, algorithm: FederatedAlgorithm, data: FederatedData,
                 active: list[int]):
    """privacy: the run's ledger (privacy/ledger.py) from its seeded sampling schedule, or None;
    a calibrated noise multiplier is written into the run's own config, which the workers get."""
    if config.privacy.mode == "none":
        return None
    from fltac_ray.privacy.ledger import PrivacyLedger

    schedule = [sample_clients(config.seed, r, active, config.federation.client_fraction)
                for r in range(1, config.rounds + 1)]
    tasks = {c.client_id: list(c.tasks) for c in data.clients}
    per_client = max((len(algorithm.client_adapters(tasks[c])) for c in active), default=1)
    exposures, examples = example_exposures(config, algorithm, data, active)
    ledger = PrivacyLedger.plan(config.privacy, schedule, per_client, config.data.num_clients, len(active),
                                exposures, examples)
    config.privacy.noise_multiplier = ledger.noise_multiplier
    return ledger


def example_exposures(config: ExperimentConfig, algorithm: FederatedAlgorithm, data: FederatedData,
                      active: list[int]) -> tuple[dict[int, list[tuple[float, int]]], int]:
    """Example-level DP-SGD's exposure of each client's examples (privacy/ledger.py): client ->
    (Poisson rate B / n, DP-SGD steps per round on the task) for each of its tasks, n being its
    training examples of the task; and the training examples of all active clients."""
    exposures: dict[int, list[tuple[float, int]]] = {}
    examples = 0
    batch = config.train.batch_size
    by_id = {c.client_id: c for c in data.clients}
    for client in active:
        tasks = by_id[client].tasks
        steps: dict[str, int] = {}
        for group in algorithm.client_adapters(list(tasks)):
            for task, count in zip(group, algorithm.task_steps(list(group), config.train.local_steps), strict=True):
                steps[task] = steps.get(task, 0) + count
        pairs = []
        for task, (train_rows, _) in tasks.items():
            examples += len(train_rows)
            if len(train_rows) and steps.get(task):
                pairs.append((min(1.0, batch / len(train_rows)), steps[task]))
        exposures[client] = pairs
    return exposures, examples


def build_data(config: ExperimentConfig) -> FederatedData:
    """The experiment's tasks loaded, split, partitioned and encoded (before any algorithm)."""
    from fltac_ray.data.encoding import make_featurizer
    from fltac_ray.data.sizing import check_data_fits

    check_data_fits(config)  # an estimate against this machine's memory, before anything is built
    data = build_federated_data(config, make_featurizer(config.model.name, config.data.max_length))
    # The raw text, the tokenizer's buffers and the parsed sources are garbage now; glibc keeps
    # their pages unless asked (offline default, 20k examples per task: 533 -> 428 MiB resident).
    gc.collect()
    release_free_memory()
    return data


def prepare_data(config: ExperimentConfig, algorithm: FederatedAlgorithm,
                 built: FederatedData | None = None) -> tuple[FederatedData, list[int]]:
    """The run's federated data as the algorithm sees it (centralized: one client holding
    everything) and the clients that hold any of it; from `built` when given (a sweep's data,
    read from the object store)."""
    data = build_data(config) if built is None else built
    algorithm.check_data(data)  # e.g. FL-TAC: K at most the adapters this partition holds
    data = algorithm.federate(data)
    return data, [c.client_id for c in data.clients if c.tasks]


def _inside_placement_group() -> bool:
    ray = sys.modules.get("ray")  # not imported: certainly not inside one (and preflight stays Ray-free)
    if ray is None or not ray.is_initialized():
        return False
    from ray.util import get_current_placement_group

    return get_current_placement_group() is not None


def preflight(config: ExperimentConfig) -> None:
    """Checks that depend on this machine, run before Ray starts."""
    import torch

    from fltac_ray.models.builders import check_target_modules

    engine = config.engine
    # a Ray this run starts on this machine; not when it joins a cluster (engine.ray_address) or
    # runs inside a placement group (a Ray Tune trial's, whose bundles hold its GPUs): the
    # cluster's nodes hold the resources then, and the checks below are about this machine
    local = engine.ray_address is None and not _inside_placement_group()
    has_cuda = torch.cuda.is_available()
    if local and (engine.gpus_per_worker or 0) > 0 and not has_cuda and not engine.num_gpus:
        raise ConfigError([ConfigIssue(
            "engine.gpus_per_worker", engine.gpus_per_worker,
            "no GPU is visible here (torch.cuda.is_available() is False); use 0, or declare GPUs "
            "to Ray with engine.num_gpus (scheduling only, training stays on the CPU)")])
    if local and engine.device == "cuda" and not has_cuda:
        raise ConfigError([ConfigIssue("engine.device", "cuda", "no CUDA device here; use auto or cpu")])
    if local and config.model.quantization != "none" and not has_cuda:
        raise ConfigError([ConfigIssue(
            "model.quantization", config.model.quantization,
            "bitsandbytes quantisation needs a CUDA GPU, and none is visible here; use none (model.dtype: "
            "bfloat16 halves the base on the CPU)")])
    backbone = check_target_modules(config.model.name, config.data.modality, config.model.lora.target_modules,
                                    config.data.feature_dim)
    if config.tracking.backends:
        from fltac_ray.tracking import check_trackers

        check_trackers(config)
    if config.model.gradient_checkpointing:
        from fltac_ray.models.adapter_model import gradient_checkpointing_problem

        if (problem := gradient_checkpointing_problem(backbone)) is not None:
            raise ConfigError([ConfigIssue("model.gradient_checkpointing", True, f"{config.model.name}: {problem}")])
    if local and engine.backend == "ray":  # every node is this machine: its cache folder is checked here
        from fltac_ray.models.base_cache import cache_dir_problem

        if (problem := cache_dir_problem(engine.base_cache_dir)) is not None:
            raise ConfigError([ConfigIssue("engine.base_cache_dir", engine.base_cache_dir, problem)])


def make_backend(config, algorithm_class, data, active, say, shared=None):
    """The configured backend over the run's data; `shared`: a sweep's data in the object store
    (engine/ray/shared_data.SharedData), read by the workers instead of a new copy."""
    if config.engine.backend == "local":
        from fltac_ray.engine.local_backend import LocalBackend

        return LocalBackend(config, algorithm_class, data, active, say)
    from fltac_ray.engine.ray.backend import RayBackend

    backend = RayBackend(config, algorithm_class, data, active, say)
    if shared is not None:  # the workers read the sweep's copy: nothing is put again
        backend.data_refs = (shared.tasks, shared.clients)
    return backend
