"""FedMDH: what each component sends, its pieces in isolation, and an end-to-end run on the real split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedmdh.algorithms import make_algorithm
from fedmdh.algorithms.base import FederationSpec
from fedmdh.cli import main
from fedmdh.config import ExperimentConfig
from fedmdh.experiment.runner import run_experiment
from fedmdh.ledger.options import LedgerOptions
from fedmdh.runtime.simulator import simulate
from fedmdh.seeding import rng_for

MODEL_KEYS = ("phi.", "h.")


def _one_update(fed, **kw):
    algo = make_algorithm("fedmdh", **kw)
    spec = FederationSpec.from_federation(fed)
    d = fed.institutions[0]
    server = algo.init(spec, 0)
    upd, _ = algo.client_update(server, algo.init_client(spec, d, 0), d, rng_for(0, "t"), 1)
    return algo, spec, server, upd


def _groups(payload):
    out = set()
    for k in payload:
        out.add(k.split(".")[0] if "." in k else k)
    return out


@pytest.mark.parametrize(
    "switch, gone",
    [
        ({}, set()),
        ({"gfam": False}, {"anchor_mean", "anchor_cov"}),
        ({"cgan": False}, {"G", "D"}),
        ({"rkd": False}, {"pred_stats"}),
    ],
)
def test_each_switch_changes_what_is_sent(perovskite_fed, switch, gone):
    _, _, _, full = _one_update(perovskite_fed)
    _, _, _, upd = _one_update(perovskite_fed, **switch)
    assert _groups(full.payload) == {"phi", "h", "G", "D", "anchor_mean", "anchor_cov", "pred_stats"}
    assert _groups(upd.payload) == _groups(full.payload) - gone
    k = 64
    assert full.payload["anchor_mean"].shape == (k,) and full.payload["anchor_cov"].shape == (k, k)
    assert full.payload["pred_stats"].shape == (2,)


def test_sent_statistics_are_the_institutions_own(perovskite_fed):
    """anchor_mean/anchor_cov are the latent moments of the institution's rows; pred_stats its prediction moments."""
    algo, spec, server, upd = _one_update(perovskite_fed)
    d = perovskite_fed.institutions[0]
    params = {k: v for k, v in upd.payload.items() if k.startswith(MODEL_KEYS)}
    from fedmdh.nn.latent import LatentRegressor
    from fedmdh.nn.mlp import load_prefixed as _load

    net = LatentRegressor(spec.n_features, algo.training.hidden)
    _load(net.phi, params, "phi")
    _load(net.h, params, "h")
    with torch.no_grad():
        z = net.phi(torch.from_numpy(d.X)).double().numpy()
        p = net.h(torch.from_numpy(z.astype(np.float32))).squeeze(-1).double().numpy()
    np.testing.assert_allclose(upd.payload["anchor_mean"], z.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diag(upd.payload["anchor_cov"]), z.var(axis=0, ddof=1) + 1e-6, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(upd.payload["pred_stats"], [p.mean(), p.var()], rtol=1e-4, atol=1e-6)


def test_aggregate_pools_prediction_moments_and_anchor(perovskite_fed):
    # Prepare: one round's updates of the three institutions
    algo = make_algorithm("fedmdh")
    spec = FederationSpec.from_federation(perovskite_fed)
    server = algo.init(spec, 0)
    ups = []
    for d in perovskite_fed.institutions:
        upd, _ = algo.client_update(server, algo.init_client(spec, d, 0), d, rng_for(0, d.name), 1)
        ups.append(upd)
    # Execute (in reverse arrival order)
    new = algo.aggregate(server, list(reversed(ups)), rng_for(0, "aggregate"), 1)
    # Assert: the prediction distribution is the pooled mixture, written out in closed form
    n = np.array([u.num_examples for u in ups], dtype=np.float64)
    mus = np.array([u.payload["pred_stats"][0] for u in ups], dtype=np.float64)
    variances = np.array([u.payload["pred_stats"][1] for u in ups], dtype=np.float64)
    mu = (n[0] * mus[0] + n[1] * mus[1] + n[2] * mus[2]) / n.sum()
    second = (n[0] * (variances[0] + mus[0] ** 2) + n[1] * (variances[1] + mus[1] ** 2)
              + n[2] * (variances[2] + mus[2] ** 2)) / n.sum()
    assert new["pred_dist"].tolist() == pytest.approx([mu, second - mu**2], rel=1e-12)
    np.testing.assert_allclose(new["anchor_mean"], sum(u.payload["anchor_mean"] * w for u, w in zip(ups, n)) / n.sum())
    assert new["anchor_ready"][0] == 1.0
    # the anchor covariance is the W2 barycenter: the fixed point S = sum_i w_i (S^1/2 S_i S^1/2)^1/2,
    # checked with scipy's general square root (not the code's eigendecomposition)
    from scipy.linalg import sqrtm

    S = np.asarray(new["anchor_cov"], dtype=np.float64)
    assert np.all(np.linalg.eigvalsh(S) > 0)
    root = np.real(sqrtm(S))
    rhs = sum(w / n.sum() * np.real(sqrtm(root @ np.asarray(u.payload["anchor_cov"], np.float64) @ root))
              for u, w in zip(ups, n))
    assert np.linalg.norm(rhs - S) <= 1e-5 * np.linalg.norm(S)
    # and it is not the plain weighted mean of the covariances (the fixed point moved away from the start)
    mean_cov = sum(w / n.sum() * np.asarray(u.payload["anchor_cov"], np.float64) for u, w in zip(ups, n))
    assert np.linalg.norm(mean_cov - S) > 1e-3 * np.linalg.norm(S)
    # the same bits whatever the arrival order
    again = algo.aggregate(server, ups, rng_for(0, "aggregate"), 1)
    assert all(np.array_equal(again[k], new[k]) for k in new)


def test_gfam_views_express_rows_in_other_institutions_columns(perovskite_fed):
    algo = make_algorithm("fedmdh", mask_prob=1.0)
    spec = FederationSpec.from_federation(perovskite_fed)
    d = perovskite_fed.institutions[1]
    client = algo.init_client(spec, d, 0)
    X = np.ones((50, spec.n_features), dtype=np.float32)
    views = algo._views(X, client, np.random.default_rng(0))
    others = [perovskite_fed.institutions[i] for i in (0, 2)]
    for row in views:
        kept = set(np.flatnonzero(row))
        assert any(kept == set(o.feature_idx) for o in others)
    assert np.array_equal(make_algorithm("fedmdh", gfam=False)._views(X, client, np.random.default_rng(0)), X)


def test_generator_responds_to_its_condition(perovskite_fed):
    algo = make_algorithm("fedmdh")
    spec = FederationSpec.from_federation(perovskite_fed)
    client = algo.init_client(spec, perovskite_fed.institutions[0], 0)
    client.gen.eval()
    z = torch.zeros(8, 64)
    with torch.no_grad():
        a = client.gen(z, torch.full((8,), -2.0))
        b = client.gen(z, torch.full((8,), 2.0))
    assert a.shape == (8, 64) and not torch.allclose(a, b)


def test_end_to_end_fedmdh_run_and_predict(perovskite, tmp_path, capsys):
    # federated selection: with its own validation rows alone, train_part1 (a narrow label band)
    # keeps an early round (see test_simulator_protocol.py)
    cfg = ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", rounds=40,
                           selection="federated")
    out = tmp_path / "run"
    res = run_experiment(cfg, "fedmdh", out, ledger=LedgerOptions(mode="off"))
    # 40 rounds already far above a constant predictor (R2 0) on every institution
    assert all(m["r2"] > 0.5 for m in res.final_per_institution.values()), res.final_per_institution
    final = json.loads((out / "final_metrics.json").read_text())
    # predict new materials with one institution's model, from its own columns only
    test = pd.read_csv(perovskite["test"])
    own = list(pd.read_csv(perovskite["institutions"][0], nrows=0).columns.drop("e_form"))
    inp = tmp_path / "new.csv"
    test[own].to_csv(inp, index=False)
    main(["predict", "--model", str(out), "--institution", "train_part0", str(inp), str(tmp_path / "pred.csv")])
    pred = pd.read_csv(tmp_path / "pred.csv")["predicted_e_form"].to_numpy()
    rmse = float(np.sqrt(np.mean((pred - test["e_form"].to_numpy()) ** 2)))
    assert rmse == pytest.approx(final["per_institution"]["train_part0"]["rmse"], rel=1e-6)


def test_predict_names_missing_institution(perovskite, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["predict", "--model", str(tmp_path), "--institution", "nope", "a.csv", "b.csv"])
    assert e.value.code == 2
    assert "no saved model for institution 'nope'" in capsys.readouterr().err


def test_ablation_variants_are_fedmdh_with_one_component_off(perovskite_fed):
    for name, comp in (("fedmdh-no-gfam", "gfam"), ("fedmdh-no-cgan", "cgan"), ("fedmdh-no-rkd", "rkd")):
        algo = make_algorithm(name)
        assert getattr(algo, comp) is False
        others = {"gfam", "cgan", "rkd"} - {comp}
        assert all(getattr(algo, o) for o in others)
    a = simulate(perovskite_fed, make_algorithm("fedmdh-no-cgan"), rounds=3, seed=2)
    b = simulate(perovskite_fed, make_algorithm("fedmdh", cgan=False), rounds=3, seed=2)
    assert [h.rmse for h in a.history] == [h.rmse for h in b.history]


def test_fedmdh_main_job_records_on_the_ledger_and_verifies(perovskite, tmp_path):
    """The main job's default (embedded ledger) with FedMDH: anchor mean and prediction moments on chain."""
    from fedmdh.audit import verify

    cfg = ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", rounds=3)
    out = tmp_path / "run"
    run_experiment(cfg, "fedmdh", out)  # ledger: embedded by default
    report = verify(out)
    assert report.ok, report.problem
    assert report.rounds_verified == 3


def _model_delta(server, upd):
    return np.sqrt(sum(float(np.sum((np.asarray(upd.payload[k], np.float64) - np.asarray(server[k], np.float64)) ** 2))
                       for k in upd.payload if k.startswith(MODEL_KEYS)))


def test_max_grad_norm_bounds_every_local_step(perovskite_fed):
    """Plain SGD moves the model by lr * (clipped gradient) a step: a round's change of h . phi is at
    most local_steps * lr * max_grad_norm, far less than the same round unclipped."""
    clip = 1e-3
    algo, _, server, upd = _one_update(perovskite_fed, max_grad_norm=clip)
    t = algo.training
    assert t.optimizer == "sgd" and t.momentum == 0 and t.weight_decay == 0
    bound = t.local_steps * t.lr * clip
    moved = _model_delta(server, upd)
    assert bound * 0.5 < moved <= bound * (1 + 1e-4)
    _, _, server, free = _one_update(perovskite_fed, max_grad_norm=None)
    assert _model_delta(server, free) > 10 * bound
    assert algo.hyperparameters()["max_grad_norm"] == clip
    with pytest.raises(ValueError, match="max_grad_norm"):
        make_algorithm("fedmdh", max_grad_norm=0.0)


def test_default_fedmdh_trains_where_unclipped_sgd_diverged(tmp_path):
    """Issue 12's divergence: steels at H = 0 (an 8-row training institution beside 89 and 128 rows),
    seed 2, ran away in round 8 without the clip (loss 3e16); the default clip trains through it."""
    from fedmdh.errors import TrainingDiverged
    from fedmdh.experiment.runner import load_tables, prepare

    from conftest import SHARED_DATASETS, require

    steels = require(SHARED_DATASETS / "matbench_steels" / "matbench_steels.csv")
    out = tmp_path / "steels_h0"
    main(["partition", "--data", str(steels), "--target", "target", "--institutions", "3", "--degree", "high",
          "--test-fraction", "0.15", "--H", "0", "--seed", "0", "--formula-column", "formula",
          "--featurizers", "magpie,deml,megnet_el", "--shared-featurizer", "matminer", "--out", str(out)])
    cfg = ExperimentConfig(tuple(str(out / f"inst{i}.csv") for i in range(3)), str(out / "test.csv"), "target",
                           rounds=12)
    fed = prepare(cfg, load_tables(cfg), 2)
    assert min(d.n_train for d in fed.institutions) == 8
    with pytest.raises(TrainingDiverged) as e:
        simulate(fed, make_algorithm("fedmdh", max_grad_norm=None), rounds=12, seed=2)
    assert e.value.round == 8
    algo = make_algorithm("fedmdh")
    assert algo.max_grad_norm is not None
    res = simulate(fed, algo, rounds=12, seed=2)
    assert len(res.history) == 12 and all(np.isfinite(h.train_loss) and h.train_loss < 10 for h in res.history)


def test_a_config_file_switches_the_gradient_clip_off_with_false(tmp_path):
    from fedmdh.config import ExperimentConfig, read_toml

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('target = "y"\ninstitutions = ["a.csv", "b.csv"]\ntest = "t.csv"\nalgorithms = ["fedmdh"]\n'
                        '[algorithm.fedmdh]\nmax_grad_norm = false\n')
    cfg = ExperimentConfig(**read_toml(cfg_file))
    assert cfg.build_algorithm("fedmdh").max_grad_norm is None
    assert ExperimentConfig(("a", "b"), "t", "y", algorithms=("fedmdh",)).build_algorithm("fedmdh").max_grad_norm == 2.0
    cfg.write_toml(tmp_path / "again.toml")  # and it round-trips
    assert ExperimentConfig(**read_toml(tmp_path / "again.toml")).build_algorithm("fedmdh").max_grad_norm is None



def test_a_config_file_switches_the_moving_average_off_with_zero(tmp_path, perovskite_fed):
    from fedmdh.algorithms.base import FederationSpec
    from fedmdh.config import ExperimentConfig, read_toml

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('target = "y"\ninstitutions = ["a.csv", "b.csv"]\ntest = "t.csv"\nalgorithms = ["fedmdh"]\n'
                        '[algorithm.fedmdh]\neval_average = 0\n')
    off = ExperimentConfig(**read_toml(cfg_file)).build_algorithm("fedmdh")
    on = ExperimentConfig(("a", "b"), "t", "y", algorithms=("fedmdh",)).build_algorithm("fedmdh")
    assert (off.eval_average, on.eval_average) == (0.0, 0.9)
    spec = FederationSpec.from_federation(perovskite_fed)
    assert "eval_average" not in off.init(spec, 0) and "eval_average" in on.init(spec, 0)


def test_fast_sgd_step_gives_the_same_bits_as_torch_optim(perovskite_fed, monkeypatch):
    """The local steps' plain-SGD update in one foreach call (and the cached mode switches) change
    no bit of what a round sends, against torch.optim.SGD's own step."""
    import fedmdh.algorithms.fedmdh as fm

    _, _, _, fast = _one_update(perovskite_fed)
    monkeypatch.setattr(fm, "plain_sgd_lr", lambda opt: None)
    _, _, _, slow = _one_update(perovskite_fed)
    assert fast.payload.keys() == slow.payload.keys()
    for k in fast.payload:
        assert np.asarray(fast.payload[k]).tobytes() == np.asarray(slow.payload[k]).tobytes(), k
    monkeypatch.undo()
    net = torch.nn.Linear(2, 1)
    assert fm.plain_sgd_lr(torch.optim.SGD(net.parameters(), lr=0.2)) == 0.2
    for kw in ({"momentum": 0.9}, {"weight_decay": 1e-4}):
        assert fm.plain_sgd_lr(torch.optim.SGD(net.parameters(), lr=0.2, **kw)) is None
    assert fm.plain_sgd_lr(torch.optim.Adam(net.parameters(), lr=0.2)) is None
    gen = fm.ConditionalGenerator(4, 4, 8)
    for mode in (False, True, False):
        fm.set_training(gen, mode)
        assert all(m.training is mode for m in gen.modules())


def test_eval_average_is_the_moving_average_of_the_aggregates_and_what_institutions_keep(perovskite_fed):
    """avg_1 = w_1 and avg_t = beta avg_{t-1} + (1 - beta) w_t for every shared weight; training
    continues from the plain aggregate w_t, and every institution's model is the average."""
    beta = 0.75
    algo = make_algorithm("fedmdh", eval_average=beta)
    seen: list = []
    res = simulate(perovskite_fed, algo, 4, seed=0, round_hook=lambda rnd, ups, agg: (seen.append(agg), agg)[1])
    assert len(seen) == 4
    w = [np.asarray(s["phi.0.weight"], np.float64) for s in seen]
    expect = w[0]
    for t in range(1, 4):
        expect = beta * expect + (1 - beta) * w[t]
        got = np.asarray(seen[t]["avg.phi.0.weight"], np.float64)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, w[t])  # the average lags the aggregate
    server = seen[-1]
    kept = algo.personal_params(server, None)
    assert sorted(kept) == sorted(k for k in server if k.startswith(("phi.", "h.")))
    np.testing.assert_array_equal(kept["h.weight"], server["avg.h.weight"])
    assert set(res.models) == {d.name for d in perovskite_fed.institutions}
    with pytest.raises(ValueError, match="eval_average"):
        make_algorithm("fedmdh", eval_average=1.0)

