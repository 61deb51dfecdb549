"""Your own tasks, declared in YAML (data.custom_tasks): local files or any Hugging Face dataset,
read by the columns you name.

    data:
      custom_tasks:
        reviews:
          train: data/reviews_train.csv   # or dataset: an id / folder (+ subset, train_split, test_split)
          test: data/reviews_test.csv     # optional: else cut from train
          text: review                    # [question, answer] for kind: text_pair
          label: stars
          classes: [bad, good]            # labels: these names or 0..len-1 (num_classes: n without names)
      tasks: [reviews]

Each file or split is checked before anything trains: it exists and reads, has the named columns
and rows, and every label is one of the classes (the error names the file, the row and the value).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fltac_ray.data.instructions import format_prompt
from fltac_ray.data.types import Examples, instructions
from fltac_ray.errors import DataFileError, ResourceUnavailableError, excerpt, header_excerpt

if TYPE_CHECKING:
    from fltac_ray.config import CustomTaskConfig, ExperimentConfig


def _setting(task: str, key: str) -> str:
    return f"data.custom_tasks.{task}.{key}"


def _open_dataset(custom: CustomTaskConfig, split: str, task: str) -> Any:
    """One split of a Hugging Face dataset: a save_to_disk folder, a folder of data files, or a
    hub id (read from the hub or its local cache)."""
    import datasets

    source = Path(custom.dataset).expanduser()
    where = f"{_setting(task, 'dataset')} = {custom.dataset!r}"
    try:
        if source.is_dir() and ((source / "state.json").is_file() or (source / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(source))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ResourceUnavailableError(f"{where}: no split {split!r}; it has {sorted(loaded)}")
                return loaded[split]
            if split != custom.train_split:
                raise ResourceUnavailableError(f"{where}: a single Dataset has no split {split!r}; give "
                                               "test files or leave test_split out")
            return loaded
        return datasets.load_dataset(str(source) if source.is_dir() else custom.dataset, custom.subset, split=split)
    except ResourceUnavailableError:
        raise
    except Exception as exc:  # hub unreachable, unknown id or split, unreadable folder
        raise ResourceUnavailableError(
            f"{where}{f' (subset {custom.subset!r})' if custom.subset else ''}, split {split!r}: could not load it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); offline, give a "
            "folder (data files or Dataset.save_to_disk) or train/test files") from exc


def _rows(custom: CustomTaskConfig, role: str, task: str) -> tuple[Any, Path | None, str]:
    """(the rows, the file they came from or None, the setting naming them) of train or test."""
    from fltac_ray.data.hf import read_data_file

    if custom.train is not None:
        path = Path(getattr(custom, role)).expanduser()
        return read_data_file(path, _setting(task, role)), path, _setting(task, role)
    split = custom.train_split if role == "train" else custom.test_split
    key = "train_split" if role == "train" else "test_split"
    return _open_dataset(custom, split, task), None, f"{_setting(task, key)} = {split!r}"


def _fail(path: Path | None, where: str, problem: str) -> None:
    if path is not None:
        raise DataFileError(path, f"({where}) {problem}")
    raise ResourceUnavailableError(f"{where}: {problem}")


def _check_columns(custom: CustomTaskConfig, rows: Any, path: Path | None, where: str) -> None:
    if custom.kind in ("text", "text_pair"):
        needed = [*custom.text_columns, custom.label]
    elif custom.kind == "image":
        needed = [custom.image, custom.label]
    else:
        needed = [custom.instruction, *([custom.context] if custom.context else []), custom.response]
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        _fail(path, where, f"has no column {missing}; it has {header_excerpt(rows.column_names)}")
    if len(rows) == 0:
        _fail(path, where, "has no rows")


def label_ids(values: list[Any], class_names: list[str], named: bool, path: Path | None, where: str,
              column: str) -> np.ndarray:
    """Labels -> class ids: a class's name (when names were given) or its index 0..n-1 (hf's
    class_index: also as text, or a whole float such as 1.0). Anything else is refused with its
    row and value."""
    from fltac_ray.data.hf import class_index

    index = {name: i for i, name in enumerate(class_names)} if named else {}
    ids = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        found = index.get(value) if isinstance(value, str) else None
        if found is None:
            found = class_index(value.strip() if isinstance(value, str) else value, len(class_names))
        if found is None:
            allowed = (f"one of {class_names[:6]}{' ...' if len(class_names) > 6 else ''} or "
                       if named else "") + f"a whole number in 0..{len(class_names) - 1}"
            _fail(path, where, f"row {row} (from 0, after any header): label {excerpt(value)} in column "
                  f"{column!r}; expected {allowed}")
        ids[row] = found
    return ids


def _images(values: list[Any], path: Path | None, where: str, size: int | None) -> np.ndarray:
    """(n, 3, h, w) uint8 from datasets Images (PIL), their stored form, or file paths (relative
    to the data file's folder); images of different sizes are resized to one (`size`, else the
    most common size, the larger on a tie), since a task's images are stacked into one array."""
    from PIL import Image

    from fltac_ray.data.hf import rgb_image

    pictures = []
    for row, value in enumerate(values):
        try:
            if isinstance(value, str):
                file = Path(value).expanduser()
                value = Image.open(file if file.is_absolute() or path is None else path.parent / file)
            pictures.append(rgb_image(value))
        except (OSError, AttributeError, KeyError) as exc:
            _fail(path, where, f"row {row}: cannot read the image {excerpt(str(value))} ({type(exc).__name__}: {exc})")
    counts = Counter(p.size for p in pictures)  # (w, h) -> images of that size
    side = (size, size) if size else max(counts, key=lambda wh: (counts[wh], wh[0] * wh[1]))
    if size or any(p.size != side for p in pictures):
        pictures = [p.resize(side, Image.BILINEAR) if p.size != side else p for p in pictures]
    return np.stack([np.asarray(p, dtype=np.uint8).transpose(2, 0, 1) for p in pictures])


def _examples(custom: CustomTaskConfig, rows: Any, labels: np.ndarray | None, path: Path | None, where: str,
              config: ExperimentConfig) -> Examples:
    """The drawn rows as Examples; `labels`: their class ids (None for instruction rows)."""
    if custom.kind == "instruction":
        contexts = rows[custom.context] if custom.context else [""] * len(rows)
        prompts = [format_prompt(str(i), str(c or "")) for i, c in zip(rows[custom.instruction], contexts, strict=True)]
        return instructions(prompts, [str(r) for r in rows[custom.response]])
    names = custom.class_names
    if custom.kind == "image":
        return Examples("image", labels, names, images=_images(rows[custom.image], path, where, config.model.image_size))
    columns = custom.text_columns
    texts = [str(t) for t in rows[columns[0]]]
    pairs = [str(t) for t in rows[columns[1]]] if len(columns) > 1 else None
    return Examples(custom.kind, labels, names, texts=texts, pairs=pairs)


def _checked_labels(custom: CustomTaskConfig, rows: Any, path: Path | None, where: str) -> np.ndarray | None:
    """(rows,) class ids of every row — so every label is checked, not only those drawn, and an
    error's row number is the file's — once the columns are known good; None for instructions."""
    _check_columns(custom, rows, path, where)
    if custom.kind == "instruction":
        return None
    return label_ids(rows[custom.label], custom.class_names, custom.classes is not None, path, where, custom.label)


def _source(custom: CustomTaskConfig, role: str, task: str) -> tuple[Any, np.ndarray | None, Path | None, str]:
    """train's or test's rows, checked, with their class ids, file and setting."""
    rows, path, where = _rows(custom, role, task)
    return rows, _checked_labels(custom, rows, path, where), path, where


def _draw(source: tuple[Any, np.ndarray | None, Path | None, str], n: int | None, rng: np.random.Generator,
          config: ExperimentConfig, custom: CustomTaskConfig) -> Examples:
    """n rows drawn at random (None or more than there are: all), in random order, as Examples."""
    rows, labels, path, where = source
    order = rng.permutation(len(rows))[:n]
    return _examples(custom, rows.select(order.tolist()), None if labels is None else labels[order], path, where,
                     config)


def load_custom_task(task: str, custom: CustomTaskConfig, config: ExperimentConfig,
                     rng: np.random.Generator) -> Examples | tuple[Examples, Examples]:
    """The task's (train, test) examples when it has a test file or split (at most
    data.train_per_task / test_per_task of each), else one pool in random order that the engine
    cuts into train and test. Both sources are checked before either is drawn from."""
    data = config.data
    train = _source(custom, "train", task)
    if custom.test is None and custom.test_split is None:
        limit = None if data.train_limit is None else data.train_limit + data.test_per_task
        return _draw(train, limit, rng, config, custom)
    test = _source(custom, "test", task)
    return _draw(train, data.train_limit, rng, config, custom), _draw(test, data.test_per_task, rng, config, custom)
