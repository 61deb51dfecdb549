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

CHILD = textwrap.dedent("""
    import json, os, sys
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress
    from tests.conftest import tiny_config

    out, cache = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # driver and coordinator
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


def test_workers_spread_over_nodes_and_results_equal_a_single_process_run(tmp_path):
    root = Path(__file__).parents[1]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(tmp_path / "bases")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["worker_nodes"]) == 2 and len(set(report["worker_nodes"])) == 2
    assert report["head"] not in report["worker_nodes"]  # the head has no CPU for workers
    cluster, local = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("cluster", "local"))
    pd.testing.assert_frame_equal(cluster[COMPARED], local[COMPARED], check_exact=True)
