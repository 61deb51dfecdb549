import importlib.util

import numpy as np
import pytest

from fltac_ray.errors import ResourceUnavailableError
from fltac_ray.server.clustering import (
    adjusted_rand,
    hungarian_accuracy,
    kmeans_labels,
    resolve_backend,
)


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


def test_torch_kmeans_finds_the_partition_scikit_learn_finds():
    """torch's K-means (the GPU backend without cuML) on four separated groups in 64 dimensions,
    with uneven sizes: the same partition as scikit-learn (labels up to renaming), reproducible
    from the seed; n <= K keeps every vector alone."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(4, 64))
    truth = np.repeat(np.arange(4), [5, 40, 12, 23])
    vectors = (centres[truth] + rng.normal(0, 1, size=(len(truth), 64))).astype(np.float32)
    by_torch = kmeans_labels(vectors, 4, seed=3, n_init=5, backend="torch")
    by_sklearn = kmeans_labels(vectors, 4, seed=3, n_init=5, backend="sklearn")
    assert by_torch.dtype == np.int64 and adjusted_rand(truth, by_torch) == 1.0
    assert adjusted_rand(by_sklearn, by_torch) == 1.0
    assert np.array_equal(by_torch, kmeans_labels(vectors, 4, seed=3, n_init=5, backend="torch"))
    assert kmeans_labels(vectors[:3], 4, seed=0, n_init=1, backend="torch").tolist() == [0, 1, 2]


def test_a_hard_case_torch_kmeans_keeps_the_lowest_inertia_of_its_restarts():
    """Two close groups and one far: over restarts torch's K-means reaches the inertia of
    scikit-learn's best to 1e-4 relative."""
    from sklearn.cluster import KMeans

    from fltac_ray.server.clustering import torch_kmeans

    rng = np.random.default_rng(1)
    points = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(2.5, 1, (30, 8)),
                             rng.normal(20, 1, (10, 8))]).astype(np.float32)

    def inertia(labels):
        return sum(((points[labels == c] - points[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))

    best = KMeans(3, n_init=20, random_state=0).fit(points).inertia_
    assert inertia(torch_kmeans(points, 3, seed=0, n_init=20)) == pytest.approx(best, rel=1e-4)
