"""The final global adapters of a run, in the standard peft layout.

`adapters/cluster_<k>/` holds what `PeftModel.from_pretrained(base, folder)` reads:
`adapter_config.json` (a peft `LoraConfig`: rank, alpha, target modules) and
`adapter_model.safetensors`, plus `fltac_ray.json` (base model, pooling, the cluster's tasks and
class names). The classifier head travels inside the adapter as a peft `modules_to_save` module
named `task_head`, so the base must have one:

    from peft import PeftModel
    from fltac_ray.export import load_base

    base = load_base(folder)      # frozen backbone + pooling + a `task_head` Linear
    model = PeftModel.from_pretrained(base, folder)
    logits = model(input_ids=..., lengths=...)  # (batch, classes of the cluster's task)

Instruction (causal LM) adapters have no head: their base is the plain
`AutoModelForCausalLM`, so any peft code loads them. FLoRAL's router-mixed adaptors are not peft
LoRA: they are saved as named tensors (`cluster_<k>/adapter.safetensors`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import save_file
from torch import nn

from fltac_ray.config import ExperimentConfig
from fltac_ray.errors import ConfigError, ConfigIssue
from fltac_ray.models.adapter_model import PooledFeatures, split_adapter

INFO_FILE = "fltac_ray.json"
# Our training model names LoRA tensors `encoder.base_model.model.<path>.lora_A.default.weight`
# (peft wrapped around the backbone) and the head `head.weight`; peft files name them after the
# model peft wraps at load time, without the adapter name "default".
_TRAINING_PREFIX = "encoder.base_model.model."


# peft matches modules_to_save by name suffix: "head" would also catch EfficientNet's _conv_head.
HEAD_MODULE = "task_head"


class ExportedClassifier(PooledFeatures, nn.Module):
    """The base an exported classification adapter loads into: the frozen backbone (`encoder`),
    the run's pooling and image preprocessing, and a `task_head` Linear (hidden -> head rows)
    that peft replaces with the adapter's trained head."""

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

    def forward(self, num_classes: int | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_classes; default: the cluster's task's classes)."""
        return self.task_head(self.features(**inputs))[:, :num_classes or self.num_labels]


def peft_tensor_name(name: str, causal_lm: bool) -> str:
    """Training-model parameter name -> the key peft's adapter_model.safetensors uses."""
    if name.startswith(_TRAINING_PREFIX):
        path = name.removeprefix(_TRAINING_PREFIX).replace(".default.", ".")
        return f"base_model.model.{path}" if causal_lm else f"base_model.model.encoder.{path}"
    if name.startswith("head."):
        return f"base_model.model.{HEAD_MODULE}.{name.removeprefix('head.')}"
    raise ValueError(f"adapter tensor {name!r} is neither LoRA nor head; cannot export it to peft")


def write_peft_adapter(folder: Path, vector: np.ndarray, layout: list[tuple[str, tuple[int, ...]]],
                       config: ExperimentConfig, info: dict[str, Any]) -> None:
    """One adapter as a peft folder: adapter_config.json, adapter_model.safetensors, fltac_ray.json."""
    from peft import LoraConfig

    from fltac_ray.models.builders import model_source

    causal_lm = config.data.modality == "causal_lm"
    lora = config.model.lora
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {peft_tensor_name(name, causal_lm): np.ascontiguousarray(value, dtype=np.float32)
               for name, value in split_adapter(vector, layout).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules or []),
        modules_to_save=None if causal_lm else [HEAD_MODULE],
        task_type="CAUSAL_LM" if causal_lm else None,
        base_model_name_or_path=model_source(config.model.name),
        inference_mode=True,
    )
    peft_config.save_pretrained(str(folder))
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))


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
    folder = run_dir / "adapters"
    folder.mkdir(exist_ok=True)
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
            "image_size": config.model.image_size,
            "feature_dim": config.data.feature_dim,
            "max_length": config.data.max_length,  # text: models.builders.text_encoder(model, this)
            "seed": config.seed,  # the random test/MLP backbones are drawn from it
            "head_rows": head_rows,
            "num_labels": len(names) or head_rows,
            "class_names": names,
        })
    (folder / "index.json").write_text(json.dumps(index, indent=2))
    pd.DataFrame(assignments, columns=["client", "slot", "tasks", "cluster"]).to_csv(
        folder / "assignments.csv", index=False)
    return folder


def read_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise ConfigError([ConfigIssue("adapter folder", str(folder),
                                       f"has no {INFO_FILE}; give a folder from a run's adapters/")])
    info = json.loads(path.read_text())
    if info.get("format") != "peft":
        raise ConfigError([ConfigIssue("adapter folder", str(folder),
                                       "holds FLoRAL mixture adaptors, which are not peft LoRA")])
    return info


def load_base(folder: str | Path) -> nn.Module:
    """The frozen base an exported adapter folder loads into with `PeftModel.from_pretrained`:
    the causal LM itself for instruction tasks, else an ExportedClassifier around the backbone."""
    from fltac_ray.models.builders import load_backbone

    info = read_info(folder)
    backbone = load_backbone(info["model"], info["modality"], seed=info["seed"],
                             feature_dim=info["feature_dim"])
    for param in backbone.parameters():
        param.requires_grad_(False)
    if info["modality"] == "causal_lm":
        return backbone
    return ExportedClassifier(backbone, info["head_rows"], info["modality"], info["pooling"],
                              info["image_size"], info["num_labels"])


def load_adapter(folder: str | Path) -> nn.Module:
    """`PeftModel.from_pretrained(load_base(folder), folder)`, in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(folder), str(folder)).eval()
