"""Every algorithm's hooks against hand-computed numbers, and their option rules."""

import numpy as np
import pytest

from fltac_ray.algorithms import BUILTIN, AdapterSpec, ClientJob, create_algorithm
from fltac_ray.algorithms.base import Uploads
from fltac_ray.config import build_config
from fltac_ray.errors import ConfigError

VECTORS = np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [20.0, 0.0]], dtype=np.float32)
SAMPLES = np.array([1, 3, 2, 2])
# a toy adapter of 6 entries: lora_A (1, 2), lora_B (2, 1), head.bias (2,)
SPEC = AdapterSpec((("layer.lora_A.default.weight", (1, 2)), ("layer.lora_B.default.weight", (2, 1)),
                    ("head.bias", (2,))))


def _algorithm(name, **sections):
    algorithm = create_algorithm(build_config({"algorithm": name, **sections}))
    algorithm.setup(SPEC)
    return algorithm


def test_fedit_one_adapter_per_client_and_plain_fedavg():
    algorithm = _algorithm("fedit")
    assert algorithm.client_adapters(["a", "b", "c"]) == [["a", "b", "c"]]
    result = algorithm.aggregate(Uploads(VECTORS, SAMPLES), 1)
    # (1*[1,0] + 3*[3,2] + 2*[10,10] + 2*[20,0]) / 8 = [70/8, 26/8]
    np.testing.assert_allclose(result.adapters, [[8.75, 3.25]])
    np.testing.assert_array_equal(result.labels, [0, 0, 0, 0])
    assert not algorithm.recovers_tasks  # FedIT does not try to recover tasks


def test_fedit_uniform_weighting():
    result = _algorithm({"name": "fedit", "weighting": "uniform"}).aggregate(Uploads(VECTORS, SAMPLES), 1)
    np.testing.assert_allclose(result.adapters, [[8.5, 3.0]])


def test_fedit_step_budget_per_task_or_split_over_the_adapter():
    assert _algorithm("fedit").task_steps(["a", "b", "c"], 15) == (15, 15, 15)
    split = _algorithm({"name": "fedit", "budget": "per_adapter"})
    assert split.task_steps(["a", "b", "c"], 15) == (5, 5, 5)  # the authors': 15 // 3 each
    assert split.task_steps(["a", "b", "c"], 2) == (1, 1, 1)  # at least one step per task
    assert _algorithm("fltac").task_steps(["a"], 15) == (15,)
    with pytest.raises(ConfigError, match="algorithm.budget = 'per_adapter': not an option of algorithm 'fltac'"):
        build_config({"algorithm": {"name": "fltac", "budget": "per_adapter"}})


def test_oracle_uploads_carry_the_true_task_and_group_by_it():
    oracle = _algorithm("oracle")
    upload = oracle.upload(ClientJob((3, 1), ("b",), 7), np.zeros(6, np.float32), np.zeros(0), {})
    assert upload.meta == {"task": "b"} and upload.params == 6  # a label is no parameter
    assert "task" not in _algorithm("fltac").upload(ClientJob((3, 1), ("b",), 7), np.zeros(6, np.float32),
                                                    np.zeros(0), {}).meta
    result = oracle.aggregate(Uploads(VECTORS, SAMPLES, meta={"task": ["b", "b", "a", "a"]}), 1)
    # task a (rows 2, 3): equal weights -> [15, 5]; task b (rows 0, 1): 1:3 -> [2.5, 1.5]
    np.testing.assert_allclose(result.adapters[result.labels[2]], [15.0, 5.0])
    np.testing.assert_allclose(result.adapters[result.labels[0]], [2.5, 1.5])
    with pytest.raises(ValueError, match="true task labels"):
        oracle.aggregate(Uploads(VECTORS, SAMPLES), 1)


@pytest.mark.parametrize("name", ["local", "centralized"])
def test_local_and_centralized_send_nothing_and_keep_what_they_trained(name):
    algorithm = _algorithm(name)
    trained = np.arange(6, dtype=np.float32)
    assert algorithm.upload(ClientJob((0, 0), ("a",), 5), trained, np.zeros(0), {}) is None
    np.testing.assert_array_equal(algorithm.merge(trained, None), trained)


def test_ifca_starts_from_the_lowest_loss_global_and_averages_by_choice():
    ifca = _algorithm({"name": "ifca", "n_clusters": 3})
    initial = np.array([[0.0, 0.0], [5.0, 5.0], [-7.0, 7.0]], dtype=np.float32)
    ifca.set_initial(initial)
    # the client's probe loss is lowest for global 1, so it starts there whatever it held
    start, meta = ifca.start(ClientJob((0, 0), ("a",), 1), np.ones(2, np.float32), ifca.broadcast(),
                             lambda v: float(np.abs(v - 4.0).sum()))
    np.testing.assert_array_equal(start, initial[1])
    assert meta == {"choice": 1}
    result = ifca.aggregate(Uploads(VECTORS, SAMPLES, meta={"choice": [0, 0, 1, 1]}), 1)
    np.testing.assert_allclose(result.adapters[0], [2.5, 1.5])  # (1*[1,0] + 3*[3,2]) / 4
    np.testing.assert_allclose(result.adapters[1], [15.0, 5.0])
    np.testing.assert_allclose(result.adapters[2], [-7.0, 7.0])  # nobody chose it: unchanged
    np.testing.assert_allclose(result.weights, [4.0, 4.0, 0.0])
    np.testing.assert_array_equal(result.labels, [0, 0, 1, 1])
    # every client that delivered downloaded all K adapters: 2 clients x 3 x 2
    assert ifca.download_params(result, clients=2) == 12
    # the server state carries over to the next round
    again = ifca.aggregate(Uploads(VECTORS[:1], SAMPLES[:1], meta={"choice": [2]}), 2)
    np.testing.assert_allclose(again.adapters, [[2.5, 1.5], [15.0, 5.0], [1.0, 0.0]])
    np.testing.assert_allclose(ifca.broadcast(), again.adapters)


def test_ifca_rejects_bad_choices_and_missing_state():
    ifca = _algorithm({"name": "ifca", "n_clusters": 2})
    with pytest.raises(ValueError, match="set_initial"):
        ifca.aggregate(Uploads(VECTORS, SAMPLES, meta={"choice": [0, 0, 0, 0]}), 1)
    ifca.set_initial(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="0..1"):
        ifca.aggregate(Uploads(VECTORS, SAMPLES, meta={"choice": [0, 1, 2, 0]}), 1)
    with pytest.raises(ValueError, match="initial adapters"):
        ifca.set_initial(np.zeros((3, 2), np.float32))


def test_fedsa_sends_only_a_and_keeps_b_and_the_head():
    fedsa = _algorithm("fedsa")
    trained = np.array([1, 2, 3, 4, 5, 6], np.float32)  # A = [1, 2], B = [3, 4], head = [5, 6]
    upload = fedsa.upload(ClientJob((0, 0), ("a",), 2), trained, np.zeros(0), {})
    np.testing.assert_array_equal(upload.vector, [1, 2])
    assert upload.params == 2 and fedsa.upload_width() == 2
    # the server averages the A parts: (2 * [1, 2] + 6 * [5, 2]) / 8 = [4, 2]
    result = fedsa.aggregate(Uploads(np.array([[1, 2], [5, 2]], np.float32), np.array([2, 6])), 1)
    np.testing.assert_allclose(result.adapters, [[4.0, 2.0]])
    # the client takes the average A and keeps its own B and head
    np.testing.assert_allclose(fedsa.merge(trained, result.adapters[0]), [4, 2, 3, 4, 5, 6])
    assert fedsa.download_params(result, clients=2) == 2 * 2
    assert fedsa.global_adapters(result) is None  # no shared model to export


def test_ffa_freezes_a_and_averages_b_and_the_head():
    ffa = _algorithm("ffa")
    np.testing.assert_array_equal(ffa.trainable_entries(), [False, False, True, True, True, True])
    ffa.set_initial(np.array([[0.5, -0.5, 0, 0, 0, 0]], np.float32))
    trained = np.array([0.5, -0.5, 1, 2, 3, 4], np.float32)
    upload = ffa.upload(ClientJob((0, 0), ("a",), 1), trained, np.zeros(0), {})
    np.testing.assert_array_equal(upload.vector, [1, 2, 3, 4])
    vectors = np.array([[1, 2, 3, 4], [3, 2, 1, 0]], np.float32)
    result = ffa.aggregate(Uploads(vectors, np.array([1, 1])), 1)
    np.testing.assert_allclose(result.adapters, [[2, 2, 2, 2]])
    np.testing.assert_allclose(ffa.merge(trained, result.adapters[0]), [0.5, -0.5, 2, 2, 2, 2])
    # the exported global adapter: the shared frozen A of v^0 with the averaged B and head
    np.testing.assert_allclose(ffa.global_adapters(result), [[0.5, -0.5, 2, 2, 2, 2]])
    assert ffa.client_adapters(["a", "b"]) == [["a"], ["b"]]  # per_task, FL-TAC's client side
    assert _algorithm({"name": "ffa", "adapters": "per_client"}).client_adapters(["a", "b"]) == [["a", "b"]]  # FedIT's


def test_floral_uploads_its_router_mixture_never_the_router():
    floral = _algorithm("floral", data={"tasks": ["synthetic_sentiment", "synthetic_topic"]})
    router = np.array([0.0, np.log(3.0)], np.float32)  # softmax -> [0.25, 0.75]
    upload = floral.upload(ClientJob((0, 0), ("a",), 1), np.zeros(6, np.float32), router, {})
    np.testing.assert_allclose(upload.extras["mixture"], [0.25, 0.75], rtol=1e-6)
    assert upload.params == 6 + 2
    np.testing.assert_allclose(floral.mixture(np.zeros(0, np.float32)), [0.5, 0.5])  # untrained


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_registered_algorithm_can_be_built(name):
    assert create_algorithm(build_config({"algorithm": name})).name == name


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"algorithm": {"name": "fedit", "n_clusters": 3}}, "algorithm.n_clusters"),
        ({"algorithm": {"name": "oracle", "kmeans_n_init": 5}}, "algorithm.kmeans_n_init"),
        ({"algorithm": {"name": "ifca", "clustering_backend": "sklearn"}}, "algorithm.clustering_backend"),
        ({"algorithm": {"name": "local", "weighting": "uniform"}}, "algorithm.weighting"),
        ({"algorithm": {"name": "fedsa", "temperature": 2.0}}, "algorithm.temperature"),
        # where these lived before they were algorithm options: moved, then checked the same way
        ({"algorithm": "fedit", "federation": {"n_clusters": 3}}, "algorithm.n_clusters"),
    ],
)
def test_options_an_algorithm_does_not_use_are_rejected(raw, field):
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    issue = info.value.issues[0]
    assert issue.field == field and ("not an option of algorithm" in issue.allowed or "has no options" in issue.allowed)


def test_resolved_config_of_each_algorithm_loads_back():
    for name in BUILTIN:
        config = build_config({"algorithm": name})
        assert build_config(config.resolved()).algorithm == name
