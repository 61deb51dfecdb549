"""The error of averaging LoRA factors instead of their products, by hand, and on a server round."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fltac_ray.algorithms import resolve_algorithm
from fltac_ray.algorithms.base import AdapterSpec, Upload
from fltac_ray.engine.messages import PassResult
from fltac_ray.server.lora_products import lora_pairs, product_error, round_product_error
from fltac_ray.server.server import Server

from .conftest import tiny_config

LAYOUT = (("q.lora_A.default.weight", (1, 2)), ("q.lora_B.default.weight", (2, 1)), ("head.weight", (3, 2)))


def test_two_orthogonal_rank_one_updates_hand_computed():
    # A1 = e1, A2 = e2 (as rows), B1 = e1, B2 = e2 (as columns), p = 1/2 each:
    # mean of products = (e1 e1' + e2 e2') / 2 = I / 2, norm sqrt(2) / 2
    # product of means = (1/2, 1/2)' (1/2, 1/2) = all 1/4; difference [[1/4, -1/4], [-1/4, 1/4]], norm 1/2
    a = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # (2, r=1, d_in=2)
    b = np.array([[[1.0], [0.0]], [[0.0], [1.0]]])  # (2, d_out=2, r=1)
    assert product_error(a, b, np.array([0.5, 0.5])) == pytest.approx(0.5 / (math.sqrt(2) / 2))  # 1 / sqrt(2)
    assert product_error(np.repeat(a[:1], 2, axis=0), b, np.array([0.3, 0.7])) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(product_error(a, np.zeros_like(b), np.array([0.5, 0.5])))  # B at its zero init


def test_pairs_are_found_by_name_and_shape():
    assert lora_pairs(LAYOUT) == [(slice(0, 2), (1, 2), slice(2, 4), (2, 1))]
    assert lora_pairs((("head.weight", (3, 2)),)) == []


def test_the_round_error_averages_layers_over_groups_of_two_or_more():
    orthogonal = [np.array([1, 0, 1, 0, *[0] * 6], np.float32), np.array([0, 1, 0, 1, *[0] * 6], np.float32)]
    alone = np.array([5, 5, 5, 5, *[0] * 6], np.float32)
    labels = np.array([0, 0, 1])  # the third upload is a group of one: no error to measure
    error = round_product_error([*orthogonal, alone], labels, np.ones(3), LAYOUT)
    assert error == pytest.approx(1 / math.sqrt(2))  # the orthogonal pair's, as above
    assert math.isnan(round_product_error([alone], np.array([0]), np.ones(1), LAYOUT))


def test_a_server_round_reports_the_error_for_whole_adapters_only():
    config = tiny_config(algorithm={"name": "fedit", "weighting": "uniform"})
    spec = AdapterSpec(LAYOUT)
    server = Server(config, resolve_algorithm("fedit"), spec)
    server.set_initial(np.zeros((1, spec.size), np.float32))
    vectors = np.zeros((2, spec.size), np.float32)
    vectors[0, :4] = [1, 0, 1, 0]
    vectors[1, :4] = [0, 1, 0, 1]
    keys = [(0, 0), (1, 0)]
    server.receive(1, 0, PassResult([Upload(k, vectors[i], 1) for i, k in enumerate(keys)], keys, vectors), None)
    outcome = server.close_round(1, keys, 2)
    assert outcome.lora_product_error == pytest.approx(1 / math.sqrt(2))  # the orthogonal pair again
    fedsa = Server(tiny_config(algorithm="fedsa"), resolve_algorithm("fedsa"), spec)  # uploads A alone
    fedsa.set_initial(np.zeros((1, spec.size), np.float32))
    shared = fedsa.algorithm.shared_entries()
    fedsa.receive(1, 0, PassResult([Upload(k, vectors[i][shared], 1) for i, k in enumerate(keys)], keys, vectors),
                  None)
    assert math.isnan(fedsa.close_round(1, keys, 2).lora_product_error)


def test_the_product_sketch_sees_the_update_not_its_factors_or_their_rank():
    from fltac_ray.server.lora_products import product_sketch

    layout = (("q.lora_A.default.weight", (2, 3)), ("q.lora_B.default.weight", (3, 2)), ("head.bias", (2,)))
    a, b = np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, 3.0])
    rank_one = np.concatenate([a, np.zeros(3), np.stack([b, np.zeros(3)], axis=1).ravel(), [7, 8]])
    # rank two, the same update: B A = b a/2 + b a/2 = b a'
    rank_two = np.concatenate([a / 2, a / 2, np.stack([b, b], axis=1).ravel(), [7, 8]])
    other = np.concatenate([a, np.zeros(3), np.stack([-b, np.zeros(3)], axis=1).ravel(), [7, 8]])
    sketches = product_sketch(np.stack([rank_one, rank_two, other]), layout, size=4, seed=3)
    assert sketches.shape == (3, 16 + 2)
    np.testing.assert_allclose(sketches[0], sketches[1], rtol=1e-5, atol=1e-6)  # one update, two factorings
    np.testing.assert_allclose(sketches[2, :16], -sketches[0, :16], rtol=1e-5)  # the opposite update
    np.testing.assert_array_equal(sketches[:, 16:], [[7, 8]] * 3)  # the head as it is
    assert not np.allclose(product_sketch(rank_one[None], layout, 4, seed=4), sketches[:1])  # seeded
