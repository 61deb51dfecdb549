"""The benchmark suite runs end to end (quick sizes, tiny model) and reports every figure.

No timing is asserted here: the suite measures, this only keeps it from rotting. The multinode
section is left out of the quick run (two fresh Ray clusters, ~90 s, and its tiny objects stay
below Ray's 100 KiB counting limit, so it measures nothing there): the engine on a cluster is
tested in tests/test_multinode.py, and its traffic counter below."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_reports_every_section(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    sections = "scale,partial,memory,loop,layout,batched,mfu,precision,kmeans"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", sections,
                           "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for line in ("RATIO engine/loop", "RATIO orchestration share", "RATIO batched speedup",
                 "RATIO memory added per extra client", "sklearn, n_init 30", "RATIO worker utilisation",
                 "RATIO engine/loop peak PSS", "checkpoint bytes per round", "RATIO bfloat16/float32 step time",
                 "RATIO one worker of every core / a worker per core", "RATIO base dropout off / on",
                 "RATIO engine in one process / a worker per core", "RATIO engine in one process / loop",
                 "RATIO float32: base dropout off / on", "bfloat16 matmul peak"):
        assert line in done.stdout, line
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"loop", "layout", "batched", "mfu", "scale", "kmeans", "partial", "memory", "precision"}
    loop = results["loop"]
    assert set(loop["runs"]) == {"loop", "engine, a worker per core", "engine, one worker of every core",
                                 "engine in one process", "engine, a worker per core, base dropout off"}
    for run in [*loop["runs"].values(), *results["layout"]["runs"].values()]:
        assert run["seconds"] > 0 and 0 < run["mfu"] < 1 and run["pss_mb"] > run["start_pss_mb"] > 0
        assert 0 <= run["accuracy"] <= 1
    assert loop["engine_over_loop"] == loop["runs"]["engine, a worker per core"]["seconds"] / loop["runs"]["loop"]["seconds"]
    assert set(results["mfu"]["passes"]) == {f"{dtype}, base dropout {state}" for dtype in ("float32", "bfloat16")
                                             for state in ("on", "off")}
    assert all(sum(row["profile"].values()) == pytest.approx(1.0, abs=1e-6) for row in results["mfu"]["passes"].values())
    assert results["precision"]["mfu"]["engine float32"] > 0 and results["precision"]["round_tflop"] > 0
    assert all(row["peak_memory_mb"] > 0 for row in results["scale"]["per_size"].values())
    # MFU: model FLOPs (client/flops.py) over time and the measured matmul peak, and a profile
    batched = results["batched"]
    row = batched["8"]
    assert 0 < row["mfu_batched"] < 1 and 0 < row["mfu_one_by_one"] < 1 and row["gflop"] > 0
    assert row["mfu_batched"] / row["mfu_one_by_one"] == pytest.approx(row["speedup"])  # same FLOPs, less time
    assert batched["peak_gflops"] > 0 and "MFU one by one" in done.stdout
    assert sum(batched["profile"].values()) == pytest.approx(1.0, abs=1e-6) and batched["profile"]["matmul"] > 0


def test_unknown_section_is_refused():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "loop,warp"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown sections ['warp']" in done.stderr


def test_bytes_between_nodes_sums_what_each_node_pushed_to_others():
    """The multinode section's traffic figure: Ray's object-manager counters of every node's
    metrics endpoint, pushes only (pulls are the same bytes seen from the other side)."""
    import http.server
    import importlib.util
    import threading

    spec = importlib.util.spec_from_file_location("fltac_benchmark_suite", ROOT / "benchmarks" / "run.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)

    pages = {
        "a": 'ray_object_manager_bytes{Type="PushedFromLocalPlasma",NodeAddress="x"} 1024.0\n'
             'ray_object_manager_bytes{Type="Received",NodeAddress="x"} 999.0\n'
             '# HELP ray_object_manager_bytes ...\n',
        "b": 'ray_object_manager_bytes{Type="PushedFromLocalDisk",NodeAddress="y"} 3072.0\n'
             'ray_other_metric{Type="PushedFromLocalPlasma"} 5.0\n',
    }
    servers = []
    for text in pages.values():
        class Page(http.server.BaseHTTPRequestHandler):
            body = text.encode()

            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(200)
                self.end_headers()
                self.wfile.write(self.body)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Page)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        assert suite.bytes_between_nodes([s.server_address[1] for s in servers]) == 4096.0
    finally:
        for server in servers:
            server.shutdown()


def test_the_gpu_check_runs_without_ray_and_writes_two_files(tmp_path):
    """benchmarks/gpu.py's dry run (the CPU, tiny sizes) of its quick sections: Ray is never
    imported (the GPU node has none), the planner table has its before/after rows, and only
    gpu.json and gpu.txt are written. `make test` runs every section in a venv without Ray or
    pydantic first (make gpu-check-dry)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--only",
                           "planner,privacy,kmeans,run", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Ray imported: False" in done.stdout
    for line in ("Llama-7B   24 GB (A10G)     0.5  REFUSED", "BERT-base  141 GB (H200)   0.25  yes",
                 "RATIO sklearn/torch", "allocated memory from round 1 to 3", "RATIO DP-SGD/plain"):
        assert line in done.stdout, line
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["gpu.json", "gpu.txt"]
    results = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert results["dry_run"] and not results["ray_imported"]
    from fltac_ray.environment import cpu  # the host CPU is named with the figures

    assert results["host_cpu"]["extensions"] == cpu()["extensions"] and "host CPU" in done.stdout
    assert set(results) >= {"planner", "kmeans", "run"} and "error" not in results["run"]
    assert results["privacy"]["update_difference_max"] < 1e-4  # DP-SGD batched = one example at a time
    assert results["planner"]["Llama-7B | 141 GB (H200) | 0.5"]["now_gib"] == pytest.approx(45.5, abs=0.1)
    assert (tmp_path / "out" / "gpu.txt").read_text().splitlines()[0].startswith("fltac-ray GPU check on CPU")


def test_gpu_benchmark_needs_a_gpu_or_the_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "no CUDA GPU here" in done.stderr and "use --dry-run" in done.stderr


def _suite():
    """benchmarks/run.py as a module, to call one section in process (no Ray)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fltac_benchmark_suite", ROOT / "benchmarks" / "run.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite


def test_the_ranks_section_trains_mixed_ranks_padded_and_grouped_to_the_same_adapters():
    """benchmarks/run.py --only ranks at quick sizes: grouping by rank on models of each rank
    (alpha in proportion) gives the padded pass's adapters, so the timing compares equals."""
    result = _suite().bench_ranks(quick=True)
    for profile in ("heavy_tail_8", "random_8"):
        row = result[profile]
        assert row["difference_max"] < 1e-5
        assert row["padded_seconds"] > 0 and row["grouped_seconds"] > 0 and row["one_by_one_seconds"] > 0


def test_the_privacy_section_measures_dp_sgd_against_the_plain_pass_and_its_epsilon_agrees():
    """benchmarks/run.py --only privacy, in process (no Ray), at quick sizes."""
    result = _suite().bench_privacy(quick=True)
    row = result["4"]
    assert row["batched_seconds"] > 0 and row["dp_sgd_batched_seconds"] > 0 and row["dp_sgd_one_by_one_seconds"] > 0
    assert result["epsilon"]["fltac_ray"] == pytest.approx(result["epsilon"]["dp_accounting"], rel=1e-12)
    assert result["cpu_capability"]
