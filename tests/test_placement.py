import pytest

from fltac_ray.config import EngineConfig
from fltac_ray.engine.placement import assign_clients, plan_worker_count
from fltac_ray.engine.simulation import sample_clients
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


def test_assign_clients_balances_task_load():
    # loads (tasks per client): heaviest first onto the lightest worker
    bins = assign_clients({0: 3, 1: 3, 2: 2, 3: 1, 4: 1}, num_workers=2)
    assert bins == [[0, 2], [1, 3, 4]]  # totals 5 and 5


def test_assign_clients_respects_capacity():
    bins = assign_clients({c: 1 for c in range(5)}, num_workers=5, capacity=1)
    assert sorted(len(b) for b in bins) == [1, 1, 1, 1, 1]


def test_sample_clients_seeded_fraction():
    active = list(range(10))
    assert sample_clients(0, 1, active, 1.0) == active
    picked = sample_clients(0, 1, active, 0.3)
    assert len(picked) == 3 and picked == sample_clients(0, 1, active, 0.3)
    assert set(picked) <= set(active)
