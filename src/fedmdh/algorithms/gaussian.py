"""Gaussian summaries shared by the latent-space methods (FedMDH's GFAM and RKD, FLIC).

- :func:`w2_squared`: closed-form squared 2-Wasserstein distance between Gaussians (numpy, float64).
- :func:`w2_squared_torch`: the same, differentiable in the first Gaussian's moments.
- :func:`barycenter`: the W2 barycenter of Gaussians (weighted), via POT's fixed-point solver.
- :func:`barycenter_term` / :func:`barycenter_step`: one fixed-point step from a public ``S`` split
  into a per-Gaussian term and what follows from their weighted sum (the secure rule's pieces).
- :func:`mixture_moments`: mean and variance of a weighted mixture of 1-D distributions.
- :func:`gaussian_kl`: KL(N(m0, v0) || N(m1, v1)) for 1-D Gaussians.

All inputs are ordered by the caller (by institution) and reduced in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import linalg


#: added to the diagonal of an institution's latent covariance before it is sent (keeps it positive definite)
JITTER = 1e-6

def _sym(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


def psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh(_sym(np.asarray(a, dtype=np.float64)))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


#: the last anchor's eigendecomposition, keyed by the bytes of the symmetrised matrix: in a
#: simulated round every institution takes the square root of the same anchor, and the next
#: aggregation's first fixed-point step starts from it (one ``eigh`` for all of them)
_LAST_EIGH: dict[tuple[tuple[int, ...], bytes], tuple[np.ndarray, np.ndarray]] = {}


def _eigh_remembered(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.linalg.eigh(_sym(a))``, remembered for the last matrix (the same bits; do not modify)."""
    m = _sym(np.asarray(a, dtype=np.float64))
    key = (m.shape, m.tobytes())
    hit = _LAST_EIGH.get(key)
    if hit is None:
        hit = np.linalg.eigh(m)
        _LAST_EIGH.clear()
        _LAST_EIGH[key] = hit
    return hit


def anchor_sqrt(a: np.ndarray) -> np.ndarray:
    """:func:`psd_sqrt` of an anchor covariance (the same bits), its eigendecomposition remembered
    for the other institutions of the round and for :func:`barycenter` started from it."""
    w, v = _eigh_remembered(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def w2_squared(m0: np.ndarray, s0: np.ndarray, m1: np.ndarray, s1: np.ndarray) -> float:
    """``W2^2(N(m0,S0), N(m1,S1)) = ||m0-m1||^2 + Tr(S0 + S1 - 2 (S1^1/2 S0 S1^1/2)^1/2)``."""
    m0, m1 = np.asarray(m0, np.float64), np.asarray(m1, np.float64)
    s0, s1 = np.asarray(s0, np.float64), np.asarray(s1, np.float64)
    r1 = psd_sqrt(s1)
    cross = psd_sqrt(r1 @ s0 @ r1)
    return float(np.sum((m0 - m1) ** 2) + np.trace(s0) + np.trace(s1) - 2.0 * np.trace(cross))


def w2_squared_torch(
    mean: torch.Tensor, cov: torch.Tensor, anchor_mean: torch.Tensor, anchor_cov_sqrt: torch.Tensor,
    anchor_cov_trace: float, eps: float = 1e-8,
) -> torch.Tensor:
    """Differentiable ``W2^2`` between ``N(mean, cov)`` and a fixed anchor ``N(m_G, S_G)``.

    ``anchor_cov_sqrt`` is ``S_G^{1/2}`` (precomputed). The trace of the matrix square root is
    computed from eigenvalues (``eigvalsh``), whose gradient is stable even with repeated
    eigenvalues; eigenvalues are clamped at ``eps`` (batch covariances are rank-deficient).
    """
    inner = anchor_cov_sqrt @ cov @ anchor_cov_sqrt
    inner = 0.5 * (inner + inner.T)
    eig = torch.linalg.eigvalsh(inner)
    tr_sqrt = torch.sqrt(torch.clamp(eig, min=eps)).sum()
    return torch.sum((mean - anchor_mean) ** 2) + torch.trace(cov) + anchor_cov_trace - 2.0 * tr_sqrt


def batch_gaussian(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of the rows of ``z``."""
    mean = z.mean(dim=0)
    c = z - mean
    cov = c.T @ c / max(z.shape[0] - 1, 1)
    return mean, cov


def _psd_sqrts(mats: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:func:`psd_sqrt` of each matrix, from one stacked eigendecomposition (LAPACK runs on each
    matrix as it would alone, so the bits are those of separate calls)."""
    a = np.stack([_sym(np.asarray(m, dtype=np.float64)) for m in mats])
    w, v = np.linalg.eigh(a)
    return [(v[i] * np.sqrt(np.clip(w[i], 0.0, None))) @ v[i].T for i in range(len(a))]


def _eig_pow(a: np.ndarray, power: float, floor: float) -> np.ndarray:
    w, v = np.linalg.eigh(_sym(a))
    return (v * np.clip(w, floor, None) ** power) @ v.T


def _eig_pows(a: np.ndarray, floor: float, remembered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(a^1/2, a^-1/2)`` from one eigendecomposition (the same bits as two :func:`_eig_pow` calls);
    ``remembered``: through :func:`_eigh_remembered`."""
    w, v = _eigh_remembered(a) if remembered else np.linalg.eigh(_sym(a))
    w = np.clip(w, floor, None)
    return (v * w**0.5) @ v.T, (v * w**-0.5) @ v.T


def barycenter(
    means: Sequence[np.ndarray],
    covs: Sequence[np.ndarray],
    weights: Sequence[float],
    init: np.ndarray | None = None,
    max_iter: int = 30,
    tol: float = 1e-7,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted W2 barycenter of Gaussians ``N(m_i, S_i)``.

    The mean is the weighted mean of the means. The covariance is the fixed point of
    ``S = sum_i w_i (S^1/2 S_i S^1/2)^1/2``, found with the accelerated iteration of
    Alvarez-Esteban et al. (2016), ``S <- S^-1/2 (sum_i w_i (S^1/2 S_i S^1/2)^1/2)^2 S^-1/2``,
    started from ``init`` (e.g. the previous round's anchor) or the weighted mean covariance; it
    stops when the relative change is below ``tol``. POT's ``ot.gaussian.bures_wasserstein_barycenter``
    solves the same equation (the tests check that both agree); its plain iteration needs many more
    steps on the nearly singular covariances of latent features, which matters when it runs every
    round.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    m = np.sum([wi * np.asarray(x, np.float64) for wi, x in zip(w, means)], axis=0)
    cs = [_sym(np.asarray(x, np.float64)) for x in covs]
    scale = max(float(np.mean([np.trace(c) for c in cs])) / cs[0].shape[0], 1e-300)
    floor = 1e-12 * scale
    S = _sym(np.asarray(init, np.float64)) if init is not None else np.sum([wi * c for wi, c in zip(w, cs)], axis=0)
    for it in range(max_iter):
        # the first step from a previous anchor: its eigendecomposition is the one the institutions
        # took its square root from (:func:`anchor_sqrt`)
        r, r_inv = _eig_pows(S, floor, remembered=it == 0 and init is not None)
        T = np.sum([wi * root for wi, root in zip(w, _psd_sqrts([r @ c @ r for c in cs]))], axis=0)
        S_new = _sym(r_inv @ T @ T @ r_inv)
        change = np.linalg.norm(S_new - S) / max(np.linalg.norm(S), 1e-300)
        S = S_new
        if change < tol:
            break
    return m, S


def _step_roots(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(S^1/2, S^-1/2)`` of a public anchor, eigenvalues floored at ``1e-12 tr(S) / k``."""
    S = np.asarray(S, np.float64)
    floor = 1e-12 * max(float(np.trace(S)) / S.shape[0], 1e-300)
    return _eig_pows(S, floor)


def barycenter_term(S: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``(S^1/2 S_i S^1/2)^1/2``: one Gaussian's term of :func:`barycenter`'s fixed-point step from
    ``S`` (``cov`` = ``S_i``). The step is ``S_new = S^-1/2 T T S^-1/2`` with ``T = sum_i w_i`` of
    these terms (:func:`barycenter_step`), so ``T`` is a weighted *sum* each holder of ``S_i``
    can contribute to on its own."""
    r, _ = _step_roots(S)
    return psd_sqrt(r @ _sym(np.asarray(cov, np.float64)) @ r)


def barycenter_step(S: np.ndarray, T: np.ndarray) -> np.ndarray:
    """``S^-1/2 T T S^-1/2`` (symmetrised): the fixed-point step from ``S`` given ``T``, the
    weighted sum of :func:`barycenter_term` (weights summing to 1)."""
    _, r_inv = _step_roots(S)
    T = _sym(np.asarray(T, np.float64))
    return _sym(r_inv @ T @ T @ r_inv)


def mixture_moments(means: Sequence[float], variances: Sequence[float], weights: Sequence[float]) -> tuple[float, float]:
    """Mean and variance of the mixture ``sum_i w_i P_i`` (weights normalised).

    ``mu = sum w_i mu_i``; ``var = sum w_i (var_i + mu_i^2) - mu^2``: the pooled moments, not the
    average of the variances (which ignores the spread of the means).
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu = np.asarray(means, dtype=np.float64)
    var = np.asarray(variances, dtype=np.float64)
    m = float(np.sum(w * mu))
    v = float(np.sum(w * (var + mu * mu)) - m * m)
    return m, max(v, 0.0)


def gaussian_kl(m0, v0, m1, v1):
    """``KL(N(m0, v0) || N(m1, v1))`` for 1-D Gaussians (works on floats and torch tensors)."""
    if isinstance(m0, torch.Tensor) or isinstance(m1, torch.Tensor):
        log = torch.log
    else:
        log = np.log
    return 0.5 * (log(v1 / v0) + (v0 + (m0 - m1) ** 2) / v1 - 1.0)


def sqrtm_reference(a: np.ndarray) -> np.ndarray:
    """scipy's general matrix square root (for tests)."""
    return np.real(linalg.sqrtm(a))
