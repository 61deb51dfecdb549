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
    assert np.mean(heavy == 1) == pytest.approx(0.85, abs=0.02)
    assert {int(r) for r in heavy} == {1, 2, 4, 8}
    strong = assign_ranks("heavy_tail_strong", ranks, clients, seed=0)
    assert np.mean(strong == 8) == pytest.approx(0.85, abs=0.02)
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
