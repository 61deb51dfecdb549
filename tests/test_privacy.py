"""Differential privacy: clipping and noise by hand, epsilon against dp-accounting's own
calculator, the run's ledger, the config's refusals, and private runs end to end."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from fltac_ray.engine.simulation import Simulation
from fltac_ray.errors import ConfigError
from fltac_ray.privacy.accounting import (
    calibrate_noise_multiplier,
    composed_epsilon,
    participation_counts,
)
from fltac_ray.privacy.ledger import PrivacyLedger
from fltac_ray.privacy.mechanism import client_noise_multiplier, clip_update, privatize_upload
from fltac_ray.progress import Progress

from .conftest import tiny_config


def test_clipping_hand_computed():
    clipped, norm = clip_update(np.array([3.0, 4.0], np.float32), 1.0)  # norm 5 -> scaled by 1/5
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
    assert norm == 5.0 and clipped.dtype == np.float32
    small = np.array([0.3, 0.4], np.float32)
    inside, norm = clip_update(small, 1.0)  # norm 0.5: unchanged
    np.testing.assert_array_equal(inside, small)
    assert norm == pytest.approx(0.5)
    zero, norm = clip_update(np.zeros(3, np.float32), 1.0)
    assert norm == 0.0 and not zero.any()
    assert client_noise_multiplier(2.0, 4) == 1.0 and client_noise_multiplier(1.5, 1) == 1.5


def test_privatized_upload_is_reference_plus_clipped_update_plus_seeded_noise():
    reference = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    trained = reference + np.array([6.0, 0.0, 8.0, 0.0], np.float32)  # update norm 10
    sent, norm = privatize_upload(trained, reference, 2.0, 0.5, np.random.default_rng(3))
    noise = np.random.default_rng(3).normal(0.0, 0.5 * 2.0, size=4)  # std z C = 1
    np.testing.assert_allclose(sent, reference + np.array([1.2, 0.0, 1.6, 0.0]) + noise, rtol=1e-6)
    assert norm == pytest.approx(10.0) and sent.dtype == np.float32


def test_the_noise_has_standard_deviation_z_times_c_over_many_seeded_draws():
    reference = np.zeros(20_000, np.float32)
    sent, _ = privatize_upload(reference, reference, 0.5, 1.2, np.random.default_rng(11))  # no update: pure noise
    # 20,000 draws: the sample std is within 3% of z C = 0.6 (its own std is ~0.5%)
    assert np.std(sent) == pytest.approx(0.6, rel=0.03) and abs(np.mean(sent)) < 0.02


def test_epsilon_agrees_with_the_library_and_with_the_rdp_bound_by_hand():
    import dp_accounting

    z, rounds, delta = 1.3, 12, 1e-4
    mine = composed_epsilon(z, rounds, delta)
    accountant = dp_accounting.rdp.RdpAccountant()
    for _ in range(rounds):  # one event per round, as a library user would compose them
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    assert mine == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    # the Gaussian mechanism's RDP is alpha / (2 z^2) per round; the classic conversion
    # min_alpha (T alpha / (2 z^2) + log(1/delta) / (alpha - 1)) is an upper bound on epsilon
    classic = min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20_000))
    assert 0.6 * classic < mine <= classic
    assert composed_epsilon(z, 0, delta) == 0.0 and composed_epsilon(0.0, 3, delta) == math.inf
    assert composed_epsilon(z, rounds, delta, "pld") < mine  # PLD is tighter than RDP
    calibrated = calibrate_noise_multiplier(2.0, rounds, delta)
    assert composed_epsilon(calibrated, rounds, delta) == pytest.approx(2.0, rel=1e-3)


def _Settings(noise_multiplier=None, target_epsilon=None):  # noqa: N802 - reads as the settings it builds
    from fltac_ray.config import PrivacyConfig

    return PrivacyConfig(mode="client_local", noise_multiplier=noise_multiplier, target_epsilon=target_epsilon)


def test_the_ledger_follows_the_most_sampled_client():
    schedule = [[0, 1], [1, 2], [1, 3], [0, 2]]  # client 1 after rounds 1..4: 1, 2, 3, 3
    assert participation_counts(schedule) == {0: 2, 1: 3, 2: 2, 3: 1}
    ledger = PrivacyLedger.plan(_Settings(noise_multiplier=4.0), schedule, adapters_per_client=4, clients=10)
    assert ledger.delta == 0.1 and ledger.noise_multiplier == 4.0
    expected = [composed_epsilon(2.0, count, 0.1) for count in (1, 2, 3, 3)]  # z / sqrt(4) = 2 per client
    assert list(ledger.epsilons) == expected and ledger.last_round == 4 and ledger.epsilon_after(0) == 0.0
    budget = PrivacyLedger.plan(_Settings(noise_multiplier=4.0, target_epsilon=expected[1] * 1.01), schedule, 4, 10)
    assert budget.last_round == 2  # round 3 would spend past the budget
    calibrated = PrivacyLedger.plan(_Settings(target_epsilon=1.5), schedule, 4, 10)
    assert calibrated.calibrated and calibrated.epsilons[-1] == pytest.approx(1.5, rel=1e-3)
    assert calibrated.noise_multiplier == pytest.approx(2 * calibrate_noise_multiplier(1.5, 3, 0.1))
    assert calibrated.last_round == 4


@pytest.mark.parametrize(("privacy", "algorithm", "words"), [
    ({"mode": "client_local"}, "fltac", "privacy.noise_multiplier = None: give privacy.noise_multiplier or"),
    ({"mode": "client_local", "noise_multiplier": 0}, "fltac", "no noise gives no privacy guarantee"),
    ({"mode": "client_local", "clip_norm": 0, "noise_multiplier": 1}, "fltac", "privacy.clip_norm"),
    ({"mode": "client_local", "noise_multiplier": 1}, "scaffold",
     "algorithm 'scaffold' also uploads ['control_delta'], which the noise does not cover"),
    ({"mode": "client_local", "noise_multiplier": 1}, "floral", "also uploads ['mixture']"),
    ({"mode": "client_local", "noise_multiplier": 1, "delta": 1.0}, "fltac", "privacy.delta"),
])
def test_settings_that_give_no_guarantee_are_refused(privacy, algorithm, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        tiny_config(privacy=privacy, algorithm=algorithm)


def _run(tmp_path, name, **sections):
    return Simulation(tiny_config(**sections), out=str(tmp_path / name), progress=Progress()).run()


@pytest.mark.usefixtures("ray_cluster")
def test_a_private_run_reports_epsilon_each_round_and_is_the_same_on_both_backends(tmp_path, capsys):
    privacy = {"mode": "client_local", "noise_multiplier": 2.0, "clip_norm": 0.5}
    local = _run(tmp_path, "local", rounds=3, privacy=privacy, engine={"backend": "local", "min_passes": 2})
    out = capsys.readouterr().out
    # 4 clients, all sampled every round, 3 adapters each (FL-TAC: one per task): z / sqrt(3) per client
    expected = [composed_epsilon(2.0 / math.sqrt(3), r, 0.25) for r in (1, 2, 3)]
    assert local.rounds["epsilon"].tolist() == pytest.approx(expected, rel=1e-12)
    assert "privacy: client_local client-level DP, clip 0.5, noise multiplier 2 (as given; 3 adapter(s)" in out
    assert f"| epsilon {expected[0]:.3g}" in out and f"privacy spent: epsilon {expected[-1]:.3g}" in out
    on_ray = _run(tmp_path, "ray", rounds=3, privacy=privacy, engine={"num_workers": 2})
    pd.testing.assert_frame_equal(local.metrics, on_ray.metrics, check_exact=True)
    plain = _run(tmp_path, "plain", rounds=3, engine={"backend": "local", "min_passes": 2})
    assert not np.allclose(plain.rounds["train_loss"].iloc[1:], local.rounds["train_loss"].iloc[1:])  # noise moved it
    assert plain.rounds["epsilon"].isna().all()


def test_a_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path, capsys):
    one_round = composed_epsilon(1.0 / math.sqrt(3), 1, 0.25)
    result = _run(tmp_path, "budget", rounds=3, engine={"backend": "local"},
                  privacy={"mode": "client_local", "noise_multiplier": 1.0, "target_epsilon": one_round * 1.5})
    out = capsys.readouterr().out
    assert result.rounds["round"].tolist() == [1]
    assert "privacy budget: epsilon" in out and "affords rounds 1-1 of 3; the run stops after round 1" in out
    calibrated = _run(tmp_path, "calibrated", rounds=2, engine={"backend": "local"},
                      privacy={"mode": "client_local", "target_epsilon": 8.0})
    assert calibrated.rounds["epsilon"].iloc[-1] == pytest.approx(8.0, rel=1e-3)
    assert "calibrated for epsilon 8" in capsys.readouterr().out


def test_a_calibrated_private_run_resumes_to_the_same_results(tmp_path):
    privacy = {"mode": "client_local", "target_epsilon": 6.0}
    whole = _run(tmp_path, "whole", rounds=2, privacy=privacy, engine={"backend": "local"})
    newest = whole.run_dir / "checkpoints" / "round_00002" / "clients.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])  # round 2 is redone on resume, with the same noise
    resumed = Simulation.resume(whole.run_dir, progress=Progress(quiet=True)).run()
    pd.testing.assert_frame_equal(resumed.metrics, whole.metrics, check_exact=True)
    assert resumed.rounds["epsilon"].tolist() == whole.rounds["epsilon"].tolist()


def test_central_noise_is_z_c_over_each_groups_count_and_spares_empty_groups():
    from fltac_ray.algorithms.types import Aggregate
    from fltac_ray.privacy.mechanism import CentralNoise

    means = Aggregate(np.array([0, 1, 1]), np.zeros((3, 40_000), np.float32), np.array([1.0, 4.0, 0.0]))
    noise = CentralNoise(np.random.default_rng(5), noise_multiplier=2.0, clip_norm=0.5)
    noised = noise(means)
    # z C / n: 1.0 for the group of one, 0.25 for the group of four; the empty group is kept
    assert np.std(noised.adapters[0]) == pytest.approx(1.0, rel=0.02)
    assert np.std(noised.adapters[1]) == pytest.approx(0.25, rel=0.02)
    assert not noised.adapters[2].any() and noise.calls == 1
    np.testing.assert_array_equal(noised.labels, means.labels)


def test_sampled_epsilon_agrees_with_the_library_and_sampling_amplifies():
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for _ in range(6):
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(40, 10, dp_accounting.GaussianDpEvent(1.1)))
    from fltac_ray.privacy.accounting import calibrate_sampled_noise, sampled_epsilon

    assert sampled_epsilon(1.1, 40, 10, 6, 1e-3) == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-9)
    assert sampled_epsilon(1.1, 40, 10, 6, 1e-3) < sampled_epsilon(1.1, 40, 40, 6, 1e-3)  # 1 in 4 sampled
    assert sampled_epsilon(1.1, 40, 40, 6, 1e-3) == pytest.approx(composed_epsilon(1.1, 6, 1e-3), rel=1e-9)
    z = calibrate_sampled_noise(3.0, 40, 10, 6, 1e-3)
    assert sampled_epsilon(z, 40, 10, 6, 1e-3) == pytest.approx(3.0, rel=1e-3)


def test_a_central_server_round_noises_the_means_and_refuses_an_algorithm_that_bypasses_them():
    from fltac_ray.algorithms import AdapterSpec, FederatedAlgorithm, Upload
    from fltac_ray.algorithms.options import AggregationOptions
    from fltac_ray.algorithms.types import Aggregate
    from fltac_ray.engine.messages import PassResult
    from fltac_ray.errors import AlgorithmError
    from fltac_ray.privacy.mechanism import PRIVACY_STREAM
    from fltac_ray.server.server import Server

    spec = AdapterSpec((("w", (6,)),))
    vectors = np.arange(24, dtype=np.float32).reshape(4, 6) / 10
    keys = [(c, 0) for c in range(4)]

    def one_round(algorithm_class, name):
        config = tiny_config(algorithm={"name": name, "weighting": "uniform"},
                             privacy={"mode": "client_central", "noise_multiplier": 3.0, "clip_norm": 0.2})
        server = Server(config, algorithm_class, spec)
        server.set_initial(np.zeros((1, 6), np.float32))
        server.receive(1, 0, PassResult([Upload(k, vectors[i], 1) for i, k in enumerate(keys)], keys, vectors), None)
        return server.close_round(1, keys, 4), server

    from fltac_ray.algorithms import resolve_algorithm

    outcome, server = one_round(resolve_algorithm("fedit"), "fedit")
    noise = np.random.default_rng([0, PRIVACY_STREAM, 0, 1]).normal(0.0, 3.0 * 0.2 / 4, size=6)
    expected = (vectors.astype(np.float64).mean(axis=0) + noise).astype(np.float32)
    np.testing.assert_allclose(server.exported["adapters"][0], expected, rtol=1e-6)

    class Bypass(FederatedAlgorithm):  # averages by itself: its answers would carry no noise
        name = "bypass"
        Options = AggregationOptions

        def aggregate(self, uploads, round_index):
            return Aggregate(np.zeros(len(uploads.vectors), np.int64), uploads.vectors.mean(0, keepdims=True),
                             np.ones(1))

    bypass_config_name = f"{__name__}:Bypass"
    globals()["Bypass"] = Bypass
    with pytest.raises(AlgorithmError, match=r"Bypass.aggregate\(\) in round 1: privacy.mode client_central adds"):
        one_round(Bypass, bypass_config_name)


@pytest.mark.parametrize(("algorithm", "privacy", "words"), [
    ({"name": "fedit"}, {}, "privacy.mode = 'client_central': the noise is calibrated to plain means"),
    ({"name": "fedit", "weighting": "uniform", "aggregation": "median"}, {}, "aggregation 'median'"),
    ({"name": "fedit", "weighting": "uniform"}, {"accountant": "pld"}, "privacy.accountant = 'pld': client_central"),
])
def test_central_settings_without_a_calibrated_sensitivity_are_refused(algorithm, privacy, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        tiny_config(algorithm=algorithm, privacy={"mode": "client_central", "noise_multiplier": 1.0, **privacy})


def test_a_central_private_run_reports_the_sampled_accounting(tmp_path, capsys):
    result = _run(tmp_path, "central", rounds=3, engine={"backend": "local"}, federation={"client_fraction": 0.5},
                  algorithm={"name": "fedit", "weighting": "uniform"},
                  privacy={"mode": "client_central", "noise_multiplier": 1.5, "clip_norm": 0.5})
    from fltac_ray.privacy.accounting import sampled_epsilon

    # FedIT: one adapter per client; 2 of the 4 clients each round; replace-one: z / 2 per round
    expected = [sampled_epsilon(0.75, 4, 2, r, 0.25) for r in (1, 2, 3)]
    assert result.rounds["epsilon"].tolist() == pytest.approx(expected, rel=1e-12)
    assert "noise on every group mean; 1 adapter(s) per client, so 0.75 per round" in capsys.readouterr().out


def test_the_sketch_projection_is_seeded_keeps_norms_and_is_the_same_built_whole_or_by_blocks(monkeypatch):
    from fltac_ray.privacy import sketch

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 20_000))
    ratios = [np.linalg.norm(sketch.project(v, seed=3, dim=64)) / np.linalg.norm(v) for v in vectors]
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.05) and min(ratios) > 0.6 and max(ratios) < 1.4  # JL
    whole = sketch.project(vectors[0], seed=3, dim=64)
    np.testing.assert_array_equal(whole, sketch.project(vectors[0], seed=3, dim=64))
    assert not np.allclose(whole, sketch.project(vectors[0], seed=4, dim=64))
    monkeypatch.setattr(sketch, "CACHED_ENTRIES", 10)  # too large to keep: rebuilt block by block
    np.testing.assert_allclose(sketch.project(vectors[0], seed=3, dim=64), whole, rtol=1e-10, atol=1e-9)


def test_a_noised_sketch_is_the_clipped_map_of_the_update_plus_noise():
    from fltac_ray.privacy.sketch import (
        block_bounds,
        noised_sketch,
        project,
        sketch_size,
        split_noise,
    )

    layout = [("x.lora_A.default.weight", (1, 3)), ("head.weight", (2, 2)), ("head.bias", (2,))]
    assert block_bounds(layout) == [(0, 3), (3, 5), (5, 7), (7, 9)]  # the head's weight row by row
    assert sketch_size("block_norms", layout, 16) == 4 and sketch_size("projection", layout, 16) == 16
    reference = np.zeros(9, np.float32)
    upload = np.array([3, 0, 4, 0, 0, 1, 0, 0, 0], np.float32)  # block norms 5, 0, 1, 0
    rng = np.random.default_rng(0)
    quiet = noised_sketch("block_norms", upload, reference, layout, 0, 16, 100.0, 0.0, rng)
    np.testing.assert_allclose(quiet, [5, 0, 1, 0])
    clipped = noised_sketch("block_norms", upload + 2, reference + 2, layout, 0, 16, 0.5, 0.0, rng)
    np.testing.assert_allclose(clipped, np.array([5, 0, 1, 0]) * 0.5 / np.sqrt(26), rtol=1e-6)  # |(5,0,1,0)|
    with pytest.raises(ValueError, match="needs the whole adapter"):
        noised_sketch("block_norms", upload[:5], reference[:5], layout, 0, 16, 1.0, 0.0, rng)

    rng = np.random.default_rng(1)
    reference = rng.normal(size=3000).astype(np.float32)
    small = reference + np.float32(1e-3) * rng.normal(size=3000).astype(np.float32)
    quiet = noised_sketch("projection", small, reference, [], seed=5, dim=16, clip_norm=10.0, noise_multiplier=0.0,
                          rng=rng)
    np.testing.assert_allclose(quiet, project(small, 5, 16), rtol=1e-4, atol=1e-5)  # within the bound: exact
    large = reference + 5 * rng.normal(size=3000).astype(np.float32)
    clipped = noised_sketch("projection", large, reference, [], 5, 16, 0.5, 0.0, rng)
    assert np.linalg.norm(clipped - project(reference, 5, 16)) == pytest.approx(0.5, rel=1e-5)
    draws = np.stack([noised_sketch("projection", small, reference, [], 5, 16, 0.5, 3.0, np.random.default_rng(s))
                      for s in range(400)])
    assert (draws - quiet).std() == pytest.approx(1.5, rel=0.05)  # z_s C
    upload_z, sketch_z = split_noise(2.0, 0.2)
    assert upload_z ** -2 + sketch_z ** -2 == pytest.approx(2.0 ** -2)  # the two compose to the accounted z
    assert split_noise(2.0, 0.0) == (2.0, math.inf)


@pytest.mark.parametrize(("privacy", "algorithm", "words"), [
    ({"mode": "client_central", "noise_multiplier": 1, "sketch": "projection"},
     {"name": "fltac", "weighting": "uniform"},
     "privacy.sketch = 'projection': sketches are for clustering noised uploads under privacy.mode client_local"),
    ({"mode": "client_local", "noise_multiplier": 1, "sketch": "block_norms"}, "fedit",
     "algorithm 'fedit' does not cluster uploads, so a sketch would spend budget on nothing"),
])
def test_a_sketch_that_cannot_help_is_refused(privacy, algorithm, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        tiny_config(privacy=privacy, algorithm=algorithm)


def test_fltac_clusters_the_sketches_at_the_same_epsilon_and_the_report_draws_accuracy_against_epsilon(
        tmp_path, capsys):
    from fltac_ray.reporting.figures import accuracy_vs_epsilon
    from fltac_ray.reporting.runs import read_run

    privacy = {"mode": "client_local", "noise_multiplier": 1.0, "clip_norm": 1.0}
    plain = _run(tmp_path, "plain", privacy=privacy, engine={"backend": "local"})
    sketched = _run(tmp_path, "sketched", privacy={**privacy, "sketch": "block_norms", "sketch_share": 0.2},
                    engine={"backend": "local"})
    out = capsys.readouterr().out
    assert "a block_norms sketch per upload takes 0.2 of it: 1.118 on the upload, 2.236 on the sketch" in out
    assert sketched.rounds["epsilon"].tolist() == plain.rounds["epsilon"].tolist()  # the budget is shared, not added
    # tiny-random-bert: 2 layers x query/value x A/B = 8 LoRA tensors, 4 head rows, the head's bias
    uploads = sketched.rounds["adapters"]
    assert (sketched.rounds["params_up"] - plain.rounds["params_up"]).tolist() == (13 * uploads).tolist()
    runs = [read_run(plain.run_dir, "plain"), read_run(sketched.run_dir, "sketched"),
            read_run(_run(tmp_path, "none", engine={"backend": "local"}).run_dir, "no privacy")]
    figure = accuracy_vs_epsilon(runs)
    assert figure is not None and len(figure.axes[0].lines) == 3  # two private series and one reference line
    assert accuracy_vs_epsilon(runs[2:]) is None


def test_fltac_groups_uploads_by_their_sketches_when_they_carry_them():
    from fltac_ray.algorithms import AdapterSpec, create_algorithm
    from fltac_ray.algorithms.base import Uploads
    from fltac_ray.config import build_config

    fltac = create_algorithm(build_config({"algorithm": {"name": "fltac", "n_clusters": 2}}))
    fltac.setup(AdapterSpec((("head.bias", (2,)),)))
    # the adapters pair up {0, 1} / {2, 3}; the sketches pair up {0, 2} / {1, 3}
    vectors = np.array([[0.0, 0.0], [0.1, 0.0], [9.0, 9.0], [9.1, 9.0]], np.float32)
    sketches = np.array([[0.0], [5.0], [0.1], [5.1]], np.float32)
    by_vectors = fltac.aggregate(Uploads(vectors, np.ones(4)), 1).labels
    by_sketches = fltac.aggregate(Uploads(vectors, np.ones(4), extras={"sketch": sketches}), 1)
    assert by_vectors[0] == by_vectors[1] != by_vectors[2] == by_vectors[3]
    labels = by_sketches.labels
    assert labels[0] == labels[2] != labels[1] == labels[3]
    # each cluster still averages the full adapters: {0, 2} -> [4.5, 4.5], {1, 3} -> [4.6, 4.5]
    np.testing.assert_allclose(by_sketches.adapters[labels[0]], [4.5, 4.5], rtol=1e-6)
    np.testing.assert_allclose(by_sketches.adapters[labels[1]], [4.6, 4.5], rtol=1e-6)


def test_adaptive_clipping_steps_toward_the_target_quantile_and_shares_the_budget():
    from fltac_ray.privacy.mechanism import next_clip_norm, quantile_noise

    quiet = np.random.default_rng(0)
    # 3 of 4 updates fit under C = 1 and the target is half: the bound shrinks by exp(-0.2 * 0.25)
    bound, share = next_clip_norm(1.0, 3, 4, 0.5, 0.2, 0.0, quiet)
    assert share == 0.75 and bound == pytest.approx(math.exp(-0.05))
    assert next_clip_norm(2.0, 0, 4, 0.5, 0.2, 0.0, quiet)[0] == pytest.approx(2.0 * math.exp(0.1))  # grows
    noisy = [next_clip_norm(1.0, 3, 4, 0.5, 0.2, 2.0, np.random.default_rng(s))[1] for s in range(4000)]
    assert np.std(noisy) == pytest.approx(2.0 / 4, rel=0.05)  # the count's noise, over the uploads
    means, count = quantile_noise(3.0, 0.1)
    for adapters in (1, 3):  # per round: (z_m / 2S)^-2 + (sigma_b / S)^-2 = (z / 2S)^-2, whatever S
        assert (means / (2 * adapters)) ** -2 + (count / adapters) ** -2 == pytest.approx((3.0 / (2 * adapters)) ** -2)


def test_an_adaptive_central_run_moves_its_bound_keeps_its_epsilon_and_resumes_to_the_same_results(tmp_path, capsys):
    privacy = {"mode": "client_central", "noise_multiplier": 4.0, "clip_norm": 0.05}
    algorithm = {"name": "fltac", "weighting": "uniform"}
    fixed = _run(tmp_path, "fixed", rounds=3, algorithm=algorithm, privacy=privacy, engine={"backend": "local"})
    adaptive = _run(tmp_path, "adaptive", rounds=3, algorithm=algorithm, engine={"backend": "local"},
                    privacy={**privacy, "adaptive_clipping": True})
    out = capsys.readouterr().out
    assert "adaptive clipping from 0.05: the noised count of unclipped uploads takes 0.1 of it" in out
    assert fixed.rounds["clip_norm"].tolist() == [0.05, 0.05, 0.05]
    bounds = adaptive.rounds["clip_norm"].tolist()
    assert bounds[0] == 0.05 and bounds[2] > bounds[1] > bounds[0]  # every update was clipped at 0.05: it grows
    assert adaptive.rounds["epsilon"].tolist() == fixed.rounds["epsilon"].tolist()
    newest = adaptive.run_dir / "checkpoints" / "round_00003" / "clients.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])  # round 3 is redone from round 2's checkpoint and its bound
    resumed = Simulation.resume(adaptive.run_dir, progress=Progress(quiet=True)).run()
    pd.testing.assert_frame_equal(resumed.metrics, adaptive.metrics, check_exact=True)
    assert resumed.rounds["clip_norm"].tolist() == bounds


def test_adaptive_clipping_is_refused_where_no_trusted_server_counts():
    with pytest.raises(ConfigError, match=re.escape("privacy.adaptive_clipping = True: the server estimates the bound")):
        tiny_config(privacy={"mode": "client_local", "noise_multiplier": 1.0, "adaptive_clipping": True})
