"""A federation ready for training: union feature space, pooled standardisation, validation splits.

Protocol (what a real deployment would do, simulated here in one process):

1. Each institution validates its own table and imputes its own missing feature values from its
   own training means (the count is reported).
2. Each institution sends per-feature sufficient statistics (count, sum, sum of squares) of its
   training rows over its own features, and the same for the target. Pooled means and standard
   deviations are computed from them (ordered by institution, float64), so no raw value leaves an
   institution. Pooled, not per-institution, moments keep the between-institution shifts that
   carry signal under label skew.
3. Features live in the union feature space. A feature an institution lacks is set to 0 after
   standardisation (the pooled mean), which is what union-space methods such as FedAvg see.
4. Each institution carves a validation split from its own training rows for early stopping and
   hyperparameter choice; the test set is only ever used for reporting.
5. The shared test set is seen by institution i through its own feature columns only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmdh.data.heterogeneity import Heterogeneity, measure
from fedmdh.data.io import InstitutionTable
from fedmdh.errors import InputError
from fedmdh.seeding import rng_for


@dataclass(frozen=True)
class SufficientStats:
    """Per-column count, sum and sum of squares of one institution's observed values."""

    columns: tuple[str, ...]
    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray


def sufficient_stats(columns: Sequence[str], X: np.ndarray) -> SufficientStats:
    """Sufficient statistics of ``X`` (rows x columns), ignoring NaN."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    observed = ~np.isnan(X)
    Xz = np.where(observed, X, 0.0)
    return SufficientStats(
        columns=tuple(columns),
        count=observed.sum(axis=0).astype(np.float64),
        total=Xz.sum(axis=0),
        total_sq=(Xz * Xz).sum(axis=0),
    )


def pool_moments(stats: Mapping[str, SufficientStats], columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled mean and standard deviation of each column from per-institution statistics.

    Sums run over institutions in sorted name order, in float64, so every peer computes the same
    bits. A column with zero pooled variance gets scale 1 (it then standardises to 0).
    """
    columns = list(columns)
    index = {c: j for j, c in enumerate(columns)}
    n = np.zeros(len(columns))
    s = np.zeros(len(columns))
    ss = np.zeros(len(columns))
    for name in sorted(stats):
        st = stats[name]
        idx = np.array([index[c] for c in st.columns], dtype=np.int64)
        n[idx] += st.count
        s[idx] += st.total
        ss[idx] += st.total_sq
    if np.any(n == 0):
        missing = columns[int(np.flatnonzero(n == 0)[0])]
        raise InputError(f"column {missing!r} has no observed value in any institution; drop it.")
    with np.errstate(over="ignore", invalid="ignore"):
        mean = s / n
        var = np.maximum(ss / n - mean * mean, 0.0)
    overflow = ~(np.isfinite(ss) & np.isfinite(var))
    if overflow.any():
        col = columns[int(np.flatnonzero(overflow)[0])]
        raise InputError(f"column {col!r}: its values are too large to standardise (pooled over the institutions, "
                         "their squares overflow float64); rescale the column (other units or a log).")
    std = np.sqrt(var)
    # relative threshold: below it the variance is floating-point noise of a constant column
    constant = std <= 1e-12 * np.maximum(1.0, np.abs(mean))
    std[constant] = 1.0
    return mean, std


@dataclass(frozen=True)
class Scaler:
    """Pooled standardisation of the union features and of the target."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    y_mean: float
    y_scale: float

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.scale

    def y_to_std(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float64) - self.y_mean) / self.y_scale

    def y_from_std(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.y_scale + self.y_mean

    def to_dict(self) -> dict:
        return {
            "features": list(self.features),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "y_mean": self.y_mean,
            "y_scale": self.y_scale,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "Scaler":
        return cls(
            features=tuple(d["features"]),
            mean=np.asarray(d["mean"], dtype=np.float64),
            scale=np.asarray(d["scale"], dtype=np.float64),
            y_mean=float(d["y_mean"]),
            y_scale=float(d["y_scale"]),
        )


def clip_columns(X: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None) -> np.ndarray:
    """``X`` with each column clipped to ``[lo, hi]`` (unchanged when there are no bounds), same dtype."""
    if lo is None or hi is None:
        return X
    return np.clip(X, lo, hi).astype(X.dtype, copy=False)


@dataclass(frozen=True)
class InstitutionData:
    """One institution's arrays in the union feature space (float32, standardised).

    ``X``/``y`` are the training rows, ``X_val``/``y_val`` the validation rows carved from the
    institution's own training data, ``X_test`` the shared test set seen through the institution's
    own columns. Columns the institution lacks are 0. ``feature_idx`` indexes its own columns.
    ``clip_lo``/``clip_hi`` (when clipping is on) bound each column to the range of the institution's
    own training rows, widened by a margin (0 and 0 for the columns it lacks): :meth:`clip` applies
    them to inputs from elsewhere (the test set, other institutions' validation rows, new data),
    since a network can extrapolate wildly where it never saw data (e.g. a column standardised from
    a few rows of a small institution).
    """

    name: str
    features: tuple[str, ...]
    feature_idx: np.ndarray = field(repr=False)
    X: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    X_val: np.ndarray = field(repr=False)
    y_val: np.ndarray = field(repr=False)
    X_test: np.ndarray = field(repr=False)
    impute_values: np.ndarray = field(repr=False)
    n_imputed: int = 0
    n_imputed_test: int = 0
    clip_lo: np.ndarray | None = field(default=None, repr=False)
    clip_hi: np.ndarray | None = field(default=None, repr=False)

    def clip(self, X: np.ndarray) -> np.ndarray:
        """``X`` (union space) with each column clipped to this institution's training range."""
        return clip_columns(X, self.clip_lo, self.clip_hi)

    @property
    def n_train(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class PreparedFederation:
    """Everything the simulator needs: institutions, scaler, raw test labels, degree."""

    target: str
    features: tuple[str, ...]
    institutions: tuple[InstitutionData, ...]
    scaler: Scaler
    y_test: np.ndarray = field(repr=False)
    heterogeneity: Heterogeneity
    seed: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.institutions)

    @property
    def n_features(self) -> int:
        return len(self.features)


def union_features(tables: Sequence[InstitutionTable]) -> tuple[str, ...]:
    """Union of the institutions' feature names, in order of first appearance."""
    seen: dict[str, None] = {}
    for t in tables:
        for f in t.features:
            seen.setdefault(f, None)
    return tuple(seen)


def _split_val(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(n * fraction))
    n_val = min(max(n_val, 2), n - 8) if fraction > 0 else 0
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _to_union(X_own: np.ndarray, idx: np.ndarray, n_union: int) -> np.ndarray:
    out = np.zeros((X_own.shape[0], n_union), dtype=np.float64)
    out[:, idx] = X_own
    return out


def prepare_federation(
    tables: Sequence[InstitutionTable],
    test: InstitutionTable,
    target: str,
    seed: int = 0,
    val_fraction: float = 0.15,
    clip_margin: float | None = None,
) -> PreparedFederation:
    """Standardise, split and lay out a federation in the union feature space.

    Parameters
    ----------
    tables:
        One validated table per institution (their ``features`` may differ).
    test:
        The shared test table; it must carry every institution's feature columns.
    target:
        Target column name (for messages and reports).
    seed:
        Seeds the validation splits.
    val_fraction:
        Fraction of each institution's training rows held out for validation.
    clip_margin:
        ``None`` (default): inputs are not clipped. A number ``m >= 0``: wherever an institution's
        model meets rows it did not train on, each column is clipped to the range of the
        institution's own training rows widened by ``m`` times that range on each side (``0``: the
        range itself). See :meth:`InstitutionData.clip`.
    """
    if len(tables) < 2:
        raise InputError("a federation needs at least two institutions; give two or more CSV files.")
    if not 0.0 <= val_fraction < 0.5:
        raise InputError(f"val_fraction must be in [0, 0.5), got {val_fraction}.")
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise InputError(f"institution names must be unique, got {names}.")
    features = union_features(tables)
    fidx = {f: j for j, f in enumerate(features)}
    test_cols = {f: j for j, f in enumerate(test.features)}
    for t in tables:
        missing = [f for f in t.features if f not in test_cols]
        if missing:
            raise InputError(
                f"{test.source}: the test set lacks column {missing[0]!r} of institution {t.name} "
                f"({t.source}){f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                "the test set must carry every institution's feature columns."
            )

    splits = {}
    imputed = {}
    for t in tables:
        tr, va = _split_val(t.n_rows, val_fraction, rng_for(seed, "validation-split", t.name))
        X = t.X.copy()
        own_mean = np.nanmean(X[tr], axis=0)
        # a column observed only in validation rows: fall back to the mean over all own rows
        own_mean = np.where(np.isnan(own_mean), np.nanmean(X, axis=0), own_mean)
        nan_mask = np.isnan(X)
        X[nan_mask] = np.take(own_mean, np.nonzero(nan_mask)[1])
        splits[t.name] = (tr, va, X, own_mean)
        imputed[t.name] = int(nan_mask.sum())

    x_stats = {t.name: sufficient_stats(t.features, t.X[splits[t.name][0]]) for t in tables}
    y_stats = {t.name: sufficient_stats(("__y__",), t.y[splits[t.name][0]]) for t in tables}
    mean, scale = pool_moments(x_stats, features)
    y_mean, y_scale = pool_moments(y_stats, ("__y__",))
    scaler = Scaler(features, mean, scale, float(y_mean[0]), float(y_scale[0]))

    institutions = []
    for t in tables:
        tr, va, X, own_mean = splits[t.name]
        idx = np.array([fidx[f] for f in t.features], dtype=np.int64)
        Xu = scaler.transform(_to_union(X, idx, len(features)))
        Xu[:, np.setdiff1d(np.arange(len(features)), idx)] = 0.0
        t_idx = np.array([test_cols[f] for f in t.features], dtype=np.int64)
        X_test_own = test.X[:, t_idx].copy()
        test_nan = np.isnan(X_test_own)
        X_test_own[test_nan] = np.take(own_mean, np.nonzero(test_nan)[1])
        Xt = scaler.transform(_to_union(X_test_own, idx, len(features)))
        Xt[:, np.setdiff1d(np.arange(len(features)), idx)] = 0.0
        lo = hi = None
        if clip_margin is not None:
            mn, mx = Xu[tr].min(axis=0), Xu[tr].max(axis=0)
            lo = (mn - clip_margin * (mx - mn)).astype(np.float32)
            hi = (mx + clip_margin * (mx - mn)).astype(np.float32)
        Xt = clip_columns(Xt, lo, hi)
        ys = scaler.y_to_std(t.y)
        institutions.append(
            InstitutionData(
                name=t.name,
                features=t.features,
                feature_idx=idx,
                X=Xu[tr].astype(np.float32),
                y=ys[tr].astype(np.float32),
                X_val=Xu[va].astype(np.float32),
                y_val=ys[va].astype(np.float32),
                X_test=Xt.astype(np.float32),
                impute_values=own_mean,
                n_imputed=imputed[t.name],
                n_imputed_test=int(test_nan.sum()),
                clip_lo=lo,
                clip_hi=hi,
            )
        )
    het = measure(names, [t.features for t in tables], [t.y for t in tables])
    return PreparedFederation(
        target=target,
        features=features,
        institutions=tuple(institutions),
        scaler=scaler,
        y_test=test.y.copy(),
        heterogeneity=het,
        seed=seed,
    )
