"""Exported adapters load with plain peft and predict exactly what the engine's model predicts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel

from fltac_ray.config import build_config
from fltac_ray.errors import ConfigError
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.builders import load_backbone
from fltac_ray.models.counting import count_parameters
from fltac_ray.runs.export import (
    load_adapter,
    load_base,
    peft_tensor_name,
    standard_inputs,
    write_peft_adapter,
)

from .conftest import tiny_config

CASES = {  # model -> (tasks, head rows, inputs of 3 examples)
    # LoRA on 1x1 convolutions (peft's Conv2d layer)
    "efficientnet-lite0": (["digits"], 10, lambda rng: {
        "pixels": torch.from_numpy(rng.integers(0, 255, (3, 1, 8, 8)).astype(np.uint8))}),
    "tiny-random-bert": (["synthetic_topic"], 4, lambda rng: {
        "input_ids": torch.from_numpy(rng.integers(1, 500, (3, 9))).int(),
        "lengths": torch.tensor([9, 4, 6])}),
    "tiny-random-vit": (["digits"], 10, lambda rng: {
        "pixels": torch.from_numpy(rng.integers(0, 255, (3, 1, 8, 8)).astype(np.uint8))}),
    "random-mlp": (["synthetic_linear"], 4, lambda rng: {
        "features": torch.from_numpy(rng.normal(size=(3, 16)).astype(np.float32))}),
}


def _trained_like(model: AdapterModel, seed: int) -> np.ndarray:
    """A non-trivial adapter (LoRA B is zero at init, which would hide a misplaced A)."""
    rng = np.random.default_rng(seed)
    vector = model.get_adapter() + rng.normal(0, 0.3, model.adapter_size).astype(np.float32)
    model.set_adapter(vector)
    return vector


def _export(tmp_path, config, model: AdapterModel, vector: np.ndarray, head_rows: int):
    info = {"cluster": 0, "format": "peft", "model": config.model.name, "modality": config.data.modality,
            "pooling": config.model.pooling, "image_size": config.model.image_size,
            "feature_dim": config.data.feature_dim, "seed": config.seed, "head_rows": head_rows,
            "num_labels": head_rows, "class_names": []}
    write_peft_adapter(tmp_path, vector, model.adapter_layout(), config, info)
    return tmp_path


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_adapter_of_a_base_built_in_code_loads_with_peft_on_load_base(tmp_path, name):
    tasks, head_rows, make_inputs = CASES[name]
    size = {"image_size": 48} if name == "efficientnet-lite0" else {}  # smallest that keeps features
    config = build_config({"data": {"tasks": tasks}, "model": {"name": name, "lora": {"rank": 2}, **size}})
    modality = config.data.modality
    model = AdapterModel(load_backbone(name, modality, seed=0), config.model, head_rows, seed=0,
                         modality=modality).eval()
    vector = _trained_like(model, seed=1)
    folder = _export(tmp_path, config, model, vector, head_rows)

    assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                  "fltac_ray.json"}
    peft_config = json.loads((folder / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 2
    assert peft_config["modules_to_save"] == ["task_head"]
    assert peft_config["base_model_name_or_path"] == name  # what load_base resolves
    assert json.loads((folder / "fltac_ray.json").read_text())["load_with"] == "fltac_ray.runs.export.load_base"
    loaded = PeftModel.from_pretrained(load_base(folder), str(folder)).eval()
    inputs = make_inputs(np.random.default_rng(2))
    with torch.no_grad():
        expected = model(num_classes=head_rows, **inputs)
        got = loaded(**standard_inputs(inputs, folder))  # input_ids + attention_mask, pixel_values
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the adapter matters: the bare base (fresh head, no LoRA) predicts something else
    with torch.no_grad():
        assert not torch.allclose(load_base(folder)(**standard_inputs(inputs, folder)), expected, atol=1e-3)


def test_plain_peft_loads_an_exported_causal_lm_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    config = build_config({"data": {"tasks": ["wordnet_define"]},
                           "model": {"name": "tiny-random-llama", "lora": {"rank": 2}}})
    model = AdapterModel(load_backbone("tiny-random-llama", "causal_lm", seed=0), config.model, 0, seed=0,
                         modality="causal_lm").eval()
    vector = _trained_like(model, seed=3)
    folder = _export(tmp_path, config, model, vector, head_rows=0)
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    base = load_base(folder)
    assert isinstance(base, type(AutoModelForCausalLM.from_config(base.config)))  # the plain LM
    loaded = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = torch.from_numpy(np.random.default_rng(4).integers(1, 500, (2, 7)))
    with torch.no_grad():
        expected = model.encoder(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tensor_names_follow_peft_on_the_class_the_adapter_loads_into():
    lora = "encoder.base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert peft_tensor_name(lora, "AutoModel") == "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    assert peft_tensor_name(lora, "AutoModelForSequenceClassification", "bert") == \
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    assert peft_tensor_name(lora, "fltac_ray.runs.export.load_base", "encoder") == \
        "base_model.model.encoder.encoder.layer.0.attention.self.query.lora_A.weight"
    llama = "encoder.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    assert peft_tensor_name(llama, "AutoModelForCausalLM") == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert peft_tensor_name("head.bias", "AutoModelForImageClassification", "vit") == "base_model.model.classifier.bias"
    assert peft_tensor_name("head.bias", "fltac_ray.runs.export.load_base", "encoder") == "base_model.model.task_head.bias"
    with pytest.raises(ValueError, match="head.safetensors"):
        peft_tensor_name("head.weight", "AutoModel")
    with pytest.raises(ValueError, match="router"):
        peft_tensor_name("router.weight", "AutoModel")


@pytest.fixture(scope="module")
def hub_bert(tmp_path_factory) -> str:
    """A 2-layer BERT with its pooler and MiniLM's tokenizer saved as a Hugging Face folder: a
    checkpoint that from_pretrained loads, as it would a hub id."""
    from transformers import BertConfig, BertModel

    from fltac_ray.models.builders import load_tokenizer

    folder = tmp_path_factory.mktemp("hub_bert")
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def hub_vit(tmp_path_factory) -> str:
    """A 2-layer ViT (32 px, patch 8) saved as a Hugging Face folder."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("hub_vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


TEXTS = ["the match ended in a draw", "rain all week long", "a new album is out today"]


@pytest.mark.parametrize("pooling", ["pooler", "mean"])
def test_a_text_adapter_loads_with_transformers_and_peft_alone(tmp_path, hub_bert, pooling):
    """BERT with its pooler loads as AutoModelForSequenceClassification (the head is its
    classifier); mean pooling has no such class: the LoRA loads into AutoModel, the head is a
    safetensors file. Either way: the training model's logits from the tokenizer's inputs."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    config = build_config({"data": {"tasks": ["synthetic_topic"]},
                           "model": {"name": hub_bert, "pooling": pooling, "lora": {"rank": 2}}})
    model = AdapterModel(load_backbone(hub_bert, "text"), config.model, 4, seed=0, modality="text").eval()
    folder = _export(tmp_path / "adapter", config, model, _trained_like(model, seed=5), head_rows=4)
    info = json.loads((folder / "fltac_ray.json").read_text())
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == hub_bert

    batch = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        if pooling == "pooler":
            assert info["load_with"] == "AutoModelForSequenceClassification"
            base = AutoModelForSequenceClassification.from_pretrained(hub_bert, num_labels=info["head_rows"])
            logits = PeftModel.from_pretrained(base, folder).eval()(**batch).logits
        else:
            assert info["load_with"] == "AutoModel"
            with warnings.catch_warnings(record=True) as caught:  # peft's word for keys named wrongly
                warnings.simplefilter("always")
                plain = PeftModel.from_pretrained(AutoModel.from_pretrained(hub_bert), folder).eval()
            assert not [w for w in caught if "missing" in str(w.message).lower()]
            head = load_file(folder / "head.safetensors")
            hidden = plain(**batch).last_hidden_state  # (3, width, 32) -> mean over real tokens
            mask = batch["attention_mask"].unsqueeze(-1).float()
            logits = ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]
        expected = model(num_classes=4, input_ids=batch["input_ids"], lengths=batch["attention_mask"].sum(1),
                         token_type_ids=batch["token_type_ids"])
        ours = load_adapter(folder)(**batch)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the adapter matters
        bare = AutoModelForSequenceClassification.from_pretrained(hub_bert, num_labels=4).eval()(**batch).logits
    assert not torch.allclose(bare, expected, atol=1e-3)


def test_a_vit_adapter_loads_as_an_image_classifier_with_its_image_processor(tmp_path, hub_vit):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    config = build_config({"data": {"tasks": ["digits"]},
                           "model": {"name": hub_vit, "pooling": "cls", "lora": {"rank": 2}}})
    model = AdapterModel(load_backbone(hub_vit, "image"), config.model, 10, seed=0, modality="image").eval()
    folder = _export(tmp_path / "adapter", config, model, _trained_like(model, seed=6), head_rows=10)
    info = json.loads((folder / "fltac_ray.json").read_text())
    assert info["load_with"] == "AutoModelForImageClassification"

    images = np.random.default_rng(7).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)  # RGB at the run's size
    pixel_values = AutoImageProcessor.from_pretrained(folder)(list(images), return_tensors="pt")["pixel_values"]
    base = AutoModelForImageClassification.from_pretrained(hub_vit, num_labels=info["head_rows"])
    plain = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        logits = plain(pixel_values=pixel_values).logits
        expected = model(num_classes=10, pixels=torch.from_numpy(images).permute(0, 3, 1, 2))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_a_folder_without_export_info_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fltac_ray.json"):
        load_base(tmp_path)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_engine_export_round_trip_reproduces_every_clients_final_accuracy(tmp_path, head):
    """Run FL-TAC, load every exported cluster adapter with plain peft, and score each client's
    test examples with the adapter its task ended with: the right answers equal the engine's.
    A frozen head (model.head: frozen) is never sent, but every export carries it."""
    from transformers import AutoTokenizer

    import fltac_ray
    from fltac_ray.algorithms import create_algorithm
    from fltac_ray.client.training import batch_tensors
    from fltac_ray.engine.run_setup import prepare_data
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.progress import Progress

    config = tiny_config(model={"name": "tiny-random-bert", "head": head})
    result = Simulation(config, out=str(tmp_path / "run"), progress=Progress(quiet=True)).run()
    adapters = result.run_dir / "adapters"
    count = count_parameters(config)
    assert (count.head_per_adapter == 0) == (head == "frozen")
    uploads = int(result.rounds["params_up"].iloc[0]) // count.adapter_size  # uploads are adapters
    assert int(result.rounds["params_up"].iloc[0]) == uploads * count.lora_per_adapter + uploads * count.head_per_adapter
    assignments = pd.read_csv(adapters / "assignments.csv")
    clients = pd.read_csv(result.run_dir / "clients.csv")
    final = clients[clients["round"] == config.rounds].set_index(["client", "task"])
    data, _ = prepare_data(config, create_algorithm(config))
    models = {k: load_adapter(adapters / f"cluster_{k}") for k in assignments["cluster"].unique()}
    finished = fltac_ray.load_result(result.run_dir)
    checked = 0
    for row in assignments.itertuples():
        task = row.tasks
        bundle = data.tasks[task]
        test_index = data.clients[row.client].tasks[task][1]
        inputs = standard_inputs(batch_tensors(bundle.test, test_index, torch.device("cpu")),
                                 adapters / f"cluster_{row.cluster}")
        with torch.no_grad():
            logits = models[row.cluster](num_classes=bundle.num_classes, **inputs)
        correct = int((logits.argmax(-1).numpy() == bundle.test.labels[test_index]).sum())
        engine = final.loc[(row.client, task)]
        assert correct == round(engine["accuracy"] * engine["test_samples"])
        # the same examples from the results API, as raw text through the exported tokenizer
        examples = finished.client_examples(row.client, task)
        assert examples["index"].tolist() == test_index.tolist()
        assert examples["label"].tolist() == bundle.test.labels[test_index].tolist()
        tokenizer = AutoTokenizer.from_pretrained(adapters / f"cluster_{row.cluster}")
        encoded = tokenizer(list(examples["text"]), truncation=True, max_length=config.data.max_length,
                            padding=True, return_tensors="pt")
        with torch.no_grad():
            raw_logits = models[row.cluster](num_classes=bundle.num_classes, **encoded)
        assert int((raw_logits.argmax(-1).numpy() == examples["label"].to_numpy()).sum()) == correct
        checked += 1
    assert checked == len(final) > 0


class LocalHub:
    """huggingface_hub.HfApi's create_repo / upload_folder, writing each repository into a local
    folder instead of the Hub (the call contract, offline)."""

    root = None

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id, repo_type="model", private=False, exist_ok=False):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, repo_type="model", commit_message=""):
        import shutil

        assert repo_type == "model" and commit_message
        shutil.copytree(folder_path, self.root / repo_id / (path_in_repo or ""), dirs_exist_ok=True)
        return f"local://{repo_id}"


def test_export_pushes_a_cluster_adapter_that_loads_from_the_repository(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from fltac_ray.cli import main

    config = build_config({"data": {"tasks": ["synthetic_topic"]}, "model": {"name": "tiny-random-bert"}})
    model = AdapterModel(load_backbone("tiny-random-bert", "text", seed=0), config.model, 4, seed=0).eval()
    adapters = tmp_path / "run" / "adapters"
    folder = _export(adapters / "cluster_0", config, model, _trained_like(model, seed=8), head_rows=4)
    (adapters / "index.json").write_text(json.dumps([{"cluster": 0, "folder": "cluster_0"}]))
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: tiny-random-bert" in card

    LocalHub.root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", LocalHub)
    assert main(["export", str(tmp_path / "run"), "--cluster", "0", "--push-to-hub", "me/topics"]) == 0
    assert "pushed" in capsys.readouterr().out
    repo = LocalHub.root / "me" / "topics"
    inputs = {"input_ids": torch.tensor([[101, 2000, 2001, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        expected = model(num_classes=4, input_ids=inputs["input_ids"], lengths=torch.tensor([4]))
        torch.testing.assert_close(load_adapter(repo)(**inputs), expected, rtol=1e-5, atol=1e-5)

    # every cluster at once lands in cluster_<k>/; a missing cluster or a non-run folder is refused
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "cluster_0" / "adapter_model.safetensors").is_file()
    assert main(["export", str(tmp_path / "run"), "--cluster", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--cluster 3: no adapters/cluster_3; it has ['cluster_0']" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "adapters/index.json" in capsys.readouterr().err


def test_version_and_public_names(capsys):
    import fltac_ray
    from fltac_ray.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"fltac-ray {fltac_ray.__version__}"
    assert fltac_ray.__version__[0].isdigit()
    assert set(dir(fltac_ray)) == set(fltac_ray.__all__)
    assert all(hasattr(fltac_ray, name) for name in fltac_ray.__all__)


def _run_with_one_cluster(tmp_path) -> Path:
    config = build_config({"data": {"tasks": ["synthetic_topic"]}, "model": {"name": "tiny-random-bert"}})
    model = AdapterModel(load_backbone("tiny-random-bert", "text", seed=0), config.model, 4, seed=0).eval()
    adapters = tmp_path / "run" / "adapters"
    _export(adapters / "cluster_0", config, model, _trained_like(model, seed=8), head_rows=4)
    (adapters / "index.json").write_text(json.dumps([{"cluster": 0, "folder": "cluster_0"}]))
    return tmp_path / "run"


def test_a_push_that_cannot_reach_the_hub_is_a_resources_error(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from fltac_ray.cli import main

    run = _run_with_one_cluster(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets it
    assert main(["export", str(run), "--push-to-hub", "me/topics"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fltac-ray: error: resources: Hugging Face Hub: cannot push to me/topics "
                          "(OfflineModeIsEnabled: ") and "unset HF_HUB_OFFLINE" in err, err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.HfApi  # the real client, at a port where nothing listens
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: real(endpoint="http://127.0.0.1:9", token="hf_x"))
    assert main(["export", str(run), "--push-to-hub", "me/topics"]) == 2
    err = capsys.readouterr().err
    assert "resources: Hugging Face Hub: cannot push to me/topics (ConnectError" in err and "Traceback" not in err, err
    assert main(["export", str(run), "--push-to-hub", "no-owner"]) == 2
    assert "--push-to-hub = 'no-owner': a Hub model repository id: owner/name" in capsys.readouterr().err


def test_an_export_killed_midway_leaves_no_folder_that_looks_like_one(tmp_path, monkeypatch, capsys):
    import shutil

    from fltac_ray.cli import main

    run = _run_with_one_cluster(tmp_path)
    real_copytree = shutil.copytree

    def copy_then_die(source, target, *args, **kwargs):
        if str(source).endswith(".safetensors"):
            raise KeyboardInterrupt  # stands for a kill between two files
        return shutil.copy2(source, target, *args, **kwargs)

    def dying_copytree(source, target, *args, **kwargs):  # copytree recurses with positional arguments
        return real_copytree(source, target, *args, **kwargs) if args else real_copytree(
            source, target, copy_function=copy_then_die, **kwargs)

    monkeypatch.setattr(shutil, "copytree", dying_copytree)
    assert main(["export", str(run), "--out", str(tmp_path / "copy")]) == 130  # interrupted
    assert not (tmp_path / "copy").exists() and not list(tmp_path.glob(".copy*"))
    monkeypatch.setattr(shutil, "copytree", real_copytree)
    assert main(["export", str(run), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "cluster_0" / "adapter_model.safetensors").is_file()


def test_a_run_export_replaces_the_previous_one_whole_or_not_at_all(tmp_path, monkeypatch):
    from fltac_ray.runs import export as export_module
    from fltac_ray.runs.export import export_adapters

    config = build_config({"data": {"tasks": ["synthetic_topic"]}, "model": {"name": "tiny-random-bert"}})
    model = AdapterModel(load_backbone("tiny-random-bert", "text", seed=0), config.model, 4, seed=0).eval()
    layout = model.adapter_layout()
    vectors = np.stack([_trained_like(model, seed=s) for s in (1, 2)])
    clusters = [{"cluster": k, "members": 1, "majority_task": "synthetic_topic", "purity": 1.0} for k in (0, 1)]
    names = {"synthetic_topic": []}
    export_adapters(tmp_path, vectors, layout, clusters, config, names, [])
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "adapters").rglob("*")) if p.is_file()}
    real_write = export_module.write_peft_adapter

    def write_then_die(folder, *args, **kwargs):
        if folder.name == "cluster_1":
            raise KeyboardInterrupt
        return real_write(folder, *args, **kwargs)

    monkeypatch.setattr(export_module, "write_peft_adapter", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_adapters(tmp_path, vectors[::-1].copy(), layout, clusters, config, names, [])
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "adapters").rglob("*")) if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]
    monkeypatch.setattr(export_module, "write_peft_adapter", real_write)
    export_adapters(tmp_path, vectors[:1], layout, clusters[:1], config, names, [])  # one cluster now
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["assignments.csv", "cluster_0", "index.json"]


@pytest.mark.parametrize("model", ["tiny-random-bert", "minilm"])  # the head in peft's modules_to_save; beside it
def test_a_serving_bank_loads_every_adapter_on_one_base_and_scores_each_client_as_the_engine(tmp_path, capsys, model):
    """`fltac-ray export RUN --bank DIR`: every cluster adapter beside bank.json; AdapterBank loads
    them with peft's load_adapter + set_adapter on one base (the head swapped where it is outside
    peft), and each client's adapter from the manifest scores its test examples as clients.csv
    says; the router for outsiders picks the lowest probe loss."""
    from transformers import AutoTokenizer

    import fltac_ray
    from fltac_ray.cli import main
    from fltac_ray.engine.simulation import Simulation
    from fltac_ray.errors import RunFolderError
    from fltac_ray.progress import Progress
    from fltac_ray.runs.bank import AdapterBank

    config = tiny_config(model={"name": model}, engine={"backend": "local"})
    run = Simulation(config, out=str(tmp_path / "run"), progress=Progress(quiet=True)).run()
    assert main(["export", str(run.run_dir), "--bank", str(tmp_path / "bank")]) == 0
    assert "wrote a bank of" in capsys.readouterr().out
    bank = AdapterBank(tmp_path / "bank")
    assert bank.route_kind == {"tiny-random-bert": "fltac_ray.runs.export.load_base", "minilm": "AutoModel"}[model]
    assert len(bank.names) > 1 and set(bank.peft_model.peft_config) == set(bank.names)  # one base, all adapters
    result = fltac_ray.load_result(run.run_dir)
    final = result.clients[result.clients["round"] == config.rounds].set_index(["client", "task"])
    assignments = pd.read_csv(run.run_dir / "adapters" / "assignments.csv")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bank" / bank.names[0])
    for row in assignments.sample(frac=1, random_state=0).itertuples():  # shuffled: adapters switch back and forth
        name = bank.adapter_for(row.client, row.tasks)
        assert name == f"cluster_{row.cluster}"
        examples = result.client_examples(row.client, row.tasks)
        batch = tokenizer(list(examples["text"]), truncation=True, max_length=config.data.max_length, padding=True,
                          return_tensors="pt")
        classes = config.data.spec(row.tasks).num_classes
        correct = int((bank.logits(name, classes, **batch).argmax(-1).numpy() == examples["label"].to_numpy()).sum())
        engine = final.loc[(row.client, row.tasks)]
        assert correct == round(engine["accuracy"] * engine["test_samples"])
    labels = torch.as_tensor(examples["label"].to_numpy())
    losses = bank.losses(labels, classes, **batch)
    assert bank.route(labels, classes, **batch) == min(losses, key=losses.get) and len(set(losses.values())) > 1
    with pytest.raises(RunFolderError, match="did not hold task"):
        bank.adapter_for(99, "synthetic_topic")
    assert main(["export", str(run.run_dir), "--bank", str(tmp_path / "bank")]) == 2  # not empty
    assert "--bank is not empty" in capsys.readouterr().err


def test_an_adapter_of_a_packaged_base_names_it_by_hub_id_and_by_its_local_folder(tmp_path):
    """The offline default's MiniLM came from a Python package: fltac_ray.json and the model card
    give its hub id and the folder it is in here, and that folder loads as the same AutoModel."""
    from transformers import AutoModel

    config = build_config({"data": {"tasks": ["synthetic_topic"]}, "model": {"name": "minilm"}})
    model = AdapterModel(load_backbone("minilm", "text", seed=0), config.model, 4, seed=0).eval()
    folder = _export(tmp_path / "cluster_0", config, model, _trained_like(model, seed=3), head_rows=4)
    info = json.loads((folder / "fltac_ray.json").read_text())
    assert info["base"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert Path(info["base_local"], "config.json").is_file()
    assert f"at {info['base_local']}" in (folder / "README.md").read_text()
    local = AutoModel.from_pretrained(info["base_local"])
    packaged = load_base(folder)
    assert all(torch.equal(a, b) for a, b in zip(local.state_dict().values(), packaged.state_dict().values(),
                                                 strict=True))
