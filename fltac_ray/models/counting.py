"""Trainable and communicated parameters of one client, counted on a meta-device model.

The model is built from its architecture config alone (no weights read, no memory for them), so
`fltac-ray params` answers for Llama-7B on a laptop. The count is for a client that holds every
task of the experiment, under the configured algorithm (how it groups tasks into adapters and what
it sends), matching the engine's per-round accounting (rounds.csv: params_up / params_down).
"""

from __future__ import annotations

from dataclasses import dataclass

from fltac_ray.config import ExperimentConfig
from fltac_ray.data.registry import TASKS


@dataclass
class ParameterCount:
    algorithm: str
    model: str
    tasks: int
    adapters: int  # adapters the client trains (one per task under FL-TAC, one under FedIT)
    lora_per_adapter: int
    head_per_adapter: int
    router_per_adapter: int  # FLoRAL's private router (never sent)
    mixture_per_adapter: int  # FLoRAL's mixture weights sent with each upload
    base_parameters: int  # frozen
    communicates: bool
    downloads_all_globals: int  # IFCA: the client receives all K global adapters

    @property
    def adapter_size(self) -> int:
        return self.lora_per_adapter + self.head_per_adapter

    @property
    def lora_trainable(self) -> int:
        return self.adapters * self.lora_per_adapter

    @property
    def head_trainable(self) -> int:
        return self.adapters * self.head_per_adapter

    @property
    def trainable(self) -> int:
        return self.adapters * (self.adapter_size + self.router_per_adapter)

    @property
    def up_per_round(self) -> int:
        return self.adapters * (self.adapter_size + self.mixture_per_adapter) if self.communicates else 0

    @property
    def down_per_round(self) -> int:
        if not self.communicates:
            return 0
        if self.downloads_all_globals:
            return self.downloads_all_globals * self.adapter_size
        return self.adapters * self.adapter_size


def count_parameters(config: ExperimentConfig) -> ParameterCount:
    import torch

    from fltac_ray.algorithms import create_algorithm
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import build_on_meta

    algorithm = create_algorithm(config)
    tasks = config.data.task_names
    base_task = {name: name.split("@")[0] for name in tasks}
    head_classes = max(TASKS[base_task[t]].num_classes for t in tasks)
    backbone = build_on_meta(config.model.name, config.data.modality, config.data.feature_dim)
    base_parameters = sum(p.numel() for p in backbone.parameters())
    floral = config.floral if algorithm.uses_mixture else None
    with torch.device("meta"):
        model = AdapterModel(backbone, config.model, head_classes, config.seed, floral=floral,
                             num_adaptors=config.resolved_num_adaptors, modality=config.data.modality)
    head = sum(shape_numel(shape) for name, shape in model.adapter_layout() if name.startswith("head."))
    router = config.resolved_num_adaptors if algorithm.uses_mixture else 0
    return ParameterCount(
        algorithm=config.algorithm,
        model=config.model.name,
        tasks=len(tasks),
        adapters=len(algorithm.client_adapters(tasks)),
        lora_per_adapter=model.adapter_size - head,
        head_per_adapter=head,
        router_per_adapter=router,
        mixture_per_adapter=router,
        base_parameters=base_parameters,
        communicates=algorithm.communicates,
        downloads_all_globals=algorithm.num_global_adapters() if algorithm.client_selects_global else 0,
    )


def shape_numel(shape: tuple[int, ...]) -> int:
    total = 1
    for side in shape:
        total *= side
    return total


def format_count(count: ParameterCount) -> str:
    rows = [
        ("adapters trained by a client holding every task", count.adapters),
        ("LoRA parameters per adapter", count.lora_per_adapter),
        ("head parameters per adapter", count.head_per_adapter),
        ("LoRA trainable (all adapters)", count.lora_trainable),
        ("head trainable (all adapters)", count.head_trainable),
    ]
    if count.router_per_adapter:
        rows.append(("private router parameters (all adapters, never sent)", count.adapters * count.router_per_adapter))
    rows += [
        ("total trainable", count.trainable),
        ("sent up per round", count.up_per_round),
        ("received per round", count.down_per_round),
        ("frozen base parameters", count.base_parameters),
    ]
    width = max(len(label) for label, _ in rows)
    header = f"{count.algorithm} on {count.model}, {count.tasks} tasks"
    return "\n".join([header] + [f"  {label:<{width}}  {value:>15,}" for label, value in rows])
