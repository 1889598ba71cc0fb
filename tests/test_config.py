"""ExperimentConfig: validation at construction, TOML round trip, per-algorithm settings."""

from __future__ import annotations

import pytest

from fedmdh.config import ALGORITHM_DEFAULTS, ExperimentConfig, read_toml
from fedmdh.errors import InputError


def _cfg(**kw):
    base = dict(institutions=("a.csv", "b.csv"), test="t.csv", target="y")
    base.update(kw)
    return ExperimentConfig(**base)


def test_toml_round_trip(tmp_path):
    cfg = _cfg(algorithms=("fedavg", "fedprox"), seeds=4, rounds=17, hidden=(32, 16),
               algorithm_settings={"fedprox": {"proximal_mu": 0.2, "lr": 0.01}})
    path = tmp_path / "c.toml"
    cfg.write_toml(path)
    again = ExperimentConfig(**read_toml(path))
    assert again.rounds == 17 and again.seeds == 4 and again.hidden == (32, 16)
    assert again.settings_for("fedprox") == cfg.settings_for("fedprox")
    assert again.build_algorithm("fedprox").proximal_mu == 0.2
    assert again.build_algorithm("fedprox").training.lr == 0.01
    # relative paths are resolved against the file's folder
    assert again.institutions[0] == str((tmp_path / "a.csv").resolve())
    assert again.clip_inputs == 1.0  # the default margin
    for margin in (0.5, None):  # None (no clipping) is written as false
        _cfg(clip_inputs=margin).write_toml(path)
        assert ExperimentConfig(**read_toml(path)).clip_inputs == margin


def test_defaults_apply_when_not_overridden():
    cfg = _cfg(algorithms=("fedprox",))
    assert cfg.build_algorithm("fedprox").proximal_mu == ALGORITHM_DEFAULTS["fedprox"]["proximal_mu"]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(institutions=("a.csv",)), "at least two institution files"),
        (dict(algorithms=("fedavg", "nope")), "unknown algorithm 'nope'"),
        (dict(seeds=0), "seeds must be >= 1"),
        (dict(rounds=0), "rounds must be >= 1"),
        (dict(val_fraction=0.7), "val_fraction"),
        (dict(clip_inputs=-1.0), "clip_inputs must be a margin >= 0"),
        (dict(algorithm_settings={"fedavg": {"optimizer": "rmsprop"}}), "optimizer must be 'sgd' or 'adam'"),
        (dict(algorithm_settings={"fedavg": {"local_steps": 3}}), "set them under \\[training\\]"),
        (dict(algorithms=("fedprox",), algorithm_settings={"fedprox": {"proximal_mu": 0}}), "proximal_mu > 0"),
    ],
)
def test_invalid_settings_are_refused_at_construction(kw, message):
    with pytest.raises(InputError, match=message):
        _cfg(**kw)


def test_unknown_toml_keys_are_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('target = "y"\nrouns = 3\n')
    with pytest.raises(InputError, match="unknown setting 'rouns'"):
        read_toml(path)
    path.write_text('target = "y"\n[training]\nlr = 0.1\n')
    with pytest.raises(InputError, match=r"unknown \[training\] setting 'lr'"):
        read_toml(path)
    path.write_text("target = \n")
    with pytest.raises(InputError, match="not valid TOML"):
        read_toml(path)
