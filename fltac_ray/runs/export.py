"""The final global adapters of a run, as plain peft adapters of the plain Hugging Face base.

`adapters/cluster_<k>/` holds `adapter_config.json` (a peft `LoraConfig`) and
`adapter_model.safetensors`, named as peft names them on the class the adapter loads into, with
`base_model_name_or_path` the base's hub id; `fltac_ray.json` (how to load it, the cluster's
tasks and class names); the tokenizer (text) or a `preprocessor_config.json` (images), so that
`AutoTokenizer` / `AutoImageProcessor.from_pretrained(folder)` prepare standard inputs
(`input_ids`, `attention_mask`, `pixel_values`). Which class an adapter loads into
(`fltac_ray.json` "load_with") follows from the base and `model.pooling`:

  AutoModelForSequenceClassification  BERT with `pooling: pooler` (the GLUE paper files): the
                                      head is the class's `classifier` (peft modules_to_save)
  AutoModelForImageClassification     ViT with `pooling: cls` (the CIFAR paper files): likewise
  AutoModel                           other Hugging Face encoders (MiniLM's mean pooling): the
                                      LoRA loads into the plain encoder; the head is
                                      `head.safetensors` (weight, bias) over the pooled features
  AutoModelForCausalLM                instruction adapters (no head)
  fltac_ray.runs.export.load_base          bases built in code (EfficientNet-lite0, the MLP, the
                                      random test models, plug-ins): a backbone + `task_head`

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)
    model = PeftModel.from_pretrained(base, folder)   # model(**tokenizer(texts, ...)).logits

`fltac_ray.runs.export.load_adapter(folder)` does the right one for any folder and returns a module
whose call on standard inputs gives the logits (batch, classes of the cluster's task).
FLoRAL's router-mixed adaptors are not peft LoRA: they are saved as named tensors
(`cluster_<k>/adapter.safetensors`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import save_file
from torch import nn

from fltac_ray.config import ExperimentConfig
from fltac_ray.errors import ConfigError, ConfigIssue, ResourceUnavailableError, RunFolderError
from fltac_ray.models.adapter_model import (
    PooledFeatures,
    normalise_pixels,
    peft_wrapping,
    split_adapter,
    text_batch,
)
from fltac_ray.runs.files import written_whole

INFO_FILE = "fltac_ray.json"
HEAD_FILE = "head.safetensors"
# Our training model names LoRA tensors `encoder.base_model.model.<path>.lora_A.default.weight`
# (peft wrapped around the backbone) and the head `head.weight`; peft files name them after the
# model peft wraps at load time, without the adapter name "default".
_TRAINING_PREFIX = "encoder.base_model.model."
# peft matches modules_to_save by name suffix: "head" would also catch EfficientNet's _conv_head.
HEAD_MODULE = "task_head"

SEQUENCE_CLASSIFIER = "AutoModelForSequenceClassification"
IMAGE_CLASSIFIER = "AutoModelForImageClassification"
FEATURES = "AutoModel"
CAUSAL_LM = "AutoModelForCausalLM"
BUILT_IN = "fltac_ray.runs.export.load_base"
# (modality, pooling, model_type) -> (class, the attribute holding the backbone in that class):
# the Hugging Face classifiers whose forward is exactly our backbone + pooling + head
# (BertForSequenceClassification: pooler -> dropout -> classifier; ViTForImageClassification:
# the first token of the last hidden state -> classifier).
CLASSIFIER_CLASSES = {
    ("text", "pooler", "bert"): (SEQUENCE_CLASSIFIER, "bert"),
    ("image", "cls", "vit"): (IMAGE_CLASSIFIER, "vit"),
}


def load_route(config: ExperimentConfig) -> tuple[str, str]:
    """(the class an exported adapter of this run loads into, the backbone's attribute in it)."""
    from fltac_ray.models.builders import is_built_in, model_config

    name, modality = config.model.name, config.data.modality
    if modality == "causal_lm":
        return CAUSAL_LM, ""
    if is_built_in(name):
        return BUILT_IN, "encoder"
    model_type = getattr(model_config(name), "model_type", "")
    return CLASSIFIER_CLASSES.get((modality, config.model.pooling, model_type), (FEATURES, ""))


def peft_tensor_name(name: str, route: str, backbone: str = "") -> str:
    """Training-model parameter name -> the key peft's adapter_model.safetensors uses on the
    class `route` names (`backbone`: where that class keeps the encoder, e.g. "bert")."""
    if name.startswith(_TRAINING_PREFIX):
        path = name.removeprefix(_TRAINING_PREFIX).replace(".default.", ".")
        return f"base_model.model.{backbone + '.' if backbone else ''}{path}"
    if name.startswith("head."):
        module = {SEQUENCE_CLASSIFIER: "classifier", IMAGE_CLASSIFIER: "classifier", BUILT_IN: HEAD_MODULE}.get(route)
        if module is None:
            raise ValueError(f"a {route} adapter has no head module; its head goes to {HEAD_FILE}")
        return f"base_model.model.{module}.{name.removeprefix('head.')}"
    raise ValueError(f"adapter tensor {name!r} is neither LoRA nor head; cannot export it to peft")


def _preprocessor(image_size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """A ViTImageProcessor config that prepares images as training did: resize to the run's
    size (bilinear), scale to [0, 1], normalise with the backbone's statistics."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": mean, "image_std": std, "do_convert_rgb": True}


def write_peft_adapter(folder: Path, vector: np.ndarray, layout: list[tuple[str, tuple[int, ...]]],
                       config: ExperimentConfig, info: dict[str, Any]) -> None:
    """One adapter as a peft folder: adapter_config.json, adapter_model.safetensors, fltac_ray.json,
    and the head (head.safetensors) and tokenizer or image processor where they apply."""
    from peft import LoraConfig

    from fltac_ray.models.builders import (
        PACKAGED_HUB_IDS,
        hub_id,
        image_preprocessing,
        load_tokenizer,
        model_source,
    )

    route, backbone = load_route(config)
    modality = config.data.modality
    info = dict(info, load_with=route, base=hub_id(config.model.name))
    if config.model.name in PACKAGED_HUB_IDS:  # a base from a Python package: also where it is, for offline use
        info["base_local"] = model_source(config.model.name)
    if modality == "image":
        size, mean, std = image_preprocessing(config.model.name, config.model.image_size)
        info.update(image_size=size, image_mean=mean, image_std=std)
    lora = config.model.lora
    folder.mkdir(parents=True, exist_ok=True)
    tensors, head = {}, {}
    for name, value in split_adapter(vector, layout).items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        if route == FEATURES and name.startswith("head."):
            head[name.removeprefix("head.")] = value
        else:
            tensors[peft_tensor_name(name, route, backbone)] = value
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    if head:
        save_file(head, str(folder / HEAD_FILE), metadata={"format": "pt"})
    classifier = route in (SEQUENCE_CLASSIFIER, IMAGE_CLASSIFIER)
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules or []),
        modules_to_save=["classifier"] if classifier else [HEAD_MODULE] if route == BUILT_IN else None,
        task_type={CAUSAL_LM: "CAUSAL_LM", SEQUENCE_CLASSIFIER: "SEQ_CLS"}.get(route),
        base_model_name_or_path=hub_id(config.model.name),
        inference_mode=True,
    )
    peft_config.save_pretrained(str(folder))
    if modality in ("text", "causal_lm"):
        load_tokenizer(config.model.name).save_pretrained(str(folder))
    if modality == "image":
        (folder / "preprocessor_config.json").write_text(
            json.dumps(_preprocessor(info["image_size"], info["image_mean"], info["image_std"]), indent=2))
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))
    (folder / "README.md").write_text(model_card(info))


def export_adapters(run_dir: Path, adapters: np.ndarray, layout: list[tuple[str, tuple[int, ...]]],
                    clusters: list[dict[str, Any]], config: ExperimentConfig,
                    class_names: Mapping[str, list[str]], assignments: list[dict[str, Any]],
                    peft_layout: bool = True) -> Path:
    """Every final global adapter (one per cluster) under run_dir/adapters, plus index.json.

    `clusters[k]`: cluster, members, majority_task, purity (from the hidden task labels, for the
    user: the server never saw them). `class_names`: task -> its class names ([] for
    instruction tasks). `assignments`: one row per final-round upload (client, slot, tasks,
    cluster), written to assignments.csv: which adapter each client's task ended with.
    `peft_layout` False: adapters that are no peft LoRA (FLoRAL's mixtures), saved as tensors."""
    with written_whole(run_dir / "adapters") as folder:
        _write_adapters(folder, adapters, layout, clusters, config, class_names, assignments, peft_layout)
    return run_dir / "adapters"


def _write_adapters(folder: Path, adapters: np.ndarray, layout: list[tuple[str, tuple[int, ...]]],
                    clusters: list[dict[str, Any]], config: ExperimentConfig,
                    class_names: Mapping[str, list[str]], assignments: list[dict[str, Any]],
                    peft_layout: bool) -> None:
    head_rows = next((shape[0] for name, shape in layout if name == "head.weight"), 0)
    index = []
    for info, vector in zip(clusters, adapters, strict=True):
        name = f"cluster_{info['cluster']}"
        tasks = [t for t in str(info["majority_task"]).split("+") if t]
        # a single-task cluster answers in its task's classes; a FedIT multi-task adapter in all rows
        names = class_names.get(tasks[0], []) if len(tasks) == 1 else []
        entry = dict(info, folder=name, format="peft" if peft_layout else "safetensors")
        index.append(entry)
        if not peft_layout:
            (folder / name).mkdir(exist_ok=True)
            tensors = {key: np.ascontiguousarray(value, dtype=np.float32)
                       for key, value in split_adapter(vector, layout).items()}
            save_file(tensors, str(folder / name / "adapter.safetensors"),
                      metadata={k: str(v) for k, v in entry.items()})
            continue
        write_peft_adapter(folder / name, vector, layout, config, {
            **entry,
            "model": config.model.name,
            "modality": config.data.modality,
            "pooling": config.model.pooling,
            "image_size": config.model.image_size,  # images: resolved by write_peft_adapter
            "feature_dim": config.data.feature_dim,
            "max_length": config.data.max_length,
            "seed": config.seed,  # the random test/MLP backbones are drawn from it
            "head_rows": head_rows,
            "num_labels": len(names) or head_rows,
            "class_names": names,
            "algorithm": config.algorithm,
        })
    (folder / "index.json").write_text(json.dumps(index, indent=2))
    pd.DataFrame(assignments, columns=["client", "slot", "tasks", "cluster"]).to_csv(
        folder / "assignments.csv", index=False)


def read_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise ConfigError([ConfigIssue("adapter folder", str(folder),
                                       f"has no {INFO_FILE}; give a folder from a run's adapters/")])
    info = json.loads(path.read_text())
    if info.get("format") != "peft":
        raise ConfigError([ConfigIssue("adapter folder", str(folder),
                                       "holds FLoRAL mixture adaptors, which are not peft LoRA")])
    # folders exported before "load_with" existed: peft on load_base's backbone + task_head
    info.setdefault("load_with", CAUSAL_LM if info["modality"] == "causal_lm" else BUILT_IN)
    return info


class ExportedClassifier(PooledFeatures, nn.Module):
    """A classifier over a backbone (`encoder`) with the run's pooling and a `task_head` Linear
    (hidden -> head rows), called with standard inputs. What an adapter of a base built in code
    loads into (peft replaces `task_head` with the adapter's trained head), and how
    `load_adapter` serves an AutoModel adapter (encoder: the peft model, head from its file)."""

    def __init__(self, encoder: nn.Module, head_rows: int, modality: str, pooling: str,
                 image_size: int | None = None, num_labels: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.modality = modality
        self.pooling = pooling
        self._register_pixel_statistics(encoder, image_size)
        self.task_head = nn.Linear(encoder.config.hidden_size, head_rows)
        # Every task shares the head's first rows; a task with c classes reads rows 0..c-1.
        self.num_labels = num_labels or head_rows
        # No `config` attribute on purpose: peft then treats this as a custom model and leaves the
        # backbone's module names alone (transformers-v5 weight renaming applies to whole models).

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                features: torch.Tensor | None = None, num_classes: int | None = None) -> torch.Tensor:
        """Logits (batch, num_classes; default: the cluster's task's classes) of standard inputs:
        input_ids + attention_mask (text), pixel_values (normalised images, as the folder's
        image processor makes them) or features (vector tasks)."""
        if pixel_values is not None:
            pooled = self.pixel_features(pixel_values)
        elif features is not None:
            pooled = self.encoder(features.float())
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            pooled = self.text_features(input_ids.long(), attention_mask.long(),
                                        None if token_type_ids is None else token_type_ids.long())
        return self.task_head(pooled)[:, :num_classes or self.num_labels]


class HubClassifier(nn.Module):
    """A peft AutoModelFor*Classification whose call gives the logits tensor (batch, classes of
    the cluster's task), like every classifier load_adapter returns."""

    def __init__(self, model: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.model = model
        self.num_labels = num_labels

    def forward(self, num_classes: int | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits[:, :num_classes or self.num_labels]


def _quietly(load, *args, **kwargs):
    """`load(...)` without transformers' chatter: its warning that a classifier head is newly
    initialised (the adapter replaces it) and its per-load weight progress bar."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return load(*args, **kwargs)
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_base(folder: str | Path) -> nn.Module:
    """The plain base an exported adapter folder loads into with `PeftModel.from_pretrained`
    (the class its fltac_ray.json names, from the packaged model or the hub id's local files);
    for a base built in code, an ExportedClassifier around the backbone."""
    import transformers

    from fltac_ray.models.builders import load_backbone, model_source

    info = read_info(folder)
    route = info["load_with"]
    if route in (SEQUENCE_CLASSIFIER, IMAGE_CLASSIFIER):
        cls = getattr(transformers, route)
        return _quietly(cls.from_pretrained, model_source(info["model"]), num_labels=info["head_rows"])
    backbone = _quietly(load_backbone, info["model"], info["modality"], seed=info["seed"],
                        feature_dim=info["feature_dim"])
    for param in backbone.parameters():
        param.requires_grad_(False)
    if route in (CAUSAL_LM, FEATURES):
        return backbone
    return ExportedClassifier(backbone, info["head_rows"], info["modality"], info["pooling"],
                              info["image_size"], info["num_labels"])


def load_adapter(folder: str | Path) -> nn.Module:
    """The exported adapter, in eval mode: for a classifier, a module whose call on standard inputs
    (input_ids + attention_mask, pixel_values, features) gives the logits (batch, classes of the
    cluster's task); for an instruction adapter, the peft causal LM."""
    from peft import PeftModel
    from safetensors.torch import load_file

    info = read_info(folder)
    route = info["load_with"]
    with peft_wrapping():
        model = PeftModel.from_pretrained(load_base(folder), str(folder))
    if route in (SEQUENCE_CLASSIFIER, IMAGE_CLASSIFIER):
        model = HubClassifier(model, info["num_labels"])
    elif route == FEATURES:
        classifier = ExportedClassifier(model, info["head_rows"], info["modality"], info["pooling"],
                                        info["image_size"], info["num_labels"])
        classifier.task_head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
        model = classifier
    return model.eval()


def standard_inputs(batch: Mapping[str, torch.Tensor], folder: str | Path) -> dict[str, torch.Tensor]:
    """A batch as the engine stores it (input_ids + lengths, uint8 pixels, features) -> the
    standard keyword inputs an exported adapter takes: attention_mask from the lengths (right
    padding, trimmed to the longest example), pixel_values prepared as training did."""
    info = read_info(folder)
    if "pixels" in batch:
        return {"pixel_values": normalise_pixels(batch["pixels"], int(info["image_size"]), info["image_mean"],
                                                 info["image_std"])}
    if "features" in batch:
        return {"features": batch["features"]}
    return text_batch(batch["input_ids"], batch["lengths"], batch.get("token_type_ids"))


def model_card(info: dict[str, Any]) -> str:
    """README.md of an exported adapter: the Hub's metadata (peft, base model) and how to load it."""
    route, base = info["load_with"], info["base"]
    tasks = str(info.get("majority_task", "")).replace("+", ", ")
    if route in (SEQUENCE_CLASSIFIER, IMAGE_CLASSIFIER):
        load = (f"from transformers import {route}\nfrom peft import PeftModel\n\n"
                f"base = {route}.from_pretrained(\"{base}\", num_labels={info['head_rows']})\n"
                "model = PeftModel.from_pretrained(base, ADAPTER)   # model(**inputs).logits\n")
    elif route == CAUSAL_LM:
        load = (f"from transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
                f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base}\"), ADAPTER)\n")
    elif route == FEATURES:
        load = (f"from transformers import AutoModel\nfrom peft import PeftModel\n\n"
                f"model = PeftModel.from_pretrained(AutoModel.from_pretrained(\"{base}\"), ADAPTER)\n"
                f"# logits = {info['pooling']}-pooled last_hidden_state @ W.T + b  (W, b: head.safetensors)\n")
    else:
        load = ("from peft import PeftModel\nfrom fltac_ray.runs.export import load_base\n\n"
                "model = PeftModel.from_pretrained(load_base(ADAPTER), ADAPTER)\n")
    if info.get("base_local"):
        load += (f"# offline: the same base ships in a Python package, at {info['base_local']}\n"
                 "# (from_pretrained on that folder, or fltac_ray.runs.export.load_base(ADAPTER))\n")
    names = ", ".join(info.get("class_names") or []) or "(see fltac_ray.json)"
    if route != CAUSAL_LM and info.get("num_labels", 0) < info.get("head_rows", 0):
        names += f" (the first {info['num_labels']} of the head's {info['head_rows']} outputs)"
    return (f"---\nlibrary_name: peft\nbase_model: {base}\ntags:\n- lora\n- fltac-ray\n- federated-learning\n---\n\n"
            f"# LoRA adapter for {tasks or 'its cluster'}\n\n"
            f"A cluster adapter of a federated fine-tuning run by fltac-ray (algorithm: "
            f"{info.get('algorithm', 'fltac')}; LoRA on `{base}`). Classes: {names}.\n\n"
            f"```python\n{load}```\n")


def push_to_hub(folder: str | Path, repo_id: str, path_in_repo: str | None = None, private: bool = False,
                token: str | None = None, api: Any = None) -> str:
    """Upload an exported adapter folder (or a run's whole adapters/ folder) to the Hugging Face
    Hub model repository `repo_id`, created if missing; returns the commit's URL. `api`: a
    huggingface_hub.HfApi (default: one for HF_ENDPOINT and the token)."""
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file() and not (folder / "index.json").is_file():
        raise RunFolderError(folder, "is neither an exported adapter nor a run's adapters/ folder")
    owner, slash, name = repo_id.partition("/")
    if not (slash and _HUB_NAME.fullmatch(owner) and _HUB_NAME.fullmatch(name)):
        raise ConfigError([ConfigIssue("--push-to-hub", repo_id, "a Hub model repository id: owner/name, "
                                       "letters, digits and . _ - (at most 96 each)")])
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                                   repo_type="model", commit_message=f"fltac-ray adapters from {folder.parent.name}")
    except Exception as exc:
        if not _is_hub_failure(exc):
            raise
        said = str(exc).strip().splitlines()
        hint = ("unset HF_HUB_OFFLINE" if type(exc).__name__ == "OfflineModeIsEnabled" else
                "check the network, HF_ENDPOINT and your token (HF_TOKEN or `hf auth login`)")
        raise ResourceUnavailableError(
            f"Hugging Face Hub: cannot push to {repo_id} ({type(exc).__name__}: {said[0][:200] if said else ''}); "
            f"{hint}, or copy the adapters to a folder with --out") from None
    return str(getattr(commit, "commit_url", commit))


_HUB_NAME = re.compile(r"[\w.-]{1,96}")


def _is_hub_failure(exc: BaseException) -> bool:
    """An error of the Hub or of the network under it (not a bug of ours): huggingface_hub's own
    errors, its HTTP client's (httpx, requests) and the operating system's."""
    package = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or package.startswith(("huggingface_hub", "httpx", "httpcore", "requests",
                                                            "urllib3"))
