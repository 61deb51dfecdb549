"""fltac-ray benchmark suite: every figure is measured here, side by side in one run.

    python benchmarks/run.py                      # all four sections (~15 min on 2 cores)
    python benchmarks/run.py --only loop,kmeans   # some sections
    python benchmarks/run.py --quick              # tiny model and sizes: checks the suite works

Sections (run in this order)
  scale    10, 100, 500 and 1000 clients per round on the engine: seconds per round, and the peak
           memory of the driver (this process) plus every actor (sum of PSS, so the shared base
           model and object-store pages count once), and the memory each extra client adds.
  loop     the Ray engine against a plain sequential single-process loop
           (engine/local_backend.py: same data, model, seeds and local steps, one adapter at a
           time, torch's default threads), 100 clients: seconds per round and their ratio, and
           the share of a round that is orchestration (everything but the local training steps).
  batched  batched multi-adapter training against one-by-one training of the same jobs, in one
           process on one thread: speedup.
  kmeans   FL-TAC's server clustering of 1000 MiniLM rank-1 adapters (scikit-learn; cuML when a
           GPU and cuML are present).

Results go to <out>/results.json as well as the terminal. Runs start Ray on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fltac_ray.config import ExperimentConfig, build_config  # noqa: E402
from fltac_ray.engine.callbacks import Callback  # noqa: E402
from fltac_ray.engine.simulation import Simulation  # noqa: E402
from fltac_ray.progress import Progress  # noqa: E402

WORDNET = Path("/usr/share/wordnet/data.noun")
NO_EVAL = 10_000  # eval_every beyond the last round: only the final round evaluates


def say(text: str = "") -> None:
    print(text, flush=True)


def base_experiment(quick: bool) -> dict:
    """The offline default's tasks and model (synthetic tasks and the tiny model with --quick or
    without WordNet)."""
    if quick or not WORDNET.is_file():
        tasks = ["synthetic_sentiment", "synthetic_topic", "synthetic_tense"]
    else:
        tasks = ["wordnet_noun_supersense", "wordnet_verb_supersense", "wordnet_pos"]
    return {"data": {"tasks": tasks}, "model": {"name": "tiny-random-bert" if quick else "minilm"}}


def experiment(quick: bool, name: str, clients: int, rounds: int, local_steps: int, batch_size: int,
               train_per_task: int, **engine) -> ExperimentConfig:
    raw = base_experiment(quick)
    raw.update(name=name, rounds=rounds, output_dir=tempfile.mkdtemp(prefix="fltac-bench-"))
    # The paper's 0.01 share threshold is for 10 clients; scaled (0.1 / clients) so that large
    # federations keep data on most clients.
    raw["data"].update(num_clients=clients, min_share=0.1 / clients, train_per_task=train_per_task,
                       test_per_task=300)
    raw["train"] = {"local_steps": local_steps, "batch_size": batch_size, "eval_every": NO_EVAL}
    raw["engine"] = {"checkpoint_every": 0, "metrics": False, **engine}
    return build_config(raw)


class PeakMemory(Callback):
    """Simulation callback: samples the PSS of the driver, the coordinator and every client
    worker every `interval` seconds on a thread, and at the end of every round (so short runs
    are sampled too); `peak_mb` is the largest sum seen."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.names = {os.getpid(): "driver"}  # pid -> process name
        self.process_peaks: dict[str, float] = {}  # each process's own peak
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def on_start(self, run) -> None:
        self.names.update({pid: name for name, pid in run.process_ids().items()})

    def on_round_end(self, run, ctx) -> None:
        self._measure()

    def _measure(self) -> None:
        total = 0.0
        for pid, name in list(self.names.items()):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                pss = psutil.Process(pid).memory_full_info().pss / 2**20
                total += pss
                self.process_peaks[name] = max(self.process_peaks.get(name, 0.0), pss)
        self.peak_mb = max(self.peak_mb, total)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._measure()
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def run_engine(config: ExperimentConfig, probe: PeakMemory | None = None):
    callbacks = [probe] if probe is not None else []
    return Simulation(config, progress=Progress(quiet=True), callbacks=callbacks).run()


# --- sections ---------------------------------------------------------------------------------
def bench_loop(quick: bool) -> dict:
    rounds = 3 if quick else 4
    config = experiment(quick, "bench_loop", clients=20 if quick else 100, rounds=rounds,
                        local_steps=2 if quick else 3, batch_size=8, train_per_task=2000)
    measured = list(range(2, rounds))  # round 1 warms up; the last round evaluates
    say(f"[loop] {config.data.num_clients} clients, {config.train.local_steps} local steps per task, "
        f"model {config.model.name}; rounds {measured} measured")
    import torch

    # The baseline: the same loop in one process (engine.backend: local), one adapter at a time
    # (as the reference implementations train) on all of torch's threads.
    threads = torch.get_num_threads()
    baseline = config.model_copy(deep=True)
    baseline.engine.backend, baseline.engine.batched_training = "local", False
    baseline.engine.cpus_per_worker = float(threads)
    loop_rows = run_engine(baseline).rounds
    loop_rows = loop_rows[loop_rows["round"].isin(measured)]
    # client work and aggregation (no round evaluates here: train.eval_every is past the run)
    loop_seconds = float((loop_rows["train_seconds"] + loop_rows["aggregate_seconds"]).mean())
    loop_steps = float(loop_rows["step_seconds"].mean())
    say(f"  sequential loop ({threads} torch threads): {loop_seconds:.2f} s/round, of which local "
        f"steps {loop_steps:.2f} s; {int(loop_rows['adapters'].iloc[0])} adapters per round")
    result = run_engine(config)
    rows = result.rounds[result.rounds["round"].isin(measured)]
    engine_seconds = float((rows["train_seconds"] + rows["aggregate_seconds"]).mean())
    engine_steps = float(rows["step_seconds"].mean())
    orchestration = 1 - engine_steps / engine_seconds
    say(f"  Ray engine: {engine_seconds:.2f} s/round; busiest worker's local steps "
        f"{engine_steps:.2f} s, aggregation {rows['aggregate_seconds'].mean():.2f} s, worker "
        f"utilisation {rows['worker_utilisation'].mean():.2f}")
    ratio = engine_seconds / loop_seconds
    say(f"  RATIO engine/loop seconds per round = {ratio:.2f}  (target <= 0.6)")
    say(f"  RATIO orchestration share of an engine round = {orchestration:.1%}  (target < 10%)")
    return {"clients": config.data.num_clients, "loop_threads": threads, "loop_seconds": loop_seconds,
            "loop_step_seconds": loop_steps, "engine_seconds": engine_seconds,
            "engine_step_seconds": engine_steps, "engine_over_loop": ratio,
            "orchestration_share": orchestration}


def bench_batched(quick: bool) -> dict:
    import torch

    from fltac_ray.batched_training import AdapterJob, train_batched
    from fltac_ray.data.encoding import make_featurizer
    from fltac_ray.data.federated import build_federated_data
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone
    from fltac_ray.training import train_adapter

    torch.set_num_threads(1)
    config = experiment(quick, "bench_batched", clients=10, rounds=1, local_steps=5, batch_size=8,
                        train_per_task=2000)
    data = build_federated_data(config, make_featurizer(config.model.name, config.data.max_length))
    model = AdapterModel(load_backbone(config.model.name, "text"), config.model, data.head_classes, 0)
    start = model.get_adapter()
    names = list(data.tasks)
    cpu = torch.device("cpu")
    out = {}
    say(f"[batched] model {config.model.name}, {config.train.local_steps} steps of batch "
        f"{config.train.batch_size} per adapter, 1 thread")

    def jobs(count: int) -> list[AdapterJob]:
        made = []
        for j in range(count):  # adapters over the three tasks, 40 examples each
            bundle = data.tasks[names[j % len(names)]]
            made.append(AdapterJob(start, bundle.train, np.arange(j * 40, j * 40 + 40), bundle.num_classes,
                                   config.train.local_steps, np.random.default_rng(j)))
        return made

    for count in (4, 8) if quick else (8, 32):
        began = time.perf_counter()
        for job in jobs(count):
            train_adapter(model, job.start, job.split, job.indices, job.num_classes, job.steps,
                          config.train.batch_size, config.train.lr, 0.0, job.rng, cpu)
        single = time.perf_counter() - began
        began = time.perf_counter()
        train_batched(model, jobs(count), config.train.batch_size, config.train.lr, 0.0, cpu)
        batched = time.perf_counter() - began
        say(f"  {count} adapters: one by one {single:.2f} s, batched {batched:.2f} s; "
            f"RATIO batched speedup = {single / batched:.2f}x")
        out[str(count)] = {"one_by_one_seconds": single, "batched_seconds": batched, "speedup": single / batched}
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def bench_scale(quick: bool, sizes: tuple[int, ...] | None = None) -> dict:
    sizes = sizes or ((10, 50, 100) if quick else (10, 100, 500, 1000))
    say(f"[scale] clients per round {list(sizes)}: 1 local step of batch 4 per adapter, 2 rounds "
        "(the second evaluates); memory = peak sum of PSS over driver + coordinator + workers")
    rows = {}
    for clients in sizes:
        config = experiment(quick, f"bench_scale_{clients}", clients=clients, rounds=2, local_steps=1,
                            batch_size=4, train_per_task=2000 if quick else 10_000)
        probe = PeakMemory()
        began = time.perf_counter()
        result = run_engine(config, probe)
        peak = probe.stop()
        first = result.rounds.iloc[0]
        rows[clients] = {"adapters": int(first["adapters"]), "round_seconds": float(first["seconds"]),
                         "step_seconds": float(first["step_seconds"]),
                         "aggregate_seconds": float(first["aggregate_seconds"]),
                         "peak_memory_mb": peak, "process_peaks_mb": dict(probe.process_peaks),
                         "wall_seconds": time.perf_counter() - began}
        say(f"  {clients:>5} clients ({rows[clients]['adapters']} adapters): {first['seconds']:.1f} s/round "
            f"(steps {first['step_seconds']:.1f} s, K-means+aggregation {first['aggregate_seconds']:.1f} s), "
            f"peak memory {peak:,.0f} MiB")
        say("        per process (own peak, MiB): " + ", ".join(
            f"{name} {mb:,.0f}" for name, mb in sorted(probe.process_peaks.items())))
    low, high = (sizes[1] if len(sizes) > 2 else sizes[0]), sizes[-1]
    per_client = (rows[high]["peak_memory_mb"] - rows[low]["peak_memory_mb"]) / (high - low)
    say(f"  RATIO memory added per extra client ({low} -> {high}) = {per_client * 1024:.0f} KiB  (target < 1 MB)")
    say(f"  {high} clients per round: peak {rows[high]['peak_memory_mb'] / 1024:.2f} GiB  (must fit in 24 GiB)")
    return {"per_size": rows, "memory_per_client_mb": per_client}


def bench_kmeans(quick: bool) -> dict:
    from fltac_ray.clustering import kmeans_labels, resolve_backend

    rng = np.random.default_rng(0)
    size = 19_226  # MiniLM rank-1 adapter (query/value LoRA + 26-class head)
    count = 1000
    centres = rng.normal(0, 1, (3, size)).astype(np.float32)
    vectors = (centres[rng.integers(0, 3, count)] + rng.normal(0, 2, (count, size))).astype(np.float32)
    backends = ["sklearn"] + (["cuml"] if resolve_backend("auto") == "cuml" else [])
    out = {}
    say(f"[kmeans] {count} adapters of {size:,} parameters, K = 3")
    for backend in backends:
        for n_init in (1, 30):
            began = time.perf_counter()
            kmeans_labels(vectors, 3, 0, n_init, backend)
            seconds = time.perf_counter() - began
            out[f"{backend}_n_init_{n_init}"] = seconds
            say(f"  {backend}, n_init {n_init}{' (the default)' if n_init == 30 else ''}: {seconds:.2f} s")
    if len(backends) == 1:
        say("  cuML: not measured (no GPU or cuML here)")
    return out


# scale first: its memory figures count this process as the driver, before other sections load
# models and data into it
SECTIONS = {"scale": bench_scale, "loop": bench_loop, "batched": bench_batched, "kmeans": bench_kmeans}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (checks the suite)")
    parser.add_argument("--out", default="runs/benchmarks", help="folder for results.json")
    parser.add_argument("--sizes", default=None, help="scale: comma-separated client counts (default 10,100,500,1000)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")  # 127.0.0.1 only
    machine = {"cpus": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30}
    say(f"fltac-ray benchmarks on {machine['cpus']} CPUs, {machine['memory_gib']:.0f} GiB"
        f"{' (quick)' if args.quick else ''}")
    results = {"machine": machine, "quick": args.quick}
    try:
        for name in chosen:
            began = time.perf_counter()
            if name == "scale" and args.sizes:
                results[name] = bench_scale(args.quick, tuple(int(n) for n in args.sizes.split(",")))
            else:
                results[name] = SECTIONS[name](args.quick)
            say(f"  ({name}: {time.perf_counter() - began:.0f} s)")
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    say(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
