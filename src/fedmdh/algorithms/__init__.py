"""Algorithms: one module per method, all behind :class:`fedmdh.algorithms.base.Algorithm`."""

from __future__ import annotations

from dataclasses import fields
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
from fedmdh.defaults import ALGORITHM_DEFAULTS
from fedmdh.errors import InputError

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (Local, Pooled, FedAvg, FedProx, FedMDH, FedMDHNoGFAM, FedMDHNoCGAN, FedMDHNoRKD,
                FedGAN, FLIC, FedGen, FedKD)
}


TRAINING_KEYS = frozenset(f.name for f in fields(LocalTraining))


def _check_name(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise InputError(
            f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}."
        ) from None


def default_training(name: str, **overrides: Any) -> LocalTraining:
    """``name``'s local-training settings from :data:`ALGORITHM_DEFAULTS`, with ``overrides`` on top.

    ``default_training("fedavg", local_steps=3)`` keeps FedAvg's default optimiser and lr.
    """
    _check_name(name)
    train = {k: v for k, v in ALGORITHM_DEFAULTS.get(name, {}).items() if k in TRAINING_KEYS}
    train.update(overrides)
    return LocalTraining(**train)


def make_algorithm(name: str, training: LocalTraining | None = None, **hparams: Any) -> Algorithm:
    """Build an algorithm by name with its local-training settings and own hyperparameters.

    Defaults come from :data:`fedmdh.defaults.ALGORITHM_DEFAULTS`, the table the CLI reads:
    ``training=None`` gives the algorithm's default optimiser and lr (:func:`default_training`),
    and each own hyperparameter not given takes its default there. A ``training`` given is used
    as it is (build it with :func:`default_training` to keep the default lr).
    """
    cls = _check_name(name)
    if training is None:
        training = default_training(name)
    own = {k: v for k, v in ALGORITHM_DEFAULTS.get(name, {}).items() if k not in TRAINING_KEYS}
    own.update(hparams)
    try:
        return cls(training, **own)
    except TypeError as exc:
        raise InputError(f"algorithm {name!r}: bad hyperparameter ({exc}).") from None


def algorithm_from_hyperparameters(name: str, hyperparameters: dict[str, Any]) -> Algorithm:
    """Rebuild an algorithm from the dict its ``hyperparameters()`` returned (saved models)."""
    hyperparameters = dict(hyperparameters)
    guard, reference = hyperparameters.pop("local_guard", None), hyperparameters.pop("local_reference", None)
    if guard not in (None, "off"):
        from fedmdh.algorithms.guard import LocalGuard

        return LocalGuard(algorithm_from_hyperparameters(name, hyperparameters),
                          algorithm_from_hyperparameters("local", dict(reference or {})), guard)
    keys = TRAINING_KEYS
    train = {k: v for k, v in hyperparameters.items() if k in keys}
    if "hidden" in train:
        train["hidden"] = tuple(train["hidden"])
    own = {k: v for k, v in hyperparameters.items() if k not in keys}
    cls = ALGORITHMS.get(name)
    if cls is not None:  # a setting this version no longer has (an older saved model) is left out
        accepted = {f.name for f in fields(cls.Settings)}
        own = {k: v for k, v in own.items() if k in accepted}
    return make_algorithm(name, LocalTraining(**train), **own)


__all__ = ["ALGORITHMS", "ALGORITHM_DEFAULTS", "Algorithm", "LocalTraining", "Update", "default_training",
           "make_algorithm", "weighted_average"]
