"""A run's privacy plan and its epsilon after every round (`privacy:` in the experiment).

Settled on the driver before the backend starts, from the run's seeded sampling schedule: how
many rounds each client takes part in, the adapters a client sends per round (S), the noise
multiplier (given, or calibrated from `privacy.target_epsilon` for the client sampled most
often) and, with a given multiplier and a target, the last round the budget affords.

Example-level DP-SGD (mode example) counts, for every (client, task), the steps that may touch
one of its examples (the task's local steps per round times the client's rounds so far) and the
Poisson rate of each (train.batch_size / the client's examples of the task); the run's epsilon
is that of the worst such example.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from fltac_ray.privacy.accounting import (
    calibrate_example_noise,
    calibrate_noise_multiplier,
    calibrate_sampled_noise,
    composed_epsilon,
    example_epsilon,
    sampled_epsilon,
    worst_exposures,
)
from fltac_ray.privacy.mechanism import client_noise_multiplier, quantile_noise
from fltac_ray.privacy.sketch import split_noise


@dataclass(frozen=True)
class PrivacyLedger:
    mode: str
    clip_norm: float
    noise_multiplier: float  # z: each upload gets N(0, (z C)^2) per coordinate
    adapters_per_client: int  # S: the most adapters one client sends in a round
    delta: float
    accountant: str
    target_epsilon: float | None
    epsilons: tuple[float, ...]  # epsilon after round r at index r - 1 (the most-sampled client's)
    calibrated: bool  # z was calibrated from target_epsilon
    population: int = 0  # client_central: the clients sampling draws from (N) ...
    sampled: int = 0  # ... and how many each round (m)
    sampling_rate: float = 0.0  # example: the largest Poisson rate of a DP-SGD step
    sketch: str = "none"  # client_local: the upload's sketch (privacy/sketch.py) ...
    sketch_share: float = 0.0  # ... and its share of the budget
    adaptive_share: float = 0.0  # client_central with adaptive clipping: the noised count's share

    @classmethod
    def plan(cls, settings, schedule: list[list[int]], adapters_per_client: int, clients: int,
             population: int | None = None, exposures: dict[int, list[tuple[float, int]]] | None = None,
             examples: int = 0) -> PrivacyLedger:
        """`settings`: the config's privacy section; `schedule`: the sampled clients of rounds 1..R;
        `clients`: the federation's size (default delta = 1 / clients); `population`: the clients
        sampling draws from (those holding data; default `clients`). Example-level DP-SGD:
        `exposures`, client -> (Poisson rate, DP-SGD steps per round) of each of its tasks, and
        `examples`, the federation's training examples (default delta = 1 / examples)."""
        if settings.mode == "example":
            delta = settings.delta if settings.delta is not None else 1.0 / max(1, examples)
            return cls._example(settings, schedule, exposures or {}, delta)
        delta = settings.delta if settings.delta is not None else 1.0 / clients
        if settings.mode == "client_central":
            return cls._central(settings, schedule, adapters_per_client, population or clients, delta)
        so_far: Counter = Counter()
        most = []  # the largest participation count after each round
        for sampled in schedule:
            so_far.update(set(sampled))
            most.append(max(so_far.values(), default=0))
        calibrated = settings.noise_multiplier is None
        if calibrated:
            client_z = calibrate_noise_multiplier(settings.target_epsilon, most[-1] if most else 0, delta,
                                                  settings.accountant)
            z = client_z * math.sqrt(max(1, adapters_per_client))
        else:
            z = settings.noise_multiplier
            client_z = client_noise_multiplier(z, adapters_per_client)
        epsilons = tuple(composed_epsilon(client_z, count, delta, settings.accountant) for count in most)
        return cls(settings.mode, settings.clip_norm, z, adapters_per_client, delta, settings.accountant,
                   settings.target_epsilon, epsilons, calibrated, sketch=settings.sketch,
                   sketch_share=settings.sketch_share if settings.sketch != "none" else 0.0)

    @classmethod
    def _central(cls, settings, schedule: list[list[int]], adapters_per_client: int, population: int,
                 delta: float) -> PrivacyLedger:
        """client_central: every round a sampled Gaussian mechanism of multiplier z / (2 S)
        (accounting.py); the same m of N clients are drawn each round."""
        sampled, rounds, share = (len(schedule[0]) if schedule else 0), len(schedule), 2 * max(1, adapters_per_client)
        calibrated = settings.noise_multiplier is None
        if calibrated:
            z = calibrate_sampled_noise(settings.target_epsilon, population, sampled, rounds, delta) * share
        else:
            z = settings.noise_multiplier
        epsilons = tuple(sampled_epsilon(z / share, population, sampled, r, delta) for r in range(1, rounds + 1))
        return cls(settings.mode, settings.clip_norm, z, adapters_per_client, delta, settings.accountant,
                   settings.target_epsilon, epsilons, calibrated, population, sampled,
                   adaptive_share=settings.quantile_share if settings.adaptive_clipping else 0.0)

    @classmethod
    def _example(cls, settings, schedule: list[list[int]], exposures: dict[int, list[tuple[float, int]]],
                 delta: float) -> PrivacyLedger:
        """Example-level DP-SGD: after each round, the worst (rate, steps so far) pairs over every
        (client, task); a calibrated multiplier keeps the last round's worst within the target."""
        so_far: Counter = Counter()
        frontiers = []  # per round, the (rate, steps) pairs that may be the worst example's
        for sampled in schedule:
            so_far.update(set(sampled))
            frontiers.append(worst_exposures((rate, steps * so_far[client]) for client in so_far
                                             for rate, steps in exposures.get(client, [])))
        calibrated = settings.noise_multiplier is None
        if calibrated:
            z = max((calibrate_example_noise(settings.target_epsilon, rate, steps, delta, settings.accountant)
                     for rate, steps in (frontiers[-1] if frontiers else [])), default=0.0)
        else:
            z = settings.noise_multiplier
        epsilons = tuple(max((example_epsilon(z, rate, steps, delta, settings.accountant)
                              for rate, steps in frontier), default=0.0) for frontier in frontiers)
        rate = max((rate for pairs in exposures.values() for rate, _ in pairs), default=0.0)
        return cls(settings.mode, settings.clip_norm, z, 1, delta, settings.accountant, settings.target_epsilon,
                   epsilons, calibrated, sampling_rate=rate)

    def epsilon_after(self, round_index: int) -> float:
        return self.epsilons[round_index - 1] if round_index >= 1 else 0.0

    @property
    def last_round(self) -> int:
        """The last round whose epsilon stays within target_epsilon (all rounds without a target)."""
        if self.target_epsilon is None:
            return len(self.epsilons)
        # a calibrated multiplier meets the target up to the search's tolerance
        within = [r for r, eps in enumerate(self.epsilons, 1) if eps <= self.target_epsilon * (1 + 1e-6)]
        return within[-1] if within else 0

    def describe(self) -> str:
        """The start-up line's privacy part."""
        how = (f"calibrated for epsilon {self.target_epsilon:g}" if self.calibrated
               else "as given" + (f", budget epsilon {self.target_epsilon:g}" if self.target_epsilon else ""))
        if self.mode == "example":
            return (f"privacy: example-level DP-SGD, each example's gradient clipped to {self.clip_norm:g}, noise "
                    f"multiplier {self.noise_multiplier:.4g} ({how}), Poisson sampling at rates up to "
                    f"{self.sampling_rate:.3g}, delta {self.delta:.3g}, {self.accountant.upper()} accounting: "
                    f"epsilon {self.epsilons[-1] if self.epsilons else 0.0:.3g} after round {len(self.epsilons)}")
        if self.mode == "client_central":
            per_client = (f"noise on every group mean; {self.adapters_per_client} adapter(s) per client, so "
                          f"{self.noise_multiplier / (2 * max(1, self.adapters_per_client)):.4g} per round "
                          f"for replacing a client, {self.sampled} of {self.population} clients sampled")
            if self.adaptive_share:
                means, count = quantile_noise(self.noise_multiplier, self.adaptive_share)
                per_client += (f"; adaptive clipping from {self.clip_norm:g}: the noised count of unclipped uploads "
                               f"takes {self.adaptive_share:g} of it (noise std {count:.4g}), the means "
                               f"{means:.4g}")
        else:
            per_client = (f"{self.adapters_per_client} adapter(s) per client, so "
                          f"{client_noise_multiplier(self.noise_multiplier, self.adapters_per_client):.4g} per client")
            if self.sketch != "none":
                upload_z, sketch_z = split_noise(self.noise_multiplier, self.sketch_share)
                per_client += (f"; a {self.sketch} sketch per upload takes {self.sketch_share:g} of it: "
                               f"{upload_z:.4g} on the upload, {sketch_z:.4g} on the sketch")
        return (f"privacy: {self.mode} client-level DP, clip {self.clip_norm:g}, noise multiplier "
                f"{self.noise_multiplier:.4g} ({how}; {per_client}), delta {self.delta:.3g}, "
                f"{self.accountant.upper()} accounting: epsilon {self.epsilons[-1] if self.epsilons else 0.0:.3g} "
                f"after round {len(self.epsilons)}")
