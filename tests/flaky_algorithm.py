"""FL-TAC variants that fail on purpose: a server that crashes once at round 2 (a crash in the
middle of a sweep trial: tests/test_tune.py) and clients whose every upload is NaN
(tests/test_reliability.py). Experiments name them `algorithm: tests.flaky_algorithm:<Class>`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fltac_ray.algorithms.fltac import FLTAC


class FailsOnceAtRound2(FLTAC):
    def aggregate(self, uploads, round_index: int):
        marker = Path(self.config.output_dir) / f"failed_once_{self.config.name}"
        if round_index == 2 and not marker.exists():
            marker.write_text("failed here once")
            raise RuntimeError("injected server failure at round 2")
        return super().aggregate(uploads, round_index)


class UploadsNaN(FLTAC):
    """Every client's upload is NaN (diverged clients), so the server rejects them all."""

    def upload(self, job, trained, private, meta):
        sent = super().upload(job, trained, private, meta)
        if sent is not None:
            sent.vector = np.full_like(sent.vector, np.nan)
        return sent
