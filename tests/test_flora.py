"""FLoRA (algorithms/flora.py): the stacked product is the weighted sum of the clients' updates
exactly, it accumulates across rounds, the download counts the stacks, the worker's folded base
equals training with the adapter, and a run is the same on both backends and after a resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fltac_ray.algorithms import resolve_algorithm
from fltac_ray.algorithms.base import AdapterSpec, Uploads
from fltac_ray.algorithms.flora import stacked_update
from fltac_ray.engine.simulation import Simulation
from fltac_ray.errors import ConfigError
from fltac_ray.progress import Progress

from .conftest import tiny_config

# one LoRA pair padded to rank 2 (A: 2 x 3, B: 2 x 2) and a head bias (2,)
LAYOUT = (("q.lora_A.default.weight", (2, 3)), ("q.lora_B.default.weight", (2, 2)), ("head.bias", (2,)))


def _flora(per_client, weighting="samples"):
    config = tiny_config(algorithm={"name": "flora", "weighting": weighting},
                         model={"lora": {"rank": 2, "rank_profile": {"distribution": "explicit", "ranks": [1, 2],
                                                                     "per_client": per_client}}})
    algorithm = resolve_algorithm("flora")(config)
    algorithm.setup(AdapterSpec(LAYOUT))
    algorithm.set_initial(np.arange(12, dtype=np.float32)[None, :] / 10)  # v^0: A 0..0.5, B 0.6..0.9
    return algorithm


def _row(a, b, head):
    return np.concatenate([np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel(),
                           np.asarray(head, np.float32)])


def test_the_stacks_multiply_to_the_weighted_sum_of_the_updates_and_accumulate_hand_computed():
    algorithm = _flora([1, 2, 2, 1])
    # client 0 at rank 1: A = [1 0 0; 0 0 0], B = [[2 0], [0 0]] -> B A = [[2 0 0], [0 0 0]]
    low = _row([[1, 0, 0], [0, 0, 0]], [[2, 0], [0, 0]], [1, 1])
    # client 1 at rank 2: A = [0 1 0; 0 0 1], B = I -> B A = [[0 1 0], [0 0 1]]
    high = _row([[0, 1, 0], [0, 0, 1]], [[1, 0], [0, 1]], [4, 7])
    uploads = Uploads(np.stack([low, high]), np.array([1, 3]), meta={"rank": [1, 2]})
    answer = algorithm.aggregate(uploads, 1)
    first = 0.25 * np.array([[2, 0, 0], [0, 0, 0]]) + 0.75 * np.array([[0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(algorithm.base_update()["q"], first, atol=1e-7)
    # the answer: a fresh LoRA (A drawn as peft draws it, U(-1/sqrt(3), 1/sqrt(3)) here; B zero)
    # and the FedAvg head
    fresh_a = answer.adapters[0, :6]
    assert np.abs(fresh_a).max() <= 1 / np.sqrt(3) and len(set(fresh_a.tolist())) == 6
    assert not answer.adapters[0, 6:10].any()
    np.testing.assert_allclose(answer.adapters[0, 10:], [0.25 * 1 + 0.75 * 4, 0.25 * 1 + 0.75 * 7])
    assert answer.labels.tolist() == [0, 0]
    # each client received the stacks: (1 + 2) rows x (3 + 2) entries, and the head's 2
    assert algorithm.download_params(answer, 2) == 2 * (3 * 5 + 2)
    # round 2 adds its product to the first
    again = algorithm.aggregate(Uploads(np.stack([high]), np.array([5]), meta={"rank": [2]}), 2)
    np.testing.assert_allclose(algorithm.base_update()["q"], first + np.array([[0, 1, 0], [0, 0, 1]]), atol=1e-7)
    assert not np.array_equal(again.adapters[0, :6], fresh_a)  # a new A every round: a new subspace
    repeat = _flora([1, 2, 2, 1]).aggregate(Uploads(np.stack([high]), np.array([5]), meta={"rank": [2]}), 2)
    np.testing.assert_array_equal(repeat.adapters[0, :6], again.adapters[0, :6])  # seeded per (seed, round)
    assert algorithm.download_params(again, 1) == 2 * 5 + 2
    # a checkpoint holds the update, and a fresh server continues from it
    restored = _flora([1, 2, 2, 1])
    restored.load_state(algorithm.state())
    np.testing.assert_array_equal(restored.base_update()["q"], algorithm.base_update()["q"])


def test_stacking_is_the_sum_of_products_where_averaging_the_factors_is_not():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 5, 4))
    p = np.array([0.2, 0.3, 0.5])
    exact = sum(p[k] * b[k] @ a[k] for k in range(3))
    np.testing.assert_allclose(stacked_update(a, b, p), exact, atol=1e-12)
    averaged = np.tensordot(p, b, axes=1) @ np.tensordot(p, a, axes=1)
    assert np.linalg.norm(averaged - exact) > 0.1 * np.linalg.norm(exact)


def test_a_folded_base_computes_what_the_adapter_did_and_unfolds_exactly():
    from fltac_ray.client.training import evaluate_adapter
    from fltac_ray.server.lora_products import named_lora_pairs

    from .test_batched import CPU, _model, _text_split

    model = _model("tiny-random-bert", "text", head_classes=3)
    split, rows = _text_split(12, 3, 0), np.arange(12)
    layout = model.adapter_layout()
    trained = model.initial + np.random.default_rng(1).normal(0, 0.3, model.adapter_size).astype(np.float32)
    fresh, updates = trained.copy(), {}
    for name, a_slice, a_shape, b_slice, b_shape in named_lora_pairs(layout):
        updates[name] = trained[b_slice].reshape(b_shape) @ trained[a_slice].reshape(a_shape)
        fresh[b_slice] = 0  # the fresh LoRA: B zero, so the adapter adds nothing

    def loss(vector):
        return evaluate_adapter(model, vector, split, rows, 3, 12, CPU).loss_sum

    with_adapter, untouched = loss(trained), loss(fresh)
    model.fold_into_base(updates)
    assert loss(fresh) == pytest.approx(with_adapter, rel=1e-5)
    assert abs(with_adapter - untouched) > 1e-3  # the update mattered
    model.fold_into_base(None)
    assert loss(fresh) == untouched  # W0 back, bit for bit
    with pytest.raises(ValueError, match="no LoRA layer of that name"):
        model.fold_into_base({"encoder.nowhere": np.zeros((2, 2), np.float32)})


@pytest.mark.parametrize(("changes", "words"), [
    ({"algorithm": {"name": "flora", "aggregation": "median"}}, "flora has its own rule for the LoRA layers"),
    ({"algorithm": "flora", "privacy": {"mode": "client_central", "noise_multiplier": 1.0}},
     "answers with no plain mean of the uploads"),
])
def test_flora_where_it_does_not_apply_is_refused(changes, words):
    with pytest.raises(ConfigError, match=words):
        tiny_config(**changes)


@pytest.mark.usefixtures("ray_cluster")
def test_a_flora_run_is_the_same_on_both_backends_and_after_a_resume(tmp_path):
    profile = {"rank": 4, "dropout": 0.0,
               "rank_profile": {"distribution": "explicit", "ranks": [1, 2, 4], "per_client": [1, 4, 2, 4]}}

    def run(name, rounds=3, **engine):
        config = tiny_config(rounds=rounds, algorithm="flora", model={"name": "tiny-random-bert", "lora": profile},
                             train={"lr": 0.05}, engine={"backend": "local", **engine})
        return Simulation(config, out=str(tmp_path / name), progress=Progress(quiet=True)).run()

    local = run("local", min_passes=2)
    on_ray = run("ray", backend="ray", num_workers=2)
    pd.testing.assert_frame_equal(local.metrics, on_ray.metrics, check_exact=True)
    # the round's traffic: every client its own rank up, the whole stacks down
    assert (local.rounds["params_down"] > local.rounds["params_up"]).all()
    # with a frozen head every client's adapter is v^0 again after each round: what the clients
    # learnt is in the folded base alone, and evaluation (not cached on the adapter) sees it
    frozen = Simulation(tiny_config(rounds=2, algorithm="flora", model={"name": "tiny-random-bert", "lora": profile,
                                                                        "head": "frozen"},
                                    train={"lr": 0.05}, engine={"backend": "local"}),
                        out=str(tmp_path / "frozen"), progress=Progress(quiet=True)).run()
    losses = frozen.metrics.groupby("round")["loss"].sum()
    assert losses[1] != losses[0] and losses[2] != losses[1]
    # resumed after round 2 (round 3's checkpoint damaged): the folded update came back with it
    newest = local.run_dir / "checkpoints" / "round_00003" / "clients.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])
    resumed = Simulation.resume(local.run_dir, progress=Progress(quiet=True)).run()
    pd.testing.assert_frame_equal(resumed.metrics, local.metrics, check_exact=True)


def test_params_counts_the_stacks_every_client_receives_at_any_rank():
    from fltac_ray.models.counting import count_parameters

    from .test_ranks import _layout

    profile = {"rank": 4, "rank_profile": {"distribution": "explicit", "ranks": [1, 2, 4], "per_client": [1, 4, 2, 4]}}
    count = count_parameters(tiny_config(algorithm="flora", model={"name": "tiny-random-bert", "lora": profile}))
    layout = _layout()
    pairs = [(shape, layout[i + 1][1]) for i, (name, shape) in enumerate(layout) if ".lora_A." in name]
    head = sum(int(np.prod(shape)) for name, shape in layout if name.startswith("head."))
    # every client of the round (all 4) uploads, so each receives rows 1 + 4 + 2 + 4 = 11 per layer
    stacks = sum(11 * (a[1] + b[0]) for a, b in pairs)
    assert count.down_per_round == head + stacks
    assert {rank: down for rank, (_, _, down) in count.per_rank.items()} == {1: head + stacks, 2: head + stacks,
                                                                          4: head + stacks}
