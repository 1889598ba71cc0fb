"""Differential privacy on what a federated task releases: the Gaussian mechanism on each round's
sum, at the level of one institution, with the noise drawn by the institutions themselves.

The unit of privacy is an **institution** (all its rows): two federations are neighbours when one
institution's contribution to a round is replaced by "no change" (zero-out adjacency; its sample
count is public, as it is committed on the ledger anyway). Each round, institution ``i`` with
``n_i`` training rows and the round's global parameters ``w`` sends, instead of ``n_i w_i``,

    n_i w + clip(n_i (w_i - w), n_i S) + N(0, (sigma S n_max)^2 / n)

where ``clip(v, b)`` scales ``v`` to L2 norm at most ``b``, ``S`` is the clip (``DPSettings.clip``,
in parameter units), ``n_max`` the largest institution's public count and ``n`` the number of
institutions. The released sum of a round is then the clipped weighted sum plus Gaussian noise of
standard deviation ``sigma S n_max`` per coordinate, a Gaussian mechanism with noise multiplier
``sigma`` (``DPSettings.noise_multiplier``) against the change of one institution, whose
sensitivity is ``n_i S <= n_max S``. The aggregate (the sum divided by the public total count,
:func:`fedmdh.secure.aggregation.secure_from_sum`) and everything computed from it afterwards are
post-processing. ``T`` rounds compose; :func:`epsilon` accounts for them exactly (Gaussian
differential privacy).

The noise is split among the institutions (each adds ``1/n`` of the variance), so it protects
against the coordinator and any reader of the aggregates only if every institution adds its share:
``k`` colluding institutions know theirs, and against them the remaining noise has multiplier
``sigma sqrt((n - k) / n)`` (:func:`report` gives the budget against ``n - 1`` colluders too).
Under ``--secure`` nobody but the institution sees its noised contribution; without it (the
in-process study path) the coordinator sees each one in the clear, and the guarantee holds only
for what is released afterwards.

Covered: FedAvg and FedProx (their contribution is ``n_i w_i``). Not covered: the setup phase's
pooled moments and label histogram (released once per task, without noise) and the other
algorithms (their contributions also carry moments whose sensitivity no parameter clip bounds).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmdh.algorithms import ALGORITHMS
from fedmdh.algorithms.base import Algorithm, Payload, Update
from fedmdh.algorithms.sums import contribution
from fedmdh.errors import InputError

#: Algorithms whose released sums can be noised (their contribution is ``n_i w_i``), as they declare it.
DP_COVERED = tuple(name for name, cls in ALGORITHMS.items() if cls.dp_applies)
#: Beyond this Gaussian-DP mu (epsilon above about mu^2 / 2 = 500,000) the budget is reported as
#: infinite: no guarantee worth a number (and the profile's float64 evaluation breaks down).
MU_NO_GUARANTEE = 1000.0
#: References that release nothing (``local``) may run beside a noised task.
DP_RELEASES_NOTHING = tuple(name for name, cls in ALGORITHMS.items() if not cls.federated and not cls.centralized)


@dataclass(frozen=True)
class DPSettings:
    """The Gaussian mechanism's settings: ``noise_multiplier`` (sigma, noise std over the
    sensitivity), ``clip`` (S: the L2 bound on one institution's change of the parameters in a
    round) and ``delta`` (the budget's delta)."""

    noise_multiplier: float
    clip: float = 0.01  # the best validation MSE of benchmarks/dp_utility.py's grid (docs/security.md)
    delta: float = 1e-5

    def __post_init__(self) -> None:
        for key, value in (("noise_multiplier", self.noise_multiplier), ("clip", self.clip)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"dp {key} must be a number > 0, got {value!r}.")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise InputError(f"dp delta must be in (0, 1), got {self.delta!r}.")

    def to_dict(self) -> dict[str, float]:
        return {"noise_multiplier": float(self.noise_multiplier), "clip": float(self.clip), "delta": float(self.delta)}


def check_dp_covered(algorithm: str | Algorithm) -> None:
    """Refuse, in one line, an algorithm (an instance, or a registered name) whose releases
    :mod:`fedmdh.secure.dp` cannot noise."""
    if isinstance(algorithm, str):
        cls = ALGORITHMS.get(algorithm)
        name, applies, silent = algorithm, cls is not None and cls.dp_applies, algorithm in DP_RELEASES_NOTHING
    else:
        name, applies = algorithm.name, algorithm.dp_applies
        silent = not algorithm.federated and not algorithm.centralized
    if applies or silent:
        return
    raise InputError(f"differential privacy covers {', '.join(DP_COVERED)} (their released sums are "
                     f"sample-weighted parameters); {name} also releases moments or inputs no parameter "
                     "clip bounds.")


def dp_contribution(algorithm: Algorithm, server_state: Payload, update: Update, settings: DPSettings,
                    n_max: float, n_parties: int, rng: np.random.Generator) -> np.ndarray:
    """Institution ``update.institution``'s noised contribution (the float64 vector it encrypts or
    sends instead of :func:`~fedmdh.secure.aggregation.secure_contribution`'s ``n_i w_i``).

    ``n_max``: the largest institution's public sample count; ``n_parties``: how many institutions
    share the noise; ``rng``: a generator nobody else can reproduce (a node draws it from the OS,
    :func:`private_rng`)."""
    check_dp_covered(algorithm)
    if n_parties < 1 or not n_max >= update.num_examples:
        raise ValueError(f"n_max ({n_max}) must be at least this institution's count ({update.num_examples}) "
                         f"and n_parties ({n_parties}) at least 1.")
    keys = sorted(update.payload)
    missing = [k for k in keys if k not in server_state]
    if missing:
        raise ValueError(f"the server state lacks {missing[0]!r} of the update.")
    n = float(update.num_examples)
    reference = contribution(Update(update.institution, {k: server_state[k] for k in keys}, update.num_examples))
    change = contribution(update) - reference
    norm = float(np.linalg.norm(change))
    bound = n * settings.clip
    if np.isfinite(norm) and norm > bound:  # a diverged update (nan) is caught by the caller's checks
        change = change * (bound / norm)
    std = settings.noise_multiplier * settings.clip * float(n_max) / math.sqrt(n_parties)
    return reference + change + rng.normal(0.0, std, size=change.size)


def noise_std(settings: DPSettings, n_max: float) -> float:
    """The standard deviation of the noise in a released sum (every institution's share added)."""
    return settings.noise_multiplier * settings.clip * float(n_max)


def private_rng() -> np.random.Generator:
    """A generator seeded from the operating system (a node's noise must not follow the task seed,
    which every party knows)."""
    return np.random.default_rng(secrets.randbits(128))


def epsilon(noise_multiplier: float | Sequence[float], releases: int, delta: float) -> float:
    """The exact epsilon at ``delta`` of ``releases`` Gaussian mechanisms of ``noise_multiplier`` (or
    of one mechanism per multiplier in a sequence; ``releases`` is then ignored); 0 for no release.

    Without subsampling, Gaussian mechanisms of multipliers ``sigma_r`` compose exactly into one of
    ``mu = sqrt(sum_r 1 / sigma_r^2)`` (Gaussian differential privacy, Dong, Roth and Su 2022,
    Corollary 3.3), whose privacy profile is ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu
    - mu/2)`` (Balle and Wang 2018, Theorem 8); epsilon is its root (scipy). ``dp_accounting``'s
    privacy-loss-distribution accountant agrees from above (tests/test_dp.py)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    sigmas = ([float(noise_multiplier)] * int(releases) if isinstance(noise_multiplier, (int, float))
              else [float(v) for v in noise_multiplier])
    if not sigmas:
        return 0.0
    if min(sigmas) <= 0:
        return float("inf")
    mu = math.sqrt(sum(1.0 / (v * v) for v in sigmas))
    if mu > MU_NO_GUARANTEE:
        return float("inf")

    def excess(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2))) - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = mu * mu / 2 + 10 * mu + 1.0
    while excess(hi) > 0:  # pragma: no cover - the bound above holds for delta >= 1e-20
        hi *= 2
    return float(brentq(excess, 0.0, hi, xtol=1e-12, rtol=1e-12))


def round_multipliers(settings: DPSettings, n_parties: int, participants: Sequence[int]) -> list[float]:
    """Each release's effective noise multiplier when ``m`` of the ``n`` institutions contributed to
    it (each adds ``1/n`` of the variance). Counted for every institution, also in a round it missed
    (where it loses nothing): the budget reported is an upper bound."""
    return [settings.noise_multiplier * math.sqrt(m / n_parties) for m in participants]


def report(settings: DPSettings, releases: int, n_parties: int,
           participants: Sequence[int] | None = None) -> dict[str, Any]:
    """The task's privacy budget as recorded in its results: epsilon against the coordinator and
    every reader of the aggregates, and against ``n - 1`` colluding institutions (who know their
    noise shares). ``participants``: how many institutions contributed to each release (all ``n``
    in each of ``releases`` when not given; a round without one has less noise)."""
    per_round = list(participants) if participants is not None else [n_parties] * int(releases)
    alone = round_multipliers(settings, n_parties, per_round)
    # the others know their own shares: only the target's own 1/n of the variance is left
    colluding = [settings.noise_multiplier * math.sqrt(1.0 / n_parties)] * len(per_round)
    eps = epsilon(alone, 0, settings.delta)
    eps_c = epsilon(colluding, 0, settings.delta)
    return {
        **settings.to_dict(),
        # JSON has no infinity: None is "no guarantee" (the noise is too small for any epsilon worth a number)
        "epsilon": eps if math.isfinite(eps) else None,
        "epsilon_against_n_minus_1_colluding": eps_c if math.isfinite(eps_c) else None,
        "unit": "institution (zero-out adjacency, counts public)",
        "mechanism": "Gaussian on each round's released sum, noise drawn by the institutions",
        "releases": len(per_round),
        "not_covered": "the setup's pooled moments and label histogram (released once, without noise)",
    }


def report_line(rep: Mapping[str, Any]) -> str:
    """One line for logs and the terminal."""
    def eps(v: Any) -> str:
        return "none (noise too small)" if v is None else f"{v:.3g}"

    return (f"differential privacy: epsilon {eps(rep['epsilon'])} at delta {rep['delta']:g} per institution over "
            f"{rep['releases']} released round sums (noise multiplier {rep['noise_multiplier']:g}, clip "
            f"{rep['clip']:g}); against n-1 colluding institutions epsilon "
            f"{eps(rep['epsilon_against_n_minus_1_colluding'])}")
