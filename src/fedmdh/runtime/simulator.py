"""The in-process simulator: drives an algorithm's pure functions over a prepared federation.

Each round, every institution (in name order) loads its private state from arrays, runs
``client_update`` with its own generator derived from ``(seed, round, institution)`` and stores
its state back as arrays; the updates are aggregated with the round's generator; each
institution's current model is evaluated on its validation split (for model selection) and on the
shared test set through its own columns (for reporting only). The protocol is the deployment's
(:mod:`fedmdh.runtime.protocol`): under the same seed both give the same bits.

Model selection (``selection``): by default each institution keeps the model of the round with the
lowest loss on its *own* validation rows, as a deployed node does. ``selection="federated"``
scores every institution's model on the validation rows of all institutions through its own
columns (each validation row keeps only the columns its owner has), as the test protocol does with
the shared test set, and keeps the round with the lowest mean over institutions for everyone; it
needs every model at every institution, which only the simulator has. The test set never
influences either choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmdh.algorithms.base import Algorithm, FederationSpec, Params, Payload, Update
from fedmdh.algorithms.guard import FEDERATED, LocalGuard
from fedmdh.data.federation import InstitutionData, PreparedFederation
from fedmdh.runtime.protocol import (
    SELECTIONS,
    ClientSlot,
    Selection,
    dp_noise_rng,
    evaluate_round,
    initial_state,
    score_on_test,
    training_thread_count,
)
from fedmdh.errors import TrainingDiverged
from fedmdh.runtime.round import Aggregation, aggregate, train
from fedmdh.secure.dp import check_dp_covered

if TYPE_CHECKING:
    from fedmdh.secure.aggregation import SecureSum
    from fedmdh.secure.dp import DPSettings

POOLED_NAME = "__pooled__"

#: Called after each round's aggregation with (round, updates ordered by institution, aggregate);
#: returns the aggregate the round finalized (a ledger returns the one its quorum agreed on).
RoundHook = Callable[[int, Sequence[Update], Payload], Payload]

#: Called whenever the kept models improve, with (round, each institution's params): e.g. to save
#: them as the run goes, so that an interrupted run keeps the best models it had.
BestHook = Callable[[int, dict[str, Params], dict[str, int]], None]


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
    #: the round whose model each institution kept (chosen on validation)
    best_rounds: dict[str, int]
    final: dict[str, float]
    final_per_institution: dict[str, dict[str, float]]
    models: dict[str, Params] = field(repr=False)
    predictions: dict[str, np.ndarray] = field(repr=False)
    seconds: float = 0.0
    #: what each institution's federated model alone scores (its best round on its own validation
    #: rows): under the local guard, the same run without the guard; otherwise the final metrics
    federated_only: dict[str, float] = field(default_factory=dict)
    federated_only_per_institution: dict[str, dict[str, float]] = field(default_factory=dict)
    #: under the local guard, per institution: the federated and local rounds kept and the weight
    guard: dict[str, dict[str, float]] = field(default_factory=dict)
    # the privacy budget spent (fedmdh.secure.dp.report) when the releases were noised
    privacy: dict[str, Any] | None = None

    @property
    def best_round(self) -> int:
        """The latest round any institution kept (all of them, with ``selection="federated"``)."""
        return max(self.best_rounds.values())


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
    return {k: float(np.mean([m[k] for m in per.values()])) if all(k in m for m in per.values()) else float("nan")
            for k in ("rmse", "mae", "r2")}


def simulate(
    fed: PreparedFederation,
    algorithm: Algorithm,
    rounds: int,
    seed: int = 0,
    on_round: Callable[[RoundRecord], None] | None = None,
    round_hook: RoundHook | None = None,
    selection: str = "own",
    on_models: Callable[[int, dict[str, Params]], None] | None = None,
    on_best: BestHook | None = None,
    secure: SecureSum | None = None,
    dp: "DPSettings | None" = None,
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
    selection:
        ``"own"`` (default, what a deployment does): each institution keeps the model of the round
        with the lowest loss on its own validation rows. ``"federated"``: every institution's
        model is scored on all institutions' validation rows through its own columns and one round
        is chosen for all (it needs every model at every institution, so only the simulator can).
    on_models:
        Called after each round's evaluation with the round and every institution's current model
        (studies of selection rules; the arrays must not be modified).
    on_best:
        Called with ``(round, models, kept_rounds)`` each time a kept model changes (every
        institution's kept model after that round, and the round each was kept from).
    secure:
        A secure sum (``{institution: vector} -> sum``, e.g.
        :meth:`fedmdh.secure.threshold.ThresholdGroup.secure_sum`): every round's aggregate is
        computed from the encrypted weighted sums (:func:`fedmdh.runtime.round.aggregate`);
        only FedAvg, FedProx and FedGAN are covered, others raise :class:`~fedmdh.errors.InputError`.
        ``bytes_up`` then counts what the institutions sent: ciphertexts and partial decryptions,
        when the secure sum says so (``secure.bytes_up``), else the clear payloads.
    dp:
        Differential privacy on every round's released sum (:mod:`fedmdh.secure.dp`; FedAvg and
        FedProx): each institution clips its change and adds its share of the Gaussian noise,
        through ``secure`` when given, else summed in the clear (a study of the utility: the
        noise here follows ``seed``, so it protects nothing; a deployed node draws it from the OS).
        ``RunResult.privacy`` reports the budget spent.

    Raises
    ------
    TrainingDiverged
        A loss, an aggregate or a prediction became NaN, infinite or absurdly large; raised before
        the round's aggregate reaches ``round_hook`` and before the round is recorded, so every
        callback has seen only the rounds before it.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
    if selection == "federated" and isinstance(algorithm, LocalGuard):
        raise ValueError("the local guard selects on each institution's own validation rows; use selection "
                         "'own' or the algorithm without the guard.")
    if dp is not None and (algorithm.centralized or not algorithm.federated):
        check_dp_covered(algorithm)  # pooled is refused; local training releases nothing
        dp = None
    aggregation = Aggregation(secure=secure is not None, dp=dp)
    aggregation.check(algorithm)
    with training_thread_count():
        return _simulate(fed, algorithm, rounds, seed, on_round, round_hook, selection, on_models, on_best, secure,
                         aggregation)


def _simulate(
    fed: PreparedFederation,
    algorithm: Algorithm,
    rounds: int,
    seed: int,
    on_round: Callable[[RoundRecord], None] | None,
    round_hook: RoundHook | None,
    selection: str,
    on_models: Callable[[int, dict[str, Params]], None] | None = None,
    on_best: BestHook | None = None,
    secure: SecureSum | None = None,
    aggregation: Aggregation = Aggregation(),
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

    server = initial_state(algorithm, spec, seed)
    slots = {name: ClientSlot(algorithm, spec, trainers[name], seed) for name in sorted(trainers)}
    federated_val = _federated_validation(fed) if selection == "federated" else None

    history: list[RoundRecord] = []
    kept = Selection()
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        updates = []
        clients: dict[str, Any] = {}
        try:
            for name in sorted(trainers):
                upd, clients[name] = train(algorithm, server, slots[name], trainers[name], seed, r, name)
                updates.append(upd)
        except np.linalg.LinAlgError as exc:  # e.g. an SVD of NaN weights
            raise TrainingDiverged(r, float("nan"), f"numerical failure: {exc}") from None
        server = aggregate(aggregation, algorithm, server, updates, r, seed, secure,
                           noise=lambda name, rnd: dp_noise_rng(seed, rnd, name))
        if round_hook is not None:
            server = round_hook(r, sorted(updates, key=lambda u: u.institution), server)

        per: dict[str, dict[str, float]] = {}
        models: dict[str, Params] = {}
        for name, d in insts.items():
            owner = POOLED_NAME if algorithm.centralized else name
            models[name] = algorithm.personal_params(server, clients[owner])
        preds: dict[str, np.ndarray] = {}
        changed: list[bool] = []
        if federated_val is not None:
            fed_val = federated_val(algorithm, models)
            for name, d in insts.items():
                metrics, preds[name] = score_on_test(algorithm, models[name], d, fed.scaler, fed.y_test)
                per[name] = {**metrics, "val_mse": fed_val}
        else:  # each institution on its own validation rows; what it keeps is offered there
            for name, d in insts.items():
                per[name], ch = evaluate_round(algorithm, kept, name, r, models[name], d, fed.scaler, fed.y_test)
                changed.append(ch)
        summ = _summary(per)
        n_up = sum(u.num_examples for u in updates)
        record = RoundRecord(
            round=r,
            train_loss=float(sum(u.metrics.get("loss", 0.0) * u.num_examples for u in updates) / max(n_up, 1)),
            val_mse=_nanmean([m["val_mse"] for m in per.values()]),
            rmse=summ["rmse"],
            mae=summ["mae"],
            r2=summ["r2"],
            per_institution=per,
            bytes_up=_bytes_up(updates, secure),
            seconds=time.perf_counter() - t0,
        )
        has_val = any(d.y_val.size for d in insts.values())
        bad = next((v for v in (record.train_loss, record.val_mse if has_val else 0.0, record.rmse)
                    if not np.isfinite(v)), None)
        if bad is not None:  # e.g. finite weights whose predictions overflow
            raise TrainingDiverged(r, bad)
        if federated_val is not None:
            changed = [kept.offer(name, r, per[name]["val_mse"], models[name], per[name], preds[name]) for name in insts]
        if any(changed) and on_best is not None:
            on_best(r, {name: kept.kept[name].params for name in insts}, {name: kept.kept[name].round for name in insts})
        history.append(record)
        if on_models is not None:
            on_models(r, models)
        if on_round is not None:
            on_round(record)
    final_per = {name: kept.kept[name].metrics for name in insts}
    federated_per = {name: kept.best[(name, FEDERATED)].metrics for name in insts}
    return RunResult(
        algorithm=algorithm.name,
        seed=seed,
        history=history,
        best_rounds={name: kept.kept[name].round for name in insts},
        final=_summary(final_per),
        final_per_institution=final_per,
        models={name: kept.kept[name].params for name in insts},
        predictions={name: kept.kept[name].predictions for name in insts},
        seconds=time.perf_counter() - t_start,
        federated_only=_summary(federated_per),
        federated_only_per_institution=federated_per,
        guard={name: dict(kept.kept[name].detail) for name in insts if kept.kept[name].detail},
        privacy=_privacy(aggregation.dp, rounds, len(trainers)),
    )


def _privacy(dp, rounds: int, n_parties: int) -> dict[str, Any] | None:
    if dp is None:
        return None
    from fedmdh.secure.dp import report

    return report(dp, rounds, n_parties)


def _bytes_up(updates: Sequence[Update], secure: SecureSum | None) -> int:
    sent = getattr(secure, "bytes_up", None) if secure is not None else None
    return int(sent()) if callable(sent) else sum(u.nbytes() for u in updates)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def validation_views(fed: PreparedFederation) -> dict[str, np.ndarray]:
    """Every institution's validation rows, stacked in institution order, as each institution sees
    them: through its own columns (the others set to 0), clipped to its training range."""
    val_X = np.concatenate([d.X_val for d in fed.institutions])
    views = {}
    for d in fed.institutions:
        keep = np.zeros(fed.n_features, dtype=np.float32)
        keep[d.feature_idx] = 1.0
        views[d.name] = d.clip(val_X * keep)
    return views


def _federated_validation(fed: PreparedFederation) -> Callable[[Algorithm, dict[str, Params]], float] | None:
    """The cross-institution validation loss: every institution's model predicts the validation rows
    of all institutions through its own columns, clipped to its training range; the loss is the mean
    over institutions of those MSEs. Needs every model at every institution (simulator only)."""
    val_y = np.concatenate([d.y_val for d in fed.institutions]).astype(np.float64)
    if not val_y.size:
        return None
    views = validation_views(fed)

    def loss(algorithm: Algorithm, models: dict[str, Params]) -> float:
        return float(np.mean([np.mean((algorithm.predict(models[n], views[n]) - val_y) ** 2) for n in views]))

    return loss


def _with_steps(algorithm: Algorithm, steps: int) -> Algorithm:
    """A shallow copy of ``algorithm`` whose local training runs ``steps`` steps per round."""
    import copy

    clone = copy.copy(algorithm)
    clone.training = replace(algorithm.training, local_steps=steps)
    return clone
