"""The steps both runtimes share: random streams, evaluation and per-institution model selection.

The in-process simulator and a deployed node (:mod:`fedmdh.runtime.flower`) call these same
functions, so that under the same seed they produce the same bits:

- every institution's training stream in round ``r`` is :func:`client_rng` ``(seed, r, name)``,
  and the aggregation's stream :func:`aggregate_rng` ``(seed, r)`` (any peer derives both);
- an institution's private state goes through :meth:`Algorithm.client_arrays` /
  :meth:`Algorithm.load_client` between rounds (:class:`ClientSlot`);
- after each round's aggregate, each institution evaluates its own model on its own validation
  rows and keeps the model of its best round (:func:`evaluate_round`, :class:`Selection`); under
  the local guard (:mod:`fedmdh.algorithms.guard`) it also weighs its own local model against the
  federated one there; the shared test set, where an institution has it, is only for reporting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmdh.algorithms.base import Algorithm, FederationSpec, Params, Payload
from fedmdh.data.federation import InstitutionData, Scaler
from fedmdh.metrics import regression_metrics
from fedmdh.nn.threads import (  # noqa: F401 - re-exported: every runtime takes its thread count from here
    training_thread_count,
    training_threads,
    use_training_threads,
)
from fedmdh.seeding import rng_for

#: ``own``: each institution selects on its own validation rows (what a deployment can do);
#: ``federated``: on every institution's validation rows seen through its columns (simulator only:
#: it needs every institution's model at every institution).
SELECTIONS = ("own", "federated")


def client_rng(seed: int, rnd: int, name: str) -> np.random.Generator:
    """Institution ``name``'s generator for its local training in round ``rnd``."""
    return rng_for(seed, "round", rnd, name)


def dp_noise_rng(seed: int, rnd: int, name: str) -> np.random.Generator:
    """Institution ``name``'s generator of its DP noise share in round ``rnd`` in the simulator (seeded so a
    run repeats; it protects nothing there: a deployed node draws its noise from the OS)."""
    return rng_for(seed, "dp-noise", rnd, name)


def aggregate_rng(seed: int, rnd: int) -> np.random.Generator:
    """The generator of round ``rnd``'s aggregation (the same at every peer)."""
    return rng_for(seed, "aggregate", rnd)


class ClientSlot:
    """An institution's private state between rounds, kept as arrays.

    ``get()`` loads the arrays into the institution's working state object (built once with
    ``init_client``; loading replaces everything it holds), ``put()`` stores the state after a
    round as arrays. A node that restarts builds a fresh object and loads the same arrays: a
    conformance test checks that both give the same bits.
    """

    def __init__(self, algorithm: Algorithm, spec: FederationSpec, data: InstitutionData, seed: int,
                 arrays: Mapping[str, np.ndarray] | None = None) -> None:
        self._algorithm = algorithm
        self._obj = algorithm.init_client(spec, data, seed)
        self.arrays: dict[str, np.ndarray] = (dict(arrays) if arrays is not None
                                              else algorithm.client_arrays(self._obj))

    def get(self) -> Any:
        return self._algorithm.load_client(self._obj, self.arrays)

    def put(self, client_state: Any) -> None:
        self._obj = client_state
        self.arrays = self._algorithm.client_arrays(client_state)


def own_validation_mse(algorithm: Algorithm, params: Params, data: InstitutionData) -> float:
    """MSE (standardised units) of ``params`` on the institution's own validation rows; NaN if none."""
    if data.y_val.size == 0:
        return float("nan")
    pred = algorithm.predict(params, data.clip(data.X_val))
    return float(np.mean((pred - data.y_val.astype(np.float64)) ** 2))


def score_on_test(algorithm: Algorithm, params: Params, data: InstitutionData, scaler: Scaler,
                 y_test: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """RMSE / MAE / R2 on the shared test set in the target's units, and the predictions."""
    if y_test.size == 0:
        return {}, np.zeros(0)
    y_hat = scaler.y_from_std(algorithm.predict(params, data.X_test))
    return regression_metrics(y_test, y_hat), y_hat


#: The selection rules' tolerances, in standard errors of the own-validation MSE (chosen on
#: validation: docs/tuning.md). ``ROUND_SE``: the latest round whose loss is within this many
#: standard errors of the best so far is kept (0: the best round). ``GUARD_SE``: the local guard
#: keeps the most federated mixture within this many standard errors of the best one.
ROUND_SE = 1.0
GUARD_SE = 0.0


def _se(errors: np.ndarray) -> float:
    """Standard error of the mean of ``errors`` (0 with fewer than two)."""
    e = np.asarray(errors, dtype=np.float64)
    return float(e.std(ddof=1) / np.sqrt(e.size)) if e.size > 1 else 0.0


def _replaces(cur_val: float, cur_min: float, cur_tol: float, val: float) -> tuple[bool, bool]:
    """``(new minimum, kept)`` for a round of loss ``val`` against the best loss ``cur_min`` so far
    (``cur_tol``: its tolerance). A round is kept when it beats the minimum, or is within the
    tolerance of it (tolerance > 0), or when no loss so far is finite."""
    finite = bool(np.isfinite(val))
    if not np.isfinite(cur_min):
        return finite, finite or not np.isfinite(cur_val)
    if finite and val < cur_min:
        return True, True
    return False, bool(finite and cur_tol > 0 and val <= cur_min + cur_tol)


def choose_round(val_predictions: np.ndarray, y_val: np.ndarray, se: float = ROUND_SE) -> int:
    """The round (0-based) :class:`Selection` keeps from per-round predictions ``(rounds, n)`` on
    the validation rows ``y_val`` (the same rule, replayed offline: studies of the rule)."""
    y = np.asarray(y_val, dtype=np.float64)
    kept, cur_val, cur_min, cur_tol = 0, float("nan"), float("nan"), 0.0
    for r, pred in enumerate(np.asarray(val_predictions, dtype=np.float64)):
        err = (pred - y) ** 2
        val = float(err.mean()) if y.size else float("nan")
        new_min, keep = _replaces(cur_val, cur_min, cur_tol, val) if r else (bool(np.isfinite(val)), True)
        if new_min:
            cur_min, cur_tol = val, se * _se(err)
        if keep:
            kept, cur_val = r, val
    return kept


def choose_blend(federated: np.ndarray, local: np.ndarray, y_val: np.ndarray, weights: tuple[float, ...],
                 se: float = GUARD_SE) -> float:
    """The weight ``lam`` of ``lam * federated + (1 - lam) * local`` an institution keeps: the
    largest (most federated) of ``weights`` whose validation MSE is within ``se`` standard errors
    (of the paired difference of squared errors) of the lowest. Without validation rows: 1."""
    y = np.asarray(y_val, dtype=np.float64)
    if y.size == 0:
        return 1.0
    f, g = np.asarray(federated, np.float64), np.asarray(local, np.float64)
    errs = {w: (w * f + (1.0 - w) * g - y) ** 2 for w in weights}
    mses = {w: float(e.mean()) for w, e in errs.items()}
    finite = [w for w in weights if np.isfinite(mses[w])]
    if not finite:
        return 1.0
    best = min(finite, key=lambda w: (mses[w], -w))
    ok = [w for w in finite if mses[w] <= mses[best] + se * _se(errs[w] - errs[best])]
    return float(max(ok))


@dataclass
class Kept:
    """The model an institution keeps so far and what it scored.

    ``val_predictions`` are its predictions on the institution's own validation rows (standardised);
    ``detail`` says, under the local guard, which federated and local rounds and which weight."""

    round: int
    val_mse: float
    params: Params = field(repr=False)
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    val_predictions: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    detail: dict[str, float] = field(default_factory=dict)


class Selection:
    """Per-institution model selection on validation loss.

    Each part of an institution's model (``"federated"``; under the local guard also ``"local"``)
    keeps the round with the lowest validation loss, or the latest round within ``round_se``
    standard errors of it (:data:`ROUND_SE`); the first offered round is kept; a later round
    replaces it when its loss is lower, or within that tolerance, or when neither loss is finite
    (so without validation rows the last round is kept). Ties keep the earlier round. ``kept``
    holds what each institution keeps: its federated part's best, or under the local guard the
    mixture :func:`resolve_guard` chose.
    """

    def __init__(self, round_se: float | None = None) -> None:
        self.round_se = float(ROUND_SE if round_se is None else round_se)
        self.kept: dict[str, Kept] = {}
        self.best: dict[tuple[str, str], Kept] = {}
        self._min: dict[tuple[str, str], tuple[float, float]] = {}

    def offer(self, name: str, rnd: int, val_mse: float, params: Params, metrics: Mapping[str, float],
              predictions: np.ndarray | None = None, val_predictions: np.ndarray | None = None,
              val_errors: np.ndarray | None = None, part: str = "federated") -> bool:
        """Consider round ``rnd``'s model (``part``) of ``name``; returns ``True`` when it is now kept."""
        key = (name, part)
        cur = self.best.get(key)
        if cur is None:
            new_min, better = bool(np.isfinite(val_mse)), True
            cur_min, cur_tol = float("nan"), 0.0
        else:
            cur_min, cur_tol = self._min.get(key, (float("nan"), 0.0))
            new_min, better = _replaces(cur.val_mse, cur_min, cur_tol, val_mse)
        if new_min:
            tol = self.round_se * _se(val_errors) if val_errors is not None and self.round_se > 0 else 0.0
            self._min[key] = (float(val_mse), tol)
        if better:
            k = Kept(rnd, float(val_mse), params, dict(metrics), np.zeros(0) if predictions is None else predictions,
                     np.zeros(0) if val_predictions is None else val_predictions)
            self.best[key] = k
            if part == "federated":
                self.kept[name] = k
        return better

    def state(self, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What this selection holds for ``name`` (every part's best, its minimum and tolerance, the
        kept model), as JSON and arrays: a node saves it with its state and :meth:`restore` reads it."""
        meta: dict[str, Any] = {"parts": {}, "kept": None}
        arrays: dict[str, np.ndarray] = {}

        def put(prefix: str, k: Kept) -> dict[str, Any]:
            arrays.update({f"{prefix}/params/{key}": np.asarray(v) for key, v in k.params.items()})
            arrays[f"{prefix}/predictions"] = np.asarray(k.predictions)
            arrays[f"{prefix}/val_predictions"] = np.asarray(k.val_predictions)
            return {"round": int(k.round), "val_mse": float(k.val_mse),
                    "metrics": {m: float(v) for m, v in k.metrics.items()},
                    "detail": {m: float(v) for m, v in k.detail.items()}}

        for (n, part), k in sorted(self.best.items()):
            if n == name:
                meta["parts"][part] = {**put(f"best/{part}", k), "min": list(self._min.get((n, part), (float("nan"), 0.0)))}
        if name in self.kept:
            meta["kept"] = put("kept", self.kept[name])
        return meta, arrays

    def restore(self, name: str, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Read back what :meth:`state` saved for ``name``."""

        def get(prefix: str, d: Mapping[str, Any]) -> Kept:
            start = f"{prefix}/params/"
            params = {k[len(start):]: np.asarray(v) for k, v in arrays.items() if k.startswith(start)}
            return Kept(int(d["round"]), float(d["val_mse"]), params, dict(d["metrics"]),
                        np.asarray(arrays[f"{prefix}/predictions"]), np.asarray(arrays[f"{prefix}/val_predictions"]),
                        dict(d.get("detail", {})))

        for part, d in meta["parts"].items():
            self.best[(name, part)] = get(f"best/{part}", d)
            self._min[(name, part)] = (float(d["min"][0]), float(d["min"][1]))
        if meta.get("kept") is not None:
            self.kept[name] = get("kept", meta["kept"])


def evaluate_round(algorithm: Algorithm, selection: Selection, name: str, rnd: int, params: Params,
                   data: InstitutionData, scaler: Scaler, y_test: np.ndarray) -> tuple[dict[str, float], bool]:
    """An institution's step after round ``rnd``'s aggregate, in the simulator and a deployed node:
    its model (every part of it) on its own validation rows (selection) and on the test set where it
    has one (reporting only), offered to ``selection``; under the local guard, the kept mixture
    resolved again. Returns the federated model's metrics (with ``val_mse``) and whether what the
    institution keeps changed."""
    from fedmdh.algorithms.guard import FEDERATED, LocalGuard

    parts = algorithm.parts(params) if isinstance(algorithm, LocalGuard) else {FEDERATED: (algorithm, params)}
    y_val = data.y_val.astype(np.float64)
    X_val = data.clip(data.X_val)
    changed, record = False, {}
    for part, (alg, p) in parts.items():
        pred = alg.predict(p, X_val) if y_val.size else np.zeros(0)
        err = (pred - y_val) ** 2
        val = float(err.mean()) if y_val.size else float("nan")
        metrics, y_hat = score_on_test(alg, p, data, scaler, y_test)
        metrics = {**metrics, "val_mse": val}
        changed |= selection.offer(name, rnd, val, p, metrics, y_hat, pred, err, part=part)
        if part == FEDERATED:
            record = metrics
    if isinstance(algorithm, LocalGuard):
        changed = resolve_guard(algorithm, selection, name, data, scaler, y_test) or changed
    return record, changed


def resolve_guard(algorithm: Any, selection: Selection, name: str, data: InstitutionData, scaler: Scaler,
                  y_test: np.ndarray, se: float = GUARD_SE) -> bool:
    """What ``name`` keeps under the local guard: its best federated and best local rounds and the
    mixture weight chosen on its own validation rows (:func:`choose_blend`). Returns whether it changed."""
    from fedmdh.algorithms.guard import FEDERATED, LOCAL, combine

    fed, loc = selection.best[(name, FEDERATED)], selection.best[(name, LOCAL)]
    y_val = data.y_val.astype(np.float64)
    lam = choose_blend(fed.val_predictions, loc.val_predictions, y_val, algorithm.weights, se)
    detail = {"federated_round": fed.round, "local_round": loc.round, "blend": lam}
    cur = selection.kept.get(name)
    if cur is not None and cur.detail == detail:
        return False
    params = combine(fed.params, loc.params, lam)
    val_pred = lam * fed.val_predictions + (1.0 - lam) * loc.val_predictions
    val = float(np.mean((val_pred - y_val) ** 2)) if y_val.size else float("nan")
    metrics, y_hat = score_on_test(algorithm, params, data, scaler, y_test)
    selection.kept[name] = Kept(fed.round if lam > 0 else loc.round, val, params, {**metrics, "val_mse": val},
                                y_hat, val_pred, detail)
    return True


def initial_state(algorithm: Algorithm, spec: FederationSpec, seed: int) -> Payload:
    """The task's first global payload: a pure function of what setup fixed and the seed."""
    return algorithm.init(spec, seed)
