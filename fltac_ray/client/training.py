"""Local training and evaluation of one adapter on one task's examples (Algorithm 2). No Ray.

Classification tasks train cross-entropy on the head's logits; instruction tasks train the causal
LM's cross-entropy on response tokens only (the prompt is masked out of the labels).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fltac_ray.algorithms.local_training import LocalContext, LocalTraining
from fltac_ray.client.precision import LossScale
from fltac_ray.client.rouge import rouge_l
from fltac_ray.data.federated import EncodedSplit
from fltac_ray.models.adapter_model import AdapterModel
from fltac_ray.privacy.dp_sgd import (
    ExamplePrivacy,
    PoissonCursor,
    clip_per_example,
    noise_rows,
    privatize_sums,
    trainable_masks,
)

# Inputs that are not model tensors (generation references).
_NOT_TENSORS = {"references"}


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`; to CUDA through pinned memory, asynchronously (the copy overlaps
    the kernels already queued; pageable memory would make the host wait for it)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# token-indexed inputs, cut on the host to a batch's longest example (models/adapter_model.text_batch)
_TOKEN_COLUMNS = ("input_ids", "token_type_ids")


def rows_to_device(inputs: dict[str, np.ndarray], rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensor inputs of `rows` on `device`, token columns cut to the rows' longest example on
    the host: the device then never reads the width back (no host sync per batch), and the copy
    carries no padding. Fancy indexing copies out of the (read-only, shared) object-store arrays;
    dtypes are kept (uint8 pixels, int32 ids) and widened inside the model."""
    width = int(inputs["lengths"][rows].max()) if "lengths" in inputs and len(rows) else None
    out = {}
    for key, value in inputs.items():
        if key in _NOT_TENSORS:
            continue
        part = value[rows]
        if width is not None and key in _TOKEN_COLUMNS:
            part = part[:, :width]
        out[key] = to_device(part, device)
    return out


def stack_by_layout(matrix: np.ndarray, layout: list[tuple[str, tuple[int, ...]]],
                    device: torch.device) -> list[torch.Tensor]:
    """(n, adapter_size) float32 rows -> one (n, *shape) tensor per layout entry, on `device`
    (the stacked form the local-training rule reads)."""
    rows = to_device(np.asarray(matrix, dtype=np.float32), device)
    out, offset = [], 0
    for _, shape in layout:
        size = int(np.prod(shape))
        out.append(rows[:, offset:offset + size].reshape(len(rows), *shape))
        offset += size
    return out


def batch_tensors(split: EncodedSplit, index: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return rows_to_device(split.inputs, index, device)


def _batch_loss(model: AdapterModel, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                num_classes: int) -> torch.Tensor:
    with model.autocast():  # the base's dtype; the loss itself on float32 logits
        if num_classes == 0:  # instruction task: mean CE over this batch's response tokens
            loss_sum, _, tokens = model.lm_scores(**inputs)
            return loss_sum / max(tokens, 1)
        return F.cross_entropy(model(**inputs, num_classes=num_classes).float(), labels)


@dataclass
class TrainOutcome:
    adapter: np.ndarray  # (adapter_size,) float32
    mean_loss: float
    skipped_steps: int = 0  # float16: steps skipped because the gradients overflowed


class BatchCursor:
    """The examples of each local step: `batch_size` of `indices` in a seeded order, reshuffled
    when an epoch runs out. One-by-one and batched training draw through this same class, so both
    see the same batches."""

    def __init__(self, indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> None:
        self.indices, self.batch_size, self.rng = indices, batch_size, rng
        self.order = rng.permutation(indices)
        self.cursor = 0

    def next(self) -> np.ndarray:
        if self.cursor + self.batch_size > len(self.order) and self.cursor > 0:
            self.order, self.cursor = self.rng.permutation(self.indices), 0
        chosen = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return chosen


def train_adapter(
    model: AdapterModel,
    start: np.ndarray,
    split: EncodedSplit,
    indices: np.ndarray,
    num_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    rng: np.random.Generator,
    device: torch.device,
    frozen: np.ndarray | None = None,
    scaling: LossScale | None = None,
    rule: LocalTraining | None = None,
    anchor: np.ndarray | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    privacy: ExamplePrivacy | None = None,
    noise_rng: np.random.Generator | None = None,
) -> TrainOutcome:
    """Run `steps` local steps from `start` on batches of `indices` (reshuffled every epoch),
    by the algorithm's local-training `rule` (algorithms/local_training.py; None: plain AdamW),
    which sees this adapter as a pass of one (n = 1). `anchor`: where this round's training of
    the adapter began (None: `start`); `inputs`: the algorithm's local_inputs for this job.
    `frozen`: (adapter_size,) bool, entries held at their start value (FFA-LoRA's A). A float16
    base trains with loss scaling (precision.LossScale): a step whose gradients overflow is
    skipped, as torch's GradScaler does; `scaling`: the worker's scale, kept across calls (None:
    a fresh one). FLoRAL's private router trains beside the adapter with torch's AdamW at its
    own learning rate. `privacy`: example-level DP-SGD (privacy/dp_sgd.py): Poisson-sampled
    batches, each example's gradient on its own (one forward pass each), clipped, summed and
    noised from `noise_rng`."""
    rule = rule or LocalTraining()
    model.set_adapter(start)
    layout = model.adapter_layout()
    params = model.adapter_parameters()
    hold = FrozenEntries(params, layout, frozen)
    model.train()
    # (1, *shape) views of the model's adapter tensors: the rule's optimiser updates land in the
    # model. A fresh optimiser per (client, task, round), as in the reference implementation.
    optimizer = rule.optimizer([param.detach().unsqueeze(0) for param in params], lr, weight_decay)
    groups = model.optimizer_groups(lr)  # the adapter's, then FLoRAL's router at its own lr
    private = torch.optim.AdamW(groups[1:], lr=lr, weight_decay=weight_decay) if len(groups) > 1 else None
    context = LocalContext(stack_by_layout((start if anchor is None else anchor)[None], layout, device),
                           {name: stack_by_layout(vector[None], layout, device)
                            for name, vector in sorted((inputs or {}).items())})
    batches = (BatchCursor if privacy is None else PoissonCursor)(indices, batch_size, rng)
    if privacy is not None:
        return _train_private(model, params, layout, hold, optimizer, rule, context, batches, split, num_classes,
                              steps, device, frozen, privacy, noise_rng)
    if scaling is None:
        scaling = LossScale.for_dtype(model.compute_dtype)
    skipped_before = scaling.skipped
    trained = [p for group in groups for p in group["params"]]
    losses = []
    for step in range(steps):
        context.step = step
        chosen = batches.next()
        inputs_on_device = batch_tensors(split, chosen, device)
        labels = to_device(split.labels[chosen], device)
        loss = _batch_loss(model, inputs_on_device, labels, num_classes)
        objective = loss
        penalty = rule.penalty([param.unsqueeze(0) for param in params], context)  # (1,) or None
        if penalty is not None:
            objective = loss + penalty.float().sum()
        for param in trained:
            param.grad = None
        (objective * scaling.scale).backward()
        stepped = scaling.unscale(trained)
        if stepped:
            grads = [(param.grad if param.grad is not None else torch.zeros_like(param)).unsqueeze(0)
                     for param in params]
            rule.correct_gradients(grads, context)
            optimizer.step(1, grads=grads)
            if private is not None:
                private.step()
        scaling.update(stepped)
        hold.restore()
        losses.append(loss.item())
    return TrainOutcome(model.get_adapter(), float(np.mean(losses)), scaling.skipped - skipped_before)


def _train_private(model: AdapterModel, params: list[torch.Tensor], layout: list[tuple[str, tuple[int, ...]]],
                   hold: FrozenEntries, optimizer, rule: LocalTraining, context: LocalContext,
                   batches: PoissonCursor, split: EncodedSplit, num_classes: int, steps: int,
                   device: torch.device, frozen: np.ndarray | None, privacy: ExamplePrivacy,
                   noise_rng: np.random.Generator | None) -> TrainOutcome:
    """train_adapter's steps under example-level DP-SGD, one example per forward pass: the
    reference the batched path (batched_training.py) is tested against."""
    if noise_rng is None:
        raise ValueError("DP-SGD needs a noise stream (noise_rng)")
    masks = trainable_masks(layout, frozen, device)
    size = sum(int(np.prod(shape)) for _, shape in layout)
    losses: list[float] = []  # each step's mean example loss (steps that drew no example: none)
    for step in range(steps):
        context.step = step
        sums = [torch.zeros_like(param).unsqueeze(0) for param in params]  # (1, *shape)
        step_losses = []
        for example in batches.next():
            for param in params:
                param.grad = None
            rows = np.array([example])
            loss = _batch_loss(model, batch_tensors(split, rows, device), to_device(split.labels[rows], device),
                               num_classes)  # one example: its own mean loss
            loss.backward()
            grads = [(param.grad if param.grad is not None else torch.zeros_like(param)).unsqueeze(0)
                     for param in params]
            clipped, _ = clip_per_example(grads, masks, privacy.clip_norm)
            for total, part in zip(sums, clipped, strict=True):
                total.add_(part)
            step_losses.append(loss.item())
        if step_losses:
            losses.append(float(np.mean(step_losses)))
        privatize_sums(sums, stack_by_layout(noise_rows([noise_rng], size), layout, device), privacy)
        penalty = rule.penalty([param.unsqueeze(0) for param in params], context)  # reads no data
        if penalty is not None:
            for param in params:
                param.grad = None
            penalty.float().sum().backward()
            for total, param in zip(sums, params, strict=True):
                if param.grad is not None:
                    total.add_(param.grad.unsqueeze(0))
        rule.correct_gradients(sums, context)
        optimizer.step(1, grads=sums)
        hold.restore()
    return TrainOutcome(model.get_adapter(), float(np.mean(losses)) if losses else float("nan"))


class FrozenEntries:
    """Holds chosen adapter entries at their current values across optimizer steps: restore()
    after each step undoes whatever the step (gradient and weight decay) did to them. Works on
    plain parameters (shape) and stacked ones (n, *shape), the same entries in every row."""

    def __init__(self, params: list[torch.Tensor], layout: list[tuple[str, tuple[int, ...]]],
                 frozen: np.ndarray | None) -> None:
        self.held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if frozen is None or not frozen.any():
            return
        from fltac_ray.models.adapter_model import split_adapter

        masks = split_adapter(np.asarray(frozen, dtype=bool), layout)
        for param, (name, _) in zip(params, layout, strict=True):
            mask = torch.from_numpy(np.ascontiguousarray(masks[name])).to(param.device)
            if mask.any():
                self.held.append((param, mask, param.detach().clone()))

    @torch.no_grad()
    def restore(self) -> None:
        for param, mask, start in self.held:
            # mask: shape; param/start: shape or (n, *shape): broadcast over the leading axis
            param.copy_(torch.where(mask, start, param))


@dataclass
class EvalOutcome:
    correct: int  # right predictions (examples, or response tokens for generation)
    loss_sum: float
    count: int  # test examples
    predictions: int = 0  # what correct and loss_sum count (0: examples)
    rouge_sum: float = float("nan")
    judge_sum: float = float("nan")


# (prompts, references, answers) -> scores in [0, 1]
Judge = Callable[[list[str], list[str], list[str]], list[float]]


def load_judge(spec: str | None) -> Judge | None:
    """`package.module:function` -> the function (train.judge)."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class GenerationSettings:
    max_new_tokens: int
    pad_id: int
    eos_id: int
    decode: Callable[[list[int]], str]
    judge: Judge | None = None


@torch.no_grad()
def evaluate_adapter(
    model: AdapterModel,
    adapter: np.ndarray,
    split: EncodedSplit,
    indices: np.ndarray,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    generation: GenerationSettings | None = None,
) -> EvalOutcome:
    """Classification: accuracy and CE over examples. Instruction tasks: token accuracy and CE
    over response tokens (perplexity = exp of the mean), plus ROUGE-L of greedy answers against
    the references (and the judge's scores) when `generation` is given."""
    if len(indices) == 0:
        return EvalOutcome(0, 0.0, 0)
    model.set_adapter(adapter)
    model.eval()
    correct, loss_sum, scored = 0, 0.0, 0
    rouge, judged = [], []
    for lo in range(0, len(indices), batch_size):
        chosen = indices[lo:lo + batch_size]
        inputs = batch_tensors(split, chosen, device)
        if num_classes == 0:
            with model.autocast():
                batch_loss, batch_correct, tokens = model.lm_scores(**inputs)
            loss_sum += float(batch_loss)
            correct += int(batch_correct)
            scored += tokens
            if generation is not None:
                scores, judge_scores = _generate_and_score(model, split, chosen, generation)
                rouge.extend(scores)
                judged.extend(judge_scores)
            continue
        with model.autocast():
            logits = model(**inputs, num_classes=num_classes).float()
        labels = to_device(split.labels[chosen], device)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
    if num_classes == 0:
        return EvalOutcome(correct, loss_sum, len(indices), scored,
                           float(np.sum(rouge)) if rouge else float("nan"),
                           float(np.sum(judged)) if judged else float("nan"))
    return EvalOutcome(correct, loss_sum, len(indices))


def _generate_and_score(model: AdapterModel, split: EncodedSplit, chosen: np.ndarray,
                        generation: GenerationSettings) -> tuple[list[float], list[float]]:
    ids, prompt_lengths = split.inputs["input_ids"], split.inputs["prompt_lengths"]
    prompts = [ids[i, : prompt_lengths[i]] for i in chosen]
    answers = [generation.decode(a) for a in model.generate(prompts, generation.max_new_tokens,
                                                              generation.pad_id, generation.eos_id)]
    references = [str(split.inputs["references"][i]) for i in chosen]
    scores = [rouge_l(ref, answer) for ref, answer in zip(references, answers, strict=True)]
    judge_scores: list[float] = []
    if generation.judge is not None:
        prompt_texts = [generation.decode(list(p)) for p in prompts]
        judge_scores = [float(s) for s in generation.judge(prompt_texts, references, answers)]
        if len(judge_scores) != len(answers):
            raise ValueError(f"train.judge returned {len(judge_scores)} scores for {len(answers)} answers")
    return scores, judge_scores
