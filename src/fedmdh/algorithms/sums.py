"""Aggregates written as functions of sums over institutions: the arithmetic a secure round needs.

An algorithm whose aggregate depends on the institutions' updates only through sums (FedAvg's
``sum_i n_i w_i``, FedMDH's moments) says so by implementing
:meth:`~fedmdh.algorithms.base.Algorithm.secure_contribution` (the float64 vector one institution
contributes) and :meth:`~fedmdh.algorithms.base.Algorithm.aggregate_from_sum` (the next server state
from the sum of those vectors and the public count ``sum_i n_i``). How the sum is taken (in the clear,
under threshold CKKS, with DP noise added) is the caller's business: :mod:`fedmdh.secure` drives it.

This module holds the pieces the algorithms share: a payload's flattening order, ``n_i w_i``
flattened, and the weighted mean back from its sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmdh.algorithms.base import Payload, Update


def layout(payload: Payload) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The order (by key), shapes and dtypes in which a payload is flattened."""
    return [(k, tuple(np.shape(payload[k])), np.asarray(payload[k]).dtype) for k in sorted(payload)]


def contribution(update: Update, keys: Sequence[str] | None = None) -> np.ndarray:
    """``n_i * w_i`` flattened in key order, float64 (``keys``: only those entries of the payload)."""
    n = float(update.num_examples)
    payload = update.payload if keys is None else {k: update.payload[k] for k in keys}
    return np.concatenate([np.asarray(payload[k], dtype=np.float64).ravel() * n for k, _, _ in layout(payload)])


def cast(mean: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``mean`` as ``dtype``; integer entries (e.g. a batch norm's ``num_batches_tracked``) are
    rounded first, since a decrypted sum is within CKKS's error, not exact (5.9999999 is 6, not 5)."""
    if np.issubdtype(dtype, np.integer):
        mean = np.rint(mean)
    return np.asarray(mean).astype(dtype)


def mean_from_sum(template: Payload, total: np.ndarray, count: float) -> Payload:
    """The weighted mean from the decrypted ``sum_i n_i w_i`` and the public ``count = sum_i n_i``
    (``template``: any payload of the layout summed)."""
    out: Payload = {}
    offset = 0
    for key, shape, dtype in layout(template):
        size = int(np.prod(shape, dtype=np.int64))
        out[key] = cast((total[offset:offset + size] / count).reshape(shape), dtype)
        offset += size
    if offset != total.size:
        raise ValueError(f"a secure sum of {total.size} values does not fit the payload's {offset}.")
    return out


def moment_sums(n: float, mean: float, var: float) -> np.ndarray:
    """``[n mu, n (var + mu^2)]``: one Gaussian's share of a mixture's moments as sums."""
    return np.array([n * mean, n * (var + mean * mean)])


def moments_from_sums(sums: np.ndarray, count: float) -> np.ndarray:
    """``[mu, var]`` of the mixture from the summed :func:`moment_sums` (what
    :func:`~fedmdh.algorithms.gaussian.mixture_moments` gives from the individual moments)."""
    mu = float(sums[0] / count)
    return np.array([mu, max(float(sums[1] / count - mu * mu), 0.0)])


class SumReader:
    """Reads consecutive slices of a summed vector, checking at the end that it was used whole."""

    def __init__(self, total: np.ndarray, what: str) -> None:
        self.total, self.offset, self.what = np.asarray(total, dtype=np.float64), 0, what

    def take(self, size: int) -> np.ndarray:
        out = self.total[self.offset:self.offset + size]
        self.offset += size
        return out

    def done(self) -> None:
        if self.offset != self.total.size:
            raise ValueError(f"a secure sum of {self.total.size} values does not fit {self.what}'s {self.offset}.")
