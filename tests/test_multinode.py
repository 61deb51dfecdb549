"""The engine on a Ray cluster of several nodes: ray.cluster_utils.Cluster (a head and worker
nodes, every one on 127.0.0.1) and ray.cluster_utils.AutoscalingCluster (scale from zero), each
run in a child process so the suite's own Ray session stays as it is (one Ray per process).
Bounded: a tiny model, a few rounds, a timeout on the child."""

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

# Every child: argv is the output folder and the base cache. The head has no CPU: it holds the
# driver and the coordinator (engine.coordinator_cpus = 0, which the engine puts on the driver's
# node), the workers go to the other nodes. Node deaths are noticed within seconds (Ray's default
# health check takes ~30 s).
PRELUDE = textwrap.dedent("""
    import json, os, queue, sys, threading, time
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.errors import EngineError
    from fltac_ray.progress import Progress
    from tests.conftest import tiny_config

    out, cache = sys.argv[1], sys.argv[2]
    FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_failure_threshold": 3}

    def in_thread(simulation):  # Ray adds and removes nodes from the main thread only
        failure = []

        def guarded():
            try:
                simulation.run()
            except Exception as exc:  # reported by the caller
                failure.append(repr(exc))

        thread = threading.Thread(target=guarded)
        thread.start()
        return thread, failure

    requests = queue.Queue()

    def on_main_thread(action):  # from the run's thread: waits until the main thread ran it
        done = threading.Event()
        requests.put((action, done))
        done.wait()

    def serve_until_done(thread):  # the main thread: run what the run's thread asks, until it ends
        while thread.is_alive():
            try:
                action, done = requests.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                action()
            finally:
                done.set()
        thread.join()

    def wait_for_whole_pool(backend):  # every worker the backend asked for is up
        for _ in range(300):
            if len(backend.live_workers()) == len(backend.slots):
                return
            time.sleep(0.2)
            backend.poll_replacements()
        raise RuntimeError("a requested worker did not come up within 60 s")

    def local_run(name, rounds=2):
        Simulation(tiny_config(rounds=rounds, engine={"backend": "local", "min_passes": 2}),
                   out=f"{out}/{name}", progress=Progress(quiet=True)).run()

    def finish(cluster, report, rounds):  # stop Ray and the cluster, run the same config in one process, report
        ray.shutdown()
        cluster.shutdown()
        local_run("local", rounds)
        print(json.dumps(report))
""")
HEAD = 'cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS})\n'

def _child(script: str, tmp_path: Path, **env_vars: str) -> dict:
    root = Path(__file__).parents[1]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(root), **env_vars}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "bases")],
                          capture_output=True, text=True, timeout=1500, env=env, cwd=root)  # a cap for hangs
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


GROWING = PRELUDE + HEAD + textwrap.dedent("""
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
    run, failure = in_thread(simulation)
    # the node joins once the run says it waits (not after a fixed sleep: on a slow or loaded
    # machine the run may reach its reservation later, and the node would join before any wait)
    for _ in range(6000):
        if any("waiting for the worker pool" in line for line in lines) or not run.is_alive():
            break
        time.sleep(0.1)
    cluster.add_node(num_cpus=1)
    run.join(timeout=1200)
    assert not run.is_alive() and not failure, failure
    report["grown_nodes"] = simulation.backend.worker_nodes
    report["waited"] = [line for line in lines if "waiting for the worker pool" in line]

    # an automatic pool on a joined cluster grows at the next round's start when a node joins
    from fltac_ray.engine.callbacks import Callback

    class AddNode(Callback):
        def on_round_end(self, run, ctx):
            if ctx.round_index == 1:
                on_main_thread(lambda: cluster.add_node(num_cpus=1))
                time.sleep(2)  # the new node's resources reach the GCS
            elif ctx.round_index == 2:  # round 2 asked for a third worker: round 3 has it
                wait_for_whole_pool(run.backend)

    lines.clear()
    simulation = Simulation(tiny_config(rounds=3, engine={**engine, "min_passes": 2}), out=f"{out}/elastic",
                            progress=progress, callbacks=[AddNode()])
    run, failure = in_thread(simulation)
    serve_until_done(run)
    assert not failure, failure
    report["elastic_nodes"] = simulation.backend.worker_nodes
    report["elastic_lines"] = [line for line in lines if "grew" in line or "worker pool has" in line]
    finish(cluster, report, rounds=3)
""")


def test_the_run_waits_for_its_pool_while_the_cluster_grows_and_refuses_one_it_never_gets(tmp_path):
    report = _child(GROWING, tmp_path)
    assert "did not provide 3 worker(s) of 1 CPU within engine.reserve_timeout_s = 2s" in report["refused"]
    assert report["free_cpus_after_refusal"] == 1  # nothing started, nothing held
    assert len(set(report["grown_nodes"])) == 2  # the node that joined got a worker
    assert report["waited"] and "2 x (1 CPU)" in report["waited"][0]
    assert len(set(report["elastic_nodes"])) == 3, report["elastic_lines"]  # the third node got a worker
    assert "1 more worker(s) requested" in report["elastic_lines"][0]
    elastic, local = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("elastic", "local"))
    pd.testing.assert_frame_equal(elastic[COMPARED], local[COMPARED], check_exact=True)


# Workers spread over two nodes; then a node is removed (abruptly, as a machine dies) in each
# phase of a four-round run: during round 1's training (right after its passes were submitted),
# at round 2's aggregation, round 3's evaluation and round 4's checkpoint gather; each time
# another node joins, as an autoscaler would replace it. The driver's thread asks, the main thread removes and adds.
LOSS = PRELUDE + HEAD + textwrap.dedent("""
    from fltac_ray.engine.callbacks import Callback

    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    PHASES = {1: "training", 2: "close_round", 3: "evaluate", 4: "server_state"}

    class NodeLoss(Callback):
        def __init__(self):
            self.round, self.removed = 0, []

        def lose_a_node(self, run, phase):
            if PHASES.get(self.round) != phase:
                return
            slot = next(slot for slot in run.backend.slots if slot.up)

            def replace_node():  # it dies abruptly; another joins, as an autoscaler would add it
                cluster.remove_node(next(node for node in cluster.worker_nodes if node.node_id == slot.node),
                                    allow_graceful=False)
                cluster.add_node(num_cpus=1)

            on_main_thread(replace_node)
            self.removed.append([self.round, phase, slot.index])

        def on_start(self, run):
            self.started = {"nodes": run.backend.worker_nodes, "coordinator": run.backend.coordinator_node}
            for phase in ("close_round", "evaluate", "server_state"):
                original = getattr(run.backend, phase)

                def wrapped(*args, original=original, phase=phase):
                    self.lose_a_node(run, phase)
                    return original(*args)

                setattr(run.backend, phase, wrapped)

        def on_training_submitted(self, run, round_index):
            self.round = round_index
            self.lose_a_node(run, "training")

        def on_round_end(self, run, ctx):  # the next round starts with the pool whole again
            wait_for_whole_pool(run.backend)

    lines, loss = [], NodeLoss()
    progress = Progress(quiet=False, bar=False)
    progress.say = lines.append
    config = tiny_config(rounds=4, engine={"num_workers": 2, "base_cache_dir": cache, "checkpoint_every": 1})
    simulation = Simulation(config, out=f"{out}/cluster", progress=progress, callbacks=[loss])
    run, failure = in_thread(simulation)
    serve_until_done(run)
    assert not failure, failure
    report = {"removed": loss.removed, **loss.started, "head": ray.get_runtime_context().get_node_id(),
              "lost": [line for line in lines if "lost (node" in line],
              "back": [line for line in lines if "takes work again" in line]}
    finish(cluster, report, rounds=4)
""")


def test_a_node_lost_in_each_phase_leaves_the_results_unchanged(tmp_path):
    report = _child(LOSS, tmp_path)
    # at the start: a worker on each node, the coordinator on the driver's node (the head)
    assert len(set(report["nodes"])) == 2 and report["head"] not in report["nodes"]
    assert report["coordinator"] == report["head"]
    assert [phase for _, phase, _ in report["removed"]] == ["training", "close_round", "evaluate", "server_state"]
    # each loss noticed where the dead worker was next given work: round 1's in its training (or,
    # when the pass had already been received, its evaluation), rounds 2 and 3 in their evaluation
    assert [line.split()[1] for line in report["lost"]] == ["1", "2", "3"]
    assert len(report["back"]) == 3  # each replacement joined the pool on a node added since
    cluster, local = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("cluster", "local"))
    pd.testing.assert_frame_equal(cluster[COMPARED], local[COMPARED], check_exact=True)
    rounds = pd.read_csv(tmp_path / "cluster" / "rounds.csv")
    assert (rounds["status"] == "ok").all() and rounds["failed_clients"].isna().all()


# Scale from zero: the head has no CPU and no node is up; the run's pool is a placement group the
# autoscaler sees as demand, so it adds two nodes and the run completes on them.
FROM_ZERO = PRELUDE + textwrap.dedent("""
    from tests.autoscaling import LocalAutoscalingCluster

    cluster = LocalAutoscalingCluster(head_cpus=0, node_cpus=1, max_nodes=2)
    cluster.start()
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.connect_info()
        report = {"cpus_before": ray.cluster_resources().get("CPU", 0.0)}
        lines = []
        progress = Progress(quiet=False, bar=False)
        progress.say = lines.append
        engine = {"ray_address": cluster.address, "num_workers": 2, "reserve_timeout_s": 180,
                  "base_cache_dir": cache}
        simulation = Simulation(tiny_config(engine=engine), out=f"{out}/cluster", progress=progress)
        simulation.run()
        report.update(nodes=simulation.backend.worker_nodes, head=ray.get_runtime_context().get_node_id(),
                      waited=[line for line in lines if "waiting for the worker pool" in line])
    finally:
        ray.shutdown()
        cluster.shutdown()
    address_file = cluster._address_file()
    report["address_left"] = address_file.is_file() and address_file.read_text().strip() == cluster.address
    local_run("local")
    print(json.dumps(report))
""")


def test_a_run_on_an_empty_autoscaling_cluster_waits_while_it_scales_up_and_completes(tmp_path):
    report = _child(FROM_ZERO, tmp_path, RAY_AUTH_MODE="token")  # a head from `ray start` wants Ray's token
    assert report["cpus_before"] == 0  # no worker node at the start
    assert report["waited"] and "2 x (1 CPU)" in report["waited"][0]
    assert len(set(report["nodes"])) == 2 and report["head"] not in report["nodes"]
    assert not report["address_left"]  # a later ray.init() does not try to join the stopped cluster
    cluster, local = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("cluster", "local"))
    pd.testing.assert_frame_equal(cluster[COMPARED], local[COMPARED], check_exact=True)


# A Ray Tune sweep on a head (the sweep's driver, 1 CPU) and two nodes of 2 CPUs and 1 declared GPU
# each: refused without --storage, then 8 trials with a shared storage folder, every worker on a
# GPU of its own in Ray's accounting.
SWEEP = PRELUDE + textwrap.dedent("""
    import yaml

    from fltac_ray.errors import ConfigError
    from fltac_ray.tune import run_sweep
    from tests.conftest import TINY_EXPERIMENT

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    base = {**TINY_EXPERIMENT, "rounds": 2, "engine": {"base_cache_dir": cache}}
    base["data"] = {**TINY_EXPERIMENT["data"], "train_per_task": 6000}
    with open(f"{out}/base.yaml", "w") as handle:
        yaml.safe_dump(base, handle)
    spec = {"name": "nodes", "experiment": "base.yaml",
            "search": {"model.lora.rank": {"grid": [1, 2]}, "algorithm.n_clusters": {"grid": [1, 2, 3, 4]}},
            "scheduler": {"name": "asha", "grace_period": 1}, "max_concurrent_trials": 4,
            "trial": {"workers": 1, "cpus_per_worker": 0.95, "gpus_per_worker": 1, "driver_cpus": 0.05}}
    with open(f"{out}/sweep.yaml", "w") as handle:
        yaml.safe_dump(spec, handle)
    report = {"worker_nodes": [node.node_id for node in cluster.worker_nodes]}
    try:
        run_sweep(f"{out}/sweep.yaml", f"{out}/refused", Progress(quiet=True))
    except ConfigError as exc:
        report["refused"] = str(exc)
    lines = []
    progress = Progress(quiet=False, bar=False)
    progress.say = lines.append
    sweep_dir, table, best = run_sweep(f"{out}/sweep.yaml", f"{out}/sweep", progress, storage=f"{out}/storage")
    report.update(lines=lines, best=best["trial"], sweep_dir=str(sweep_dir))
    report["cache_bytes"] = sum(p.stat().st_size for p in __import__("pathlib").Path(cache).rglob("*") if p.is_file())
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps(report))
""")


def test_a_sweep_on_three_nodes_persists_every_trial_in_shared_storage_with_gpus_spread(tmp_path):
    from fltac_ray.tune import rank_trials

    report = _child(SWEEP, tmp_path)
    assert "--storage" in report["refused"] and "3 nodes" in report["refused"]
    sweep = tmp_path / "sweep"
    table = pd.read_csv(sweep / "sweep.csv")
    trials = sorted(p.name for p in (sweep / "trials").iterdir())
    assert len(trials) == 8 and trials == sorted(table["trial"].unique())
    nodes = set()
    for trial in trials:  # every trial's run directory and adapters, whichever node ran it
        folder = sweep / "trials" / trial
        assert (folder / "adapters" / "index.json").is_file() and (folder / "rounds.csv").is_file()
        (worker,) = json.loads((folder / "placement.json").read_text())
        assert worker["gpu_ids"] == ["0"]  # a whole GPU in Ray's accounting (one per node here)
        nodes.add(worker["node"])
        assert list((tmp_path / "storage" / "sweep" / trial).glob("checkpoint_*"))  # Tune's, in the storage
    assert nodes == set(report["worker_nodes"])  # the trials spread over both GPUs
    assert report["best"] == rank_trials(table, "mean_accuracy", "max")["trial"].iloc[0]
    assert json.loads((sweep / "best.json").read_text())["trial"] == report["best"]
    shared = [line for line in report["lines"] if "data prepared once" in line]
    done = [line for line in report["lines"] if "object store peak" in line]
    assert shared and done
    print("\n".join([*shared, *done, f"base in the node cache (not the object store): "
                     f"{report['cache_bytes'] / 2**20:.2f} MiB"]))
