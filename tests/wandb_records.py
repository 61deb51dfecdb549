"""Read a W&B offline run file (run-<id>.wandb) back: wandb's own record protobufs in LevelDB's
log framing (32 KiB blocks; each chunk: CRC32 4 bytes, length 2, type 1), after a 7-byte
header. wandb 0.31 ships no reader for it, so the tests use this one."""

from __future__ import annotations

from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    payloads, pending, position = [], b"", HEADER
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]
        if kind == 0 and length == 0:
            break
        payload = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            payloads.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            payloads.append(pending + payload)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records
