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

COVERED = ("fedavg", "fedprox", "fedgan", "fedmdh", "fedmdh-no-gfam", "fedmdh-no-cgan", "fedmdh-no-rkd")

#: What each algorithm not covered would still show the aggregator in the clear.
NOT_COVERED: dict[str, str] = {
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
                     f"Run {algorithm} without --secure, or use one of those.")


def layout(payload: Payload) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The order (by key), shapes and dtypes in which a payload is flattened."""
    return [(k, tuple(np.shape(payload[k])), np.asarray(payload[k]).dtype) for k in sorted(payload)]


def contribution(update: Update, keys: Sequence[str] | None = None) -> np.ndarray:
    """What institution ``update.institution`` encrypts: ``n_i * w_i`` flattened in key order, float64
    (``keys``: only those entries of the payload)."""
    n = float(update.num_examples)
    payload = update.payload if keys is None else {k: update.payload[k] for k in keys}
    return np.concatenate([np.asarray(payload[k], dtype=np.float64).ravel() * n for k, _, _ in layout(payload)])


def _cast(mean: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``mean`` as ``dtype``; integer entries (e.g. a batch norm's ``num_batches_tracked``) are
    rounded first, since a decrypted sum is within CKKS's error, not exact (5.9999999 is 6, not 5)."""
    if np.issubdtype(dtype, np.integer):
        mean = np.rint(mean)
    return np.asarray(mean).astype(dtype)


def aggregate_from_sum(template: Payload, total: np.ndarray, count: float) -> Payload:
    """The weighted mean from the decrypted ``sum_i n_i w_i`` and the public ``count = sum_i n_i``."""
    out: Payload = {}
    offset = 0
    for key, shape, dtype in layout(template):
        size = int(np.prod(shape, dtype=np.int64))
        out[key] = _cast((total[offset:offset + size] / count).reshape(shape), dtype)
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


_FEDMDH_SHARED = ("phi.", "h.", "G.", "D.")


def _fedmdh_holders(update: Update, server_state: Payload | None) -> np.ndarray | None:
    """The institution's public holder mask when the first layer is holder-averaged, else None."""
    key = f"holders.{update.institution}"
    if server_state is None or key not in server_state or "phi.0.weight" not in update.payload:
        return None
    return np.asarray(server_state[key], dtype=np.float64)


def _fedmdh_contribution(update: Update, server_state: Payload | None = None) -> np.ndarray:
    """FedMDH (and its ablations): what the payload's keys say it shares, as sums.

    In order: ``n_i w_i`` for every shared network entry (``phi.``, ``h.``, ``G.``, ``D.``, by key;
    holder-averaged: ``phi.0.weight`` column ``j`` times ``n_i held_ij``, then ``n_i held_i``);
    the anchor's ``n_i m_i`` and covariance term ``n_i (r S_i r)^1/2`` with ``r = S^1/2`` of the
    public anchor ``S`` of the server state (the identity before the first round's: then the term is
    ``n_i S_i^1/2`` and the step gives ``(sum_i w_i S_i^1/2)^2``): one fixed-point step of the W2
    barycenter from ``S`` (:func:`~fedmdh.algorithms.gaussian.barycenter_term`); RKD's
    ``n_i mu_i`` and ``n_i (var_i + mu_i^2)``."""
    from fedmdh.algorithms.gaussian import barycenter_term

    p, n = update.payload, float(update.num_examples)
    held = _fedmdh_holders(update, server_state)
    parts = []
    for key in sorted(k for k in p if k.startswith(_FEDMDH_SHARED)):
        w = np.asarray(p[key], dtype=np.float64)
        parts.append((w * (held * n) if held is not None and key == "phi.0.weight" else w * n).ravel())
    if held is not None:
        parts.append(held * n)
    if "anchor_mean" in p:
        parts.append(np.asarray(p["anchor_mean"], dtype=np.float64) * n)
        cov = np.asarray(p["anchor_cov"], dtype=np.float64)
        parts.append(barycenter_term(server_state["anchor_cov"], cov).ravel() * n)
    if "pred_stats" in p:
        mu, var = (float(v) for v in np.asarray(p["pred_stats"], dtype=np.float64)[:2])
        parts.append(np.array([n * mu, n * (var + mu * mu)]))
    return np.concatenate(parts)


def _fedmdh_from_sum(server_state: Payload, first: Update, total: np.ndarray, count: float) -> Payload:
    """FedMDH's next server state from the decrypted sum of :func:`_fedmdh_contribution`."""
    from fedmdh.algorithms.fedmdh import track_average
    from fedmdh.algorithms.gaussian import barycenter_step

    p = first.payload
    new: Payload = dict(server_state)
    offset = 0

    def take(size: int) -> np.ndarray:
        nonlocal offset
        out = total[offset:offset + size]
        offset += size
        return out

    held = _fedmdh_holders(first, server_state)
    keys = sorted(k for k in p if k.startswith(_FEDMDH_SHARED))
    sums = {k: take(int(np.size(p[k]))).reshape(np.shape(p[k])) for k in keys}
    for k in keys:
        new[k] = _cast(sums[k] / count, np.asarray(p[k]).dtype)
    if held is not None:  # FedMDH._holder_average: a column nobody holds keeps its weights
        weight = take(held.size)
        ref = np.asarray(server_state["phi.0.weight"])
        mean = np.where(weight > 0, sums["phi.0.weight"] / np.maximum(weight, 1e-300), ref.astype(np.float64))
        new["phi.0.weight"] = mean.astype(ref.dtype)
    if "anchor_mean" in p:
        k = int(np.size(p["anchor_mean"]))
        new["anchor_mean"] = take(k) / count
        term = take(k * k).reshape(k, k) / count
        new["anchor_cov"] = barycenter_step(server_state["anchor_cov"], term)
        new["anchor_ready"] = np.ones(1)
    if "pred_stats" in p:
        a, b = take(2)
        mu = float(a / count)
        new["pred_dist"] = np.array([mu, max(float(b / count - mu * mu), 0.0)])  # gaussian.mixture_moments
    if offset != total.size:
        raise ValueError(f"a secure sum of {total.size} values does not fit FedMDH's {offset}.")
    return track_average(server_state, new)  # FedMDH.aggregate's last step


#: per covered algorithm: (what an institution encrypts, from its update and the current server
#: state, which every institution holds; the aggregate from the decrypted sum)
_RULES: dict[str, tuple[Callable[[Update, Payload | None], np.ndarray],
                        Callable[[Payload, Update, np.ndarray, float], Payload]]] = {
    "fedavg": (_mean_contribution, _mean_from_sum),
    "fedprox": (_mean_contribution, _mean_from_sum),
    "fedgan": (_fedgan_contribution, _fedgan_from_sum),
    **{name: (_fedmdh_contribution, _fedmdh_from_sum)
       for name in ("fedmdh", "fedmdh-no-gfam", "fedmdh-no-cgan", "fedmdh-no-rkd")},
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
