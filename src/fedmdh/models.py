"""Saving and loading an institution's final model, and predicting new materials with it.

A saved model is a folder with ``params.npz`` (the network as plain arrays) and ``model.json``
(algorithm, network shape, the institution's own columns, the union feature space, the pooled
scaler and the institution's imputation values), enough to predict from a table in the
institution's own columns without the training data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmdh import jsonsafe
from fedmdh.data.federation import InstitutionData, Scaler, clip_columns
from fedmdh.data.io import numeric_column
from fedmdh.errors import InputError
from fedmdh.nn.threads import training_thread_count

FORMAT = "fedmdh-model/1"


@dataclass(frozen=True)
class InstitutionModel:
    """An institution's trained model with what it needs to predict from raw columns."""

    institution: str
    algorithm: str
    hidden: tuple[int, ...]
    features: tuple[str, ...]
    scaler: Scaler
    impute_values: np.ndarray = field(repr=False)
    params: Mapping[str, np.ndarray] = field(repr=False)
    info: Mapping[str, Any] = field(default_factory=dict)
    clip_lo: np.ndarray | None = field(default=None, repr=False)
    clip_hi: np.ndarray | None = field(default=None, repr=False)

    def design_matrix(self, frame: pd.DataFrame, source: str = "input") -> tuple[np.ndarray, int]:
        """Standardised union-space inputs from a table with this institution's columns.

        Returns the matrix and the number of imputed (missing) values.
        """
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise InputError(
                f"{source}: lacks column {missing[0]!r} of institution {self.institution}"
                f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; give the institution's own columns."
            )
        X = np.empty((len(frame), len(self.features)))
        for j, c in enumerate(self.features):
            X[:, j] = numeric_column(frame[c], c, f"{source}: ", "give numbers (leave a cell empty if it is unknown).")
        nan = np.isnan(X)
        X[nan] = np.take(self.impute_values, np.nonzero(nan)[1])
        idx = np.array([self.scaler.features.index(c) for c in self.features], dtype=np.int64)
        U = np.zeros((len(frame), len(self.scaler.features)))
        U[:, idx] = X
        with np.errstate(over="ignore", invalid="ignore"):
            U = self.scaler.transform(U)
        if not np.isfinite(U).all():
            j = int(np.flatnonzero(~np.isfinite(U).all(axis=0))[0])
            raise InputError(f"{source}: column {self.scaler.features[j]!r} holds values too large for the model "
                             "(they overflow float64 once standardised); check the units of that column.")
        keep = np.zeros(len(self.scaler.features), dtype=bool)
        keep[idx] = True
        U[:, ~keep] = 0.0
        U = clip_columns(U, self.clip_lo, self.clip_hi)  # to the range the model was trained on
        return U.astype(np.float32), int(nan.sum())

    def predict_std(self, X: np.ndarray) -> np.ndarray:
        """Standardised predictions, computed by the algorithm's own ``predict``."""
        from fedmdh.algorithms import algorithm_from_hyperparameters

        hp = dict(self.info.get("hyperparameters", {}))
        hp["hidden"] = list(self.hidden)
        # the training's thread count, whatever the caller's: the same float sums, so the same predictions
        # from the CLI, the service (whose threads a task in training may have set) and a node
        with training_thread_count():
            return algorithm_from_hyperparameters(self.algorithm, hp).predict(self.params, X)

    def predict(self, frame: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Predictions in the target's units for the rows of ``frame``."""
        X, _ = self.design_matrix(frame, source)
        return self.scaler.y_from_std(self.predict_std(X))


def save_model(
    folder: str | Path,
    institution: InstitutionData,
    algorithm: str,
    hidden: tuple[int, ...],
    scaler: Scaler,
    params: Mapping[str, np.ndarray],
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write an institution's model to ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **{k: np.asarray(v) for k, v in params.items()})
    meta = {
        "format": FORMAT,
        "institution": institution.name,
        "algorithm": algorithm,
        "hidden": list(hidden),
        "features": list(institution.features),
        "impute_values": np.asarray(institution.impute_values).tolist(),
        "clip": None if institution.clip_lo is None else [np.asarray(institution.clip_lo, np.float64).tolist(),
                                                          np.asarray(institution.clip_hi, np.float64).tolist()],
        "scaler": scaler.to_dict(),
        "info": dict(info or {}),
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return folder


def load_model(folder: str | Path) -> InstitutionModel:
    """Load a model written by :func:`save_model`."""
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.exists():
        raise InputError(f"{folder}: no model.json here; give a folder written by `fedmdh run` (models/NAME).")
    try:  # bounded depth, a regular file: a model folder may come from anyone
        meta = jsonsafe.read_file(meta_path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_path}: is not a model description fedmdh can read ({exc}); give a folder written "
                         "by `fedmdh run` (models/NAME) or `fedmdh model get`.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{meta_path}: unknown model format "
                         f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}.")
    with np.load(folder / "params.npz") as z:
        params = {k: z[k] for k in z.files}
    return InstitutionModel(
        institution=meta["institution"],
        algorithm=meta["algorithm"],
        hidden=tuple(meta["hidden"]),
        features=tuple(meta["features"]),
        scaler=Scaler.from_dict(meta["scaler"]),
        impute_values=np.asarray(meta["impute_values"], dtype=np.float64),
        params=params,
        info=meta.get("info", {}),
        clip_lo=None if not meta.get("clip") else np.asarray(meta["clip"][0], dtype=np.float32),
        clip_hi=None if not meta.get("clip") else np.asarray(meta["clip"][1], dtype=np.float32),
    )
