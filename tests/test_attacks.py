"""Malicious clients (attacks.py) and screening (screening.py) as pure functions, the config
rules around them, and the server's round with both (server/server.py, no Ray)."""

import io

import numpy as np
import pandas as pd
import pytest

from fltac_ray.algorithms import resolve_algorithm
from fltac_ray.algorithms.base import AdapterSpec, Upload
from fltac_ray.engine.messages import PassResult
from fltac_ray.errors import ConfigError
from fltac_ray.server.attacks import Attack, honest_damage, malicious_clients
from fltac_ray.server.screening import (
    default_neighbours,
    kth_neighbour_distance,
    outlier_limit,
    screen_uploads,
)
from fltac_ray.server.server import Server
from tests.conftest import tiny_config


def _attack(kind: str, scale: float = 10.0, malicious=(1,)) -> Attack:
    return Attack(kind, scale, 0, frozenset(malicious), ("a", "b", "c"))


def test_malicious_clients_are_a_seeded_share():
    chosen = malicious_clients(33, 3 / 33, seed=0)
    assert len(chosen) == 3 and chosen == malicious_clients(33, 3 / 33, seed=0)
    assert all(0 <= c < 33 for c in chosen)
    assert malicious_clients(33, 3 / 33, seed=1) != chosen  # another seed, other clients
    assert malicious_clients(10, 0.0, seed=0) == frozenset()
    assert len(malicious_clients(10, 0.25, seed=0)) == 2  # round(2.5) = 2


def test_tamper_kinds_hand_computed():
    v = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(_attack("sign_flip").tamper(v, 1, (1, 0)), [-10.0, 20.0, -5.0])
    np.testing.assert_array_equal(_attack("scaling", 3.0).tamper(v, 1, (1, 0)), [3.0, -6.0, 1.5])
    np.testing.assert_array_equal(_attack("cross_task").tamper(v, 1, (1, 0)), v)  # poison is in the data
    signs = np.tile(np.array([1.0, -1.0], np.float32), 5000)  # std 1
    noise = _attack("random", 2.0).tamper(signs, 3, (1, 0))
    assert noise.dtype == np.float32 and abs(noise.std() - 2.0) < 0.05  # scale x std(v) = 2 x 1
    np.testing.assert_array_equal(noise, _attack("random", 2.0).tamper(signs, 3, (1, 0)))  # seeded
    other_round = _attack("random", 2.0).tamper(signs, 4, (1, 0))
    assert not np.array_equal(noise, other_round)


def test_cross_task_decoys():
    attack = _attack("cross_task")
    assert [attack.decoy_task(t) for t in "abc"] == ["b", "c", "a"]
    picked = attack.decoy_examples((1, 0), "a", pool_size=50, count=8)
    assert len(picked) == 8 and len(set(picked)) == 8 and (np.diff(picked) > 0).all() and picked.max() < 50
    assert len(attack.decoy_examples((1, 0), "a", pool_size=5, count=8)) == 5


def test_kth_neighbour_distance_hand_computed():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 0.0]], dtype=np.float32)
    # nearest others: 0 -> 1 (1), 2 (2), 3 (10); 1 -> 0 (1), 2 (sqrt 5), 3 (9); 2 -> 0 (2), 1 (sqrt 5), 3 (sqrt 104)
    np.testing.assert_allclose(kth_neighbour_distance(points, 1), [1.0, 1.0, 2.0, 9.0], rtol=1e-6)
    np.testing.assert_allclose(kth_neighbour_distance(points, 2), [2.0, np.sqrt(5), np.sqrt(5), 10.0], rtol=1e-6)
    np.testing.assert_allclose(kth_neighbour_distance(points, 9), [10.0, 9.0, np.sqrt(104), np.sqrt(104)], rtol=1e-6)


def test_outlier_limit_hand_computed():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, |dev| 2 1 0 1 97 -> MAD 1
    assert outlier_limit(scores, 3.0) == pytest.approx(3.0 + 3.0 * 1.4826)
    # identical honest scores: the spread floor is 5% of the median
    assert outlier_limit(np.array([2.0, 2.0, 2.0, 50.0]), 3.0) == pytest.approx(2.0 + 3.0 * 0.1)
    assert default_neighbours(66, 3) == 11 and default_neighbours(3, 4) == 1


def _tasks_and_attackers(rng, sign=-10.0):
    """33 clients x 1 task each (11 per task, 3 tasks far apart), clients 0, 11, 22 attack."""
    centres = rng.normal(size=(3, 64)) * 3.0
    tasks = np.repeat(np.arange(3), 11)
    vectors = centres[tasks] + rng.normal(scale=0.1, size=(33, 64))
    attackers = [0, 11, 22]
    vectors[attackers] *= sign
    return vectors.astype(np.float32), tasks, attackers


@pytest.mark.parametrize("rule", ["norm", "neighbours"])
def test_screens_catch_scaled_sign_flips(rule):
    vectors, _, attackers = _tasks_and_attackers(np.random.default_rng(0))
    screen = screen_uploads(vectors, rule, 3.0, default_neighbours(33, 3))
    assert sorted(np.flatnonzero(~screen.kept)) == attackers


def test_only_neighbours_catches_a_sign_flip_at_scale_1():
    vectors, _, attackers = _tasks_and_attackers(np.random.default_rng(1), sign=-1.0)
    assert screen_uploads(vectors, "norm", 3.0, 5).kept.all()  # the same norms as honest uploads
    assert sorted(np.flatnonzero(~screen_uploads(vectors, "neighbours", 3.0, 5).kept)) == attackers


def test_screen_keeps_everything_when_nothing_stands_out():
    rng = np.random.default_rng(2)
    assert screen_uploads(rng.normal(size=(40, 16)).astype(np.float32), "neighbours", 3.0, 5).kept.all()
    assert screen_uploads(np.zeros((2, 3), np.float32), "norm", 3.0, 1).kept.all()  # < 3 uploads
    with pytest.raises(ValueError, match="known"):
        screen_uploads(np.zeros((4, 3), np.float32), "krum", 3.0, 1)


def test_honest_damage_hand_computed():
    keys = [(0, 0), (1, 0), (2, 0), (3, 0)]
    vectors = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    starts = np.zeros((4, 2))
    truth = {(0, 0): "a", (1, 0): "a", (2, 0): "b", (3, 0): "a"}
    # client 3 is malicious and was screened out; the 3 others got answers
    accepted = np.array([True, True, True, False])
    labels = np.array([0, 0, 1])
    answers = np.array([[3.0, 0.0], [0.0, 4.0]])
    out = honest_damage(keys, vectors, starts, np.ones(4), accepted, labels, answers, truth, frozenset({3}), True)
    # ideal a = (3, 0): error 0 for both; ideal b = (0, 2), answer (0, 4): |2| / |(0,2) - 0| = 1
    assert out["honest_aggregate_error"] == pytest.approx((0 + 0 + 1) / 3)
    assert out["honest_clustering_accuracy"] == 1.0
    assert (out["malicious_uploads"], out["malicious_accepted"], out["honest_screened"]) == (1, 0, 0)


def _server_round(config, vectors, tasks, start):
    """One round of the coordinator's own code on these uploads (uniform weights)."""
    server = Server(config, resolve_algorithm(config.algorithm), AdapterSpec((("adapter", (vectors.shape[1],)),)))
    server.set_initial(start[None, :])
    keys = [(client, 0) for client in range(len(vectors))]
    server.receive(1, 0, PassResult([Upload(k, vectors[i], 1) for i, k in enumerate(keys)], keys, vectors), None)
    return server.close_round(1, keys, len(keys), {k: f"task{tasks[i]}" for i, k in enumerate(keys)})


def test_three_attackers_hijack_kmeans_unless_screened():
    """Issue 18's case on synthetic adapters: 3 of 33 clients send -10 x their adapter. Without
    screening K-means gives the attackers a cluster and merges two honest tasks; the robust rules
    do not help; the neighbours screen drops exactly the attackers and the honest clients get
    what they would have got without them."""
    vectors, tasks, attackers = _tasks_and_attackers(np.random.default_rng(3))
    start = np.zeros(64, np.float32)
    malicious = {"kind": "sign_flip", "fraction": 3 / 33}

    def round_with(rule=None, **federation):
        config = tiny_config(data={"num_clients": 33}, federation={"attack": malicious, **federation},
                             algorithm={"name": "fltac", "weighting": "uniform", **(rule or {})})
        # the config draws its own 3 attackers: make those the ones that sent -10 x v
        chosen = sorted(Attack.from_config(config).malicious)
        order = chosen + [c for c in range(33) if c not in chosen]
        permuted = np.empty_like(vectors)
        permuted[order] = vectors[attackers + [c for c in range(33) if c not in attackers]]
        permuted_tasks = np.empty_like(tasks)
        permuted_tasks[order] = tasks[attackers + [c for c in range(33) if c not in attackers]]
        return _server_round(config, permuted, permuted_tasks, start), chosen

    for rule in ({}, {"aggregation": "median"}, {"aggregation": "trimmed_mean", "trim_fraction": 0.2}):
        outcome, _ = round_with(rule)
        assert outcome.audit["honest_clustering_accuracy"] < 0.8, rule
        assert outcome.audit["honest_aggregate_error"] > 0.3, rule
    outcome, chosen = round_with(screening="neighbours")
    assert sorted(key[0] for key, _ in outcome.screened) == chosen
    assert outcome.audit["malicious_accepted"] == 0 and outcome.audit["honest_screened"] == 0
    assert outcome.audit["honest_clustering_accuracy"] == 1.0
    assert outcome.audit["honest_aggregate_error"] < 1e-6
    assert all("screened out: distance to its 5-th nearest upload" in reason for _, reason in outcome.screened)


@pytest.mark.parametrize(("federation", "message"), [
    ({"attack": {"kind": "sign_flip", "fraction": 0.1}},
     "federation.attack.fraction = 0.1: selects no client of 4"),
    ({"attack": {"fraction": 0.5}}, "federation.attack.fraction = 0.5: set federation.attack.kind too"),
    ({"screening_neighbours": 3}, "federation.screening_neighbours = 3: only used with federation.screening: neighbours"),
    ({"attack": {"kind": "bribe"}}, "federation.attack.kind"),
    ({"attack": {"kind": "scaling", "fraction": 1.0}}, "federation.attack.fraction"),
    ({"screening_threshold": 0}, "federation.screening_threshold"),
])
def test_attack_and_screening_config_errors(federation, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        tiny_config(federation=federation)


def test_cross_task_needs_two_tasks():
    with pytest.raises(ConfigError, match="needs at least 2 tasks"):
        tiny_config(data={"tasks": ["synthetic_sentiment"]}, federation={"attack": {"kind": "cross_task", "fraction": 0.5}})


def test_attack_control_run_has_no_attacker():
    config = tiny_config(federation={"attack": {"kind": "sign_flip", "fraction": 0.0}})
    assert Attack.from_config(config).malicious == frozenset()
    assert Attack.from_config(tiny_config()) is None


# --- the engine: attackers' workers send what attacks.py says, the server screens and measures ---

def _round_one(tmp_path, name, backend="local", batched=True, **federation):
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress
    from fltac_ray.runs.snapshots import read_snapshots

    config = tiny_config(rounds=1, data={"num_clients": 6}, federation=federation,
                         engine={"backend": backend, "batched_training": batched}, report={"adapter_snapshots": 1})
    stream = io.StringIO()
    result = Simulation(config, out=str(tmp_path / name), progress=Progress(stream=stream, bar=False)).run()
    lines = stream.getvalue().splitlines()
    snapshot = read_snapshots(result.run_dir)[0]
    uploads = {(int(c), int(s)): row for c, s, row in zip(snapshot.clients, snapshot.slots, snapshot.adapters, strict=True)}
    return result, uploads, lines, Attack.from_config(config)


def test_malicious_workers_send_the_attack_and_honest_ones_do_not_change(tmp_path):
    _, honest, _, _ = _round_one(tmp_path, "control")
    _, flipped, _, attack = _round_one(tmp_path, "flip", attack={"kind": "sign_flip", "fraction": 2 / 6})
    assert len(attack.malicious) == 2 and honest.keys() == flipped.keys()
    for key, vector in honest.items():
        expected = -10.0 * vector if key[0] in attack.malicious else vector
        np.testing.assert_array_equal(flipped[key], expected.astype(np.float32))
    # cross_task changes what the attackers' adapters train on, and so the passes they share
    # with honest adapters in batched training (their buckets, padding, float order): compared
    # with one-by-one training, where every adapter's arithmetic is its own
    _, honest, _, _ = _round_one(tmp_path, "control_one_by_one", batched=False)
    _, poisoned, _, attack = _round_one(tmp_path, "cross", batched=False,
                                        attack={"kind": "cross_task", "fraction": 2 / 6})
    for key, vector in honest.items():
        if key[0] in attack.malicious:  # trained on the decoy task's examples
            assert np.abs(poisoned[key] - vector).max() > 1e-3, key
        else:
            np.testing.assert_array_equal(poisoned[key], vector)


def test_screening_on_the_ray_engine_drops_the_attackers_and_says_so(tmp_path, ray_cluster):
    result, _, lines, attack = _round_one(tmp_path, "screen", backend="ray", screening="norm",
                                          attack={"kind": "scaling", "fraction": 1 / 6, "scale": 100.0})
    row = result.rounds.iloc[0]
    (attacker,) = attack.malicious
    slots = int(row["malicious_uploads"])
    assert slots >= 1 and row["malicious_accepted"] == 0 and row["screened_uploads"] >= slots
    assert row["status"] == "ok" and 0 <= row["honest_aggregate_error"] < np.inf
    said = [line for line in lines if "screened out" in line]
    assert said and f"client {attacker} slot 0" in said[0] and "federation.screening = norm" in said[0]
    assert any("screened out" in line for line in lines if line.startswith("round   1/1"))


def test_a_group_apart_from_the_rest_hand_computed():
    from fltac_ray.server.screening import apart_from_rest, tolerated_count

    # sorted 1, 1.1, 1.2, 5, 6: the widest ratio is 5 / 1.2 (>= 2): the group from 5 up
    assert apart_from_rest(np.array([5.0, 1.0, 6.0, 1.2, 1.1])) == 5.0
    assert apart_from_rest(np.array([1.0, 1.5, 2.2, 3.0])) == float("inf")  # no gap of 2x
    # a group apart is at most half of the uploads: near-duplicates far below the rest are not one
    assert apart_from_rest(np.array([0.0, 1e-9, 1.0, 1.1, 1.2])) == float("inf")
    assert apart_from_rest(np.array([1.0, 1.0, 5.0, 5.0])) == 5.0  # half: the 12 of 24
    assert apart_from_rest(np.array([1.0, 1.0, 1.0, 0.0, 0.2])) == float("inf")  # a low group is no group
    assert apart_from_rest(np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])) == 1.0  # 4 identical uploads, 2 apart
    assert apart_from_rest(np.array([3.0])) == float("inf")
    assert tolerated_count("norm", 24, 4) == 11 and tolerated_count("neighbours", 24, 4) == 4
    assert tolerated_count("neighbours", 5, 9) == 2


def _half_malicious(rng):
    """24 clients, 3 tasks far apart; every second client sends -10 x its adapter."""
    centres = rng.normal(size=(3, 64)) * 3.0
    tasks = np.repeat(np.arange(3), 8)
    vectors = centres[tasks] + rng.normal(scale=0.1, size=(24, 64))
    vectors[::2] *= -10
    return vectors.astype(np.float32), tasks


@pytest.mark.parametrize("rule", ["norm", "neighbours"])
def test_screening_says_when_half_of_the_uploads_overwhelm_it(rule):
    from fltac_ray.errors import ScreeningError
    from fltac_ray.progress import format_run_summary

    vectors, tasks = _half_malicious(np.random.default_rng(4))
    config = tiny_config(data={"num_clients": 24}, federation={"screening": rule},
                         algorithm={"name": "fltac", "weighting": "uniform"})
    outcome = _server_round(config, vectors, tasks, np.zeros(64, np.float32))
    assert outcome.screened == [] and outcome.kept_apart == 12  # nothing screened out: it cannot hold
    k = "" if rule == "norm" else " (groups of more than k = 4 that agree shield each other)"
    assert outcome.screening_note.startswith("screening may not hold: 12 of 24 uploads sit apart from the rest (")
    assert outcome.screening_note.endswith(f"and 12 of them were kept; federation.screening = {rule} screens out "
                                           f"at most {11 if rule == 'norm' else 4} of 24 uploads"
                                           f"{k or ' (its limit follows the median)'}"), outcome.screening_note
    honest = _server_round(config, vectors[1::2], tasks[1::2], np.zeros(64, np.float32))
    assert honest.kept_apart == 0 and honest.screening_note == ""
    stopping = tiny_config(data={"num_clients": 24}, federation={"screening": rule, "screening_stop": True},
                           algorithm={"name": "fltac", "weighting": "uniform"})
    with pytest.raises(ScreeningError, match=r"round 1: screening may not hold: .*federation.screening_stop ended"):
        _server_round(stopping, vectors, tasks, np.zeros(64, np.float32))
    rounds = pd.DataFrame({"round": [1, 2, 3], "status": ["ok"] * 3, "clustering_accuracy": [np.nan] * 3,
                           "bytes_up": [0] * 3, "bytes_down": [0] * 3, "seconds": [1.0] * 3,
                           "suspected_kept": [0, 12, 3]})
    assert format_run_summary(pd.DataFrame(), rounds).splitlines()[-1] == (
        "warning: screening may not have held in 2 round(s) [2, 3]: uploads apart from the rest were kept "
        "(rounds.csv suspected_kept; federation.screening_stop ends a run there)")
