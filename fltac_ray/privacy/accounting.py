"""Privacy accounting by Google's dp-accounting library (never by hand here).

Under local client-level DP every round a client takes part in is one Gaussian mechanism of
multiplier z_client = z / sqrt(S) (mechanism.py) applied to that client. The server sees who took
part, so sampling does not amplify anything against it: a client's guarantee after n rounds is
the n-fold composition, and the run's epsilon is that of the client sampled most often. The
schedule is fixed by the seed (engine/run_setup.sample_clients), so the driver knows every
client's count in advance: `target_epsilon` calibrates z for the largest count before round 1.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable

ACCOUNTANTS = ("rdp", "pld")


def _accountant(kind: str):
    import dp_accounting

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


def participation_counts(schedule: Iterable[Iterable[int]]) -> Counter:
    """client -> how many rounds of `schedule` (one list of sampled clients per round) hold it."""
    counts: Counter = Counter()
    for sampled in schedule:
        counts.update(set(sampled))
    return counts
