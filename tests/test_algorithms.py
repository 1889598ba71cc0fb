"""One conformance suite over every algorithm, on the real perovskite federation.

Every algorithm: runs, improves on its start, is bit-identical under a seed, and sends nothing
that contains an institution's raw rows or labels.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmdh.algorithms import ALGORITHMS, LocalTraining, default_training, make_algorithm
from fedmdh.runtime.simulator import simulate

ROUNDS = 12


@pytest.fixture(scope="module", params=sorted(ALGORITHMS))
def name(request):
    return request.param


def test_runs_and_learns(perovskite_fed, name):
    # local's default (Adam, lr 0.001) first fits its own rows at the expense of the others' validation
    # rows, and improves the federated validation loss from about round 25 on
    rounds = 40 if name == "local" else ROUNDS
    res = simulate(perovskite_fed, make_algorithm(name), rounds=rounds, seed=0)
    assert len(res.history) == rounds
    assert set(res.models) == set(perovskite_fed.names)
    assert all(np.isfinite(h.rmse) for h in res.history)
    # validation loss of the kept model is below the first round's
    assert min(h.val_mse for h in res.history) < res.history[0].val_mse
    assert 1 <= res.best_round <= rounds


def test_bit_identical_under_a_seed(perovskite_fed, name):
    a = simulate(perovskite_fed, make_algorithm(name), rounds=4, seed=7)
    b = simulate(perovskite_fed, make_algorithm(name), rounds=4, seed=7)
    c = simulate(perovskite_fed, make_algorithm(name), rounds=4, seed=8)
    for inst in perovskite_fed.names:
        for k in a.models[inst]:
            assert a.models[inst][k].tobytes() == b.models[inst][k].tobytes()
    assert [h.rmse for h in a.history] == [h.rmse for h in b.history]
    assert any(
        a.models[i][k].tobytes() != c.models[i][k].tobytes() for i in perovskite_fed.names for k in a.models[i]
    )


def _rows_inside(flat: np.ndarray, rows: np.ndarray) -> int:
    """How many windows of ``flat`` (every offset) equal one of ``rows`` bit for bit (float32)."""
    width = rows.shape[1]
    if flat.size < width:
        return 0
    # only offsets whose first value starts some row can hold one: compare those windows whole
    starts = np.flatnonzero(np.isin(flat[: flat.size - width + 1], rows[:, 0]))
    if starts.size == 0:
        return 0
    wanted = {r.tobytes() for r in rows}
    windows = np.lib.stride_tricks.sliding_window_view(flat, width)[starts]
    return sum(w.tobytes() in wanted for w in windows)


def test_rows_inside_finds_a_row_at_every_offset():
    rows = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.5
    for offset in range(7):
        flat = np.zeros(20, dtype=np.float32)
        flat[offset:offset + 4] = rows[1]
        assert _rows_inside(flat, rows) == 1
    assert _rows_inside(np.zeros(20, dtype=np.float32), rows) == 0


def test_no_raw_rows_in_outgoing_payloads(perovskite_fed, name):
    """Capture every Update and check, at every offset of every payload array, that none carries a training
    row, and that no payload holds most of an institution's label values (in any order)."""
    algo = make_algorithm(name)
    sent = []
    original = algo.client_update

    def spy(server_state, client_state, data, rng, rnd):
        upd, cs = original(server_state, client_state, data, rng, rnd)
        sent.append(upd)
        return upd, cs

    algo.client_update = spy  # type: ignore[method-assign]
    simulate(perovskite_fed, algo, rounds=2, seed=0)
    assert sent
    for upd in sent:
        for d in perovskite_fed.institutions:
            rows = np.ascontiguousarray(d.X[:, d.feature_idx], dtype=np.float32)
            labels = np.unique(np.asarray(d.y, dtype=np.float32))
            for key, arr in upd.payload.items():
                flat = np.ascontiguousarray(np.asarray(arr, dtype=np.float32).ravel())
                assert _rows_inside(flat, rows) == 0, (upd.institution, key, d.name)
                # a label vector sent in any order would put every label value in the payload
                assert np.isin(labels, flat).sum() < max(2, labels.size // 2), (upd.institution, key, d.name)


def test_fedprox_with_mu_zero_is_fedavg(perovskite_fed):
    from fedmdh.algorithms.fedavg import FedAvg

    a = simulate(perovskite_fed, FedAvg(default_training("fedavg"), proximal_mu=0.0), rounds=3, seed=1)
    b = simulate(perovskite_fed, make_algorithm("fedavg"), rounds=3, seed=1)
    p = simulate(perovskite_fed, make_algorithm("fedprox", proximal_mu=0.5), rounds=3, seed=1)
    inst = perovskite_fed.names[0]
    for k in a.models[inst]:
        assert a.models[inst][k].tobytes() == b.models[inst][k].tobytes()
    assert any(a.models[inst][k].tobytes() != p.models[inst][k].tobytes() for k in a.models[inst])


def test_fedprox_rejects_mu_zero():
    with pytest.raises(ValueError, match="proximal_mu > 0"):
        make_algorithm("fedprox", proximal_mu=0.0)


def test_fedprox_pulls_toward_global_weights(perovskite_fed):
    """A large proximal weight keeps the local weights near the global ones."""
    from fedmdh.algorithms.base import FederationSpec
    from fedmdh.seeding import rng_for

    spec = FederationSpec.from_federation(perovskite_fed)
    d = perovskite_fed.institutions[0]
    dist = {}
    for mu in (1e-9, 10.0):
        algo = make_algorithm("fedprox", LocalTraining(local_steps=20, lr=0.05), proximal_mu=mu)
        server = algo.init(spec, 0)
        upd, _ = algo.client_update(server, algo.init_client(spec, d, 0), d, rng_for(0, "t"), 1)
        dist[mu] = sum(float(np.sum((upd.payload[k] - server[k]) ** 2)) for k in server)
    assert dist[10.0] < 0.5 * dist[1e-9]


def test_pooled_sees_the_federations_budget(perovskite_fed):
    """Pooled runs local_steps x institutions steps a round: the same rows processed as FedAvg."""
    seen = []
    algo = make_algorithm("pooled", LocalTraining(local_steps=3))
    import fedmdh.runtime.simulator as sim

    original = sim._with_steps

    def spy(a, steps):
        seen.append(steps)
        return original(a, steps)

    sim._with_steps = spy
    try:
        simulate(perovskite_fed, algo, rounds=1, seed=0)
    finally:
        sim._with_steps = original
    assert seen == [3 * len(perovskite_fed.institutions)]


def test_settings_are_one_frozen_dataclass_validated_once_and_read_back(name):
    """Each algorithm's own hyperparameters are one frozen dataclass: validated at construction, not
    changeable afterwards, recorded whole by hyperparameters() and rebuilt from it."""
    import dataclasses
    import json

    from fedmdh.algorithms import algorithm_from_hyperparameters

    algo = make_algorithm(name)
    assert dataclasses.is_dataclass(algo.settings) and isinstance(algo.settings, type(algo).Settings)
    own = dataclasses.asdict(algo.settings)
    assert own.items() <= algo.hyperparameters().items()
    for key in own:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(algo.settings, key, own[key])
        assert getattr(algo, key) == own[key]
    again = algorithm_from_hyperparameters(name, json.loads(json.dumps(algo.hyperparameters())))
    assert again.settings == algo.settings and again.training == algo.training
    with pytest.raises(TypeError):
        type(algo)(algo.training, no_such_setting=1)


def test_settings_refuse_bad_values_at_construction():
    from fedmdh.algorithms.fedmdh import FedMDHSettings, FedMDHNoCGAN
    from fedmdh.algorithms.fedprox import FedProxSettings

    with pytest.raises(ValueError, match="proximal_mu > 0"):
        FedProxSettings(proximal_mu=0.0)
    with pytest.raises(ValueError, match="mask_prob must be in"):
        FedMDHSettings(mask_prob=1.5)
    # normalised once: "per-institution" under gfam picks the mapping; false switches the clip off
    s = FedMDHSettings(gfam="per-institution", max_grad_norm=False)
    assert (s.gfam, s.mapping, s.max_grad_norm) == (True, "per-institution", None)
    # an ablation keeps its component off even when given settings that switch it on
    assert FedMDHNoCGAN(settings=FedMDHSettings(cgan=True)).cgan is False
