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

import numbers
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from fedmdh import defaults
from fedmdh.algorithms import ALGORITHMS, LocalTraining, make_algorithm
from fedmdh.algorithms.base import Algorithm
from fedmdh.errors import InputError

#: Per-algorithm defaults: one table, in :mod:`fedmdh.defaults`, read by make_algorithm and the CLI alike.
ALGORITHM_DEFAULTS = defaults.ALGORITHM_DEFAULTS

#: The local guard under own selection unless a config sets one (chosen on validation: docs/tuning.md).
DEFAULT_LOCAL_GUARD = "off"
GUARD_MODES = ("off", "choose", "blend")

_TRAINING_KEYS = {f.name for f in fields(LocalTraining)}
_SHARED_TRAINING_KEYS = {"hidden", "local_steps", "batch_size"}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything needed to rerun an experiment."""

    institutions: tuple[str, ...]
    test: str
    target: str
    algorithms: tuple[str, ...] = defaults.BENCHMARK_ALGORITHMS
    seeds: int = defaults.SEEDS
    first_seed: int = defaults.FIRST_SEED
    rounds: int = defaults.ROUNDS
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
    # differential privacy on each round's released sum (fedmdh.secure.dp): noise multiplier, 0 = off
    dp_noise: float = 0.0
    dp_clip: float = 0.01  # L2 bound on one institution's change of the parameters in a round
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        check_types({f.name: getattr(self, f.name) for f in fields(self)})
        object.__setattr__(self, "institutions", tuple(str(p) for p in self.institutions))
        object.__setattr__(self, "test", str(self.test))
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
        check_algorithm_names(self.algorithms)
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
        if self.rounds * self.local_steps > defaults.MAX_STEPS:
            raise InputError(
                f"rounds x local_steps = {self.rounds * self.local_steps:,} minibatch steps per institution exceeds "
                f"the bound {defaults.MAX_STEPS:,}; lower rounds or local_steps."
            )
        if self.dp_noise < 0:
            raise InputError(f"dp_noise (the noise multiplier) must be >= 0 (0: off), got {self.dp_noise}.")
        if self.dp is not None:
            from fedmdh.secure.dp import check_dp_covered

            for a in self.algorithms:
                check_dp_covered(a)
        for a in self.algorithms:  # fail now, not after an hour of other algorithms
            self.build_algorithm(a)

    @property
    def dp(self):
        """The differential-privacy settings (:class:`fedmdh.secure.dp.DPSettings`), None when off."""
        if not self.dp_noise:
            return None
        from fedmdh.secure.dp import DPSettings

        return DPSettings(float(self.dp_noise), float(self.dp_clip), float(self.dp_delta))

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
        if self.dp is not None:
            out["privacy"] = self.dp.to_dict()
        return out

    def write_toml(self, path: str | Path) -> None:
        Path(path).write_text(tomli_w.dumps(self.to_toml_dict()), encoding="utf-8")


def check_algorithm_names(names: "tuple[str, ...] | list[str]", where: str = "") -> None:
    """Refuse an unknown algorithm name (listing the known ones) or one listed twice; ``where`` prefixes
    the line."""
    for a in names:
        if a not in ALGORITHMS:
            raise InputError(f"{where}unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}.")
    if len(set(names)) != len(names):
        raise InputError(f"{where}an algorithm is listed twice in {list(names)}.")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_in(key: str, value: Any, lo: int | None, hi: int | None, where: str) -> None:
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        bound = (f" >= {lo}" if lo is not None else "") + (f" and <= {hi:,}" if hi is not None else "")
        raise InputError(f"{where}{key} must be{bound} (an integer), got {_kind(value)}.")


def _strings(key: str, value: Any, where: str, example: str, paths: bool = False) -> None:
    ok = (str, os.PathLike) if paths else str
    if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)) or not all(
            isinstance(v, ok) for v in value):
        what = "file paths" if paths else "strings"
        raise InputError(f"{where}{key} must be a list of {what}, e.g. {key} = {example}, got {_kind(value)}.")


def check_types(kw: Mapping[str, Any], where: str = "") -> None:
    """Refuse values of the wrong type or out of bounds, one line naming the setting (``where`` prefixes it).

    The keys are :class:`ExperimentConfig`'s fields; absent keys are not checked.
    """
    if "selection" in kw and kw["selection"] not in ("own", "federated"):
        raise InputError(f"{where}selection must be \"own\" or \"federated\", got {_kind(kw['selection'])}.")
    if kw.get("local_guard") is not None and kw["local_guard"] not in GUARD_MODES:
        raise InputError(f"{where}local_guard must be one of " + ", ".join(f'"{m}"' for m in GUARD_MODES)
                         + f", got {_kind(kw['local_guard'])}.")
    if "target" in kw and not isinstance(kw["target"], str):
        raise InputError(f"{where}target must be a column name (a string), got {_kind(kw['target'])}.")
    if "test" in kw and not isinstance(kw["test"], (str, os.PathLike)):
        raise InputError(f"{where}test must be a file path (a string), got {_kind(kw['test'])}.")
    if "institutions" in kw:
        _strings("institutions", kw["institutions"], where, '["a.csv", "b.csv"]', paths=True)
    if "exclude" in kw:
        _strings("exclude", kw["exclude"], where, '["id", "formula"]')
    if "algorithms" in kw:
        _strings("algorithms", kw["algorithms"], where, '["fedavg", "fedmdh"]')
    for key, lo, hi in (("rounds", 1, defaults.MAX_ROUNDS), ("seeds", 1, defaults.MAX_SEEDS),
                        ("first_seed", None, None), ("local_steps", 1, defaults.MAX_LOCAL_STEPS),
                        ("batch_size", 1, defaults.MAX_BATCH_SIZE)):
        if key in kw:
            _int_in(key, kw[key], lo, hi, where)
    if "val_fraction" in kw and not _is_number(kw["val_fraction"]):
        raise InputError(f"{where}val_fraction must be a number in [0, 0.5), got {_kind(kw['val_fraction'])}.")
    for key in ("dp_noise", "dp_clip", "dp_delta"):
        if key in kw and not _is_number(kw[key]):
            raise InputError(f"{where}{key} must be a number, got {_kind(kw[key])}.")
    if "clip_inputs" in kw and kw["clip_inputs"] is not None and not _is_number(kw["clip_inputs"]):
        raise InputError(f"{where}clip_inputs must be a margin >= 0 or false, got {_kind(kw['clip_inputs'])}.")
    if "hidden" in kw:
        h = kw["hidden"]
        if (isinstance(h, str) or not isinstance(h, (list, tuple)) or not 1 <= len(h) <= defaults.MAX_LAYERS
                or not all(_is_int(w) and 1 <= w <= defaults.MAX_WIDTH for w in h)):
            raise InputError(f"{where}hidden must be a list of 1..{defaults.MAX_LAYERS} layer widths in "
                             f"1..{defaults.MAX_WIDTH}, e.g. hidden = [64, 64], got {_kind(h)}.")
    if "algorithm_settings" in kw:
        settings = kw["algorithm_settings"]
        if not isinstance(settings, Mapping):
            raise InputError(f"{where}[algorithm] must hold tables such as [algorithm.fedavg], got {_kind(settings)}.")
        for name, table in settings.items():
            if not isinstance(table, Mapping):
                raise InputError(f"{where}[algorithm.{name}] must be a table of settings (e.g. lr = 0.1), "
                                 f"got {_kind(table)}.")
            for key in ("lr", "momentum", "weight_decay"):
                if key in table and not _is_number(table[key]):
                    raise InputError(f"{where}[algorithm.{name}] {key} must be a number, got {_kind(table[key])}.")
            if "optimizer" in table and not isinstance(table["optimizer"], str):
                raise InputError(f"{where}[algorithm.{name}] optimizer must be \"sgd\" or \"adam\", got "
                                 f"{_kind(table['optimizer'])}.")


_TOP_KEYS = {
    "target", "institutions", "test", "algorithms", "seeds", "first_seed", "rounds",
    "val_fraction", "clip_inputs", "selection", "local_guard", "exclude", "training", "algorithm", "privacy",
}
_PRIVACY_KEYS = {"noise_multiplier": "dp_noise", "clip": "dp_clip", "delta": "dp_delta"}


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
    where = f"{path}: "
    for key in ("training", "algorithm", "privacy"):
        if key in raw and not isinstance(raw[key], Mapping):
            raise InputError(f"{where}{key} must be a table ([{key}]{'' if key == 'training' else '.NAME'} with "
                             f"settings under it), got {_kind(raw[key])}.")
    training = raw.get("training", {})
    unknown_t = set(training) - _SHARED_TRAINING_KEYS
    if unknown_t:
        raise InputError(
            f"{where}unknown [training] setting {sorted(unknown_t)[0]!r}; known: "
            f"{', '.join(sorted(_SHARED_TRAINING_KEYS))} (optimizer and lr go under [algorithm.NAME])."
        )
    algs = raw.get("algorithms")
    privacy = raw.get("privacy", {})
    unknown_p = set(privacy) - set(_PRIVACY_KEYS)
    if unknown_p:
        raise InputError(f"{where}unknown [privacy] setting {sorted(unknown_p)[0]!r}; known: "
                         f"{', '.join(sorted(_PRIVACY_KEYS))}.")
    for key, value in privacy.items():
        if not _is_number(value):
            raise InputError(f"{where}[privacy] {key} must be a number, got {_kind(value)}.")
    flat = {k: v for k, v in raw.items() if k not in ("training", "algorithm", "privacy")}
    if isinstance(algs, str):  # "fedavg,fedprox" is accepted too
        flat["algorithms"] = [a.strip() for a in algs.split(",") if a.strip()]
    if flat.get("clip_inputs") is False:
        flat["clip_inputs"] = None
    check_types({**flat, **training, **({"algorithm_settings": raw["algorithm"]} if "algorithm" in raw else {})},
                where)
    base = path.parent
    kw: dict[str, Any] = {}
    for key in ("target", "seeds", "first_seed", "rounds", "val_fraction", "clip_inputs", "selection", "local_guard"):
        if key in flat:
            kw[key] = flat[key]
    if "institutions" in flat:
        kw["institutions"] = tuple(str((base / p).resolve()) if not Path(p).is_absolute() else p
                                   for p in flat["institutions"])
    if "test" in flat:
        p = flat["test"]
        kw["test"] = str((base / p).resolve()) if not Path(p).is_absolute() else p
    if "algorithms" in flat:
        kw["algorithms"] = tuple(flat["algorithms"])
    if "exclude" in flat:
        kw["exclude"] = tuple(flat["exclude"])
    for key in _SHARED_TRAINING_KEYS:
        if key in training:
            kw[key] = training[key]
    for key, field_name in _PRIVACY_KEYS.items():
        if key in privacy:
            kw[field_name] = float(privacy[key])
    if "algorithm" in raw:
        kw["algorithm_settings"] = raw["algorithm"]
    return kw
