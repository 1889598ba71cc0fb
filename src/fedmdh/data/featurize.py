"""Composition features from a formula column (matminer ``ElementProperty`` presets).

Each distinct formula is parsed with pymatgen's :class:`~pymatgen.core.Composition` and featurized
with ``ElementProperty.from_preset(preset)`` exactly once (repeated formulas reuse the result).
Formulas that cannot be parsed (or featurized) are never dropped silently: they are reported with
their file line numbers (header = line 1) and a count; by default their rows are dropped, with
``strict=True`` they are an :class:`~fedmdh.errors.InputError`.

matminer's own per-composition loop is used (not a re-implementation of its statistics), so the
values are matminer's bit for bit. Measured on the 4,914 wolverton_oxides formulas (one shared CPU
core): magpie ~8 s, deml ~5 s, megnet_el ~4.5 s, matminer ~7 s, matscholar_el (1,000 features)
~55 s. ``featurize_many(n_jobs=1)`` runs the same loop, so it is no faster.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedmdh.data.io import line_numbers
from fedmdh.errors import InputError

PRESETS: tuple[str, ...] = ("magpie", "deml", "matminer", "matscholar_el", "megnet_el")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FeaturizeReport:
    """What :func:`featurize_frame` did.

    Attributes
    ----------
    source:
        The file the table came from (for messages), or "".
    preset:
        The matminer ``ElementProperty`` preset.
    rows_in:
        Rows in the input table.
    rows_out:
        Rows in the output table.
    unique_formulas:
        Distinct formulas featurized (each once).
    features:
        Names of the appended feature columns.
    bad_rows:
        Positions (0-based data rows) whose formula could not be parsed or featurized.
    bad_formulas:
        The offending formula of each bad row, in the same order.
    seconds:
        Wall time of the featurization.
    """

    source: str
    preset: str
    rows_in: int
    rows_out: int
    unique_formulas: int
    features: tuple[str, ...]
    bad_rows: tuple[int, ...]
    bad_formulas: tuple[str, ...]
    seconds: float

    @property
    def n_bad(self) -> int:
        return len(self.bad_rows)

    @property
    def bad_lines(self) -> tuple[int, ...]:
        """File line numbers of the bad rows (header = line 1)."""
        return tuple(r + 2 for r in self.bad_rows)

    def warning_line(self) -> str:
        """One line naming the count and the first few line numbers of the dropped rows."""
        where = f"{self.source}: " if self.source else ""
        first = self.bad_formulas[0] if self.bad_formulas else ""
        return (
            f"{where}dropped {self.n_bad} row{'s' if self.n_bad != 1 else ''} whose formula could not be "
            f"parsed ({line_numbers(self.bad_rows)}, e.g. {first!r}); fix them or pass --strict to stop on them."
        )


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise InputError(
            f"unknown featurizer preset {preset!r}; choose one of {', '.join(PRESETS)}."
        )


def feature_labels(preset: str) -> list[str]:
    """The column names ``preset`` produces (matminer's labels)."""
    _check_preset(preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from matminer.featurizers.composition import ElementProperty

        return list(ElementProperty.from_preset(preset).feature_labels())


def featurize_formulas(
    formulas: Sequence[object],
    preset: str,
    progress: Progress | None = None,
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Featurize a sequence of formulas, each distinct one once.

    Returns
    -------
    values:
        ``(n, d)`` float64 array; rows of bad formulas are NaN.
    labels:
        The ``d`` feature names.
    bad:
        ``(n,)`` bool mask of formulas that could not be parsed or featurized.
    progress:
        Called as ``progress(done, total)`` over the distinct formulas.
    """
    _check_preset(preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from matminer.featurizers.composition import ElementProperty
        from pymatgen.core import Composition

        ep = ElementProperty.from_preset(preset)
        labels = list(ep.feature_labels())
        keys = [None if (f is None or (isinstance(f, float) and np.isnan(f))) else str(f).strip() for f in formulas]
        unique = sorted({k for k in keys if k})
        cache: dict[str, np.ndarray | None] = {}
        total = len(unique)
        for i, key in enumerate(unique):
            try:
                comp = Composition(key)
                if comp.num_atoms <= 0:
                    raise ValueError("empty composition")
                row = np.asarray(ep.featurize(comp), dtype=np.float64)
                if row.shape != (len(labels),):
                    raise ValueError("unexpected feature count")
                cache[key] = row
            except Exception:  # noqa: BLE001 - pymatgen raises many kinds on bad formulas
                cache[key] = None
            if progress is not None and (i + 1 == total or (i + 1) % 50 == 0):
                progress(i + 1, total)
    values = np.full((len(keys), len(labels)), np.nan)
    bad = np.zeros(len(keys), dtype=bool)
    for j, key in enumerate(keys):
        row = cache.get(key) if key else None
        if row is None:
            bad[j] = True
        else:
            values[j] = row
    return values, labels, bad


def featurize_frame(
    frame: pd.DataFrame,
    formula_column: str,
    preset: str,
    source: str = "",
    strict: bool = False,
    progress: Progress | None = None,
) -> tuple[pd.DataFrame, FeaturizeReport]:
    """Append ``preset``'s composition features to ``frame``.

    The output keeps the input columns (and index) and appends the feature columns; rows whose
    formula cannot be parsed are dropped (``strict=False``) or raise :class:`InputError`.

    Parameters
    ----------
    frame:
        The table.
    formula_column:
        The column holding chemical formulas.
    preset:
        One of :data:`PRESETS`.
    source:
        The file the table came from, named in messages.
    strict:
        Raise instead of dropping rows with bad formulas.
    progress:
        Called as ``progress(done, total)`` over the distinct formulas.
    """
    where = f"{source}: " if source else ""
    _check_preset(preset)
    if formula_column not in frame.columns:
        cols = ", ".join(repr(c) for c in list(frame.columns)[:8])
        more = ", ..." if frame.shape[1] > 8 else ""
        raise InputError(
            f"{where}formula column {formula_column!r} not found (columns: {cols}{more}); "
            "pass the right --formula-column."
        )
    labels = feature_labels(preset)
    clash = [c for c in labels if c in frame.columns]
    if clash:
        raise InputError(
            f"{where}column {clash[0]!r} already exists and would be overwritten by the {preset} features "
            f"({len(clash)} clashing column{'s' if len(clash) > 1 else ''}); drop or rename it first."
        )
    t0 = time.perf_counter()
    formulas = frame[formula_column].tolist()
    values, labels, bad = featurize_formulas(formulas, preset, progress)
    seconds = time.perf_counter() - t0
    bad_rows = tuple(int(i) for i in np.flatnonzero(bad))
    bad_formulas = tuple(str(formulas[i]) for i in bad_rows)
    if bad_rows and strict:
        raise InputError(
            f"{where}column {formula_column!r}: {len(bad_rows)} formula{'s' if len(bad_rows) > 1 else ''} "
            f"could not be parsed ({line_numbers(bad_rows)}, e.g. {bad_formulas[0]!r}); fix them or drop those rows."
        )
    feats = pd.DataFrame(values, columns=labels, index=frame.index)
    out = pd.concat([frame, feats], axis=1)
    if bad_rows:
        out = out.loc[~bad]
    if len(out) == 0:
        raise InputError(f"{where}no formula in column {formula_column!r} could be parsed; check the column.")
    report = FeaturizeReport(
        source=source,
        preset=preset,
        rows_in=len(frame),
        rows_out=len(out),
        unique_formulas=len({str(f).strip() for f in formulas if isinstance(f, str) and f.strip()}),
        features=tuple(labels),
        bad_rows=bad_rows,
        bad_formulas=bad_formulas,
        seconds=seconds,
    )
    return out, report
