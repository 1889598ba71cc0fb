"""Build a federation of a requested heterogeneity degree from one table.

The degree is the triple (H, alpha, KL_avg) of :mod:`fedmdh.data.heterogeneity` (measured with
its ``measure``, ``feature_overlap`` and ``label_kl``). :func:`partition` proceeds in order:

1. **Test split.** A fraction of the rows (default 20 %) is held out first, stratified by label
   quantile bins (default 10), and shared by every institution. ``test.csv`` holds every feature
   of the union plus the target.
2. **Sizes (alpha).** The training rows are split in size ratios ``r_0 <= ... <= r_{K-1}``: the
   preset's (medium 1:2:3, high 1:10:15 when there are 3 institutions) or geometric,
   ``r_i = alpha ** (i / (K - 1))``. ``inst0`` is the smallest. Sizes are ``round(n_min * r_i)``
   with the largest ``n_min`` that fits; the few rows left over by rounding go to middle
   institutions where that keeps alpha, else stay unused (``federation.json`` counts them).
3. **Features (H).** Every institution gets a shared *core* of ``c`` columns plus a private
   slice of ``p_i`` columns no other institution has, so ``H = c / (c + sum p_i)``.
   *Shared candidates* are the table's numeric columns (other than the target, the formula
   column and ``exclude``), then the features of ``shared_featurizer`` if given.
   With ``featurizers`` (one matminer ``ElementProperty`` preset per institution, cycled), an
   institution's *own candidates* are its preset's features; a preset used by several
   institutions is split between them into disjoint halves (thirds, ...), so they stay private.
   Shared candidates not put in the core are dealt round-robin to the institutions' private
   pools (after their preset features). ``c`` and ``sum p_i`` are chosen to bring ``H`` as
   close as possible to the target (ties: more features), the private total dealt round-robin.
   So with raw descriptors plus per-institution presets, the core is raw descriptors and the
   private slices are each institution's own preset features; ``H = 1`` (iid) uses only the
   shared candidates. Constant or all-missing preset features are not used.
4. **Rows (KL_avg).** A fixed random permutation of the training rows is cut into a "sorted"
   part (fraction ``p``) and a random part. The sorted part is ordered by label and dealt as
   contiguous label bands (``inst0`` lowest), each institution's band in proportion to its size;
   the rest of each institution is filled from the random part. ``p`` is found by a grid plus
   bisection against the measured KL_avg (``label_kl``, 20 bins). ``p = 0`` is iid rows.

Targets that cannot be met within :class:`Tolerance` raise
:class:`~fedmdh.errors.TargetUnreachableError`. All randomness comes from
:func:`fedmdh.seeding.rng_for`, so one seed gives byte-identical files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fedmdh.data.featurize import PRESETS, Progress, featurize_formulas
from fedmdh.data.heterogeneity import Heterogeneity, label_kl, measure
from fedmdh.data.io import MIN_ROWS, line_numbers, numeric_column
from fedmdh.errors import InputError, TargetUnreachableError
from fedmdh.seeding import rng_for

KL_BINS = 20


@dataclass(frozen=True)
class DegreeTargets:
    """Requested heterogeneity degree.

    ``ratios`` (optional) fixes the size ratios; when absent sizes are geometric in ``alpha``.
    """

    H: float = 1.0
    alpha: float = 1.0
    kl: float = 0.0
    ratios: tuple[float, ...] | None = None
    name: str | None = None


DEGREES: dict[str, DegreeTargets] = {
    "iid": DegreeTargets(1.0, 1.0, 0.0, None, "iid"),
    "low": DegreeTargets(0.81, 1.09, 0.06, None, "low"),
    "medium": DegreeTargets(0.31, 3.0, 0.52, (1.0, 2.0, 3.0), "medium"),
    "high": DegreeTargets(0.03, 15.0, 0.88, (1.0, 10.0, 15.0), "high"),
}


@dataclass(frozen=True)
class Tolerance:
    """How far the achieved degree may be from the target: |H - H*|, |alpha/alpha* - 1|, |KL - KL*|."""

    H: float = 0.05
    alpha_rel: float = 0.10
    kl: float = 0.05


def degree_targets(
    degree: str | None = None,
    H: float | None = None,
    alpha: float | None = None,
    kl: float | None = None,
) -> DegreeTargets:
    """The preset ``degree`` (iid, low, medium, high) with any explicit value overriding it.

    Without ``degree``, values not given are the iid ones (H 1, alpha 1, KL 0).
    """
    if degree is not None:
        if degree not in DEGREES:
            raise InputError(f"unknown --degree {degree!r}; choose one of {', '.join(DEGREES)}.")
        base = DEGREES[degree]
    else:
        base = DegreeTargets(name=None)
    t = base
    if H is not None:
        t = replace(t, H=float(H))
    if alpha is not None:
        t = replace(t, alpha=float(alpha), ratios=None)
    if kl is not None:
        t = replace(t, kl=float(kl))
    if (H, alpha, kl) != (None, None, None):
        t = replace(t, name=f"{degree}+custom" if degree else "custom")
    if not 0.0 <= t.H <= 1.0 or not math.isfinite(t.H):
        raise InputError(f"--H {t.H:g} is outside [0, 1]; give a feature overlap between 0 and 1.")
    if not t.alpha >= 1.0 or not math.isfinite(t.alpha):
        raise InputError(f"--alpha {t.alpha:g} is below 1; alpha is largest/smallest size, give a value >= 1.")
    if not t.kl >= 0.0 or not math.isfinite(t.kl):
        raise InputError(f"--kl {t.kl:g} is negative; give a KL_avg >= 0.")
    return t


@dataclass(frozen=True)
class Partition:
    """A federation cut from one table.

    ``table`` holds every candidate feature column plus the target, indexed by the input row
    position (0-based data row; file line = position + 2). ``rows[i]`` and ``test_rows`` are
    positions into it.
    """

    names: tuple[str, ...]
    target: str
    table: pd.DataFrame = field(repr=False)
    features: tuple[tuple[str, ...], ...]
    rows: tuple[np.ndarray, ...] = field(repr=False)
    test_rows: np.ndarray = field(repr=False)
    unused_rows: np.ndarray = field(repr=False)
    dropped_rows: tuple[int, ...]
    core: tuple[str, ...]
    targets: DegreeTargets
    tolerance: Tolerance
    achieved: Heterogeneity
    seed: int
    sorted_fraction: float
    featurizers: tuple[str, ...]
    shared_featurizer: str | None
    test_fraction: float
    source: str = ""
    params: Mapping[str, object] = field(default_factory=dict)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(r.size) for r in self.rows)

    @property
    def union_features(self) -> tuple[str, ...]:
        used = set().union(*map(set, self.features))
        return tuple(c for c in self.table.columns if c in used)

    def institution_frame(self, i: int) -> pd.DataFrame:
        """Institution ``i``'s table: its feature columns plus the target, rows in input order."""
        return self.table.loc[np.sort(self.rows[i]), [*self.features[i], self.target]].reset_index(drop=True)

    def test_frame(self) -> pd.DataFrame:
        """The shared test table: every feature of the union plus the target."""
        return self.table.loc[np.sort(self.test_rows), [*self.union_features, self.target]].reset_index(drop=True)

    def to_dict(self) -> dict:
        a = self.achieved
        t = self.targets
        insts = []
        for i, name in enumerate(self.names):
            s = a.institutions[i]
            insts.append({
                "name": name,
                "file": f"{name}.csv",
                "rows": s.rows,
                "features": len(self.features[i]),
                "core_features": len(self.core),
                "private_features": len(self.features[i]) - len(self.core),
                "featurizer": self.featurizers[i] if self.featurizers else None,
                "label_mean": s.label_mean,
                "label_std": s.label_std,
                "kl": a.kl[i],
            })
        n_table = len(self.table) + len(self.dropped_rows)
        return {
            "source": self.source,
            "target": self.target,
            "seed": self.seed,
            "degree": t.name,
            "requested": {"H": t.H, "alpha": t.alpha, "KL_avg": t.kl,
                          "size_ratios": list(t.ratios) if t.ratios else None},
            "achieved": {"H": a.H, "alpha": a.alpha, "KL_avg": a.KL_avg, "kl": list(a.kl)},
            "tolerance": {"H": self.tolerance.H, "alpha_rel": self.tolerance.alpha_rel, "KL_avg": self.tolerance.kl},
            "kl_bins": KL_BINS,
            "sizes": list(self.sizes),
            "sorted_fraction": self.sorted_fraction,
            "featurizers": list(self.featurizers),
            "shared_featurizer": self.shared_featurizer,
            "core_features": list(self.core),
            "union_features": len(self.union_features),
            "institutions": insts,
            "test": {"file": "test.csv", "rows": int(self.test_rows.size), "fraction": self.test_fraction},
            "rows": {
                "table": n_table,
                "dropped_bad_formula": len(self.dropped_rows),
                "test": int(self.test_rows.size),
                "train": int(sum(self.sizes) + self.unused_rows.size),
                "used": int(sum(self.sizes)),
                "unused": int(self.unused_rows.size),
            },
            "parameters": dict(self.params),
        }


# ----------------------------------------------------------------------------------------- helpers


def _stratified_test(y: np.ndarray, positions: np.ndarray, fraction: float, bins: int, seed: int) -> np.ndarray:
    """Positions of a test split stratified by ``bins`` label-quantile bins."""
    rng = rng_for(seed, "partition", "test-split")
    edges = np.unique(np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1]))
    which = np.searchsorted(edges, y, side="right")
    groups = [positions[which == b] for b in range(len(edges) + 1)]
    groups = [g for g in groups if g.size]
    total = int(round(fraction * positions.size))
    exact = np.array([fraction * g.size for g in groups])
    take = np.floor(exact).astype(int)
    rest = total - int(take.sum())
    order = np.argsort(-(exact - take), kind="stable")
    for k in order[:max(rest, 0)]:
        take[k] += 1
    out = [rng.permutation(g)[:k] for g, k in zip(groups, take)]
    return np.sort(np.concatenate(out)) if out else np.empty(0, dtype=int)


def _size_ratios(targets: DegreeTargets, k: int) -> np.ndarray:
    if targets.ratios is not None and len(targets.ratios) == k:
        return np.asarray(sorted(targets.ratios), dtype=float)
    return targets.alpha ** (np.arange(k) / (k - 1))


def _sizes(n_train: int, k: int, targets: DegreeTargets, tol: Tolerance) -> tuple[list[int], np.ndarray]:
    r = _size_ratios(targets, k)
    r = r / r[0]
    need = int(sum(max(MIN_ROWS, round(MIN_ROWS * x)) for x in r))
    ratio_text = ":".join(f"{x:g}" for x in np.round(r, 3))
    if n_train < need:
        raise TargetUnreachableError(
            f"alpha {targets.alpha:g} with {k} institutions (sizes {ratio_text}) needs at least {need} training "
            f"rows ({MIN_ROWS} for the smallest), the table has {n_train} after the test split; "
            "lower --alpha, use fewer --institutions or more data."
        )
    n_min = int(n_train // r.sum())
    while True:
        sizes = [int(round(n_min * x)) for x in r]
        if sum(sizes) <= n_train:
            break
        n_min -= 1
    left = n_train - sum(sizes)
    lo, hi = min(sizes), max(sizes)
    while left > 0:
        movable = [i for i in range(k) if sizes[i] < hi and sizes[i] > lo] or \
                  [i for i in range(1, k - 1) if sizes[i] < hi]
        if not movable:
            break
        i = min(movable, key=lambda j: (sizes[j] / r[j], j))
        sizes[i] += 1
        left -= 1
    achieved = max(sizes) / min(sizes)
    if abs(achieved / targets.alpha - 1) > tol.alpha_rel:
        raise TargetUnreachableError(
            f"alpha {targets.alpha:g} cannot be reached with {n_train} training rows (closest {achieved:.3f}); "
            "lower --alpha or use more data."
        )
    return sizes, r


def _choose_features(
    shared: list[str],
    own: list[list[str]],
    H: float,
    tol: Tolerance,
) -> tuple[list[str], list[list[str]]]:
    """Pick the core (from ``shared``) and each institution's private slice (see the module doc)."""
    k = len(own)
    best: tuple | None = None
    for c in range(len(shared) + 1):
        leftover = shared[c:]
        pools = [own[i] + leftover[i::k] for i in range(k)]
        caps = [len(p) for p in pools]
        cap_total = sum(caps)
        if c == 0 and min(caps) < 1:
            continue
        lo_t = k if c == 0 else 0
        if lo_t > cap_total:
            continue
        if H <= 0 or c == 0:
            cands = {cap_total}
        else:
            ideal = c * (1 - H) / H
            cands = {min(max(v, lo_t), cap_total) for v in (math.floor(ideal), math.ceil(ideal))}
        for t in cands:
            if c + t == 0:
                continue
            h = c / (c + t)
            key = (round(abs(h - H), 12), -(c + t))
            if best is None or key < best[0]:
                best = (key, c, t, pools, caps)
    n_shared, n_own = len(shared), sum(len(o) for o in own)
    more_shared = ("pass --shared-featurizer PRESET (features every institution may share) or keep more numeric "
                   "columns (fewer --exclude)")
    more_private = ("pass more or different --featurizers presets (one per institution) for more private features"
                    if n_own else "pass --featurizers (one preset per institution) for private features")
    if best is None:
        raise TargetUnreachableError(
            f"H {H:g} cannot be reached: there are {n_shared} shared candidate columns and {n_own} "
            f"institution-specific features; {more_shared if n_shared == 0 else more_private}."
        )
    _, c, t, pools, caps = best
    h = c / (c + t)
    if abs(h - H) > tol.H:
        helps = more_shared if h < H else more_private
        raise TargetUnreachableError(
            f"H {H:g} cannot be reached with {n_shared} shared candidate columns and {n_own} institution-specific "
            f"features (closest {h:.3f}); {helps}, or {'lower' if h < H else 'raise'} --H."
        )
    take = [0] * k
    left = t
    while left > 0:
        for i in range(k):
            if left > 0 and take[i] < caps[i]:
                take[i] += 1
                left -= 1
    return shared[:c], [pools[i][:take[i]] for i in range(k)]


def _assign_rows(
    y: np.ndarray, train: np.ndarray, sizes: list[int], seed: int, kl_target: float, tol: Tolerance
) -> tuple[list[np.ndarray], np.ndarray, float]:
    rng = rng_for(seed, "partition", "rows")
    perm = rng.permutation(train)
    n_used = sum(sizes)
    used, unused = perm[:n_used], perm[n_used:]
    sizes_a = np.asarray(sizes)

    def assign(p: float) -> list[np.ndarray]:
        m = int(round(p * n_used))
        exact = p * sizes_a
        band = np.floor(exact).astype(int)
        order = np.argsort(-(exact - band), kind="stable")
        for j in order[: m - int(band.sum())]:
            band[j] += 1
        band = np.minimum(band, sizes_a)
        srt = used[:m]
        srt = srt[np.lexsort((srt, y[srt]))]
        rnd = used[m:]
        out, a, b = [], 0, 0
        for i in range(len(sizes)):
            out.append(np.concatenate([srt[a:a + band[i]], rnd[b:b + sizes[i] - band[i]]]))
            a += band[i]
            b += sizes[i] - band[i]
        return out

    def kl_of(p: float) -> float:
        return float(np.mean(label_kl([y[r] for r in assign(p)], KL_BINS)))

    grid = np.linspace(0.0, 1.0, 41)
    vals = [kl_of(p) for p in grid]
    evaluated = list(zip(grid.tolist(), vals))
    if kl_target <= vals[0]:
        p_best = 0.0
    elif kl_target >= max(vals):
        p_best = float(grid[int(np.argmax(vals))])
    else:
        j = next(i for i in range(1, len(grid)) if vals[i] >= kl_target)
        lo, hi = float(grid[j - 1]), float(grid[j])
        for _ in range(30):
            mid = (lo + hi) / 2
            v = kl_of(mid)
            evaluated.append((mid, v))
            if v < kl_target:
                lo = mid
            else:
                hi = mid
        p_best = min(evaluated, key=lambda pv: (abs(pv[1] - kl_target), pv[0]))[0]
    achieved = kl_of(p_best)
    if achieved - kl_target > tol.kl:
        raise TargetUnreachableError(
            f"KL_avg {kl_target:g} is below what random rows give with these sizes ({achieved:.3f}); "
            "raise --kl, use fewer institutions or more data."
        )
    if kl_target - achieved > tol.kl:
        raise TargetUnreachableError(
            f"KL_avg {kl_target:g} is above what fully label-sorted rows give with these sizes ({max(vals):.3f}); "
            "lower --kl or change --alpha."
        )
    return assign(p_best), np.sort(unused), float(p_best)


def _numeric_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> pd.DataFrame:
    where = f"{source}: " if source else ""
    out = {}
    for col in columns:
        arr = numeric_column(
            frame[col], col, where, f"pass --exclude {col!r} to drop it (or --formula-column if it holds formulas)."
        )
        if np.isnan(arr).all():
            raise InputError(f"{where}column {col!r} is empty (all values missing); pass --exclude {col!r}.")
        out[col] = arr
    return pd.DataFrame(out, index=frame.index)


# -------------------------------------------------------------------------------------------- API


def partition(
    frame: pd.DataFrame,
    target: str,
    institutions: int,
    targets: DegreeTargets,
    seed: int,
    *,
    test_fraction: float = 0.2,
    strat_bins: int = 10,
    formula_column: str | None = None,
    featurizers: Sequence[str] = (),
    shared_featurizer: str | None = None,
    exclude: Sequence[str] = (),
    strict: bool = False,
    source: str = "",
    tolerance: Tolerance = Tolerance(),
    preset_features: Mapping[str, pd.DataFrame] | None = None,
    progress: Progress | None = None,
    params: Mapping[str, object] | None = None,
) -> Partition:
    """Cut a federation of ``institutions`` institutions of degree ``targets`` from ``frame``.

    Parameters
    ----------
    frame:
        The whole table (rows are identified by position; file line = position + 2).
    target:
        Target column.
    institutions:
        Number of institutions (>= 2), named ``inst0``, ``inst1``, ...
    targets:
        Requested degree, see :func:`degree_targets`.
    seed:
        Seed of every random choice.
    test_fraction, strat_bins:
        Held-out test fraction and the number of label-quantile bins it is stratified by.
    formula_column:
        Column of chemical formulas; never a feature itself, needed for ``featurizers``.
    featurizers:
        matminer presets, one per institution (cycled if fewer).
    shared_featurizer:
        A preset whose features are shared candidates (core material) for everyone.
    exclude:
        Columns to drop (identifiers, text, other target-like properties).
    strict:
        Rows whose formula cannot be parsed are an error instead of being dropped.
    source:
        The file the table came from, named in messages.
    tolerance:
        How close the achieved degree must be; else :class:`TargetUnreachableError`.
    preset_features:
        Precomputed features per preset (frames index-aligned with ``frame``, as returned by
        :func:`fedmdh.data.featurize.featurize_frame`; rows absent count as unparseable).
    progress:
        ``progress(done, total)`` during featurization.
    params:
        Recorded verbatim in ``federation.json`` (e.g. the command's arguments).
    """
    where = f"{source}: " if source else ""
    k = int(institutions)
    if k < 2:
        raise InputError(f"--institutions {k}: a federation needs at least 2 institutions.")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"--test-fraction {test_fraction:g} must be between 0 and 1 (e.g. 0.2).")
    if target not in frame.columns:
        cols = ", ".join(repr(c) for c in list(frame.columns)[:8])
        raise InputError(f"{where}target column {target!r} not found (columns: {cols}, ...); pass the right --target.")
    for col in exclude:
        if col not in frame.columns:
            raise InputError(f"{where}--exclude {col!r}: no such column; check the name.")
    if target in exclude:
        raise InputError(f"{where}--exclude {target!r} is the target; do not exclude it.")
    featurizers = tuple(featurizers)
    for p in (*featurizers, *([shared_featurizer] if shared_featurizer else [])):
        if p not in PRESETS:
            raise InputError(f"unknown featurizer preset {p!r}; choose one of {', '.join(PRESETS)}.")
    if (featurizers or shared_featurizer) and not formula_column:
        raise InputError("--featurizers/--shared-featurizer need --formula-column (the column of formulas).")
    if formula_column and formula_column not in frame.columns:
        raise InputError(f"{where}formula column {formula_column!r} not found; pass the right --formula-column.")

    frame = frame.reset_index(drop=True)
    skip = {target, *exclude, *([formula_column] if formula_column else [])}
    raw_cols = [c for c in frame.columns if c not in skip]
    raw = _numeric_columns(frame, raw_cols, source)

    y_series = pd.to_numeric(frame[target], errors="coerce")
    badt = y_series.isna() & frame[target].notna()
    if badt.any():
        row = int(np.flatnonzero(badt.to_numpy())[0])
        raise InputError(f"{where}target {target!r} is not numeric ({line_numbers([row])} holds {frame[target].iloc[row]!r}); "
                         "fix the value or drop the row.")
    y = y_series.to_numpy(dtype=np.float64)
    nan_rows = np.flatnonzero(~np.isfinite(y))
    if nan_rows.size:
        raise InputError(f"{where}target {target!r} is missing at {line_numbers(nan_rows)} ({nan_rows.size} rows); "
                         "fill in or drop those rows.")

    inst_presets = tuple(featurizers[i % len(featurizers)] for i in range(k)) if featurizers else ()
    wanted = list(dict.fromkeys([*inst_presets, *([shared_featurizer] if shared_featurizer else [])]))
    bad = np.zeros(len(frame), dtype=bool)
    pfeat: dict[str, pd.DataFrame] = {}
    for preset in wanted:
        if preset_features is not None and preset in preset_features:
            from fedmdh.data.featurize import feature_labels

            labels = feature_labels(preset)
            pf = preset_features[preset]
            missing = [c for c in labels if c not in pf.columns]
            if missing:
                raise InputError(f"preset_features[{preset!r}] lacks column {missing[0]!r}.")
            vals = pf[labels].reindex(frame.index)
            bad |= vals.isna().all(axis=1).to_numpy()
        else:
            arr, labels, b = featurize_formulas(frame[formula_column].tolist(), preset, progress)
            vals = pd.DataFrame(arr, columns=labels, index=frame.index)
            bad |= b
        clash = [c for c in labels if c in frame.columns]
        if clash:
            raise InputError(f"{where}column {clash[0]!r} clashes with a {preset} feature name; rename or --exclude it.")
        pfeat[preset] = vals
    dropped = tuple(int(i) for i in np.flatnonzero(bad))
    if dropped and strict:
        raise InputError(f"{where}column {formula_column!r}: {len(dropped)} formulas could not be parsed "
                         f"({line_numbers(dropped)}); fix them or drop those rows.")
    good = ~bad
    for preset, vals in pfeat.items():
        v = vals[good]
        keep = [c for c in v.columns if v[c].notna().any() and v[c].nunique(dropna=True) > 1]
        pfeat[preset] = vals[keep]

    table = pd.concat([raw, *pfeat.values(), frame[[target]].astype(np.float64)], axis=1).loc[good]
    positions = np.flatnonzero(good)
    yy = np.full(len(frame), np.nan)
    yy[positions] = y[positions]
    if positions.size < MIN_ROWS * k or np.ptp(y[positions]) == 0:
        raise TargetUnreachableError(f"{where}{positions.size} usable rows are too few for {k} institutions "
                                     "(or the target is constant); use more data.")

    test = _stratified_test(y[positions], positions, test_fraction, strat_bins, seed)
    train = np.setdiff1d(positions, test)
    sizes, _ = _sizes(int(train.size), k, targets, tolerance)

    frng = rng_for(seed, "partition", "features")
    shared = list(frng.permutation(np.array(raw_cols, dtype=object))) if raw_cols else []
    if shared_featurizer:
        sc = list(pfeat[shared_featurizer].columns)
        shared += list(frng.permutation(np.array(sc, dtype=object))) if sc else []
    shared_set = set(shared)
    own: list[list[str]] = [[] for _ in range(k)]
    for preset in dict.fromkeys(inst_presets):
        users = [i for i in range(k) if inst_presets[i] == preset]
        cols = [c for c in pfeat[preset].columns if c not in shared_set]
        cols = list(frng.permutation(np.array(cols, dtype=object))) if cols else []
        for j, i in enumerate(users):
            own[i] = cols[j::len(users)]
    shared = [str(c) for c in shared]
    own = [[str(c) for c in o] for o in own]
    core, private = _choose_features(shared, own, targets.H, tolerance)
    order = {c: j for j, c in enumerate(table.columns)}
    feats = tuple(tuple(sorted([*core, *private[i]], key=order.__getitem__)) for i in range(k))
    if any(len(f) == 0 for f in feats):
        raise TargetUnreachableError("an institution would get no feature; add features or raise --H.")

    rows, unused, p = _assign_rows(yy, train, sizes, seed, targets.kl, tolerance)
    names = tuple(f"inst{i}" for i in range(k))
    achieved = measure(names, feats, [yy[r] for r in rows], KL_BINS)
    if abs(achieved.H - targets.H) > tolerance.H:  # pragma: no cover - _choose_features guarantees it
        raise TargetUnreachableError(f"H {targets.H:g} not reached (got {achieved.H:.3f}).")
    return Partition(
        names=names,
        target=target,
        table=table,
        features=feats,
        rows=tuple(np.sort(r) for r in rows),
        test_rows=test,
        unused_rows=unused,
        dropped_rows=dropped,
        core=tuple(sorted(core, key=order.__getitem__)),
        targets=targets,
        tolerance=tolerance,
        achieved=achieved,
        seed=int(seed),
        sorted_fraction=p,
        featurizers=inst_presets,
        shared_featurizer=shared_featurizer,
        test_fraction=float(test_fraction),
        source=source,
        params=dict(params or {}),
    )


def write_partition(part: Partition, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.csv`` per institution, ``test.csv`` and ``federation.json``; return the paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; give a directory for --out.")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(part.names):
        p = out / f"{name}.csv"
        part.institution_frame(i).to_csv(p, index=False, lineterminator="\n")
        paths.append(p)
    p = out / "test.csv"
    part.test_frame().to_csv(p, index=False, lineterminator="\n")
    paths.append(p)
    p = out / "federation.json"
    p.write_text(json.dumps(part.to_dict(), indent=2) + "\n", encoding="utf-8")
    paths.append(p)
    return paths
