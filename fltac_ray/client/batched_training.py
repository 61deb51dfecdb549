"""Batched multi-adapter local training: many (client, task) adapters, one forward/backward. No Ray.

`train_batched` runs the local steps of several adapter jobs together over the shared frozen
base (models/multi_adapter.py routes each sample through its own adapter). It reproduces
`training.train_adapter` run job by job:
  - every job draws its batches through the same seeded BatchCursor;
  - the loss is the sum of every job's own mean loss, so adapter j's gradient is exactly the
    gradient of its own batch;
  - each job has its own optimiser state (local_optimizers.py: one optimiser per stacked row),
    fresh for every job as in the one-by-one path, and the algorithm's local-training rule
    (algorithms/local_training.py: penalty, gradient correction, optimiser) acts per row;
  - jobs with fewer steps drop out of the batch once they are done (jobs are ordered by steps).
Text batches are regrouped into buckets of similar length, so a pass pads less than the
one-by-one batches do (fewer FLOPs for the same steps), and each bucket runs its own forward and
backward (gradients accumulate), so only one bucket's activations are alive at a time (offline
default, 8 adapters x batch 16: the pass's peak over the built worker fell from +620 to +365
MiB). What differs is floating-point order (larger matmuls, other padding) and the random streams
of dropout layers: with
dropout off, results agree with the one-by-one path to float32 rounding (tests/test_batched.py
states the tolerance); with dropout on they agree in distribution.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fltac_ray.algorithms.local_training import LocalContext, LocalTraining, rows_of
from fltac_ray.client.local_optimizers import BatchedAdamW  # noqa: F401 - its home before local_optimizers.py
from fltac_ray.client.precision import LossScale
from fltac_ray.client.training import (
    _NOT_TENSORS,
    BatchCursor,
    FrozenEntries,
    TrainOutcome,
    rows_to_device,
    stack_by_layout,
    to_device,
)
from fltac_ray.data.federated import EncodedSplit
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.models.multi_adapter import StackedAdapters, routed, routed_head
from fltac_ray.privacy.dp_sgd import (
    ExamplePrivacy,
    PoissonCursor,
    clip_per_example,
    noise_rows,
    privatize_sums,
    trainable_masks,
)

if TYPE_CHECKING:
    from fltac_ray.client.gpu_fit import PassMemory


@dataclass
class AdapterJob:
    """The local training of one adapter on one task: what train_adapter takes, minus the model."""

    start: np.ndarray  # (adapter_size,) float32
    split: EncodedSplit
    indices: np.ndarray
    num_classes: int  # 0: instruction task (causal-LM loss on response tokens)
    steps: int
    rng: np.random.Generator
    # where this round's local training of the adapter began (FedProx's anchor); None: `start`
    # (they differ from the second task of a multi-task adapter on)
    anchor: np.ndarray | None = None
    # the algorithm's local_inputs for this job: name -> (adapter_size,) float32
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    # example-level DP-SGD: the job's noise stream (privacy/dp_sgd.py); None without it
    noise_rng: np.random.Generator | None = None

    def signature(self) -> tuple:
        """Jobs whose inputs concatenate into one batch (same per-example shapes and dtypes)."""
        return (self.num_classes == 0,) + input_signature(self.split)


def input_signature(split: EncodedSplit) -> tuple:
    """The per-example shapes and dtypes of a split's tensor inputs: splits with equal signatures
    concatenate into one batch."""
    return tuple(sorted((key, value.shape[1:], value.dtype.str) for key, value in split.inputs.items()
                        if key not in _NOT_TENSORS))


def combine_inputs(parts: list[tuple[EncodedSplit, np.ndarray]]) -> dict[str, np.ndarray]:
    """The tensor inputs of (split, rows) parts concatenated in order: one combined batch."""
    keys = [key for key in parts[0][0].inputs if key not in _NOT_TENSORS]
    return {key: np.concatenate([split.inputs[key][rows] for split, rows in parts]) for key in keys}


def bucket_positions(combined: dict[str, np.ndarray], count: int, device: torch.device) -> list[np.ndarray]:
    """Positions of a combined batch grouped into length buckets (text), or all together
    (images and vectors: every example has the same shape)."""
    if "lengths" not in combined:
        return [np.arange(count)]
    return length_buckets(combined["lengths"], BUCKET_OVERHEAD_TOKENS.get(device.type, BUCKET_OVERHEAD_TOKENS["cpu"]))


def task_logits(model: AdapterModel, stacked: StackedAdapters, inputs: dict[str, torch.Tensor],
                route: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(batch, head_classes) logits, each sample through its own adapter and head; a task reads
    its first num_classes head rows (`classes`: (batch,)), the rest are masked out of the
    softmax. Call inside routed(model, stacked, route)."""
    logits = routed_head(model, model.features(**inputs), stacked, route)
    columns = torch.arange(logits.shape[1], device=logits.device)[None, :]
    return logits.masked_fill(columns >= classes[:, None], float("-inf"))


# Text batches are cut into buckets of similar length, each padded only to its own longest
# example. An extra bucket costs one more (smaller) forward/backward, counted as this many padded
# tokens when choosing the cut. CPU: measured on MiniLM, 16-64 perform alike (~1 ms per token of a
# step on one core, a few ms fixed per pass). CUDA: a guess (kernel launches dominate small passes).
BUCKET_OVERHEAD_TOKENS = {"cpu": 32, "cuda": 512}


def length_buckets(lengths: np.ndarray, overhead: int = BUCKET_OVERHEAD_TOKENS["cpu"]) -> list[np.ndarray]:
    """Positions of the combined batch grouped into runs of similar length, cut where it minimises
    sum(bucket size x bucket's longest + overhead): an exact DP over the distinct lengths."""
    order = np.argsort(lengths, kind="stable")
    values, counts = np.unique(lengths[order], return_counts=True)
    upto = np.concatenate([[0], np.cumsum(counts)])  # upto[k]: examples with the k shortest lengths
    best = np.zeros(len(values) + 1)
    cut = np.zeros(len(values) + 1, dtype=np.int64)
    for k in range(1, len(values) + 1):
        # a last bucket holding distinct lengths i..k-1, padded to values[k - 1]
        costs = best[:k] + (upto[k] - upto[:k]) * values[k - 1] + overhead
        cut[k] = int(np.argmin(costs))
        best[k] = costs[cut[k]]
    bounds, k = [], len(values)
    while k > 0:
        bounds.append(k)
        k = cut[k]
    edges = [0] + [int(upto[b]) for b in reversed(bounds)]
    return [order[lo:hi] for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _denominators(jobs: list[AdapterJob], chosen: list[np.ndarray], generation: bool) -> np.ndarray:
    """(len(jobs),) what each job's mean divides by: its examples, or for instruction tasks its
    response tokens (position t predicts token t+1, counted when prompt_length <= t+1 < length;
    AdapterModel.lm_token_scores), known from the inputs before any forward pass."""
    if not generation:
        return np.maximum([float(len(c)) for c in chosen], 1.0)
    counts = []
    for job, rows in zip(jobs, chosen, strict=True):
        lengths = job.split.inputs["lengths"][rows].astype(np.int64)
        prompts = np.maximum(job.split.inputs["prompt_lengths"][rows].astype(np.int64), 1)
        counts.append(float(np.clip(lengths - prompts, 0, None).sum()))
    return np.maximum(np.array(counts), 1.0)


def _accumulate_step(model: AdapterModel, stacked: StackedAdapters, jobs: list[AdapterJob],
                     chosen: list[np.ndarray], device: torch.device, loss_scale: float = 1.0) -> torch.Tensor:
    """One step's gradients, accumulated into the stacked adapters; returns (len(jobs),) each
    job's mean loss on its own samples of the combined batch (detached).

    The objective is the sum of every job's own mean loss, so adapter j's gradient is exactly
    that of job j's mean. Each sample's loss is divided by its job's denominator up front, which
    lets every length bucket run its own forward and backward: only one bucket's activations are
    alive at a time (the peak is the largest bucket's, not the whole pass's). Forward passes
    run under autocast to the base's dtype; `loss_scale` multiplies what is differentiated
    (float16 loss scaling), not the returned means."""
    sizes = [len(c) for c in chosen]
    route_all = np.repeat(np.arange(len(jobs)), sizes)  # (batch,) job of each sample
    combined = combine_inputs([(job.split, c) for job, c in zip(jobs, chosen, strict=True)])
    generation = jobs[0].num_classes == 0
    scale_all = 1.0 / _denominators(jobs, chosen, generation)[route_all]  # (batch,)
    if not generation:
        labels_all = np.concatenate([job.split.labels[c] for job, c in zip(jobs, chosen, strict=True)])
        classes_all = np.repeat([job.num_classes for job in jobs], sizes)
    means = torch.zeros(len(jobs), device=device)
    for rows in bucket_positions(combined, len(route_all), device):
        inputs = rows_to_device(combined, rows, device)
        route = to_device(route_all[rows], device)
        scale = to_device(scale_all[rows].astype(np.float32), device)
        with routed(model, stacked, route):
            with model.autocast():
                if generation:  # causal LM: CE summed over each sample's response tokens
                    token_losses, _, scored = model.lm_token_scores(**inputs)
                    sample_losses = (token_losses * scored).sum(1)
                else:
                    logits = task_logits(model, stacked, inputs, route,
                                         to_device(classes_all[rows], device))
                    labels = to_device(labels_all[rows], device)
                    sample_losses = F.cross_entropy(logits.float(), labels, reduction="none")
            weighted = sample_losses.float() * scale  # (bucket,) each sample's share of its job's mean
            (weighted.sum() * loss_scale).backward()  # the bucket's graph is freed here
        means.index_add_(0, route, weighted.detach())
    return means


def _accumulate_private_step(model: AdapterModel, stacked: StackedAdapters, jobs: list[AdapterJob],
                             chosen: list[np.ndarray], device: torch.device, masks: list[torch.Tensor | None],
                             clip_norm: float) -> torch.Tensor:
    """DP-SGD's step (privacy/dp_sgd.py) for the pass: into the stacked adapters' .grad, each
    job's sum of its examples' clipped gradients; returns (len(jobs),) each job's mean example
    loss (NaN for a job that drew no example).

    Every example routes through its own copy of its adapter (StackedAdapters.per_example), so
    one backward per length bucket leaves each example's own gradient on its copy: no loop over
    examples, and the same FLOPs as the non-private pass (the gathered A[route], B[route] the
    routed layers form anyway become leaves). Each example's loss is its own mean
    (classification: its cross-entropy; instruction tasks: over its response tokens)."""
    params = stacked.parameters()
    for param in params:
        param.grad = torch.zeros_like(param)
    sizes = [len(c) for c in chosen]
    route_all = np.repeat(np.arange(len(jobs)), sizes)  # (batch,) job of each sample
    sums = torch.zeros(len(jobs), device=device)
    if len(route_all) == 0:
        return sums.fill_(float("nan"))
    combined = combine_inputs([(job.split, c) for job, c in zip(jobs, chosen, strict=True)])
    generation = jobs[0].num_classes == 0
    if not generation:
        labels_all = np.concatenate([job.split.labels[c] for job, c in zip(jobs, chosen, strict=True)])
        classes_all = np.repeat([job.num_classes for job in jobs], sizes)
    for rows in bucket_positions(combined, len(route_all), device):
        inputs = rows_to_device(combined, rows, device)
        route = to_device(route_all[rows], device)
        own = stacked.per_example(route)  # (bucket, *shape) leaves, one copy per example
        position = torch.arange(len(rows), device=device)
        with routed(model, own, position):
            with model.autocast():
                if generation:
                    token_losses, _, scored = model.lm_token_scores(**inputs)
                    sample_losses = (token_losses * scored).sum(1) / scored.sum(1).clamp_min(1)
                else:
                    logits = task_logits(model, own, inputs, position, to_device(classes_all[rows], device))
                    sample_losses = F.cross_entropy(logits.float(), to_device(labels_all[rows], device),
                                                    reduction="none")
            sample_losses.float().sum().backward()  # example i's gradient lands on copy i only
        grads = [copy.grad if copy.grad is not None else torch.zeros_like(copy) for copy in own.parameters()]
        clipped, _ = clip_per_example(grads, masks, clip_norm)
        for param, part in zip(params, clipped, strict=True):
            param.grad.index_add_(0, route, part)
        sums.index_add_(0, route, sample_losses.detach().float())
    return sums / torch.as_tensor(sizes, dtype=sums.dtype, device=device)  # 0/0: NaN, as wanted


def local_context(jobs: list[AdapterJob], layout: list[tuple[str, tuple[int, ...]]],
                  device: torch.device) -> LocalContext:
    """The local-training rule's view of a pass: the jobs' anchors and inputs, stacked in job
    order and split by the adapter layout ((n, *shape) per layout tensor)."""
    anchors = np.stack([job.start if job.anchor is None else job.anchor for job in jobs])
    names = sorted(jobs[0].inputs)
    if any(sorted(job.inputs) != names for job in jobs):
        raise ValueError("the jobs of one pass must bring the same local_inputs names")
    inputs = {name: stack_by_layout(np.stack([job.inputs[name] for job in jobs]), layout, device) for name in names}
    return LocalContext(stack_by_layout(anchors, layout, device), inputs, active=len(jobs))


def train_batched(model: AdapterModel, jobs: list[AdapterJob], batch_size: int, lr: float,
                  weight_decay: float, device: torch.device, frozen: np.ndarray | None = None,
                  scaling: LossScale | None = None, rule: LocalTraining | None = None,
                  privacy: ExamplePrivacy | None = None) -> list[TrainOutcome]:
    """Train every job's adapter from its start; outcomes in the order of `jobs`. All jobs must
    share one signature() (the caller groups them). `frozen`: (adapter_size,) bool, entries
    held at their start values (FFA-LoRA's A). `scaling`: the worker's float16 loss scale (kept
    across passes); None: a fresh one for this call. `rule`: the algorithm's local training
    (None: plain AdamW). `privacy`: example-level DP-SGD (privacy/dp_sgd.py; every job brings
    its noise_rng), equal to train_adapter's one-example-at-a-time path."""
    if not jobs:
        return []
    if len({job.signature() for job in jobs}) > 1:
        raise ValueError("train_batched needs jobs whose inputs share shapes and dtypes; group them by signature()")
    rule = rule or LocalTraining()
    order = sorted(range(len(jobs)), key=lambda j: -jobs[j].steps)  # finished jobs drop off the end
    ordered = [jobs[j] for j in order]
    stacked = StackedAdapters(model, np.stack([job.start for job in ordered]), device)
    params = stacked.parameters()
    optimizer = rule.optimizer(params, lr, weight_decay)
    hold = FrozenEntries(params, model.adapter_layout(), frozen)
    context = local_context(ordered, model.adapter_layout(), device)
    cursor_class = BatchCursor if privacy is None else PoissonCursor
    cursors = [cursor_class(job.indices, batch_size, job.rng) for job in ordered]
    if privacy is not None:
        if any(job.noise_rng is None for job in ordered):
            raise ValueError("DP-SGD needs every job's noise stream (AdapterJob.noise_rng)")
        masks = trainable_masks(model.adapter_layout(), frozen, device)
    history: list[torch.Tensor] = []  # per step, (len(jobs),) losses (NaN once a job is done): one host read at the end
    skipped = np.zeros(len(ordered), dtype=np.int64)
    if scaling is None:
        scaling = LossScale.for_dtype(model.compute_dtype)
    model.train()
    for step in range(ordered[0].steps):
        active = sum(1 for job in ordered if job.steps > step)
        context.active, context.step = active, step
        chosen = [cursor.next() for cursor in cursors[:active]]
        for param in params:
            param.grad = None
        if privacy is None:
            # Sum of means: d(sum)/d(adapter j) = d(loss_j)/d(adapter j), as if trained alone.
            losses = _accumulate_step(model, stacked, ordered[:active], chosen, device, scaling.scale)
        else:
            losses = _accumulate_private_step(model, stacked, ordered[:active], chosen, device, masks,
                                              privacy.clip_norm)
            noise = noise_rows([job.noise_rng for job in ordered[:active]], model.adapter_size)
            privatize_sums(rows_of([param.grad for param in params], active),
                           stack_by_layout(noise, model.adapter_layout(), device), privacy)
        penalty = rule.penalty(rows_of(params, active), context)  # (active,) or None
        if penalty is not None:  # each row's term reaches only its own adapter's gradient
            (penalty.float().sum() * scaling.scale).backward()
        finite = scaling.finite_rows(params, active)  # float16 only; else None
        overflowed = 0 if finite is None else int((~finite).sum())
        rule.correct_gradients(rows_of([param.grad for param in params], active), context)
        if overflowed:  # only the overflowed adapters skip this step
            optimizer.step(active, take=finite)
            skipped[:active] += ~finite
        else:
            optimizer.step(active)
        scaling.update(overflowed == 0, overflowed)
        hold.restore()
        step_losses = torch.full((len(ordered),), float("nan"), device=losses.device)
        step_losses[:active] = losses.detach()
        history.append(step_losses)
    vectors = stacked.to_numpy()
    with warnings.catch_warnings():  # DP-SGD: a job may have drawn no example in any step (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_losses = np.nanmean(torch.stack(history).cpu().numpy().astype(np.float64), axis=0)
    outcomes: list[TrainOutcome | None] = [None] * len(jobs)
    for position, j in enumerate(order):
        outcomes[j] = TrainOutcome(vectors[position], float(mean_losses[position]), int(skipped[position]))
    return outcomes  # type: ignore[return-value]


def measure_pass_memory(model: AdapterModel, split: EncodedSplit, rows: np.ndarray, num_classes: int,
                        device: torch.device, privacy: ExamplePrivacy | None = None) -> PassMemory:
    """CUDA: the memory of one batched training step (client/gpu_fit.PassMemory) on `rows` (give
    train.batch_size of the longest examples: buckets pad to their longest): a warm-up step first
    (cuBLAS's workspace and the first kernels' buffers are paid once per process, not per
    adapter), then the peak over what was allocated before, for a pass of one adapter and of
    two; the difference is one adapter's share (activations, its stacked parameters, gradients
    and AdamW moments), the rest the pass's fixed part. What engine.max_batched_adapters: auto
    plans with (client/gpu_fit.adapters_that_fit). `privacy`: measure DP-SGD's pass, whose
    per-example adapter copies and their gradients add (examples x adapter size) floats (Poisson
    sampling at rate 1 here: every row, the largest batch)."""
    from fltac_ray.client.gpu_fit import PassMemory

    if device.type != "cuda":
        raise ValueError("measure_pass_memory reads CUDA's allocator statistics")
    start = model.get_adapter()

    def peak_of(count: int) -> int:
        jobs = [AdapterJob(start, split, rows, num_classes, 1, np.random.default_rng(j),
                           noise_rng=np.random.default_rng(j)) for j in range(count)]
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_batched(model, jobs, len(rows), 0.0, 0.0, device, privacy=privacy)  # lr 0: nothing learns
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    peak_of(1)  # warm-up
    one, two = peak_of(1), peak_of(2)
    torch.cuda.empty_cache()  # the next worker on this GPU sees the memory free again
    return PassMemory.from_two_passes(one, two)
