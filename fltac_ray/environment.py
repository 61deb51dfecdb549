"""What a run ran on: library versions, Python, the machine and its CPU — `<run>/environment.json`.

Written when a run starts, and appended to when it is resumed (a resumed run may continue under
other versions), so a result can always be traced to the software that produced it; the report
shows it beside the run's settings.
"""

from __future__ import annotations

import json
import os
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


# vector extensions that decide a CPU's step time, widest first: (name, /proc/cpuinfo flag)
CPU_EXTENSIONS = (("AMX", "amx_bf16"), ("AVX512_BF16", "avx512_bf16"), ("AVX512", "avx512f"), ("AVX2", "avx2"))


def cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """This machine's CPU: its model, its logical CPUs and the widest of CPU_EXTENSIONS its flags
    list ("none" below AVX2, "unknown" where /proc/cpuinfo cannot be read). A figure is tied to
    it: the same round ran ~3x slower on an AVX2-only EPYC than on an AVX-512 CPU, and bfloat16
    is native only with AVX512_BF16 or AMX. Read without importing torch (the driver does not)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    widest = next((name for name, flag in CPU_EXTENSIONS if flag in flags), "none" if flags else "unknown")
    return {"model": fields.get("model name") or platform.processor() or "unknown", "cpus": os.cpu_count(),
            "extensions": widest}


def describe_cpu(found: dict[str, Any]) -> str:
    """e.g. "AMD EPYC 7B13, 2 CPUs, AVX2"."""
    return f"{found.get('model', 'unknown')}, {found.get('cpus')} CPUs, {found.get('extensions', 'unknown')}"


def session(kind: str) -> dict[str, Any]:
    """One start of a run (kind: "start" or "resume"): when, where and with what."""
    return {"kind": kind, "time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "versions": versions(),
            "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu(),
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
