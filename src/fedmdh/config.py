"""Experiment configuration: a frozen dataclass validated at construction, read from and written to TOML.

A config file looks like::

    target = "e_form"
    institutions = ["train_part0.csv", "train_part1.csv", "train_part2.csv"]
    test = "test_data1.csv"
    algorithms = ["local", "pooled", "fedavg", "fedprox"]
    seeds = 3            # seeds first_seed, first_seed + 1, ...
    rounds = 400
    val_fraction = 0.15
    exclude = []         # columns that are neither features nor target

    [training]           # shared by every algorithm: the same network and budget
    hidden = [64, 64]
    local_steps = 5
    batch_size = 64

    [algorithm.fedprox]  # per-algorithm settings: optimizer, lr, momentum, weight_decay, own hyperparameters
    proximal_mu = 0.01

Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from fedmdh.algorithms import ALGORITHMS, LocalTraining, make_algorithm
from fedmdh.algorithms.base import Algorithm
from fedmdh.errors import InputError

#: Per-algorithm defaults, chosen on validation splits of the training data (see docs/algorithms.md).
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "local": {"optimizer": "adam", "lr": 0.001},
    "pooled": {"optimizer": "adam", "lr": 0.003},
    "fedavg": {"optimizer": "sgd", "lr": 0.2},
    "fedprox": {"optimizer": "sgd", "lr": 0.2, "proximal_mu": 0.01},
    "fedmdh": {"optimizer": "sgd", "lr": 0.2},
    "fedmdh-no-gfam": {"optimizer": "sgd", "lr": 0.2},
    "fedmdh-no-cgan": {"optimizer": "sgd", "lr": 0.2},
    "fedmdh-no-rkd": {"optimizer": "sgd", "lr": 0.2},
    "fedgan": {"optimizer": "sgd", "lr": 0.2},
    "flic": {"optimizer": "sgd", "lr": 0.05},
    "fedgen": {"optimizer": "sgd", "lr": 0.2, "max_grad_norm": 1.0},
    "fedkd": {"optimizer": "sgd", "lr": 0.2},
}

#: The local guard under own selection unless a config sets one (chosen on validation: docs/tuning.md).
DEFAULT_LOCAL_GUARD = "blend"
GUARD_MODES = ("off", "choose", "blend")

_TRAINING_KEYS = {f.name for f in fields(LocalTraining)}
_SHARED_TRAINING_KEYS = {"hidden", "local_steps", "batch_size"}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything needed to rerun an experiment."""

    institutions: tuple[str, ...]
    test: str
    target: str
    algorithms: tuple[str, ...] = ("local", "pooled", "fedavg", "fedprox")
    seeds: int = 3
    first_seed: int = 0
    rounds: int = 400
    val_fraction: float = 0.15
    clip_inputs: float | None = 1.0  # margin, in training-range widths; None: no clipping
    selection: str = "own"  # model selection: "own" validation rows, or "federated" (simulator only)
    # every institution also trains its local model and keeps, on its own validation rows, the federated
    # one, the local one ("choose") or a mixture ("blend"); None: the default under own selection
    local_guard: str | None = None
    exclude: tuple[str, ...] = ()
    hidden: tuple[int, ...] = (64, 64)
    local_steps: int = 5
    batch_size: int = 64
    algorithm_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "institutions", tuple(str(p) for p in self.institutions))
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(
            self, "algorithm_settings", {k: dict(v) for k, v in dict(self.algorithm_settings).items()}
        )
        if len(self.institutions) < 2:
            raise InputError("give at least two institution files (--institutions A.csv B.csv ...).")
        if not self.algorithms:
            raise InputError("give at least one algorithm (--algorithms fedavg,...).")
        for a in self.algorithms:
            if a not in ALGORITHMS:
                raise InputError(f"unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}.")
        if len(set(self.algorithms)) != len(self.algorithms):
            raise InputError(f"an algorithm is listed twice in {list(self.algorithms)}.")
        for a in self.algorithm_settings:
            if a not in ALGORITHMS:
                raise InputError(f"settings for unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}.")
        if self.seeds < 1:
            raise InputError(f"seeds must be >= 1, got {self.seeds}.")
        if self.rounds < 1:
            raise InputError(f"rounds must be >= 1, got {self.rounds}.")
        if not 0.0 <= self.val_fraction < 0.5:
            raise InputError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}.")
        if self.clip_inputs is not None and not self.clip_inputs >= 0.0:
            raise InputError(f"clip_inputs must be a margin >= 0 (a fraction of the training range), got "
                             f"{self.clip_inputs}.")
        if self.selection not in ("own", "federated"):
            raise InputError(f"selection must be 'own' or 'federated', got {self.selection!r}.")
        if self.local_guard is not None and self.local_guard not in GUARD_MODES:
            raise InputError(f"local_guard must be one of {', '.join(GUARD_MODES)}, got {self.local_guard!r}.")
        if self.selection == "federated" and self.local_guard not in (None, "off"):
            raise InputError(f"local_guard {self.local_guard!r} selects on each institution's own validation rows; "
                             "with selection 'federated' leave it out or set it to off.")
        if self.local_steps < 1 or self.batch_size < 1:
            raise InputError("local_steps and batch_size must be >= 1.")
        for a in self.algorithms:  # fail now, not after an hour of other algorithms
            self.build_algorithm(a)

    @property
    def guard(self) -> str:
        """The local guard in effect: :data:`DEFAULT_LOCAL_GUARD` under own selection unless set, off
        under federated selection."""
        if self.local_guard is not None:
            return self.local_guard
        return DEFAULT_LOCAL_GUARD if self.selection == "own" else "off"

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    def settings_for(self, name: str) -> dict[str, Any]:
        """Defaults for ``name`` overlaid with the config's settings for it."""
        merged = dict(ALGORITHM_DEFAULTS.get(name, {}))
        merged.update(self.algorithm_settings.get(name, {}))
        bad = _SHARED_TRAINING_KEYS & set(self.algorithm_settings.get(name, {}))
        if bad:
            raise InputError(
                f"[algorithm.{name}] sets {sorted(bad)}; network size and budget are shared by every "
                "algorithm, set them under [training]."
            )
        return merged

    def build_algorithm(self, name: str) -> Algorithm:
        """The algorithm ``name`` with the shared network/budget and its own settings."""
        settings = self.settings_for(name)
        train_kw = {k: v for k, v in settings.items() if k in _TRAINING_KEYS}
        hparams = {k: v for k, v in settings.items() if k not in _TRAINING_KEYS}
        try:
            training = LocalTraining(
                hidden=self.hidden, local_steps=self.local_steps, batch_size=self.batch_size, **train_kw
            )
        except (TypeError, ValueError) as exc:
            raise InputError(f"algorithm {name!r}: {exc}") from None
        try:
            algorithm = make_algorithm(name, training, **hparams)
        except ValueError as exc:
            raise InputError(f"algorithm {name!r}: {exc}") from None
        if self.guard != "off" and algorithm.federated and not algorithm.centralized:
            from fedmdh.algorithms.guard import LocalGuard

            return LocalGuard(algorithm, self.build_algorithm("local"), self.guard)
        return algorithm

    def with_overrides(self, **kw: Any) -> "ExperimentConfig":
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def to_toml_dict(self) -> dict[str, Any]:
        d = asdict(self)
        out: dict[str, Any] = {
            "target": d["target"],
            "institutions": list(d["institutions"]),
            "test": d["test"],
            "algorithms": list(d["algorithms"]),
            "seeds": d["seeds"],
            "first_seed": d["first_seed"],
            "rounds": d["rounds"],
            "val_fraction": d["val_fraction"],
            "clip_inputs": d["clip_inputs"] if d["clip_inputs"] is not None else False,
            "selection": d["selection"],
            "local_guard": self.guard,
            "exclude": list(d["exclude"]),
            "training": {
                "hidden": list(d["hidden"]),
                "local_steps": d["local_steps"],
                "batch_size": d["batch_size"],
            },
            # the effective settings of every algorithm run, defaults included
            "algorithm": {a: self.settings_for(a) for a in self.algorithms},
        }
        return out

    def write_toml(self, path: str | Path) -> None:
        Path(path).write_text(tomli_w.dumps(self.to_toml_dict()), encoding="utf-8")


_TOP_KEYS = {
    "target", "institutions", "test", "algorithms", "seeds", "first_seed", "rounds",
    "val_fraction", "clip_inputs", "selection", "local_guard", "exclude", "training", "algorithm",
}


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file into keyword arguments of :class:`ExperimentConfig` (paths resolved)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: config file not found; check the path.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: is not valid TOML ({exc}); fix the file.") from None
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise InputError(f"{path}: unknown setting {sorted(unknown)[0]!r}; known: {', '.join(sorted(_TOP_KEYS))}.")
    base = path.parent
    kw: dict[str, Any] = {}
    for key in ("target", "seeds", "first_seed", "rounds", "val_fraction", "selection", "local_guard"):
        if key in raw:
            kw[key] = raw[key]
    if "clip_inputs" in raw:  # a margin, or false for no clipping
        kw["clip_inputs"] = None if raw["clip_inputs"] is False else raw["clip_inputs"]
    if "institutions" in raw:
        kw["institutions"] = tuple(str((base / p).resolve()) if not Path(p).is_absolute() else p
                                   for p in raw["institutions"])
    if "test" in raw:
        p = raw["test"]
        kw["test"] = str((base / p).resolve()) if not Path(p).is_absolute() else p
    if "algorithms" in raw:
        algs = raw["algorithms"]
        kw["algorithms"] = tuple(algs.split(",") if isinstance(algs, str) else algs)
    if "exclude" in raw:
        kw["exclude"] = tuple(raw["exclude"])
    training = raw.get("training", {})
    unknown_t = set(training) - _SHARED_TRAINING_KEYS
    if unknown_t:
        raise InputError(
            f"{path}: unknown [training] setting {sorted(unknown_t)[0]!r}; known: "
            f"{', '.join(sorted(_SHARED_TRAINING_KEYS))} (optimizer and lr go under [algorithm.NAME])."
        )
    for key in _SHARED_TRAINING_KEYS:
        if key in training:
            kw[key] = training[key]
    if "algorithm" in raw:
        kw["algorithm_settings"] = raw["algorithm"]
    return kw
