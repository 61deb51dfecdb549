"""A serving bank: a run's cluster adapters side by side on one base, with the map from clients
to adapters and a router for examples from anywhere else (`fltac-ray export RUN --bank DIR`).

FL-TAC trains K adapters meant to be served together on one frozen base, as multi-LoRA serving
stacks do (vLLM, LoRAX, S-LoRA take a folder of PEFT adapters). The bank is that folder:

  DIR/cluster_<k>/   each adapter as exported (adapters/, runs/export.py): a PEFT folder
  DIR/bank.json      the manifest: the base and how to load it, each adapter's tasks, classes
                     and purity, and `clients`: client -> task -> adapter, the adapter each of
                     the run's clients ended its final round with (assignments.csv)

Routing. A client of the federation uses the adapter the manifest names for its task: the one
the server's clustering gave it. For anyone else (a new client, or a task the server never saw
from that client) there is no adapter of its own to compare, so the router scores each adapter
on a small labelled probe of the newcomer's examples and picks the lowest mean loss: IFCA's
cluster choice (Ghosh et al. 2020; algorithms/ifca.py does the same with the client's training
data), which needs only forward passes. Comparing the newcomer's own fine-tuned adapter with the
cluster adapters would need a round of local training first.

`AdapterBank` loads every adapter onto one base with peft's multi-adapter API (`load_adapter` +
`set_adapter`); a head outside peft (head.safetensors: mean-pooled encoders) is swapped with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fltac_ray.errors import RunFolderError
from fltac_ray.runs.files import holds_something, written_whole

BANK_FILE = "bank.json"
BANK_FORMAT = 1


def write_bank(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Copy `run_dir`'s exported peft adapters into the new or empty folder `out` with bank.json;
    returns the manifest. Refuses a run without peft adapters (FLoRAL's mixtures, a run that
    exported none) naming the folder."""
    from fltac_ray.runs.export import INFO_FILE

    adapters, out = Path(run_dir) / "adapters", Path(out)
    if not (adapters / "index.json").is_file():
        raise RunFolderError(run_dir, "has no adapters/index.json; give a finished run's directory")
    index = json.loads((adapters / "index.json").read_text())
    if not index or any(entry.get("format") != "peft" for entry in index):
        raise RunFolderError(run_dir, "exported no peft adapters (FLoRAL's mixtures are not peft LoRA); "
                             "a bank holds peft adapters only")
    if holds_something(out):
        raise RunFolderError(out, "--bank is not empty; give a new or empty folder")
    first = json.loads((adapters / index[0]["folder"] / INFO_FILE).read_text())
    clients: dict[str, dict[str, str]] = {}
    assignments = adapters / "assignments.csv"
    if assignments.is_file():
        for row in pd.read_csv(assignments).itertuples():
            for task in str(row.tasks).split("+"):
                clients.setdefault(str(int(row.client)), {})[task] = f"cluster_{int(row.cluster)}"
    manifest = {
        "format": BANK_FORMAT,
        "base": first["base"], "model": first["model"], "load_with": first["load_with"],
        "adapters": {entry["folder"]: {"tasks": str(entry["majority_task"]).split("+"),
                                       "purity": entry.get("purity"), "members": entry.get("members")}
                     for entry in index},
        "clients": clients,
        "router": "lowest mean loss on a labelled probe (IFCA's choice); clients of the run: `clients`",
    }
    with written_whole(out) as partial:
        for entry in index:
            shutil.copytree(adapters / entry["folder"], partial / entry["folder"])
        (partial / BANK_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


class AdapterBank:
    """Every adapter of a bank on one base (peft's load_adapter + set_adapter)."""

    def __init__(self, folder: str | Path) -> None:
        from peft import PeftModel
        from safetensors.torch import load_file

        from fltac_ray.models.adapter_model import peft_wrapping
        from fltac_ray.runs.export import (
            FEATURES,
            HEAD_FILE,
            IMAGE_CLASSIFIER,
            SEQUENCE_CLASSIFIER,
            ExportedClassifier,
            HubClassifier,
            load_base,
            read_info,
        )

        self.folder = Path(folder)
        path = self.folder / BANK_FILE
        if not path.is_file():
            raise RunFolderError(folder, f"has no {BANK_FILE}; write one with `fltac-ray export RUN --bank DIR`")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != BANK_FORMAT:
            raise RunFolderError(folder, f"{BANK_FILE} format = {self.manifest.get('format')!r}: this fltac-ray "
                                 f"reads format {BANK_FORMAT}")
        self.names = list(self.manifest["adapters"])
        first = self.folder / self.names[0]
        info = read_info(first)
        self.route_kind = info["load_with"]
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(load_base(first), str(first), adapter_name=self.names[0])
            for name in self.names[1:]:
                peft_model.load_adapter(str(self.folder / name), adapter_name=name)
        self.peft_model = peft_model
        self.heads: dict[str, dict[str, torch.Tensor]] = {}
        if self.route_kind in (SEQUENCE_CLASSIFIER, IMAGE_CLASSIFIER):
            self.model = HubClassifier(peft_model, info["num_labels"])
        elif self.route_kind == FEATURES:
            self.model = ExportedClassifier(peft_model, info["head_rows"], info["modality"], info["pooling"],
                                            info["image_size"], info["num_labels"])
            self.heads = {name: load_file(str(self.folder / name / HEAD_FILE)) for name in self.names}
        else:
            self.model = peft_model  # a code-built base (its task head is peft's modules_to_save) or a causal LM
        self.model.eval()
        self.active: str | None = None

    def adapter_for(self, client: int, task: str) -> str:
        """The adapter the run's client ended with for `task` (KeyError-free: a clear error)."""
        adapter = self.manifest["clients"].get(str(client), {}).get(task)
        if adapter is None:
            raise RunFolderError(self.folder, f"client {client} did not hold task {task!r} in this run; route its "
                                 "examples with AdapterBank.route(probe, labels)")
        return adapter

    def use(self, name: str) -> None:
        """Make `name` the active adapter (and its head, where the head is outside peft)."""
        if name not in self.manifest["adapters"]:
            raise RunFolderError(self.folder, f"has no adapter {name!r}; it has {self.names}")
        if name != self.active:
            self.peft_model.set_adapter(name)
            if self.heads:
                self.model.task_head.load_state_dict(self.heads[name])
            self.active = name

    @torch.no_grad()
    def logits(self, name: str, num_classes: int | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        """(batch, classes) logits of standard inputs through adapter `name`."""
        self.use(name)
        return self.model(num_classes=num_classes, **inputs)

    def losses(self, labels: torch.Tensor, num_classes: int | None = None, **inputs: torch.Tensor) -> dict[str, float]:
        """{adapter: mean cross-entropy on the labelled probe}."""
        return {name: float(torch.nn.functional.cross_entropy(self.logits(name, num_classes, **inputs).float(),
                                                               labels.long())) for name in self.names}

    def route(self, labels: torch.Tensor, num_classes: int | None = None, **inputs: torch.Tensor) -> str:
        """The adapter for examples from outside the run: the lowest mean loss on a labelled probe
        (IFCA's choice; ties go to the first adapter)."""
        losses = self.losses(labels, num_classes, **inputs)
        return min(self.names, key=lambda name: losses[name])
