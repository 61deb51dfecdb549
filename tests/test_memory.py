"""HeapTrimmer: trims every n-th pass; the helpers work on this machine."""

from __future__ import annotations

import fltac_ray.engine.memory as memory


def test_trims_every_nth_pass(monkeypatch):
    trims = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: trims.append(1) or True)
    trimmer = memory.HeapTrimmer(every=3)
    assert [trimmer() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert trimmer.trims == len(trims) == 2


def test_resident_bytes_and_trim_work_here():
    assert memory.resident_bytes() > 0
    assert memory.release_free_memory() in (True, False)  # False only off glibc
