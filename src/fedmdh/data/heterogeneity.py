"""Heterogeneity degree of a federation: H, alpha and KL_avg.

Definitions (the project's, see the datasets README):

- ``H``: |intersection of the institutions' feature-name sets| / |union of them|.
- ``alpha``: largest institution's row count / smallest institution's row count.
- ``KL_avg``: mean over institutions of KL(P_i || P), P_i the histogram of institution i's
  labels and P the histogram of all labels pooled, over ``bins`` equal-width bins spanning the
  pooled label range, natural logarithm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fedmdh.errors import InputError

KL_BINS = 20


@dataclass(frozen=True)
class InstitutionSummary:
    name: str
    rows: int
    columns: int
    label_mean: float
    label_std: float


@dataclass(frozen=True)
class Heterogeneity:
    H: float
    alpha: float
    KL_avg: float
    kl: tuple[float, ...]
    institutions: tuple[InstitutionSummary, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["institutions"] = [asdict(s) for s in self.institutions]
        d["kl"] = list(self.kl)
        return d


def feature_overlap(feature_sets: Sequence[Sequence[str]]) -> float:
    """H: size of the intersection of the feature-name sets over the size of their union."""
    sets = [set(f) for f in feature_sets]
    if not sets:
        raise InputError("feature_overlap: no institutions given.")
    union = set().union(*sets)
    if not union:
        return 1.0
    return len(set.intersection(*sets)) / len(union)


def sample_imbalance(sizes: Sequence[int]) -> float:
    """alpha: largest row count over smallest row count."""
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) <= 0:
        raise InputError("sample_imbalance: every institution needs at least one row.")
    return max(sizes) / min(sizes)


def label_histogram(y: np.ndarray, lo: float, hi: float, bins: int = KL_BINS) -> np.ndarray:
    """Counts of ``y`` in ``bins`` equal-width bins spanning ``[lo, hi]`` (what an institution shares)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    if hi == lo:
        counts = np.zeros(bins, dtype=np.int64)
        counts[0] = y.size
        return counts
    return np.histogram(y, np.linspace(lo, hi, bins + 1))[0].astype(np.int64)


def kl_from_counts(counts: Sequence[np.ndarray], pooled: np.ndarray | None = None) -> tuple[float, ...]:
    """KL(P_i || P) for each institution from its histogram counts over the same bins.

    ``pooled`` (default: the sum of ``counts``) is the federation's histogram when it comes from
    elsewhere (a secure sum): each KL then needs only the institution's own counts and it."""
    hists = [np.asarray(c, dtype=np.float64) for c in counts]
    pooled = np.sum(hists, axis=0) if pooled is None else np.asarray(pooled, dtype=np.float64)
    P = pooled / pooled.sum()
    out = []
    for c in hists:
        p = c / c.sum()
        m = p > 0  # P > 0 wherever p > 0, since P pools p
        out.append(float(np.sum(p[m] * np.log(p[m] / P[m]))))
    return tuple(out)


def label_kl(labels: Sequence[np.ndarray], bins: int = KL_BINS) -> tuple[float, ...]:
    """KL(P_i || P) for each institution, over ``bins`` equal-width bins of the pooled range."""
    arrays = [np.asarray(y, dtype=np.float64).ravel() for y in labels]
    pooled = np.concatenate(arrays)
    lo, hi = float(pooled.min()), float(pooled.max())
    if hi == lo:
        return tuple(0.0 for _ in arrays)
    return kl_from_counts([label_histogram(y, lo, hi, bins) for y in arrays])


def measure(
    names: Sequence[str],
    feature_sets: Sequence[Sequence[str]],
    labels: Sequence[np.ndarray],
    bins: int = KL_BINS,
) -> Heterogeneity:
    """Measure H, alpha and KL_avg, with per-institution rows, columns and label moments."""
    kl = label_kl(labels, bins)
    summaries = tuple(
        InstitutionSummary(
            name=n,
            rows=int(np.asarray(y).size),
            columns=len(f),
            label_mean=float(np.mean(y)),
            label_std=float(np.std(y)),
        )
        for n, f, y in zip(names, feature_sets, labels, strict=True)
    )
    return from_summaries(summaries, feature_sets, kl)


def from_summaries(
    summaries: Sequence[InstitutionSummary], feature_sets: Sequence[Sequence[str]], kl: Sequence[float]
) -> Heterogeneity:
    """The degree from what institutions share: sizes, column names, label moments and KL terms."""
    return Heterogeneity(
        H=feature_overlap(feature_sets),
        alpha=sample_imbalance([s.rows for s in summaries]),
        KL_avg=float(np.mean(kl)),
        kl=tuple(float(k) for k in kl),
        institutions=tuple(summaries),
    )
