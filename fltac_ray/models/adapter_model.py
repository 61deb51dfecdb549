"""Frozen base encoder + peft LoRA + a classifier head: the model every client trains.

The *adapter* of a (client, task) is every trainable tensor (LoRA A/B of each target module and
the head), flattened in sorted key order into one float32 vector. The head always has
`head_classes` rows (the largest class count over tasks) and a task with fewer classes reads only
its first rows, so every adapter uploaded to the server has the same length: the server cannot
read task identity from shapes.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn

from fltac_ray.config import FloralConfig, ModelConfig
from fltac_ray.models.mixture_lora import MixtureLinear, Router, inject_mixtures, layer_rank


class AdapterModel(nn.Module):
    """`floral` given: FLoRAL's router-mixed adaptors (models/mixture_lora.py) replace peft LoRA,
    on the encoder's target modules and on the head; the router is private client state, kept
    out of the adapter vector."""

    def __init__(
        self,
        encoder: nn.Module,
        model_config: ModelConfig,
        head_classes: int,
        seed: int,
        floral: FloralConfig | None = None,
        num_adaptors: int = 1,
    ):
        super().__init__()
        lora = model_config.lora
        for param in encoder.parameters():
            param.requires_grad_(False)
        # Seeded so that the initial adapter v^0 is a pure function of the config.
        torch.manual_seed(seed)
        hidden = encoder.config.hidden_size
        self.router: Router | None = None
        self.router_lr = floral.router_lr if floral is not None else None
        if floral is None:
            peft_config = PeftLoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
            )
            try:
                self.encoder = get_peft_model(encoder, peft_config)
            except ValueError as exc:
                raise ValueError(f"model.lora.target_modules = {list(lora.target_modules)}: {exc}") from exc
            self.head = nn.Linear(hidden, head_classes)
        else:
            self.router = Router(num_adaptors, floral.temperature, floral.min_weight)
            rank = None if floral.rank_fraction is not None else lora.rank
            inject_mixtures(encoder, list(lora.target_modules), self.router, rank,
                            floral.rank_fraction, lora.alpha, lora.dropout)
            self.encoder = encoder
            # the head itself is federated (FedAvg) and carries C adaptors like every layer
            head_rank = layer_rank(rank, floral.rank_fraction, hidden, head_classes)
            self.head = MixtureLinear(nn.Linear(hidden, head_classes), self.router, head_rank,
                                      lora.alpha / head_rank, lora.dropout)
        self.pooling = model_config.pooling
        private = {id(self.router.weight)} if self.router is not None else set()
        # (name, parameter) in sorted name order: defines the flattened adapter layout.
        self._adapter = sorted(
            ((n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in private),
            key=lambda kv: kv[0],
        )

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
        self.head.reset_parameters()

    # --- forward --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Logits (batch, num_classes) for a task that uses the first num_classes head rows."""
        # input_ids: (batch, max_length); trim to the longest example of this batch
        width = int(lengths.max())
        input_ids = input_ids[:, :width]
        mask = (torch.arange(width, device=input_ids.device)[None, :] < lengths[:, None]).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # mean over real tokens: (batch, width, hidden) -> (batch, hidden)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)[:, :num_classes]
