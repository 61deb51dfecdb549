"""fltac-ray benchmark suite: every figure is measured here, side by side in one run.

    python benchmarks/run.py                      # every section (~70 min on 2 cores)
    python benchmarks/run.py --only loop,kmeans   # some sections
    python benchmarks/run.py --quick              # tiny model and sizes: checks the suite works

Sections (run in this order)
  scale    10, 100, 500 and 1000 clients per round on the engine: seconds per round, the peak
           memory of the driver (this process) plus every actor (sum of PSS, so the shared base
           model and object-store pages count once), the memory each extra client adds, and
           the checkpoint's bytes against one adapter copy per client.
  partial  500 clients with data, 10% sampled per round: worker utilisation (mean worker step
           time / slowest) measured here, and by the cost model for 16 and 64 workers, against
           the previous engine's static placement of clients on workers.
  memory   peak memory of the engine (driver + coordinator + workers: sums of PSS and of RSS)
           against the sequential loop on 100 clients, 10 local steps of batch 16, 20,000
           examples per task, each in a fresh process.
  loop     the Ray engine against the sequential single-process loop (engine.backend: local,
           one adapter at a time, torch's default threads; same data, model, seeds and steps),
           100 clients, each run in a fresh process: seconds per round and their ratio, MFU
           against the node's float32 matmul peak, the peak PSS sum, the final accuracy, and the
           share of a round that is orchestration (everything but the local training steps);
           the engine in its three layouts (a single-threaded worker per core, the default; one
           worker of every core; no actors, backend local with batched training) and with the
           base's dropout off (model.base_dropout).
  layout   the engine's three layouts at 1000 clients: seconds per round, MFU, peak PSS sum.
  batched  batched multi-adapter training against one-by-one training of the same jobs, in one
           process on one thread: speedup and MFU.
  mfu      the node's matmul peaks (float32, bfloat16; one thread and all threads) and a batched
           pass of 32 adapters in float32 and bfloat16, base dropout on and off: MFU and a torch
           profile of each (matmul, attention, dropout, casts, optimiser, Python overhead).
  precision  the frozen base in float32 against bfloat16 (model.dtype) on this CPU: step time of
           batched and one-by-one training (one thread), and the engine's round at 100 clients
           (10 local steps of batch 16, length 32) in both dtypes, and in bfloat16 with the base's
           dropout off, against the float32 sequential loop, with each run's final accuracy and MFU.
  kmeans   FL-TAC's server clustering of 1000 MiniLM rank-1 adapters (scikit-learn; cuML when a
           GPU and cuML are present).
  multinode  the engine on a Ray cluster of a head (driver and coordinator, no CPU) and 3 nodes of
           1 CPU (ray.cluster_utils.Cluster, all on this machine) against the single-node engine
           with the same 3 CPUs, each in a fresh process: 1000 clients, 10% sampled per round,
           seconds per round, bytes moved between nodes (Ray's object-manager counters) at start
           and per round, the driver's peak memory against the base model's size, and whether
           the two runs' metrics are equal.
  sweep    a Ray Tune sweep of 4 concurrent trials with each trial preparing its own data and
           with the data prepared once and shared: the object store's peak and the wall time.
  privacy  example-level DP-SGD's step against the non-private batched step and against DP-SGD one
           example at a time (same jobs, one thread); its epsilon against dp-accounting directly.
  attacks  3 of 33 clients malicious (federation.attack: none, sign_flip, scaling, random,
           cross_task; scale 10) against mean, median, trimmed mean and the norm and neighbours
           screens: the honest clients' aggregate error and clustering accuracy in round 1.

Results go to <out>/results.json as well as the terminal. Runs start Ray on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fltac_ray.client.gpu_fit import AUTO_ADAPTERS_CPU  # noqa: E402
from fltac_ray.config import ExperimentConfig, build_config  # noqa: E402
from fltac_ray.engine.callbacks import Callback  # noqa: E402
from fltac_ray.engine.messages import TrainJob  # noqa: E402
from fltac_ray.engine.scheduling import assign_lpt, plan_passes, utilisation  # noqa: E402
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
               train_per_task: int, client_fraction: float = 1.0, **engine) -> ExperimentConfig:
    raw = base_experiment(quick)
    raw.update(name=name, rounds=rounds, output_dir=tempfile.mkdtemp(prefix="fltac-bench-"))
    # data.min_share is left to its default, 0.1 / clients: large federations keep data on most clients
    raw["data"].update(num_clients=clients, train_per_task=train_per_task, test_per_task=300)
    raw["train"] = {"local_steps": local_steps, "batch_size": batch_size, "eval_every": NO_EVAL,
                    "eval_round_0": False}
    raw["engine"] = {"checkpoint_every": 0, "metrics": False, **engine}
    raw["federation"] = {"client_fraction": client_fraction}
    return build_config(raw)


class PeakMemory(Callback):
    """Simulation callback: samples the PSS of the driver, the coordinator and every client
    worker every `interval` seconds on a thread, and at the end of every round (so short runs
    are sampled too); `peak_mb` is the largest sum seen, `peak_rss_mb` the largest sum of RSS
    (shared pages counted in every process that maps them, as peers report it)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.names = {os.getpid(): "driver"}  # pid -> process name
        self.process_peaks: dict[str, float] = {}  # each process's own peak
        self.peak_mb = 0.0
        self.peak_rss_mb = 0.0
        self.start_mb = 0.0  # sum of PSS once every process is up, before any job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def on_start(self, run) -> None:
        self.names.update({pid: name for name, pid in run.process_ids().items()})
        self.start_mb = self._measure()

    def on_round_end(self, run, ctx) -> None:
        self._measure()

    def _measure(self) -> float:
        total = rss_total = 0.0
        for pid, name in list(self.names.items()):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                info = psutil.Process(pid).memory_full_info()
                pss = info.pss / 2**20
                total += pss
                rss_total += info.rss / 2**20
                self.process_peaks[name] = max(self.process_peaks.get(name, 0.0), pss)
        self.peak_mb = max(self.peak_mb, total)
        self.peak_rss_mb = max(self.peak_rss_mb, rss_total)
        return total

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


def node_peaks(dtypes: tuple[str, ...] = ("float32",), quick: bool = False) -> dict[str, dict[str, float]]:
    """The matmul peak (FLOP/s) of one thread and of all the node's threads per dtype, and the
    node's: the larger of all threads together and cores x one thread (one single-threaded worker
    per core reaches the second). MFU of a whole round is taken against the node's peak."""
    import torch

    from fltac_ray.client.flops import peak_matmul_flops
    from fltac_ray.client.precision import DTYPES

    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    size = 256 if quick else 1024  # an emulated bfloat16 product of 1024 takes seconds
    peaks = {}
    for name in dtypes:
        torch.set_num_threads(1)
        one = peak_matmul_flops(DTYPES[name], size=size)
        torch.set_num_threads(cores)
        every = peak_matmul_flops(DTYPES[name], size=size)
        peaks[name] = {"one_thread": one, "all_threads": every, "node": max(every, cores * one)}
    torch.set_num_threads(threads)
    return peaks


def say_peaks(peaks: dict[str, dict[str, float]]) -> None:
    import torch

    for name, peak in peaks.items():
        say(f"  {name} matmul peak: {peak['one_thread'] / 1e9:.1f} GFLOP/s on 1 thread, "
            f"{peak['all_threads'] / 1e9:.1f} on {os.cpu_count()} threads; the node "
            f"{peak['node'] / 1e9:.1f} ({torch.backends.cpu.get_cpu_capability()})")


def round_flops(config: ExperimentConfig):
    """client/flops.federation_flops of one round of `config` (every client with data taking
    part: client_fraction 1), from the data the run builds and the model's shapes."""
    from fltac_ray.algorithms import create_algorithm
    from fltac_ray.client.flops import federation_flops
    from fltac_ray.engine.run_setup import prepare_data
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone

    data, active = prepare_data(config, create_algorithm(config))
    model = AdapterModel(load_backbone(config.model.name, "text"), config.model, data.head_classes, 0)
    return federation_flops(model, data, active, config.train.local_steps, config.train.batch_size)


def run_child(config: ExperimentConfig, measured: list[int]) -> dict:
    """One run of `config` in a fresh process (so its summed PSS is its own: driver, coordinator
    and workers): the mean training + aggregation seconds of the `measured` rounds, the final
    round's accuracy (weighted by test examples), and the memory PeakMemory saw."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"config": config.model_dump(mode="json"), "measured": measured}, handle)
    command = [sys.executable, __file__, "--run-child", handle.name]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""},
                          timeout=7200)
    Path(handle.name).unlink()
    if done.returncode != 0:
        raise RuntimeError(f"run {config.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_run(path: str) -> int:
    spec = json.loads(Path(path).read_text())
    config = ExperimentConfig.model_validate(spec["config"])
    probe = PeakMemory()
    result = run_engine(config, probe)
    probe.stop()
    rows = result.rounds[result.rounds["round"].isin(spec["measured"])]
    final = result.metrics[result.metrics["round"] == result.metrics["round"].max()]
    print(json.dumps({"seconds": float((rows["train_seconds"] + rows["aggregate_seconds"]).mean()),
                      "step_seconds": float(rows["step_seconds"].mean()),
                      "aggregate_seconds": float(rows["aggregate_seconds"].mean()),
                      "utilisation": float(rows["worker_utilisation"].mean()),
                      "adapters": int(rows["adapters"].iloc[0]),
                      "accuracy": float(np.average(final["accuracy"], weights=final["test_samples"])),
                      "pss_mb": probe.peak_mb, "rss_mb": probe.peak_rss_mb, "start_pss_mb": probe.start_mb,
                      "per_process": probe.process_peaks}))
    return 0


def layouts(config: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The sequential loop (engine.backend local, one adapter at a time on all of torch's
    threads, as the reference implementations train) and the engine's layouts on this node: one
    single-threaded worker per core (the default), one worker holding every core with torch's
    intra-op threads (engine.cpus_per_worker = the node's CPUs), and no actors at all (backend
    local with batched training on every core: one process, like the loop)."""
    cores = float(os.cpu_count() or 1)

    def variant(**engine) -> ExperimentConfig:
        made = config.model_copy(deep=True)
        for key, value in engine.items():
            setattr(made.engine, key, value)
        return made

    return {"loop": variant(backend="local", batched_training=False, cpus_per_worker=cores),
            "engine, a worker per core": variant(num_cpus=int(cores)),
            "engine, one worker of every core": variant(num_cpus=int(cores), num_workers=1, cpus_per_worker=cores),
            "engine in one process": variant(backend="local", cpus_per_worker=cores)}


def say_run(label: str, run: dict, flops: float, peak: float, loop: dict | None) -> None:
    versus = f" = {run['seconds'] / loop['seconds']:.2f}x the loop" if loop else ""
    memory = f" ({run['pss_mb'] / loop['pss_mb']:.2f}x)" if loop else ""
    say(f"  {label}: {run['seconds']:.2f} s/round{versus}; MFU {flops / run['seconds'] / peak:.1%}; peak PSS sum "
        f"{run['pss_mb']:,.0f} MiB{memory}, {run['start_pss_mb']:,.0f} before any job; final accuracy "
        f"{run['accuracy']:.4f}")


# --- sections ---------------------------------------------------------------------------------
def bench_loop(quick: bool) -> dict:
    """The loop against the engine's three layouts (layouts()) and against the default layout
    with the base's dropout off (model.base_dropout), 100 clients, each run in a fresh process."""
    rounds = 3
    config = experiment(quick, "bench_loop", clients=20 if quick else 100, rounds=rounds,
                        local_steps=2 if quick else 3, batch_size=8, train_per_task=2000)
    measured = list(range(2, rounds))  # round 1 warms up; the last round evaluates
    say(f"[loop] {config.data.num_clients} clients, {config.train.local_steps} local steps of batch "
        f"{config.train.batch_size} per task, model {config.model.name}; rounds {measured} measured (training "
        "and aggregation), each run in a fresh process; MFU against the node's float32 peak")
    peak = node_peaks(quick=quick)["float32"]
    say_peaks({"float32": peak})
    flops = round_flops(config).train
    say(f"  a round's model FLOPs: {flops / 1e12:.2f} TFLOP")
    runs = layouts(config)
    no_dropout = runs["engine, a worker per core"].model_copy(deep=True)
    no_dropout.model.base_dropout = False
    runs["engine, a worker per core, base dropout off"] = no_dropout
    out: dict = {"clients": config.data.num_clients, "round_tflop": flops / 1e12, "peak": peak, "runs": {}}
    for label, variant in runs.items():
        run = run_child(variant, measured)
        run["mfu"] = flops / run["seconds"] / peak["node"]
        out["runs"][label] = run
        say_run(label, run, flops, peak["node"], out["runs"].get("loop"))
    loop, engine = out["runs"]["loop"], out["runs"]["engine, a worker per core"]
    fat, quiet = out["runs"]["engine, one worker of every core"], out["runs"]["engine, a worker per core, base dropout off"]
    alone = out["runs"]["engine in one process"]
    out.update(engine_over_loop=engine["seconds"] / loop["seconds"],
               orchestration_share=1 - engine["step_seconds"] / engine["seconds"])
    say(f"  RATIO engine/loop seconds per round = {out['engine_over_loop']:.2f}  (target <= 0.6)")
    say(f"  RATIO orchestration share of an engine round = {out['orchestration_share']:.1%}  (target < 10%)")
    say(f"  RATIO one worker of every core / a worker per core: seconds {fat['seconds'] / engine['seconds']:.2f}, "
        f"peak PSS {fat['pss_mb'] / engine['pss_mb']:.2f}; engine/loop peak PSS: a worker per core "
        f"{engine['pss_mb'] / loop['pss_mb']:.2f}, one worker {fat['pss_mb'] / loop['pss_mb']:.2f}, in one process "
        f"{alone['pss_mb'] / loop['pss_mb']:.2f}  (target <= 1.5)")
    say(f"  RATIO engine in one process / loop seconds per round = {alone['seconds'] / loop['seconds']:.2f}")
    say(f"  RATIO base dropout off / on: seconds {quiet['seconds'] / engine['seconds']:.2f}, accuracy "
        f"{100 * (quiet['accuracy'] - engine['accuracy']):+.2f} points")
    return out


def bench_layout(quick: bool) -> dict:
    """The engine's three layouts (layouts(): a worker per core, one worker of every core, one
    process) at 1000 clients (1 local step of batch 4 per adapter, one round, which also
    evaluates), each in a fresh process."""
    clients = 50 if quick else 1000
    config = experiment(quick, "bench_layout", clients=clients, rounds=1, local_steps=1, batch_size=4,
                        train_per_task=2000 if quick else 10_000)
    say(f"[layout] {clients} clients, 1 local step of batch 4 per adapter, round 1 measured (training and "
        "aggregation), each run in a fresh process")
    peak = node_peaks(quick=quick)["float32"]
    say_peaks({"float32": peak})
    flops = round_flops(config).train
    out: dict = {"clients": clients, "round_tflop": flops / 1e12, "peak": peak, "runs": {}}
    for label, variant in layouts(config).items():
        if label == "loop":
            continue
        run = run_child(variant, [1])
        run["mfu"] = flops / run["seconds"] / peak["node"]
        out["runs"][label] = run
        say_run(f"{label} ({run['adapters']} adapters)", run, flops, peak["node"], None)
    thin = out["runs"]["engine, a worker per core"]
    for label in ("engine, one worker of every core", "engine in one process"):
        other = out["runs"][label]
        say(f"  RATIO {label.removeprefix('engine, ')} / a worker per core: seconds "
            f"{other['seconds'] / thin['seconds']:.2f}, peak PSS {other['pss_mb'] / thin['pss_mb']:.2f}")
    return out


# torch operators by what they do, for the profile of a batched pass (first match wins)
PROFILE_GROUPS = (
    ("attention", ("scaled_dot_product", "softmax", "_flash_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("dropout", ("dropout", "bernoulli")),
    ("casts and copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous", "aten::clone")),
    ("optimiser", ("_foreach", "aten::addcdiv", "aten::addcmul", "aten::sqrt", "aten::lerp")),
    ("gather and index", ("aten::index", "aten::gather", "aten::embedding", "aten::scatter", "aten::cat")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "gelu", "aten::tanh", "layer_norm",
                     "aten::where", "aten::masked_fill", "aten::sum", "aten::mean")),
)


def profile_summary(run) -> dict[str, float]:
    """Share of the CPU time of `run()` per operator group (PROFILE_GROUPS; the rest, outside any
    operator, is Python and framework overhead), from torch.profiler's self times."""
    from torch.profiler import ProfilerActivity, profile

    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        run()
    wall = time.perf_counter() - began
    shares = {name: 0.0 for name, _ in PROFILE_GROUPS}
    shares["other operators"] = 0.0
    for event in trace.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        group = next((name for name, keys in PROFILE_GROUPS if any(key in event.key for key in keys)),
                     "other operators")
        shares[group] += seconds
    shares["Python and overhead"] = max(0.0, wall - sum(shares.values()))
    return {name: value / wall for name, value in shares.items()}


def bench_batched(quick: bool) -> dict:
    import torch

    from fltac_ray.client.batched_training import AdapterJob, train_batched
    from fltac_ray.client.flops import jobs_flops, peak_matmul_flops
    from fltac_ray.client.training import train_adapter
    from fltac_ray.data.encoding import make_featurizer
    from fltac_ray.data.federated import build_federated_data
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone

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

    peak = peak_matmul_flops(torch.float32)  # one thread, as the passes below run
    say(f"  float32 matmul peak here: {peak / 1e9:.1f} GFLOP/s (1 thread, {torch.backends.cpu.get_cpu_capability()})")
    out["peak_gflops"] = peak / 1e9
    for count in (4, 8) if quick else (8, 32):
        work = jobs_flops(model, jobs(count), config.train.batch_size, data.head_classes)
        began = time.perf_counter()
        for job in jobs(count):
            train_adapter(model, job.start, job.split, job.indices, job.num_classes, job.steps,
                          config.train.batch_size, config.train.lr, 0.0, job.rng, cpu)
        single = time.perf_counter() - began
        began = time.perf_counter()
        train_batched(model, jobs(count), config.train.batch_size, config.train.lr, 0.0, cpu)
        batched = time.perf_counter() - began
        mfu_single, mfu_batched = work.train / single / peak, work.train / batched / peak
        say(f"  {count} adapters: one by one {single:.2f} s, batched {batched:.2f} s; "
            f"RATIO batched speedup = {single / batched:.2f}x; MFU one by one {mfu_single:.1%}, batched "
            f"{mfu_batched:.1%} ({work.train / 1e9:.2f} GFLOP: base {2 * work.base_linear / work.train:.0%}, "
            f"attention {3 * work.attention / work.train:.0%}, LoRA {3 * work.lora / work.train:.0%}, "
            f"head {3 * work.head / work.train:.0%})")
        out[str(count)] = {"one_by_one_seconds": single, "batched_seconds": batched, "speedup": single / batched,
                           "gflop": work.train / 1e9, "mfu_one_by_one": mfu_single, "mfu_batched": mfu_batched}
    count = 4 if quick else 32
    shares = profile_summary(lambda: train_batched(model, jobs(count), config.train.batch_size, config.train.lr,
                                                   0.0, cpu))
    say(f"  where a batched pass of {count} adapters spends its time (torch profiler, self CPU time): "
        + ", ".join(f"{name} {share:.0%}" for name, share in sorted(shares.items(), key=lambda kv: -kv[1])))
    out["profile"] = shares
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def bench_mfu(quick: bool) -> dict:
    """MFU of one batched training pass (32 adapters x 5 steps of batch 8, one thread) with the
    base in float32 and in bfloat16, with its dropout on and off (model.base_dropout), each
    against the one-thread matmul peak of its dtype, and where each pass spends its time."""
    import torch

    from fltac_ray.client.batched_training import AdapterJob, train_batched
    from fltac_ray.client.flops import jobs_flops
    from fltac_ray.client.precision import DTYPES, cpu_bfloat16_native
    from fltac_ray.data.encoding import make_featurizer
    from fltac_ray.data.federated import build_federated_data
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone

    config = experiment(quick, "bench_mfu", clients=10, rounds=1, local_steps=5, batch_size=8, train_per_task=2000)
    count, cpu = (4 if quick else 32), torch.device("cpu")
    say(f"[mfu] a batched pass of {count} adapters x {config.train.local_steps} steps of batch "
        f"{config.train.batch_size}, model {config.model.name}, 1 thread; bfloat16 "
        f"{'native' if cpu_bfloat16_native() else 'emulated'} on this CPU")
    peaks = node_peaks(("float32", "bfloat16"), quick)
    say_peaks(peaks)
    data = build_federated_data(config, make_featurizer(config.model.name, config.data.max_length))
    names = list(data.tasks)
    torch.set_num_threads(1)
    native = cpu_bfloat16_native()
    out: dict = {"peaks": peaks, "native_bfloat16": native, "passes": {}}
    for dtype in ("float32", "bfloat16"):
        # emulated bfloat16 ran a 32-adapter pass 19x slower than float32 (AVX2 EPYC): 1/8 of it
        adapters = count if native or dtype == "float32" else max(1, count // 8)
        if adapters != count:
            say(f"  bfloat16 passes with {adapters} adapters (emulated here: the full pass takes minutes)")
        for base_dropout in (True, False):
            settings = config.model.model_copy(update={"base_dropout": base_dropout})
            model = AdapterModel(load_backbone(config.model.name, "text", dtype=DTYPES[dtype]), settings,
                                 data.head_classes, 0)
            start = model.get_adapter()

            def jobs(start=start, adapters=adapters) -> list[AdapterJob]:
                return [AdapterJob(start, data.tasks[names[j % 3]].train, np.arange(j * 40, j * 40 + 40),
                                   data.tasks[names[j % 3]].num_classes, config.train.local_steps,
                                   np.random.default_rng(j)) for j in range(adapters)]

            def run(model=model, jobs=jobs) -> None:
                train_batched(model, jobs(), config.train.batch_size, config.train.lr, 0.0, cpu)

            work = jobs_flops(model, jobs(), config.train.batch_size, data.head_classes).train
            train_batched(model, jobs()[:1], config.train.batch_size, config.train.lr, 0.0, cpu)  # warm-up
            began = time.perf_counter()
            run()
            seconds = time.perf_counter() - began
            mfu = work / seconds / peaks[dtype]["one_thread"]
            shares = profile_summary(run)
            label = f"{dtype}, base dropout {'on' if base_dropout else 'off'}"
            out["passes"][label] = {"adapters": adapters, "seconds": seconds, "gflop": work / 1e9, "mfu": mfu,
                                    "profile": shares}
            say(f"  {label}: {seconds:.2f} s, MFU {mfu:.1%}; " + ", ".join(
                f"{name} {share:.0%}" for name, share in sorted(shares.items(), key=lambda kv: -kv[1]) if share >= 0.005))
    passes = out["passes"]
    for dtype in ("float32", "bfloat16"):
        say(f"  RATIO {dtype}: base dropout off / on seconds = "
            f"{passes[f'{dtype}, base dropout off']['seconds'] / passes[f'{dtype}, base dropout on']['seconds']:.2f}")
    half, full = passes["bfloat16, base dropout on"], passes["float32, base dropout on"]
    say(f"  RATIO bfloat16 / float32 seconds per GFLOP (base dropout on) = "
        f"{half['seconds'] / half['gflop'] / (full['seconds'] / full['gflop']):.2f}")
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def bench_privacy(quick: bool) -> dict:
    """Example-level DP-SGD's cost per step: the batched pass with per-example gradients (each
    example through its own adapter copy), clipping and noise, against the non-private batched
    pass and against DP-SGD one example at a time, on the same jobs (one thread); and the
    epsilon of those steps from privacy/accounting against dp-accounting called directly."""
    import dp_accounting
    import torch

    from fltac_ray.client.batched_training import AdapterJob, train_batched
    from fltac_ray.client.training import train_adapter
    from fltac_ray.data.encoding import make_featurizer
    from fltac_ray.data.federated import build_federated_data
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone
    from fltac_ray.privacy.accounting import example_epsilon
    from fltac_ray.privacy.dp_sgd import ExamplePrivacy

    torch.set_num_threads(1)
    config = experiment(quick, "bench_privacy", clients=10, rounds=1, local_steps=5, batch_size=8,
                        train_per_task=2000)
    data = build_federated_data(config, make_featurizer(config.model.name, config.data.max_length))
    model = AdapterModel(load_backbone(config.model.name, "text"), config.model, data.head_classes, 0)
    start, names, cpu = model.get_adapter(), list(data.tasks), torch.device("cpu")
    batch, steps, examples = config.train.batch_size, config.train.local_steps, 40
    privacy = ExamplePrivacy(clip_norm=1.0, noise_multiplier=1.0, expected_batch=batch)
    capability = torch.backends.cpu.get_cpu_capability()
    say(f"[privacy] model {config.model.name}, {steps} steps of (expected) batch {batch} per adapter over "
        f"{examples} examples, 1 thread, {capability} CPU")

    def jobs(count: int) -> list[AdapterJob]:
        return [AdapterJob(start, data.tasks[names[j % len(names)]].train, np.arange(j * examples, (j + 1) * examples),
                           data.tasks[names[j % len(names)]].num_classes, steps, np.random.default_rng(j),
                           noise_rng=np.random.default_rng([99, j])) for j in range(count)]

    def timed(run) -> float:
        began = time.perf_counter()
        run()
        return time.perf_counter() - began

    out: dict = {"cpu_capability": capability}
    for count in (4,) if quick else (8, 32):
        plain = timed(lambda n=count: train_batched(model, jobs(n), batch, config.train.lr, 0.0, cpu))
        private = timed(lambda n=count: train_batched(model, jobs(n), batch, config.train.lr, 0.0, cpu,
                                                      privacy=privacy))
        single = timed(lambda n=count: [train_adapter(model, job.start, job.split, job.indices, job.num_classes,
                                                      job.steps, batch, config.train.lr, 0.0, job.rng, cpu,
                                                      privacy=privacy, noise_rng=job.noise_rng) for job in jobs(n)])
        say(f"  {count} adapters: batched {plain:.2f} s, batched DP-SGD {private:.2f} s, DP-SGD one example at a "
            f"time {single:.2f} s; RATIO DP-SGD/plain batched step time = {private / plain:.2f}x, "
            f"RATIO batched DP-SGD speedup = {single / private:.2f}x")
        out[str(count)] = {"batched_seconds": plain, "dp_sgd_batched_seconds": private,
                           "dp_sgd_one_by_one_seconds": single, "dp_sgd_over_plain": private / plain}
    rate, total = batch / examples, steps * 20  # 20 rounds of these steps
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(1.0)), total)
    ours, library = example_epsilon(1.0, rate, total, 1e-5), accountant.get_epsilon(1e-5)
    say(f"  epsilon of {total} steps at rate {rate:g}, noise 1.0, delta 1e-5: {ours:.6f} (fltac-ray) vs "
        f"{library:.6f} (dp-accounting directly); RATIO epsilon fltac-ray/dp-accounting = {ours / library:.6f}")
    out["epsilon"] = {"fltac_ray": ours, "dp_accounting": library}
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def bench_ranks(quick: bool) -> dict:
    """Mixed LoRA ranks in one batched pass (model.lora.rank_profile): the engine's way, every
    adapter padded to the largest rank with zero rows in one pass, against grouping by rank, one
    pass per rank on a model of that rank (fewer LoRA FLOPs, more passes), and one adapter at a
    time; on the same jobs (heavy_tail and random ranks over {1, 2, 4, 8}), one thread. The
    grouped adapters, padded back, must equal the padded pass's."""
    import torch

    from fltac_ray.client.batched_training import AdapterJob, train_batched
    from fltac_ray.client.training import train_adapter
    from fltac_ray.data.encoding import make_featurizer
    from fltac_ray.data.federated import build_federated_data
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone
    from fltac_ray.models.ranks import assign_ranks, lora_rank_axis, rank_counts, rank_mask

    torch.set_num_threads(1)
    rank_set = [1, 2, 4, 8]
    config = experiment(quick, "bench_ranks", clients=10, rounds=1, local_steps=5, batch_size=8,
                        train_per_task=2000)
    data = build_federated_data(config, make_featurizer(config.model.name, config.data.max_length))

    def model_at(rank: int) -> AdapterModel:  # each its own copy of the (seeded) base: peft wraps in place
        # alpha in proportion to the rank: the padded model's scale alpha / r_max at every rank
        alpha = config.model.lora.alpha * rank / rank_set[-1]
        lora = config.model.lora.model_copy(update={"rank": rank, "alpha": alpha, "dropout": 0.0,
                                                    "rank_profile": None})
        model = AdapterModel(load_backbone(config.model.name, "text"), config.model.model_copy(update={"lora": lora}),
                             data.head_classes, 0)
        for module in model.modules():  # the base's dropout off too: its draws follow the pass's batch
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    models = {rank: model_at(rank) for rank in rank_set}
    wide = models[rank_set[-1]]
    layout = wide.adapter_layout()
    start, names, cpu = wide.get_adapter(), list(data.tasks), torch.device("cpu")
    batch, steps, examples = config.train.batch_size, config.train.local_steps, 40
    capability = torch.backends.cpu.get_cpu_capability()
    say(f"[ranks] model {config.model.name}, ranks {rank_set} padded to {rank_set[-1]}, {steps} steps of batch "
        f"{batch} per adapter, 1 thread, {capability} CPU")

    def narrow(vector: np.ndarray, rank: int) -> np.ndarray:
        """A padded adapter as the rank-`rank` model lays it out (its first `rank` ranks)."""
        parts, offset = [], 0
        for name, shape in layout:
            size = int(np.prod(shape))
            block, offset = vector[offset:offset + size].reshape(shape), offset + size
            axis = lora_rank_axis(name)
            parts.append((block if axis is None else np.take(block, np.arange(rank), axis=axis)).reshape(-1))
        return np.concatenate(parts)

    def padded_back(vector: np.ndarray, rank: int) -> np.ndarray:
        """The rank-`rank` model's adapter padded with zeros to the wide layout."""
        parts, offset = [], 0
        for name, shape in layout:
            axis = lora_rank_axis(name)
            narrow_shape = list(shape) if axis is None else [rank if i == axis else n for i, n in enumerate(shape)]
            size = int(np.prod(narrow_shape))
            piece, offset = vector[offset:offset + size].reshape(narrow_shape), offset + size
            full = np.zeros(shape, np.float32)
            full[tuple(slice(0, n) for n in narrow_shape)] = piece
            parts.append(full.reshape(-1))
        return np.concatenate(parts)

    def jobs(ranks: np.ndarray, narrowed: bool) -> list[AdapterJob]:
        made = []
        for j, rank in enumerate(ranks):
            bundle = data.tasks[names[j % len(names)]]
            begin = np.where(rank_mask(layout, int(rank)), start, np.float32(0)).astype(np.float32)
            made.append(AdapterJob(narrow(begin, int(rank)) if narrowed else begin, bundle.train,
                                   np.arange(j * examples, (j + 1) * examples), bundle.num_classes, steps,
                                   np.random.default_rng(j)))
        return made

    def timed(run):
        began = time.perf_counter()
        value = run()
        return time.perf_counter() - began, value

    out: dict = {"cpu_capability": capability}
    for profile in ("heavy_tail", "random"):
        for count in (8,) if quick else (8, 32):
            ranks = assign_ranks(profile, rank_set, count, seed=0)
            padded_seconds, padded = timed(lambda r=ranks: train_batched(wide, jobs(r, False), batch,
                                                                         config.train.lr, 0.0, cpu))
            grouped_seconds, grouped, narrowed = 0.0, [None] * count, jobs(ranks, True)
            for rank in sorted(set(ranks.tolist())):
                rows = np.flatnonzero(ranks == rank)
                group_jobs = [narrowed[row] for row in rows]
                seconds, outcomes = timed(lambda g=group_jobs, m=models[rank]: train_batched(
                    m, g, batch, config.train.lr, 0.0, cpu))
                grouped_seconds += seconds
                for row, outcome in zip(rows, outcomes, strict=True):
                    grouped[row] = padded_back(outcome.adapter, rank)
            single_seconds, _ = timed(lambda r=ranks: [train_adapter(
                wide, job.start, job.split, job.indices, job.num_classes, job.steps, batch, config.train.lr, 0.0,
                job.rng, cpu) for job in jobs(r, False)])
            difference = max(float(np.abs(p.adapter - g).max()) for p, g in zip(padded, grouped, strict=True))
            say(f"  {profile}, {count} adapters (ranks {rank_counts(ranks)}): padded "
                f"one pass {padded_seconds:.2f} s, grouped by rank {grouped_seconds:.2f} s, one by one "
                f"{single_seconds:.2f} s; RATIO grouped/padded time = {grouped_seconds / padded_seconds:.2f}x, "
                f"RATIO padded batched speedup = {single_seconds / padded_seconds:.2f}x; largest difference "
                f"{difference:.1e}")
            out[f"{profile}_{count}"] = {"padded_seconds": padded_seconds, "grouped_seconds": grouped_seconds,
                                         "one_by_one_seconds": single_seconds,
                                         "grouped_over_padded": grouped_seconds / padded_seconds,
                                         "difference_max": difference}
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def precision_workload(quick: bool, dtype: str, **engine) -> ExperimentConfig:
    """100 clients, 10 local steps of batch 16 per task, length 32 (the data default), 2 rounds:
    round 1 warms up, round 2 is timed and evaluates every adapter afterwards."""
    config = experiment(quick, f"bench_precision_{dtype}", clients=20 if quick else 100, rounds=2,
                        local_steps=2 if quick else 10, batch_size=16, train_per_task=2000 if quick else 20_000,
                        **engine)
    config.model.dtype = dtype
    return config


def bench_precision(quick: bool) -> dict:
    """float32 against bfloat16 for the frozen base (model.dtype), on this CPU: the step time of
    batched and one-by-one training in one process on one thread, and the engine's round in
    bfloat16 against the float32 sequential loop, with the final accuracy of each."""
    import torch

    from fltac_ray.client.batched_training import AdapterJob, train_batched
    from fltac_ray.client.precision import DTYPES
    from fltac_ray.client.training import train_adapter
    from fltac_ray.data.encoding import make_featurizer
    from fltac_ray.data.federated import build_federated_data
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone

    say(f"[precision] float32 vs bfloat16 base ({torch.backends.cpu.get_cpu_capability()} CPU)")
    torch.set_num_threads(1)
    config = precision_workload(quick, "float32")
    data = build_federated_data(config, make_featurizer(config.model.name, config.data.max_length))
    names, cpu, steps, batch = list(data.tasks), torch.device("cpu"), config.train.local_steps, config.train.batch_size
    adapters = 4 if quick else 8
    out: dict = {"step_seconds": {}}
    for dtype in ("float32", "bfloat16"):
        model = AdapterModel(load_backbone(config.model.name, "text", dtype=DTYPES[dtype]), config.model,
                             data.head_classes, 0)
        start = model.get_adapter()
        jobs = [AdapterJob(start, data.tasks[names[j % 3]].train, np.arange(j * 64, j * 64 + 64),
                           data.tasks[names[j % 3]].num_classes, steps, np.random.default_rng(j)) for j in range(adapters)]
        train_batched(model, jobs[:1], batch, config.train.lr, 0.0, cpu)  # warm-up (first-call kernels)
        began = time.perf_counter()
        batched = train_batched(model, jobs, batch, config.train.lr, 0.0, cpu)
        batched_s = (time.perf_counter() - began) / steps
        began = time.perf_counter()
        for j, job in enumerate(jobs):
            train_adapter(model, job.start, job.split, job.indices, job.num_classes, steps, batch, config.train.lr,
                          0.0, np.random.default_rng(j), cpu)
        single_s = (time.perf_counter() - began) / (steps * adapters)
        loss = float(np.mean([o.mean_loss for o in batched]))
        out["step_seconds"][dtype] = {"batched_step": batched_s, "one_adapter_step": single_s, "mean_loss": loss}
        say(f"  {dtype}: batched step of {adapters} adapters x {batch} examples {batched_s * 1000:.0f} ms, "
            f"one adapter's step {single_s * 1000:.1f} ms; mean training loss {loss:.4f}")
    full, half = out["step_seconds"]["float32"], out["step_seconds"]["bfloat16"]
    for kind in ("batched_step", "one_adapter_step"):
        say(f"  RATIO bfloat16/float32 step time ({kind.replace('_', ' ')}) = {half[kind] / full[kind]:.2f}")
    torch.set_num_threads(os.cpu_count() or 1)

    # The engine's round against the float32 sequential loop (engine.backend local, one adapter
    # at a time on all threads), same data, seeds and steps; round 2 timed.
    threads = torch.get_num_threads()
    runs = {"loop float32": precision_workload(quick, "float32", backend="local", batched_training=False,
                                               cpus_per_worker=float(threads)),
            "engine float32": precision_workload(quick, "float32"),
            "engine bfloat16": precision_workload(quick, "bfloat16"),
            "engine bfloat16, base dropout off": precision_workload(quick, "bfloat16")}
    runs["engine bfloat16, base dropout off"].model.base_dropout = False
    peaks = node_peaks(("float32", "bfloat16"), quick)
    say_peaks(peaks)
    flops = round_flops(runs["engine float32"]).train
    seconds, accuracy, mfu = {}, {}, {}
    for label, workload in runs.items():
        result = run_engine(workload)
        timed = result.rounds[result.rounds["round"] >= 2]
        seconds[label] = float((timed["train_seconds"] + timed["aggregate_seconds"]).mean())
        final = result.metrics[result.metrics["round"] == result.metrics["round"].max()]
        accuracy[label] = float(np.average(final["accuracy"], weights=final["test_samples"]))
        dtype = "bfloat16" if "bfloat16" in label else "float32"
        mfu[label] = flops / seconds[label] / peaks[dtype]["node"]
        say(f"  {label}: {seconds[label]:.2f} s/round (training + aggregation, round 2), MFU {mfu[label]:.1%} "
            f"of the node's {dtype} peak, final accuracy {accuracy[label]:.4f}")
    base = seconds["loop float32"]
    for label in ("engine float32", "engine bfloat16", "engine bfloat16, base dropout off"):
        say(f"  RATIO {label} / loop float32 seconds per round = {seconds[label] / base:.2f}"
            + ("  (target <= 0.3)" if "bfloat16" in label else ""))
    gap = 100 * (accuracy["engine bfloat16"] - accuracy["loop float32"])
    say(f"  accuracy, engine bfloat16 - loop float32 = {gap:+.2f} points  (target within 1 point); "
        f"with the base's dropout off {100 * (accuracy['engine bfloat16, base dropout off'] - accuracy['loop float32']):+.2f}")
    out.update(seconds=seconds, accuracy=accuracy, mfu=mfu, peaks=peaks, round_tflop=flops / 1e12,
               engine_bf16_over_loop=seconds["engine bfloat16"] / base,
               accuracy_gap_points=gap)
    return out


def bench_scale(quick: bool, sizes: tuple[int, ...] | None = None) -> dict:
    sizes = sizes or ((10, 50, 100) if quick else (10, 100, 500, 1000))
    say(f"[scale] clients per round {list(sizes)}: 1 local step of batch 4 per adapter, 2 rounds "
        "(the second evaluates); memory = peak sum of PSS over driver + coordinator + workers")
    rows = {}
    for clients in sizes:
        config = experiment(quick, f"bench_scale_{clients}", clients=clients, rounds=2, local_steps=1,
                            batch_size=4, train_per_task=2000 if quick else 10_000, checkpoint_every=1)
        probe = PeakMemory()
        began = time.perf_counter()
        result = run_engine(config, probe)
        peak = probe.stop()
        first = result.rounds.iloc[0]
        rows[clients] = {"adapters": int(first["adapters"]), "round_seconds": float(first["seconds"]),
                         "step_seconds": float(first["step_seconds"]),
                         "aggregate_seconds": float(first["aggregate_seconds"]),
                         "peak_memory_mb": peak, "process_peaks_mb": dict(probe.process_peaks),
                         "wall_seconds": time.perf_counter() - began, **checkpoint_sizes(result.run_dir)}
        say(f"  {clients:>5} clients ({rows[clients]['adapters']} adapters): {first['seconds']:.1f} s/round "
            f"(steps {first['step_seconds']:.1f} s, K-means+aggregation {first['aggregate_seconds']:.1f} s), "
            f"peak memory {peak:,.0f} MiB")
        say("        per process (own peak, MiB): " + ", ".join(
            f"{name} {mb:,.0f}" for name, mb in sorted(probe.process_peaks.items())))
    say("  checkpoint bytes per round (one copy per (client, slot) -> deduplicated store):")
    for clients in sizes:
        row = rows[clients]
        say(f"  {clients:>5} clients: {row['checkpoint_per_client_copy_bytes'] / 2**20:,.2f} MiB -> "
            f"{row['checkpoint_bytes'] / 2**20:,.2f} MiB on disk ({row['checkpoint_rows']} distinct adapters "
            f"for {row['checkpoint_keys']} client adapters)")
    low, high = (sizes[1] if len(sizes) > 2 else sizes[0]), sizes[-1]
    per_client = (rows[high]["peak_memory_mb"] - rows[low]["peak_memory_mb"]) / (high - low)
    say(f"  RATIO memory added per extra client ({low} -> {high}) = {per_client * 1024:.0f} KiB  (target < 1 MB)")
    say(f"  {high} clients per round: peak {rows[high]['peak_memory_mb'] / 1024:.2f} GiB  (must fit in 24 GiB)")
    return {"per_size": rows, "memory_per_client_mb": per_client}


def checkpoint_sizes(run_dir: Path) -> dict:
    """The newest checkpoint's bytes on disk, and what one adapter copy per (client, slot) (the
    previous checkpoint format) would take for the same state."""
    from fltac_ray.runs.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir / "checkpoints", warn=lambda _: None)
    on_disk = sum(f.stat().st_size for f in checkpoint.path.iterdir())
    rows, index = checkpoint.groups["clients"]["rows"], checkpoint.groups["clients"]["index"]
    return {"checkpoint_bytes": on_disk, "checkpoint_rows": len(rows), "checkpoint_keys": len(index),
            "checkpoint_per_client_copy_bytes": on_disk - rows.nbytes + len(index) * rows.shape[1] * 4}


def static_placement_utilisation(costs: dict[int, float], sampled: list[int], workers: int) -> float:
    """The previous engine: every client pinned to one worker for the whole run (LPT by cost at
    the start); a round's utilisation is mean over max of the sampled clients' cost per worker."""
    load = [0.0] * workers
    home = {}
    for client in sorted(costs, key=lambda c: (-costs[c], c)):
        target = min(range(workers), key=lambda w: (load[w], w))
        home[client], load[target] = target, load[target] + costs[client]
    busy = [0.0] * workers
    for client in sampled:
        busy[home[client]] += costs[client]
    return utilisation(busy)


def bench_partial(quick: bool) -> dict:
    """500 clients with data, 10% sampled per round: how evenly the round's work is spread."""
    from fltac_ray.algorithms import create_algorithm
    from fltac_ray.engine.run_setup import prepare_data, sample_clients

    clients = 100 if quick else 500
    config = experiment(quick, "bench_partial", clients=clients, rounds=3, local_steps=2, batch_size=8,
                        train_per_task=2000 if quick else 10_000, client_fraction=0.1)
    say(f"[partial] {clients} clients (data.min_share {config.data.resolved_min_share:g}), client_fraction 0.1, "
        f"{config.train.local_steps} local steps per task")
    result = run_engine(config)
    measured = float(result.rounds["worker_utilisation"].mean())
    workers = int(json.loads((result.run_dir / "decisions.json").read_text())["min_passes"])
    data, active = prepare_data(config, create_algorithm(config))
    say(f"  {len(active)} clients hold data ({sum(len(data.clients[c].tasks) for c in active)} adapters)")
    cost = {c: float(len(data.clients[c].tasks) * config.train.local_steps) for c in active}
    planned: dict[str, dict[str, float]] = {}
    for pool in (workers, 16, 64):
        static, per_round = [], []
        for round_index in range(1, 11):
            sampled = sample_clients(config.seed, round_index, active, 0.1)
            jobs = [TrainJob((c, slot), (task,), 1, (config.train.local_steps,))
                    for c in sampled for slot, task in enumerate(data.clients[c].tasks)]
            passes = plan_passes(jobs, AUTO_ADAPTERS_CPU, pool, batched=True)  # max_batched_adapters: auto on a CPU
            plan = assign_lpt([sum(j.cost for j in p) for p in passes], list(range(pool)))
            per_round.append(utilisation([sum(sum(j.cost for j in passes[i]) for i in items)
                                          for items in plan.values()]))
            static.append(static_placement_utilisation(cost, sampled, pool))
        planned[str(pool)] = {"per_round_scheduling": float(np.mean(per_round)),
                              "static_placement": float(np.mean(static))}
        say(f"  {pool:>3} workers, by the cost model (10 rounds): per-round scheduling "
            f"{np.mean(per_round):.2f}, static placement {np.mean(static):.2f}")
    say(f"  RATIO worker utilisation measured here ({workers} workers, mean step time / slowest) = "
        f"{measured:.2f}  (target >= 0.9; static placement on the same rounds: "
        f"{planned[str(workers)]['static_placement']:.2f})")
    return {"clients_with_data": len(active), "workers": workers, "measured_utilisation": measured,
            "planned": planned}


def memory_workload(quick: bool, backend: str) -> ExperimentConfig:
    """100 clients, 10 local steps of batch 16 per task, 20,000 examples per task."""
    engine = {"backend": "local", "batched_training": False, "cpus_per_worker": float(os.cpu_count())} \
        if backend == "local" else {"num_cpus": os.cpu_count()}
    return experiment(quick, f"bench_memory_{backend}", clients=20 if quick else 100, rounds=2,
                      local_steps=2 if quick else 10, batch_size=16,
                      train_per_task=2000 if quick else 20_000, **engine)


def bench_memory(quick: bool) -> dict:
    config = memory_workload(quick, "ray")
    say(f"[memory] {config.data.num_clients} clients, {config.train.local_steps} local steps of batch "
        f"{config.train.batch_size} per task, {config.data.train_per_task:,} examples per task; each "
        "run in a fresh process")
    out = {}
    for backend, label in (("local", "sequential loop (one process, engine.backend: local)"),
                           ("ray", "Ray engine (driver + coordinator + workers, its own Ray)")):
        out[backend] = run_child(memory_workload(quick, backend), [2])
        say(f"  {label}: peak PSS sum {out[backend]['pss_mb']:,.0f} MiB, RSS sum {out[backend]['rss_mb']:,.0f} MiB")
        say("        per process (own peak PSS, MiB): " + ", ".join(
            f"{name} {mb:,.0f}" for name, mb in sorted(out[backend]["per_process"].items())))
    ratio = out["ray"]["pss_mb"] / out["local"]["pss_mb"]
    # What every process holds before any job (Python, torch, transformers and Ray imported, the
    # model built, the data attached): the floor of a multi-process engine, paid once per process.
    say(f"  Ray engine before any job (sum of PSS once every process is up): "
        f"{out['ray']['start_pss_mb']:,.0f} MiB = {out['ray']['start_pss_mb'] / out['local']['pss_mb']:.2f}x "
        "the loop's peak")
    say(f"  RATIO engine/loop peak PSS = {ratio:.2f}  (target <= 1.5); RSS sums {out['ray']['rss_mb'] / out['local']['rss_mb']:.2f}")
    return {**out, "pss_ratio": ratio}


def bench_kmeans(quick: bool) -> dict:
    from fltac_ray.server.clustering import kmeans_labels, resolve_backend

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


def multinode_workload(quick: bool) -> ExperimentConfig:
    """1000 clients, 10% per round, one local step of batch 16 per task, 3 rounds (the last
    evaluates every adapter), 3 workers of 1 CPU."""
    return experiment(quick, "bench_multinode", clients=40 if quick else 1000, rounds=2 if quick else 3, local_steps=1,
                      batch_size=16, train_per_task=2000 if quick else 20_000, client_fraction=0.1,
                      num_workers=3, cpus_per_worker=1.0)


def bytes_between_nodes(ports: list[int]) -> float:
    """Bytes the nodes' object managers pushed to other nodes so far (Ray's own counters)."""
    import urllib.request

    total = 0.0
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith("ray_object_manager_bytes{") and 'Type="PushedFromLocal' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


class NodeTraffic(Callback):
    """Reads the bytes moved between nodes once the workers are up and after every round (after
    Ray's next metrics report: the round's own seconds are taken before callbacks run)."""

    def __init__(self, ports: list[int], settle_s: float = 2.5) -> None:
        self.ports, self.settle_s = ports, settle_s
        self.readings: list[float] = []
        self.base_bytes = 0

    def _read(self) -> None:
        time.sleep(self.settle_s)
        self.readings.append(bytes_between_nodes(self.ports))

    def on_start(self, run) -> None:
        import ray

        self.base_bytes = ray.get(run.backend.slots[0].actor.describe.remote())["base_bytes"]
        self._read()

    def on_round_end(self, run, ctx) -> None:
        self._read()


def multinode_child(quick: bool, mode: str) -> int:
    """One run in a fresh process on its own Ray (a Cluster of 4 nodes, or one node of 3 CPUs);
    prints its figures as JSON."""
    import ray

    config = multinode_workload(quick)
    fast_metrics = {"metrics_report_interval_ms": 1000}
    cluster = None
    if mode == "cluster":
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": fast_metrics})
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        ports = [node.metrics_export_port for node in [cluster.head_node, *cluster.worker_nodes]]
    else:
        context = ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", _system_config=fast_metrics)
        ports = [context.address_info["metrics_export_port"]]
    probe, traffic = PeakMemory(), NodeTraffic(ports)
    try:
        result = Simulation(config, progress=Progress(quiet=True), callbacks=[probe, traffic]).run()
    finally:
        probe.stop()
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    readings = traffic.readings
    print(json.dumps({
        "seconds": result.rounds["seconds"].tolist(),
        "start_bytes": readings[0],
        "round_bytes": [after - before for before, after in zip(readings, readings[1:], strict=False)],
        "upload_bytes": result.rounds["bytes_up"].tolist(),
        "driver_peak_mb": probe.process_peaks.get("driver", 0.0),
        "base_bytes": traffic.base_bytes,
        "metrics": result.metrics[["round", "task", "accuracy", "loss"]].to_dict("list"),
        "clients": int(result.rounds["clients"].iloc[0]),
        "adapters": int(result.rounds["adapters"].iloc[0]),
    }))
    return 0


def bench_multinode(quick: bool) -> dict:
    config = multinode_workload(quick)
    say(f"[multinode] {config.data.num_clients} clients, {config.federation.client_fraction:.0%} per round, "
        f"{config.train.local_steps} local step of batch {config.train.batch_size} per task, "
        f"{config.rounds} rounds, 3 workers of 1 CPU; each run in a fresh process")
    out = {}
    for mode, label in (("single", "one node, 3 CPUs"), ("cluster", "head (0 CPU) + 3 nodes of 1 CPU")):
        command = [sys.executable, __file__, "--multinode-child", mode] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""},
                              timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"multinode run ({mode}) failed:\n{done.stderr[-3000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        out[mode] = figures
        later = figures["seconds"][1:]  # round 1 also pays the workers' first touch of the data
        say(f"  {label}: {figures['clients']} clients / {figures['adapters']} adapters a round; seconds per round "
            + " / ".join(f"{x:.1f}" for x in figures["seconds"]) + f" (mean of rounds 2+: {np.mean(later):.1f})")
        # Ray's counters see objects above its 100 KiB inline limit; smaller ones (reports, small
        # passes' results, the committed state of few distinct adapters) ride inside task messages
        say(f"        bytes between nodes (objects > 100 KiB): {figures['start_bytes'] / 2**20:,.1f} MiB at start "
            "(the prepared data, once per node), per round "
            + " / ".join(f"{b / 2**20:,.1f}" for b in figures["round_bytes"])
            + f" MiB (the uploads' payload: {np.mean(figures['upload_bytes']) / 2**20:,.1f} MiB a round)")
        say(f"        driver peak PSS {figures['driver_peak_mb']:,.0f} MiB; base model "
            f"{figures['base_bytes'] / 2**20:,.1f} MiB (never loaded by the driver)")
    single, cluster = out["single"], out["cluster"]
    ratio = np.mean(cluster["seconds"][1:]) / np.mean(single["seconds"][1:])
    equal = single["metrics"] == cluster["metrics"]
    say(f"  RATIO cluster/single seconds per round (rounds 2+) = {ratio:.2f}; metrics equal: {equal}")
    return {**out, "seconds_ratio": ratio, "metrics_equal": equal}


def bench_sweep(quick: bool) -> dict:
    """A Ray Tune sweep of 4 concurrent trials, twice: each trial preparing its own data
    (share_data false) and the sweep's driver preparing it once for all. The object store's peak
    over the run (Ray's memory summary) and the sweep's wall time, side by side."""
    from fltac_ray.tune import run_sweep

    folder = Path(tempfile.mkdtemp(prefix="fltac-bench-sweep-"))
    raw = base_experiment(quick)
    raw.update(name="sweep_store", rounds=1, output_dir=str(folder))
    raw["data"].update(num_clients=8, train_per_task=4000 if quick else 20000, test_per_task=50)
    raw["train"] = {"local_steps": 1, "batch_size": 8}
    raw["engine"] = {"metrics": False}
    (folder / "base.yaml").write_text(yaml.safe_dump(raw))
    trial = {"workers": 1, "cpus_per_worker": 0.45, "driver_cpus": 0.05}  # 4 trials on 2 CPUs at once
    say(f"[sweep] 4 concurrent trials (LoRA rank x cluster count), {raw['model']['name']}, "
        f"{raw['data']['train_per_task']:,} training examples per task, 1 round")
    out = {}
    for share in (False, True):
        spec = {"name": f"shared_{share}", "experiment": "base.yaml", "share_data": share,
                "search": {"model.lora.rank": {"grid": [1, 2]}, "algorithm.n_clusters": {"grid": [1, 3]}},
                "scheduler": {"name": "fifo"}, "max_concurrent_trials": 4, "trial": trial, "output_dir": str(folder)}
        (folder / f"sweep_{share}.yaml").write_text(yaml.safe_dump(spec))
        began = time.perf_counter()
        sweep_dir, _, _ = run_sweep(folder / f"sweep_{share}.yaml", None, Progress(quiet=True))
        seconds = time.perf_counter() - began
        summary = json.loads((sweep_dir / "best.json").read_text())
        peak = summary["store_peak_bytes"]
        out["shared" if share else "per_trial"] = {"store_peak_bytes": peak, "seconds": seconds,
                                                   "data_bytes": summary["shared_data_bytes"]}
        data = f" (the data: {summary['shared_data_bytes'] / 2**20:,.1f} MiB)" if share else ""
        say(f"  {'data shared by the sweep' if share else 'data prepared by each trial'}: object store peak "
            f"{peak / 2**20:,.1f} MiB{data}, sweep {seconds:.0f} s")
    ratio = out["shared"]["store_peak_bytes"] / max(1, out["per_trial"]["store_peak_bytes"])
    say(f"  RATIO object store peak shared/per-trial = {ratio:.2f}; sweep time shared/per-trial = "
        f"{out['shared']['seconds'] / out['per_trial']['seconds']:.2f}")
    return {**out, "store_ratio": ratio}


ATTACKS = ("none", "sign_flip", "scaling", "random", "cross_task")
DEFENCES = {  # the table's columns: FL-TAC's aggregation options or federation screening
    "mean": {},
    "median": {"aggregation": "median"},
    "trimmed mean 0.2": {"aggregation": "trimmed_mean", "trim_fraction": 0.2},
    "norm screen": {"screening": "norm"},
    "neighbours screen": {"screening": "neighbours"},
}


def attack_experiment(quick: bool, name: str, folder: Path, **settings) -> ExperimentConfig:
    """33 clients (3 malicious when attacking) over the offline default's 3 tasks, 1 round."""
    raw = base_experiment(quick)
    raw.update(name=name, rounds=1, output_dir=str(folder))
    raw["data"].update(num_clients=33, train_per_task=660 if quick else 3300, test_per_task=100)
    if quick:
        raw["data"]["max_length"] = 16
    raw["engine"] = {"metrics": False}
    raw["report"] = {"adapter_snapshots": 1}  # round 1's uploads, as the server received them
    # uniform weighting (the FL-TAC paper's): the replay needs no sample counts, and an
    # attacker cannot buy weight by claiming a large one
    from fltac_ray.algorithms.options import AggregationOptions

    options = {key: value for key, value in settings.items() if key in AggregationOptions.model_fields}
    raw["algorithm"] = {"name": "fltac", "weighting": "uniform", **options}
    raw["federation"] = {key: value for key, value in settings.items() if key not in options}
    return build_config(raw)


def replay_round(config: ExperimentConfig, snapshot, start: np.ndarray) -> dict:
    """The server's round 1 (server/server.py, the coordinator's own code) on uploads `snapshot`
    with `config`'s federation settings: screening, K-means, aggregation, audit."""
    from fltac_ray.algorithms import resolve_algorithm
    from fltac_ray.algorithms.base import AdapterSpec, Upload
    from fltac_ray.engine.messages import PassResult
    from fltac_ray.server.server import Server

    vectors = snapshot.adapters
    server = Server(config, resolve_algorithm(config.algorithm), AdapterSpec((("adapter", (vectors.shape[1],)),)))
    server.set_initial(start[None, :])
    keys = [(int(c), int(s)) for c, s in zip(snapshot.clients, snapshot.slots, strict=True)]
    uploads = [Upload(key, vectors[row], 1) for row, key in enumerate(keys)]  # uniform weighting
    server.receive(1, 0, PassResult(uploads, keys, vectors), None)
    outcome = server.close_round(1, keys, len({k[0] for k in keys}), dict(zip(keys, snapshot.tasks, strict=True)))
    return {**outcome.audit, "screened": len(outcome.screened)}


def bench_attacks(quick: bool) -> dict:
    """Adversarial clients against FL-TAC: 3 of 33 clients attack (federation.attack, scale 10)
    and each rule aggregates round 1. Two engine runs give the uploads: one with no attacker
    (sign_flip, scaling and random are applied to the malicious clients' honest uploads exactly
    as their workers would: attacks.Attack.tamper) and one with cross_task attackers (which train
    on another task's data). Each (attack, rule) cell replays the server's round on them;
    one cell is checked against a full engine run."""
    from fltac_ray.runs.checkpoint import latest_checkpoint
    from fltac_ray.runs.snapshots import read_snapshots
    from fltac_ray.server.attacks import Attack

    folder = Path(tempfile.mkdtemp(prefix="fltac-bench-attacks-"))
    fraction = 3 / 33
    runs = {}
    for kind in ("none", "cross_task"):
        attack = {"kind": kind, "fraction": fraction} if kind != "none" else {}
        config = attack_experiment(quick, f"attack_{kind}", folder, attack=attack)
        result = run_engine(config)
        checkpoint = latest_checkpoint(result.run_dir / "checkpoints")
        runs[kind] = (read_snapshots(result.run_dir)[0], checkpoint.groups["server"]["initial"][0], result)
    say(f"[attacks] 3 of 33 clients malicious (scale 10), {config.model.name}, 3 tasks, round 1; honest "
        "aggregate error in units of the round's honest update / clustering accuracy of honest uploads")
    table: dict[str, dict[str, dict]] = {}
    for kind in ATTACKS:
        table[kind] = {}
        for rule, federation in DEFENCES.items():
            attack = {"kind": "scaling" if kind == "none" else kind, "fraction": 0.0 if kind == "none" else fraction}
            config = attack_experiment(quick, "replay", folder, attack=attack, **federation)
            snapshot, start, _ = runs["cross_task" if kind == "cross_task" else "none"]
            snapshot = attacked_uploads(snapshot, Attack.from_config(config))
            table[kind][rule] = replay_round(config, snapshot, start)
        say(f"  {kind:<11} " + "  ".join(
            f"{rule}: {cell['honest_aggregate_error']:.3f} / {cell['honest_clustering_accuracy']:.2f}"
            for rule, cell in table[kind].items()))
    # the replay is the engine's round: one full run of a cell gives the same figures
    check = attack_experiment(quick, "attack_check", folder, attack={"kind": "sign_flip", "fraction": fraction},
                              **DEFENCES["neighbours screen"])
    row = run_engine(check).rounds.iloc[0]
    cell = table["sign_flip"]["neighbours screen"]
    same = bool(np.isclose(row["honest_aggregate_error"], cell["honest_aggregate_error"], rtol=1e-6)
                and row["honest_clustering_accuracy"] == cell["honest_clustering_accuracy"])
    say(f"  engine run of sign_flip x neighbours screen: error {row['honest_aggregate_error']:.3f}, clustering "
        f"{row['honest_clustering_accuracy']:.2f}, {int(row['screened_uploads'])} screened; equal to the replay: {same}")
    return {"table": table, "engine_check_equal": same}


def attacked_uploads(snapshot, attack):
    """The snapshot's uploads as malicious clients would send them (cross_task's are already
    poisoned: they trained on it)."""
    from dataclasses import replace

    adapters = snapshot.adapters.copy()
    if attack is not None and attack.kind != "cross_task":
        for row, (client, slot) in enumerate(zip(snapshot.clients, snapshot.slots, strict=True)):
            if attack.targets(int(client)):
                adapters[row] = attack.tamper(adapters[row], 1, (int(client), int(slot)))
    return replace(snapshot, adapters=adapters)


# scale first: its memory figures count this process as the driver, before other sections load
# models and data into it
SECTIONS = {"scale": bench_scale, "partial": bench_partial, "memory": bench_memory, "loop": bench_loop,
            "layout": bench_layout, "batched": bench_batched, "mfu": bench_mfu, "precision": bench_precision, "kmeans": bench_kmeans,
            "multinode": bench_multinode, "sweep": bench_sweep, "attacks": bench_attacks, "privacy": bench_privacy,
            "ranks": bench_ranks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (checks the suite)")
    parser.add_argument("--out", default="runs/benchmarks", help="folder for results.json")
    parser.add_argument("--sizes", default=None, help="scale: comma-separated client counts (default 10,100,500,1000)")
    parser.add_argument("--multinode-child", choices=["single", "cluster"], help=argparse.SUPPRESS)
    parser.add_argument("--run-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_child:
        return child_run(args.run_child)
    if args.multinode_child:
        return multinode_child(args.quick, args.multinode_child)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")  # 127.0.0.1 only
    import torch
    from transformers.utils import logging as hf_logging

    from fltac_ray.client.precision import cpu_bfloat16_native
    from fltac_ray.environment import cpu

    hf_logging.disable_progress_bar()  # the sections load models many times: their bars are noise
    found = cpu()
    machine = {"cpus": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
               "cpu_model": found["model"], "cpu_extensions": found["extensions"],
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bfloat16": cpu_bfloat16_native()}
    say(f"fltac-ray benchmarks on {machine['cpus']} CPUs ({machine['cpu_model']}, {machine['cpu_extensions']}; "
        f"torch's CPU capability {machine['cpu_capability']}"
        f"{', native bfloat16' if machine['native_bfloat16'] else ''}), "
        f"{machine['memory_gib']:.0f} GiB"
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
