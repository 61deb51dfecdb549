"""The Hugging Face paths (GLUE, CIFAR, Dolly) on small local files in the hub's formats, and the
paper's model families built from tiny random configs: no download anywhere."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fltac_ray.config import build_config
from fltac_ray.data.encoding import make_featurizer
from fltac_ray.data.federated import build_federated_data
from fltac_ray.data.hf import load_hub_task
from fltac_ray.errors import ConfigError, DataFileError, ResourceUnavailableError
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.builders import load_backbone, load_tokenizer

DOLLY_CATEGORIES = ["closed_qa", "brainstorming"]


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """GLUE as the hub's Parquet (SST-2) and as TSV (MRPC), CIFAR-10 as Parquet with the hub's
    image struct {bytes, path}, Dolly as its JSON lines."""
    root = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(0)
    files: dict[str, dict[str, str]] = {}
    for split, n in (("train", 40), ("validation", 12)):
        words = ["bad", "good"]  # GLUE SST-2: 0 negative, 1 positive
        labels = rng.integers(0, 2, n)
        pd.DataFrame({"sentence": [f"a {words[y]} film {i}" for i, y in enumerate(labels)],
                      "label": labels, "idx": np.arange(n)}).to_parquet(root / f"sst2-{split}.parquet")
        pd.DataFrame({"sentence1": [f"he said {i}" for i in range(n)],
                      "sentence2": [f"he {'said' if y else 'ate'} {i}" for i, y in enumerate(labels)],
                      "label": labels, "idx": np.arange(n)}).to_csv(root / f"mrpc-{split}.tsv", sep="\t", index=False)
    files["glue_sst2"] = {"train": str(root / "sst2-train.parquet"), "test": str(root / "sst2-validation.parquet")}
    files["glue_mrpc"] = {"train": str(root / "mrpc-train.tsv"), "test": str(root / "mrpc-validation.tsv")}
    for split, n in (("train", 30), ("test", 10)):
        rows = []
        for i in range(n):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            rows.append({"img": {"bytes": buffer.getvalue(), "path": None}, "label": i % 10})
        pd.DataFrame(rows).to_parquet(root / f"cifar10-{split}.parquet")
    files["cifar10"] = {"train": str(root / "cifar10-train.parquet"), "test": str(root / "cifar10-test.parquet")}
    with (root / "dolly.jsonl").open("w") as handle:
        for i in range(60):
            category = DOLLY_CATEGORIES[i % 2]
            handle.write(json.dumps({"instruction": f"Question {i}?", "context": "Some passage." if i % 4 == 0 else "",
                                     "response": f"Answer number {i}.", "category": category}) + "\n")
    for category in DOLLY_CATEGORIES:
        files[f"dolly_{category}"] = {"train": str(root / "dolly.jsonl")}
    return files


def test_glue_single_and_pair_tasks_load_with_labels_and_second_sentences(hub_files):
    rng = np.random.default_rng(0)
    train, test = load_hub_task("glue_sst2", "text", 30, 100, rng, hub_files["glue_sst2"])
    assert (len(train), len(test)) == (30, 12)  # test capped at the validation split's size
    assert train.pairs is None and train.class_names == ["negative", "positive"]
    assert all(("good" in t) == bool(y) for t, y in zip(train.texts, train.labels, strict=True))
    pair, _ = load_hub_task("glue_mrpc", "text_pair", 20, 5, rng, hub_files["glue_mrpc"])
    assert pair.kind == "text_pair" and len(pair.pairs) == 20
    assert all(s2.endswith(s1.split()[-1]) for s1, s2 in zip(pair.texts, pair.pairs, strict=True))


def test_cifar_parquet_images_decode_to_uint8_channels_first(hub_files):
    train, test = load_hub_task("cifar10", "image", 30, 10, np.random.default_rng(0), hub_files["cifar10"])
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == np.uint8
    assert sorted(set(train.labels)) == list(range(10)) and len(test) == 10


def test_dolly_splits_by_category_with_the_prompt_template(hub_files):
    train, test = load_hub_task("dolly_closed_qa", "instruction", 20, 10, np.random.default_rng(0),
                                hub_files["dolly_closed_qa"])
    assert len(train) + len(test) == 30  # the 30 closed_qa rows, 2:1
    assert all(p.startswith("### Instruction:\nQuestion") and p.endswith("### Response:\n") for p in train.texts)
    assert any("### Context:\nSome passage." in p for p in train.texts + test.texts)
    numbers = [int(p.split("Question ")[1].split("?")[0]) for p in train.texts]
    assert all(n % 2 == 0 for n in numbers)  # closed_qa rows only
    assert all(r == f"Answer number {n}." for n, r in zip(numbers, train.pairs, strict=True))


def test_train_per_task_all_takes_every_training_example(hub_files):
    """data.train_per_task: all (the papers used the full data sets): the whole train split;
    Dolly (one pool per category): test_per_task for testing, every other row trains."""
    train, test = load_hub_task("glue_sst2", "text", None, 5, np.random.default_rng(0), hub_files["glue_sst2"])
    assert (len(train), len(test)) == (40, 5)
    train, test = load_hub_task("dolly_closed_qa", "instruction", None, 4, np.random.default_rng(0),
                                hub_files["dolly_closed_qa"])
    assert (len(train), len(test)) == (26, 4)
    config = build_config({"data": {"tasks": ["digits"], "train_per_task": "all", "test_per_task": 300},
                           "model": {"name": "tiny-random-vit"}})
    data = build_federated_data(config, make_featurizer("tiny-random-vit", 16))
    assert (len(data.tasks["digits"].train), len(data.tasks["digits"].test)) == (1797 - 300, 300)
    with pytest.raises(ConfigError, match="data.train_per_task = 'all': tasks \\['synthetic_topic'\\] are generated"):
        build_config({"data": {"tasks": ["synthetic_topic"], "train_per_task": "all"}})


def test_missing_local_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataFileError, match=f"data file {missing}: \\(data.files.glue_sst2.train\\) no such file"):
        load_hub_task("glue_sst2", "text", 5, 5, np.random.default_rng(0), {"train": str(missing), "test": str(missing)})
    with pytest.raises(DataFileError, match=r"\(data.files.glue_sst2.train\) is a folder, not a file"):
        load_hub_task("glue_sst2", "text", 5, 5, np.random.default_rng(0),
                      {"train": str(_folder(tmp_path / "d.csv")), "test": str(missing)})
    with pytest.raises(DataFileError, match=r"unsupported file type '.xlsx'; use one of"):
        load_hub_task("glue_sst2", "text", 5, 5, np.random.default_rng(0),
                      {"train": str(tmp_path / "a.xlsx"), "test": str(missing)})
    with pytest.raises(ResourceUnavailableError, match="data.files.glue_sst2 has no 'train' entry"):
        load_hub_task("glue_sst2", "text", 5, 5, np.random.default_rng(0), {"test": str(missing)})


def _folder(path):
    path.mkdir()
    return path


def test_pairs_are_encoded_with_segment_ids(hub_files):
    config = build_config({"data": {"tasks": ["glue_sst2", "glue_mrpc"], "num_clients": 3, "train_per_task": 40,
                                    "test_per_task": 12, "max_length": 24,
                                    "files": {k: hub_files[k] for k in ("glue_sst2", "glue_mrpc")}},
                           "model": {"name": "tiny-random-bert"}})
    data = build_federated_data(config, make_featurizer("tiny-random-bert", 24))
    assert "token_type_ids" not in data.tasks["glue_sst2"].train.inputs
    segments = data.tasks["glue_mrpc"].train.inputs["token_type_ids"]
    assert segments.shape == (40, 24) and segments.max() == 1  # second sentence marked
    model = AdapterModel(load_backbone("tiny-random-bert", "text"), config.model, 2, 0)
    batch = {k: torch.from_numpy(v[:4]) for k, v in data.tasks["glue_mrpc"].train.inputs.items()}
    assert model(**batch, num_classes=2).shape == (4, 2)


def test_vit_and_llama_get_lora_on_their_attention_projections():
    vit = build_config({"data": {"tasks": ["cifar10"]}, "model": {"name": "tiny-random-vit"}})
    model = AdapterModel(load_backbone("tiny-random-vit", "image"), vit.model, 10, 0, modality="image")
    names = [n for n, _ in model.adapter_layout()]
    assert any("q_proj.lora_A" in n for n in names) and any("v_proj.lora_B" in n for n in names)
    pixels = torch.randint(0, 255, (2, 3, 20, 20), dtype=torch.uint8)  # resized to the model's 32 px
    assert model(pixels=pixels, num_classes=10).shape == (2, 10)
    llama = build_config({"data": {"tasks": ["dolly_closed_qa"]}, "model": {"name": "tiny-random-llama"}})
    lm = AdapterModel(load_backbone("tiny-random-llama", "causal_lm"), llama.model, 0, 0, modality="causal_lm")
    assert lm.head is None and all("lora_" in n for n, _ in lm.adapter_layout())
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in lm.adapter_layout()} == {"q_proj", "v_proj"}


def test_lm_loss_counts_response_tokens_only():
    config = build_config({"data": {"tasks": ["wordnet_define"]}, "model": {"name": "tiny-random-llama"}})
    tokenizer = load_tokenizer("tiny-random-llama")
    from fltac_ray.data.encoding import encode_instructions

    encoded = encode_instructions(tokenizer, ["### Instruction:\nsay hi\n\n### Response:\n"] * 2,
                                  ["hi there", "hello"], 32, tokenizer.sep_token_id)
    responses = encoded["lengths"] - encoded["prompt_lengths"]  # response tokens + EOS
    model = AdapterModel(load_backbone("tiny-random-llama", "causal_lm"), config.model, 0, 0, modality="causal_lm")
    tensors = {k: torch.from_numpy(v) for k, v in encoded.items() if k != "references"}
    _, _, scored = model.lm_scores(**tensors)
    assert scored == int(responses.sum())
    # changing a prompt token changes the context but the count of scored tokens stays
    tensors["input_ids"][:, 0] = 5
    assert model.lm_scores(**tensors)[2] == scored


def test_instruction_truncation_keeps_the_response():
    tokenizer = load_tokenizer("tiny-random-llama")
    from fltac_ray.data.encoding import encode_instructions

    long_prompt = "word " * 100
    encoded = encode_instructions(tokenizer, [long_prompt], ["short answer"], 16, tokenizer.sep_token_id)
    ids = encoded["input_ids"][0]
    assert encoded["lengths"][0] == 16
    response = tokenizer.decode(ids[encoded["prompt_lengths"][0]:encoded["lengths"][0] - 1])
    assert response == "short answer"


@pytest.mark.usefixtures("ray_cluster")
def test_engine_runs_cifar_and_dolly_fixtures_end_to_end(hub_files, tmp_path):
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    common = {"rounds": 1, "train": {"local_steps": 2, "batch_size": 4, "eval_batch_size": 8}}
    vision = build_config({**common, "name": "cifar_fixture", "model": {"name": "tiny-random-vit"},
                           "data": {"tasks": ["cifar10"], "num_clients": 3, "train_per_task": 30,
                                    "test_per_task": 10, "files": {"cifar10": hub_files["cifar10"]}}})
    result = Simulation(vision, out=str(tmp_path / "v"), progress=Progress(quiet=True)).run()
    assert result.metrics["task"].tolist() == ["cifar10"] * 2 and result.metrics["rouge_l"].isna().all()  # rounds 0, 1
    dolly = build_config({**common, "name": "dolly_fixture", "model": {"name": "tiny-random-llama"},
                          "train": {**common["train"], "max_new_tokens": 4},
                          "data": {"tasks": [f"dolly_{c}" for c in DOLLY_CATEGORIES], "num_clients": 3,
                                   "train_per_task": 20, "test_per_task": 10, "max_length": 48,
                                   "files": {f"dolly_{c}": hub_files[f"dolly_{c}"] for c in DOLLY_CATEGORIES}}})
    result = Simulation(dolly, out=str(tmp_path / "d"), progress=Progress(quiet=True)).run()
    metrics = result.metrics
    assert sorted(metrics["task"]) == ["dolly_brainstorming"] * 2 + ["dolly_closed_qa"] * 2  # rounds 0, 1
    assert metrics["rouge_l"].between(0, 1).all() and (metrics["perplexity"] > 1).all()
    assert metrics["majority_accuracy"].isna().all()


SST2_HEADER = "sentence,label\n"
BAD_DATA_FILES = [
    # (file name, content, words of the error)
    ("malformed.csv", SST2_HEADER + 'a film,1\n"unclosed quote,0\nmore,1,extra,cells\n', "cannot be read as CSV"),
    ("no_label.csv", "sentence,stars\na film,5\n", "has no column ['label']; it has ['sentence', 'stars']"),
    ("empty.csv", "", "cannot be read as CSV"),
    ("header_only.csv", SST2_HEADER, "has no rows"),
    ("string_label.csv", SST2_HEADER + "a film,1\nanother,positive\n", "data row 1"),
    ("fraction_label.csv", SST2_HEADER + "a film,0.5\nanother,1.5\n", "label 0.5"),
    ("nan_label.csv", SST2_HEADER + "a film,1\nanother,\n", "data row 1"),
    ("out_of_range.csv", SST2_HEADER + "a film,1\nanother,7\n", "label 7"),
    ("latin1.csv", (SST2_HEADER + "caf\u00e9 cr\u00e8me,1\n").encode("latin-1"), "not UTF-8 text"),
    ("broken.jsonl", '{"sentence": "a film", "label": 1}\n{"sentence": "cut\n', "cannot be read as JSON"),
    ("garbage.parquet", b"PAR1 this is not parquet at all", "cannot be read as PARQUET"),
    ("binary.csv", bytes(range(256)) * 4, "cannot be read as CSV"),
]


@pytest.mark.parametrize(("name", "content", "words"), BAD_DATA_FILES, ids=[row[0] for row in BAD_DATA_FILES])
def test_a_bad_data_file_is_a_data_file_error_naming_the_file_and_the_problem(tmp_path, name, content, words):
    from fltac_ray.errors import DataFileError

    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    good = tmp_path / "good.csv"
    good.write_text(SST2_HEADER + "a film,1\nanother,0\n")
    with pytest.raises(DataFileError) as info:
        load_hub_task("glue_sst2", "text", 5, 5, np.random.default_rng(0), {"train": str(path), "test": str(good)})
    message = str(info.value)
    assert str(path) in message and "data.files.glue_sst2.train" in message and words in message, message
