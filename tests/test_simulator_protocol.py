"""The protocol the simulator shares with a deployment: setup from summaries, client state as
arrays, per-institution selection."""

from __future__ import annotations

import numpy as np
import pytest

from fedmdh.algorithms import ALGORITHMS, LocalTraining, make_algorithm
from fedmdh.algorithms.base import FederationSpec
from fedmdh.ledger.codec import encode_payload as payload_bytes
from fedmdh.data.federation import (
    label_histogram,
    local_split,
    pool_setup,
    prepare_federation,
    setup_summary,
)
from fedmdh.data.heterogeneity import measure
from fedmdh.runtime.protocol import ClientSlot, aggregate_rng, client_rng, initial_state
from fedmdh.runtime.simulator import simulate

FEDERATED = sorted(n for n, c in ALGORITHMS.items() if not c.centralized)


def _algo(name: str):
    # local keeps Adam's moments across rounds: the state a restart must not lose
    return make_algorithm(name, LocalTraining(optimizer="adam", lr=1e-3) if name == "local" else None)


@pytest.mark.parametrize("name", FEDERATED)
def test_client_state_survives_a_restart_bit_for_bit(perovskite_fed, name):
    """Three rounds; before round 3 one copy keeps its working objects, the other rebuilds its
    private state from the arrays alone (as a restarted node does): the round-3 updates agree."""
    # Prepare
    algo = _algo(name)
    spec = FederationSpec.from_federation(perovskite_fed)
    server = initial_state(algo, spec, 0)
    data = {d.name: d for d in perovskite_fed.institutions}
    slots = {n: ClientSlot(algo, spec, data[n], 0) for n in sorted(data)}
    for r in (1, 2):
        ups = []
        for n in sorted(data):
            upd, cs = algo.client_update(server, slots[n].get(), data[n], client_rng(0, r, n), r)
            slots[n].put(cs)
            ups.append(upd)
        server = algo.aggregate(server, ups, aggregate_rng(0, r), r)
    # Execute
    kept, rebuilt = [], []
    for n in sorted(data):
        arrays = {k: v.copy() for k, v in slots[n].arrays.items()}
        a, _ = algo.client_update(server, slots[n].get(), data[n], client_rng(0, 3, n), 3)
        fresh = ClientSlot(algo, spec, data[n], 0, arrays=arrays)
        b, _ = algo.client_update(server, fresh.get(), data[n], client_rng(0, 3, n), 3)
        kept.append(a)
        rebuilt.append(b)
    # Assert
    for a, b in zip(kept, rebuilt):
        assert payload_bytes(a.payload) == payload_bytes(b.payload)
        assert a.metrics == b.metrics


def test_local_keeps_its_optimiser_moments_in_the_arrays(perovskite_fed):
    algo = _algo("local")
    spec = FederationSpec.from_federation(perovskite_fed)
    d = perovskite_fed.institutions[0]
    slot = ClientSlot(algo, spec, d, 0)
    _, cs = algo.client_update({}, slot.get(), d, client_rng(0, 1, d.name), 1)
    slot.put(cs)
    # Adam's step count and both moments of every parameter
    n_params = len(list(cs.model.parameters()))
    assert sum(k.endswith(".step") for k in slot.arrays) == n_params
    assert sum(k.endswith(".exp_avg_sq") for k in slot.arrays) == n_params
    assert all(float(slot.arrays[k]) == 5.0 for k in slot.arrays if k.endswith(".step"))


def test_setup_from_summaries_is_what_prepare_federation_uses(perovskite_tables):
    tables, test = perovskite_tables
    fed = prepare_federation(tables, test, "e_form", seed=3)
    summaries = [setup_summary(local_split(t, 3, 0.15)) for t in tables]
    setup = pool_setup(list(reversed(summaries)))  # arrival order does not matter
    assert setup.features == fed.features == tuple(sorted(fed.features))
    assert setup.scaler.mean.tobytes() == fed.scaler.mean.tobytes()
    assert setup.scaler.scale.tobytes() == fed.scaler.scale.tobytes()
    # the degree from histogram counts equals the one from all labels in one place
    lo, hi = setup.label_range
    counts = [label_histogram(t.y, lo, hi) for t in tables]
    assert [int(c.sum()) for c in counts] == [t.n_rows for t in tables]
    direct = measure([t.name for t in tables], [t.features for t in tables], [t.y for t in tables])
    assert fed.heterogeneity.KL_avg == pytest.approx(direct.KL_avg, rel=1e-12)
    assert fed.heterogeneity.H == direct.H and fed.heterogeneity.alpha == direct.alpha
    for a, b in zip(fed.heterogeneity.institutions, direct.institutions):
        assert a.label_mean == pytest.approx(b.label_mean, rel=1e-12)
        assert a.label_std == pytest.approx(b.label_std, rel=1e-9)


def test_the_order_of_the_input_files_changes_nothing(perovskite_tables):
    tables, test = perovskite_tables
    a = simulate(prepare_federation(tables, test, "e_form", seed=0), make_algorithm("fedavg"), rounds=3, seed=0)
    b = simulate(prepare_federation(tables[::-1], test, "e_form", seed=0), make_algorithm("fedavg"), rounds=3, seed=0)
    for name in a.models:
        assert payload_bytes(a.models[name]) == payload_bytes(b.models[name])


def test_own_selection_keeps_each_institutions_best_round_on_its_own_validation_rows(perovskite_fed, monkeypatch):
    monkeypatch.setattr("fedmdh.runtime.protocol.ROUND_SE", 0.0)  # the best-round rule (the default's 1 SE: test_guard.py)
    res = simulate(perovskite_fed, make_algorithm("fedavg"), rounds=8, seed=0)
    for name, kept in res.best_rounds.items():
        losses = [h.per_institution[name]["val_mse"] for h in res.history]
        assert kept == int(np.argmin(losses)) + 1
        assert res.final_per_institution[name]["rmse"] == res.history[kept - 1].per_institution[name]["rmse"]


def test_federated_selection_keeps_one_round_for_everyone(perovskite_fed):
    res = simulate(perovskite_fed, make_algorithm("fedavg"), rounds=8, seed=0, selection="federated")
    assert len(set(res.best_rounds.values())) == 1
    losses = [h.val_mse for h in res.history]
    assert res.best_round == int(np.argmin(losses)) + 1


def test_an_unknown_selection_is_refused(perovskite_fed):
    with pytest.raises(ValueError, match="selection"):
        simulate(perovskite_fed, make_algorithm("fedavg"), rounds=1, selection="best")
