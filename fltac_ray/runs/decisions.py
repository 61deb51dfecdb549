"""What a run decided when it started, from the machine it found: `<run>/decisions.json`.

config.yaml holds the experiment as given (`engine.min_passes: null`, `max_batched_adapters:
auto`); the values the run chose for them when its backend started live here, so that a resume
(or a run recovered after a lost worker) cuts its rounds into the same passes whatever pool it
finds, and a reader can tell what was asked from what was decided.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fltac_ray.errors import RunFolderError

DECISIONS_FILE = "decisions.json"


@dataclass(frozen=True)
class RunDecisions:
    #: passes each round is cut into at least (engine.min_passes; default: the workers at start)
    min_passes: int
    #: the GPU share of a client worker (engine.gpus_per_worker; default: from the cluster;
    #: None where no worker pool was sized: the local backend)
    gpus_per_worker: float | None
    #: adapters per batched pass at most (engine.max_batched_adapters; auto: what fits)
    max_batched_adapters: int
    #: examples per batched step at most (engine.max_pass_examples; grows with a GPU's figure)
    max_pass_examples: int

    @classmethod
    def of(cls, engine: Any) -> RunDecisions:
        """The decisions as a started backend left them in the run's engine settings."""
        gpus = engine.gpus_per_worker
        return cls(int(engine.min_passes), None if gpus is None else float(gpus),
                   int(engine.max_batched_adapters), int(engine.max_pass_examples))

    def apply(self, engine: Any) -> None:
        """Fix these values in a run's own engine settings, so the backend decides nothing anew."""
        for name, value in asdict(self).items():
            setattr(engine, name, value)

    def save(self, run_dir: Path) -> None:
        (Path(run_dir) / DECISIONS_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> RunDecisions | None:
        """The decisions a run recorded; None for a folder that has none (a run that stopped
        before its backend started, or one written before this file existed, whose config.yaml
        holds the decided values itself)."""
        path = Path(run_dir) / DECISIONS_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunFolderError(run_dir, f"{DECISIONS_FILE} is not readable JSON ({exc}); restore it, or delete it to "
                                 "let the resumed run decide again (its rounds may then be cut differently)") from None
        wanted = {f.name: f.type for f in fields(cls)}
        kinds = {"int": int, "float | None": (int, float, type(None))}
        if not isinstance(raw, dict) or set(raw) != set(wanted):
            raise RunFolderError(run_dir, f"{DECISIONS_FILE} must hold exactly {sorted(wanted)}; it holds "
                                 f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        for name, kind in wanted.items():
            value = raw[name]
            if value is None and kind != "int":
                continue
            if isinstance(value, bool) or not isinstance(value, kinds[kind]) or value < (0 if kind != "int" else 1):
                allowed = "a number >= 0 or null" if kind != "int" else "a whole number >= 1"
                raise RunFolderError(run_dir, f"{DECISIONS_FILE}: {name} = {value!r}: must be {allowed}")
        return cls(**raw)
