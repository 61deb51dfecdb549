"""Frozen base model + peft LoRA + a classifier head: the model every client trains.

One class serves every modality (models/registry.py): text encoders, image backbones (ViT,
EfficientNet-lite0), vector MLPs (all with a classifier head on pooled features), and causal LMs
(no head: the adapter is LoRA only, trained on response tokens).

The *adapter* of a (client, task) is every trainable tensor (LoRA A/B of each target module and
the head), flattened in sorted key order into one float32 vector. The head always has
`head_classes` rows (the largest class count over tasks) and a task with fewer classes reads only
its first rows, so every adapter uploaded to the server has the same length: the server cannot
read task identity from shapes.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn

from fltac_ray.config import ModelConfig
from fltac_ray.models.mixture_lora import (
    MixtureLinear,
    MixtureSettings,
    Router,
    inject_mixtures,
    layer_rank,
)
from fltac_ray.models.registry import default_targets


@contextlib.contextmanager
def peft_wrapping():
    """peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` whenever it wraps a
    model: a FutureWarning per model (per worker, per `params` call) that no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def gradient_checkpointing_problem(encoder: nn.Module) -> str | None:
    """Why model.gradient_checkpointing cannot apply to this base (built or on the meta device),
    or None."""
    if getattr(encoder, "supports_gradient_checkpointing", False):
        return None
    return f"{type(encoder).__name__} does not support it; Hugging Face transformer models do"


def enable_gradient_checkpointing(encoder: nn.Module) -> None:
    """Hugging Face models recompute each layer's activations in backward (non-reentrant
    checkpointing, which needs no input gradients: only the LoRA tensors train)."""
    if (problem := gradient_checkpointing_problem(encoder)) is not None:
        raise ValueError(f"model.gradient_checkpointing: {problem}")
    if hasattr(encoder, "activation_checkpointing_enable"):  # transformers 5.x's name
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def split_adapter(vectors: np.ndarray, layout: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """(..., adapter_size) flat adapters -> each layout entry as a (..., *shape) view, in layout
    order (the inverse of AdapterModel.get_adapter's flattening)."""
    lead, tensors, offset = vectors.shape[:-1], {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        tensors[name] = vectors[..., offset:offset + size].reshape(*lead, *shape)
        offset += size
    if offset != vectors.shape[-1]:
        raise ValueError(f"adapter has {vectors.shape[-1]} values, layout describes {offset}")
    return tensors


def pixel_statistics(model_type: str) -> tuple[list[float], list[float]]:
    """(mean, std) per RGB channel the backbone was trained on: EfficientNet-lite0 ImageNet's,
    ViT-in21k (and the rest) 0.5 and 0.5."""
    if model_type == "efficientnet-lite0":
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return [0.5] * 3, [0.5] * 3


def normalise_pixels(pixels: torch.Tensor, image_size: int, mean: torch.Tensor | list[float],
                     std: torch.Tensor | list[float]) -> torch.Tensor:
    """(batch, 1 or 3, h, w) uint8 -> (batch, 3, S, S) normalised floats: what the backbone reads
    (`pixel_values`; an exported adapter's image processor makes the same from images)."""
    x = pixels.float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def text_batch(input_ids: torch.Tensor, lengths: torch.Tensor, token_type_ids: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
    """The engine's right-padded (batch, max_length) token ids and their lengths -> the standard
    inputs trimmed to the batch's longest example: input_ids, attention_mask (and token_type_ids).
    On CUDA the width is the one the host cut the batch to (training.rows_to_device): reading
    lengths.max() back would stall the host once per batch."""
    width = input_ids.shape[1] if input_ids.is_cuda else int(lengths.max())
    batch = {"input_ids": input_ids[:, :width].long(),
             "attention_mask": (torch.arange(width, device=input_ids.device)[None, :] < lengths[:, None]).long()}
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids[:, :width].long()
    return batch


class PooledFeatures:
    """Pooled (batch, hidden) features of `self.encoder` for every modality. Shared by the
    training model and the exported classifier (fltac_ray/runs/export.py), so both read inputs alike.
    Needs: encoder, modality, pooling, image_size and the pixel_mean / pixel_std buffers."""

    encoder: nn.Module
    modality: str
    pooling: str
    image_size: int
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def _register_pixel_statistics(self, encoder: nn.Module, image_size: int | None) -> None:
        self.image_size = image_size or int(getattr(encoder.config, "image_size", 64))
        mean, std = pixel_statistics(getattr(encoder.config, "model_type", ""))
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) pooled features of the frozen body (with its LoRA) of a batch as the
        engine stores it: input_ids + lengths, uint8 pixels, or features."""
        if self.modality == "vector":
            return self.encoder(inputs["features"].float())
        if self.modality == "image":
            return self.pixel_features(normalise_pixels(inputs["pixels"], self.image_size,
                                                        self.pixel_mean, self.pixel_std))
        return self.text_features(**text_batch(inputs["input_ids"], inputs["lengths"], inputs.get("token_type_ids")))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, hidden) pooled features of (batch, width) token ids and their mask."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.pooling == "pooler":
            return self._pretrained_pooler(out)
        return self._pool(out.last_hidden_state, attention_mask)

    def _pretrained_pooler(self, out) -> torch.Tensor:
        """model.pooling: pooler — the backbone's own pretrained (frozen) pooler over the first
        token (BERT: dense + tanh) and the classifier dropout of its config, as
        BertForSequenceClassification feeds its head (the FL-TAC authors' GLUE model)."""
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise ValueError("model.pooling = 'pooler': this backbone has no pretrained pooler; use cls or mean")
        config = self.encoder.config
        rate = getattr(config, "classifier_dropout", None)
        rate = getattr(config, "hidden_dropout_prob", 0.0) if rate is None else rate
        return F.dropout(pooled, p=float(rate), training=self.training)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if mask is None:  # ViT: every patch token is real
            return hidden.mean(1)
        # mean over real tokens: (batch, width, hidden) -> (batch, hidden)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def pixel_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) pooled features of (batch, 3, S, S) normalised images."""
        x = pixel_values
        out = self.encoder(pixel_values=x) if hasattr(self.encoder.config, "patch_size") else self.encoder(x)
        if isinstance(out, torch.Tensor):  # EfficientNet: already pooled (batch, 1280)
            return out
        return self._pool(out.last_hidden_state)


def silence_base_dropout(encoder: nn.Module) -> None:
    """Turn off every dropout of a backbone (model.base_dropout: false): each nn.Dropout's rate
    and the float rates attention modules pass to their kernels themselves (Llama's
    `attention_dropout`, ViT's `dropout_prob`). Called on the bare backbone, before LoRA's
    modules exist."""
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attribute in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(module, attribute, None), float):
                setattr(module, attribute, 0.0)


class AdapterModel(PooledFeatures, nn.Module):
    """`floral` given: FLoRAL's router-mixed adaptors (models/mixture_lora.py) replace peft LoRA,
    on the encoder's target modules and on the head; the router is private client state, kept
    out of the adapter vector."""

    def __init__(
        self,
        encoder: nn.Module,
        model_config: ModelConfig,
        head_classes: int,
        seed: int,
        floral: MixtureSettings | None = None,
        num_adaptors: int = 1,
        modality: str = "text",
    ):
        super().__init__()
        lora = model_config.lora
        # ExperimentConfig fills the family default; a bare ModelConfig may still hold None.
        targets = list(lora.target_modules or default_targets(model_config.name, modality))
        self.modality = modality
        self._register_pixel_statistics(encoder, model_config.image_size)
        for param in encoder.parameters():
            param.requires_grad_(False)
        if not model_config.base_dropout:
            silence_base_dropout(encoder)  # before LoRA is injected: its dropout stays
        # The base's dtype (precision.cast_frozen_base ran before): forward passes autocast to it;
        # peft keeps the LoRA tensors of a half-precision base in float32, the head is float32.
        self.compute_dtype = next((p.dtype for p in encoder.parameters() if p.is_floating_point()),
                                  torch.float32)
        if model_config.gradient_checkpointing:
            enable_gradient_checkpointing(encoder)
        # Seeded so that the initial adapter v^0 is a pure function of the config.
        torch.manual_seed(seed)
        hidden = encoder.config.hidden_size
        self.router: Router | None = None
        self.router_lr = floral.router_lr if floral is not None else None
        self.head_frozen = False  # model.head: frozen (plain LoRA only)
        if floral is None:
            peft_config = PeftLoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=targets,
            )
            try:
                with peft_wrapping():
                    self.encoder = get_peft_model(encoder, peft_config)
            except ValueError as exc:
                raise ValueError(f"model.lora.target_modules = {targets}: {exc}") from exc
            self.head = nn.Linear(hidden, head_classes) if head_classes else None
            if self.head is not None and model_config.head == "frozen":
                # seeded above, so every worker holds the same head; never in the adapter vector
                self.head.requires_grad_(False)
                self.head_frozen = True
        else:
            optimal = floral.router == "optimal"  # fixed to the true cluster: no noise, never trained
            self.router = Router(num_adaptors, floral.temperature, floral.min_weight,
                                 0.0 if optimal else floral.router_noise)
            self.router_lr = 0.0 if optimal else floral.router_lr
            rank = None if floral.rank_fraction is not None else lora.rank
            inject_mixtures(encoder, targets, self.router, rank, floral.rank_fraction, lora.alpha,
                            lora.dropout, scale=floral.alpha, bias=floral.bias)
            self.encoder = encoder
            # the head itself is federated (FedAvg) and carries C adaptors like every layer
            self.head = None
            if head_classes:
                head_rank = layer_rank(rank, floral.rank_fraction, hidden, head_classes)
                self.head = MixtureLinear(nn.Linear(hidden, head_classes), self.router, head_rank,
                                          lora.alpha / head_rank if floral.alpha is None else floral.alpha,
                                          lora.dropout, floral.bias)
        self.pooling = model_config.pooling
        private = {id(self.router.weight)} if self.router is not None else set()
        # (name, parameter) in sorted name order: defines the flattened adapter layout.
        self._adapter = sorted(
            ((n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in private),
            key=lambda kv: kv[0],
        )

    def place_beside_quantized_base(self, device: torch.device) -> None:
        """Move everything that is not a bitsandbytes layer to `device`: the head, the pixel
        statistics, FLoRAL's router and mixture adaptors, the base's unquantised layers
        (embeddings, norms). A bitsandbytes layer was placed by its loader and refuses .to().
        Each other module moves its own tensors as .to() would (host to GPU keeps the
        parameters' identity, so the adapter's references stay valid)."""
        for module in self.modules():
            if not type(module).__module__.startswith("bitsandbytes"):
                module._apply(lambda tensor: tensor.to(device), recurse=False)

    # --- adapter <-> flat vector ----------------------------------------------------------
    @property
    def adapter_size(self) -> int:
        return sum(p.numel() for _, p in self._adapter)

    def adapter_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(p.shape)) for name, p in self._adapter]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self._adapter]

    def optimizer_groups(self, lr: float) -> list[dict]:
        """What local training updates: the adapter at `lr`, plus the private router (FLoRAL) at
        its own learning rate."""
        groups = [{"params": self.adapter_parameters(), "lr": lr}]
        if self.router is not None:
            groups.append({"params": [self.router.weight], "lr": self.router_lr})
        return groups

    def adaptor_index(self) -> np.ndarray:
        """(adapter_size,) int: which of the C mixture adaptors each adapter entry belongs to,
        -1 for entries shared by all (FLoRAL's head base). Plain LoRA: all -1."""
        parts = []
        for name, param in self._adapter:
            if self.router is not None and name.rsplit(".", 1)[-1].startswith("lora_"):
                c = param.shape[0]  # stacked adaptors: leading C axis
                parts.append(np.repeat(np.arange(c), param.numel() // c))
            else:
                parts.append(np.full(param.numel(), -1))
        return np.concatenate(parts).astype(np.int32)

    # --- private client state (FLoRAL's router) --------------------------------------------
    def get_private(self) -> np.ndarray:
        if self.router is None:
            return np.zeros(0, np.float32)
        return self.router.weight.detach().cpu().numpy().astype(np.float32).copy()

    def set_private(self, vector: np.ndarray | None) -> None:
        if self.router is None:
            return
        with torch.no_grad():
            if vector is None:
                self.router.weight.zero_()  # a new client's router: uniform mixture
            else:
                self.router.weight.copy_(torch.from_numpy(np.asarray(vector, dtype=np.float32)))

    def mixture_weights(self) -> np.ndarray:
        """pi (C,) of the current router; what the server needs to weight each adaptor."""
        if self.router is None:
            return np.ones(1, np.float32)
        with torch.no_grad():
            return self.router.mixture().cpu().numpy().astype(np.float32)

    def get_adapter(self) -> np.ndarray:
        """(adapter_size,) float32 copy of the current adapter."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for _, p in self._adapter])
        return flat.to("cpu", torch.float32).numpy().copy()

    def set_adapter(self, vector: np.ndarray) -> None:
        if vector.shape != (self.adapter_size,):
            raise ValueError(f"adapter has shape {vector.shape}, expected ({self.adapter_size},)")
        source = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32))
        offset = 0
        with torch.no_grad():
            for _, param in self._adapter:
                n = param.numel()
                param.copy_(source[offset:offset + n].view_as(param))
                offset += n

    def reset_adapter(self, seed: int) -> None:
        """Draw a fresh adapter (LoRA A kaiming, B zero, head default init) from `seed`."""
        torch.manual_seed(seed)
        if self.router is not None:
            raise NotImplementedError("reset_adapter is for plain LoRA adapters (IFCA)")
        for module in self.encoder.modules():
            if hasattr(module, "reset_lora_parameters"):
                module.reset_lora_parameters("default", True)
        if self.head is not None and not self.head_frozen:  # a frozen head stays as drawn
            self.head.reset_parameters()

    def lora_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every peft LoRA layer holding the adapter "default", the name as the
        adapter layout spells it before ".lora_A." (plain LoRA; FLoRAL's mixtures are none)."""
        from peft.tuners.lora import layer as lora_layers

        return [(name, module) for name, module in self.named_modules()
                if isinstance(module, lora_layers.LoraLayer) and "default" in module.lora_A]

    def fold_into_base(self, updates: dict[str, np.ndarray] | None) -> None:
        """Set each named LoRA layer's frozen base weight to W0 + scale * update (FLoRA's folded
        stacks; update (d_out, d_in), scale the layer's LoRA scale alpha / r), computed in float32
        from the weight as loaded and cast to the base's dtype; layers not named, and every layer
        for None, go back to W0. W0 is never written: the folded weight is a new tensor (a base
        mapped from the node's cache stays shared and untouched), so one extra copy of the
        targeted layers' weights per worker, not per client."""
        pristine = self.__dict__.setdefault("_pristine_weights", {})  # name -> W0, kept out of the module tree
        updates = updates or {}
        layers = dict(self.lora_layers())
        unknown = sorted(set(updates) - set(layers))
        if unknown:
            raise ValueError(f"base update for {unknown[0]!r}: this model has no LoRA layer of that name")
        for name, module in layers.items():
            base = module.get_base_layer()
            if name not in pristine:
                if name not in updates:
                    continue  # never folded: W0 is in place
                pristine[name] = base.weight
            original = pristine[name]
            if name not in updates:
                base.weight = original
                continue
            update = torch.from_numpy(np.asarray(updates[name], dtype=np.float32)).to(original.device)
            if update.shape != original.shape:
                raise ValueError(f"base update for {name!r} has shape {tuple(update.shape)}, the layer's weight "
                                 f"{tuple(original.shape)}")
            with torch.no_grad():
                folded = original.float() + module.scaling["default"] * update
            base.weight = nn.Parameter(folded.to(original.dtype), requires_grad=False)

    def fixed_tensors(self) -> dict[str, np.ndarray]:
        """A frozen head's tensors (model.head: frozen): part of the model, not of the adapter;
        an export writes them beside each adapter. Empty otherwise."""
        if not self.head_frozen:
            return {}
        return {f"head.{name}": p.detach().cpu().float().numpy().copy() for name, p in self.head.named_parameters()}

    # --- forward ---------------------------------------------------------------------------
    def autocast(self):
        """The context every forward pass runs in: autocast to the base's dtype (no-op in float32)."""
        from fltac_ray.client.precision import autocast

        return autocast(self.pixel_mean.device, self.compute_dtype)

    def forward(self, num_classes: int, **inputs: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_classes) for a task that uses the first num_classes head rows."""
        if self.router is not None:
            self.router.resample()  # FLoRAL: one draw of router noise per pass (training only)
        return self.head(self.features(**inputs))[:, :num_classes]

    # --- causal LM ---------------------------------------------------------------------------
    def lm_scores(self, input_ids, lengths, prompt_lengths, **_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Summed cross-entropy and right predictions over response tokens, and their count."""
        losses, correct, scored = self.lm_token_scores(input_ids, lengths, prompt_lengths)
        return (losses * scored).sum(), (correct & scored).sum(), int(scored.sum())

    def lm_token_scores(self, input_ids, lengths, prompt_lengths, **_: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per position (batch, width - 1): cross-entropy, right prediction, and whether it counts.

        The prompt is masked out: position t predicts token t+1, which counts only when t+1 is a
        response token (prompt_length <= t+1 < length). Only those positions go through the
        output layer: logits over the whole vocabulary at every prompt position would be most of
        a pass's activation memory on instruction data (Llama: 32,000 floats per token)."""
        if self.router is not None:
            self.router.resample()  # FLoRAL: one draw of router noise per pass (training only)
        width = input_ids.shape[1] if input_ids.is_cuda else int(lengths.max())  # as text_batch
        ids = input_ids[:, :width].long()
        positions = torch.arange(width, device=ids.device)[None, :]
        mask = (positions < lengths[:, None]).long()
        targets = ids[:, 1:]
        scored = (positions[:, 1:] >= prompt_lengths[:, None]) & (positions[:, 1:] < lengths[:, None])
        where = scored.nonzero(as_tuple=True)
        logits = self._response_logits(ids, mask, scored)  # (scored tokens, vocabulary)
        token_losses = F.cross_entropy(logits.float(), targets[where], reduction="none")
        losses = token_losses.new_zeros(targets.shape).index_put(where, token_losses)
        correct = torch.zeros_like(scored).index_put(where, logits.argmax(-1) == targets[where])
        return losses, correct, scored

    def _response_logits(self, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """(scored.sum(), vocabulary) logits of the scored positions: the decoder's hidden states
        at those positions through the output layer (with its LoRA, if targeted). Models whose
        logits are more than output_layer(hidden) (soft-capping) take the whole-logits path."""
        model = self.encoder.get_base_model() if hasattr(self.encoder, "get_base_model") else self.encoder
        head = model.get_output_embeddings()
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if head is None or decoder is None or getattr(model.config, "final_logit_softcapping", None):
            return self.encoder(input_ids=ids, attention_mask=mask).logits[:, :-1][scored]
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]  # (b, w-1, h)
        return head(hidden[scored])

    @torch.no_grad()
    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, pad_id: int, eos_id: int) -> list[list[int]]:
        """Greedy continuations of token-id prompts (left-padded into one batch)."""
        width = max(len(p) for p in prompts)
        device = self.pixel_mean.device
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.as_tensor(np.asarray(prompt, dtype=np.int64))
            mask[i, width - len(prompt):] = 1
        with self.autocast():
            out = self.encoder.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
        answers = []
        for row in out[:, width:].tolist():
            answers.append(row[: row.index(eos_id)] if eos_id in row else row)
        return answers
