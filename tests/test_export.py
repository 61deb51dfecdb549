"""Exported adapters load with plain peft and predict exactly what the engine's model predicts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel

from fltac_ray.config import build_config
from fltac_ray.errors import ConfigError
from fltac_ray.export import load_adapter, load_base, peft_tensor_name, write_peft_adapter
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.builders import load_backbone
from fltac_ray.models.counting import count_parameters

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
def test_plain_peft_loads_an_exported_classifier_and_predicts_the_same(tmp_path, name):
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
    loaded = PeftModel.from_pretrained(load_base(folder), str(folder)).eval()
    inputs = make_inputs(np.random.default_rng(2))
    with torch.no_grad():
        expected = model(num_classes=head_rows, **inputs)
        got = loaded(**inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the adapter matters: the bare base (fresh head, no LoRA) predicts something else
    with torch.no_grad():
        assert not torch.allclose(load_base(folder)(**inputs), expected, atol=1e-3)


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


def test_tensor_names_follow_peft():
    lora = "encoder.base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert peft_tensor_name(lora, causal_lm=False) == \
        "base_model.model.encoder.encoder.layer.0.attention.self.query.lora_A.weight"
    llama = "encoder.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    assert peft_tensor_name(llama, causal_lm=True) == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert peft_tensor_name("head.bias", causal_lm=False) == "base_model.model.task_head.bias"
    with pytest.raises(ValueError, match="router"):
        peft_tensor_name("router.weight", causal_lm=False)


def test_a_folder_without_export_info_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fltac_ray.json"):
        load_base(tmp_path)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_engine_export_round_trip_reproduces_every_clients_final_accuracy(tmp_path, head):
    """Run FL-TAC, load every exported cluster adapter with plain peft, and score each client's
    test examples with the adapter its task ended with: the right answers equal the engine's.
    A frozen head (model.head: frozen) is never sent, but every export carries it."""
    from fltac_ray.algorithms import create_algorithm
    from fltac_ray.engine.simulation import Simulation, prepare_data
    from fltac_ray.progress import Progress
    from fltac_ray.training import batch_tensors

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
    checked = 0
    for row in assignments.itertuples():
        task = row.tasks
        bundle = data.tasks[task]
        test_index = data.clients[row.client].tasks[task][1]
        inputs = batch_tensors(bundle.test, test_index, torch.device("cpu"))
        with torch.no_grad():
            logits = models[row.cluster](num_classes=bundle.num_classes, **inputs)
        correct = int((logits.argmax(-1).numpy() == bundle.test.labels[test_index]).sum())
        engine = final.loc[(row.client, task)]
        assert correct == round(engine["accuracy"] * engine["test_samples"])
        checked += 1
    assert checked == len(final) > 0
