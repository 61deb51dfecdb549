"""fltac-ray on one GPU: the figures issue 16 asks for, in one command (~8 minutes on one GPU).

    python benchmarks/gpu.py             # on a machine with a CUDA GPU (and cuML for the K-means line)
    python benchmarks/gpu.py --dry-run   # on the CPU with tiny models and sizes: checks the script (CI)

Sections, in order
  adapters   batched vs one-by-one LoRA training of 8 / 32 / 128 adapters on SmolLM2-135M
             (Llama architecture; causal-LM loss on response tokens, length 64, batch 8, 3 steps):
             seconds per step, and each pass's peak torch.cuda.max_memory_allocated against the
             planner's estimate (engine/gpu_fit.py: bytes per example measured on the longest
             examples x the pass's examples).
  precision  the same batched step with the base in float32 and in bfloat16.
  placement  the engine on this GPU with one worker (engine.gpus_per_worker: 1, the default) and
             with 4 fractional workers (0.25 each, 4 base copies): seconds per round and the GPU's
             peak used memory (all processes, sampled).
  kmeans     cuML against scikit-learn K-means (K = 4) on 1,000 and 10,000 adapters.
  mirror     one end-to-end round of the instruction mirror (experiments/mirror_instruction.yaml,
             SmolLM2-135M) on the engine, with evaluation.
Results go to <out>/gpu.json as well as the terminal. Ray runs on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fltac_ray.config import build_config, load_config  # noqa: E402
from fltac_ray.data.federated import EncodedSplit  # noqa: E402

MIB = 2 ** 20


def say(text: str = "") -> None:
    print(text, flush=True)


class Setup:
    """What every section shares: the device, the model name and the sizes (dry run: tiny)."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
        self.model = "tiny-random-llama" if dry else "smollm2-135m"
        self.counts = (2, 4) if dry else (8, 32, 128)
        self.kmeans_sizes = (200, 500) if dry else (1_000, 10_000)
        self.batch, self.length, self.steps = 8, 64, 3

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def instruction_split(count: int, length: int, seed: int) -> EncodedSplit:
    """Token-id instruction examples (prompt then response) of 24..length tokens: the shapes of
    the instruction mirror's data, drawn without a tokenizer."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(24, length + 1, count).astype(np.int32)
    ids = rng.integers(10, 30_000, (count, length)).astype(np.int32)
    prompts = (lengths * rng.uniform(0.3, 0.6, count)).astype(np.int32)
    return EncodedSplit({"input_ids": ids, "lengths": lengths, "prompt_lengths": prompts}, np.zeros(count, np.int64))


def build_model(setup: Setup, dtype: torch.dtype):
    from fltac_ray.config import ModelConfig
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone

    config = ModelConfig(name=setup.model, lora={"rank": 1, "target_modules": ["q_proj", "v_proj"]})
    encoder = load_backbone(setup.model, "causal_lm", dtype=dtype)
    return AdapterModel(encoder, config, 0, seed=0, modality="causal_lm").to(setup.device)


def synchronize(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.synchronize()


def jobs_for(model, setup: Setup, count: int, split: EncodedSplit):
    from fltac_ray.batched_training import AdapterJob

    start = model.get_adapter()
    return [AdapterJob(start, split, np.arange(j * 16, j * 16 + 16) % len(split.labels), 0, setup.steps,
                       np.random.default_rng(j)) for j in range(count)]


def bench_adapters(setup: Setup) -> dict:
    from fltac_ray.batched_training import measure_bytes_per_example, train_batched
    from fltac_ray.training import train_adapter

    say(f"[adapters] {setup.model} on {setup.device}, batch {setup.batch}, up to {setup.length} tokens, "
        f"{setup.steps} steps")
    model = build_model(setup, torch.bfloat16 if setup.cuda else torch.float32)
    split = instruction_split(4096, setup.length, seed=0)
    longest = np.argsort(-split.inputs["lengths"], kind="stable")[:4]
    per_example = (measure_bytes_per_example(model, split, np.sort(longest), 0, setup.device)
                   if setup.cuda else None)
    out = {"bytes_per_example": per_example}
    train_batched(model, jobs_for(model, setup, 1, split), setup.batch, 1e-3, 0.0, setup.device)  # warm-up
    for count in setup.counts:
        jobs = jobs_for(model, setup, count, split)
        if setup.cuda:
            torch.cuda.reset_peak_memory_stats()
            resting = torch.cuda.memory_allocated()
        synchronize(setup)
        began = time.perf_counter()
        train_batched(model, jobs, setup.batch, 1e-3, 0.0, setup.device)
        synchronize(setup)
        batched = (time.perf_counter() - began) / setup.steps
        peak = torch.cuda.max_memory_allocated() - resting if setup.cuda else None
        one = jobs[: min(count, 8)]  # one-by-one on a sample of the jobs (it scales linearly)
        began = time.perf_counter()
        for j, job in enumerate(one):
            train_adapter(model, job.start, job.split, job.indices, 0, job.steps, setup.batch, 1e-3, 0.0,
                          np.random.default_rng(j), setup.device)
        synchronize(setup)
        single = (time.perf_counter() - began) / setup.steps * count / len(one)
        row = {"batched_step_s": batched, "one_by_one_step_s": single, "speedup": single / batched,
               "peak_bytes": peak, "estimate_bytes": per_example * count * setup.batch if per_example else None}
        out[str(count)] = row
        memory = (f"; pass peak {peak / MIB:,.0f} MiB vs planner estimate {row['estimate_bytes'] / MIB:,.0f} MiB"
                  if peak is not None else "; memory: n/a on the CPU")
        say(f"  {count} adapters: batched {batched * 1000:.0f} ms/step, one by one {single * 1000:.0f} ms/step, "
            f"RATIO batched speedup = {single / batched:.1f}x{memory}")
    return out


def bench_precision(setup: Setup) -> dict:
    from fltac_ray.batched_training import train_batched

    count = setup.counts[-2] if len(setup.counts) > 2 else setup.counts[-1]
    say(f"[precision] batched step of {count} adapters, float32 vs bfloat16 base")
    split, out = instruction_split(2048, setup.length, seed=1), {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(setup, dtype)
        jobs = jobs_for(model, setup, count, split)
        train_batched(model, jobs[:1], setup.batch, 1e-3, 0.0, setup.device)
        synchronize(setup)
        began = time.perf_counter()
        outcomes = train_batched(model, jobs, setup.batch, 1e-3, 0.0, setup.device)
        synchronize(setup)
        name = str(dtype).removeprefix("torch.")
        out[name] = {"step_s": (time.perf_counter() - began) / setup.steps,
                     "loss": float(np.mean([o.mean_loss for o in outcomes]))}
        say(f"  {name}: {out[name]['step_s'] * 1000:.0f} ms/step, mean loss {out[name]['loss']:.4f}")
        del model
    say(f"  RATIO bfloat16/float32 step time = {out['bfloat16']['step_s'] / out['float32']['step_s']:.2f}")
    return out


class GpuMemory:
    """The GPU's used memory (every process on it), sampled on a thread: its peak."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak, self._stop = cuda, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.cuda and not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_quietly(config):
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    return Simulation(config, progress=Progress(quiet=True)).run()


def bench_placement(setup: Setup) -> dict:
    say("[placement] the engine on one GPU: 1 worker (gpus_per_worker 1) vs 4 fractional workers (0.25)")
    raw = {"name": "gpu_placement", "rounds": 2, "output_dir": tempfile.mkdtemp(prefix="fltac-gpu-"),
           "data": {"tasks": ["synthetic_sentiment", "synthetic_topic", "synthetic_tense"],
                    "num_clients": 8 if setup.dry else 64, "train_per_task": 2000, "test_per_task": 200},
           "model": {"name": "tiny-random-bert" if setup.dry else "minilm"},
           "train": {"local_steps": 2 if setup.dry else 10, "batch_size": 16},
           "engine": {"checkpoint_every": 0, "metrics": False, "cpus_per_worker": min(1.0, (os.cpu_count() or 1) / 4),
                      **({"num_gpus": 1} if setup.dry else {})}}  # dry run: the GPU Ray was declared
    out = {}
    for label, share, workers in (("1 worker", 1.0, 1), ("4 fractional workers", 0.25, 4)):
        raw["engine"].update(gpus_per_worker=share, num_workers=workers)
        memory = GpuMemory(setup.cuda)
        result = run_quietly(build_config(raw))
        peak = memory.stop()
        seconds = float(result.rounds["seconds"].iloc[-1])
        adapters = int(result.rounds["adapters"].iloc[-1])
        out[label] = {"seconds": seconds, "adapters_per_s": adapters / seconds, "gpu_peak_bytes": peak}
        used = f", GPU peak used {peak / MIB:,.0f} MiB" if setup.cuda else ""
        say(f"  {label}: round 2 {seconds:.1f} s ({adapters / seconds:.1f} adapters/s){used}")
    return out


def bench_kmeans(setup: Setup) -> dict:
    from fltac_ray.clustering import _cuml_usable, kmeans_labels

    say(f"[kmeans] K = 4, n_init 10, {64 if setup.dry else 4096:,}-dimensional adapters in 4 clusters")
    rng, out = np.random.default_rng(0), {}
    usable = _cuml_usable()
    for n in setup.kmeans_sizes:
        centres = rng.normal(size=(4, 4096 if not setup.dry else 64)).astype(np.float32)
        vectors = centres[rng.integers(0, 4, n)] + rng.normal(0, 0.5, (n, centres.shape[1])).astype(np.float32)
        row = {}
        for backend in ("sklearn", "cuml") if usable else ("sklearn",):
            began = time.perf_counter()
            kmeans_labels(vectors, 4, seed=0, n_init=10, backend=backend)
            row[backend] = time.perf_counter() - began
        out[str(n)] = row
        cuml = f", cuML {row['cuml']:.2f} s" if "cuml" in row else ", cuML: not installed or no GPU"
        say(f"  {n:,} adapters: scikit-learn {row['sklearn']:.2f} s{cuml}")
    return out


def bench_mirror(setup: Setup) -> dict:
    overrides = ["rounds=1", f"output_dir={tempfile.mkdtemp(prefix='fltac-gpu-')}", "engine.metrics=false",
                 "engine.checkpoint_every=0"]
    if setup.dry:
        overrides += ["model.name=tiny-random-llama", "data.num_clients=4", "data.train_per_task=40",
                      "data.test_per_task=8", "train.local_steps=1", "train.max_new_tokens=4"]
    config = load_config(ROOT / "experiments" / "mirror_instruction.yaml", overrides)
    if not Path(config.data.wordnet_dir, "data.noun").is_file():
        say("[mirror] skipped: WordNet data not installed (apt-get install wordnet-base)")
        return {"skipped": "no WordNet"}
    say(f"[mirror] one round of the instruction mirror on {config.model.name}, {config.data.num_clients} clients")
    memory = GpuMemory(setup.cuda)
    result = run_quietly(config)
    peak = memory.stop()
    final = result.metrics
    out = {"seconds": float(result.rounds["seconds"].iloc[0]), "gpu_peak_bytes": peak,
           "rouge_l": float(final["rouge_l"].mean()) if "rouge_l" in final else None}
    say(f"  round 1: {out['seconds']:.1f} s" + (f", GPU peak used {peak / MIB:,.0f} MiB" if setup.cuda else "")
        + (f", ROUGE-L {out['rouge_l']:.3f}" if out["rouge_l"] is not None else ""))
    return out


SECTIONS = {"adapters": bench_adapters, "precision": bench_precision, "placement": bench_placement,
            "kmeans": bench_kmeans, "mirror": bench_mirror}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes (checks the script)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--out", default="runs/benchmarks", help="folder for gpu.json")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    setup = Setup(args.dry_run)
    if not setup.cuda and not setup.dry:
        parser.error("no CUDA GPU here; use --dry-run to check the script on the CPU")
    import ray

    # the driver reserves nothing; the Ray we start sees this machine's GPU (or one declared in a dry run)
    ray.init(num_cpus=os.cpu_count(), num_gpus=None if setup.cuda else 1, include_dashboard=False,
             logging_level="ERROR")
    name = torch.cuda.get_device_name() if setup.cuda else "CPU (dry run: tiny models, one declared GPU)"
    say(f"fltac-ray GPU benchmarks on {name}")
    results: dict = {"device": name, "dry_run": setup.dry}
    try:
        for section in chosen:
            began = time.perf_counter()
            results[section] = SECTIONS[section](setup)
            say(f"  ({section}: {time.perf_counter() - began:.0f} s)")
            if setup.cuda:
                torch.cuda.empty_cache()  # this process's models are gone: the next section's workers get the GPU
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=float))
    say(f"results: {out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
