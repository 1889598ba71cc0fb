"""One round, written once: local training, the aggregation step, the divergence check.

Every mode drives these functions: the in-process simulator (:mod:`fedmdh.runtime.simulator`), a deployed
node (:mod:`fedmdh.runtime.node`: trains and contributes on its own machine, combines the round's released
sum or relayed updates itself) and the verifier that recomputes a round from the ledger.

A round has two sides, so that the institution's side can run where its rows are:

1. **At each institution**: :func:`train` (its ``client_update`` with its own generator), then
   ``aggregation.contribution(...)``: what it sends for the aggregate. In the clear that is the update
   itself; in a secure round, the float64 vector its algorithm's
   :meth:`~fedmdh.algorithms.base.Algorithm.secure_contribution` gives (encrypted by the caller); with
   differential privacy, that vector clipped and noised (:func:`fedmdh.secure.dp.dp_contribution`).
2. **At every peer**: ``aggregation.combine(...)``: the next server state from the round's updates (in the
   clear, :meth:`~fedmdh.algorithms.base.Algorithm.aggregate`) or from the released sum of the
   contributions and the public count (:meth:`~fedmdh.algorithms.base.Algorithm.aggregate_from_sum`),
   then :func:`check_round`, which stops a diverged run with :class:`~fedmdh.errors.TrainingDiverged`.

How the vectors are summed (in float64 in institution order, or under threshold CKKS) is the caller's:
the simulator calls :func:`aggregate`, which sums through a given ``secure_sum`` or in the clear; a
deployment sums under encryption across machines and hands the released sum to ``combine``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmdh.algorithms.base import Algorithm, Payload, Update, ordered
from fedmdh.data.federation import InstitutionData
from fedmdh.errors import TrainingDiverged
from fedmdh.runtime.protocol import ClientSlot, aggregate_rng, client_rng
from fedmdh.secure.aggregation import SecureSum, check_covered, secure_contribution, secure_from_sum
from fedmdh.secure.dp import DPSettings, check_dp_covered, dp_contribution

#: A round's mean training loss above this (standardised units, where predicting the mean scores about 1)
#: is called diverged.
DIVERGED_LOSS = 1e10

#: ``(institution, round) -> generator`` of an institution's DP noise: seeded in the simulator (a run
#: repeats), drawn from the OS on a deployed node (:func:`fedmdh.secure.dp.private_rng`).
NoiseSource = Callable[[str, int], np.random.Generator]


def train(algorithm: Algorithm, server: Payload, slot: ClientSlot, data: InstitutionData, seed: int, rnd: int,
          name: str | None = None) -> tuple[Update, Any]:
    """Institution ``name``'s local training in round ``rnd`` (``name``: ``data.name`` unless given, e.g. the
    pooled reference): its ``client_update`` from its stored private state, with the generator
    :func:`~fedmdh.runtime.protocol.client_rng` derives; the new private state is stored back.
    Returns the update and the private state."""
    update, client = algorithm.client_update(server, slot.get(), data, client_rng(seed, rnd, name or data.name), rnd)
    slot.put(client)
    return update, client


@dataclass(frozen=True)
class Aggregation:
    """How a round is aggregated: in the clear, from a secure sum (``secure``), with DP noise (``dp``) on
    either. The same object describes the step at every peer; see the module docstring."""

    secure: bool = False
    dp: DPSettings | None = None

    @property
    def from_sums(self) -> bool:
        """Whether the aggregate is computed from a sum of contribution vectors (secure, DP or both)."""
        return self.secure or self.dp is not None

    def check(self, algorithm: Algorithm) -> None:
        """Refuse, in one line, an algorithm this aggregation cannot run (before anything trains)."""
        if self.secure:
            check_covered(algorithm)
        if self.dp is not None:
            check_dp_covered(algorithm)

    def contribution(self, algorithm: Algorithm, server: Payload, update: Update, *, n_max: float = 0.0,
                     n_parties: int = 1, noise: np.random.Generator | None = None) -> np.ndarray | None:
        """What institution ``update.institution`` sends for the aggregate besides its update: ``None`` in
        the clear (the update is what counts); the vector its algorithm contributes to the sum; with DP,
        that vector clipped and noised with its share of the noise (``n_max``: the largest public count;
        ``n_parties``: how many share the noise; ``noise``: its own generator)."""
        if self.dp is not None:
            if noise is None:
                raise ValueError("a DP contribution needs the institution's noise generator")
            return dp_contribution(algorithm, server, update, self.dp, n_max, n_parties, noise)
        if self.secure:
            return secure_contribution(algorithm, server, update)
        return None

    def combine(self, algorithm: Algorithm, server: Payload, rnd: int, seed: int, *,
                updates: Sequence[Update] = (), total: np.ndarray | None = None, template: Update | None = None,
                count: float | None = None) -> Payload:
        """The next server state. In the clear from ``updates`` (ordered by institution; ``seed`` gives the
        round's aggregation generator); from sums, from ``total`` (the released sum of the contributions),
        the public ``count`` and ``template`` (any one update of the round: its layout). Raises
        :class:`TrainingDiverged` for a numerical failure (an SVD of NaN weights)."""
        try:
            if not self.from_sums:
                return algorithm.aggregate(server, list(updates), aggregate_rng(seed, rnd), rnd)
            if total is None or template is None or count is None:
                raise ValueError("an aggregate from sums needs the released total, a template update and the count")
            with np.errstate(invalid="ignore", over="ignore"):  # a diverged round is reported by check_round
                return secure_from_sum(algorithm, server, template, total, count)
        except np.linalg.LinAlgError as exc:
            raise TrainingDiverged(rnd, float("nan"), f"numerical failure: {exc}") from None


def mean_loss(updates: Sequence[Update]) -> float:
    """The round's training loss: the institutions' losses weighted by their sample counts."""
    n = sum(u.num_examples for u in updates)
    return float(sum(u.metrics.get("loss", 0.0) * u.num_examples for u in updates) / max(n, 1))


def check_round(rnd: int, updates: Sequence[Update], server: Payload) -> None:
    """Raise :class:`TrainingDiverged` when round ``rnd``'s losses (``updates``: the ones this peer sees;
    a deployed node sees its own) or aggregate are not usable numbers."""
    loss = mean_loss(updates)
    if not np.isfinite(loss) or loss > DIVERGED_LOSS:
        raise TrainingDiverged(rnd, loss)
    for key, value in server.items():
        a = np.asarray(value)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise TrainingDiverged(rnd, float("nan"), f"the aggregate's {key!r} holds {a[~np.isfinite(a)].flat[0]}")


def check_update(rnd: int, update: Update) -> None:
    """Raise :class:`TrainingDiverged` when one institution's update of round ``rnd`` is not usable (its loss
    not finite or above :data:`DIVERGED_LOSS`, an array not finite): what a deployed node checks before it
    commits, since it sees only its own update (:func:`check_round` checks the round once aggregated)."""
    loss = float(update.metrics.get("loss", 0.0))
    if not np.isfinite(loss) or loss > DIVERGED_LOSS:
        raise TrainingDiverged(rnd, loss)
    for key, value in update.payload.items():
        a = np.asarray(value)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise TrainingDiverged(rnd, float("nan"), f"the update's {key!r} holds {a[~np.isfinite(a)].flat[0]}")


def clear_sum(vectors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The sum of the institutions' vectors in float64, in institution order (the in-process study path:
    the vectors are seen in the clear)."""
    names = sorted(vectors)
    total = np.zeros_like(np.asarray(vectors[names[0]], dtype=np.float64))
    with np.errstate(invalid="ignore", over="ignore"):  # a diverged round is reported by check_round
        for name in names:
            total = total + vectors[name]
    return total


def aggregate(aggregation: Aggregation, algorithm: Algorithm, server: Payload, updates: Sequence[Update], rnd: int,
              seed: int, secure_sum: SecureSum | None = None, noise: NoiseSource | None = None) -> Payload:
    """Round ``rnd``'s aggregation step with every institution in one process: each one's contribution,
    their sum (through ``secure_sum``, else :func:`clear_sum`), the combined state, checked."""
    ups = ordered(updates)
    if not aggregation.from_sums:
        new = aggregation.combine(algorithm, server, rnd, seed, updates=ups)
    else:
        shapes = [[(k, np.shape(u.payload[k])) for k in sorted(u.payload)] for u in ups]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("the institutions' updates do not share one layout.")
        n_max = max(float(u.num_examples) for u in ups)
        vectors = {u.institution: aggregation.contribution(
            algorithm, server, u, n_max=n_max, n_parties=len(ups),
            noise=noise(u.institution, rnd) if noise is not None else None) for u in ups}
        total = (secure_sum or clear_sum)(vectors)
        new = aggregation.combine(algorithm, server, rnd, seed, total=total, template=ups[0],
                                  count=float(sum(u.num_examples for u in ups)))
    check_round(rnd, ups, new)
    return new
