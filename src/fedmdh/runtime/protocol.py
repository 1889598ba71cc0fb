"""The steps both runtimes share: random streams, evaluation and per-institution model selection.

The in-process simulator and a deployed node (:mod:`fedmdh.runtime.flower`) call these same
functions, so that under the same seed they produce the same bits:

- every institution's training stream in round ``r`` is :func:`client_rng` ``(seed, r, name)``,
  and the aggregation's stream :func:`aggregate_rng` ``(seed, r)`` (any peer derives both);
- an institution's private state goes through :meth:`Algorithm.client_arrays` /
  :meth:`Algorithm.load_client` between rounds (:class:`ClientSlot`);
- after each round's aggregate, each institution evaluates its own model on its own validation
  rows and keeps the model of its best round (:class:`Selection`); the shared test set, where an
  institution has it, is only for reporting.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmdh.algorithms.base import Algorithm, FederationSpec, Params, Payload
from fedmdh.data.federation import InstitutionData, Scaler
from fedmdh.metrics import regression_metrics
from fedmdh.seeding import rng_for

#: ``own``: each institution selects on its own validation rows (what a deployment can do);
#: ``federated``: on every institution's validation rows seen through its columns (simulator only:
#: it needs every institution's model at every institution).
SELECTIONS = ("own", "federated")


def training_threads() -> int:
    """Torch and BLAS threads for training and aggregation: ``$FEDMDH_TORCH_THREADS``, default 1.

    The networks are small; intra-op threads cost more in synchronisation than they save, and
    they collapse when another process competes for the cores (measured: a 40-round FedMDH run
    took 2.6 s with one thread and 9.2 s with two on an idle 2-core machine). numpy's BLAS
    (OpenBLAS) threads the same way: on the shared 2-core machine a 64 x 64 ``eigh`` (GFAM's
    anchor, every round) took 49 ms with its two default threads and 0.4 ms with one, which made
    a 50-round FedMDH run on a 200-column federation 73 s instead of 4.2 s. The thread count also
    changes the order of float sums in some kernels, so every runtime and every peer uses the
    same count to get the same bits.
    """
    try:
        return max(1, int(os.environ.get("FEDMDH_TORCH_THREADS", "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def training_thread_count() -> Iterator[None]:
    """Torch and numpy's BLAS set to :func:`training_threads` inside the block (the caller's counts
    restored after)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    n = training_threads()
    torch.set_num_threads(n)
    blas = threadpool_limits(limits=n, user_api="blas")
    try:
        yield
    finally:
        blas.restore_original_limits()
        torch.set_num_threads(before)


def use_training_threads() -> None:
    """Torch and numpy's BLAS set to :func:`training_threads` for the rest of the process (a node or
    a coordinator process, which does nothing else)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(training_threads())
    threadpool_limits(limits=training_threads(), user_api="blas")


def client_rng(seed: int, rnd: int, name: str) -> np.random.Generator:
    """Institution ``name``'s generator for its local training in round ``rnd``."""
    return rng_for(seed, "round", rnd, name)


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


@dataclass
class Kept:
    """The model an institution keeps so far and what it scored."""

    round: int
    val_mse: float
    params: Params = field(repr=False)
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


class Selection:
    """Per-institution model selection: the round with the lowest validation loss is kept.

    The first offered round is kept; a later round replaces it when its validation loss is lower,
    or when neither loss is finite (so without validation rows the last round is kept). Ties keep
    the earlier round.
    """

    def __init__(self) -> None:
        self.kept: dict[str, Kept] = {}

    def offer(self, name: str, rnd: int, val_mse: float, params: Params, metrics: Mapping[str, float],
              predictions: np.ndarray | None = None) -> bool:
        """Consider round ``rnd``'s model of ``name``; returns ``True`` when it is now the kept one."""
        cur = self.kept.get(name)
        finite = bool(np.isfinite(val_mse))
        better = (cur is None or (finite and (not np.isfinite(cur.val_mse) or val_mse < cur.val_mse))
                  or (not finite and not np.isfinite(cur.val_mse)))
        if better:
            self.kept[name] = Kept(rnd, float(val_mse), params, dict(metrics),
                                   np.zeros(0) if predictions is None else predictions)
        return better


def initial_state(algorithm: Algorithm, spec: FederationSpec, seed: int) -> Payload:
    """The task's first global payload: a pure function of what setup fixed and the seed."""
    return algorithm.init(spec, seed)
