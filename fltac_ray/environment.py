"""What a run ran on: library versions, Python, the machine — `<run>/environment.json`.

Written when a run starts, and appended to when it is resumed (a resumed run may continue under
other versions), so a result can always be traced to the software that produced it; the report
shows it beside the run's settings.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ENVIRONMENT_FILE = "environment.json"
# the distributions whose versions decide a run's numbers
DISTRIBUTIONS = ("fltac-ray", "torch", "transformers", "peft", "ray", "numpy", "scikit-learn", "datasets",
                 "safetensors", "cuml-cu12", "bitsandbytes")


def versions() -> dict[str, str]:
    """Installed version of each of DISTRIBUTIONS (absent ones left out), and Python's."""
    found = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def session(kind: str) -> dict[str, Any]:
    """One start of a run (kind: "start" or "resume"): when, where and with what."""
    return {"kind": kind, "time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "versions": versions(),
            "platform": platform.platform(), "machine": platform.machine(),
            "executable": sys.executable}


def record_session(run_dir: Path, kind: str) -> None:
    """Add this start of the run to run_dir/environment.json (a new run starts the list)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    sessions = read_sessions(run_dir) if kind == "resume" else []
    path.write_text(json.dumps({"sessions": [*sessions, session(kind)]}, indent=2))


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The run's recorded starts, oldest first ([] for runs from before this file existed)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("sessions", []))
    except (json.JSONDecodeError, AttributeError):
        return []
