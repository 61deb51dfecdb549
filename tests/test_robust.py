import numpy as np
import pytest

from fltac_ray.algorithms.robust import cluster_aggregate, combine


def test_median_and_trimmed_mean_hand_computed():
    members = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [100.0, -1000.0]])
    np.testing.assert_allclose(combine(members, "median", 0.0), [3.0, 20.0])
    # trim 0.2 of 5 -> drop 1 from each end per coordinate:
    # column 0: [2, 3, 4] -> 3; column 1: sorted [-1000, 10, 20, 30, 40] -> [10, 20, 30] -> 20
    np.testing.assert_allclose(combine(members, "trimmed_mean", 0.2), [3.0, 20.0])
    # trim 0 is the plain mean
    np.testing.assert_allclose(combine(members, "trimmed_mean", 0.0), members.mean(0))


def test_trimmed_mean_of_a_tiny_cluster_keeps_a_member():
    np.testing.assert_allclose(combine(np.array([[1.0], [5.0]]), "trimmed_mean", 0.49), [3.0])


def test_unknown_rule():
    with pytest.raises(ValueError, match="known"):
        combine(np.zeros((2, 2)), "krum", 0.1)


def test_cluster_aggregate_applies_the_rule_per_cluster():
    vectors = np.array([[0.0], [1.0], [50.0], [10.0], [11.0], [12.0]])
    labels = np.array([3, 3, 3, 8, 8, 8])
    result = cluster_aggregate(vectors, labels, np.ones(6), rule="median")
    np.testing.assert_allclose(result.adapters, [[1.0], [11.0]])
    np.testing.assert_array_equal(result.labels, [0, 0, 0, 1, 1, 1])


def test_robust_rules_bound_the_damage_of_malicious_clients():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=200)
    honest = truth + rng.normal(scale=0.1, size=(10, 200))
    # 3 of 13 clients send the sign-flipped update scaled by 10, and claim large sample counts
    attackers = np.tile(-10.0 * truth, (3, 1))
    vectors = np.vstack([honest, attackers])
    weights = np.array([100.0] * 10 + [1000.0] * 3)
    labels = np.zeros(13, dtype=int)
    error = {rule: np.linalg.norm(cluster_aggregate(vectors, labels, weights, rule, 0.25).adapters[0] - truth)
             for rule in ("mean", "median", "trimmed_mean")}
    scale = np.linalg.norm(truth)
    assert error["mean"] > 5 * scale  # FedAvg is dragged far past the origin
    assert error["median"] < 0.2 * scale
    assert error["trimmed_mean"] < 0.2 * scale
