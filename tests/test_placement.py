import pytest

from fltac_ray.config import EngineConfig
from fltac_ray.engine.messages import TrainJob
from fltac_ray.engine.placement import plan_worker_count
from fltac_ray.engine.run_setup import sample_clients
from fltac_ray.engine.scheduling import assign_lpt, plan_passes, utilisation
from fltac_ray.errors import ConfigError


def test_worker_count_fits_cpus():
    assert plan_worker_count(10, EngineConfig(), cpus=2, gpus=0) == 2
    assert plan_worker_count(10, EngineConfig(cpus_per_worker=0.5), cpus=2, gpus=0) == 4
    assert plan_worker_count(3, EngineConfig(cpus_per_worker=0.25), cpus=2, gpus=0) == 3


def test_worker_count_bounded_by_gpu_fraction():
    engine = EngineConfig(cpus_per_worker=0.25, gpus_per_worker=0.5)
    assert plan_worker_count(10, engine, cpus=8, gpus=1) == 2


def test_one_actor_per_client_needs_enough_resources():
    engine = EngineConfig(clients_per_actor=1, cpus_per_worker=0.2)
    assert plan_worker_count(10, engine, cpus=2, gpus=0) == 10
    with pytest.raises(ConfigError, match="engine.clients_per_actor"):
        plan_worker_count(10, EngineConfig(clients_per_actor=1), cpus=2, gpus=0)


def test_a_cluster_that_may_grow_is_asked_for_the_pool_not_checked_against_its_nodes_now():
    gpu_workers = EngineConfig(num_workers=8, gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match="engine.num_workers"):  # a Ray we started cannot grow
        plan_worker_count(100, gpu_workers, cpus=2, gpus=0)
    assert plan_worker_count(100, gpu_workers, cpus=2, gpus=0, elastic=True) == 8  # waited for
    assert plan_worker_count(5, gpu_workers, cpus=2, gpus=0, elastic=True) == 5  # one per client at most
    # automatic size: what fits now, at least one worker (scale from zero)
    assert plan_worker_count(100, EngineConfig(gpus_per_worker=1.0), cpus=4, gpus=0, elastic=True) == 1
    assert plan_worker_count(100, EngineConfig(), cpus=6, gpus=0, elastic=True) == 6


def _jobs(costs):
    return [TrainJob((client, 0), ("t",), 1, (cost,)) for client, cost in enumerate(costs)]


def test_lpt_puts_the_longest_work_first_onto_the_least_loaded_worker():
    # costs 7 5 4 3 1 onto 2 workers: 7->w0, 5->w1, 4->w1 (5<7), 3->w0, 1->w1: totals 10 and 10
    assert assign_lpt([3, 5, 7, 1, 4], [0, 1]) == {0: [2, 0], 1: [1, 4, 3]}
    # work a worker already holds counts (a retry after a lost worker)
    assert assign_lpt([2], [0, 1], loads={0: 1.0}) == {0: [], 1: [0]}
    with pytest.raises(ValueError, match="no live worker"):
        assign_lpt([1], [])


def test_passes_are_balanced_deterministic_and_capped():
    jobs = _jobs([4, 1, 3, 2, 2, 6])
    passes = plan_passes(jobs, max_adapters=32, min_passes=3, batched=True)
    # by cost 6 4 3 2 2 1: 6->p0, 4->p1, 3->p2, 2->p2 (3<4), 2->p1 (4<5), 1->p2 (5<6): 6, 6, 6
    assert [[job.key[0] for job in p] for p in passes] == [[5], [0, 4], [1, 2, 3]]
    assert plan_passes(list(reversed(jobs)), 32, 3, True) == passes  # the jobs' order does not matter
    capped = plan_passes(jobs, max_adapters=2, min_passes=1, batched=True)
    assert len(capped) == 3 and all(len(p) <= 2 for p in capped)
    # one by one: a pass per job, whatever min_passes says
    assert [len(p) for p in plan_passes(jobs, 32, 1, batched=False)] == [1] * 6
    assert plan_passes([], 32, 4, True) == []


def test_utilisation_is_mean_over_max():
    assert utilisation([2.0, 2.0]) == 1.0
    assert utilisation([1.0, 3.0]) == pytest.approx(2 / 3)


def test_sample_clients_seeded_fraction():
    active = list(range(10))
    assert sample_clients(0, 1, active, 1.0) == active
    picked = sample_clients(0, 1, active, 0.3)
    assert len(picked) == 3 and picked == sample_clients(0, 1, active, 0.3)
    assert set(picked) <= set(active)
