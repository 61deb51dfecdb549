"""Heterogeneous LoRA ranks (models/ranks.py): rank profiles, rank masks, truncation on the server,
traffic at each client's rank, and the batched pass over mixed ranks against one adapter at a time."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from fltac_ray.algorithms import resolve_algorithm
from fltac_ray.algorithms.base import AdapterSpec, Upload
from fltac_ray.engine.messages import PassResult
from fltac_ray.engine.simulation import Simulation
from fltac_ray.errors import ConfigError
from fltac_ray.models.ranks import RankMasks, assign_ranks, rank_counts, rank_mask, sent_entries
from fltac_ray.progress import Progress
from fltac_ray.server.server import Server

from .conftest import tiny_config

# one LoRA pair of rank 3 (A: 3 x 2, B: 2 x 3) and a head bias
LAYOUT = [("x.lora_A.default.weight", (3, 2)), ("x.lora_B.default.weight", (2, 3)), ("head.bias", (2,))]


def test_rank_masks_keep_a_rows_and_b_columns_within_the_rank_hand_computed():
    one = rank_mask(LAYOUT, 1)
    # A rows: [a00 a01 | a10 a11 | a20 a21] -> the first row; B (2, 3) row-major: column 0 of each row
    assert one.tolist() == [True, True, False, False, False, False,
                            True, False, False, True, False, False,
                            True, True]
    assert rank_mask(LAYOUT, 3).all()
    assert sent_entries(LAYOUT, 2) == 4 + 4 + 2
    assert sent_entries(LAYOUT, 1, shared=np.array([False] * 6 + [True] * 8)) == 2 + 2  # B and the head only


def test_rank_profiles_follow_flexloras_distributions_and_are_seeded():
    ranks, clients = [1, 2, 4, 8], 4000
    homo = assign_ranks("homo", ranks, clients, seed=0)
    assert set(homo.tolist()) == {8}
    heavy = assign_ranks("heavy_tail", ranks, clients, seed=0)
    assert rank_counts(heavy) == {1: 3400, 2: 200, 4: 200, 8: 200}  # 85% exactly, the tail spread evenly
    strong = assign_ranks("heavy_tail_strong", ranks, clients, seed=0)
    assert rank_counts(strong) == {1: 200, 2: 200, 4: 200, 8: 3400}
    small = assign_ranks("heavy_tail", ranks, 10, seed=0)  # round(8.5) = 8 at rank 1, a tail of 2 even here
    assert rank_counts(small) == {1: 8, 2: 1, 4: 1} and small.tolist() != sorted(small.tolist())  # shuffled
    uniform = rank_counts(assign_ranks("random", ranks, clients, seed=0))
    assert all(count == pytest.approx(clients / 4, rel=0.08) for count in uniform.values())
    normal = rank_counts(assign_ranks("normal", ranks, clients, seed=0))
    # index ~ N(1.5, 4/6) rounded: the two middle ranks hold most clients, the ends few
    assert normal[2] + normal[4] > 0.8 * clients and normal[1] < 0.1 * clients and normal[8] < 0.1 * clients
    assert np.array_equal(assign_ranks("random", ranks, 50, seed=3), assign_ranks("random", ranks, 50, seed=3))
    assert not np.array_equal(assign_ranks("random", ranks, 50, seed=3), assign_ranks("random", ranks, 50, seed=4))
    assert assign_ranks("explicit", ranks, 3, seed=0, per_client=[8, 1, 2]).tolist() == [8, 1, 2]


@pytest.mark.parametrize(("lora", "sections", "words"), [
    ({"rank": 4, "rank_profile": {"ranks": [1, 2]}}, {}, "the largest must be model.lora.rank (4)"),
    ({"rank": 4, "rank_profile": {"ranks": [1, 4], "distribution": "explicit", "per_client": [1, 4]}}, {},
     "one rank per client (data.num_clients = 4), got 2"),
    ({"rank": 4, "rank_profile": {"ranks": [1, 4], "distribution": "explicit", "per_client": [1, 4, 5, 1]}}, {},
     "every rank must be in 1..4"),
    ({"rank": 4, "rank_profile": {"ranks": [1, 4], "per_client": [1, 4, 4, 1]}}, {},
     "per_client: only used with distribution: explicit"),
    ({"rank": 4, "rank_profile": {"ranks": [1, 4]}}, {"algorithm": "ifca"},
     "algorithm 'ifca' sends more than one answer row per adapter"),
    ({"rank": 4, "rank_profile": {"ranks": [1, 4]}}, {"privacy": {"mode": "example", "noise_multiplier": 1}},
     "privacy.mode example would add DP-SGD noise to the zero padding"),
])
def test_rank_profiles_that_cannot_hold_are_refused(lora, sections, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        tiny_config(model={"name": "tiny-random-bert", "lora": lora}, **sections)


def test_the_server_truncates_each_answer_to_its_clients_rank_and_counts_traffic_at_that_rank():
    config = tiny_config(algorithm={"name": "fedit", "weighting": "uniform"},
                         model={"lora": {"rank": 3, "rank_profile": {"distribution": "explicit", "ranks": [1, 3],
                                                                     "per_client": [1, 3, 3, 1]}}})
    spec = AdapterSpec(tuple(LAYOUT))
    server = Server(config, resolve_algorithm("fedit"), spec)
    server.set_initial(np.zeros((1, spec.size), np.float32))
    masks = RankMasks.for_config(config, LAYOUT)
    low = masks.truncate(0, np.arange(1, 15, dtype=np.float32))  # client 0: rank 1
    high = np.full(14, 2.0, np.float32)  # client 1: rank 3
    keys = [(0, 0), (1, 0)]
    uploads = [Upload(keys[0], low, 1, padding=masks.padding(0)), Upload(keys[1], high, 1, padding=masks.padding(1))]
    server.receive(1, 0, PassResult(uploads, keys, np.stack([low, high])), None)
    outcome = server.close_round(1, keys, 2)
    mean = (low + high) / 2  # zero-padding FedAvg: the rank-1 client's padding counts as zeros
    np.testing.assert_allclose(server.store.adapter((1, 0)), mean)  # rank 3 keeps it all
    np.testing.assert_allclose(server.store.adapter((0, 0)), np.where(masks.mask(0), mean, 0))  # rank 1: truncated
    assert outcome.params_up == (2 + 2 + 2) + 14 and outcome.params_down == (2 + 2 + 2) + 14


def _ranked_run(tmp_path, name, **engine):
    lora = {"rank": 4, "rank_profile": {"distribution": "explicit", "ranks": [1, 2, 4], "per_client": [1, 4, 2, 4]}}
    config = tiny_config(rounds=2, model={"name": "tiny-random-bert", "lora": {**lora, "dropout": 0.0}},
                         report={"adapter_snapshots": 2}, engine={"backend": "local", **engine})
    return Simulation(config, out=str(tmp_path / name), progress=Progress()).run()


def test_a_mixed_rank_batched_pass_equals_one_adapter_at_a_time_and_keeps_the_padding_zero():
    from fltac_ray.client.batched_training import train_batched
    from fltac_ray.client.training import train_adapter

    from .test_batched import CPU, _jobs, _model, _text_split

    model = _model("tiny-random-bert", "text", head_classes=5)  # rank 2: clients of rank 1 and 2
    layout = model.adapter_layout()
    splits = [(_text_split(40, 2, 0), 2), (_text_split(40, 5, 1), 5), (_text_split(40, 3, 2), 3)]
    ranks = [1, 2, 1]

    def jobs():
        made = _jobs(model, splits, steps=[4, 4, 3])
        for job, rank in zip(made, ranks, strict=True):  # as the worker starts them: truncated to the rank
            job.start = np.where(rank_mask(layout, rank), job.start, np.float32(0))
        return made

    single = [train_adapter(model, job.start, job.split, job.indices, job.num_classes, job.steps, 4, 1e-2, 0.01,
                            np.random.default_rng([1, j]), CPU) for j, job in enumerate(jobs())]
    batched = train_batched(model, jobs(), 4, 1e-2, 0.01, CPU)
    for b, s, job, rank in zip(batched, single, jobs(), ranks, strict=True):
        np.testing.assert_allclose(b.adapter, s.adapter, atol=2e-5, rtol=1e-4)
        outside = ~rank_mask(layout, rank)
        assert not b.adapter[outside].any() and not s.adapter[outside].any()  # zero stays zero
        assert np.abs(b.adapter - job.start).max() > 1e-3  # it trained


def test_a_mixed_rank_run_sends_each_clients_rank(tmp_path, capsys):
    from fltac_ray.runs.snapshots import read_snapshots

    batched = _ranked_run(tmp_path, "batched")
    out = capsys.readouterr().out
    assert "LoRA ranks 1-4 (explicit: 1 client at 1, 1 at 2, 2 at 4; every adapter padded to 4)" in out
    partition = pd.read_csv(batched.run_dir / "partition.csv")
    assert partition.groupby("client")["rank"].first().tolist() == [1, 4, 2, 4]
    clients = pd.read_csv(batched.run_dir / "clients.csv")
    assert set(zip(clients["client"], clients["rank"], strict=True)) <= {(0, 1), (1, 4), (2, 2), (3, 4)}
    layout = _layout()
    for snapshot in read_snapshots(batched.run_dir):  # every upload zero beyond its client's rank
        for client, adapter in zip(snapshot.clients, snapshot.adapters, strict=True):
            rank = [1, 4, 2, 4][int(client)]
            assert not adapter[~rank_mask(layout, rank)].any()
    sent = sum(sent_entries(layout, [1, 4, 2, 4][c]) * len(tasks) for c, tasks in _tasks_of(batched.run_dir).items())
    assert batched.rounds["params_up"].tolist() == [sent, sent]  # FL-TAC: every client every round, all its tasks
    assert batched.rounds["params_down"].tolist() == [sent, sent]  # each answer within its client's rank


def _layout():
    """The tiny experiment's adapter layout at rank 4 (4 head classes: its largest task)."""
    from fltac_ray.config import ModelConfig
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import load_backbone

    config = ModelConfig(name="tiny-random-bert", lora={"rank": 4}, )
    return AdapterModel(load_backbone("tiny-random-bert", "text"), config, 4, seed=0).adapter_layout()


def _tasks_of(run_dir) -> dict[int, list[str]]:
    partition = pd.read_csv(run_dir / "partition.csv")
    held = partition[partition["train_samples"] > 0]
    return {int(c): list(group["task"]) for c, group in held.groupby("client")}


# rank 1, d = 2: A (1, 2), B (2, 1), and a head (3, 2)
PAIR = (("q.lora_A.default.weight", (1, 2)), ("q.lora_B.default.weight", (2, 1)), ("head.weight", (3, 2)))


def _upload(a, b, head):
    return np.array([*a, *b, *head], np.float32)


def test_hetlora_weights_each_layer_by_its_update_norm_hand_computed():
    from fltac_ray.algorithms.hetlora import norm_weighted_means

    # client 1: A = e1, B = e1 (||B A|| = 1); client 2: A = 2 e2, B = e2 (||B A|| = 2): p = 1/3, 2/3
    vectors = np.stack([_upload([1, 0], [1, 0], [1] * 6), _upload([0, 2], [0, 1], [3] * 6)])
    result = norm_weighted_means(vectors, np.zeros(2, np.int64), np.ones(2), PAIR)
    np.testing.assert_allclose(result.adapters[0, :2], [1 / 3, 4 / 3], rtol=1e-6)  # A
    np.testing.assert_allclose(result.adapters[0, 2:4], [1 / 3, 2 / 3], rtol=1e-6)  # B
    np.testing.assert_allclose(result.adapters[0, 4:], [2] * 6)  # the head: FedAvg (uniform weights here)
    still = np.stack([_upload([1, 0], [0, 0], [0] * 6), _upload([0, 1], [0, 0], [0] * 6)])  # every B zero
    np.testing.assert_allclose(norm_weighted_means(still, np.zeros(2, np.int64), np.array([1.0, 3.0]), PAIR)
                               .adapters[0, :2], [0.25, 0.75])  # FedAvg weights stand


def test_flexlora_answers_the_best_rank_r_approximation_of_the_summed_updates():
    from fltac_ray.algorithms.flexlora import svd_means

    # dW = 1/2 e1 e1' + 1/2 (2 e2 e2') = diag(1/2, 1); its best rank-1 approximation is diag(0, 1)
    vectors = np.stack([_upload([1, 0], [1, 0], [1] * 6), _upload([0, 2], [0, 1], [3] * 6)])
    answer = svd_means(vectors, np.zeros(2, np.int64), np.ones(2), PAIR).adapters[0]
    product = answer[2:4].reshape(2, 1) @ answer[:2].reshape(1, 2)
    np.testing.assert_allclose(product, [[0, 0], [0, 1]], atol=1e-6)
    np.testing.assert_allclose(answer[4:], [2] * 6)
    # rank 2 holds both components: the product of the answer is the weighted sum exactly, not
    # the product of the averaged factors (FedAvg's error, server/lora_products.py)
    two = (("q.lora_A.default.weight", (2, 2)), ("q.lora_B.default.weight", (2, 2)))
    a1, b1, a2, b2 = np.eye(2), np.array([[1.0, 0], [0, 0]]), np.array([[0, 1.0], [1, 0]]), np.eye(2)
    rows = np.stack([np.concatenate([a1.ravel(), b1.ravel()]), np.concatenate([a2.ravel(), b2.ravel()])])
    answer = svd_means(rows.astype(np.float32), np.zeros(2, np.int64), np.array([1.0, 3.0]), two).adapters[0]
    np.testing.assert_allclose(answer[4:].reshape(2, 2) @ answer[:4].reshape(2, 2),
                               0.25 * b1 @ a1 + 0.75 * b2 @ a2, atol=1e-6)


@pytest.mark.parametrize(("algorithm", "words"), [
    ({"name": "fltac", "rank_aggregation": "flexlora"}, "only for adapters of different ranks"),
    ({"name": "hetlora", "aggregation": "median"}, "hetlora has its own rule for the LoRA layers; use mean"),
])
def test_heterogeneous_rules_where_they_do_not_apply_are_refused(algorithm, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        tiny_config(algorithm=algorithm)
    with pytest.raises(ConfigError, match=re.escape("answers with no plain mean of the uploads")):
        tiny_config(algorithm={"name": "flexlora", "weighting": "uniform"},
                    privacy={"mode": "client_central", "noise_multiplier": 1.0})


@pytest.mark.usefixtures("ray_cluster")
def test_hetlora_flexlora_and_fltac_across_ranks_run_and_flexlora_is_the_same_on_both_backends(tmp_path):
    profile = {"rank": 4, "rank_profile": {"distribution": "explicit", "ranks": [1, 2, 4], "per_client": [1, 4, 2, 4]}}

    def run(name, algorithm, **engine):
        config = tiny_config(rounds=2, algorithm=algorithm, model={"name": "tiny-random-bert", "lora": profile},
                             engine={"backend": "local", **engine})
        return Simulation(config, out=str(tmp_path / name), progress=Progress(quiet=True)).run()

    local = run("flex_local", "flexlora", min_passes=2)
    on_ray = run("flex_ray", "flexlora", backend="ray", num_workers=2)
    pd.testing.assert_frame_equal(local.metrics, on_ray.metrics, check_exact=True)
    for index, algorithm in enumerate(("hetlora", {"name": "fltac", "rank_aggregation": "hetlora"},
                                       {"name": "fltac", "rank_aggregation": "flexlora", "cluster_on": "products"})):
        result = run(f"other_{index}", algorithm)
        assert result.rounds["mean_accuracy"].notna().all() and (result.rounds["status"] == "ok").all()


def test_params_counts_each_ranks_traffic_as_a_homogeneous_run_at_that_rank_sends():
    from fltac_ray.models.counting import count_parameters, format_count

    def config(lora, algorithm="fltac"):
        return tiny_config(algorithm=algorithm, model={"name": "tiny-random-bert", "lora": lora})

    profile = {"rank": 4, "rank_profile": {"distribution": "explicit", "ranks": [1, 2, 4], "per_client": [1, 4, 2, 4]}}
    for algorithm in ("fltac", "ffa"):  # whole adapters, and B with the head only
        mixed = count_parameters(config(profile, algorithm))
        for rank, clients in ((1, 1), (2, 1), (4, 2)):
            alone = count_parameters(config({"rank": rank}, algorithm))
            assert mixed.per_rank[rank] == (clients, alone.up_per_round, alone.down_per_round)
    assert "rank 4 (2 clients): sent up per round" in format_count(mixed)
