"""The in-process simulator: drives an algorithm's pure functions over a prepared federation.

Each round, every institution (in name order) runs ``client_update`` with its own generator
derived from ``(seed, round, institution)``; the updates are aggregated; each institution's
current model is evaluated on its validation split (for model selection) and on the shared test
set through its own columns (for reporting only). The model an institution keeps is the one of
the round with the lowest federation validation loss: every institution's model predicts the
validation rows of all institutions through its own columns (each validation row keeps only the
columns its owner has), as the test protocol does with the shared test set; the loss is the mean
over institutions of those MSEs. The test set never influences that choice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedmdh.algorithms.base import Algorithm, FederationSpec, Params, Payload, Update
from fedmdh.data.federation import InstitutionData, PreparedFederation
from fedmdh.errors import TrainingDiverged
from fedmdh.metrics import regression_metrics
from fedmdh.seeding import rng_for

POOLED_NAME = "__pooled__"

#: Called after each round's aggregation with (round, updates ordered by institution, aggregate);
#: returns the aggregate the round finalized (a ledger returns the one its quorum agreed on).
RoundHook = Callable[[int, Sequence[Update], Payload], Payload]

#: Called whenever the kept models improve, with (round, each institution's params): e.g. to save
#: them as the run goes, so that an interrupted run keeps the best models it had.
BestHook = Callable[[int, dict[str, Params]], None]

#: A mean training loss above this (in standardised units, where predicting the mean scores about 1)
#: means the optimisation has blown up even if every number is still finite.
DIVERGED_LOSS = 1e10


@dataclass
class RoundRecord:
    """Metrics of one round (test metrics in the target's units, means over institutions)."""

    round: int
    train_loss: float
    val_mse: float
    rmse: float
    mae: float
    r2: float
    per_institution: dict[str, dict[str, float]]
    bytes_up: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "train_loss": self.train_loss,
            "val_mse": self.val_mse,
            "rmse": self.rmse,
            "mae": self.mae,
            "r2": self.r2,
            "bytes_up": self.bytes_up,
            "seconds": self.seconds,
            "per_institution": self.per_institution,
        }


@dataclass
class RunResult:
    """What a simulated run produced."""

    algorithm: str
    seed: int
    history: list[RoundRecord]
    best_round: int
    final: dict[str, float]
    final_per_institution: dict[str, dict[str, float]]
    models: dict[str, Params] = field(repr=False)
    predictions: dict[str, np.ndarray] = field(repr=False)
    seconds: float = 0.0


def merge_institutions(fed: PreparedFederation) -> InstitutionData:
    """All institutions' rows in one place (for the pooled reference)."""
    insts = fed.institutions
    return InstitutionData(
        name=POOLED_NAME,
        features=fed.features,
        feature_idx=np.arange(fed.n_features),
        X=np.concatenate([d.X for d in insts]),
        y=np.concatenate([d.y for d in insts]),
        X_val=np.concatenate([d.X_val for d in insts]),
        y_val=np.concatenate([d.y_val for d in insts]),
        X_test=insts[0].X_test,
        impute_values=np.zeros(fed.n_features),
    )


def _summary(per: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in per.values()])) for k in ("rmse", "mae", "r2")}


def simulate(
    fed: PreparedFederation,
    algorithm: Algorithm,
    rounds: int,
    seed: int = 0,
    on_round: Callable[[RoundRecord], None] | None = None,
    round_hook: RoundHook | None = None,
    on_best: BestHook | None = None,
) -> RunResult:
    """Train ``algorithm`` on ``fed`` for ``rounds`` rounds in this process.

    Parameters
    ----------
    fed:
        The prepared federation.
    algorithm:
        Any :class:`~fedmdh.algorithms.base.Algorithm`.
    rounds:
        Number of communication rounds.
    seed:
        Seeds model initialisation and every institution's minibatch stream.
    on_round:
        Called with each round's record (progress display, JSON-lines logging).
    round_hook:
        Called with each round's updates and aggregate before they are used (e.g. to commit them
        to a ledger); the aggregate it returns is the one the institutions continue from.
    on_best:
        Called with ``(round, models)`` each time the kept models change (the models of that round).

    Raises
    ------
    TrainingDiverged
        A loss, an aggregate or a prediction became NaN, infinite or absurdly large; raised before
        the round's aggregate reaches ``round_hook`` and before the round is recorded, so every
        callback has seen only the rounds before it.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    threads = torch.get_num_threads()
    torch.set_num_threads(_simulation_threads())
    try:
        return _simulate(fed, algorithm, rounds, seed, on_round, round_hook, on_best)
    finally:
        torch.set_num_threads(threads)


def _simulation_threads() -> int:
    """Torch threads while simulating: ``$FEDMDH_TORCH_THREADS``, default 1.

    The networks are small; intra-op threads cost more in synchronisation than they save, and
    they collapse when another process competes for the cores (measured: a 40-round FedMDH run
    took 2.6 s with one thread and 9.2 s with two on an idle 2-core machine).
    """
    try:
        return max(1, int(os.environ.get("FEDMDH_TORCH_THREADS", "1")))
    except ValueError:
        return 1


def _simulate(
    fed: PreparedFederation,
    algorithm: Algorithm,
    rounds: int,
    seed: int,
    on_round: Callable[[RoundRecord], None] | None,
    round_hook: RoundHook | None,
    on_best: BestHook | None = None,
) -> RunResult:
    t_start = time.perf_counter()
    spec = FederationSpec.from_federation(fed)
    insts = {d.name: d for d in fed.institutions}
    if algorithm.centralized:
        merged = merge_institutions(fed)
        steps = algorithm.training.local_steps * len(insts)
        algorithm = _with_steps(algorithm, steps)
        trainers = {POOLED_NAME: merged}
        spec = replace(spec, names=(POOLED_NAME,), n_train={POOLED_NAME: merged.n_train},
                       feature_idx={POOLED_NAME: merged.feature_idx})
    else:
        trainers = dict(insts)

    server = algorithm.init(spec, seed)
    clients = {name: algorithm.init_client(spec, trainers[name], seed) for name in sorted(trainers)}
    # validation as the test protocol evaluates: every institution's model predicts every
    # institution's validation rows through its own columns, clipped to its training range
    # (a federated evaluation)
    val_X = np.concatenate([d.X_val for d in insts.values()])
    val_y = np.concatenate([d.y_val for d in insts.values()]).astype(np.float64)
    val_total = val_y.size
    val_views = {}
    for name, d in insts.items():
        keep = np.zeros(fed.n_features, dtype=np.float32)
        keep[d.feature_idx] = 1.0
        val_views[name] = d.clip(val_X * keep)

    history: list[RoundRecord] = []
    best_val = np.inf
    best_round = 0
    best_models: dict[str, Params] = {}
    best_preds: dict[str, np.ndarray] = {}
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        updates = []
        try:
            for name in sorted(trainers):
                upd, clients[name] = algorithm.client_update(
                    server, clients[name], trainers[name], rng_for(seed, "round", r, name)
                )
                updates.append(upd)
            server = algorithm.aggregate(server, updates)
        except np.linalg.LinAlgError as exc:  # e.g. an SVD of NaN weights
            raise TrainingDiverged(r, float("nan"), f"numerical failure: {exc}") from None
        _check_diverged(r, updates, server)
        if round_hook is not None:
            server = round_hook(r, sorted(updates, key=lambda u: u.institution), server)

        per: dict[str, dict[str, float]] = {}
        models: dict[str, Params] = {}
        preds: dict[str, np.ndarray] = {}
        val_mses = []
        for name, d in insts.items():
            owner = POOLED_NAME if algorithm.centralized else name
            params = algorithm.personal_params(server, clients[owner])
            models[name] = params
            if val_total:
                val_pred = algorithm.predict(params, val_views[name])
                val_mses.append(float(np.mean((val_pred - val_y) ** 2)))
            y_hat = fed.scaler.y_from_std(algorithm.predict(params, d.X_test))
            preds[name] = y_hat
            per[name] = regression_metrics(fed.y_test, y_hat)
        val_mse = float(np.mean(val_mses)) if val_total else float("nan")
        summ = _summary(per)
        n_up = sum(u.num_examples for u in updates)
        record = RoundRecord(
            round=r,
            train_loss=float(sum(u.metrics.get("loss", 0.0) * u.num_examples for u in updates) / max(n_up, 1)),
            val_mse=val_mse,
            rmse=summ["rmse"],
            mae=summ["mae"],
            r2=summ["r2"],
            per_institution=per,
            bytes_up=sum(u.nbytes() for u in updates),
            seconds=time.perf_counter() - t0,
        )
        bad = next((v for v in (record.train_loss, val_mse if val_total else 0.0, record.rmse) if not np.isfinite(v)),
                   None)
        if bad is not None:  # e.g. finite weights whose predictions overflow
            raise TrainingDiverged(r, bad)
        history.append(record)
        # select on validation only; without validation rows the last round is kept
        if not val_total or val_mse < best_val:
            best_val, best_round, best_models, best_preds = val_mse, r, models, preds
            best_per = per
            if on_best is not None:
                on_best(r, models)
        if on_round is not None:
            on_round(record)
    return RunResult(
        algorithm=algorithm.name,
        seed=seed,
        history=history,
        best_round=best_round,
        final=_summary(best_per),
        final_per_institution=best_per,
        models=best_models,
        predictions=best_preds,
        seconds=time.perf_counter() - t_start,
    )


def _check_diverged(r: int, updates: Sequence[Update], server: Payload) -> None:
    """Raise :class:`TrainingDiverged` when round ``r``'s losses or aggregate are not usable numbers."""
    n = sum(u.num_examples for u in updates)
    loss = float(sum(u.metrics.get("loss", 0.0) * u.num_examples for u in updates) / max(n, 1))
    if not np.isfinite(loss) or loss > DIVERGED_LOSS:
        raise TrainingDiverged(r, loss)
    for key, value in server.items():
        a = np.asarray(value)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise TrainingDiverged(r, float("nan"), f"the aggregate's {key!r} holds {a[~np.isfinite(a)].flat[0]}")


def _with_steps(algorithm: Algorithm, steps: int) -> Algorithm:
    """A shallow copy of ``algorithm`` whose local training runs ``steps`` steps per round."""
    import copy

    clone = copy.copy(algorithm)
    clone.training = replace(algorithm.training, local_steps=steps)
    return clone
