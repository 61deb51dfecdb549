"""The benchmark suite runs end to end (quick sizes, tiny model) and reports every figure.

No timing is asserted here: the suite measures, this only keeps it from rotting."""

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
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for line in ("RATIO engine/loop", "RATIO orchestration share", "RATIO batched speedup",
                 "RATIO memory added per extra client", "sklearn, n_init 30", "RATIO worker utilisation",
                 "RATIO engine/loop peak PSS", "checkpoint bytes per round", "RATIO cluster/single"):
        assert line in done.stdout, line
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"loop", "batched", "scale", "kmeans", "partial", "memory", "multinode"}
    assert results["multinode"]["metrics_equal"]
    assert results["loop"]["engine_seconds"] > 0 and results["loop"]["loop_seconds"] > 0
    assert all(row["peak_memory_mb"] > 0 for row in results["scale"]["per_size"].values())


def test_unknown_section_is_refused():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "loop,warp"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown sections ['warp']" in done.stderr
