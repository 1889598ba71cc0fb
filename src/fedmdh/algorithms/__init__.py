"""Algorithms: one module per method, all behind :class:`fedmdh.algorithms.base.Algorithm`."""

from __future__ import annotations

from typing import Any

from fedmdh.algorithms.base import Algorithm, LocalTraining, Update, weighted_average
from fedmdh.algorithms.fedavg import FedAvg
from fedmdh.algorithms.fedgan import FedGAN
from fedmdh.algorithms.fedgen import FedGen
from fedmdh.algorithms.fedkd import FedKD
from fedmdh.algorithms.flic import FLIC
from fedmdh.algorithms.fedmdh import FedMDH, FedMDHNoCGAN, FedMDHNoGFAM, FedMDHNoRKD
from fedmdh.algorithms.fedprox import FedProx
from fedmdh.algorithms.local import Local
from fedmdh.algorithms.pooled import Pooled
from fedmdh.errors import InputError

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (Local, Pooled, FedAvg, FedProx, FedMDH, FedMDHNoGFAM, FedMDHNoCGAN, FedMDHNoRKD,
                FedGAN, FLIC, FedGen, FedKD)
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


def algorithm_from_hyperparameters(name: str, hyperparameters: dict[str, Any]) -> Algorithm:
    """Rebuild an algorithm from the dict its ``hyperparameters()`` returned (saved models)."""
    from dataclasses import fields

    hyperparameters = dict(hyperparameters)
    guard, reference = hyperparameters.pop("local_guard", None), hyperparameters.pop("local_reference", None)
    if guard not in (None, "off"):
        from fedmdh.algorithms.guard import LocalGuard

        return LocalGuard(algorithm_from_hyperparameters(name, hyperparameters),
                          algorithm_from_hyperparameters("local", dict(reference or {})), guard)
    keys = {f.name for f in fields(LocalTraining)}
    train = {k: v for k, v in hyperparameters.items() if k in keys}
    if "hidden" in train:
        train["hidden"] = tuple(train["hidden"])
    own = {k: v for k, v in hyperparameters.items() if k not in keys}
    cls = ALGORITHMS.get(name)
    if cls is not None and cls.__init__ is not Algorithm.__init__:
        import inspect

        accepted = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            own = {k: v for k, v in own.items() if k in accepted}
    return make_algorithm(name, LocalTraining(**train), **own)


__all__ = ["ALGORITHMS", "Algorithm", "LocalTraining", "Update", "make_algorithm", "weighted_average"]
