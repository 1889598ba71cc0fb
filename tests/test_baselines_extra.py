"""The distinctive piece of each extra baseline (FedGAN, FLIC, FedGen, FedKD), tested in isolation.

The generic conformance suite (tests/test_algorithms.py) covers running, learning, determinism
and the absence of raw rows in payloads for all of them.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmdh.algorithms import ALGORITHMS, LocalTraining, make_algorithm
from fedmdh.algorithms.base import FederationSpec
from fedmdh.algorithms.fedkd import compress_update, decompress_update, svd_compress, svd_reconstruct
from fedmdh.algorithms.gaussian import barycenter
from fedmdh.seeding import rng_for

FAST = LocalTraining(local_steps=2, batch_size=32)


def _one_round(perovskite_fed, name: str, **hp):
    """Prepare: the algorithm, the federation spec, the initial state and one round of updates."""
    algo = make_algorithm(name, FAST, **hp)
    spec = FederationSpec.from_federation(perovskite_fed)
    server = algo.init(spec, 0)
    updates = []
    for d in perovskite_fed.institutions:
        upd, _ = algo.client_update(server, algo.init_client(spec, d, 0), d, rng_for(0, "t", d.name), 1)
        updates.append(upd)
    return algo, spec, server, updates


def test_all_four_are_registered():
    assert {"fedgan", "flic", "fedgen", "fedkd"} <= set(ALGORITHMS)


@pytest.mark.parametrize("name", ["fedgan", "flic", "fedgen", "fedkd"])
def test_rejects_bad_hyperparameters(name):
    bad = {"fedgan": {"gen_weight": -1.0}, "flic": {"align_weight": -1.0},
           "fedgen": {"gen_steps": -1}, "fedkd": {"energy": 1.5}}[name]
    with pytest.raises(Exception, match="must be"):
        make_algorithm(name, **bad)


@pytest.mark.parametrize("name", ["fedgan", "flic", "fedgen", "fedkd"])
def test_hyperparameters_rebuild_the_algorithm(name):
    from fedmdh.algorithms import algorithm_from_hyperparameters

    algo = make_algorithm(name, FAST)
    assert algorithm_from_hyperparameters(name, algo.hyperparameters()).hyperparameters() == algo.hyperparameters()


# -- FedKD: SVD compression ----------------------------------------------------------------------
def _known_low_rank(m: int = 12, n: int = 9, s=(3.0, 2.0, 1.0)) -> np.ndarray:
    q1, _ = np.linalg.qr(rng_for(0, "u").standard_normal((m, len(s))))
    q2, _ = np.linalg.qr(rng_for(0, "v").standard_normal((n, len(s))))
    return (q1 * np.asarray(s)) @ q2.T


@pytest.mark.parametrize(
    ("energy", "rank", "err2"),
    [  # singular values 3, 2, 1: energies 9/14, 13/14, 14/14; error^2 = the dropped s^2
        (0.5, 1, 4.0 + 1.0),
        (0.9, 2, 1.0),
        (13 / 14, 2, 1.0),
        (0.95, 3, 0.0),
        (1.0, 3, 0.0),
    ],
)
def test_svd_compression_keeps_the_stated_energy(energy, rank, err2):
    # Prepare
    a = _known_low_rank()
    # Execute
    u, s, vt = svd_compress(a, energy)
    rec = svd_reconstruct(u, s, vt)
    # Assert
    assert u.shape == (12, rank) and s.shape == (rank,) and vt.shape == (rank, 9)
    assert np.sum(s.astype(np.float64) ** 2) / 14.0 >= energy - 1e-6
    assert np.sum((rec - a) ** 2) == pytest.approx(err2, abs=1e-5)


def test_compressed_update_roundtrip_and_is_smaller():
    delta = {"w": _known_low_rank(64, 40), "b": np.arange(64, dtype=np.float64)}
    payload = compress_update(delta, 1.0)
    rec = decompress_update(payload, ["w", "b"], delta)
    np.testing.assert_allclose(rec["w"], delta["w"], atol=1e-5)
    np.testing.assert_allclose(rec["b"], delta["b"])
    assert sum(v.nbytes for v in payload.values()) < 0.2 * (64 * 40 + 64) * 4


def test_fedkd_aggregate_is_the_weighted_mean_of_reconstructed_updates(perovskite_fed):
    algo, _, server, updates = _one_round(perovskite_fed, "fedkd", energy=1.0, energy_end=None)
    new = algo.aggregate(server, updates, rng_for(0, "aggregate"), 1)
    n = np.array([u.num_examples for u in updates], np.float64)
    key = "net.0.weight"
    deltas = [svd_reconstruct(u.payload[f"{key}.U"], u.payload[f"{key}.S"], u.payload[f"{key}.V"]) for u in updates]
    expected = server[f"mentee.{key}"] + sum(w * d for w, d in zip(n / n.sum(), deltas))
    np.testing.assert_allclose(new[f"mentee.{key}"], expected, atol=1e-5)
    assert all(u.metrics["bytes_sent"] == u.nbytes() for u in updates)
    # at the default threshold the compressed update is smaller than the dense one
    _, _, _, default = _one_round(perovskite_fed, "fedkd")
    assert all(u.nbytes() < u.metrics["bytes_full"] for u in default)


def test_fedkd_adaptive_weight_decreases_with_the_task_losses():
    algo = make_algorithm("fedkd", distill_weight=0.05, max_distill_weight=0.2)
    assert algo.adaptive_weight(1.0, 1.5) == pytest.approx(0.05 / 2.5)
    assert algo.adaptive_weight(0.01, 0.01) == pytest.approx(0.2)  # capped


# -- FedGen: the aggregation-side generator ------------------------------------------------------
def test_fedgen_generator_has_latent_shape_and_responds_to_the_condition(perovskite_fed):
    algo, _, server, updates = _one_round(perovskite_fed, "fedgen", gen_steps=20)
    new = algo.aggregate(server, updates, rng_for(0, "aggregate"), 1)
    y = np.repeat([-2.0, 2.0], 64)
    latent = algo.generate_latent(new, y, rng_for(0, "noise"))
    assert latent.shape == (128, algo.latent_dim)
    assert np.all(np.isfinite(latent))
    gap = np.linalg.norm(latent[:64].mean(axis=0) - latent[64:].mean(axis=0))
    assert gap > 1e-2
    # the generator moved during aggregation, deterministically
    assert any(not np.array_equal(new[k], server[k]) for k in server if k.startswith("G."))
    again = algo.aggregate(server, updates, rng_for(0, "aggregate"), 1)
    assert all(again[k].tobytes() == new[k].tobytes() for k in new)


def test_fedgen_label_distribution_is_the_mixture_of_the_summaries(perovskite_fed):
    from fedmdh.algorithms.gaussian import mixture_moments

    algo, _, server, updates = _one_round(perovskite_fed, "fedgen")
    new = algo.aggregate(server, updates, rng_for(0, "aggregate"), 1)
    ds = sorted(perovskite_fed.institutions, key=lambda d: d.name)
    mu, var = mixture_moments([d.y.mean() for d in ds], [d.y.var() for d in ds], [d.n_train for d in ds])
    np.testing.assert_allclose(new["label_dist"], [mu, var], rtol=1e-5, atol=1e-6)


# -- FLIC: the anchor --------------------------------------------------------------------------------
def test_flic_anchor_is_the_barycenter_of_the_sent_gaussians(perovskite_fed):
    algo, _, server, updates = _one_round(perovskite_fed, "flic")
    new = algo.aggregate(server, updates, rng_for(0, "aggregate"), 1)
    ups = sorted(updates, key=lambda u: u.institution)
    m, s = barycenter([u.payload["latent_mean"] for u in ups], [u.payload["latent_cov"] for u in ups],
                      [u.num_examples for u in ups], max_iter=200, tol=1e-12)
    np.testing.assert_allclose(new["anchor_mean"], m, atol=1e-10)
    np.testing.assert_allclose(new["anchor_cov"], s, atol=1e-4 * np.abs(s).max())
    assert new["anchor_ready"][0] == 1.0


def test_flic_embedding_stays_home(perovskite_fed):
    _, _, _, updates = _one_round(perovskite_fed, "flic")
    assert not any(k.startswith("phi.") for u in updates for k in u.payload)


# -- FedGAN: generated rows and the averaged generator -------------------------------------------
def test_fedgan_samples_respect_the_union_layout(perovskite_fed):
    algo, spec, server, _ = _one_round(perovskite_fed, "fedgan")
    d = perovskite_fed.institutions[0]
    client = algo.init_client(spec, d, 0)
    x = algo.generate(client.gen, np.linspace(-2, 2, 50), client.mask, rng_for(0, "g"))
    assert x.shape == (50, spec.n_features) and x.dtype == np.float32
    missing = np.setdiff1d(np.arange(spec.n_features), d.feature_idx)
    assert np.all(x[:, missing] == 0.0)
    assert np.any(x[:, d.feature_idx] != 0.0)


def test_fedgan_averaged_generator_is_the_weighted_mean(perovskite_fed):
    algo, _, server, updates = _one_round(perovskite_fed, "fedgan")
    new = algo.aggregate(server, updates, rng_for(0, "aggregate"), 1)
    n = np.array([u.num_examples for u in updates], np.float64)
    for key in [k for k in server if k.startswith(("G.", "D.")) and server[k].dtype == np.float32]:
        expected = sum(w * u.payload[key].astype(np.float64) for w, u in zip(n / n.sum(), updates))
        np.testing.assert_allclose(new[key], expected, rtol=1e-5, atol=1e-6)
    assert set(new) == set(server)  # no counters: the schedule follows the round index
