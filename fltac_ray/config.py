"""Typed, validated experiment configuration.

An experiment YAML holds only what differs from the defaults below; `--set key=value` overrides
apply on top. Every rule is checked when the config is built, so a bad value fails before Ray
starts, with the field, the value and what is allowed (`ConfigError`).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fltac_ray.data.registry import TASKS, TaskSpec, task_name_problem
from fltac_ray.data.types import DATA_FILE_FORMATS
from fltac_ray.errors import ConfigError, ConfigIssue, ExperimentFileError
from fltac_ray.models.registry import MODELS, default_targets, is_known_model

# The schema imports no algorithm: the algorithm registry reaches back here (every algorithm's
# hooks take an ExperimentConfig), so it installs its name resolver when it is imported instead,
# and importing any fltac_ray module imports it first (fltac_ray/__init__.py). The task and model
# registries are plain tables that import nothing of the package; the schema reads them directly.
_algorithm_resolver: Callable[[str], type] | None = None


def install_algorithm_resolver(resolve: Callable[[str], type]) -> None:
    """Called by fltac_ray/algorithms/registry.py: `resolve(name)` returns the algorithm class or
    raises ValueError saying what is allowed."""
    global _algorithm_resolver
    _algorithm_resolver = resolve


def resolve_algorithm_name(name: str) -> type:
    """The class behind an `algorithm:` value, through the installed registry."""
    if _algorithm_resolver is None:  # only if fltac_ray/__init__.py was bypassed
        raise RuntimeError("no algorithm registry installed: import fltac_ray before fltac_ray.config")
    return _algorithm_resolver(name)


# Where settings of earlier versions went: they are algorithm options now. Run folders saved
# before the move (and older experiment files) still load and resume: each is moved under
# `algorithm:`, where the algorithm's Options model checks it like any option.
MOVED_TO_ALGORITHM = {
    ("federation", "n_clusters"): "n_clusters", ("federation", "clustering_backend"): "clustering_backend",
    ("federation", "kmeans_n_init"): "kmeans_n_init", ("federation", "weighting"): "weighting",
    ("federation", "aggregation"): "aggregation", ("federation", "trim_fraction"): "trim_fraction",
    ("federation", "fedit_budget"): "budget",
}


def _move_to_algorithm(raw: dict[str, Any]) -> dict[str, Any]:
    """Settings of earlier versions (MOVED_TO_ALGORITHM, the `floral:` section) -> options under
    `algorithm:`. The same option given in both places with different values is an error."""
    moved: dict[str, tuple[str, Any]] = {}  # option -> (where it was given, value)
    for (section, key), option in MOVED_TO_ALGORITHM.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section] = dict(raw[section])
            moved[option] = (f"{section}.{key}", raw[section].pop(key))
    if isinstance(raw.get("floral"), dict):
        moved.update({option: (f"floral.{option}", value) for option, value in raw.pop("floral").items()})
    if not moved:
        return raw
    given = raw.get("algorithm", ExperimentConfig.model_fields["algorithm"].default)
    given = dict(given) if isinstance(given, dict) else {"name": given}
    for option, (where, value) in moved.items():
        if option in given and given[option] != value:
            raise ValueError(f"{where} = {value!r}: also given as algorithm.{option} = {given[option]!r}; "
                             f"keep only algorithm.{option} (where the algorithm's options live now)")
        given.setdefault(option, value)
    raw["algorithm"] = given
    return raw


def _leaf_types(annotation: Any) -> set[Any]:
    """int | None -> {int, NoneType}; Literal["a", 1] -> {"a", 1}; list[int] -> {list}."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return set(typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        return set().union(*(_leaf_types(arg) for arg in typing.get_args(annotation)))
    return {origin or annotation}


class _Section(BaseModel):
    # extra="forbid": a typo in a key is an error naming the key, never a silently ignored setting.
    # allow_inf_nan=False: .inf / .nan in a float field (a learning rate, an alpha) is refused.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: Any) -> Any:
        """YAML's true/false are ints to Python: `rounds: true` would be 1 round. A number field
        takes a number (fields that also allow a bool keep it)."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
            if (int in leaves or float in leaves) and bool not in leaves and True not in leaves:
                raise ValueError(f"{value} is a boolean; give a number")
        return value


class ConceptShiftConfig(_Section):
    """FLoRAL's concept shift: one base task becomes C cluster tasks; client k is in cluster k mod C."""

    kind: Literal["rotation", "label_shift", "rank1"] = Field(
        description="rotation: images of cluster c turned by 360 c / C degrees; label_shift: "
        "y -> (y + c) mod classes; rank1: a rank-1 shift of the teacher (synthetic_linear/mlp)."
    )
    clusters: int = Field(default=4, ge=2, description="C, the number of clusters (tasks).")


class CustomTaskConfig(_Section):
    """A task of your own, declared in YAML (data.custom_tasks.<name>): examples from local files
    (`train`, optionally `test`) or a Hugging Face dataset (`dataset`: a hub id, a data folder or
    a `save_to_disk` folder), read by the named columns."""

    kind: Literal["text", "text_pair", "image", "instruction"] = Field(
        default="text", description="text, text_pair (two text columns), image, or instruction.")
    train: str | None = Field(default=None, description="Training file (.csv/.tsv/.json/.jsonl/.parquet).")
    test: str | None = Field(
        default=None, description="Test file; without it the test examples are cut from train.")
    dataset: str | None = Field(
        default=None, description="A Hugging Face dataset instead of files: a hub id, a folder of data "
        "files, or a folder written by Dataset.save_to_disk.")
    subset: str | None = Field(default=None, description="The dataset's configuration name (e.g. GLUE's sst2).")
    train_split: str = Field(default="train", description="The dataset's training split.")
    test_split: str | None = Field(
        default=None, description="The dataset's test split; without it the test examples are cut from "
        "train_split.")
    text: str | list[str] = Field(
        default="text", description="The text column (text) or the two columns of a pair (text_pair).")
    label: str = Field(default="label", description="The label column (classification kinds).")
    image: str = Field(
        default="image", description="The image column: images (datasets' Image) or paths relative to the file.")
    instruction: str = Field(default="instruction", description="The instruction column (instruction kind).")
    context: str | None = Field(default=None, description="An optional context column (instruction kind).")
    response: str = Field(default="response", description="The reference response column (instruction kind).")
    classes: list[str] | None = Field(
        default=None, min_length=2, description="Class names in label order; labels may be these names "
        "or their indices 0..len-1.")
    num_classes: int | None = Field(
        default=None, ge=2, description="The number of classes when labels are the indices 0..n-1 "
        "(without class names).")
    description: str = Field(default="", description="A line for listings.")

    @model_validator(mode="after")
    def _complete(self) -> CustomTaskConfig:
        if (self.train is None) == (self.dataset is None):
            raise ValueError("give either train (a file) or dataset (a Hugging Face dataset), not "
                             f"{'both' if self.train else 'neither'}")
        if self.dataset is not None and self.test is not None:
            raise ValueError("test is a file for train files; a dataset names its test split in test_split")
        if self.train is not None and self.test_split is not None:
            raise ValueError("test_split is for a dataset; with train files give test (a file)")
        for role in ("train", "test"):
            path = getattr(self, role)
            if path is not None and Path(path).suffix.lower() not in DATA_FILE_FORMATS:
                raise ValueError(f"{role} = {path!r}: unsupported file type; use one of {list(DATA_FILE_FORMATS)}")
        if self.kind in ("text", "text_pair") and len(self.text_columns) != (1 if self.kind == "text" else 2):
            raise ValueError(f"text = {self.text!r}: a {self.kind} task reads "
                             f"{'one text column' if self.kind == 'text' else 'two text columns, e.g. [question, answer]'}")
        if self.kind == "instruction":
            if self.classes is not None or self.num_classes is not None:
                raise ValueError("an instruction task has no classes: drop classes / num_classes")
        elif self.classes is None and self.num_classes is None:
            raise ValueError("give classes (the class names in label order) or num_classes (labels 0..n-1)")
        elif self.classes is not None and self.num_classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"classes has {len(self.classes)} names but num_classes = {self.num_classes}")
        return self

    @property
    def text_columns(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)

    @property
    def class_names(self) -> list[str]:
        if self.kind == "instruction":
            return []
        return list(self.classes) if self.classes is not None else [str(i) for i in range(self.num_classes or 0)]

    def spec(self, name: str) -> TaskSpec:
        """The task as the registry describes tasks."""
        where = self.dataset if self.dataset is not None else self.train
        return TaskSpec(name, len(self.class_names), "custom", self.description or f"your task from {where}",
                        self.kind)


class DataConfig(_Section):
    # Before `tasks`: pydantic validates in order, so `tasks` may name the tasks declared here.
    custom_tasks: dict[str, CustomTaskConfig] = Field(
        default_factory=dict,
        description="Your own tasks from local files or Hugging Face datasets, by name: "
        "{name: {train: file, test: file, text: column, label: column, classes: [...]}} (see the "
        "docs/algorithms.md, 'Your own data').",
    )
    tasks: list[str] = Field(
        default=["wordnet_noun_supersense", "wordnet_verb_supersense", "wordnet_pos"],
        description="Task names from the task registry; one adapter per (client, task) under FL-TAC.",
    )
    num_clients: int = Field(default=10, ge=1, description="Simulated clients in the federation.")
    dirichlet_alpha: float = Field(
        default=0.5, gt=0, description="Concentration of the per-task Dirichlet split over clients."
    )
    min_share: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Client shares of a task below this are dropped and the rest renormalised; "
        "None: 0.1 / num_clients (the paper's 0.01 at its 10 clients), so that a large federation "
        "keeps data on nearly every client.",
    )
    train_per_task: Annotated[int, Field(ge=1)] | Literal["all"] = Field(
        default=2000,
        description="Training examples drawn per task; all: the task's whole training set (the "
        "papers' full data sets; packaged and hub tasks, not generated ones).",
    )
    test_per_task: int = Field(default=300, ge=1, description="Test examples drawn per task.")
    max_length: int = Field(default=32, ge=4, le=4096, description="Token limit per text example.")
    wordnet_dir: str = Field(
        default="/usr/share/wordnet", description="Folder of WordNet's data.{noun,verb,adj,adv}."
    )
    fortunes_dir: str = Field(
        default="/usr/share/games/fortunes", description="Folder of the fortunes collections."
    )
    fashion_mnist_dir: str = Field(
        default="/usr/share/datasets/fashion-mnist",
        description="Folder of Fashion-MNIST's four IDX .gz files.",
    )
    feature_dim: int = Field(default=16, ge=1, description="Input size of the synthetic vector tasks.")
    files: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Hub tasks from local files instead of the hub: {task: {train: path, test: "
        "path}} in the hub's format (.csv/.tsv/.json/.jsonl/.parquet); Dolly needs only train.",
    )
    concept_shift: ConceptShiftConfig | None = Field(
        default=None, description="FLoRAL's concept-shift scenario over a single base task."
    )

    @property
    def resolved_min_share(self) -> float:
        """data.min_share, or 0.1 / num_clients when unset: a client's expected share of a task
        is 1 / num_clients, and a fixed threshold (0.01) would empty most clients of a large
        federation (500 clients, Dirichlet(0.5), 5 tasks of 20,000 examples: 63 of 500 clients
        keep data at 0.01, 499 at 0.1 / 500)."""
        return self.min_share if self.min_share is not None else 0.1 / self.num_clients

    @field_validator("custom_tasks")
    @classmethod
    def _custom_task_names(cls, custom: dict[str, CustomTaskConfig]) -> dict[str, CustomTaskConfig]:
        for name in custom:
            if name in TASKS:
                raise ValueError(f"'{name}' is a registered task; give your task another name")
            if (problem := task_name_problem(name)) is not None:
                raise ValueError(f"'{name}': {problem}")
        return custom

    @field_validator("tasks")
    @classmethod
    def _known_unique_tasks(cls, tasks: list[str], info: Any) -> list[str]:
        if not tasks:
            raise ValueError("at least one task is needed")
        custom = info.data.get("custom_tasks", {})
        specs = {t: custom[t].spec(t) if t in custom else TASKS.get(t) for t in tasks}
        unknown = [t for t, spec in specs.items() if spec is None]
        if unknown:
            hint = f"; your own: {sorted(custom)}" if custom else " (declare your own in data.custom_tasks)"
            raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASKS)}{hint}")
        if len(set(tasks)) != len(tasks):
            raise ValueError("task names must be unique")
        kinds = {spec.modality for spec in specs.values()}
        if len(kinds) > 1:
            by = {t: spec.modality for t, spec in specs.items()}
            raise ValueError(f"tasks of one run must share a model family; these mix {by}")
        return tasks

    def spec(self, task: str) -> TaskSpec:
        """The registry entry of a task (a concept-shift cluster task `base@...`: its base's),
        or of one declared in data.custom_tasks."""
        base = task.split("@")[0]
        return self.custom_tasks[base].spec(base) if base in self.custom_tasks else TASKS[base]

    @property
    def modality(self) -> str:
        return self.spec(self.tasks[0]).modality

    @model_validator(mode="after")
    def _files_and_shift(self) -> DataConfig:
        for task, entry in self.files.items():
            if task not in self.tasks or self.spec(task).source != "hf":
                hub = [t for t in self.tasks if self.spec(t).source == "hf"]
                raise ValueError(f"data.files = {{{task}: ...}}: '{task}' is not a hub task of this "
                                 f"run (hub tasks here: {hub})")
            needed = {"train"} if task.startswith("dolly_") else {"train", "test"}
            if not needed <= set(entry) or set(entry) - {"train", "test"}:
                raise ValueError(f"data.files.{task} = {entry}: needs keys {sorted(needed)} "
                                 "(and nothing else)")
        generated = [t for t in self.tasks if self.spec(t).source == "synthetic" and self.spec(t).loader is None]
        if self.train_per_task == "all" and generated:
            raise ValueError(f"data.train_per_task = 'all': tasks {generated} are generated without "
                             "end; give a number")
        shift = self.concept_shift
        if shift is not None:
            if len(self.tasks) != 1:
                raise ValueError(f"data.concept_shift = {shift.kind}: needs exactly one base task in "
                                 f"data.tasks, got {self.tasks}")
            spec = self.spec(self.tasks[0])
            allowed = {"rotation": spec.kind == "image",
                       "label_shift": spec.num_classes > 0,
                       "rank1": spec.name in ("synthetic_linear", "synthetic_mlp")}
            if not allowed[shift.kind]:
                rule = {"rotation": "an image task", "label_shift": "a classification task",
                        "rank1": "synthetic_linear or synthetic_mlp"}[shift.kind]
                raise ValueError(f"data.concept_shift = {shift.kind}: needs {rule}, got {spec.name}")
            if shift.clusters > self.num_clients:
                raise ValueError(f"data.concept_shift = {shift.clusters}: more clusters than "
                                 f"data.num_clients ({self.num_clients})")
        return self

    @property
    def train_limit(self) -> int | None:
        """train_per_task as a number; None: all of each task's training examples."""
        return None if self.train_per_task == "all" else self.train_per_task

    @property
    def task_names(self) -> list[str]:
        """The run's tasks: data.tasks, or under a concept shift one derived task per cluster."""
        shift = self.concept_shift
        if shift is None:
            return list(self.tasks)
        base = self.tasks[0]
        if shift.kind == "rotation":
            return [f"{base}@rot{round(360 * c / shift.clusters)}" for c in range(shift.clusters)]
        suffix = "shift" if shift.kind == "label_shift" else "rank1_"
        return [f"{base}@{suffix}{c}" for c in range(shift.clusters)]


class RankProfile(_Section):
    """Heterogeneous LoRA ranks (models/ranks.py): each client trains at a rank drawn from a rank
    set, every adapter padded to model.lora.rank (the set's largest)."""

    distribution: Literal["homo", "random", "heavy_tail", "heavy_tail_strong", "normal", "explicit"] = Field(
        default="random",
        description="How clients get ranks (FlexLoRA's names): homo (all the largest), random (uniform), heavy_tail "
        "(85% the smallest), heavy_tail_strong (85% the largest), normal (around the middle), explicit (per_client).")
    ranks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1,
                             description="The rank set; its largest must be model.lora.rank.")
    per_client: list[int] | None = Field(
        default=None, description="distribution explicit: one rank per client (data.num_clients of them).")

    @model_validator(mode="after")
    def _ranks_positive(self) -> RankProfile:
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks = {self.ranks}: every rank must be at least 1")
        if self.per_client is not None and self.distribution != "explicit":
            raise ValueError(f"per_client: only used with distribution: explicit (here {self.distribution!r})")
        if self.distribution == "explicit" and self.per_client is None:
            raise ValueError("distribution = 'explicit': give per_client, one rank per client")
        return self


class LoraConfig(_Section):
    rank: int = Field(default=1, ge=1, description="LoRA rank r (FL-TAC uses extremely low ranks); with a "
                      "rank_profile, the largest rank, to which every adapter is padded.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        default=None, min_length=1,
        description="Module names that receive LoRA; default by model family: query,value "
        "(BERT), q_proj,v_proj (ViT, Llama), _expand_conv,_project_conv (EfficientNet), fc1,fc2 (MLP).",
    )
    rank_profile: RankProfile | None = Field(
        default=None,
        description="Heterogeneous ranks: a rank per client (models/ranks.py, docs/ranks.md); "
        "null: every client at rank.")


class ModelConfig(_Section):
    name: str = Field(
        default="minilm",
        description=f"A registry name ({', '.join(MODELS)}), a Hugging Face id or a local path.",
    )
    pooling: Literal["mean", "cls", "pooler"] = Field(
        default="mean",
        description="How token states become the classifier input: their mean, the first (CLS) "
        "token, or the backbone's own pretrained pooler with its classifier dropout (text models "
        "that have one, e.g. BERT: what BertForSequenceClassification feeds its head).",
    )
    image_size: int | None = Field(
        default=None, ge=8,
        description="Side images are resized to (default: the model's own, 64 for EfficientNet).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    head: Literal["trained", "frozen"] = Field(
        default="trained",
        description="The classifier head: trained, uploaded and clustered with the LoRA tensors "
        "(this project's default), or frozen at its seeded initialisation and never sent (the "
        "FL-TAC authors' ViT runs: peft FEATURE_EXTRACTION leaves it untrained).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Precision of the frozen base, which runs under autocast in it (adapters, "
        "head and optimizer state stay float32; float16 trains with loss scaling). auto: "
        "float32 on the CPU, bfloat16 on CUDA (float16 on GPUs without bfloat16).",
    )
    base_dropout: bool = Field(
        default=True,
        description="Dropout inside the frozen base (embeddings, attention, layer outputs) as "
        "its config sets it, as the papers' recipes train (peft leaves the base in train mode). "
        "false: off, which saves its random draws (a float32 batched pass on the CPU took 0.92x "
        "the time; docs/scale.md); "
        "the LoRA dropout (model.lora.dropout) and the head's are kept.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute the base's layer activations in backward instead of keeping "
        "them (Hugging Face models): less activation memory per token, ~1/3 more compute.",
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        default="none",
        description="Load the frozen base's linear layers quantised with bitsandbytes (CUDA "
        "only; pip install 'fltac-ray[quant]'): 8bit ~1 byte, 4bit (NF4) ~0.5 byte per weight.",
    )

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if not is_known_model(name):
            raise ValueError(
                f"unknown model; use one of {sorted(MODELS)}, a Hugging Face id (org/name) "
                "or an existing local folder"
            )
        return name


class TrainConfig(_Section):
    local_steps: int = Field(default=15, ge=1, description="Gradient steps per task per round (tau).")
    batch_size: int = Field(default=8, ge=1, description="Examples per local step.")
    lr: float = Field(default=2e-3, gt=0, description="AdamW learning rate (eta).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    eval_batch_size: int = Field(default=128, ge=1, description="Examples per evaluation batch.")
    eval_round_0: bool = Field(
        default=True,
        description="Evaluate every client's starting adapter (the pre-trained model, zero LoRA "
        "update) before round 1: round 0 of metrics.csv and clients.csv, the summary's start column.",
    )
    eval_every: int = Field(
        default=1, ge=1, description="Evaluate every k rounds (the last round is always evaluated)."
    )
    max_new_tokens: int = Field(
        default=32, ge=1, description="Instruction tasks: greedy tokens generated for ROUGE-L."
    )
    generate: bool = Field(
        default=True, description="Instruction tasks: generate answers for ROUGE-L (and the judge)."
    )
    judge: str | None = Field(
        default=None,
        description="Instruction tasks: 'module:function' scoring (prompts, references, answers) "
        "-> scores in [0, 1], e.g. a judge model of yours; logged as judge_score.",
    )

    @field_validator("judge")
    @classmethod
    def _judge_shape(cls, value: str | None) -> str | None:
        if value is not None:
            module, sep, func = value.partition(":")
            if not (sep and module and func.isidentifier()):
                raise ValueError("expected 'package.module:function'")
        return value


class AttackConfig(_Section):
    """Malicious clients for robustness studies (server/attacks.py has each kind's definition)."""

    kind: Literal["none", "sign_flip", "scaling", "random", "cross_task"] = Field(
        default="none",
        description="What malicious clients send: none, sign_flip (-scale x v), scaling (scale x v), "
        "random (Gaussian, scale x std(v)) or cross_task (an adapter trained on another task's data).",
    )
    fraction: float = Field(
        default=0.0, ge=0, lt=1,
        description="Share of the clients that are malicious (round(fraction x num_clients), seeded).",
    )
    scale: float = Field(default=10.0, gt=0, description="sign_flip, scaling, random: the factor.")


class FederationConfig(_Section):
    client_fraction: float = Field(
        default=1.0, gt=0, le=1, description="Share of clients sampled each round, in (0, 1]."
    )
    min_completion_rate: float = Field(
        default=0.5, ge=0, le=1,
        description="Reject a round (state unchanged) when fewer sampled clients than this share "
        "delivered their updates.",
    )
    screening: Literal["none", "norm", "neighbours"] = Field(
        default="none",
        description="Drop outlying uploads before clustering or averaging (server/screening.py): by "
        "norm, or by distance to the k-th nearest other upload (neighbours).",
    )
    screening_threshold: float = Field(
        default=3.0, gt=0,
        description="An upload is dropped when its score exceeds the round's median by this many "
        "robust deviations (1.4826 MAD).",
    )
    screening_neighbours: int | None = Field(
        default=None, ge=1,
        description="k of the neighbours rule; default: uploads // (2 x clusters), at least 1.",
    )
    screening_stop: bool = Field(
        default=False,
        description="End the run (before the round is committed) when screening may not hold: a group "
        "of uploads sits apart from the rest and was kept (server/screening.py); else it is said and "
        "counted in rounds.csv suspected_kept.",
    )
    attack: AttackConfig = Field(default_factory=AttackConfig)


class EngineConfig(_Section):
    backend: Literal["ray", "local"] = Field(
        default="ray",
        description="ray: workers and the server as Ray actors; local: the same round loop in "
        "this process without Ray (debugging, the sequential baseline). Same results.",
    )
    ray_address: str | None = Field(
        default=None, description="Existing Ray cluster to join; None starts Ray on 127.0.0.1."
    )
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs for a Ray we start.")
    num_gpus: float | None = Field(
        default=None, ge=0, description="GPUs for a Ray we start (declares them to the scheduler)."
    )
    dashboard: bool = Field(default=False, description="Start Ray's dashboard with a Ray we start.")
    dashboard_host: str = Field(
        default="127.0.0.1",
        description="Dashboard bind address. Anything but loopback exposes Ray's job API, which "
        "runs code for whoever reaches it: keep 127.0.0.1 and use an SSH tunnel.",
    )
    dashboard_port: int = Field(default=8265, ge=1, le=65535, description="Dashboard port.")
    metrics: bool = Field(
        default=True, description="Export live run metrics through ray.util.metrics (Prometheus)."
    )
    num_workers: int | None = Field(
        default=None, ge=1, description="Client worker actors; default: as many as resources allow."
    )
    clients_per_actor: int | None = Field(
        default=None, ge=1,
        description="Size the pool as one worker per this many active clients (1: one actor per "
        "client); workers hold no client state, so any worker runs any client's jobs."
    )
    batched_training: bool = Field(
        default=True,
        description="Train the adapters a worker hosts together, one forward/backward per local "
        "step over the shared base, each sample through its own adapter, and evaluate "
        "classification tasks the same way (FLoRAL always works one adapter at a time). Same "
        "results to float rounding with dropout off; off: one by one.",
    )
    max_batched_adapters: int | Literal["auto"] = Field(
        default="auto",
        description="Most adapters per combined pass (activations: this x train.batch_size "
        "examples). auto: 32 on the CPU; on CUDA as many as the GPU's free memory holds, from "
        "the activation bytes per example each worker measures at start on its longest examples "
        "(client/gpu_fit.py), recorded in the run's decisions.json.",
    )
    max_pass_examples: int = Field(
        default=128, ge=1,
        description="Most examples in one batched training step (adapters in a pass x "
        "train.batch_size): bounds a worker's activation memory (a step's length buckets run "
        "their backward passes one after another); a pass then holds fewer adapters than "
        "max_batched_adapters. Also the examples of one batched evaluation forward pass.",
    )
    min_passes: int | None = Field(
        default=None, ge=1,
        description="Cut each round's training into at least this many passes (batched "
        "training), so that many workers share it. Default: the number of workers at the start, "
        "recorded in the run's decisions.json. Results depend on the passes, never on which worker runs them.",
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Ray CPUs per client worker.")
    gpus_per_worker: float | None = Field(
        default=None, ge=0,
        description="Ray GPUs per client worker, at most 1 (a worker computes on one GPU); "
        "fractions share one GPU, each worker with its own copy of the base and that fraction of "
        "the GPU's memory for its passes (a preflight refuses layouts that do not fit). Default: "
        "1 (one worker per GPU, training its adapters batched) when the cluster has GPUs, else 0.",
    )
    coordinator_cpus: float = Field(
        default=0.0, ge=0, description="Ray CPUs reserved for the coordinator actor."
    )
    coordinator_gpus: float = Field(
        default=0.0, ge=0,
        description="Ray GPUs reserved for the coordinator (a fraction is fine): cuML K-means "
        "runs on it (FL-TAC's algorithm.clustering_backend auto/cuml); with 0 it sees no GPU.",
    )
    gpu_memory_gib: float | None = Field(
        default=None, gt=0,
        description="Memory of one GPU of the worker nodes, for the fit preflight before any "
        "actor starts; default: read from this machine's GPU or the nodes' accelerator type. "
        "Workers check their real GPU again at start.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Torch device in workers: auto is cuda only when Ray assigned the worker a "
        "GPU (workers without one see none).",
    )
    tf32: bool = Field(
        default=True,
        description="float32 matmuls and convolutions on CUDA in TensorFloat-32 (Ampere and newer: "
        "several times faster, 10-bit mantissa, float32 range); false: full float32. No effect "
        "on the CPU or on bfloat16/float16 matmuls.",
    )
    deterministic: bool = Field(
        default=False,
        description="torch's deterministic algorithms and cuBLAS's fixed workspace in every worker: "
        "on CUDA the same pass gives the same bits every time (same GPU model and software), "
        "which recovery and resume need to reproduce an uninterrupted run exactly; costs speed. "
        "The CPU is deterministic without it.",
    )
    actor_timeout_s: float = Field(
        default=1800.0, gt=0, description="Longest wait for one actor call before the run fails."
    )
    reserve_timeout_s: float = Field(
        default=900.0, gt=0,
        description="Longest wait for the cluster to provide the worker pool (a placement group of "
        "one bundle per worker) before the run fails; on a cluster joined with engine.ray_address "
        "the autoscaler adds nodes meanwhile.",
    )
    base_cache_dir: str | None = Field(
        default=None,
        description="Folder on each node where its first worker writes the frozen base for the "
        "node's other workers (and later runs) to memory-map; None: <node temp dir>/fltac-ray/bases. "
        "The driver never loads the base.",
    )
    checkpoint_every: int = Field(
        default=1, ge=0,
        description="Checkpoint every k rounds (0: never); what --resume continues from.",
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Newest checkpoints kept on disk.")
    max_retries: int = Field(
        default=1, ge=0,
        description="Retries of a lost worker's pass (on another worker) before its clients count as failed."
    )
    kill_worker_at: tuple[int, int] | None = Field(
        default=None,
        description="Fault injection for testing recovery: [worker, round] kills that worker "
        "right after its training for that round is submitted.",
    )

    @field_validator("gpus_per_worker", "coordinator_gpus")
    @classmethod
    def _ray_gpu_fraction(cls, value: float | None) -> float | None:
        # Ray accepts fractions below one GPU, or whole GPUs, never 1.5. A worker computes on
        # one device, and the coordinator's K-means on one GPU: a second GPU would sit idle.
        if value is not None and value > 1:
            raise ValueError("must be a fraction in [0, 1]: a worker (and the coordinator) computes on one "
                             "GPU; for more GPUs per node use more workers (the default: one per GPU)")
        return value


class ReportConfig(_Section):
    """What a run keeps for its report (fltac-ray report; reporting/)."""

    adapter_snapshots: int = Field(
        default=4, ge=0,
        description="Rounds, evenly spaced with the first and last included, at which the "
        "uploaded adapters are saved to snapshots/ for the report's UMAP figure (paper Fig. 4); "
        "0: none.",
    )
    snapshot_max_adapters: int = Field(
        default=500, ge=2,
        description="Most adapters kept per snapshot; beyond it a seeded uniform sample (disk: "
        "this x adapter size x 4 bytes per snapshot).",
    )


class PrivacyConfig(_Section):
    """Differential privacy (fltac_ray/privacy/, docs/privacy.md)."""

    mode: Literal["none", "client_local", "client_central", "example"] = Field(
        default="none",
        description="client_local / client_central: client-level DP. Each client clips its update (upload minus "
        "what it would send untrained) to clip_norm; client_local: and adds Gaussian noise before uploading (the "
        "server clusters and averages noised uploads); client_central: the server adds the noise to every group "
        "mean (DP-FedAvg). example: example-level DP-SGD in local training (Poisson-sampled batches, each "
        "example's gradient clipped to clip_norm, Gaussian noise on every step's sum).",
    )
    clip_norm: float = Field(default=1.0, gt=0, description="C: the L2 bound of each upload's update (client "
                             "modes) or of each example's gradient (example).")
    noise_multiplier: float | None = Field(
        default=None, ge=0,
        description="z: noise N(0, (z C)^2) per coordinate of each upload (example: of each step's summed "
        "gradient); unset: calibrated from target_epsilon.",
    )
    target_epsilon: float | None = Field(
        default=None, gt=0,
        description="The budget: calibrates noise_multiplier when it is unset; with a given multiplier the run "
        "stops before the round that would exceed it.",
    )
    delta: float | None = Field(default=None, gt=0, lt=1, description="delta of (epsilon, delta); default 1 / "
                                "clients (client modes) or 1 / training examples of the federation (example).")
    accountant: Literal["rdp", "pld"] = Field(
        default="rdp", description="dp-accounting's accountant: Renyi DP (rdp) or privacy loss distributions (pld).")
    adaptive_clipping: bool = Field(
        default=False,
        description="client_central: clip_norm is only the start; after each round the server moves it "
        "geometrically toward the target_quantile of the update norms, estimated from a noised count of the "
        "uploads within the bound (Andrew et al., NeurIPS 2021).")
    target_quantile: float = Field(default=0.5, gt=0, lt=1,
                                   description="adaptive_clipping: the share of updates the bound should leave unclipped.")
    clip_learning_rate: float = Field(default=0.2, gt=0, description="adaptive_clipping: eta_C of C <- C exp(-eta_C "
                                      "(unclipped share - target_quantile)).")
    quantile_share: float = Field(
        default=0.1, gt=0, lt=1,
        description="adaptive_clipping: the share of each round's privacy cost (as 1/z^2) spent on the noised count; "
        "the means' noise multiplier becomes z / sqrt(1 - share), so noise_multiplier z is what is accounted.")
    sketch: Literal["none", "block_norms", "projection"] = Field(
        default="none",
        description="client_local: each upload also carries a noised sketch that FL-TAC clusters instead of the "
        "noised uploads (privacy/sketch.py). block_norms: the L2 norm of the update in each adapter tensor, the "
        "classifier head row by row (where the update went); projection: a seeded random projection to "
        "sketch_dim numbers.")
    sketch_dim: int = Field(default=16, ge=1, le=4096, description="sketch: projection's dimensions.")
    sketch_share: float = Field(
        default=0.5, gt=0, lt=1,
        description="The share of each round's privacy cost (as 1/z^2) spent on the sketch: its multiplier is "
        "z / sqrt(share), the upload's z / sqrt(1 - share), so noise_multiplier z is what is accounted.")


class TrackingConfig(_Section):
    """Experiment tracking (tracking.py): the config, every round's metrics and the final
    adapters, logged through each library's own API. `tracking: [tensorboard, mlflow]` is
    short for `tracking: {backends: [tensorboard, mlflow]}`."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Any of tensorboard (event files in <run>/tensorboard), mlflow, wandb; "
        "pip install 'fltac-ray[tracking]' installs all three.",
    )
    project: str | None = Field(
        default=None,
        description="MLflow experiment / W&B project; default: the experiment's name (a "
        "sweep's trials: the sweep's name, each trial one run).",
    )
    mlflow_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (a server, sqlite:///..., or a folder); default: "
        "$MLFLOW_TRACKING_URI, else a local file store in <output_dir>/mlruns.",
    )
    wandb_mode: Literal["online", "offline"] | None = Field(
        default=None,
        description="W&B mode; default: $WANDB_MODE, else online when an API key is set up "
        "(WANDB_API_KEY or wandb login) and offline otherwise (wandb sync uploads later).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        return {"backends": value} if isinstance(value, list) else value

    @field_validator("backends")
    @classmethod
    def _unique(cls, backends: list[str]) -> list[str]:
        if len(set(backends)) != len(backends):
            raise ValueError(f"{backends}: name each tracker once")
        return backends


def flat_fields(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"lora": {"rank": 2}}} -> {"model.lora.rank": 2} (lists and None kept as values).
    An algorithm given with options, {"algorithm": {"name": "fedprox", "mu": 0.1}}, reads
    {"algorithm": "fedprox", "algorithm.mu": 0.1}: the name stays where a plain name is."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if not prefix and key == "algorithm" and isinstance(value, dict) and "name" in value:
            flat["algorithm"] = value["name"]
            flat.update(flat_fields({k: v for k, v in value.items() if k != "name"}, "algorithm."))
        elif isinstance(value, dict) and value:
            flat.update(flat_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Fields a resumed run may change: where and with what resources it runs, how it reports. None of
# them changes a result (workers are stateless and passes are cut by the recorded min_passes, in
# decisions.json: the two backends give the same numbers at the same passes).
RESUMABLE_CHANGES = (
    "engine.backend", "engine.ray_address", "engine.num_cpus", "engine.num_gpus", "engine.dashboard", "engine.dashboard_host",
    "engine.dashboard_port", "engine.metrics", "engine.num_workers", "engine.clients_per_actor",
    "engine.cpus_per_worker", "engine.coordinator_cpus", "engine.actor_timeout_s", "engine.reserve_timeout_s",
    "engine.max_retries", "engine.base_cache_dir", "engine.checkpoint_every", "engine.keep_checkpoints",
    "engine.kill_worker_at", "report.", "tracking.",
)


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (before, after) for every field that differs between two resolved configs."""
    old, new = flat_fields(before), flat_fields(after)
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)}


def as_resolved_now(saved: dict[str, Any]) -> dict[str, Any]:
    """A resolved config saved by this or an earlier version (a checkpoint's), as this version
    resolves it: settings that moved are where they live now (MOVED_TO_ALGORITHM) and fields
    added since hold their defaults, so a comparison sees differences of meaning only. As saved
    when it no longer validates (the comparison then names every field that differs)."""
    import copy

    try:
        return build_config(copy.deepcopy(saved)).resolved()
    except (ConfigError, ExperimentFileError):
        return saved


def changes_results(field: str) -> bool:
    return not any(field == allowed or (allowed.endswith(".") and field.startswith(allowed))
                   for allowed in RESUMABLE_CHANGES)


def algorithm_name(value: Any) -> str:
    """The algorithm an `algorithm:` value names: `fedprox` or `{name: fedprox, mu: 0.1}`."""
    return str(value.get("name", "?")) if isinstance(value, dict) else str(value)


def clients_per_round(clients: int, fraction: float) -> int:
    """Clients sampled per round: ceil(fraction x clients), at least one (the one rule: the
    schema's bounds and the round loop's sampling both use it)."""
    return max(1, math.ceil(fraction * clients))


def import_plugins(modules: list[str]) -> None:
    """Import the user's modules that register algorithms, tasks and models (their decorators
    run on import). Called wherever a config is read: the driver and every worker."""
    import importlib

    for module in modules:
        importlib.import_module(module)


class ExperimentConfig(_Section):
    # First field: pydantic validates in order, so the plug-ins are registered before `data`,
    # `model` and `algorithm` are checked against the registries.
    plugins: list[str] = Field(
        default_factory=list,
        description="Python modules imported before the rest is read, to register your own "
        "algorithms, tasks and models (register_algorithm / register_task / register_model).",
    )
    name: str = Field(
        default="experiment", min_length=1, max_length=120, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="Names the run directory (<output_dir>/<name>-<time>): letters, digits and "
        ". _ + -, starting with a letter or digit, so the run stays inside output_dir.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1,
                      description="Seeds the split, sampling, init and training (numpy's range: 0..2**32-1).")
    algorithm: str = Field(
        default="fltac",
        description="A built-in algorithm (fltac-ray tasks lists them), one registered with "
        "fltac_ray.register_algorithm, or 'package.module:ClassName'. With its own options: "
        "{name: fedprox, mu: 0.1} (or --set algorithm.mu=0.1).",
    )
    # Filled from `algorithm: {name: ..., <option>: ...}` (see _algorithm_with_options); checked
    # against the algorithm's own Options model; saved back under `algorithm:`.
    algorithm_options: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    rounds: int = Field(default=8, ge=1, description="Communication rounds T.")
    output_dir: str = Field(default="runs", description="Parent folder of run directories.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_validator(mode="before")
    @classmethod
    def _algorithm_with_options(cls, raw: Any) -> Any:
        """`algorithm: {name: fedprox, mu: 0.1}` -> algorithm "fedprox" with options {mu: 0.1}."""
        if not isinstance(raw, dict):
            return raw
        raw = _move_to_algorithm(dict(raw))
        if not isinstance(raw.get("algorithm"), dict):
            return raw
        given = dict(raw["algorithm"])
        name = given.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"algorithm.name = {name!r}: an algorithm given with options names itself, "
                             "e.g. algorithm: {name: fedprox, mu: 0.1}")
        raw["algorithm"], raw["algorithm_options"] = name, given
        return raw

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, modules: list[str]) -> list[str]:
        for module in modules:
            try:
                import_plugins([module])
            except Exception as exc:  # noqa: BLE001 - any failure of the user's module, named
                raise ValueError(f"cannot import plug-in module {module!r}: {type(exc).__name__}: {exc}") from None
        return modules

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, name: str) -> str:
        try:
            resolve_algorithm_name(name)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return name

    @property
    def algorithm_class(self):
        """The FederatedAlgorithm subclass `algorithm` names."""
        return resolve_algorithm_name(self.algorithm)

    @property
    def options(self):
        """The algorithm's own options (its Options model, defaults filled in)."""
        return self.algorithm_class.Options.model_validate(self.algorithm_options)

    def _privacy_rules(self) -> None:
        """privacy: settings that give a guarantee, with an algorithm whose uploads it covers."""
        privacy = self.privacy
        if privacy.mode == "none":
            return
        if privacy.noise_multiplier is None and privacy.target_epsilon is None:
            raise ValueError("privacy.noise_multiplier = null: give privacy.noise_multiplier or "
                             "privacy.target_epsilon (which calibrates it)")
        if privacy.noise_multiplier == 0:
            raise ValueError("privacy.noise_multiplier = 0: no noise gives no privacy guarantee; give a multiplier "
                             "> 0 or privacy.target_epsilon, or set privacy.mode: none")
        if privacy.adaptive_clipping and privacy.mode != "client_central":
            raise ValueError(f"privacy.adaptive_clipping = true: the server estimates the bound from a noised count "
                             f"it computes, which needs privacy.mode client_central (here {privacy.mode!r}); set "
                             "privacy.adaptive_clipping: false")
        if privacy.sketch != "none" and privacy.mode != "client_local":
            raise ValueError(f"privacy.sketch = {privacy.sketch}: sketches are for clustering noised uploads under "
                             f"privacy.mode client_local (here {privacy.mode!r}); set privacy.sketch: none")
        if privacy.sketch != "none" and not self.algorithm_class.clusters_sketches:
            raise ValueError(f"privacy.sketch = {privacy.sketch}: algorithm '{self.algorithm}' does not cluster "
                             "uploads, so a sketch would spend budget on nothing; use fltac or privacy.sketch: none")
        if privacy.mode == "example" and self.model.dtype == "float16":
            raise ValueError("model.dtype = float16: privacy.mode example (DP-SGD) clips each example's "
                             "gradient without float16 loss scaling; use float32 or bfloat16")
        if privacy.mode == "client_central" and not self.algorithm_class.central_privacy:
            raise ValueError(f"privacy.mode = client_central: algorithm '{self.algorithm}' answers with no plain mean "
                             "of the uploads, so the noise's sensitivity does not hold; use client_local")
        if privacy.mode == "client_central":
            options = self.options
            if getattr(options, "weighting", None) != "uniform" or getattr(options, "aggregation", "mean") != "mean":
                raise ValueError(
                    f"privacy.mode = client_central: the noise is calibrated to plain means of clipped updates; "
                    f"give algorithm.weighting: uniform (an example count would set a client's weight and so its "
                    f"sensitivity) and aggregation: mean (here weighting "
                    f"{getattr(options, 'weighting', 'none: no such option')!r}, aggregation "
                    f"{getattr(options, 'aggregation', 'mean')!r}), or use client_local")
            if privacy.accountant != "rdp":
                raise ValueError("privacy.accountant = pld: client_central accounts for sampling clients without "
                                 "replacement, which dp-accounting's RDP accountant handles; use rdp")
        if extras := self.algorithm_class.upload_extras:
            raise ValueError(f"privacy.mode = {privacy.mode!r}: algorithm '{self.algorithm}' also uploads "
                             f"{list(extras)}, which the noise does not cover; use an algorithm that uploads its "
                             "adapter alone")

    def _rank_rules(self) -> None:
        """model.lora.rank_profile: a rank set topped by model.lora.rank, an algorithm whose traffic and
        aggregation are one answer row per adapter, and nothing that would move the zero padding."""
        profile, rank = self.model.lora.rank_profile, self.model.lora.rank
        if profile is None:
            return
        if max(profile.ranks) != rank:
            raise ValueError(f"model.lora.rank_profile.ranks = {profile.ranks}: the largest must be model.lora.rank "
                             f"({rank}), the width every adapter is padded to")
        if profile.per_client is not None:
            if len(profile.per_client) != self.data.num_clients:
                raise ValueError(f"model.lora.rank_profile.per_client = {profile.per_client}: one rank per client "
                                 f"(data.num_clients = {self.data.num_clients}), got {len(profile.per_client)}")
            if not all(1 <= r <= rank for r in profile.per_client):
                raise ValueError(f"model.lora.rank_profile.per_client = {profile.per_client}: every rank must be in "
                                 f"1..{rank} (model.lora.rank)")
        if not self.algorithm_class.heterogeneous_ranks:
            raise ValueError(f"model.lora.rank_profile: algorithm '{self.algorithm}' sends more than one answer row "
                             "per adapter or state beside it, which heterogeneous ranks do not cover yet; use fltac, "
                             "fedit, fedsa, ffa, hetlora, flexlora, oracle, local or centralized")
        if self.privacy.mode == "example":
            raise ValueError("model.lora.rank_profile: privacy.mode example would add DP-SGD noise to the zero "
                             "padding beyond each client's rank; use a client-level mode or no profile")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ExperimentConfig:
        try:
            self.options  # noqa: B018 - validated here, with the same field-naming errors
        except ValidationError as exc:
            first = exc.errors()[0]
            option = ".".join(str(part) for part in first["loc"])
            known = sorted(self.algorithm_class.Options.model_fields)
            message = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                message = (f"not an option of algorithm '{self.algorithm}'; its options: {known}" if known else
                           f"algorithm '{self.algorithm}' has no options; give it as algorithm: {self.algorithm}")
            if not option:  # a rule across the options, worded "<option> = <value>: <rule>"
                raise ValueError(f"algorithm.{message}") from None
            raise ValueError(f"algorithm.{option} = {first.get('input')!r}: {message}") from None
        modality = self.data.modality
        spec = MODELS.get(self.model.name)
        if spec is not None and spec.modality != modality:
            fitting = [n for n, m in MODELS.items() if m.modality == modality]
            raise ValueError(
                f"model.name = {self.model.name!r}: a {spec.modality} model cannot read "
                f"{modality} tasks {self.data.tasks}; use one of {fitting} or a Hugging Face id")
        if self.model.lora.target_modules is None:
            self.model.lora.target_modules = default_targets(self.model.name, modality)
        size = self.model.image_size
        if size is not None and modality != "image":
            raise ValueError(f"model.image_size = {size}: only for image tasks")
        if size is not None and self.model.name == "efficientnet-lite0" and size < 48:
            raise ValueError(f"model.image_size = {size}: EfficientNet-lite0 needs at least 48 px "
                             "(smaller inputs collapse its 32x downsampled features)")
        if self.model.pooling == "pooler" and modality not in ("text",):
            raise ValueError(f"model.pooling = 'pooler': only for text models with a pretrained pooler "
                             f"(this experiment's tasks are {modality}); use cls or mean")
        self.algorithm_class.check_config(self)  # the algorithm's own rules on the rest
        if self.model.head == "frozen" and modality == "causal_lm":
            raise ValueError("model.head = 'frozen': instruction tasks have no classifier head; remove it")
        if self.train.judge is not None and modality != "causal_lm":
            raise ValueError(f"train.judge = {self.train.judge!r}: only for instruction tasks")
        fed = self.federation
        attack = fed.attack
        if attack.kind != "none":
            count = round(attack.fraction * self.data.num_clients)
            # fraction 0 is the study's control run: nobody attacks, the same columns are measured
            if attack.fraction > 0 and count < 1:
                raise ValueError(
                    f"federation.attack.fraction = {attack.fraction}: selects no client of "
                    f"{self.data.num_clients} (round(fraction x data.num_clients) = {count}); give at "
                    f"least {1 / self.data.num_clients:.3g}")
            if attack.kind == "cross_task" and self.num_tasks < 2:
                raise ValueError("federation.attack.kind = 'cross_task': needs at least 2 tasks in "
                                 f"data.tasks (here {self.data.task_names})")
        elif attack.fraction > 0:
            raise ValueError(f"federation.attack.fraction = {attack.fraction}: set "
                             "federation.attack.kind too (sign_flip, scaling, random or cross_task)")
        if fed.screening_neighbours is not None and fed.screening != "neighbours":
            raise ValueError(f"federation.screening_neighbours = {fed.screening_neighbours}: only used with "
                             f"federation.screening: neighbours (here {fed.screening!r})")
        self._privacy_rules()
        self._rank_rules()
        if fed.screening_stop and fed.screening == "none":
            raise ValueError("federation.screening_stop = True: only used with federation.screening: norm or "
                             "neighbours (here 'none')")
        if self.engine.kill_worker_at is not None and self.engine.backend != "ray":
            raise ValueError(
                f"engine.kill_worker_at = {list(self.engine.kill_worker_at)}: fault injection needs "
                "engine.backend: ray (the local backend has no workers to lose)")
        if self.model.quantization != "none" and self.engine.device == "cpu":
            raise ValueError(
                f"model.quantization = {self.model.quantization!r}: bitsandbytes quantisation runs on "
                "CUDA only, and engine.device is 'cpu'; use model.quantization: none (model.dtype: "
                "bfloat16 halves the base on the CPU)")
        if self.model.quantization != "none" and modality not in ("text", "causal_lm"):
            raise ValueError(
                f"model.quantization = {self.model.quantization!r}: only for Hugging Face text and "
                f"causal-LM models (this experiment's tasks are {modality})")
        cpa = self.engine.clients_per_actor
        if cpa is not None and self.engine.num_workers is not None:
            raise ValueError(
                f"engine.num_workers = {self.engine.num_workers}: cannot be combined with "
                "engine.clients_per_actor (which fixes the worker count); set only one"
            )
        return self

    @property
    def clients_per_round(self) -> int:
        return clients_per_round(self.data.num_clients, self.federation.client_fraction)

    @property
    def num_tasks(self) -> int:
        return len(self.data.task_names)


    def resolved(self) -> dict[str, Any]:
        """The full config with defaults filled in, as saved beside the results."""
        out = self.model_dump(mode="json")
        options = self.algorithm_class.resolved_options(self)
        if options:  # saved as it is given, so the file loads back as it is
            out["algorithm"] = {"name": self.algorithm, **options}
        out["data"]["min_share"] = self.data.resolved_min_share
        return out


# --- loading -------------------------------------------------------------------------------


_CROSS_FIELD = re.compile(r"^(?P<field>[\w.]+) = (?P<value>.+?): (?P<rule>.*)$", re.S)


def _to_issues(error: ValidationError, prefix: str = "") -> list[ConfigIssue]:
    issues = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            issues.extend(_unknown_field(item["loc"], value, prefix))
            continue
        if item["loc"] == () and (match := _CROSS_FIELD.match(message)):
            # Cross-field rules phrase their message as "field = value: rule".
            field, message = match["field"], match["rule"]
            value = yaml.safe_load(match["value"])
        if isinstance(value, dict):
            value = "{...}"
        issues.append(ConfigIssue(prefix + field, value, message))
    return issues


def _unknown_field(loc: tuple[Any, ...], value: Any, prefix: str) -> list[ConfigIssue]:
    """An unknown key, with the closest allowed one suggested; an unknown section (a mapping)
    names each of its settings by its full dotted key, with its value."""
    allowed = _allowed_keys(loc[:-1])
    name = str(loc[-1])
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    kind = "section" if isinstance(value, dict) and value else "field"
    hint = f"; did you mean {close[0]!r}?" if close else ""
    message = f"unknown {kind}{hint} allowed here: {allowed}" if close else f"unknown {kind}; allowed here: {allowed}"
    field = prefix + ".".join(str(part) for part in loc)
    if kind == "field":
        return [ConfigIssue(field, value, message)]
    return [ConfigIssue(f"{field}.{key}", leaf, message) for key, leaf in _leaves(value)]


def _leaves(mapping: dict[str, Any], above: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every setting in a nested mapping."""
    out = []
    for key, value in mapping.items():
        dotted = f"{above}{key}"
        out.extend(_leaves(value, dotted + ".") if isinstance(value, dict) and value else [(dotted, value)])
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return sorted(name for name, info in model.model_fields.items() if not info.exclude)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            [ConfigIssue("--set", text, "expected KEY=VALUE with a dotted key, e.g. train.lr=1e-3")]
        )
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(f"--set {key}", raw, f"value is not valid YAML ({exc})")]) from exc
    except _YamlTooLarge as exc:
        raise ConfigError([ConfigIssue(f"--set {key}", raw, str(exc))]) from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "algorithm" and len(path) > 1 and not isinstance(raw.get("algorithm"), dict):
            # an option of the algorithm: `algorithm: fedprox` becomes {name: fedprox}
            raw["algorithm"] = {"name": raw.get("algorithm", ExperimentConfig.model_fields["algorithm"].default)}
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    [ConfigIssue(".".join(path), value, f"'{part}' is a value, not a section")]
                )
            node = child
        node[path[-1]] = value
    return raw


# Bounds on an experiment file, checked before anything is built from it: real ones are a few
# KiB with at most a few thousand YAML nodes. A "billion laughs" file (nine aliases of nine
# aliases ...) is a few hundred bytes that expand to 10^9 nodes, so the bound is on the nodes the
# document expands to, counted on the parsed graph before any value is constructed.
MAX_EXPERIMENT_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class _YamlTooLarge(ValueError):
    pass


def _expanded_nodes(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (aliases share node objects
    in the composed graph, so each distinct node is sized once)."""
    if id(node) in sizes:
        return sizes[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_nodes(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_nodes(key, sizes) + _expanded_nodes(value, sizes) for key, value in node.value)
    if size > MAX_YAML_NODES:
        raise _YamlTooLarge(f"expands to more than {MAX_YAML_NODES:,} values (aliases of aliases?)")
    sizes[id(node)] = size
    return size


def parse_yaml(text: str) -> Any:
    """yaml.safe_load with the expansion bounded; raises yaml.YAMLError or ValueError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, {})
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """An experiment (or sweep, or compare) file as a mapping: a regular file of at most
    MAX_EXPERIMENT_BYTES of UTF-8 YAML whose aliases expand to at most MAX_YAML_NODES values."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentFileError(path, "no such file" if not path.exists() else "is not a file")
    size = path.stat().st_size
    if size > MAX_EXPERIMENT_BYTES:
        raise ExperimentFileError(path, f"{size:,} bytes; an experiment file is YAML of at most "
                                        f"{MAX_EXPERIMENT_BYTES:,} bytes (is this the right file?)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExperimentFileError(path, f"is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); "
                                        "an experiment file is YAML") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            [ConfigIssue("experiment file", str(path), f"malformed YAML: {exc}")], str(path)
        ) from exc
    except _YamlTooLarge as exc:
        raise ConfigError([ConfigIssue("experiment file", str(path), str(exc))], str(path)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [ConfigIssue("experiment file", type(raw).__name__, "must be a YAML mapping of fields")],
            str(path),
        )
    return raw


def build_config(raw: dict[str, Any], source: str | None = None) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_to_issues(exc), source) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML (or start from defaults when path is None) and apply overrides.
    An invalid setting given with --set says so (the file is not blamed for it)."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return build_config(raw, str(path) if path is not None else None)
    except ConfigError as exc:
        if not overrides:
            raise
        keys = [".".join(parse_override(text)[0]) for text in overrides]

        def from_set(issue: ConfigIssue) -> bool:
            return any(issue.field == key or issue.field.startswith(key + ".") or key.startswith(issue.field + ".")
                       for key in keys)

        issues = [ConfigIssue(issue.field, issue.value, f"(given with --set) {issue.allowed}") if from_set(issue)
                  else issue for issue in exc.issues]
        given = sum(from_set(issue) for issue in exc.issues)
        where = "--set" if path is None else (f"--set (over {path})" if given == len(issues)
                                             else f"{path} and --set" if given else str(path))
        raise ConfigError(issues, where) from None


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.resolved(), sort_keys=False))
