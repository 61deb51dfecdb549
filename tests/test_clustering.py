import importlib.util

import numpy as np
import pytest

from fltac_ray.clustering import adjusted_rand, hungarian_accuracy, kmeans_labels, resolve_backend
from fltac_ray.errors import ResourceUnavailableError


def test_hungarian_accuracy_ignores_cluster_names():
    assert hungarian_accuracy(["a", "a", "b", "b"], [1, 1, 0, 0]) == 1.0


def test_hungarian_accuracy_hand_computed():
    # clusters: 0 -> {a, a, b}, 1 -> {b}; best matching 0->a (2 hits), 1->b (1 hit) = 3/4
    assert hungarian_accuracy(["a", "a", "b", "b"], [0, 0, 0, 1]) == pytest.approx(0.75)
    # everything in one cluster: only one task can be matched
    assert hungarian_accuracy(["a", "b", "c"], [0, 0, 0]) == pytest.approx(1 / 3)


def test_adjusted_rand():
    assert adjusted_rand([0, 0, 1, 1], [5, 5, 9, 9]) == pytest.approx(1.0)
    assert adjusted_rand([0, 0, 1, 1], [0, 1, 0, 1]) < 0


def test_kmeans_separates_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat([0, 1, 2], 20)
    points = centers[truth] + rng.normal(scale=0.5, size=(60, 2))
    labels = kmeans_labels(points, 3, seed=1, n_init=5, backend="sklearn")
    assert hungarian_accuracy(truth, labels) == 1.0
    np.testing.assert_array_equal(labels, kmeans_labels(points, 3, seed=1, n_init=5, backend="sklearn"))


def test_kmeans_with_no_more_points_than_clusters_gives_singletons():
    np.testing.assert_array_equal(kmeans_labels(np.zeros((2, 4)), 3, 0, 1, "sklearn"), [0, 1])


def test_backend_resolution():
    assert resolve_backend("sklearn") == "sklearn"
    if importlib.util.find_spec("cuml") is None:
        assert resolve_backend("auto") == "sklearn"
        with pytest.raises(ResourceUnavailableError, match="clustering_backend"):
            resolve_backend("cuml")
