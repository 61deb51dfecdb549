import numpy as np
import pytest

from fltac_ray.algorithms.base import Uploads, weighted_cluster_means
from fltac_ray.algorithms.fltac import FLTAC
from fltac_ray.config import build_config
from fltac_ray.server.uploads import upload_problem


def _fltac(k: int, weighting: str, n_init: int) -> FLTAC:
    return FLTAC(build_config({"seed": 0, "data": {"num_clients": 4, "tasks": ["synthetic_sentiment", "synthetic_topic",
                                                                              "synthetic_tense"]},
                               "algorithm": {"name": "fltac", "n_clusters": k, "weighting": weighting,
                                             "kmeans_n_init": n_init}}))

def test_weighted_cluster_means_hand_computed():
    vectors = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [20.0, 0.0]])
    labels = np.array([4, 4, 7, 7])  # K-means ids need not be compact
    weights = np.array([1.0, 3.0, 2.0, 2.0])
    out = weighted_cluster_means(vectors, labels, weights)
    np.testing.assert_array_equal(out.labels, [0, 0, 1, 1])
    # cluster 0: (1*[1,0] + 3*[3,2]) / 4 = [2.5, 1.5]; cluster 1: mean of [10,10],[20,0] = [15, 5]
    np.testing.assert_allclose(out.adapters, [[2.5, 1.5], [15.0, 5.0]])
    np.testing.assert_allclose(out.weights, [4.0, 4.0])
    assert out.adapters.dtype == np.float32


def test_weighted_cluster_means_rejects_non_positive_weights():
    with pytest.raises(ValueError, match="positive"):
        weighted_cluster_means(np.zeros((2, 2)), np.array([0, 0]), np.array([1.0, 0.0]))


def _two_task_uploads():
    # task A adapters near +5, task B adapters near -5 along every coordinate
    rng = np.random.default_rng(0)
    a = 5 + rng.normal(scale=0.1, size=(3, 4))
    b = -5 + rng.normal(scale=0.1, size=(2, 4))
    return np.vstack([a, b]).astype(np.float32), np.array([10, 30, 60, 5, 15]), np.array([0, 0, 0, 1, 1])


def test_fltac_aggregates_each_cluster_by_sample_count():
    vectors, samples, truth = _two_task_uploads()
    result = _fltac(2, "samples", 5).aggregate(Uploads(vectors, samples), round_index=1)
    # every member of a task lands in the same cluster and receives its sample-weighted mean
    assert len(set(result.labels[:3])) == 1 and len(set(result.labels[3:])) == 1
    assert result.labels[0] != result.labels[3]
    expected_a = (vectors[:3] * samples[:3, None]).sum(0) / samples[:3].sum()
    expected_b = (vectors[3:] * samples[3:, None]).sum(0) / samples[3:].sum()
    np.testing.assert_allclose(result.adapters[result.labels[0]], expected_a, rtol=1e-6)
    np.testing.assert_allclose(result.adapters[result.labels[3]], expected_b, rtol=1e-6)


def test_fltac_uniform_weighting_is_the_papers_plain_mean():
    vectors, samples, _ = _two_task_uploads()
    result = _fltac(2, "uniform", 5).aggregate(Uploads(vectors, samples), 1)
    np.testing.assert_allclose(result.adapters[result.labels[0]], vectors[:3].mean(0), rtol=1e-6)


def test_fltac_with_fewer_adapters_than_clusters_keeps_each_adapter():
    vectors = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    result = _fltac(3, "samples", 1).aggregate(Uploads(vectors, np.array([1, 1])), 1)
    np.testing.assert_allclose(result.adapters[result.labels], vectors)


@pytest.mark.parametrize(
    ("vector", "samples", "message"),
    [
        (np.zeros(3, np.float32), 5, "shape"),
        (np.zeros(4, np.float64), 5, "dtype"),
        (np.array([0, np.nan, 0, 0], np.float32), 5, "non-finite"),
        (np.array([0, np.inf, 0, 0], np.float32), 5, "non-finite"),
        (np.zeros(4, np.float32), 0, "sample count"),
    ],
)
def test_upload_problems(vector, samples, message):
    assert message in upload_problem(vector, samples, adapter_size=4)


def test_good_upload_passes():
    assert upload_problem(np.ones(4, np.float32), 3, adapter_size=4) is None
