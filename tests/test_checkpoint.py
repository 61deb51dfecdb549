import json

import numpy as np
import pytest

from fltac_ray.runs.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def _checkpoint(round_index, scale=1.0):
    return Checkpoint(
        round_index,
        groups={
            "adapters": {"0/0": np.arange(4, dtype=np.float32) * scale, "1/0": np.ones(4, np.float32)},
            "globals": {"globals": np.zeros((2, 4), np.float32)},
        },
        meta={"sampler": "seeded per round"},
    )


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(3, scale=2.0))
    loaded = read_checkpoint(tmp_path / "round_00003")
    assert loaded.round == 3 and loaded.meta == {"sampler": "seeded per round"}
    np.testing.assert_array_equal(loaded.groups["adapters"]["0/0"], [0, 2, 4, 6])
    assert loaded.groups["globals"]["globals"].shape == (2, 4)


def test_only_the_newest_are_kept_and_no_temporary_folder_remains(tmp_path):
    for r in range(1, 5):
        save_checkpoint(tmp_path, _checkpoint(r), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00003", "round_00004"]
    assert latest_checkpoint(tmp_path).round == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "state"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    save_checkpoint(tmp_path, _checkpoint(1))
    save_checkpoint(tmp_path, _checkpoint(2))
    newest = tmp_path / "round_00002"
    target = newest / "adapters.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:20])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest / "state.json").write_text("{not json")
    messages = []
    checkpoint = latest_checkpoint(tmp_path, warn=messages.append)
    assert checkpoint.round == 1
    assert len(messages) == 1 and "round_00002" in messages[0]


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_checkpoint(tmp_path / "missing")
    save_checkpoint(tmp_path, _checkpoint(1))
    (tmp_path / "round_00001" / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        latest_checkpoint(tmp_path, warn=lambda _: None)


def _edit_state(folder, edit):
    state = json.loads((folder / "state.json").read_text())
    edit(state)
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(("edit", "words"), [
    (lambda s: s.update(round=5), "state.json does not match its checksum"),
    (lambda s: s["files"].pop("adapters"), "state.json does not match its checksum"),
])
def test_an_edited_state_is_refused(tmp_path, edit, words):
    save_checkpoint(tmp_path, _checkpoint(4))
    _edit_state(tmp_path / "round_00004", edit)
    with pytest.raises(CheckpointError, match=words):
        read_checkpoint(tmp_path / "round_00004")


def test_a_file_named_outside_the_folder_is_refused_even_with_a_matching_manifest(tmp_path):
    import hashlib

    save_checkpoint(tmp_path, _checkpoint(1))
    folder = tmp_path / "round_00001"
    outside = tmp_path.parent / "outside.safetensors"
    outside.write_bytes((folder / "adapters.safetensors").read_bytes())
    _edit_state(folder, lambda s: s["files"]["adapters"].update(file="../../outside.safetensors"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["state.json"] = hashlib.sha256((folder / "state.json").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))  # a consistent forgery
    with pytest.raises(CheckpointError, match="not a file of this checkpoint"):
        read_checkpoint(folder)
    manifest["sha256"]["../outside.safetensors"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        read_checkpoint(folder)


def test_an_unlisted_file_is_refused_and_a_crashed_write_is_cleaned_up(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(1))
    (tmp_path / "round_00001" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unlisted \['extra.safetensors'\]"):
        read_checkpoint(tmp_path / "round_00001")
    (tmp_path / ".tmp_round_00002_999").mkdir()  # a process killed while writing round 2
    save_checkpoint(tmp_path, _checkpoint(3))
    assert not list(tmp_path.glob(".tmp_round_*"))


def test_links_and_special_files_are_refused_not_followed_or_waited_on(tmp_path):
    import os

    save_checkpoint(tmp_path, _checkpoint(1))
    save_checkpoint(tmp_path, _checkpoint(2))
    newest = tmp_path / "round_00002"
    adapters = newest / "adapters.safetensors"
    outside = tmp_path.parent / "same_bytes.safetensors"
    outside.write_bytes(adapters.read_bytes())
    adapters.unlink()
    adapters.symlink_to(outside)  # the very bytes the manifest lists, from outside the folder
    with pytest.raises(CheckpointError, match=r"adapters.safetensors is a symbolic link, not a file this run wrote"):
        read_checkpoint(newest)
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append).round == 1 and "symbolic link" in warnings[0]
    adapters.unlink()
    os.mkfifo(adapters)  # reading a FIFO with no writer would wait forever
    with pytest.raises(CheckpointError, match=r"adapters.safetensors is a named pipe"):
        read_checkpoint(newest)
    adapters.unlink()
    adapters.symlink_to("/dev/zero")  # endless bytes to hash
    with pytest.raises(CheckpointError, match=r"symbolic link"):
        read_checkpoint(newest)
    linked_round = tmp_path / "round_00003"
    linked_round.symlink_to(tmp_path / "round_00001", target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"round_00003: is a symbolic link"):
        read_checkpoint(linked_round)


def test_regular_file_reading_refuses_links_pipes_and_oversized_files(tmp_path):
    import os

    from fltac_ray.runs.files import entry_problem, foreign_entries, open_regular, read_regular_text

    text = tmp_path / "config.yaml"
    text.write_text("rounds: 2\n")
    assert read_regular_text(text) == "rounds: 2\n" and entry_problem(text) is None
    with pytest.raises(ValueError, match=r"config.yaml is 10 bytes, more than the 4 it can be"):
        open_regular(text, max_bytes=4)
    (tmp_path / "link.yaml").symlink_to(text)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError):
        open_regular(tmp_path / "link.yaml")
    with pytest.raises(OSError, match="pipe is a named pipe"):
        open_regular(tmp_path / "pipe")
    assert entry_problem(tmp_path / "folder") == "is a folder, not a file this run wrote"
    assert foreign_entries(tmp_path) == [(tmp_path / "link.yaml", "is a symbolic link, not a file this run wrote"),
                                         (tmp_path / "pipe", "is a named pipe, not a file this run wrote")]


def test_the_evaluation_cache_survives_a_checkpoint_exactly(tmp_path):
    from dataclasses import asdict

    from fltac_ray.engine.evaluation_cache import GROUP, EvaluationCache
    from fltac_ray.engine.messages import EvalRecord

    cache = EvaluationCache()
    cache.put((3, 0), b"\x01" * 16, [EvalRecord(3, "b", 5, 2.718281828459045, 9),
                                      EvalRecord(3, "a", 17, 0.1 + 0.2, 4, predictions=40, rouge_sum=1.25)])
    cache.put((7, 1), b"\x02" * 16, [])  # evaluated, no test examples
    empty = EvaluationCache().to_group(["a", "b"])  # a checkpoint before any evaluation
    save_checkpoint(tmp_path, Checkpoint(2, {GROUP: cache.to_group(["a", "b"]), "other": empty}))
    groups = latest_checkpoint(tmp_path).groups
    back = EvaluationCache.from_group(groups[GROUP], ["a", "b"])
    assert list(back.entries) == [(3, 0), (7, 1)]
    assert back.is_current((3, 0), b"\x01" * 16) and not back.is_current((3, 0), b"\x02" * 16)
    np.testing.assert_equal([asdict(r) for r in back.records((3, 0))], [asdict(r) for r in cache.records((3, 0))])
    assert back.records((7, 1)) == [] and EvaluationCache.from_group(groups["other"], ["a", "b"]).entries == {}
