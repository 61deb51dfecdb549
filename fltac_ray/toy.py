"""FL-TAC's toy study (paper Sec. 3.2, Fig. 3): one adapter per task vs one shared adapter.

Two regression tasks on random scalars x ~ U(-pi, pi): task 1 is y = sin(2x) + N(0, 0.1^2), task 2
the same curve phase-shifted by 0.5 with stronger noise, N(0, 0.3^2). A one-hidden-layer network
stands in for a LoRA adapter, its hidden width playing the rank. For each width we train
  per-task: one network per task, and
  shared:   one network trained on both tasks' data together,
both seeing only the scalar x, as in the paper (an adapter shared by tasks is not told the task),
for `epochs` full-batch Adam steps and report test MSE per task and on average.

The paper states the tasks (scalar inputs, a noisy sinusoid, task 2 phase-shifted by 0.5 with
noisier labels), the network (one hidden layer of variable width) and the 1,000 epochs; it gives
no input range, frequency, noise levels, sample sizes, optimiser or seeds, which are ours above.
What `fltac-ray toy` (widths 1-64, 3 seeds) measures with them:
  - per-task networks have the lower mean test MSE at every width (0.461 vs 0.466 at width 1,
    0.074 vs 0.101 at 4, 0.053 vs 0.085 at 16), and a gap remains at high width (0.053 vs 0.084
    at 64), as in Fig. 3;
  - both fall most between widths 2 and 4 (the paper: between ranks 8 and 16);
  - two per-task networks of half the width (the shared network's parameter budget) beat the
    shared one from width 8 up (0.074 vs 0.088) and lose below (0.335 vs 0.101 at width 4),
    where the paper has them win below 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

PHASE_SHIFT = 0.5
NOISE = (0.1, 0.3)
FREQUENCY = 2.0


@dataclass
class ToyData:
    x_train: list[torch.Tensor]  # per task: (n, 1)
    y_train: list[torch.Tensor]
    x_test: list[torch.Tensor]
    y_test: list[torch.Tensor]


def make_tasks(seed: int, n_train: int = 200, n_test: int = 1000) -> ToyData:
    rng = np.random.default_rng(seed)
    parts: dict[str, list[torch.Tensor]] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    for task, noise in enumerate(NOISE):
        phase = PHASE_SHIFT * task
        for split, n in (("train", n_train), ("test", n_test)):
            x = rng.uniform(-np.pi, np.pi, size=(n, 1))
            y = np.sin(FREQUENCY * x + phase) + rng.normal(0.0, noise, size=(n, 1))
            parts[f"x_{split}"].append(torch.tensor(x, dtype=torch.float32))
            parts[f"y_{split}"].append(torch.tensor(y, dtype=torch.float32))
    return ToyData(**parts)


def _network(inputs: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, 1))


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = torch.mean((net(x) - y) ** 2)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _mse(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.mean((net(x) - y) ** 2))


def per_task_errors(data: ToyData, width: int, epochs: int, lr: float, seed: int) -> list[float]:
    errors = []
    for task in range(len(data.x_train)):
        torch.manual_seed(seed * 1000 + task)
        net = _network(1, width)
        _fit(net, data.x_train[task], data.y_train[task], epochs, lr)
        errors.append(_mse(net, data.x_test[task], data.y_test[task]))
    return errors


def shared_errors(data: ToyData, width: int, epochs: int, lr: float, seed: int) -> list[float]:
    torch.manual_seed(seed * 1000 + 999)
    net = _network(1, width)
    _fit(net, torch.cat(data.x_train), torch.cat(data.y_train), epochs, lr)
    return [_mse(net, x, y) for x, y in zip(data.x_test, data.y_test, strict=True)]


def toy_table(widths: list[int], seeds: int, epochs: int, lr: float = 0.01) -> pd.DataFrame:
    """One row per width: test MSE per task and on average, per-task vs shared, mean over seeds."""
    torch.set_num_threads(1)
    rows = []
    for width in widths:
        per_task, shared, half = [], [], []
        for seed in range(seeds):
            data = make_tasks(seed)
            per_task.append(per_task_errors(data, width, epochs, lr, seed))
            shared.append(shared_errors(data, width, epochs, lr, seed))
            if width >= 2:
                half.append(per_task_errors(data, width // 2, epochs, lr, seed))
        per_task_mean, shared_mean = np.mean(per_task, axis=0), np.mean(shared, axis=0)
        rows.append({
            "width": width,
            "per_task_task1": per_task_mean[0], "per_task_task2": per_task_mean[1],
            "per_task_mean": float(per_task_mean.mean()),
            "shared_task1": shared_mean[0], "shared_task2": shared_mean[1],
            "shared_mean": float(shared_mean.mean()),
            # two per-task networks of half the width: the same hidden units as one shared network
            "per_task_half_width_mean": float(np.mean(half)) if half else float("nan"),
        })
    return pd.DataFrame(rows)


def plot_table(table: pd.DataFrame, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(table["width"], table["per_task_mean"], "o-", label="one network per task (width w each)")
    ax.plot(table["width"], table["shared_mean"], "s-", label="one shared network (width w)")
    half = table.dropna(subset=["per_task_half_width_mean"])
    ax.plot(half["width"], half["per_task_half_width_mean"], "^--",
            label="one network per task (width w/2 each)")
    ax.axhline(float(np.mean(np.square(NOISE))), color="grey", lw=0.8, ls=":", label="noise floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("hidden width w (plays the LoRA rank)")
    ax.set_ylabel("average test MSE over the two tasks")
    ax.set_title("Toy study (FL-TAC Fig. 3): task-specific vs shared")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_toy_study(out: str | Path, widths: list[int], seeds: int, epochs: int) -> pd.DataFrame:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = toy_table(widths, seeds, epochs)
    table.to_csv(out / "toy_sinusoid.csv", index=False)
    picture = plot_table(table, out / "toy_sinusoid.png")
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 120):
        print(table.to_string(index=False))
    print(f"wrote {out / 'toy_sinusoid.csv'}" + (f" and {picture}" if picture else
                                                  " (install matplotlib for the plot)"))
    return table
