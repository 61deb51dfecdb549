"""The paper's data sets through Hugging Face `datasets`: GLUE, CIFAR-10/100, Databricks-Dolly-15k.

With hub access the data is fetched by id (and cached by `datasets`). Without it, point
`data.files` at local copies in the same formats (CSV/TSV, JSON lines or Parquet with the hub's
column names): `load_dataset("csv"|"json"|"parquet", data_files=...)` runs fully offline.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fltac_ray.data.instructions import format_prompt
from fltac_ray.data.types import DATA_FILE_FORMATS, Examples, TaskKind, instructions
from fltac_ray.errors import DataFileError, ResourceUnavailableError, excerpt, header_excerpt


@dataclass(frozen=True)
class HubSource:
    path: str  # hub id
    config: str | None  # hub config name (GLUE's task)
    train_split: str
    test_split: str | None  # None: cut the test set from the training split (Dolly)
    text_columns: tuple[str, ...] = ()  # one column: text, two: text pair
    image_column: str = ""
    label_column: str = "label"
    class_names: tuple[str, ...] = ()


GLUE_LABELS = {
    "sst2": ("negative", "positive"),
    "mrpc": ("not equivalent", "equivalent"),
    "qqp": ("not duplicate", "duplicate"),
    "qnli": ("entailment", "not entailment"),
    "rte": ("entailment", "not entailment"),
}
GLUE_COLUMNS = {
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
DOLLY_CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing",
                    "general_qa", "information_extraction", "open_qa", "summarization")

SOURCES: dict[str, HubSource] = {
    # GLUE's test labels are hidden (-1): the validation split is the test set, as is customary.
    **{f"glue_{name}": HubSource("nyu-mll/glue", name, "train", "validation", GLUE_COLUMNS[name],
                                 class_names=GLUE_LABELS[name]) for name in GLUE_LABELS},
    "cifar10": HubSource("uoft-cs/cifar10", None, "train", "test", image_column="img",
                         class_names=CIFAR10_CLASSES),
    "cifar100": HubSource("uoft-cs/cifar100", None, "train", "test", image_column="img",
                          label_column="fine_label", class_names=tuple(f"class {i}" for i in range(100))),
    **{f"dolly_{category}": HubSource("databricks/databricks-dolly-15k", None, "train", None)
       for category in DOLLY_CATEGORIES},
}



@contextlib.contextmanager
def _no_progress_bars():
    """datasets' progress bars off for the block, as they were after it."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _load_split(source: HubSource, role: str, files: dict[str, str] | None, task: str) -> Any:
    """role "train" or "test": the hub split playing it, or data.files.<task>.<role>."""
    from datasets import load_dataset

    split = source.train_split if role == "train" else source.test_split
    if files is not None:
        if role not in files:
            raise ResourceUnavailableError(
                f"data.files.{task} has no '{role}' entry (has {sorted(files)})")
        path = Path(files[role]).expanduser()
        dataset = read_data_file(path, f"data.files.{task}.{role}")
        _check_columns(source, dataset, path, task, role)
        return dataset
    try:
        return load_dataset(source.path, source.config, split=split)
    except Exception as exc:  # hub unreachable, dataset missing, ...
        raise ResourceUnavailableError(
            f"could not load {source.path}{'/' + source.config if source.config else ''} split "
            f"{split!r} for task {task} ({type(exc).__name__}: {exc}); without hub access, set "
            f"data.files.{task} to local train/test files in the same format") from exc


def read_data_file(path: Path, where: str) -> Any:
    """A local CSV/TSV/JSON(L)/Parquet file as a datasets Dataset, read offline; `where` names the
    setting that gave the path, for the errors (unsupported type, missing, unreadable, no rows)."""
    from datasets import load_dataset

    fmt = DATA_FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataFileError(path, f"({where}) unsupported file type {path.suffix or '(none)'!r}; use one of "
                            f"{sorted(DATA_FILE_FORMATS)}")
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise DataFileError(path, f"({where}) {what}")
    extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        with _no_progress_bars():  # a local file reads in seconds; a bar would precede any error
            return load_dataset(fmt, data_files={"rows": str(path)}, split="rows", **extra)
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many kinds for a bad file
        if "corresponds to no data" in str(exc):  # datasets' words for a file without rows
            raise DataFileError(path, f"({where}) has no rows") from None
        raise DataFileError(path, f"({where}) cannot be read as {fmt.upper()}"
                            f"{' (tab-separated)' if extra else ''}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The innermost cause of a loading failure, in one line (UTF-8 errors said plainly)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        if isinstance(exc, UnicodeDecodeError):
            break
        exc = exc.__cause__ or exc.__context__
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start}); re-save it as UTF-8"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def required_columns(source: HubSource, task: str) -> tuple[str, ...]:
    if task.startswith("dolly_"):
        return ("instruction", "context", "response", "category")
    return (*source.text_columns, *((source.image_column,) if source.image_column else ()), source.label_column)


def _check_columns(source: HubSource, dataset: Any, path: Path, task: str, role: str) -> None:
    """A local file must hold rows and the columns the task reads (the hub's names)."""
    missing = [c for c in required_columns(source, task) if c not in dataset.column_names]
    if missing:
        raise DataFileError(path, f"(data.files.{task}.{role}) has no column {missing}; it has "
                            f"{header_excerpt(dataset.column_names)}; task {task} reads "
                            f"{list(required_columns(source, task))}")
    if len(dataset) == 0:
        raise DataFileError(path, f"(data.files.{task}.{role}) has no rows")
    if task.startswith("dolly_"):
        return
    # labels must be whole numbers: a string, a fraction (0.5) or a missing value is refused, not
    # truncated or turned into a class
    for row, value in enumerate(dataset[source.label_column]):
        if class_index(value, len(source.class_names)) is None:
            raise DataFileError(path, f"(data.files.{task}.{role}) data row {row} (from 0, after any header): "
                                f"label {excerpt(value)} in column {source.label_column!r}; expected a whole number in "
                                f"0..{len(source.class_names) - 1} ({', '.join(source.class_names[:5])}"
                                f"{', ...' if len(source.class_names) > 5 else ''})")


def class_index(value: Any, count: int) -> int | None:
    """A label as a class index in 0..count-1: a whole number, also as text (a column read as
    text because of another row) or as a whole float (1.0); None for anything else (a fraction,
    a missing value, other text, a bool), which is refused, never truncated or made a class."""
    number = value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    whole = (isinstance(number, (int, np.integer)) and not isinstance(number, bool)) or (
        isinstance(number, (float, np.floating)) and np.isfinite(number) and float(number).is_integer())
    return int(number) if whole and 0 <= number < count else None


def rgb_image(value: Any) -> Any:
    """A decoded datasets Image (PIL) or its stored form {"bytes": ..., "path": ...} as an RGB
    PIL image."""
    from PIL import Image

    if isinstance(value, dict):
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    return value.convert("RGB")


def _image_array(value: Any) -> np.ndarray:
    """A datasets image (see rgb_image) -> (3, h, w) uint8."""
    return np.asarray(rgb_image(value), dtype=np.uint8).transpose(2, 0, 1)


def _take(dataset: Any, n: int, rng: np.random.Generator) -> Any:
    chosen = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    return dataset.select(np.sort(chosen).tolist())


def _classification(source: HubSource, rows: Any, kind: TaskKind) -> Examples:
    labels = np.asarray([int(v) for v in rows[source.label_column]], dtype=np.int64)  # checked whole
    names = list(source.class_names)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ResourceUnavailableError(
            f"labels outside 0..{len(names) - 1} in column {source.label_column!r} "
            f"(found {labels.min()}..{labels.max()}); GLUE test splits have hidden (-1) labels")
    if kind == "image":
        images = np.stack([_image_array(v) for v in rows[source.image_column]])
        return Examples("image", labels, names, images=images)
    texts = [str(t) for t in rows[source.text_columns[0]]]
    pairs = [str(t) for t in rows[source.text_columns[1]]] if len(source.text_columns) > 1 else None
    return Examples(kind, labels, names, texts=texts, pairs=pairs)


def load_hub_task(task: str, kind: TaskKind, n_train: int | None, n_test: int, rng: np.random.Generator,
                  files: dict[str, str] | None = None) -> tuple[Examples, Examples]:
    """(train, test) examples of one paper task, at most n_train (None: all) / n_test of each."""
    source = SOURCES[task]
    if task.startswith("dolly_"):
        category = task.removeprefix("dolly_")
        pool = _load_split(source, "train", files, task)
        pool = pool.filter(lambda row: row["category"] == category)
        if len(pool) == 0:
            raise ResourceUnavailableError(f"no Dolly rows with category {category!r} for task {task}")
        rows = _take(pool, len(pool) if n_train is None else n_train + n_test, rng)
        prompts = [format_prompt(i, c or "") for i, c in zip(rows["instruction"], rows["context"], strict=True)]
        examples = instructions(prompts, [str(r) for r in rows["response"]])
        if n_train is None:  # all: n_test examples (at most half) for testing, the rest trains
            cut = len(examples) - min(n_test, len(examples) // 2)
        else:
            cut = round(len(examples) * n_train / (n_train + n_test))
        return examples.subset(slice(0, cut)), examples.subset(slice(cut, None))
    train_split = _load_split(source, "train", files, task)
    train = _take(train_split, len(train_split) if n_train is None else n_train, rng)
    test = _take(_load_split(source, "test", files, task), n_test, rng)
    return _classification(source, train, kind), _classification(source, test, kind)
