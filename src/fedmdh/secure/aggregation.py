"""A round's aggregate through a secure sum, for the algorithms whose aggregate is a function of sums.

Each algorithm says itself whether it is covered (:attr:`~fedmdh.algorithms.base.Algorithm.secure_reveals`
is ``None``) and how: each institution turns its :class:`~fedmdh.algorithms.base.Update` into one float64
vector (:meth:`~fedmdh.algorithms.base.Algorithm.secure_contribution`), the vectors are summed under
threshold encryption (a :data:`SecureSum`), and the aggregate follows from the decrypted sum and public
numbers (:meth:`~fedmdh.algorithms.base.Algorithm.aggregate_from_sum`; the shared arithmetic is in
:mod:`fedmdh.algorithms.sums`). Covered today: FedAvg and FedProx, FedGAN, FedMDH and its ablations.

Every other algorithm is refused with :func:`check_covered`, which names what its aggregation would still
reveal (its ``secure_reveals``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedmdh.algorithms import ALGORITHMS
from fedmdh.algorithms.base import Algorithm, Payload, Update
from fedmdh.algorithms.sums import contribution, layout, mean_from_sum as aggregate_from_sum
from fedmdh.errors import InputError

__all__ = ["COVERED", "NOT_COVERED", "SecureSum", "aggregate_from_sum", "check_covered", "contribution", "layout",
           "secure_contribution", "secure_from_sum"]

#: ``{institution: vector} -> sum of the vectors`` (computed under encryption, e.g.
#: :meth:`fedmdh.secure.threshold.ThresholdGroup.secure_sum`).
SecureSum = Callable[[Mapping[str, np.ndarray]], np.ndarray]

#: The covered algorithms' names, as the algorithms declare it.
COVERED = tuple(name for name, cls in ALGORITHMS.items() if cls.secure_reveals is None)
#: What each algorithm not covered would still show the aggregator in the clear, as it declares it.
NOT_COVERED: dict[str, str] = {name: cls.secure_reveals for name, cls in ALGORITHMS.items()
                               if cls.secure_reveals is not None}


def check_covered(algorithm: str | Algorithm) -> None:
    """Raise :class:`InputError` with one line when ``algorithm`` (an instance, or a registered name) has
    no secure aggregation."""
    if isinstance(algorithm, str):
        name, reveals = algorithm, (ALGORITHMS[algorithm].secure_reveals if algorithm in ALGORITHMS
                                    else "its individual updates")
    else:
        name, reveals = algorithm.name, algorithm.secure_reveals
    if reveals is None:
        return
    raise InputError(f"--secure covers {', '.join(COVERED)} only; {name} would still reveal {reveals}. "
                     f"Run {name} without --secure, or use one of those.")


def secure_contribution(algorithm: Algorithm, server_state: Payload, update: Update) -> np.ndarray:
    """The float64 vector institution ``update.institution`` encrypts in a secure round (its own
    computation: in a deployment, on its node)."""
    check_covered(algorithm)
    return algorithm.secure_contribution(update, server_state)


def secure_from_sum(algorithm: Algorithm, server_state: Payload, template: Update, total: np.ndarray,
                    count: float) -> Payload:
    """The aggregate from the decrypted sum of the contributions and the public ``count`` (the sum
    of the committed sample counts); ``template``: any one update of the round (its layout only:
    in a deployment, the institution's own)."""
    check_covered(algorithm)
    if count <= 0:
        raise ValueError("weights must sum to a positive number.")
    return algorithm.aggregate_from_sum(server_state, template, np.asarray(total, dtype=np.float64), float(count))
