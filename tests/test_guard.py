"""The selection rules (closed form) and the local guard (its local model is the local algorithm's,
bit for bit; its federated model is the unguarded run's; what it keeps predicts the same saved)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedmdh.algorithms import algorithm_from_hyperparameters, make_algorithm
from fedmdh.algorithms.base import FederationSpec
from fedmdh.algorithms.guard import LocalGuard, combine
from fedmdh.config import ExperimentConfig
from fedmdh.errors import InputError
from fedmdh.ledger.codec import encode_payload
from fedmdh.runtime.protocol import ClientSlot, Selection, aggregate_rng, choose_blend, choose_round, client_rng
from fedmdh.runtime.simulator import simulate


def _preds_for(losses, y):
    """Per-round predictions whose MSE on ``y`` is ``losses[r]``: a constant offset sqrt(loss)."""
    return np.array([y + np.sqrt(v) for v in losses])


# ---------------------------------------------------------------- rounds


def test_choose_round_without_tolerance_is_the_first_lowest_loss():
    # Prepare
    y = np.zeros(4)
    losses = [0.9, 0.4, 0.5, 0.4, 0.7]
    # Execute / Assert: round index 1 (the first of the two 0.4)
    assert choose_round(_preds_for(losses, y), y, se=0.0) == 1


def test_choose_round_with_tolerance_keeps_the_latest_round_within_it():
    # Prepare: at the best round the squared errors are 0, 0, 2, 2: MSE 1, SE = std(ddof=1) / 2
    y = np.zeros(4)
    best = np.array([0.0, 0.0, np.sqrt(2), np.sqrt(2)])
    se = float(np.std([0, 0, 2, 2], ddof=1) / 2)  # 0.57735
    preds = np.array([np.full(4, 2.0), best, np.full(4, np.sqrt(1.0 + 0.5 * se)), np.full(4, np.sqrt(1.0 + 2 * se)),
                      np.full(4, np.sqrt(1.0 + 0.9 * se))])
    # Execute
    strict = choose_round(preds, y, se=0.0)
    one_se = choose_round(preds, y, se=1.0)
    # Assert: the minimum is round 1; within one SE: rounds 2 and 4 (not 3), the latest is 4
    assert strict == 1
    assert one_se == 4


def test_choose_round_without_validation_rows_keeps_the_last_round():
    assert choose_round(np.zeros((5, 0)), np.zeros(0), se=1.0) == 4


def test_selection_online_is_the_offline_rule():
    """Offering rounds one by one keeps what ``choose_round`` picks from all of them."""
    rng = np.random.default_rng(3)
    y = rng.normal(size=12)
    for trial in range(20):
        preds = y + rng.normal(scale=rng.uniform(0.2, 1.0, size=(30, 1)), size=(30, 12))
        for se in (0.0, 0.5, 1.0):
            sel = Selection(round_se=se)
            for r, p in enumerate(preds, start=1):
                err = (p - y) ** 2
                sel.offer("a", r, float(err.mean()), {}, {}, val_errors=err)
            assert sel.kept["a"].round == choose_round(preds, y, se) + 1, (trial, se)


# ---------------------------------------------------------------- the guard's weight


def test_choose_blend_picks_the_mixture_of_lowest_loss_and_prefers_the_federated_side():
    # Prepare: federated f = y + 1, local g = y - 1: MSE(lam) = (2 lam - 1)^2, lowest at lam 0.5
    y = np.linspace(-1, 1, 8)
    f, g = y + 1.0, y - 1.0
    # Execute / Assert
    assert choose_blend(f, g, y, (0.0, 0.25, 0.5, 0.75, 1.0), se=0.0) == 0.5
    # choosing between the two only: MSE 1 either way, the tie goes to the federated model
    assert choose_blend(f, g, y, (0.0, 1.0), se=0.0) == 1.0
    # without validation rows: the federated model
    assert choose_blend(np.zeros(0), np.zeros(0), np.zeros(0), (0.0, 1.0)) == 1.0


def test_choose_blend_tolerance_keeps_the_most_federated_weight_within_it():
    # Prepare: noisy federated and local predictions; the expected weight computed here by hand
    weights = (0.0, 0.25, 0.5, 0.75, 1.0)
    checked = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        y = rng.normal(size=10)
        f, g = y + rng.normal(scale=1.0, size=10), y + rng.normal(scale=0.7, size=10)
        errs = {w: (w * f + (1 - w) * g - y) ** 2 for w in weights}
        best = min(weights, key=lambda w: (errs[w].mean(), -w))
        within = [w for w in weights
                  if errs[w].mean() <= errs[best].mean() + np.std(errs[w] - errs[best], ddof=1) / np.sqrt(10)]
        # Execute / Assert
        assert choose_blend(f, g, y, weights, se=0.0) == best
        assert choose_blend(f, g, y, weights, se=1.0) == max(within)
        checked += max(within) > best
    assert checked >= 5  # the tolerance moved the choice in several of the cases


# ---------------------------------------------------------------- the wrapper


def _guarded(perovskite, mode="blend", rounds=5, algorithm="fedavg", **kw):
    return ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", algorithms=(algorithm,),
                            rounds=rounds, local_guard=mode, **kw)


def test_the_guards_local_model_is_the_local_algorithm_and_its_federated_model_the_unguarded_run(
        perovskite, perovskite_fed):
    # Prepare
    cfg = _guarded(perovskite)
    # Execute
    guarded = simulate(perovskite_fed, cfg.build_algorithm("fedavg"), 5, seed=0)
    plain = simulate(perovskite_fed, cfg.with_overrides(local_guard="off").build_algorithm("fedavg"), 5, seed=0)
    local = simulate(perovskite_fed, cfg.build_algorithm("local"), 5, seed=0)
    # Assert
    assert guarded.federated_only == plain.final and guarded.federated_only_per_institution == plain.final_per_institution
    for name in perovskite_fed.names:
        g = guarded.guard[name]
        assert g["local_round"] == local.best_rounds[name] and g["federated_round"] == plain.best_rounds[name]
        for k, v in local.models[name].items():
            assert guarded.models[name][f"local/{k}"].tobytes() == v.tobytes()
        for k, v in plain.models[name].items():
            assert guarded.models[name][f"federated/{k}"].tobytes() == np.asarray(v).tobytes()
        assert float(guarded.models[name]["blend"]) == g["blend"]
    # what leaves an institution: the unguarded algorithm's updates, bit for bit
    assert [h.bytes_up for h in guarded.history] == [h.bytes_up for h in plain.history]


def test_the_kept_mixture_scores_what_its_weight_says(perovskite, perovskite_fed):
    cfg = _guarded(perovskite, rounds=4)
    algo = cfg.build_algorithm("fedavg")
    res = simulate(perovskite_fed, algo, 4, seed=1)
    test_y = perovskite_fed.y_test
    for d in perovskite_fed.institutions:
        params = res.models[d.name]
        lam = float(params["blend"])
        fed_part = algo.inner.predict({k[10:]: v for k, v in params.items() if k.startswith("federated/")}, d.X_test)
        loc_part = algo.reference.predict({k[6:]: v for k, v in params.items() if k.startswith("local/")}, d.X_test)
        expected = perovskite_fed.scaler.y_from_std(lam * fed_part + (1 - lam) * loc_part)
        rmse = float(np.sqrt(np.mean((expected - test_y) ** 2)))
        assert res.final_per_institution[d.name]["rmse"] == pytest.approx(rmse, rel=1e-9)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedmdh"])
def test_guarded_client_state_survives_a_restart_bit_for_bit(perovskite, perovskite_fed, algorithm):
    algo = _guarded(perovskite, algorithm=algorithm).build_algorithm(algorithm)
    spec = FederationSpec.from_federation(perovskite_fed)
    data = {d.name: d for d in perovskite_fed.institutions}
    server = algo.init(spec, 0)
    slots = {n: ClientSlot(algo, spec, data[n], 0) for n in sorted(data)}
    for r in (1, 2):
        ups = []
        for n in sorted(data):
            upd, cs = algo.client_update(server, slots[n].get(), data[n], client_rng(0, r, n), r)
            slots[n].put(cs)
            ups.append(upd)
        server = algo.aggregate(server, ups, aggregate_rng(0, r), r)
    for n in sorted(data):
        arrays = {k: v.copy() for k, v in slots[n].arrays.items()}
        assert any(k.startswith("reference/model.") for k in arrays)
        a, ca = algo.client_update(server, slots[n].get(), data[n], client_rng(0, 3, n), 3)
        b, cb = algo.client_update(server, ClientSlot(algo, spec, data[n], 0, arrays=arrays).get(), data[n],
                                   client_rng(0, 3, n), 3)
        assert encode_payload(a.payload) == encode_payload(b.payload)
        pa, pb = algo.personal_params(server, ca), algo.personal_params(server, cb)
        assert all(np.asarray(pa[k]).tobytes() == np.asarray(pb[k]).tobytes() for k in pa)


def test_a_saved_guarded_model_predicts_what_the_run_scored(perovskite, tmp_path):
    from fedmdh.cli import main
    from fedmdh.experiment.runner import run_experiment
    from fedmdh.ledger.options import LedgerOptions

    cfg = _guarded(perovskite, rounds=6)
    out = tmp_path / "run"
    res = run_experiment(cfg, "fedavg", out, ledger=LedgerOptions(mode="off"))
    info = json.loads((out / "models" / "train_part1" / "model.json").read_text())["info"]
    assert info["hyperparameters"]["local_guard"] == "blend"
    assert isinstance(algorithm_from_hyperparameters("fedavg", info["hyperparameters"]), LocalGuard)
    test = pd.read_csv(perovskite["test"])
    own = list(pd.read_csv(perovskite["institutions"][1], nrows=0).columns.drop("e_form"))
    test[own].to_csv(tmp_path / "new.csv", index=False)
    main(["predict", "--model", str(out), "--institution", "train_part1", str(tmp_path / "new.csv"),
          str(tmp_path / "pred.csv")])
    pred = pd.read_csv(tmp_path / "pred.csv")["predicted_e_form"].to_numpy()
    rmse = float(np.sqrt(np.mean((pred - test["e_form"].to_numpy()) ** 2)))
    assert rmse == pytest.approx(res.final_per_institution["train_part1"]["rmse"], rel=1e-6)


def test_predict_of_a_mixture_weighs_its_parts():
    # Prepare: two MLPs of the benchmark's size with different weights
    fed, loc = make_algorithm("fedavg"), make_algorithm("local")
    guard = LocalGuard(fed, loc, "blend")
    from fedmdh.nn.mlp import get_params, make_mlp

    a, b = get_params(make_mlp(3, (64, 64), 1)), get_params(make_mlp(3, (64, 64), 2))
    X = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    # Execute
    mixed = guard.predict(combine(a, b, 0.25), X)
    # Assert
    np.testing.assert_allclose(mixed, 0.25 * fed.predict(a, X) + 0.75 * loc.predict(b, X), rtol=1e-12)
    assert guard.predict(combine(a, b, 1.0), X).tobytes() == fed.predict(a, X).tobytes()
    assert guard.predict(combine(a, b, 0.0), X).tobytes() == loc.predict(b, X).tobytes()


def test_references_are_not_guarded_and_the_guard_needs_own_selection(perovskite):
    cfg = _guarded(perovskite)
    assert not isinstance(cfg.build_algorithm("local"), LocalGuard)
    assert not isinstance(cfg.with_overrides(algorithms=("pooled",)).build_algorithm("pooled"), LocalGuard)
    assert isinstance(cfg.build_algorithm("fedprox"), LocalGuard)
    assert cfg.build_algorithm("fedprox").proximal_mu == 0.01  # settings read through
    with pytest.raises(InputError, match="local_guard"):
        _guarded(perovskite, selection="federated")
    with pytest.raises(InputError, match="local_guard"):
        _guarded(perovskite, mode="always")
    # federated selection: no guard unless asked for
    assert not isinstance(
        ExperimentConfig(perovskite["institutions"], perovskite["test"], "e_form", selection="federated")
        .build_algorithm("fedavg"), LocalGuard)


def test_choose_keeps_one_of_the_two(perovskite, perovskite_fed):
    res = simulate(perovskite_fed, _guarded(perovskite, mode="choose", rounds=4).build_algorithm("fedavg"), 4, seed=0)
    assert {g["blend"] for g in res.guard.values()} <= {0.0, 1.0}


def test_a_selection_saved_and_restored_keeps_every_parts_best_and_its_tolerance():
    # Prepare: two parts offered over two rounds, the local one with a tolerance
    sel = Selection(round_se=1.0)
    y = np.zeros(4)
    for rnd, (f, g) in enumerate([(0.5, 0.9), (0.7, 0.4)], start=1):
        for part, v in (("federated", f), ("local", g)):
            pred = y + np.sqrt(v)
            sel.offer("a", rnd, v, {"w": np.full(2, rnd, np.float32)}, {"rmse": v}, np.zeros(3), pred, (pred - y) ** 2,
                      part=part)
    meta, arrays = sel.state("a")
    # Execute: a fresh selection (a restarted node) reads it back
    back = Selection(round_se=1.0)
    back.restore("a", json.loads(json.dumps(meta)), arrays)
    # Assert: the same bests, minima and kept model
    assert back._min == sel._min
    for key, k in sel.best.items():
        b = back.best[key]
        assert (b.round, b.val_mse, b.metrics) == (k.round, k.val_mse, k.metrics)
        assert b.params["w"].tobytes() == k.params["w"].tobytes()
        assert b.val_predictions.tobytes() == k.val_predictions.tobytes()
    assert back.kept["a"].round == sel.kept["a"].round == 1
