"""Privacy accounting by Google's dp-accounting library (never by hand here).

client_central: the noise is on the server's means and only those leave it, so whoever reads them
does not know who was sampled: each round is one sampled Gaussian mechanism, m of the N clients
drawn without replacement (engine/run_setup.sample_clients), under "replace one client"
neighbouring (the relation dp-accounting's RDP accountant supports for that sampling; N is
public). Replacing a client changes each of its clipped uploads by up to 2C, and its S uploads may
all land in one group, so the multiplier per round is z / (2 S).

Under local client-level DP every round a client takes part in is one Gaussian mechanism of
multiplier z_client = z / sqrt(S) (mechanism.py) applied to that client. The server sees who took
part, so sampling does not amplify anything against it: a client's guarantee after n rounds is
the n-fold composition, and the run's epsilon is that of the client sampled most often. The
schedule is fixed by the seed (engine/run_setup.sample_clients), so the driver knows every
client's count in advance: `target_epsilon` calibrates z for the largest count before round 1.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable

ACCOUNTANTS = ("rdp", "pld")


def _quiet_absl() -> None:
    """dp-accounting's RDP code logs a warning through absl for every order whose series does not
    converge (that order is left out of the bound, as it should be): dozens of lines per
    calibration, none of them actionable."""
    logging.getLogger("absl").setLevel(logging.ERROR)


def _accountant(kind: str):
    import dp_accounting

    _quiet_absl()

    if kind == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.PLDAccountant()


@functools.lru_cache(maxsize=4096)
def composed_epsilon(noise_multiplier: float, count: int, delta: float, kind: str = "rdp") -> float:
    """epsilon at `delta` of `count` Gaussian mechanisms of multiplier `noise_multiplier`
    (sensitivity 1, noise std z), composed; 0 for count 0, inf for z 0."""
    import dp_accounting

    if count == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = _accountant(kind)
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), count)
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, count: int, delta: float, kind: str = "rdp") -> float:
    """The smallest multiplier whose `count`-fold composition stays within `target_epsilon` at
    `delta` (dp-accounting's calibrate_dp_mechanism, a bracketed search)."""
    import dp_accounting

    if count == 0:
        return 0.0
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(kind),
        lambda z: dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), count),
        target_epsilon, delta))


def _sampled_rounds(noise_multiplier: float, population: int, sampled: int, rounds: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        population, sampled, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds)


def _replace_one():
    import dp_accounting

    _quiet_absl()
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


@functools.lru_cache(maxsize=4096)
def sampled_epsilon(noise_multiplier: float, population: int, sampled: int, rounds: int, delta: float) -> float:
    """epsilon at `delta` after `rounds` rounds that each draw `sampled` of `population` clients
    without replacement and release a Gaussian mechanism of multiplier `noise_multiplier`
    (RDP, replace-one neighbouring)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = _replace_one()
    accountant.compose(_sampled_rounds(noise_multiplier, population, sampled, rounds))
    return float(accountant.get_epsilon(delta))


def calibrate_sampled_noise(target_epsilon: float, population: int, sampled: int, rounds: int,
                            delta: float) -> float:
    """The smallest multiplier whose `rounds` sampled rounds stay within `target_epsilon`."""
    import dp_accounting

    if rounds == 0:
        return 0.0
    # the search starts above 0: the sampled mechanism's RDP divides by z^2
    interval = dp_accounting.LowerEndpointAndGuess(lower_endpoint=1e-3, initial_guess=1.0)
    return float(dp_accounting.calibrate_dp_mechanism(
        _replace_one, lambda z: _sampled_rounds(z, population, sampled, rounds), target_epsilon, delta,
        bracket_interval=interval))


def _poisson_steps(noise_multiplier: float, rate: float, steps: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


@functools.lru_cache(maxsize=4096)
def example_epsilon(noise_multiplier: float, rate: float, steps: int, delta: float, kind: str = "rdp") -> float:
    """Example-level DP-SGD: epsilon at `delta` after `steps` steps that each sample every example
    with probability `rate` (Poisson) and release a Gaussian mechanism of multiplier
    `noise_multiplier` (add/remove-one-example neighbouring)."""
    if steps == 0 or rate == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = _accountant(kind)
    accountant.compose(_poisson_steps(noise_multiplier, rate, steps))
    return float(accountant.get_epsilon(delta))


def calibrate_example_noise(target_epsilon: float, rate: float, steps: int, delta: float,
                            kind: str = "rdp") -> float:
    """The smallest DP-SGD multiplier whose `steps` Poisson-sampled steps at `rate` stay within
    `target_epsilon`."""
    import dp_accounting

    if steps == 0 or rate == 0:
        return 0.0
    interval = dp_accounting.LowerEndpointAndGuess(lower_endpoint=1e-2, initial_guess=1.0)
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(kind), lambda z: _poisson_steps(z, rate, steps), target_epsilon, delta,
        bracket_interval=interval))


def worst_exposures(exposures: Iterable[tuple[float, int]]) -> list[tuple[float, int]]:
    """The (sampling rate, steps) pairs no other pair dominates (at least as large in both):
    epsilon grows with each, so the run's worst example is among them."""
    pairs = sorted(set(exposures), key=lambda pair: (-pair[0], -pair[1]))
    frontier: list[tuple[float, int]] = []
    for rate, steps in pairs:
        if not frontier or steps > frontier[-1][1]:
            frontier.append((rate, steps))
    return frontier


def participation_counts(schedule: Iterable[Iterable[int]]) -> Counter:
    """client -> how many rounds of `schedule` (one list of sampled clients per round) hold it."""
    counts: Counter = Counter()
    for sampled in schedule:
        counts.update(set(sampled))
    return counts
