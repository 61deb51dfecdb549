"""FL-TAC whose server fails once, at round 2, per run: a crash in the middle of a sweep trial
(tests/test_tune.py resumes the sweep and compares it with an uninterrupted one). Experiments
name it `algorithm: tests.flaky_algorithm:FailsOnceAtRound2`."""

from __future__ import annotations

from pathlib import Path

from fltac_ray.algorithms.fltac import FLTAC


class FailsOnceAtRound2(FLTAC):
    def aggregate(self, uploads, round_index: int):
        marker = Path(self.config.output_dir) / f"failed_once_{self.config.name}"
        if round_index == 2 and not marker.exists():
            marker.write_text("failed here once")
            raise RuntimeError("injected server failure at round 2")
        return super().aggregate(uploads, round_index)
