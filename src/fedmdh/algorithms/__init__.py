"""Algorithms: one module per method, all behind :class:`fedmdh.algorithms.base.Algorithm`."""

from __future__ import annotations

from typing import Any

from fedmdh.algorithms.base import Algorithm, LocalTraining, Update, weighted_average
from fedmdh.algorithms.fedavg import FedAvg
from fedmdh.algorithms.fedprox import FedProx
from fedmdh.algorithms.local import Local
from fedmdh.algorithms.pooled import Pooled
from fedmdh.errors import InputError

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (Local, Pooled, FedAvg, FedProx)
}


def make_algorithm(name: str, training: LocalTraining | None = None, **hparams: Any) -> Algorithm:
    """Build an algorithm by name with its local-training settings and own hyperparameters."""
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        raise InputError(
            f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}."
        ) from None
    try:
        return cls(training, **hparams)
    except TypeError as exc:
        raise InputError(f"algorithm {name!r}: bad hyperparameter ({exc}).") from None


__all__ = ["ALGORITHMS", "Algorithm", "LocalTraining", "Update", "make_algorithm", "weighted_average"]
