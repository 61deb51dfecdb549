"""The server side: checks uploads, runs the algorithm's aggregation, keeps the client-state
store (server/state_store.py) and commits each round's results into it.

The Ray backend runs it as the coordinator actor, the local backend in-process. The algorithm's
server half sees only uploads (client ids and adapter slots, no task names). The store holds
what the simulated clients keep between rounds; committing applies the algorithm's client-side
`merge` for each client, as the client would on receiving the answer.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from fltac_ray.algorithms import create_algorithm
from fltac_ray.algorithms.base import AdapterKey, AdapterSpec, Aggregate, Upload, Uploads
from fltac_ray.config import ExperimentConfig, import_plugins
from fltac_ray.engine.memory import HeapTrimmer
from fltac_ray.engine.messages import (
    PassReport,
    PassResult,
    RoundOutcome,
    StateView,
    content_digest,
)
from fltac_ray.errors import AlgorithmError, ScreeningError
from fltac_ray.models.ranks import RankMasks
from fltac_ray.privacy.mechanism import PRIVACY_STREAM, CentralNoise, next_clip_norm, quantile_noise
from fltac_ray.runs.snapshots import sample_rows, snapshot_rounds
from fltac_ray.server.attacks import Attack, honest_damage
from fltac_ray.server.lora_products import round_product_error
from fltac_ray.server.screening import default_neighbours, screen_uploads
from fltac_ray.server.state_store import ClientStateStore
from fltac_ray.server.uploads import answer_problem, merged_problem, upload_problem

log = logging.getLogger(__name__)


class Server:
    def __init__(self, config: ExperimentConfig, algorithm_class: type, spec: AdapterSpec | None = None) -> None:
        """`spec`: the adapter layout; the Ray backend starts the coordinator before any worker
        (so it takes its place on the driver's node first) and hands the layout over with
        `setup` once a worker has built the model."""
        import_plugins(config.plugins)  # the user's tasks and models, in this process too
        self.config = config
        self.algorithm = create_algorithm(config, cls=algorithm_class)
        # Here, where the server runs: FL-TAC's cuML needs a GPU visible to this process.
        self.start_note = self.algorithm.start_server()
        self.attack = Attack.from_config(config)  # which clients are malicious, for the audit
        self.received: dict[int, PassResult] = {}  # this round's pass results, by pass index
        self.receiving_round = 0
        self.rank_masks: RankMasks | None = None  # setup() reads model.lora.rank_profile
        if spec is not None:
            self.setup(spec)
        self.trim_heap = HeapTrimmer()
        self.snapshot_rounds = set(snapshot_rounds(config.rounds, config.report.adapter_snapshots))
        self.snapshot: dict | None = None  # the newest round's kept uploads, until taken
        self.exported: dict[str, np.ndarray] | None = None  # the newest whole global adapters
        # client-level privacy: the bound the next round clips to (privacy.adaptive_clipping moves it)
        client_level = config.privacy.mode in ("client_local", "client_central")
        self.clip_norm: float | None = config.privacy.clip_norm if client_level else None
        self._base_digest: bytes | None = None  # of algorithm.base_update(); None: not yet hashed

    def setup(self, spec: AdapterSpec) -> None:
        self.algorithm.setup(spec)
        # model.lora.rank_profile: every client keeps its answer up to its own rank (models/ranks.py)
        self.rank_masks = RankMasks.for_config(self.config, list(spec.layout))
        self.store = ClientStateStore(spec.size)
        # the algorithm's client state (keep_state), its width known from the first vector kept
        self.states = ClientStateStore(0)

    def server_note(self) -> str:
        """What the algorithm resolved where the server runs, for the start-up line."""
        return self.start_note

    def pid(self) -> int:
        return os.getpid()

    def visible_gpus(self) -> str | None:
        """CUDA_VISIBLE_DEVICES in this process ("" : none; engine.coordinator_gpus reserves one)."""
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    def node(self) -> str:
        """The Ray node this coordinator runs on (Ray backend only)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def set_initial(self, adapters: np.ndarray) -> None:
        self.algorithm.set_initial(adapters)

    def state_view(self) -> StateView:
        """The committed client state, the broadcast and the round's clip bound, for its workers."""
        view = self.store.view(self.algorithm.broadcast(), self.states)
        view.clip_norm = self.clip_norm
        view.base_update = self.algorithm.base_update()
        if view.base_update is not None:
            if self._base_digest is None:  # hashed once per round, not per view
                self._base_digest = content_digest(*(part for name in sorted(view.base_update)
                                                     for part in (name.encode(), view.base_update[name])))
            view.base_digest = self._base_digest
        return view

    def evaluation_digests(self, keys: list) -> dict:
        """{key: digest of what its evaluation reads}: the driver re-evaluates only changed keys."""
        return self.state_view().evaluation_digests(keys)

    def take_snapshot(self) -> dict | None:
        """The uploads kept at a snapshot round (report.adapter_snapshots), handed over once."""
        snapshot, self.snapshot = self.snapshot, None
        return snapshot

    def export_outcome(self) -> dict[str, np.ndarray] | None:
        """The newest round's whole global adapters with the keys and labels that received them."""
        return self.exported

    # --- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict[str, dict[str, np.ndarray]]:
        groups = self.store.to_groups()
        if len(self.states):
            groups["client_state"] = self.states.to_groups()["clients"]
        groups["server"] = self.algorithm.state()
        if self.exported is not None:
            groups["outcome"] = self.exported
        if self.config.privacy.adaptive_clipping:
            groups["privacy"] = {"clip_norm": np.array([self.clip_norm], dtype=np.float64)}
        return groups

    def load_state(self, groups: dict[str, dict[str, np.ndarray]]) -> None:
        self.store.load_groups(groups)
        if "client_state" in groups:
            kept = groups["client_state"]
            self.states = ClientStateStore(int(np.shape(kept["rows"])[-1]))
            self.states.load_groups({"clients": kept})
        self.algorithm.load_state(groups.get("server", {}))
        self._base_digest = None
        self.exported = groups.get("outcome")
        if "privacy" in groups:
            self.clip_norm = float(groups["privacy"]["clip_norm"][0])

    # --- a round ----------------------------------------------------------------------------
    def _accept(self, round_index: int, expected: set[AdapterKey], uploads: list[Upload]
                ) -> tuple[list[Upload], list[tuple[AdapterKey, str]]]:
        """Uploads that pass the checks, sorted by (client, slot), and the rejected ones with the
        reason. Anything not expected, or a key seen twice, is rejected, so each (round, client,
        slot) update is aggregated at most once."""
        width = self.algorithm.upload_width()
        seen: set[AdapterKey] = set()
        accepted, rejected = [], []
        for upload in uploads:
            key = tuple(upload.key)
            if key not in expected:
                problem = "unexpected (client, slot) for this round"
            elif key in seen:
                problem = "duplicate upload in this round"
            else:
                problem = upload_problem(upload.vector, int(upload.num_samples), width)
                if problem is not None and problem.startswith("shape"):  # the algorithm's own hooks disagree
                    problem += (f" ({type(self.algorithm).__name__}.upload_width() says {width}: upload() and "
                                "upload_width() / shared_entries() must agree)")
            seen.add(key)
            if problem is not None:
                log.warning("round %d: rejected upload of client %d slot %d: %s", round_index, key[0], key[1], problem)
                rejected.append((key, problem))
                continue
            accepted.append(upload)
        # Sorted by (client, slot): K-means and the float sums then see the same order whatever
        # the number of workers or their finishing order, so runs are reproducible.
        accepted.sort(key=lambda u: tuple(u.key))
        return accepted, rejected

    def _screen(self, round_index: int, accepted: list[Upload], vectors: np.ndarray | None
                ) -> tuple[np.ndarray, list[tuple[AdapterKey, str]], int, str]:
        """federation.screening over the checked uploads (screening.py), stacked in `vectors`
        (n, p): (n,) kept mask, the screened-out ones with the reason, and how many uploads of a
        group apart from the rest were kept, with the note saying so ("" when screening held)."""
        fed = self.config.federation
        if fed.screening == "none" or not accepted:
            return np.ones(len(accepted), dtype=bool), [], 0, ""
        k = fed.screening_neighbours or default_neighbours(len(accepted), self.algorithm.upload_groups())
        screen = screen_uploads(vectors, fed.screening, fed.screening_threshold, k)
        what = "norm" if fed.screening == "norm" else f"distance to its {k}-th nearest upload"
        screened = []
        for upload, kept, score in zip(accepted, screen.kept, screen.scores, strict=True):
            if not kept:
                key = tuple(upload.key)
                problem = (f"screened out: {what} {score:.4g} > {screen.limit:.4g} (the round's median + "
                           f"federation.screening_threshold = {fed.screening_threshold:g} robust deviations)")
                log.info("round %d: upload of client %d slot %d %s", round_index, key[0], key[1], problem)
                screened.append((key, problem))
        note = ""
        if screen.kept_apart:
            apart, n = int(screen.apart.sum()), len(accepted)
            below = float(screen.scores[~screen.apart].max())
            note = (f"screening may not hold: {apart} of {n} uploads sit apart from the rest ({what} >= "
                    f"{screen.apart_from:.4g}, the others <= {below:.4g}) and {screen.kept_apart} of them were "
                    f"kept; federation.screening = {fed.screening} screens out at most {screen.tolerates} of "
                    f"{n} uploads" + (f" (groups of more than k = {k} that agree shield each other)"
                                      if fed.screening == "neighbours" else " (its limit follows the median)"))
            if fed.screening_stop:
                raise ScreeningError(f"round {round_index}: {note}. federation.screening_stop ended the run "
                                     f"before round {round_index} was committed; the run folder keeps the last "
                                     "checkpoint")
        return screen.kept, screened, screen.kept_apart, note

    def _audit(self, checked: list[Upload], vectors: np.ndarray | None, kept: np.ndarray,
               outcome: Aggregate | None, truth: dict[AdapterKey, str]) -> dict[str, float]:
        """attacks.honest_damage of the round, in the simulator's own tables (the algorithm
        never sees `truth`). Call before the round is committed: it reads where each upload's
        training started (the committed adapter, or the broadcast v^0)."""
        if not checked:
            return {}
        malicious = self.attack.malicious if self.attack is not None else frozenset()
        if outcome is None:
            outcome = Aggregate(np.zeros(0, np.int64), np.zeros((0, len(checked[0].vector)), np.float32), np.zeros(0))
        first, shared = self.algorithm.broadcast()[0], self.algorithm.shared_entries()
        starts = []
        for upload in checked:
            start = self.store.adapter(tuple(upload.key))
            start = first if start is None else start
            starts.append(start if shared is None else start[shared])
        return honest_damage(
            [tuple(u.key) for u in checked], vectors, np.stack(starts),
            self.algorithm.weights(np.asarray([u.num_samples for u in checked])), kept,
            np.asarray(outcome.labels), outcome.adapters, truth, malicious, self.algorithm.recovers_tasks)

    def _aggregate(self, round_index: int, accepted: list[Upload]) -> Aggregate:
        uploads = Uploads(
            vectors=np.stack([u.vector for u in accepted]),
            num_samples=np.asarray([u.num_samples for u in accepted]),
            extras={name: np.stack([u.extras[name] for u in accepted]) for name in accepted[0].extras},
            meta={name: [u.meta.get(name) for u in accepted] for name in accepted[0].meta},
            owned=True,  # np.stack above made it
        )
        kept = None
        if round_index in self.snapshot_rounds:  # copied first: aggregation may reuse the matrix
            kept = sample_rows(len(accepted), self.config.report.snapshot_max_adapters,
                               self.config.seed, round_index)
            kept_vectors = uploads.vectors[kept].copy()
        noise = self._central_noise(round_index)
        self.algorithm.aggregate_noise = noise
        try:
            result = self.algorithm.aggregate(uploads, round_index)
        finally:
            self.algorithm.aggregate_noise = None
        if noise is not None and noise.calls == 0:
            self._refuse_answer("aggregate", round_index, "privacy.mode client_central adds its noise to the means of "
                                "cluster_means(), which this aggregate() never called, so its answers carry none")
        if (problem := answer_problem(result.labels, result.adapters, len(accepted))) is not None:
            self._refuse_answer("aggregate", round_index, problem)
        if kept is not None:
            keys = np.asarray([u.key for u in accepted], dtype=np.int64)
            self.snapshot = {"round": round_index, "adapters": kept_vectors,
                             "keys": keys[kept].reshape(-1, 2),
                             "labels": np.asarray(result.labels, dtype=np.int64)[kept]}
        return result

    def _central_noise(self, round_index: int) -> CentralNoise | None:
        """The round's noise under privacy.mode client_central, seeded per (seed, round)."""
        privacy = self.config.privacy
        if privacy.mode != "client_central":
            return None
        rng = np.random.default_rng([self.config.seed, PRIVACY_STREAM, 0, round_index])
        multiplier = privacy.noise_multiplier
        if privacy.adaptive_clipping:  # the count of unclipped uploads takes its share of the budget
            multiplier = quantile_noise(multiplier, privacy.quantile_share)[0]
        return CentralNoise(rng, multiplier, self.clip_norm)

    def _download_params(self, outcome: Aggregate | None, accepted: list[Upload], clients: int) -> int:
        """What the clients received: the algorithm's count, or under model.lora.rank_profile each
        accepted upload's answer within its client's rank."""
        if outcome is None:
            return 0
        if self.rank_masks is None or self.algorithm.counts_rank_traffic:
            return self.algorithm.download_params(outcome, clients)
        shared = self.algorithm.shared_entries()
        width = outcome.adapters.shape[1]
        return sum(width - self.rank_masks.padding(int(upload.key[0]), shared) for upload in accepted)

    def _adapt_clip_norm(self, round_index: int, accepted: list[Upload]) -> None:
        """privacy.adaptive_clipping: the next round's bound from this round's noised count of
        uploads whose update fitted under the bound (mechanism.next_clip_norm), seeded per
        (seed, round)."""
        privacy = self.config.privacy
        if not privacy.adaptive_clipping or not accepted:
            return
        unclipped = sum(bool(upload.meta.get("unclipped")) for upload in accepted)
        rng = np.random.default_rng([self.config.seed, PRIVACY_STREAM, 1, round_index])
        self.clip_norm, _ = next_clip_norm(self.clip_norm, unclipped, len(accepted), privacy.target_quantile,
                                           privacy.clip_learning_rate,
                                           quantile_noise(privacy.noise_multiplier, privacy.quantile_share)[1], rng)

    def _refuse_answer(self, hook: str, round_index: int, problem: str) -> None:
        """End the run before anything of the round is committed: a NaN answer would otherwise be
        committed, evaluated, exported, and blamed on the clients' uploads of the next round."""
        raise AlgorithmError(
            f"{type(self.algorithm).__name__}.{hook}() in round {round_index}: {problem}. Nothing of round "
            f"{round_index} was committed; the run folder keeps the last checkpoint (fix the algorithm, then "
            "fltac-ray run --resume RUN_DIR)")

    def receive(self, round_index: int, unit: int, result: PassResult, report: PassReport) -> PassReport:
        """Take one pass's result as soon as it exists (Ray resolves `result` from the worker's
        node into this process), so a worker node lost later costs nothing already trained.
        Results of an earlier round that was never closed (rejected) are dropped. Returns the
        pass's report: the driver learns the pass is safe here."""
        if round_index != self.receiving_round:
            self.received, self.receiving_round = {}, round_index
        self.received[unit] = result
        return report

    def close_round(self, round_index: int, expected: list[AdapterKey], clients: int,
                    truth: dict[AdapterKey, str] | None = None) -> RoundOutcome:
        """Check, screen and aggregate every upload of the round's received passes, then commit
        each trained job: an accepted upload takes the algorithm's merge of its trained adapter
        with its answer, a job that sent nothing keeps its trained adapter (merge with no
        answer), a rejected or screened-out upload leaves the client's adapter as it was.
        `clients`: sampled clients that delivered; `truth`: each job's task, given when the run
        has an attack or screening, to measure their effect (RoundOutcome.audit)."""
        started = time.perf_counter()
        if round_index != self.receiving_round:
            self.received = {}
        results = [self.received[unit] for unit in sorted(self.received)]  # pass order: reproducible
        self.received = {}
        uploads = [upload for result in results for upload in result.uploads]
        checked, rejected = self._accept(round_index, {tuple(k) for k in expected}, uploads)
        # (n, p) once for the screen and the audit (aggregation takes its own copy of the kept)
        measured = bool(checked) and (self.config.federation.screening != "none" or truth is not None)
        vectors = np.stack([u.vector for u in checked]) if measured else None
        kept, screened, kept_apart, screening_note = self._screen(round_index, checked, vectors)
        accepted = [upload for upload, keep in zip(checked, kept, strict=True) if keep]
        outcome = None
        if accepted:
            outcome = self._aggregate(round_index, accepted)
            self._base_digest = None  # the algorithm's base_update may have moved
        answer_of = {}
        if outcome is not None:
            answer_of = {tuple(u.key): outcome.adapters[label] for u, label in zip(accepted, outcome.labels, strict=True)}
        # a duplicate's first copy counts
        refused = {key for key, _ in rejected + screened} - set(answer_of)
        algorithm, adapters, private, states = self.algorithm, {}, {}, {}
        for result in results:
            for row, key in enumerate(result.keys):
                key = tuple(key)
                if key in refused:
                    continue  # the server refused it: the client rolls back to its committed state
                adapters[key] = algorithm.merge(result.trained[row], answer_of.get(key))
                if self.rank_masks is not None:  # a rank-r client holds the answer's first r ranks
                    adapters[key] = self.rank_masks.truncate(key[0], adapters[key])
                # what merge made of a (checked) answer; a client's own training result, kept where
                # it got no answer, is the client's, not the server's
                if key in answer_of and (problem := merged_problem(adapters[key], self.store.size)) is not None:
                    self._refuse_answer("merge", round_index, f"for client {key[0]} slot {key[1]} {problem}")
                if key in result.private:
                    private[key] = result.private[key]
                if key in result.client_state:
                    states[key] = result.client_state[key]
        product_error = float("nan")  # lora_products.py: only where uploads are whole adapters
        if outcome is not None and len(accepted[0].vector) == self.store.size:
            product_error = round_product_error([u.vector for u in accepted], np.asarray(outcome.labels),
                                                algorithm.weights(np.asarray([u.num_samples for u in accepted])),
                                                algorithm.spec.layout)
        audit = self._audit(checked, vectors, kept, outcome, truth) if truth is not None else {}
        clip_norm = self.clip_norm
        self.store.commit(adapters, private)
        self._adapt_clip_norm(round_index, accepted)
        if states:
            if not len(self.states):
                self.states = ClientStateStore(len(next(iter(states.values()))))
            self.states.commit(states, {})
        if outcome is not None:
            whole = algorithm.global_adapters(outcome)
            if whole is not None:
                self.exported = {"adapters": np.asarray(whole, dtype=np.float32),
                                 "labels": np.asarray(outcome.labels, dtype=np.int64),
                                 "keys": np.asarray([u.key for u in accepted], dtype=np.int64).reshape(-1, 2)}
        self.trim_heap()  # the round's stacked uploads (engine/memory.py)
        return RoundOutcome(
            keys=[tuple(u.key) for u in accepted],
            labels=np.asarray(outcome.labels, dtype=np.int64) if outcome is not None else np.zeros(0, np.int64),
            clusters=len(outcome.adapters) if outcome is not None else 0,
            recovers_tasks=bool(outcome is not None and algorithm.recovers_tasks),
            metrics=dict(outcome.metrics) if outcome is not None else {},
            rejected=rejected,
            screened=screened,
            kept_apart=kept_apart,
            lora_product_error=product_error,
            screening_note=screening_note,
            audit=audit,
            params_up=sum(u.params for u in uploads),
            params_down=self._download_params(outcome, accepted, clients),
            uploads=len(uploads),
            seconds=time.perf_counter() - started,
            clip_norm=float("nan") if clip_norm is None else clip_norm,
        )
