"""Example-level DP-SGD (privacy/dp_sgd.py): Poisson sampling, per-example clipping, seeded
noise, the batched path against the one-example-at-a-time path, and its accounting."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fltac_ray.algorithms.local_training import LocalTraining
from fltac_ray.client.batched_training import AdapterJob, train_batched
from fltac_ray.client.training import train_adapter
from fltac_ray.errors import ConfigError
from fltac_ray.privacy.accounting import calibrate_example_noise, example_epsilon, worst_exposures
from fltac_ray.privacy.dp_sgd import ExamplePrivacy, PoissonCursor, clip_per_example, privatize_sums
from fltac_ray.privacy.ledger import PrivacyLedger

from .conftest import tiny_config
from .test_batched import CPU, _model, _text_split

SGD = LocalTraining("sgd")


def test_poisson_sampling_draws_each_example_alone_at_rate_b_over_n():
    indices = np.arange(100, 300)
    cursor = PoissonCursor(indices, 20, np.random.default_rng(3))
    assert cursor.rate == pytest.approx(0.1)
    draws = [cursor.next() for _ in range(2000)]
    sizes = np.array([len(d) for d in draws])
    assert sizes.mean() == pytest.approx(20, rel=0.02) and sizes.min() < 20 < sizes.max()  # not a fixed size
    counts = np.bincount(np.concatenate(draws) - 100, minlength=200)
    assert counts.min() > 0.75 * 200 and counts.max() < 1.25 * 200  # every example at ~rate 0.1 of 2000 steps
    again = PoissonCursor(indices, 20, np.random.default_rng(3))
    assert all(np.array_equal(again.next(), d) for d in draws[:10])  # seeded
    assert PoissonCursor(np.arange(5), 16, np.random.default_rng(0)).rate == 1.0  # a small set: all, every step


def test_per_example_clipping_hand_computed():
    # two layout tensors, three examples; example norms 5, 0.5 and 0 over both tensors
    a = torch.tensor([[[3.0, 0.0]], [[0.3, 0.0]], [[0.0, 0.0]]])  # (3, 1, 2)
    b = torch.tensor([[4.0], [0.4], [0.0]])  # (3, 1)
    (ca, cb), norms = clip_per_example([a, b], [None, None], clip_norm=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5, 0.0])
    assert ca[0, 0].tolist() == pytest.approx([0.6, 0.0]) and cb[0].tolist() == pytest.approx([0.8])  # scaled to 1
    assert torch.equal(ca[1], a[1]) and torch.equal(cb[1], b[1])  # within the bound: as it was
    assert torch.equal(ca[2], a[2]) and torch.equal(cb[2], b[2])  # zero stays zero
    # frozen entries (FFA-LoRA's A) are out of the norm: only b counts, and a's gradient is dropped
    (fa, fb), frozen_norms = clip_per_example([a, b], [torch.zeros(1, 2), None], clip_norm=1.0)
    assert frozen_norms.tolist() == pytest.approx([4.0, 0.4, 0.0])
    assert fa.abs().sum() == 0 and fb[:, 0].tolist() == pytest.approx([1.0, 0.4, 0.0])


def test_the_noised_sum_is_sum_plus_sigma_c_xi_over_the_expected_batch():
    sums = [torch.ones(2, 3)]
    xi = [torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.0, 0.5]])]
    privatize_sums(sums, xi, ExamplePrivacy(clip_norm=0.5, noise_multiplier=2.0, expected_batch=4))
    np.testing.assert_allclose(sums[0].numpy(), [[0.5, 0.0, 0.25], [0.75, 0.25, 0.375]])  # (1 + 1.0 xi) / 4


def _private_jobs(model, splits, steps, noise_seed=9):
    rng = np.random.default_rng(7)
    jobs = []
    for j, ((split, classes), count) in enumerate(zip(splits, steps, strict=True)):
        start = model.initial + rng.normal(0, 0.05, model.adapter_size).astype(np.float32)
        indices = np.sort(rng.choice(len(split.labels), size=6 + 4 * j, replace=False))
        jobs.append(AdapterJob(start, split, indices, classes, count, np.random.default_rng([1, j]),
                               noise_rng=np.random.default_rng([noise_seed, j])))
    return jobs


def _private_one_by_one(model, jobs, batch_size, privacy, frozen=None, rule=None):
    return [train_adapter(model, job.start, job.split, job.indices, job.num_classes, job.steps, batch_size, 1e-2,
                          0.01, job.rng, CPU, frozen=frozen, rule=rule, privacy=privacy, noise_rng=job.noise_rng)
            for job in jobs]


def _assert_same(batched, single, starts):
    for b, s, start in zip(batched, single, starts, strict=True):
        np.testing.assert_allclose(b.adapter, s.adapter, atol=2e-6, rtol=1e-5)
        assert b.mean_loss == pytest.approx(s.mean_loss, rel=1e-5)
        assert np.abs(s.adapter - start).max() > 1e-3  # it trained


@pytest.mark.parametrize("noise", [0.0, 0.8])
def test_batched_dp_sgd_equals_one_example_at_a_time(noise):
    """Noise off and seeded noise on; uneven steps and class counts; clipping binding (C small)."""
    model = _model("tiny-random-bert", "text", head_classes=5)
    splits = [(_text_split(40, 2, 0), 2), (_text_split(40, 5, 1), 5), (_text_split(40, 3, 2), 3)]
    privacy = ExamplePrivacy(clip_norm=0.05, noise_multiplier=noise, expected_batch=4)
    single = _private_one_by_one(model, _private_jobs(model, splits, [5, 5, 3]), 4, privacy)
    jobs = _private_jobs(model, splits, [5, 5, 3])
    _assert_same(train_batched(model, jobs, 4, 1e-2, 0.01, CPU, privacy=privacy), single, [j.start for j in jobs])


def test_batched_dp_sgd_equals_one_by_one_with_frozen_entries_and_on_a_causal_lm():
    from fltac_ray.data.encoding import encode_instructions
    from fltac_ray.data.federated import EncodedSplit
    from fltac_ray.models.builders import eos_token_id, load_tokenizer

    model = _model("tiny-random-bert", "text", head_classes=3)
    splits = [(_text_split(30, 3, 4), 3), (_text_split(30, 2, 5), 2)]
    frozen = np.zeros(model.adapter_size, dtype=bool)
    frozen[: model.adapter_size // 3] = True  # a third held, as FFA-LoRA holds A
    privacy = ExamplePrivacy(clip_norm=0.1, noise_multiplier=0.5, expected_batch=4)
    single = _private_one_by_one(model, _private_jobs(model, splits, [3, 3]), 4, privacy, frozen)
    jobs = _private_jobs(model, splits, [3, 3])
    batched = train_batched(model, jobs, 4, 1e-2, 0.01, CPU, frozen=frozen, privacy=privacy)
    _assert_same(batched, single, [j.start for j in jobs])
    for outcome, job in zip(batched, jobs, strict=True):
        np.testing.assert_array_equal(outcome.adapter[frozen], job.start[frozen])

    lm = _model("tiny-random-llama", "causal_lm", head_classes=0)
    tokenizer = load_tokenizer("tiny-random-llama")
    lm_splits = []
    for task in range(2):
        prompts = [f"say {task} {i} " * (1 + i % 3) for i in range(12)]  # uneven lengths
        inputs = encode_instructions(tokenizer, prompts, [f"answer {i} {task} ok" for i in range(12)], 24,
                                     eos_token_id(tokenizer))
        lm_splits.append((EncodedSplit(inputs, np.zeros(12, np.int64)), 0))
    single = _private_one_by_one(lm, _private_jobs(lm, lm_splits, [2, 2]), 3, privacy)
    jobs = _private_jobs(lm, lm_splits, [2, 2])
    _assert_same(train_batched(lm, jobs, 3, 1e-2, 0.01, CPU, privacy=privacy), single, [j.start for j in jobs])


def test_without_noise_or_binding_clip_and_with_every_example_each_step_dp_sgd_is_plain_sgd():
    """q = 1 (batch size = the examples), C far above every gradient, sigma 0: the privatised
    gradient is the mean gradient of the whole set, so the per-example gradients sum right."""
    model = _model("tiny-random-bert", "text", head_classes=2)
    split = _text_split(12, 2, 6)
    start = model.initial + 0.05
    plain = train_adapter(model, start, split, np.arange(12), 2, 3, 12, 0.5, 0.0, np.random.default_rng(0), CPU,
                          rule=SGD)
    private = train_adapter(model, start, split, np.arange(12), 2, 3, 12, 0.5, 0.0, np.random.default_rng(0), CPU,
                            rule=SGD, privacy=ExamplePrivacy(1e6, 0.0, 12), noise_rng=np.random.default_rng(1))
    np.testing.assert_allclose(private.adapter, plain.adapter, atol=1e-6, rtol=1e-5)
    assert np.abs(plain.adapter - start).max() > 1e-3
    # a binding bound: one SGD step moves the adapter by at most lr * C * drawn / B
    clipped = train_adapter(model, start, split, np.arange(12), 2, 1, 12, 0.5, 0.0, np.random.default_rng(0), CPU,
                            rule=SGD, privacy=ExamplePrivacy(1e-3, 0.0, 12), noise_rng=np.random.default_rng(1))
    moved = float(np.linalg.norm(clipped.adapter - start))
    assert 0 < moved <= 0.5 * 1e-3 * 12 / 12 * (1 + 1e-5)


def test_example_epsilon_agrees_with_the_library_and_the_ledger_takes_the_worst_example():
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 300)
    assert example_epsilon(1.1, 0.05, 300, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert example_epsilon(1.1, 0.05, 300, 1e-5, "pld") < example_epsilon(1.1, 0.05, 300, 1e-5)  # PLD is tighter
    # dominated pairs leave the frontier: (0.1, 20) beats (0.05, 10) and (0.1, 5)
    assert worst_exposures([(0.05, 10), (0.1, 20), (0.1, 5), (0.02, 40)]) == [(0.1, 20), (0.02, 40)]
    settings = tiny_config(privacy={"mode": "example", "noise_multiplier": 1.2}).privacy
    schedule = [[0, 1], [0], [1, 2]]
    exposures = {0: [(0.1, 15), (0.2, 15)], 1: [(0.1, 15)], 2: [(0.5, 15)]}
    ledger = PrivacyLedger.plan(settings, schedule, 1, clients=3, exposures=exposures, examples=400)
    assert ledger.delta == 1 / 400
    by_hand = [example_epsilon(1.2, 0.2, 15, 1 / 400), example_epsilon(1.2, 0.2, 30, 1 / 400),
               max(example_epsilon(1.2, 0.2, 30, 1 / 400), example_epsilon(1.2, 0.5, 15, 1 / 400))]
    assert list(ledger.epsilons) == pytest.approx(by_hand, rel=1e-12)
    target = tiny_config(privacy={"mode": "example", "target_epsilon": 3.0}).privacy
    calibrated = PrivacyLedger.plan(target, schedule, 1, clients=3, exposures=exposures, examples=400)
    assert calibrated.epsilons[-1] == pytest.approx(3.0, rel=1e-3)
    assert calibrated.noise_multiplier == pytest.approx(max(calibrate_example_noise(3.0, 0.2, 30, 1 / 400),
                                                            calibrate_example_noise(3.0, 0.5, 15, 1 / 400)))


def test_float16_is_refused_with_dp_sgd():
    with pytest.raises(ConfigError, match=re.escape("privacy.mode example (DP-SGD) clips each example's")):
        tiny_config(privacy={"mode": "example", "noise_multiplier": 1.0}, model={"dtype": "float16"})


@pytest.mark.usefixtures("ray_cluster")
def test_a_dp_sgd_run_reports_the_worst_examples_epsilon_and_is_the_same_on_both_backends(tmp_path, capsys):
    import pandas as pd

    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    def run(name, **sections):
        config = tiny_config(rounds=2, privacy={"mode": "example", "noise_multiplier": 1.5, "clip_norm": 0.5},
                             **sections)
        return Simulation(config, out=str(tmp_path / name), progress=Progress()).run()

    local = run("local", engine={"backend": "local", "min_passes": 2})
    out = capsys.readouterr().out
    # every client takes part every round; 2 DP-SGD steps per task per round at rate 4 / n
    partition = pd.read_csv(local.run_dir / "partition.csv")
    held = partition[partition["train_samples"] > 0]
    delta = 1 / held["train_samples"].sum()
    rates = sorted({min(1.0, 4 / n) for n in held["train_samples"]})
    expected = [max(example_epsilon(1.5, rate, 2 * r, delta) for rate in rates) for r in (1, 2)]
    assert local.rounds["epsilon"].tolist() == pytest.approx(expected, rel=1e-12)
    assert "privacy: example-level DP-SGD, each example's gradient clipped to 0.5, noise multiplier 1.5" in out
    on_ray = run("ray", engine={"num_workers": 2})
    pd.testing.assert_frame_equal(local.metrics, on_ray.metrics, check_exact=True)
    ffa = run("ffa", algorithm="ffa", engine={"backend": "local"})
    assert ffa.rounds["epsilon"].tolist() == pytest.approx(expected, rel=1e-12)  # the same examples and steps
