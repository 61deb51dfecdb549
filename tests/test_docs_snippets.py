"""The documentation's algorithm snippets run as written: each Python block of docs/algorithms.md
that registers an algorithm is executed as a module of its own, and the algorithm it registers
runs a round in process (the tutorial notebook covers the Python API and plain peft)."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from fltac_ray.algorithms import resolve_algorithm
from fltac_ray.engine.simulation import Simulation
from fltac_ray.progress import Progress

from .conftest import tiny_config

DOCS = Path(__file__).parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


REGISTERING = [block for block in python_blocks("algorithms.md") if "@register_algorithm" in block]


def test_the_algorithm_page_has_the_snippets_this_file_runs():
    assert len(REGISTERING) == 2  # FedProx from outside the package, the shared-head median


@pytest.mark.parametrize("block", REGISTERING, ids=["fedprox", "shared_head_median"])
def test_a_documented_algorithm_registers_and_runs_a_round(tmp_path, block):
    module = types.ModuleType(f"docs_snippet_{len(block)}")
    exec(compile(block, f"docs/algorithms.md:{module.__name__}", "exec"), module.__dict__)  # noqa: S102
    name = re.search(r'name = "(\w+)"', block).group(1)
    assert resolve_algorithm(name).__module__ == module.__name__
    options = {"mu": 0.1} if "mu" in block else {}
    config = tiny_config(rounds=1, algorithm={"name": name, **options}, model={"name": "tiny-random-bert"},
                         engine={"backend": "local"})
    result = Simulation(config, out=str(tmp_path / "run"), progress=Progress(quiet=True)).run()
    assert (result.rounds["status"] == "ok").all() and result.rounds["params_up"].iloc[0] > 0
