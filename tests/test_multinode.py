"""The engine on a Ray cluster of several nodes: ray.cluster_utils.Cluster (a head and two worker
nodes, every one on 127.0.0.1), run in a child process so the suite's own Ray session stays as
it is (one Ray per process). Bounded: a tiny model, two rounds, a timeout on the child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
COMPARED = ["round", "task", "accuracy", "loss", "clients", "test_samples"]

# Both children: a head with no CPU (driver and coordinator only), argv: output folder, base cache
PRELUDE = textwrap.dedent("""
    import json, os, sys, threading, time
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.errors import EngineError
    from fltac_ray.progress import Progress
    from tests.conftest import tiny_config

    out, cache = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
""")

CHILD = PRELUDE + textwrap.dedent("""
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    engine = {"base_cache_dir": cache}
    simulation = Simulation(tiny_config(engine=engine), out=f"{out}/cluster", progress=Progress(quiet=True))
    simulation.run()
    nodes = simulation.backend.worker_nodes
    head = ray.get_runtime_context().get_node_id()
    ray.shutdown()
    cluster.shutdown()
    Simulation(tiny_config(engine={**engine, "backend": "local", "min_passes": 2}), out=f"{out}/local",
               progress=Progress(quiet=True)).run()
    print(json.dumps({"worker_nodes": nodes, "head": head}))
""")


def _child(script: str, tmp_path: Path) -> dict:
    root = Path(__file__).parents[1]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "bases")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_workers_spread_over_nodes_and_results_equal_a_single_process_run(tmp_path):
    report = _child(CHILD, tmp_path)
    assert len(report["worker_nodes"]) == 2 and len(set(report["worker_nodes"])) == 2
    assert report["head"] not in report["worker_nodes"]  # the head has no CPU for workers
    cluster, local = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("cluster", "local"))
    pd.testing.assert_frame_equal(cluster[COMPARED], local[COMPARED], check_exact=True)


GROWING = PRELUDE + textwrap.dedent("""
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    report = {}
    # more workers than the cluster can hold: refused after the wait, before any worker starts
    engine = {"ray_address": cluster.address, "base_cache_dir": cache, "reserve_timeout_s": 2}
    try:
        Simulation(tiny_config(engine={**engine, "num_workers": 3}), out=f"{out}/refused",
                   progress=Progress(quiet=True)).run()
    except EngineError as exc:
        report["refused"] = str(exc)
    for _ in range(50):  # the refused reservation is given back (asynchronously)
        if ray.available_resources().get("CPU", 0) == 1:
            break
        time.sleep(0.2)
    report["free_cpus_after_refusal"] = ray.available_resources().get("CPU", 0)

    # a second node joins while the run waits for its pool (as an autoscaler would add it); the
    # run goes on a thread, since Ray starts nodes from the main thread only
    lines = []
    progress = Progress(quiet=False, bar=False)
    progress.say = lines.append
    simulation = Simulation(tiny_config(engine={**engine, "num_workers": 2, "reserve_timeout_s": 120}),
                            out=f"{out}/grown", progress=progress)
    failure = []

    def guarded():
        try:
            simulation.run()
        except Exception as exc:  # reported below
            failure.append(repr(exc))

    run = threading.Thread(target=guarded)
    run.start()
    time.sleep(3)
    cluster.add_node(num_cpus=1)
    run.join(timeout=400)
    assert not run.is_alive() and not failure, failure
    report["grown_nodes"] = simulation.backend.worker_nodes
    report["waited"] = [line for line in lines if "waiting for the worker pool" in line]
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report))
""")


def test_the_run_waits_for_its_pool_while_the_cluster_grows_and_refuses_one_it_never_gets(tmp_path):
    report = _child(GROWING, tmp_path)
    assert "did not provide 3 worker(s) of 1 CPU within engine.reserve_timeout_s = 2s" in report["refused"]
    assert report["free_cpus_after_refusal"] == 1  # nothing started, nothing held
    assert len(set(report["grown_nodes"])) == 2  # the node that joined got a worker
    assert report["waited"] and "2 x (1 CPU)" in report["waited"][0]
