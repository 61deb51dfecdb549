"""Will the experiment's data fit in this machine's memory? An estimate, checked before a byte
of it is built, so `data.num_clients: 1000000000` is a clear error in milliseconds instead of a
MemoryError (or the kernel's OOM killer) after minutes of work.

What grows with the config, measured at the peak of build_data (tracemalloc, tiny-random-bert
tokenizer, max_length 16): each (client, task) of the partition ~250 bytes (Dirichlet shares,
index arrays, partition rows: 715-772 bytes per client over 3 tasks at 50,000 and 200,000
clients), and each generated text example ~810 bytes (the sentence, the tokenizer's buffers,
the encoded ids; 811-820 bytes at 100,000 and 400,000 per task), of which the encoded ids grow
with max_length. Tasks read from a package or the hub are bounded by their source (a request
beyond it takes the whole source), so only generated tasks count their requested size.
"""

from __future__ import annotations

from pathlib import Path

from fltac_ray.data.registry import TASKS
from fltac_ray.errors import ResourceUnavailableError

PER_CLIENT_TASK_BYTES = 300
PER_TEXT_EXAMPLE_BYTES = 300  # the sentence and the tokenizer's buffers
PER_TOKEN_BYTES = 32  # ids and attention mask (int64) and the tokenizer's copies
PER_VECTOR_FEATURE_BYTES = 12  # float32 features, drawn in float64 first


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def data_memory_estimate(config) -> tuple[int, list[tuple[int, str]]]:
    """(bytes at the peak of preparing the data, (bytes, what) of each part)."""
    data = config.data
    tasks = data.task_names
    partition = data.num_clients * len(tasks) * PER_CLIENT_TASK_BYTES
    parts = [(partition, f"data.num_clients = {data.num_clients:,} x {len(tasks)} tasks x "
                         f"~{PER_CLIENT_TASK_BYTES} B = {_size(partition)}")]
    total = partition
    if data.train_limit is None:  # all: only sources with an end allow it (config validation)
        return partition, parts
    examples = data.train_limit + data.test_per_task
    for task in tasks:
        spec = TASKS.get(task)
        if spec is None or spec.source != "synthetic" or spec.loader is not None:
            continue  # bounded by its source (or a plug-in's own loader)
        if spec.kind == "vector":
            each = PER_VECTOR_FEATURE_BYTES * data.feature_dim + 100
        else:
            each = PER_TEXT_EXAMPLE_BYTES + PER_TOKEN_BYTES * data.max_length
        total += examples * each
        parts.append((examples * each, f"{task}: data.train_per_task + data.test_per_task = {examples:,} "
                                       f"generated examples x ~{each} B = {_size(examples * each)}"))
    return total, parts


def check_data_fits(config, available: int | None = None) -> None:
    """ResourceUnavailableError when preparing the data would need more memory than is available."""
    available = available_memory() if available is None else available
    if available is None:
        return
    needed, parts = data_memory_estimate(config)
    if needed > available:
        # the parts that matter (at least a tenth of the total), largest first
        major = [text for size, text in sorted(parts, key=lambda part: -part[0]) if size >= needed / 10]
        raise ResourceUnavailableError(
            f"the experiment's data would need about {_size(needed)} of memory to prepare ("
            + "; ".join(major) + f"), more than the {_size(available)} this machine has available; "
            "lower data.num_clients or data.train_per_task (an estimate: fltac_ray/data/sizing.py)")
