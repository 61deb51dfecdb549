import json

import numpy as np
import pytest

from fltac_ray.checkpoint import (
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
    (tmp_path / "round_00001" / "state.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        latest_checkpoint(tmp_path, warn=lambda _: None)
