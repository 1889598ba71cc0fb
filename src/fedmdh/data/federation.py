"""A federation ready for training: union feature space, pooled standardisation, validation splits.

Protocol (what a real deployment would do, simulated here in one process):

1. Each institution validates its own table, carves its validation split and imputes its own
   missing feature values from its own training means (the count is reported).
2. Each institution sends per-feature sufficient statistics (count, sum, sum of squares) of its
   training rows over its own features, and the same for the target. Pooled means and standard
   deviations are computed from them (ordered by institution, float64), so no raw value leaves an
   institution. Pooled, not per-institution, moments keep the between-institution shifts that
   carry signal under label skew.
3. Features live in the union feature space, the sorted union of the institutions' column names
   (one canonical order whatever the order of the input files). A feature an institution lacks is set to 0 after
   standardisation (the pooled mean), which is what union-space methods such as FedAvg see.
4. The validation split serves model selection and hyperparameter choice; the test set is only
   ever used for reporting.
5. The shared test set is seen by institution i through its own feature columns only.
6. The federation's degree (H, alpha, KL_avg) comes from column names, row counts, label moments
   and label-histogram counts over the pooled label range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedmdh.data.heterogeneity import (
    Heterogeneity,
    InstitutionSummary,
    from_summaries,
    kl_from_counts,
    label_histogram,
)
from fedmdh.data.io import InstitutionTable
from fedmdh.errors import InputError
from fedmdh.seeding import rng_for

if TYPE_CHECKING:
    from fedmdh.secure.aggregation import SecureSum


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


def pooled_sums(stats: Mapping[str, SufficientStats], columns: Sequence[str]) -> np.ndarray:
    """One institution's (or, summed, the federation's) statistics laid out over ``columns``:
    ``[count | sum | sum of squares]``, zeros for the columns it lacks (a vector a secure sum can add)."""
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
    return np.concatenate([n, s, ss])


def pool_moments(stats: Mapping[str, SufficientStats], columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled mean and standard deviation of each column from per-institution statistics.

    Sums run over institutions in sorted name order, in float64, so every peer computes the same
    bits. A column with zero pooled variance gets scale 1 (it then standardises to 0).
    """
    return moments_from_sums(pooled_sums(stats, columns), columns)


#: A column whose pooled standard deviation is below this times ``max(1, |mean|)`` is constant.
CONSTANT_RTOL = 1e-12
#: The same under a secure sum (:func:`pool_setup` with ``secure_sum``): what CKKS's absolute error
#: of about 1e-9 leaves of a constant column after the second, centred pass is a std of about 1e-9
#: times ``max(1, |mean|)`` (the perovskite split has a genuine column with std 1.8e-6).
SECURE_CONSTANT_RTOL = 1e-7


def moments_from_sums(sums: np.ndarray, columns: Sequence[str],
                      constant_rtol: float = CONSTANT_RTOL) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation from pooled ``[count | sum | sum of squares]`` (:func:`pooled_sums`)."""
    columns = list(columns)
    n, s, ss = np.split(np.asarray(sums, dtype=np.float64), 3)
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
    constant = std <= constant_rtol * np.maximum(1.0, np.abs(mean))
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


def union_features(feature_sets: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The union of the institutions' feature names, sorted: one canonical order that does not
    depend on the order in which institutions (or their files) are listed."""
    return tuple(sorted(set().union(*[set(f) for f in feature_sets])))


def _split_val(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(n * fraction))
    n_val = min(max(n_val, 2), n - 8) if fraction > 0 else 0
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _to_union(X_own: np.ndarray, idx: np.ndarray, n_union: int) -> np.ndarray:
    out = np.zeros((X_own.shape[0], n_union), dtype=np.float64)
    out[:, idx] = X_own
    return out


@dataclass(frozen=True)
class LocalSplit:
    """What an institution fixes on its own before talking to anyone: its validation split and the
    imputation of its missing values from its own training means. Never leaves the institution."""

    table: InstitutionTable
    train_idx: np.ndarray
    val_idx: np.ndarray
    X: np.ndarray  # the table's features with missing values imputed
    own_mean: np.ndarray
    n_imputed: int


#: A feature column with empty cells needs this many values (or half its institution's rows, when fewer)
#: to fill them in from: imputed from one value, 299 cells of 300 would all sit wherever that value lies
#: against the pooled scale (hundreds of standard deviations out), and training diverges.
MIN_COLUMN_VALUES = 10


def check_sparse_columns(table: InstitutionTable) -> None:
    """Refuse a feature column with too few values to impute its empty cells from, naming it."""
    observed = (~np.isnan(table.X)).sum(axis=0)
    need = min(MIN_COLUMN_VALUES, (table.n_rows + 1) // 2)
    sparse = np.flatnonzero((observed < need) & (observed < table.n_rows))
    if sparse.size:
        j = int(sparse[0])
        n = int(observed[j])
        more = f" (so do {sparse.size - 1} more columns)" if sparse.size > 1 else ""
        raise InputError(
            f"{table.source}: column {table.features[j]!r} has {n} value{'s' if n != 1 else ''} in {table.n_rows} "
            f"rows{more}; too few to fill in its {table.n_rows - n} empty cells from (a column with empty cells needs "
            f"at least {need} values): fill it in or drop the column from this file."
        )


def _column_means(X: np.ndarray) -> np.ndarray:
    """``np.nanmean(X, axis=0)`` (the same bits), NaN for a column without a value and no warning."""
    observed = ~np.isnan(X)
    count = observed.sum(axis=0)
    total = np.where(observed, X, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def local_split(table: InstitutionTable, seed: int, val_fraction: float) -> LocalSplit:
    """The institution's validation split (seeded by its name) and own-mean imputation.

    A column with too few values to impute from is refused (:func:`check_sparse_columns`).
    """
    check_sparse_columns(table)
    tr, va = _split_val(table.n_rows, val_fraction, rng_for(seed, "validation-split", table.name))
    X = table.X.copy()
    own_mean = _column_means(X[tr])
    # a column observed only in validation rows: fall back to the mean over all own rows
    own_mean = np.where(np.isnan(own_mean), _column_means(X), own_mean)
    nan_mask = np.isnan(X)
    X[nan_mask] = np.take(own_mean, np.nonzero(nan_mask)[1])
    return LocalSplit(table, tr, va, X, own_mean, int(nan_mask.sum()))


@dataclass(frozen=True)
class SetupSummary:
    """What one institution reveals in the setup phase: no row, only names, counts and sums.

    ``x_stats``/``y_stats`` are sufficient statistics of its *training* rows (for the pooled
    standardisation); ``label_stats``, ``label_min``/``label_max`` cover all its labels (for the
    federation's degree: label moments and the histogram range).
    """

    institution: str
    columns: tuple[str, ...]
    n_rows: int
    n_train: int
    n_val: int
    x_stats: SufficientStats
    y_stats: SufficientStats
    label_stats: SufficientStats
    label_min: float
    label_max: float


def setup_summary(split: LocalSplit) -> SetupSummary:
    t = split.table
    return SetupSummary(
        institution=t.name,
        columns=tuple(t.features),
        n_rows=t.n_rows,
        n_train=int(split.train_idx.size),
        n_val=int(split.val_idx.size),
        x_stats=sufficient_stats(t.features, t.X[split.train_idx]),
        y_stats=sufficient_stats(("__y__",), t.y[split.train_idx]),
        label_stats=sufficient_stats(("__y__",), t.y),
        label_min=float(np.min(t.y)),
        label_max=float(np.max(t.y)),
    )


@dataclass(frozen=True)
class FederationSetup:
    """What the setup phase fixes for everyone: names, each institution's columns and training
    size, the canonical union feature space, the pooled scaler and the pooled label range."""

    names: tuple[str, ...]
    columns: Mapping[str, tuple[str, ...]]
    n_train: Mapping[str, int]
    features: tuple[str, ...]
    scaler: Scaler
    label_range: tuple[float, float]

    def feature_idx(self, name: str) -> np.ndarray:
        index = {f: j for j, f in enumerate(self.features)}
        return np.array([index[f] for f in self.columns[name]], dtype=np.int64)


def pool_setup(summaries: Sequence[SetupSummary], secure_sum: SecureSum | None = None) -> FederationSetup:
    """Combine the institutions' setup summaries (in name order, float64): any peer gets the same bits.

    With ``secure_sum`` (``{institution: vector} -> sum``, e.g. threshold CKKS) the counts, sums
    and sums of squares are pooled through it: each institution's statistics enter only as its
    encrypted :func:`pooled_sums` vector. Counts are integers, so the (approximate) decrypted
    counts are rounded back to them.
    """
    if len(summaries) < 2:
        raise InputError("a federation needs at least two institutions; give two or more CSV files.")
    names = [s.institution for s in summaries]
    if len(set(names)) != len(names):
        raise InputError(f"institution names must be unique, got {names}.")
    by_name = {s.institution: s for s in summaries}
    order = tuple(sorted(by_name))
    features = union_features([by_name[n].columns for n in order])
    if secure_sum is None:
        mean, scale = pool_moments({n: by_name[n].x_stats for n in order}, features)
        y_mean, y_scale = pool_moments({n: by_name[n].y_stats for n in order}, ("__y__",))
    else:
        mean, scale, y_mean, y_scale = _secure_moments({n: by_name[n] for n in order}, features, secure_sum)
    return FederationSetup(
        names=order,
        columns={n: by_name[n].columns for n in order},
        n_train={n: by_name[n].n_train for n in order},
        features=features,
        scaler=Scaler(features, mean, scale, float(y_mean[0]), float(y_scale[0])),
        label_range=(min(by_name[n].label_min for n in order), max(by_name[n].label_max for n in order)),
    )


def centred_sums(stats: Mapping[str, SufficientStats], columns: Sequence[str], mean: np.ndarray,
                 scale: np.ndarray) -> np.ndarray:
    """``sum ((x - mean) / scale)**2`` per column from an institution's statistics (0 where it lacks
    the column): the second pass of a secure setup, where ``mean`` and ``scale`` are public."""
    index = {c: j for j, c in enumerate(columns)}
    out = np.zeros(len(columns))
    for st in stats.values():
        idx = np.array([index[c] for c in st.columns], dtype=np.int64)
        m = mean[idx]
        out[idx] += (st.total_sq - 2.0 * m * st.total + st.count * m * m) / (scale[idx] * scale[idx])
    return out


#: the columns a secure setup sums over: the union features, then the label
def _secure_columns(features: Sequence[str]) -> tuple[str, ...]:
    return (*features, "__y__")


def secure_setup_first(summary: SetupSummary, features: Sequence[str]) -> np.ndarray:
    """What one institution encrypts in a secure setup's first pass: its ``[count | sum | sum of
    squares]`` over the union features and the label (zeros where it lacks a column)."""
    return pooled_sums({summary.institution: summary.x_stats, "__y__": summary.y_stats}, _secure_columns(features))


def secure_setup_unit(first: np.ndarray, features: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, unit)`` from the first pass's decrypted sum: the pooled counts (rounded to
    the integers they are), means and a rough scale, the public inputs of the second pass."""
    cols = _secure_columns(features)
    k = len(cols)
    first = np.asarray(first, dtype=np.float64)
    count = np.round(first[:k])
    if np.any(count == 0):
        missing = cols[int(np.flatnonzero(count == 0)[0])]
        raise InputError(f"column {missing!r} has no observed value in any institution; drop it.")
    mean = first[k:2 * k] / count
    rough = np.sqrt(np.maximum(first[2 * k:] / count - mean * mean, 0.0))
    unit = np.maximum(rough, 1e-6 * np.maximum(1.0, np.abs(mean)))
    return count, mean, unit


def secure_setup_second(summary: SetupSummary, features: Sequence[str], mean: np.ndarray,
                        unit: np.ndarray) -> np.ndarray:
    """What one institution encrypts in the second pass: its squared deviations from the pooled
    mean in units of the rough scale (:func:`centred_sums`)."""
    stats = {summary.institution: summary.x_stats, "__y__": summary.y_stats}
    return centred_sums(stats, _secure_columns(features), mean, unit)


def secure_moments_from(first: np.ndarray, second: np.ndarray, features: Sequence[str]):
    """``(mean, scale, y_mean, y_scale)`` from both passes' decrypted sums."""
    cols = _secure_columns(features)
    count, mean, unit = secure_setup_unit(first, features)
    sums = np.concatenate([count, mean * count, (np.maximum(np.asarray(second, np.float64), 0.0) * unit * unit)
                           + count * mean * mean])
    m, sd = moments_from_sums(sums, cols, SECURE_CONSTANT_RTOL)
    return m[:-1], sd[:-1], m[-1:], sd[-1:]


def setup_from_moments(summaries: Sequence[SetupSummary], mean: np.ndarray, scale: np.ndarray, y_mean: np.ndarray,
                       y_scale: np.ndarray) -> FederationSetup:
    """The setup from the institutions' public summary fields (names, columns, row counts, label
    range) and pooled moments computed elsewhere (a secure sum)."""
    by_name = {s.institution: s for s in summaries}
    order = tuple(sorted(by_name))
    features = union_features([by_name[n].columns for n in order])
    return FederationSetup(
        names=order,
        columns={n: by_name[n].columns for n in order},
        n_train={n: by_name[n].n_train for n in order},
        features=features,
        scaler=Scaler(features, np.asarray(mean, np.float64), np.asarray(scale, np.float64), float(y_mean[0]),
                      float(y_scale[0])),
        label_range=(min(by_name[n].label_min for n in order), max(by_name[n].label_max for n in order)),
    )


def _secure_moments(by_name: Mapping[str, SetupSummary], features: tuple[str, ...], secure_sum: SecureSum):
    """Pooled moments of the features and the label from two secure sums.

    A CKKS sum carries an absolute error (about 1e-9), so a variance taken from pooled raw sums of
    squares loses a column with a small spread. The first sum (counts, sums, sums of squares) gives
    the pooled mean and a rough scale; the second sums each institution's squared deviations from
    that mean in units of that scale, which a relative precision of about 1e-12 then pins down.
    A deployed task runs the same two passes over the wire (:mod:`fedmdh.runtime.secure_task`).
    """
    first = secure_sum({n: secure_setup_first(s, features) for n, s in by_name.items()})
    _, mean, unit = secure_setup_unit(first, features)
    second = secure_sum({n: secure_setup_second(s, features, mean, unit) for n, s in by_name.items()})
    return secure_moments_from(first, second, features)


def federation_heterogeneity(
    summaries: Sequence[SetupSummary], setup: FederationSetup, counts: Mapping[str, np.ndarray],
    secure_sum: SecureSum | None = None,
) -> Heterogeneity:
    """H / alpha / KL_avg from the setup summaries and each institution's label-histogram counts
    over :func:`~fedmdh.data.heterogeneity.label_histogram` bins of the pooled label range.

    With ``secure_sum`` the pooled histogram is summed under encryption and each institution's
    KL against it is a number it computes itself; the per-institution label moments that H and
    alpha use are still taken from the summaries (not covered, see docs/security.md)."""
    by_name = {s.institution: s for s in summaries}
    order = setup.names
    stats = []
    for n in order:
        st = by_name[n].label_stats
        m = float(st.total[0] / st.count[0])
        stats.append(InstitutionSummary(n, by_name[n].n_rows, len(by_name[n].columns), m,
                                        float(np.sqrt(max(st.total_sq[0] / st.count[0] - m * m, 0.0)))))
    lo, hi = setup.label_range
    if hi <= lo:
        kl = [0.0] * len(order)
    elif secure_sum is None:
        kl = kl_from_counts([counts[n] for n in order])
    else:
        pooled = np.round(secure_sum({n: np.asarray(counts[n], dtype=np.float64) for n in order}))
        kl = kl_from_counts([counts[n] for n in order], pooled=pooled)
    return from_summaries(stats, [by_name[n].columns for n in order], kl)


def institution_data(
    split: LocalSplit,
    setup: FederationSetup,
    test: InstitutionTable | None,
    clip_margin: float | None = None,
) -> InstitutionData:
    """One institution's arrays in the union space, standardised with the pooled scaler.

    ``test`` (the shared test table, for reporting only) must carry the institution's columns; with
    ``None`` the institution has no test rows.
    """
    t = split.table
    scaler, features = setup.scaler, setup.features
    idx = setup.feature_idx(t.name)
    others = np.setdiff1d(np.arange(len(features)), idx)
    Xu = scaler.transform(_to_union(split.X, idx, len(features)))
    Xu[:, others] = 0.0
    tr, va = split.train_idx, split.val_idx
    if test is not None:
        test_cols = {f: j for j, f in enumerate(test.features)}
        missing = [f for f in t.features if f not in test_cols]
        if missing:
            raise InputError(
                f"{test.source}: the test set lacks column {missing[0]!r} of institution {t.name} "
                f"({t.source}){f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                "the test set must carry every institution's feature columns."
            )
        X_test_own = test.X[:, np.array([test_cols[f] for f in t.features], dtype=np.int64)].copy()
    else:
        X_test_own = np.zeros((0, len(t.features)))
    test_nan = np.isnan(X_test_own)
    X_test_own[test_nan] = np.take(split.own_mean, np.nonzero(test_nan)[1])
    Xt = scaler.transform(_to_union(X_test_own, idx, len(features)))
    Xt[:, others] = 0.0
    lo = hi = None
    if clip_margin is not None:
        mn, mx = Xu[tr].min(axis=0), Xu[tr].max(axis=0)
        lo = (mn - clip_margin * (mx - mn)).astype(np.float32)
        hi = (mx + clip_margin * (mx - mn)).astype(np.float32)
    Xt = clip_columns(Xt, lo, hi)
    ys = scaler.y_to_std(t.y)
    return InstitutionData(
        name=t.name,
        features=t.features,
        feature_idx=idx,
        X=Xu[tr].astype(np.float32),
        y=ys[tr].astype(np.float32),
        X_val=Xu[va].astype(np.float32),
        y_val=ys[va].astype(np.float32),
        X_test=Xt.astype(np.float32),
        impute_values=split.own_mean,
        n_imputed=split.n_imputed,
        n_imputed_test=int(test_nan.sum()),
        clip_lo=lo,
        clip_hi=hi,
    )


def prepare_federation(
    tables: Sequence[InstitutionTable],
    test: InstitutionTable,
    target: str,
    seed: int = 0,
    val_fraction: float = 0.15,
    clip_margin: float | None = None,
    secure_sum: SecureSum | None = None,
) -> PreparedFederation:
    """Standardise, split and lay out a federation in the union feature space, in one process.

    The same steps a deployment runs across machines (:func:`local_split` and
    :func:`setup_summary` at each institution, :func:`pool_setup` and
    :func:`federation_heterogeneity` from what they send, :func:`institution_data` back at each
    institution), so both produce the same bits.

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
    secure_sum:
        Pool the setup statistics (counts, sums, sums of squares, label histograms) through this
        ``{institution: vector} -> sum`` (threshold CKKS under ``--secure``); see :func:`pool_setup`.
    """
    if not 0.0 <= val_fraction < 0.5:
        raise InputError(f"val_fraction must be in [0, 0.5), got {val_fraction}.")
    splits = {t.name: local_split(t, seed, val_fraction) for t in tables}
    summaries = [setup_summary(splits[t.name]) for t in tables]
    setup = pool_setup(summaries, secure_sum)
    lo, hi = setup.label_range
    counts = {n: label_histogram(splits[n].table.y, lo, hi) for n in setup.names}
    het = federation_heterogeneity(summaries, setup, counts, secure_sum)
    # institutions in the order given (names are unique), so reports keep the user's order
    institutions = tuple(institution_data(splits[t.name], setup, test, clip_margin) for t in tables)
    return PreparedFederation(
        target=target,
        features=setup.features,
        institutions=institutions,
        scaler=setup.scaler,
        y_test=test.y.copy(),
        heterogeneity=het,
        seed=seed,
    )
