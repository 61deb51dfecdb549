"""Precision of the frozen base (model.dtype), fp16 loss scaling, and the memory-saving paths:
per-bucket backward, gradient checkpointing, response-only LM logits. All on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fltac_ray.client.batched_training import AdapterJob, _accumulate_step, train_batched
from fltac_ray.client.precision import LossScale, gpu_itemsize, resolve_dtype
from fltac_ray.client.training import train_adapter
from fltac_ray.config import ModelConfig
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.builders import load_backbone
from fltac_ray.models.multi_adapter import StackedAdapters
from tests.test_batched import _jobs, _no_dropout, _text_split

CPU = torch.device("cpu")


def _model(name: str = "tiny-random-bert", modality: str = "text", dtype=None, head_classes: int = 4,
           **options) -> AdapterModel:
    config = ModelConfig(name=name, lora={"rank": 2, "dropout": 0.0}, **options)
    encoder = load_backbone(name, modality, dtype=dtype)
    model = _no_dropout(AdapterModel(encoder, config, head_classes, seed=0, modality=modality))
    model.initial = model.get_adapter()
    return model


def test_auto_is_float32_on_the_cpu_and_names_are_taken_as_given():
    assert resolve_dtype("auto", CPU) is torch.float32
    assert resolve_dtype("bfloat16", CPU) is torch.bfloat16
    assert resolve_dtype("float16", CPU) is torch.float16


def test_loss_scale_follows_gradscalers_rule():
    scale = LossScale(enabled=True, init_scale=8.0, growth_interval=2)
    param = torch.zeros(3, requires_grad=True)
    param.grad = torch.tensor([8.0, 16.0, -4.0])
    assert scale.unscale([param]) is True
    assert param.grad.tolist() == [1.0, 2.0, -0.5]
    scale.update(True)
    assert scale.scale == 8.0  # one clean step of the 2 needed to grow
    scale.update(True)
    assert scale.scale == 16.0
    param.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert scale.unscale([param]) is False
    scale.update(False)
    assert (scale.scale, scale.skipped, scale.clean_steps) == (8.0, 1, 0)
    off = LossScale.for_dtype(torch.bfloat16)
    assert off.scale == 1.0 and off.unscale([param]) is True  # bfloat16: never scaled, never skipped


def test_a_bfloat16_base_keeps_adapters_head_and_optimizer_in_float32_and_learns_like_float32():
    split = _text_split(40, 4, seed=3)
    indices = np.arange(40)
    outcomes = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype=dtype)
        base = [p for n, p in model.encoder.named_parameters() if "lora_" not in n]
        assert {p.dtype for p in base} == {dtype}
        assert {p.dtype for p in model.adapter_parameters()} == {torch.float32}  # LoRA A/B and head
        outcomes[dtype] = train_adapter(model, model.initial, split, indices, 4, 8, 8, 1e-2, 0.0,
                                        np.random.default_rng(0), CPU)
    full, half = outcomes[torch.float32], outcomes[torch.bfloat16]
    assert half.adapter.dtype == np.float32 and np.isfinite(half.adapter).all()
    assert not np.array_equal(half.adapter, full.adapter)  # really computed in bfloat16
    assert half.mean_loss == pytest.approx(full.mean_loss, rel=1e-3)
    # bfloat16 keeps 8 bits of mantissa; Adam's normalised steps amplify that on the entries with
    # tiny gradients, so the 8 steps' update agrees in direction, to ~8% of its norm (measured)
    full_step, half_step = full.adapter - model.initial, half.adapter - model.initial
    assert np.linalg.norm(half_step - full_step) < 0.2 * np.linalg.norm(full_step)


def test_batched_training_in_bfloat16_matches_one_by_one_in_bfloat16():
    model = _model(dtype=torch.bfloat16)
    jobs = _jobs(model, [(_text_split(30, 4, 1), 4), (_text_split(30, 3, 2), 3)], steps=[4, 3])
    batched = train_batched(model, jobs, 4, 1e-2, 0.0, CPU)
    for j, (job, outcome) in enumerate(zip(jobs, batched, strict=True)):
        single = train_adapter(model, job.start, job.split, job.indices, job.num_classes, job.steps, 4, 1e-2, 0.0,
                               np.random.default_rng([1, j]), CPU)
        assert outcome.mean_loss == pytest.approx(single.mean_loss, rel=1e-2)
        step, single_step = outcome.adapter - job.start, single.adapter - job.start
        assert np.linalg.norm(step - single_step) < 0.2 * np.linalg.norm(single_step)


def test_a_float16_base_trains_with_loss_scaling_on_the_cpu():
    model = _model(dtype=torch.float16)
    split = _text_split(40, 4, seed=3)
    first = train_adapter(model, model.initial, split, np.arange(40), 4, 1, 8, 1e-2, 0.0,
                          np.random.default_rng(0), CPU)
    trained = train_adapter(model, model.initial, split, np.arange(40), 4, 12, 8, 1e-2, 0.0,
                            np.random.default_rng(0), CPU)
    assert np.isfinite(trained.adapter).all() and not np.array_equal(trained.adapter, model.initial)
    assert trained.mean_loss < first.mean_loss + 0.05  # it trains; no overflowed step ran
    jobs = _jobs(model, [(split, 4), (split, 4)], steps=[3, 3])
    assert all(np.isfinite(o.adapter).all() for o in train_batched(model, jobs, 4, 1e-2, 0.0, CPU))


def test_every_model_family_trains_and_evaluates_in_bfloat16():
    """Images (ViT, EfficientNet), vectors (MLP), FLoRAL's mixtures and causal LMs: batched where
    they batch, one by one otherwise, and evaluation, all with a bfloat16 base."""
    from fltac_ray.algorithms.floral import FloralOptions as FloralConfig
    from fltac_ray.client.training import evaluate_adapter
    from fltac_ray.data.federated import EncodedSplit

    rng = np.random.default_rng(0)
    images = EncodedSplit({"pixels": rng.integers(0, 255, (16, 3, 32, 32)).astype(np.uint8)}, rng.integers(0, 4, 16))
    vectors = EncodedSplit({"features": rng.normal(size=(16, 6)).astype(np.float32)}, rng.integers(0, 4, 16))
    cases = [("tiny-random-vit", "image", images, {}), ("efficientnet-lite0", "image", images, {"image_size": 64}),
             ("random-mlp", "vector", vectors, {"feature_dim": 6}), ("tiny-random-bert", "text", _text_split(16, 4, 1), {}),
             ("tiny-random-llama", "causal_lm", _causal_split(16, 2), {})]
    for name, modality, split, extra in cases:
        classes = 0 if modality == "causal_lm" else 4
        config = ModelConfig(name=name, lora={"rank": 2, "dropout": 0.0}, image_size=extra.get("image_size"))
        options = {"floral": FloralConfig(), "num_adaptors": 2} if name == "tiny-random-bert" else {}
        encoder = load_backbone(name, modality, dtype=torch.bfloat16, feature_dim=extra.get("feature_dim", 16))
        model = AdapterModel(encoder, config, classes, seed=0, modality=modality, **options)
        start = model.get_adapter()
        trained = train_adapter(model, start, split, np.arange(16), classes, 2, 4, 1e-2, 0.0,
                                np.random.default_rng(0), CPU)
        assert np.isfinite(trained.adapter).all() and not np.array_equal(trained.adapter, start), name
        scores = evaluate_adapter(model, trained.adapter, split, np.arange(16), classes, 8, CPU)
        assert np.isfinite(scores.loss_sum) and scores.count == 16, name
        if not options:  # FLoRAL trains one adapter at a time
            job = AdapterJob(start, split, np.arange(16), classes, 2, np.random.default_rng(0))
            assert np.isfinite(train_batched(model, [job], 4, 1e-2, 0.0, CPU)[0].adapter).all(), name


def _causal_split(n: int, seed: int):
    from fltac_ray.data.federated import EncodedSplit

    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 15, n).astype(np.int32)
    ids = rng.integers(5, 200, (n, 16)).astype(np.int32)
    prompts = np.minimum(rng.integers(2, 6, n), lengths - 1).astype(np.int32)
    return EncodedSplit({"input_ids": ids, "lengths": lengths, "prompt_lengths": prompts}, np.zeros(n, np.int64))


def test_response_logits_equal_the_whole_vocabulary_path_on_scored_positions():
    model = _model("tiny-random-llama", "causal_lm", head_classes=0)
    split = _causal_split(6, seed=4)
    inputs = {k: torch.from_numpy(v) for k, v in split.inputs.items()}
    losses, correct, scored = model.lm_token_scores(**inputs)
    width = int(inputs["lengths"].max())
    ids = inputs["input_ids"][:, :width].long()
    mask = (torch.arange(width)[None, :] < inputs["lengths"][:, None]).long()
    logits = model.encoder(input_ids=ids, attention_mask=mask).logits[:, :-1]  # every position
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="none").view(ids[:, 1:].shape)
    torch.testing.assert_close(losses[scored], expected[scored], atol=1e-5, rtol=1e-5)
    assert bool((losses[~scored] == 0).all()) and not bool(correct[~scored].any())
    assert torch.equal(correct[scored], (logits.argmax(-1) == ids[:, 1:])[scored])


@pytest.mark.parametrize("modality", ["text", "causal_lm"])
def test_backward_per_length_bucket_gives_the_gradients_of_one_graph(monkeypatch, modality):
    """Each bucket's backward frees its graph; the accumulated gradients equal those of one
    forward/backward over the whole combined batch (to float rounding: padding widths differ)."""
    import fltac_ray.client.batched_training as batched
    from fltac_ray.data.federated import EncodedSplit

    rng = np.random.default_rng(3)
    if modality == "text":
        model = _model()
        # short examples for one job, long ones for the other: two length buckets
        splits = [EncodedSplit({"input_ids": rng.integers(5, 200, (12, 24)).astype(np.int32),
                                "lengths": np.full(12, width, np.int32)}, rng.integers(0, 4, 12))
                  for width in (3, 24)]
        classes = 4
    else:
        model = _model("tiny-random-llama", "causal_lm", head_classes=0)
        splits, classes = [_causal_split(12, j) for j in range(2)], 0
    jobs = [AdapterJob(model.initial + rng.normal(0, 0.05, model.adapter_size).astype(np.float32),
                       split, np.arange(12), classes, 1, np.random.default_rng(j)) for j, split in enumerate(splits)]
    chosen = [np.arange(len(job.indices))[:8] for job in jobs]
    starts = np.stack([job.start for job in jobs])
    model.train()

    def gradients() -> list[torch.Tensor]:
        stacked = StackedAdapters(model, starts, CPU)
        means = _accumulate_step(model, stacked, jobs, chosen, CPU)
        return [p.grad.clone() for p in stacked.parameters()], means

    per_bucket, means = gradients()
    positions = batched.bucket_positions(
        batched.combine_inputs([(job.split, c) for job, c in zip(jobs, chosen, strict=True)]), 16, CPU)
    assert len(positions) > 1  # the lengths really split into several buckets
    monkeypatch.setattr(batched, "bucket_positions", lambda combined, count, device: [np.arange(count)])
    one_graph, one_means = gradients()
    for got, want in zip(per_bucket, one_graph, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(means, one_means, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_changes_memory_not_results():
    split = _text_split(40, 4, seed=5)
    outcomes = []
    for checkpointing in (False, True):
        model = _model(gradient_checkpointing=checkpointing)
        assert model.encoder.base_model.model.is_activation_checkpointing is checkpointing
        outcomes.append(train_adapter(model, model.initial, split, np.arange(40), 4, 4, 8, 1e-2, 0.0,
                                      np.random.default_rng(0), CPU))
    np.testing.assert_allclose(outcomes[0].adapter, outcomes[1].adapter, atol=1e-6)
    assert outcomes[0].mean_loss == pytest.approx(outcomes[1].mean_loss, abs=1e-6)


@pytest.mark.usefixtures("ray_cluster")
def test_a_bfloat16_run_gives_the_same_results_on_ray_and_in_process(tmp_path):
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress
    from tests.conftest import tiny_config
    from tests.test_backends import _same

    def run(name: str, **engine):
        config = tiny_config(model={"dtype": "bfloat16"}, engine=engine)
        return Simulation(config, out=str(tmp_path / name), progress=Progress(quiet=True)).run()

    local = run("local", backend="local", min_passes=2)
    on_ray = run("ray", num_workers=2)
    _same(local, on_ray)
    assert "dtype: bfloat16" in (on_ray.run_dir / "config.yaml").read_text()
    float32 = Simulation(tiny_config(engine={"num_workers": 2}), out=str(tmp_path / "fp32"),
                         progress=Progress(quiet=True)).run()
    assert not np.array_equal(float32.metrics["loss"], on_ray.metrics["loss"])  # really bfloat16


@pytest.mark.slow
def test_minilm_learns_every_offline_task_in_bfloat16(tmp_path):
    from pathlib import Path

    from fltac_ray.client.precision import cpu_bfloat16_native
    from fltac_ray.config import load_config
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    if not cpu_bfloat16_native():
        # ~280 s here for a check of learning, not of the code path: the tiny model's bfloat16
        # runs above cover the path on every CPU (both backends, equal results)
        pytest.skip("this CPU emulates bfloat16 (no AVX-512 BF16 or AMX): MiniLM's bfloat16 learning "
                    "check runs where it is native")
    experiment = Path(__file__).parents[1] / "experiments" / "offline_text.yaml"
    # sized when it ran emulated on AVX2 (~1.4 s per step of 8 examples there): the
    # federation is small: 4 clients, 9 adapters, 10 steps each per round at a higher lr; the
    # margins over the majority class were 0.29, 0.15 and 0.39 (AVX2, 2 cores)
    config = load_config(experiment, ["rounds=2", "model.dtype=bfloat16", "engine.backend=local",
                                      "engine.cpus_per_worker=2", "data.num_clients=4", "data.train_per_task=600",
                                      "data.test_per_task=150", "data.max_length=16", "train.local_steps=10",
                                      "train.lr=5e-3"])
    if not Path(config.data.wordnet_dir, "data.noun").is_file():
        pytest.skip("WordNet data not installed (apt-get install wordnet-base); CI installs it")
    result = Simulation(config, out=str(tmp_path / "run"), progress=Progress(quiet=True)).run()
    final = result.metrics[result.metrics["round"] == 2]
    assert len(final) == 3
    for row in final.itertuples():
        assert row.accuracy > row.majority_accuracy + 0.05, row


def test_auto_is_bfloat16_only_where_the_gpu_computes_it_natively(monkeypatch):
    """T4 (7.5) and V100 (7.0) emulate bfloat16 (torch.cuda.is_bf16_supported says yes): float16
    with loss scaling there; Ampere (8.0) and Hopper (9.0) get bfloat16."""
    cuda = torch.device("cuda")
    for capability, expected in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                 ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        assert resolve_dtype("auto", cuda) is expected, capability
        # the planner's size per float, before any GPU is seen, agrees with what the worker picks
        assert gpu_itemsize("auto") == expected.itemsize
    assert resolve_dtype("float32", cuda) is torch.float32  # asked for: as given
    assert [gpu_itemsize(name) for name in ("float32", "bfloat16", "float16")] == [4, 2, 2]


def test_an_overflowed_adapter_skips_its_own_step_and_counts_its_own_steps():
    """Two stacked rows; row 1's gradient overflows in step 1: row 0 steps as torch's AdamW, row 1
    is untouched and its next step is its optimizer's first (bias correction of step 1)."""
    from fltac_ray.client.batched_training import BatchedAdamW

    start = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    stacked = start.clone().requires_grad_(True)
    optimizer = BatchedAdamW([stacked], lr=0.1, weight_decay=0.01)
    scale = LossScale(enabled=True, init_scale=4.0)
    grads = [torch.tensor([[0.4, -0.8], [float("inf"), 1.0]]), torch.tensor([[0.2, 0.2], [0.6, -0.2]])]
    reference = [start[0].clone().requires_grad_(True), start[1].clone().requires_grad_(True)]
    torch_adam = [torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) for p in reference]
    for step, grad in enumerate(grads):
        stacked.grad = grad * scale.scale
        finite = scale.finite_rows([stacked], active=2)
        assert finite.tolist() == ([True, False] if step == 0 else [True, True])
        optimizer.step(2, take=None if finite.all() else finite)
        scale.update(bool(finite.all()), int((~finite).sum()))
        for row in range(2):
            if finite[row]:
                reference[row].grad = grad[row].clone()
                torch_adam[row].step()
    assert optimizer.row_steps.tolist() == [2, 1]
    assert (scale.skipped, scale.scale) == (1, 2.0)  # halved once, one adapter step skipped
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in reference]))


def test_the_workers_loss_scale_lives_across_passes_and_counts_skipped_steps():
    """A scale too large for float16: every step of the first pass overflows and is skipped
    (adapters unchanged, halving each time); the next pass starts from the scale it reached,
    not from 2^16 again."""
    model = _model(dtype=torch.float16)
    split = _text_split(40, 4, seed=3)
    jobs = _jobs(model, [(split, 4), (split, 4)], steps=[3, 3])
    scale = LossScale(enabled=True, init_scale=2.0 ** 100)
    outcomes = train_batched(model, jobs, 4, 1e-2, 0.0, CPU, scaling=scale)
    assert [o.skipped_steps for o in outcomes] == [3, 3] and scale.skipped == 6
    assert all(np.array_equal(o.adapter, job.start) for o, job in zip(outcomes, jobs, strict=True))
    assert scale.scale == 2.0 ** 97
    one = train_adapter(model, jobs[0].start, split, np.arange(40), 4, 2, 8, 1e-2, 0.0,
                        np.random.default_rng(0), CPU, scaling=scale)
    assert one.skipped_steps == 2 and scale.scale == 2.0 ** 95 and scale.skipped == 8


def test_deterministic_mode_switches_torchs_deterministic_algorithms_on(monkeypatch):
    from fltac_ray.client.precision import configure_cuda_math

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        configure_cuda_math(CPU, tf32=True, deterministic=False)
        assert torch.are_deterministic_algorithms_enabled() is before
        configure_cuda_math(CPU, tf32=True, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)


def test_the_routed_update_runs_in_the_passs_dtype_where_asked(monkeypatch):
    """On CUDA the routed LoRA update of a bfloat16 pass is computed in bfloat16 (no float32 copy
    of each layer's input kept for backward); the CPU keeps float32. The CUDA choice is forced
    here on the CPU's own bfloat16 autocast: the update's dtype follows, and batched training
    still agrees with one-by-one training."""
    import fltac_ray.models.multi_adapter as multi

    seen = []
    original = multi._routed_linear

    def recording(x, a, b, route):
        out = original(x, a, b, route)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(multi, "_routed_linear", recording)
    model = _model(dtype=torch.bfloat16)
    jobs = _jobs(model, [(_text_split(30, 4, 1), 4), (_text_split(30, 3, 2), 3)], steps=[3, 3])
    train_batched(model, jobs, 4, 1e-2, 0.0, CPU)
    assert set(seen) == {torch.float32}  # the CPU's choice
    seen.clear()
    monkeypatch.setattr(multi, "update_in_pass_dtype", lambda device: True)
    jobs = _jobs(model, [(_text_split(30, 4, 1), 4), (_text_split(30, 3, 2), 3)], steps=[3, 3])
    batched = train_batched(model, jobs, 4, 1e-2, 0.0, CPU)
    assert set(seen) == {torch.bfloat16}
    for j, (job, outcome) in enumerate(zip(jobs, batched, strict=True)):
        single = train_adapter(model, job.start, job.split, job.indices, job.num_classes, job.steps, 4, 1e-2, 0.0,
                               np.random.default_rng([1, j]), CPU)
        assert np.isfinite(outcome.adapter).all()
        assert outcome.mean_loss == pytest.approx(single.mean_loss, rel=2e-2)


def test_a_requested_bfloat16_on_a_cpu_that_emulates_it_is_named(monkeypatch):
    from fltac_ray.client import precision

    monkeypatch.setattr(precision, "cpu_bfloat16_native", lambda: False)
    note = precision.emulated_bfloat16_note("bfloat16", runs_on_cpu=True)
    assert note is not None and "torch emulates it, slower than float32; use model.dtype: auto" in note
    assert precision.emulated_bfloat16_note("auto", runs_on_cpu=True) is None  # auto stays float32 on a CPU
    assert precision.emulated_bfloat16_note("bfloat16", runs_on_cpu=False) is None  # a GPU's business
    monkeypatch.setattr(precision, "cpu_bfloat16_native", lambda: True)  # AVX-512 BF16 / AMX
    assert precision.emulated_bfloat16_note("bfloat16", runs_on_cpu=True) is None
