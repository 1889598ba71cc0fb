"""Which aggregates can be computed from a secure sum, and how.

A covered algorithm's aggregate is a function of *sums over institutions* only: each institution
turns its :class:`~fedmdh.algorithms.base.Update` into one float64 vector (:func:`contribution`),
the vectors are summed under threshold encryption (a :data:`SecureSum`), and the aggregate follows
from the decrypted sum and public numbers (:func:`aggregate_from_sum`). Covered:

- FedAvg and FedProx: the new weights are ``sum_i n_i w_i / sum_i n_i``; the counts ``n_i`` are
  public already (each institution commits its count on the ledger);
- FedGAN: the regressor, generator and discriminator the same way, and the label distribution's
  mixture moments from ``sum_i n_i mu_i`` and ``sum_i n_i (var_i + mu_i^2)``.

Every other algorithm is refused with :func:`check_covered`, which names what its aggregation
would still reveal (:data:`NOT_COVERED`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedmdh.algorithms.base import Algorithm, Payload, Update, ordered
from fedmdh.errors import InputError

#: ``{institution: vector} -> sum of the vectors`` (computed under encryption, e.g.
#: :meth:`fedmdh.secure.threshold.ThresholdGroup.secure_sum`).
SecureSum = Callable[[Mapping[str, np.ndarray]], np.ndarray]

COVERED = ("fedavg", "fedprox", "fedgan")

#: What each algorithm not covered would still show the aggregator in the clear.
NOT_COVERED: dict[str, str] = {
    "fedmdh": "its per-institution latent Gaussians (GFAM's W2 barycenter is a fixed point over individual "
              "means and covariances) and per-institution prediction moments; the shared networks and anchor "
              "sums are summable but not wired yet",
    "fedmdh-no-gfam": "per-institution prediction moments and the CGAN's parameters (summable, not wired yet)",
    "fedmdh-no-cgan": "per-institution latent Gaussians (a W2 barycenter needs individual inputs)",
    "fedmdh-no-rkd": "per-institution latent Gaussians (a W2 barycenter needs individual inputs)",
    "flic": "each institution's embedded latent samples (the Wasserstein barycenter needs individual inputs)",
    "fedgen": "each institution's predictor head (the server trains its generator on the individual heads)",
    "fedkd": "each institution's SVD factors of its update (an SVD needs the individual matrix)",
    "local": "nothing, it never communicates, so there is nothing to protect",
    "pooled": "all rows: it is the non-federated reference",
}


def check_covered(algorithm: str) -> None:
    """Raise :class:`InputError` with one line when ``algorithm`` has no secure aggregation."""
    if algorithm in COVERED:
        return
    reveals = NOT_COVERED.get(algorithm, "its individual updates")
    raise InputError(f"--secure covers {', '.join(COVERED)} only; {algorithm} would still reveal {reveals}. "
                     f"Run {algorithm} without --secure, or use {' or '.join(COVERED)}.")


def layout(payload: Payload) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The order (by key), shapes and dtypes in which a payload is flattened."""
    return [(k, tuple(np.shape(payload[k])), np.asarray(payload[k]).dtype) for k in sorted(payload)]


def contribution(update: Update, keys: Sequence[str] | None = None) -> np.ndarray:
    """What institution ``update.institution`` encrypts: ``n_i * w_i`` flattened in key order, float64
    (``keys``: only those entries of the payload)."""
    n = float(update.num_examples)
    payload = update.payload if keys is None else {k: update.payload[k] for k in keys}
    return np.concatenate([np.asarray(payload[k], dtype=np.float64).ravel() * n for k, _, _ in layout(payload)])


def aggregate_from_sum(template: Payload, total: np.ndarray, count: float) -> Payload:
    """The weighted mean from the decrypted ``sum_i n_i w_i`` and the public ``count = sum_i n_i``."""
    out: Payload = {}
    offset = 0
    for key, shape, dtype in layout(template):
        size = int(np.prod(shape, dtype=np.int64))
        out[key] = (total[offset:offset + size] / count).reshape(shape).astype(dtype)
        offset += size
    if offset != total.size:
        raise ValueError(f"a secure sum of {total.size} values does not fit the payload's {offset}.")
    return out


def _fedgan_keys(payload: Payload) -> list[str]:
    from fedmdh.algorithms.fedgan import _SHARED

    return sorted(k for k in payload if k.startswith(_SHARED))


def _fedgan_contribution(update: Update, server_state: Payload | None = None) -> np.ndarray:
    mu, var = (float(v) for v in np.asarray(update.payload["label_stats"], dtype=np.float64)[:2])
    n = float(update.num_examples)
    return np.concatenate([contribution(update, _fedgan_keys(update.payload)), [n * mu, n * (var + mu * mu)]])


def _fedgan_from_sum(server_state: Payload, first: Update, total: np.ndarray, count: float) -> Payload:
    keys = _fedgan_keys(first.payload)
    new: Payload = dict(server_state)
    new.update(aggregate_from_sum({k: first.payload[k] for k in keys}, total[:-2], count))
    mu = float(total[-2] / count)
    var = max(float(total[-1] / count - mu * mu), 0.0)  # gaussian.mixture_moments, from the sums
    new["label_dist"] = np.array([mu, var])
    return new


def _mean_from_sum(server_state: Payload, first: Update, total: np.ndarray, count: float) -> Payload:
    return aggregate_from_sum(first.payload, total, count)


def _mean_contribution(update: Update, server_state: Payload | None = None) -> np.ndarray:
    return contribution(update)


#: per covered algorithm: (what an institution encrypts, from its update and the current server
#: state, which every institution holds; the aggregate from the decrypted sum)
_RULES: dict[str, tuple[Callable[[Update, Payload | None], np.ndarray],
                        Callable[[Payload, Update, np.ndarray, float], Payload]]] = {
    "fedavg": (_mean_contribution, _mean_from_sum),
    "fedprox": (_mean_contribution, _mean_from_sum),
    "fedgan": (_fedgan_contribution, _fedgan_from_sum),
}


def secure_contribution(algorithm: Algorithm, server_state: Payload, update: Update) -> np.ndarray:
    """The float64 vector institution ``update.institution`` encrypts in a secure round (its own
    computation: in a deployment, on its node)."""
    check_covered(algorithm.name)
    return _RULES[algorithm.name][0](update, server_state)


def secure_from_sum(algorithm: Algorithm, server_state: Payload, template: Update, total: np.ndarray,
                    count: float) -> Payload:
    """The aggregate from the decrypted sum of the contributions and the public ``count`` (the sum
    of the committed sample counts); ``template``: any one update of the round (its layout only:
    in a deployment, the institution's own)."""
    check_covered(algorithm.name)
    if count <= 0:
        raise ValueError("weights must sum to a positive number.")
    return _RULES[algorithm.name][1](server_state, template, np.asarray(total, dtype=np.float64), float(count))


def secure_aggregate(algorithm: Algorithm, server_state: Payload, updates: Sequence[Update],
                     secure_sum: SecureSum) -> Payload:
    """``algorithm``'s aggregate of ``updates`` computed through ``secure_sum``.

    Each institution's contribution is one vector; only the decrypted sum and the public counts
    are used afterwards."""
    check_covered(algorithm.name)
    ups = ordered(updates)
    keys = [layout(u.payload) for u in ups]
    if any([(k, s) for k, s, _ in lay] != [(k, s) for k, s, _ in keys[0]] for lay in keys):
        raise ValueError("the institutions' updates do not share one layout.")
    count = float(sum(u.num_examples for u in ups))
    if count <= 0:
        raise ValueError("weights must sum to a positive number.")
    total = secure_sum({u.institution: secure_contribution(algorithm, server_state, u) for u in ups})
    return secure_from_sum(algorithm, server_state, ups[0], total, count)
