"""A federated algorithm is one class holding both halves, plus its options and its traffic
accounting.

The engine owns the round loop (engine/simulation.py) and asks the algorithm at every step where
methods differ; each hook has a default, so a method overrides only what it changes:

  options
    Options          its own typed options (algorithms/options.py), read as self.options
  client side (runs in a worker, once per (client, adapter slot) job)
    client_adapters  which of a client's tasks each of its adapters trains on
    task_steps       how many local steps each of an adapter's tasks gets (FedIT: a budget option)
    trainable_entries  which adapter entries local training may change (FFA-LoRA: not A)
    start            which state local training starts from (IFCA: the best-fitting global)
    private_start    which private state it trains with (FLoRAL's optimal router: the true one)
    local_training   how local steps run: an objective term, a gradient correction, the
                     optimiser (algorithms/local_training.py; FedProx, SCAFFOLD)
    local_inputs     per-job vectors that rule reads (SCAFFOLD: c - c_i)
    keep_state       client state kept between rounds on the server side (SCAFFOLD: c_i)
    upload           what leaves the client (FedSA-LoRA: only A; local-only: nothing)
    merge            how the server's answer becomes the client's new adapter (FedSA: B kept)
    base_update      an update every client's frozen base carries (FLoRA: the folded stacks)
  server side (runs in the coordinator)
    start_server     set-up where the server runs (FL-TAC: which K-means backend)
    num_initial_adapters, set_initial   the server models drawn before round 1 (IFCA: K)
    broadcast        the server models every sampled client receives before training (v^0;
                     IFCA: its K models; SCAFFOLD: the model and the control variate)
    upload_width     the length of Upload.vector the server accepts (the shared entries)
    aggregate        one round's accepted uploads -> the answers sent back
    global_adapters  the whole adapters a round leaves on the server, for export
    state/load_state what a checkpoint must hold to continue (FedAdam: its moments)
  traffic
    Upload.params    parameters one upload really sends
    download_params  parameters the clients of a round really receive
  set-up and checks
    model_options, federate, upload_groups   FLoRAL's layers; centralized's pooled data; K
    check_config, check_data, resolved_options   rules on the rest of the experiment
  declarations (class attributes)
    recovers_tasks, labels_name_server_models, round_metrics, upload_extras, clusters_sketches,
    heterogeneous_ranks, counts_rank_traffic, central_privacy

No Ray in here: algorithms are plain numpy code (their local-training rule uses torch tensors
handed to it), tested as pure functions (tests/test_algorithms.py, tests/test_local_training.py).
docs/algorithms.md ("Your own algorithm") has a worked example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fltac_ray.algorithms.local_training import LocalTraining
from fltac_ray.algorithms.options import AggregationOptions, AlgorithmOptions
from fltac_ray.algorithms.robust import cluster_aggregate, weighted_cluster_means
from fltac_ray.algorithms.types import (
    AdapterKey,
    AdapterSpec,
    Aggregate,
    ClientJob,
    Upload,
    Uploads,
)

# the message types and the averaging live in their own modules; importable from here as before
__all__ = ["AdapterKey", "AdapterSpec", "Aggregate", "ClientJob", "FederatedAlgorithm", "Upload", "Uploads",
           "weighted_cluster_means"]

if TYPE_CHECKING:
    from fltac_ray.config import ExperimentConfig
    from fltac_ray.data.federated import FederatedData

class FederatedAlgorithm:
    """Defaults: one adapter per task, trained whole from the client's committed adapter (v^0
    at first), uploaded whole, replaced by the server's answer. Subclasses override `aggregate`
    and whatever else differs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: this algorithm's own options, given as `algorithm: {name: ..., <option>: ...}`
    Options: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions
    #: True when the answer labels are the server's attempt to recover the tasks (FL-TAC, IFCA,
    #: oracle): the engine scores them against the true tasks (clustering accuracy, ARI)
    recovers_tasks: ClassVar[bool] = False
    #: True when an answer label names one of the server's models, the same one every round
    #: (IFCA's K models); False: labels are numbered afresh each round (K-means), so the reports
    #: match them across rounds
    labels_name_server_models: ClassVar[bool] = False
    #: names of the per-round measures `aggregate` reports in Aggregate.metrics: extra columns
    #: of rounds.csv (empty where a round reported none)
    round_metrics: ClassVar[tuple[str, ...]] = ()
    #: what `upload` sends besides the adapter (Upload.extras keys): differential privacy noises
    #: the adapter only, so it refuses an algorithm that sends more
    upload_extras: ClassVar[tuple[str, ...]] = ()
    # whether `aggregate` clusters the uploads on their privacy sketches when they carry one
    # (privacy.sketch_dim: Uploads.extras["sketch"], privacy/sketch.py)
    clusters_sketches: ClassVar[bool] = False
    # whether the method works under model.lora.rank_profile (models/ranks.py): its answer is one
    # adapter-wide row per upload, truncated to each client's rank, and it keeps no state beside it
    heterogeneous_ranks: ClassVar[bool] = True
    # whether download_params counts what each client receives at its rank itself (FLoRA's stacks),
    # instead of the engine's count of each answer row within the client's rank
    counts_rank_traffic: ClassVar[bool] = False
    # whether `aggregate` answers with cluster_means (plain group means), which privacy.mode
    # client_central noises with a sensitivity it can state
    central_privacy: ClassVar[bool] = True

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.options = type(self).Options.model_validate(getattr(config, "algorithm_options", {}))
        # The averaging rule: the algorithm's own options where it declares them (options.
        # AggregationOptions: weighting, and mean, median or trimmed_mean in each group), else
        # the defaults declared there (FLoRAL declares `weighting` alone).
        plain = AggregationOptions()
        self.weighting = getattr(self.options, "weighting", plain.weighting)
        self.aggregation = getattr(self.options, "aggregation", plain.aggregation)
        self.trim = getattr(self.options, "trim_fraction", plain.trim_fraction)
        self.spec: AdapterSpec | None = None
        self.initial: np.ndarray | None = None  # (K, d) what the server drew before round 1
        # privacy.mode client_central: the server sets the round's noise here before `aggregate`
        # (privacy/mechanism.CentralNoise); cluster_means adds it to every group mean
        self.aggregate_noise = None

    # --- set-up -----------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        """The rules this algorithm sets on the rest of the experiment, checked with the config
        before anything runs: raise ValueError("<field> = <value>: <what is allowed>")."""

    @classmethod
    def resolved_options(cls, config: ExperimentConfig) -> dict[str, Any]:
        """The options as the run's config.yaml records them (defaults filled in; FLoRAL: C)."""
        return config.options.saved()

    def check_data(self, data: FederatedData) -> None:
        """Refuse a partition this algorithm cannot run on (FL-TAC: more clusters than adapters),
        with a ConfigError naming the field; before any actor starts."""

    def upload_groups(self) -> int:
        """How many groups a round's uploads are expected to form (screening's default
        neighbour count divides by it): one per task; FL-TAC and IFCA: their K."""
        return self.config.num_tasks

    def setup(self, spec: AdapterSpec) -> None:
        """Both halves learn the adapter layout before round 1."""
        self.spec = spec

    def model_options(self) -> dict[str, Any]:
        """Extra arguments of models.adapter_model.AdapterModel (FLoRAL: its mixture layers)."""
        return {}

    def federate(self, data: FederatedData) -> FederatedData:
        """The clients' data as this algorithm sees it (centralized: pooled into one client)."""
        return data

    # --- client side ------------------------------------------------------------------------
    def client_adapters(self, tasks: list[str]) -> list[list[str]]:
        """Group a client's tasks into adapters (default: one adapter per task, as in FL-TAC)."""
        return [[task] for task in tasks]

    def task_steps(self, tasks: list[str], local_steps: int) -> tuple[int, ...]:
        """Local steps for each task of one adapter, trained in turn (default: train.local_steps
        each)."""
        return (local_steps,) * len(tasks)

    def trainable_entries(self) -> np.ndarray | None:
        """(d,) bool: adapter entries local training changes; None: all of them."""
        return None

    def shared_entries(self) -> np.ndarray | None:
        """(d,) bool: the adapter entries a client sends and the server answers; None: all."""
        return None

    def private_start(self, job: ClientJob, private: np.ndarray | None) -> np.ndarray | None:
        """The private state (FLoRAL's router) a job trains and evaluates with, from the one it
        kept (None: never trained). Default: what it kept."""
        return private

    def start(self, job: ClientJob, committed: np.ndarray | None, broadcast: np.ndarray,
              probe_loss) -> tuple[np.ndarray, dict[str, Any]]:
        """The adapter local training starts from, and meta to remember for the upload.
        `committed`: the client's adapter after its last round (None: never trained);
        `broadcast`: (K, d) what the server sent; `probe_loss(vector)`: the client's loss with
        that adapter on a fixed probe of its training data (IFCA uses it)."""
        return (committed if committed is not None else broadcast[0]), {}

    def local_training(self) -> LocalTraining:
        """The rule of local steps (built once per worker): default plain AdamW."""
        return LocalTraining()

    def local_inputs(self, job: ClientJob, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        """Named (d,) float32 vectors the local-training rule reads for this job (stacked and
        split by layout: LocalContext.inputs); `meta`: what `start` returned. Every job of a run
        must give the same names."""
        return {}

    def keep_state(self, job: ClientJob, trained: np.ndarray, meta: dict[str, Any]) -> np.ndarray | None:
        """(d',) float32 client state to keep for this (client, slot) after the round (it comes
        back as job.state next time it is sampled); None: keep nothing new. Stored on the server
        side, deduplicated by content like adapters, rolled back when the upload is refused."""
        return None

    def upload(self, job: ClientJob, trained: np.ndarray, private: np.ndarray,
               meta: dict[str, Any]) -> Upload | None:
        """What leaves the client after local training (None: nothing is sent)."""
        shared = self.shared_entries()
        vector = trained if shared is None else trained[shared]
        return Upload(job.key, vector, job.num_samples, meta=dict(meta))

    def merge(self, trained: np.ndarray, answer: np.ndarray | None) -> np.ndarray:
        """The client's adapter after the round, from its trained adapter and the server's
        answer to its upload (None: it sent nothing, or the server sent nothing back)."""
        if answer is None:
            return trained
        shared = self.shared_entries()
        if shared is None:
            return answer
        merged = trained.copy()
        merged[shared] = answer
        return merged

    # --- server side ------------------------------------------------------------------------
    def start_server(self) -> str:
        """Called once in the process that runs the server, before set_initial: resolve what
        depends on that machine (FL-TAC: its K-means backend, cuML where a GPU is visible).
        Returns a note for the run's start-up line ("" for none)."""
        return ""

    def num_initial_adapters(self) -> int:
        """How many distinct initial adapters the server draws (IFCA: one per cluster)."""
        return 1

    def set_initial(self, adapters: np.ndarray) -> None:
        """The server's initial adapters (K, d), drawn before round 1."""
        self.initial = np.array(adapters, dtype=np.float32)

    def broadcast(self) -> np.ndarray:
        """(K, d) what every sampled client receives before training: v^0 (a never-trained
        client starts from it), or IFCA's K current global adapters."""
        return self.initial

    def upload_width(self) -> int:
        """Length of Upload.vector, which the server checks before aggregating."""
        shared = self.shared_entries()
        return self.spec.size if shared is None else int(shared.sum())

    def aggregate(self, uploads: Uploads, round_index: int) -> Aggregate:
        """Turn one round's accepted uploads into the answers sent back (default: FedAvg)."""
        labels = np.zeros(len(uploads.vectors), dtype=np.int64)
        return self.cluster_means(uploads.vectors, labels, uploads.num_samples)

    def base_update(self) -> dict[str, np.ndarray] | None:
        """{LoRA layer name (the layout's, before ".lora_A."): (d_out, d_in) float32} added, times
        the layer's LoRA scale, to every client's frozen base weight for training and evaluation
        (FLoRA folds each round's stacked product in); None: the base stays as loaded. Workers
        refold only when it changes (StateView.base_digest)."""
        return None

    def global_adapters(self, outcome: Aggregate) -> np.ndarray | None:
        """(k, d) whole adapters the server holds after a round, for export; None: none (the
        adapters are personal)."""
        if outcome.adapters.shape[1] == self.spec.size:
            return outcome.adapters
        return None

    def state(self) -> dict[str, np.ndarray]:
        """Server state a checkpoint must hold to continue the run."""
        return {"initial": self.initial} if self.initial is not None else {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what state() returned."""
        if "initial" in state:
            self.set_initial(state["initial"])

    # --- traffic ----------------------------------------------------------------------------
    def download_params(self, outcome: Aggregate, clients: int) -> int:
        """Parameters sent down in a round: each accepted upload receives its answer row.
        `clients`: the sampled clients that delivered."""
        return int(len(outcome.labels) * outcome.adapters.shape[1])

    # --- shared arithmetic ------------------------------------------------------------------
    def weights(self, num_samples: np.ndarray) -> np.ndarray:
        """FedAvg weights: sample counts (the authors' code) or uniform (the FL-TAC paper)."""
        return np.asarray(num_samples, dtype=np.float64) if self.weighting == "samples" else np.ones(len(num_samples))

    def cluster_means(self, vectors: np.ndarray, labels: np.ndarray, num_samples: np.ndarray) -> Aggregate:
        """Each group's aggregate by the configured rule (FedAvg or a robust one); under central
        differential privacy, with the round's noise added to each mean."""
        result = cluster_aggregate(vectors, labels, self.weights(num_samples), self.aggregation, self.trim)
        return result if self.aggregate_noise is None else self.aggregate_noise(result)
