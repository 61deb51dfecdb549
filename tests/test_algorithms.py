"""Aggregation rules of the baselines against hand-computed numbers, and their option rules."""

import numpy as np
import pytest

from fltac_ray.algorithms import ALGORITHMS, create_algorithm
from fltac_ray.algorithms.base import Uploads
from fltac_ray.algorithms.centralized import Centralized
from fltac_ray.algorithms.fedit import FedIT
from fltac_ray.algorithms.ifca import IFCA
from fltac_ray.algorithms.local import LocalOnly
from fltac_ray.algorithms.oracle import OracleClustering
from fltac_ray.config import build_config
from fltac_ray.errors import ConfigError

VECTORS = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [20.0, 0.0]], dtype=np.float32)
SAMPLES = np.array([1, 3, 2, 2])


def test_fedit_one_adapter_per_client_and_plain_fedavg():
    algorithm = FedIT("samples")
    assert algorithm.client_adapters(["a", "b", "c"]) == [["a", "b", "c"]]
    result = algorithm.aggregate(Uploads(VECTORS, SAMPLES), 1)
    # (1*[1,0] + 3*[3,2] + 2*[10,10] + 2*[20,0]) / 8 = [70/8, 26/8]
    np.testing.assert_allclose(result.adapters, [[8.75, 3.25]])
    np.testing.assert_array_equal(result.labels, [0, 0, 0, 0])


def test_fedit_uniform_weighting():
    result = FedIT("uniform").aggregate(Uploads(VECTORS, SAMPLES), 1)
    np.testing.assert_allclose(result.adapters, [[8.5, 3.0]])


def test_oracle_groups_by_true_task():
    uploads = Uploads(VECTORS, SAMPLES, task_labels=["b", "b", "a", "a"])
    result = OracleClustering("samples").aggregate(uploads, 1)
    assert OracleClustering.needs_task_labels and not create_algorithm(build_config({})).needs_task_labels
    # task a (rows 2, 3): equal weights -> [15, 5]; task b (rows 0, 1): 1:3 -> [2.5, 1.5]
    np.testing.assert_allclose(result.adapters[result.labels[2]], [15.0, 5.0])
    np.testing.assert_allclose(result.adapters[result.labels[0]], [2.5, 1.5])
    with pytest.raises(ValueError, match="true task labels"):
        OracleClustering("samples").aggregate(Uploads(VECTORS, SAMPLES), 1)


def test_local_and_centralized_never_communicate():
    for algorithm in (LocalOnly(), Centralized()):
        assert not algorithm.communicates
        result = algorithm.aggregate(Uploads(VECTORS, SAMPLES), 1)
        np.testing.assert_array_equal(result.adapters[result.labels], VECTORS)
    assert Centralized.pools_data and not LocalOnly.pools_data


def test_ifca_averages_by_choice_and_keeps_unchosen_adapters():
    ifca = IFCA(n_clusters=3, weighting="samples")
    initial = np.array([[0.0, 0.0], [5.0, 5.0], [-7.0, 7.0]], dtype=np.float32)
    ifca.set_globals(initial)
    uploads = Uploads(VECTORS, SAMPLES, choices=np.array([0, 0, 1, 1]))
    result = ifca.aggregate(uploads, 1)
    np.testing.assert_allclose(result.adapters[0], [2.5, 1.5])  # (1*[1,0] + 3*[3,2]) / 4
    np.testing.assert_allclose(result.adapters[1], [15.0, 5.0])
    np.testing.assert_allclose(result.adapters[2], [-7.0, 7.0])  # nobody chose it: unchanged
    np.testing.assert_allclose(result.weights, [4.0, 4.0, 0.0])
    np.testing.assert_array_equal(result.labels, [0, 0, 1, 1])
    # the server state carries over to the next round
    again = ifca.aggregate(Uploads(VECTORS[:1], SAMPLES[:1], choices=np.array([2])), 2)
    np.testing.assert_allclose(again.adapters, [[2.5, 1.5], [15.0, 5.0], [1.0, 0.0]])


def test_ifca_rejects_bad_choices_and_missing_state():
    ifca = IFCA(2, "samples")
    with pytest.raises(ValueError, match="set_globals"):
        ifca.aggregate(Uploads(VECTORS, SAMPLES, choices=np.zeros(4, int)), 1)
    ifca.set_globals(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="0..1"):
        ifca.aggregate(Uploads(VECTORS, SAMPLES, choices=np.array([0, 1, 2, 0])), 1)
    with pytest.raises(ValueError, match="initial adapters"):
        ifca.set_globals(np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_registered_algorithm_can_be_built(name):
    assert create_algorithm(build_config({"algorithm": name})).name == name


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"algorithm": "fedit", "federation": {"n_clusters": 3}}, "federation.n_clusters"),
        ({"algorithm": "oracle", "federation": {"kmeans_n_init": 5}}, "federation.kmeans_n_init"),
        ({"algorithm": "ifca", "federation": {"clustering_backend": "sklearn"}}, "federation.clustering_backend"),
        ({"algorithm": "local", "federation": {"weighting": "uniform"}}, "federation.weighting"),
    ],
)
def test_options_an_algorithm_does_not_use_are_rejected(raw, field):
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    issue = info.value.issues[0]
    assert issue.field == field and "not used by algorithm" in issue.allowed


def test_resolved_config_of_each_algorithm_loads_back():
    for name in ALGORITHMS:
        config = build_config({"algorithm": name})
        assert build_config(config.resolved()).algorithm == name
