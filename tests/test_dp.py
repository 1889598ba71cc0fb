"""Differential privacy on the released round sums (fedmdh.secure.dp): the clip and the noise in
closed form, the exact budget against an independent accountant, the simulator's and the CLI's
paths on the perovskite split, and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from fedmdh.algorithms import make_algorithm
from fedmdh.algorithms.base import Update
from fedmdh.errors import InputError
from fedmdh.runtime.round import Aggregation, aggregate
from fedmdh.secure.dp import (
    DPSettings,
    check_dp_covered,
    dp_contribution,
    epsilon,
    noise_std,
    report,
)


def dp_aggregate(algorithm, server, updates, settings, rngs, secure_sum=None):
    """The round engine's aggregation step with DP noise from ``rngs`` (round 1, seed 0), in the clear or
    through ``secure_sum``."""
    return aggregate(Aggregation(secure=secure_sum is not None, dp=settings), algorithm, server, updates, 1, 0,
                     secure_sum, noise=lambda name, rnd: rngs[name])


def _state(rng, sizes=(("w", (20, 7)), ("b", (7,)))):
    return {k: rng.normal(size=s) for k, s in sizes}


def test_a_large_change_is_clipped_to_n_times_the_clip_and_a_small_one_kept():
    rng = np.random.default_rng(0)
    algo = make_algorithm("fedavg")
    server = _state(rng)
    big = Update("a", {k: v + 5.0 for k, v in server.items()}, 40)
    small = Update("a", {k: v + 1e-3 for k, v in server.items()}, 40)
    s = DPSettings(noise_multiplier=1e-9, clip=0.5)
    ref = 40 * np.concatenate([server["b"].ravel(), server["w"].ravel()])  # the layout's order: sorted keys
    for upd, expected_norm in ((big, 40 * 0.5), (small, 40 * 1e-3 * math.sqrt(147))):
        v = dp_contribution(algo, server, upd, s, n_max=100, n_parties=3, rng=np.random.default_rng(1))
        change = v - ref
        assert np.linalg.norm(change) == pytest.approx(expected_norm, rel=1e-6)
        # the direction of the change is kept
        want = 40 * np.concatenate([(upd.payload["b"] - server["b"]).ravel(), (upd.payload["w"] - server["w"]).ravel()])
        cos = change @ want / (np.linalg.norm(change) * np.linalg.norm(want))
        assert cos == pytest.approx(1.0, abs=1e-9)


def test_each_share_of_the_noise_is_one_nth_of_the_variance_sized_by_the_largest_count():
    rng = np.random.default_rng(0)
    algo = make_algorithm("fedavg")
    server = {"w": np.zeros((200, 100))}
    upd = Update("a", {"w": np.zeros((200, 100))}, 30)
    s = DPSettings(noise_multiplier=2.0, clip=0.1)
    v = dp_contribution(algo, server, upd, s, n_max=120, n_parties=4, rng=rng)
    assert v.std() == pytest.approx(2.0 * 0.1 * 120 / 2, rel=0.02)  # sigma S n_max / sqrt(n)
    assert abs(v.mean()) < 4 * 12.0 / math.sqrt(v.size)  # four standard errors
    assert noise_std(s, 120) == pytest.approx(24.0)


def test_the_aggregate_is_the_clipped_weighted_mean_plus_noise_of_the_designed_scale():
    rng = np.random.default_rng(3)
    algo = make_algorithm("fedavg")
    server = _state(rng, (("w", (300, 50)),))
    counts = {"a": 10, "b": 50, "c": 200}
    updates = [Update(n, {"w": server["w"] + rng.normal(scale=1e-3, size=(300, 50))}, c) for n, c in counts.items()]
    s = DPSettings(noise_multiplier=0.5, clip=10.0)  # no change reaches the clip
    rngs = {n: np.random.default_rng(i) for i, n in enumerate(counts)}
    noisy = dp_aggregate(algo, server, updates, s, rngs)
    plain = algo.aggregate(server, updates, np.random.default_rng(0), 1)
    residual = noisy["w"] - plain["w"]
    assert residual.std() == pytest.approx(noise_std(s, 200) / sum(counts.values()), rel=0.03)
    # tiny noise: the weighted mean itself
    quiet = dp_aggregate(algo, server, updates, DPSettings(1e-12, 10.0), rngs)
    np.testing.assert_allclose(quiet["w"], plain["w"], rtol=0, atol=1e-9)


def _gaussian_delta(eps: float, mu: float) -> float:
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("sigma, rounds", [(1.5, 5), (4.0, 40), (30.0, 400)])
def test_epsilon_is_the_exact_gaussian_profile_and_an_independent_accountant_agrees(sigma, rounds):
    dp_accounting = pytest.importorskip("dp_accounting", reason="dp-accounting (test extra) not installed")
    delta = 1e-5
    eps = epsilon(sigma, rounds, delta)
    # closed form: T Gaussian mechanisms of sigma are one of mu = sqrt(T) / sigma
    assert _gaussian_delta(eps, math.sqrt(rounds) / sigma) == pytest.approx(delta, rel=1e-6)
    if rounds <= 40:  # the PLD accountant is slow for long compositions
        acc = dp_accounting.pld.PLDAccountant()
        acc.compose(dp_accounting.GaussianDpEvent(sigma), rounds)
        pld = acc.get_epsilon(delta)
        assert eps <= pld + 1e-6 and pld == pytest.approx(eps, rel=1e-3)
    # more rounds cost more; more noise costs less
    assert epsilon(sigma, rounds + 1, delta) > eps > epsilon(2 * sigma, rounds, delta)


def test_the_report_counts_a_round_with_fewer_contributors_as_less_noise():
    s = DPSettings(noise_multiplier=3.0, clip=1.0, delta=1e-6)
    full = report(s, 10, 3)
    short = report(s, 10, 3, participants=[3] * 9 + [2])
    assert full["releases"] == short["releases"] == 10
    assert full["epsilon"] == pytest.approx(epsilon(3.0, 10, 1e-6))
    assert short["epsilon"] == pytest.approx(epsilon([3.0] * 9 + [3.0 * math.sqrt(2 / 3)], 0, 1e-6))
    assert short["epsilon"] > full["epsilon"]
    # n - 1 colluders know their shares: sigma / sqrt(3) is left
    assert full["epsilon_against_n_minus_1_colluding"] == pytest.approx(epsilon(3.0 / math.sqrt(3), 10, 1e-6))


def test_settings_and_uncovered_algorithms_are_refused_in_one_line():
    for bad in ({"noise_multiplier": 0.0}, {"noise_multiplier": -1.0}, {"noise_multiplier": 1.0, "clip": 0.0},
                {"noise_multiplier": 1.0, "delta": 1.0}):
        with pytest.raises(InputError):
            DPSettings(**bad)
    check_dp_covered("fedavg")
    check_dp_covered("local")
    for name in ("fedmdh", "fedgan", "pooled", "flic"):
        with pytest.raises(InputError, match="covers fedavg, fedprox") as exc:
            check_dp_covered(name)
        assert "\n" not in str(exc.value)


def test_simulated_fedavg_with_dp_reports_its_budget_and_noise_costs_accuracy(perovskite_fed):
    from fedmdh.runtime.simulator import simulate

    algo = make_algorithm("fedavg")
    plain = simulate(perovskite_fed, algo, rounds=6, seed=0)
    quiet = simulate(perovskite_fed, algo, rounds=6, seed=0, dp=DPSettings(1e-9, clip=100.0))
    loud = simulate(perovskite_fed, algo, rounds=6, seed=0, dp=DPSettings(2.0, clip=0.01))
    assert plain.privacy is None
    assert quiet.privacy["releases"] == 6 and quiet.privacy["epsilon"] is None  # no guarantee at this noise
    assert loud.privacy["epsilon"] == pytest.approx(epsilon(2.0, 6, 1e-5))
    assert abs(quiet.final["r2"] - plain.final["r2"]) < 1e-3
    assert loud.final["r2"] < plain.final["r2"] - 0.05
    # the study path is reproducible from the seed
    again = simulate(perovskite_fed, algo, rounds=6, seed=0, dp=DPSettings(2.0, clip=0.01))
    assert again.final["r2"] == loud.final["r2"]


def test_fedmdh_run_with_dp_writes_the_budget_and_refuses_a_ledger(perovskite, tmp_path):
    from typer.testing import CliRunner

    from fedmdh.cli import app

    base = ["run", "--institutions", ",".join(perovskite["institutions"]), "--test", perovskite["test"],
            "--target", "e_form", "--rounds", "3", "--dp-noise", "2", "--dp-clip", "0.01"]
    r = CliRunner().invoke(app, [*base, "--ledger", "off", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["privacy"]["epsilon"] == pytest.approx(epsilon(2.0, 3, 1e-5))
    assert final["privacy"]["clip"] == 0.01
    assert "differential privacy" in (tmp_path / "run" / "run.log").read_text()
    assert "differential privacy" in r.output
    assert "[privacy]" in (tmp_path / "run" / "config.toml").read_text()
    # the config file round-trips the settings
    from fedmdh.config import ExperimentConfig, read_toml

    again = ExperimentConfig(**read_toml(tmp_path / "run" / "config.toml"))
    assert again.dp == DPSettings(2.0, 0.01, 1e-5)
    # refusals, one line each, before anything is written
    for extra, words in ((["--ledger", "embedded"], "ledger off"), (["--algorithm", "fedmdh", "--ledger", "off"],
                                                                    "covers fedavg")):
        r = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path / "x")])
        assert isinstance(r.exception, InputError) and words in str(r.exception), r.output
        assert "\n" not in str(r.exception)
        assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(app, ["run", "--institutions", ",".join(perovskite["institutions"]), "--test", perovskite["test"],
                                 "--target", "e_form", "--dp-clip", "1", "--ledger", "off", "--out", str(tmp_path / "y")])
    assert isinstance(r.exception, InputError) and "go with --dp-noise" in str(r.exception)


def test_a_deployed_task_refuses_dp_without_secure():
    from fedmdh.config import ExperimentConfig
    from fedmdh.runtime.coordinator import DeployTask, experiment_settings

    cfg = ExperimentConfig(("a", "b"), "", "y", algorithms=("fedavg",), seeds=1, dp_noise=1.0)
    with pytest.raises(InputError, match="needs --secure"):
        DeployTask("t", experiment_settings(cfg), 2, "", "").config()


def test_the_noised_sum_under_threshold_ckks_is_the_clear_noised_sum_within_ckks_precision():
    from fedmdh.secure.backend import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    from fedmdh.secure.threshold import ThresholdGroup

    rng = np.random.default_rng(5)
    algo = make_algorithm("fedprox")
    server = _state(rng, (("w", (100, 30)), ("b", (30,))))
    counts = {"a": 12, "b": 40, "c": 7}
    updates = [Update(n, {k: v + rng.normal(scale=0.05, size=v.shape) for k, v in server.items()}, c)
               for n, c in counts.items()]
    s = DPSettings(noise_multiplier=0.8, clip=0.3)

    def rngs():
        return {n: np.random.default_rng(i) for i, n in enumerate(counts)}

    clear = dp_aggregate(algo, server, updates, s, rngs())
    with ThresholdGroup(sorted(counts)) as g:
        secure = dp_aggregate(algo, server, updates, s, rngs(), secure_sum=g.secure_sum)
    for k in server:
        np.testing.assert_allclose(secure[k], clear[k], rtol=0, atol=1e-8)
    # and the noise is there: not the plain weighted mean
    plain = algo.aggregate(server, updates, np.random.default_rng(0), 1)
    assert np.abs(clear["w"] - plain["w"]).max() > 1e-3
