"""Your own tasks declared in YAML (data.custom_tasks): files, Hugging Face datasets, checks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fltac_ray.config import build_config
from fltac_ray.data.custom import load_custom_task
from fltac_ray.errors import ConfigError, DataFileError, ResourceUnavailableError

from .conftest import tiny_config


def _config(custom: dict, tasks: list[str] | None = None, **data):
    return build_config({"data": {"custom_tasks": custom, "tasks": tasks or list(custom), **data},
                         "model": {"name": "tiny-random-bert"}})


def _csv(path, rows: dict) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_a_csv_task_reads_named_columns_and_class_names(tmp_path):
    train = _csv(tmp_path / "train.csv", {"review": [f"text {i}" for i in range(6)],
                                           "stars": ["bad", "good", "good", "bad", "good", "1"]})
    test = _csv(tmp_path / "test.csv", {"review": ["a", "b"], "stars": [0, "good"]})
    config = _config({"reviews": {"train": train, "test": test, "text": "review", "label": "stars",
                                  "classes": ["bad", "good"]}})
    assert config.data.spec("reviews").num_classes == 2 and config.data.modality == "text"
    spec = config.data.custom_tasks["reviews"]
    loaded_train, loaded_test = load_custom_task("reviews", spec, config, np.random.default_rng(0))
    assert loaded_train.class_names == ["bad", "good"] and loaded_train.kind == "text"
    # names and indices both map to ids; rows come in random order, whole
    by_text = dict(zip(loaded_train.texts, loaded_train.labels.tolist(), strict=True))
    assert by_text == {"text 0": 0, "text 1": 1, "text 2": 1, "text 3": 0, "text 4": 1, "text 5": 1}
    assert sorted(zip(loaded_test.texts, loaded_test.labels.tolist(), strict=True)) == [("a", 0), ("b", 1)]


def test_without_a_test_file_the_engine_cuts_one_pool(tmp_path):
    train = _csv(tmp_path / "t.csv", {"text": [f"s{i}" for i in range(20)], "label": [i % 3 for i in range(20)]})
    config = _config({"mine": {"train": train, "num_classes": 3}}, train_per_task=8, test_per_task=4)
    pool = load_custom_task("mine", config.data.custom_tasks["mine"], config, np.random.default_rng(1))
    assert len(pool) == 12 and pool.class_names == ["0", "1", "2"]  # train + test drawn, no names given
    assert all(label == int(text[1:]) % 3 for text, label in zip(pool.texts, pool.labels, strict=True))


def test_every_bad_label_and_column_is_named_with_file_row_and_value(tmp_path):
    train = _csv(tmp_path / "train.csv", {"text": ["a", "b", "c"], "label": ["good", "bad", "great"]})
    config = _config({"r": {"train": train, "classes": ["bad", "good"]}})
    with pytest.raises(DataFileError) as caught:
        load_custom_task("r", config.data.custom_tasks["r"], config, np.random.default_rng(0))
    assert str(caught.value) == (
        f"data file {train}: (data.custom_tasks.r.train) row 2 (from 0, after any header): label 'great' in "
        "column 'label'; expected one of ['bad', 'good'] or a whole number in 0..1")
    config = _config({"r": {"train": train, "text": "review", "classes": ["bad", "good"]}})
    with pytest.raises(DataFileError, match=r"has no column \['review'\]; it has \['text', 'label'\]"):
        load_custom_task("r", config.data.custom_tasks["r"], config, np.random.default_rng(0))
    config = _config({"r": {"train": str(tmp_path / "missing.csv"), "num_classes": 2}})
    with pytest.raises(DataFileError, match=r"missing.csv: \(data.custom_tasks.r.train\) no such file"):
        load_custom_task("r", config.data.custom_tasks["r"], config, np.random.default_rng(0))


@pytest.mark.parametrize(("entry", "message"), [
    ({"num_classes": 2}, "give either train (a file) or dataset"),
    ({"train": "a.csv", "dataset": "imdb", "num_classes": 2}, "not both"),
    ({"train": "a.csv"}, "give classes (the class names in label order) or num_classes"),
    ({"train": "a.xlsx", "num_classes": 2}, "unsupported file type"),
    ({"train": "a.csv", "kind": "text_pair", "num_classes": 2}, "two text columns"),
    ({"train": "a.csv", "classes": ["x", "y"], "num_classes": 3}, "classes has 2 names but num_classes = 3"),
    ({"dataset": "imdb", "test": "b.csv", "num_classes": 2}, "a dataset names its test split in test_split"),
    ({"train": "a.jsonl", "kind": "instruction", "num_classes": 2}, "an instruction task has no classes"),
])
def test_a_custom_task_entry_is_checked_before_anything_runs(entry, message):
    with pytest.raises(ConfigError) as caught:
        _config({"mine": entry})
    assert "data.custom_tasks.mine" in str(caught.value) and message in str(caught.value)


def test_task_names_must_be_declared_and_new():
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['my_reviews'\].*declare your own in data.custom_tasks"):
        tiny_config(data={"tasks": ["my_reviews"]})
    with pytest.raises(ConfigError, match="'glue_sst2' is a registered task"):
        _config({"glue_sst2": {"train": "a.csv", "num_classes": 2}})


def test_a_hugging_face_dataset_folder_with_splits_as_a_text_pair_task(tmp_path):
    import datasets

    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"q": ["q1", "q2", "q3"], "a": ["a1", "a2", "a3"], "y": [0, 1, 1]}),
        "validation": datasets.Dataset.from_dict({"q": ["q4"], "a": ["a4"], "y": [1]}),
    })
    splits.save_to_disk(str(tmp_path / "pairs"))
    config = _config({"pairs": {"dataset": str(tmp_path / "pairs"), "test_split": "validation", "kind": "text_pair",
                                "text": ["q", "a"], "label": "y", "classes": ["no", "yes"]}})
    train, test = load_custom_task("pairs", config.data.custom_tasks["pairs"], config, np.random.default_rng(0))
    assert sorted(zip(train.texts, train.pairs, train.labels.tolist(), strict=True)) == [("q1", "a1", 0), ("q2", "a2", 1), ("q3", "a3", 1)]
    assert (test.texts, test.pairs, test.labels.tolist()) == (["q4"], ["a4"], [1])
    config = _config({"pairs": {"dataset": str(tmp_path / "pairs"), "test_split": "test", "kind": "text_pair",
                                "text": ["q", "a"], "label": "y", "classes": ["no", "yes"]}})
    with pytest.raises(ResourceUnavailableError, match=r"no split 'test'; it has \['train', 'validation'\]"):
        load_custom_task("pairs", config.data.custom_tasks["pairs"], config, np.random.default_rng(0))


def test_image_paths_relative_to_the_file_and_instruction_rows(tmp_path):
    from PIL import Image

    for i, size in enumerate([(8, 8), (8, 8), (12, 10)]):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(tmp_path / f"p{i}.png")
    train = _csv(tmp_path / "images.csv", {"file": ["p0.png", "p1.png", "p2.png"], "label": [0, 1, 1]})
    config = build_config({"data": {"custom_tasks": {"pics": {"kind": "image", "train": train, "image": "file",
                                                               "num_classes": 2}}, "tasks": ["pics"]},
                           "model": {"name": "tiny-random-vit"}})
    assert config.data.modality == "image"
    pool = load_custom_task("pics", config.data.custom_tasks["pics"], config, np.random.default_rng(0))
    assert pool.images.shape == (3, 3, 8, 8)  # the odd-sized one resized to the common size
    assert sorted(int(img.mean()) for img in pool.images) == [0, 40, 80]

    rows = [{"instruction": "define run", "context": "", "response": "move fast"},
            {"instruction": "define walk", "context": "verb", "response": "move on foot"}]
    (tmp_path / "tune.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = build_config({"data": {"custom_tasks": {"howto": {"kind": "instruction", "train": str(tmp_path / "tune.jsonl"),
                                                                "context": "context"}}, "tasks": ["howto"]},
                           "model": {"name": "tiny-random-llama"}})
    assert config.data.modality == "causal_lm" and config.data.spec("howto").num_classes == 0
    pool = load_custom_task("howto", config.data.custom_tasks["howto"], config, np.random.default_rng(0))
    assert sorted(pool.pairs) == ["move fast", "move on foot"] and all("define" in p for p in pool.texts)


@pytest.mark.usefixtures("ray_cluster")
def test_the_readme_csv_example_trains(tmp_path):
    """experiments/custom_csv.yaml as docs/algorithms.md runs it (on the tiny model, one round)."""
    from pathlib import Path

    from fltac_ray.api import run
    from fltac_ray.config import load_config

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "experiments" / "custom_csv.yaml",
                         ["rounds=1", "model.name=tiny-random-bert", "train.local_steps=2"])
    raw = config.resolved()
    for entry in raw["data"]["custom_tasks"].values():  # the file's paths are relative to the repository
        entry["train"], entry["test"] = str(root / entry["train"]), str(root / entry["test"])
    result = run(raw, out=tmp_path / "run", quiet=True, report=False)
    assert list(result.final.index) == ["reviews", "topics", "tenses"]
    assert (result.metrics["test_samples"] == 100).all()
    assert len(result.adapters) == 3  # one per K-means cluster (K = 3 tasks)
