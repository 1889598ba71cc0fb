"""The protocol's objects as ``(meta, arrays)`` messages (see :mod:`fedmdh.runtime.flower.wire`).

Everything a node and the coordinator exchange goes through these functions, so what crosses the
wire is exactly what the docs say an institution reveals: its setup summary (column names, counts,
sums), its label-histogram counts, its updates and its metrics. Floats travel as float64 arrays
or as JSON numbers (Python's JSON writes the shortest repr, which reads back to the same double).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedmdh.algorithms.base import Update
from fedmdh.data.federation import FederationSetup, Scaler, SetupSummary, SufficientStats

Meta = dict[str, Any]
Arrays = dict[str, np.ndarray]


def _stats_arrays(prefix: str, st: SufficientStats) -> Arrays:
    return {f"{prefix}.count": st.count, f"{prefix}.total": st.total, f"{prefix}.total_sq": st.total_sq}


def _stats(prefix: str, columns: Sequence[str], arrays: Mapping[str, np.ndarray]) -> SufficientStats:
    def get(k: str) -> np.ndarray:
        a = np.asarray(arrays[f"{prefix}.{k}"], dtype=np.float64)
        if a.shape != (len(columns),):
            raise ValueError(f"{prefix}.{k} has shape {a.shape}, expected ({len(columns)},)")
        return a

    return SufficientStats(tuple(columns), get("count"), get("total"), get("total_sq"))


def summary_message(s: SetupSummary) -> tuple[Meta, Arrays]:
    meta = {"institution": s.institution, "columns": list(s.columns), "n_rows": s.n_rows, "n_train": s.n_train,
            "n_val": s.n_val, "label_min": s.label_min, "label_max": s.label_max}
    arrays = {**_stats_arrays("x", s.x_stats), **_stats_arrays("y", s.y_stats), **_stats_arrays("label", s.label_stats)}
    return meta, arrays


def summary_from(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> SetupSummary:
    cols = tuple(str(c) for c in meta["columns"])
    return SetupSummary(
        institution=str(meta["institution"]), columns=cols, n_rows=int(meta["n_rows"]),
        n_train=int(meta["n_train"]), n_val=int(meta["n_val"]),
        x_stats=_stats("x", cols, arrays), y_stats=_stats("y", ("__y__",), arrays),
        label_stats=_stats("label", ("__y__",), arrays),
        label_min=float(meta["label_min"]), label_max=float(meta["label_max"]),
    )


def summaries_message(summaries: Sequence[SetupSummary]) -> tuple[Meta, Arrays]:
    """Every institution's setup summary in one message (relayed so each node pools them itself)."""
    metas, arrays = [], {}
    for s in sorted(summaries, key=lambda s: s.institution):
        m, a = summary_message(s)
        metas.append(m)
        arrays.update({f"s/{s.institution}/{k}": v for k, v in a.items()})
    return {"summaries": metas}, arrays


def summaries_from(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[SetupSummary]:
    out = []
    for m in meta["summaries"]:
        prefix = f"s/{m['institution']}/"
        out.append(summary_from(m, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}))
    return out


def public_summaries_message(summaries: Sequence[SetupSummary]) -> Meta:
    """Every institution's public summary fields (names, columns, row counts, label range), no
    statistics: what a secure task relays in the clear."""
    return {"summaries": [summary_message(s)[0] for s in sorted(summaries, key=lambda s: s.institution)]}


def public_summaries_from(meta: Mapping[str, Any]) -> list[SetupSummary]:
    """:func:`public_summaries_message` read back; the statistics are zeros (placeholders: a secure
    task pools them only through secure sums)."""
    out = []
    for m in meta["summaries"]:
        k = len(m["columns"])
        zero = {f"{p}.{f}": np.zeros(k if p == "x" else 1) for p in ("x", "y", "label")
                for f in ("count", "total", "total_sq")}
        out.append(summary_from(m, zero))
    return out


def setup_record(setup: FederationSetup) -> dict[str, Any]:
    """What setup fixed, as plain JSON (its sha256 identifies it in the task record)."""
    sc = setup.scaler
    return {
        "names": list(setup.names),
        "columns": {n: list(c) for n, c in setup.columns.items()},
        "n_train": dict(setup.n_train),
        "features": list(setup.features),
        "scaler_mean": [float(v) for v in sc.mean],
        "scaler_scale": [float(v) for v in sc.scale],
        "y_mean": sc.y_mean,
        "y_scale": sc.y_scale,
        "label_range": list(setup.label_range),
    }


def setup_hash(setup: FederationSetup) -> str:
    return hashlib.sha256(json.dumps(setup_record(setup), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def setup_from_record(d: Mapping[str, Any]) -> FederationSetup:
    features = tuple(d["features"])
    return FederationSetup(
        names=tuple(d["names"]),
        columns={n: tuple(c) for n, c in d["columns"].items()},
        n_train={n: int(v) for n, v in d["n_train"].items()},
        features=features,
        scaler=Scaler(features, np.asarray(d["scaler_mean"], np.float64), np.asarray(d["scaler_scale"], np.float64),
                      float(d["y_mean"]), float(d["y_scale"])),
        label_range=(float(d["label_range"][0]), float(d["label_range"][1])),
    )


def update_meta(u: Update) -> Meta:
    return {"institution": u.institution, "num_examples": int(u.num_examples),
            "metrics": {k: float(v) for k, v in sorted(u.metrics.items())}}


def updates_message(updates: Sequence[Update]) -> tuple[Meta, Arrays]:
    """Several updates in one message: ``meta["updates"]`` and arrays named ``u/<institution>/<key>``."""
    metas, arrays = [], {}
    for u in sorted(updates, key=lambda u: u.institution):
        metas.append(update_meta(u))
        arrays.update({f"u/{u.institution}/{k}": np.asarray(v) for k, v in u.payload.items()})
    return {"updates": metas}, arrays


def updates_from(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[Update]:
    out = []
    for m in meta.get("updates", []):
        prefix = f"u/{m['institution']}/"
        payload = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        out.append(Update(str(m["institution"]), payload, int(m["num_examples"]), dict(m["metrics"])))
    return out
