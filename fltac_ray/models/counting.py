"""Trainable and communicated parameters of one client, counted on a meta-device model.

The model is built from its architecture config alone (no weights read, no memory for them), so
`fltac-ray params` answers for Llama-7B on a laptop. The count is for a client that holds every
task of the experiment, under the configured algorithm (how it groups tasks into adapters and what
it sends), matching the engine's per-round accounting (rounds.csv: params_up / params_down).
"""

from __future__ import annotations

from dataclasses import dataclass

from fltac_ray.config import ExperimentConfig


@dataclass
class ParameterCount:
    algorithm: str
    model: str
    tasks: int
    adapters: int  # adapters the client trains (one per task under FL-TAC, one under FedIT)
    lora_per_adapter: int
    head_per_adapter: int
    router_per_adapter: int  # FLoRAL's private router (never sent)
    trainable_per_adapter: int  # adapter entries local training changes (FFA-LoRA: not A)
    up_per_round: int  # what the algorithm's upload() sends for every adapter
    down_per_round: int  # what its download_params() counts for the answers
    base_parameters: int  # frozen
    # model.lora.rank_profile: rank -> (clients at it, sent up per round, received per round)
    per_rank: dict[int, tuple[int, int, int]] | None = None

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
        return self.adapters * (self.trainable_per_adapter + self.router_per_adapter)


def count_parameters(config: ExperimentConfig) -> ParameterCount:
    """Counted from what the algorithm's hooks really send for a client holding every task:
    its upload() of each adapter and its download_params() for the answers."""
    import numpy as np
    import torch

    from fltac_ray.algorithms import AdapterSpec, ClientJob, create_algorithm
    from fltac_ray.algorithms.base import Aggregate
    from fltac_ray.models.adapter_model import AdapterModel
    from fltac_ray.models.builders import build_on_meta

    algorithm = create_algorithm(config)
    tasks = config.data.task_names
    head_classes = max(config.data.spec(t).num_classes for t in tasks)
    backbone = build_on_meta(config.model.name, config.data.modality, config.data.feature_dim)
    base_parameters = sum(p.numel() for p in backbone.parameters())
    with torch.device("meta"):
        model = AdapterModel(backbone, config.model, head_classes, config.seed,
                             modality=config.data.modality, **algorithm.model_options())
    spec = AdapterSpec(tuple(model.adapter_layout()), model.adaptor_index())
    algorithm.setup(spec)
    head = sum(shape_numel(shape) for name, shape in model.adapter_layout() if name.startswith("head."))
    router = int(model.router.weight.numel()) if model.router is not None else 0
    groups = algorithm.client_adapters(tasks)
    # one client through start and upload, as a worker runs them (an algorithm's upload may read
    # what its start returned: SCAFFOLD's control variates)
    answers = algorithm.num_initial_adapters()
    algorithm.set_initial(np.zeros((answers, spec.size), np.float32))
    uploads = []
    for slot, group in enumerate(groups):
        job = ClientJob((0, slot), tuple(group), 1, algorithm.task_steps(group, config.train.local_steps))
        start, meta = algorithm.start(job, None, algorithm.broadcast(), lambda vector: 0.0)
        uploads.append(algorithm.upload(job, np.array(start, np.float32), np.zeros(router, np.float32), meta))
    sent = [u for u in uploads if u is not None]
    down = 0
    if sent:
        # what the server answers: its broadcast's K adapters, cut to what it really sends
        width = algorithm.upload_width()
        down = algorithm.download_params(Aggregate(np.zeros(len(sent), np.int64),
                                                   np.zeros((answers, width), np.float32), np.ones(answers)), 1)
    per_rank = None
    if config.model.lora.rank_profile is not None and sent:
        from fltac_ray.models.ranks import client_ranks, rank_counts, rank_mask

        shared = algorithm.shared_entries()
        per_rank = {}
        for rank, clients in rank_counts(client_ranks(config)).items():
            mask = rank_mask(spec.layout, rank)
            kept = int((mask if shared is None else mask[shared]).sum())
            padding = algorithm.upload_width() - kept
            # FLoRA: every rank receives the same stacks (counts_rank_traffic)
            received = down if algorithm.counts_rank_traffic else len(sent) * kept
            per_rank[rank] = (clients, sum(u.params - padding for u in sent), received)
    return ParameterCount(
        algorithm=config.algorithm,
        model=config.model.name,
        tasks=len(tasks),
        adapters=len(groups),
        lora_per_adapter=model.adapter_size - head,
        head_per_adapter=head,
        router_per_adapter=router,
        trainable_per_adapter=int(algorithm.trainable_entries().sum()) if algorithm.trainable_entries() is not None
        else spec.size,
        up_per_round=sum(u.params for u in sent),
        down_per_round=down,
        base_parameters=base_parameters,
        per_rank=per_rank,
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
    if count.per_rank:  # the counts above are at the padded width, model.lora.rank
        for rank, (clients, up, down) in count.per_rank.items():
            rows += [(f"rank {rank} ({clients} client{'s' if clients != 1 else ''}): sent up per round", up),
                     (f"rank {rank}: received per round", down)]
    width = max(len(label) for label, _ in rows)
    header = f"{count.algorithm} on {count.model}, {count.tasks} tasks"
    return "\n".join([header] + [f"  {label:<{width}}  {value:>15,}" for label, value in rows])
