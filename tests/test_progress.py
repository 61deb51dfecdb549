"""The terminal progress: round lines, the tqdm bar under them and its ETA."""

from __future__ import annotations

import io

from fltac_ray import progress as progress_module
from fltac_ray.progress import Progress

ROW = {"bytes_up": 1e6, "bytes_down": 2e6, "mean_accuracy": 0.5, "clustering_accuracy": 1.0, "ari": 1.0,
       "seconds": 10.0}


def test_eta_counts_down_during_a_round(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    progress = Progress(stream=io.StringIO(), bar=False)
    progress.start_rounds(5)
    assert progress.eta() is None  # no round has ended: nothing to estimate from
    clock[0] = 110.0
    progress.advance(1)  # 10 s a round, 4 rounds left
    assert progress.eta() == 40.0
    clock[0] = 116.0
    assert progress.eta() == 34.0  # 6 s into round 2: the ETA counts down, not up
    clock[0] = 130.0
    progress.advance(2)  # rounds of 10 and 20 s: 15 s a round, 3 left
    assert progress.eta() == 45.0
    clock[0] = 200.0
    assert progress.eta() == 0.0  # a slow round: never negative
    progress.advance(5)
    assert progress.eta() is None  # done


def test_eta_after_a_resume_counts_only_rounds_run_here(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    progress = Progress(stream=io.StringIO(), bar=False)
    progress.start_rounds(5, first=3)  # rounds 1-2 ran before the resume
    assert progress.eta() is None
    clock[0] = 8.0
    progress.advance(3)
    assert progress.eta() == 16.0


def test_the_bar_sits_under_whole_round_lines_and_goes_at_the_end():
    stream = io.StringIO()
    progress = Progress(stream=stream, bar=True)
    progress.start_rounds(4)
    progress.phase("training")
    progress.round_line(1, 4, ROW, {"synthetic_topic": 0.5})
    progress.say("a message")
    progress.finish()
    text = stream.getvalue()
    lines = text.replace("\r", "\n").splitlines()
    assert "round   1/4  topic 0.500  | mean 0.500  | cluster acc 1.00 ARI 1.00  | up 1.00 MB  10.0s" in lines
    assert "a message" in lines
    bars = [line for line in lines if "rounds |" in line]
    assert any(line.startswith("0/4 rounds") and "[training]" in line for line in bars)
    assert any(line.startswith("1/4 rounds") and "eta " in line and "mean 0.500" in line
               and "sent 3.00 MB" in line for line in bars)
    assert text.endswith("\r")  # the bar's line is cleared, nothing left behind it
    assert lines[-1].strip() == ""


def test_a_log_file_gets_no_bar_and_quiet_gets_nothing():
    log = io.StringIO()  # not a terminal
    progress = Progress(stream=log)
    progress.start_rounds(2)
    progress.round_line(1, 2, ROW, {"synthetic_topic": 0.5})
    progress.finish()
    assert "\r" not in log.getvalue() and log.getvalue().startswith("round   1/2")
    quiet = io.StringIO()
    progress = Progress(quiet=True, stream=quiet, bar=True)
    progress.start_rounds(2)
    progress.round_line(1, 2, ROW, {"synthetic_topic": 0.5})
    progress.finish()
    assert quiet.getvalue() == ""
