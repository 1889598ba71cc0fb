"""Gaussian summaries: W2 closed form, barycenter, mixture moments, KL (oracles and POT)."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from fedmdh.algorithms.gaussian import (
    barycenter,
    batch_gaussian,
    gaussian_kl,
    mixture_moments,
    psd_sqrt,
    sqrtm_reference,
    w2_squared,
    w2_squared_torch,
)


def _spd(rng, k, ridge=0.1):
    a = rng.normal(size=(k, k))
    return a @ a.T / k + ridge * np.eye(k)


def test_w2_one_dimensional_closed_form():
    # W2^2 between N(m0, s0^2) and N(m1, s1^2) is (m0 - m1)^2 + (s0 - s1)^2
    got = w2_squared(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[0.25]]))
    assert got == pytest.approx((1 + 2) ** 2 + (2 - 0.5) ** 2)


def test_w2_commuting_covariances_closed_form():
    # diagonal covariances commute: W2^2 = ||dm||^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    m0, m1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((m0 - m1) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert w2_squared(m0, np.diag(a), m1, np.diag(b)) == pytest.approx(expected)


def test_w2_general_against_numeric_sqrtm_and_pot():
    rng = np.random.default_rng(3)
    k = 6
    s0, s1 = _spd(rng, k), _spd(rng, k)
    m0, m1 = rng.normal(size=k), rng.normal(size=k)
    r1 = sqrtm_reference(s1)
    numeric = np.sum((m0 - m1) ** 2) + np.trace(s0 + s1 - 2 * sqrtm_reference(r1 @ s0 @ r1))
    assert w2_squared(m0, s0, m1, s1) == pytest.approx(numeric, rel=1e-8)
    pot = float(ot.gaussian.bures_wasserstein_distance(m0, m1, s0, s1)) ** 2
    assert w2_squared(m0, s0, m1, s1) == pytest.approx(pot, rel=1e-6)
    # symmetric
    assert w2_squared(m0, s0, m1, s1) == pytest.approx(w2_squared(m1, s1, m0, s0), rel=1e-8)


def test_w2_torch_matches_numpy_and_has_finite_gradient():
    rng = np.random.default_rng(4)
    k = 5
    z = torch.tensor(rng.normal(size=(40, k)), dtype=torch.float64, requires_grad=True)
    sg = _spd(rng, k)
    mg = rng.normal(size=k)
    mean, cov = batch_gaussian(z)
    got = w2_squared_torch(mean, cov, torch.tensor(mg), torch.tensor(psd_sqrt(sg)), float(np.trace(sg)), eps=1e-12)
    expected = w2_squared(mean.detach().numpy(), cov.detach().numpy(), mg, sg)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-8)
    got.backward()
    assert torch.isfinite(z.grad).all() and float(z.grad.abs().sum()) > 0


def test_batch_gaussian_is_numpy_mean_and_cov():
    x = np.random.default_rng(5).normal(size=(30, 4))
    m, c = batch_gaussian(torch.tensor(x))
    np.testing.assert_allclose(m.numpy(), x.mean(axis=0))
    np.testing.assert_allclose(c.numpy(), np.cov(x, rowvar=False))


def test_barycenter_equal_covariances_is_weighted_mean():
    rng = np.random.default_rng(6)
    s = _spd(rng, 4)
    means = [rng.normal(size=4) for _ in range(3)]
    m, c = barycenter(means, [s, s, s], [1, 2, 3])
    np.testing.assert_allclose(m, (means[0] + 2 * means[1] + 3 * means[2]) / 6)
    np.testing.assert_allclose(c, s, rtol=1e-6, atol=1e-9)


def test_barycenter_matches_pot_and_satisfies_the_fixed_point():
    rng = np.random.default_rng(7)
    k = 5
    covs = [_spd(rng, k) for _ in range(3)]
    means = [rng.normal(size=k) for _ in range(3)]
    w = np.array([0.2, 0.3, 0.5])
    m, c = barycenter(means, covs, w, tol=1e-12, max_iter=200)
    mp, cp = ot.gaussian.bures_wasserstein_barycenter(np.stack(means), np.stack(covs), weights=w, num_iter=5000,
                                                       eps=1e-13)
    np.testing.assert_allclose(c, cp, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(m, mp)
    r = psd_sqrt(c)
    fixed = sum(wi * psd_sqrt(r @ ci @ r) for wi, ci in zip(w, covs))
    np.testing.assert_allclose(fixed, c, rtol=1e-6, atol=1e-9)


def test_mixture_moments_equal_pooled_sample_moments():
    rng = np.random.default_rng(8)
    parts = [rng.normal(loc=mu, scale=sd, size=n) for mu, sd, n in ((-2.8, 0.3, 400), (-2.0, 0.2, 300), (-0.9, 0.4, 350))]
    mu, var = mixture_moments([p.mean() for p in parts], [p.var() for p in parts], [p.size for p in parts])
    pooled = np.concatenate(parts)
    assert mu == pytest.approx(pooled.mean(), rel=1e-12)
    assert var == pytest.approx(pooled.var(), rel=1e-10)
    # the reference code's average of variances ignores the spread of the means
    assert var > np.mean([p.var() for p in parts]) * 5


def test_gaussian_kl_closed_form():
    assert gaussian_kl(0.0, 1.0, 0.0, 1.0) == pytest.approx(0.0)
    assert gaussian_kl(1.0, 2.0, 0.0, 1.0) == pytest.approx(0.5 * (np.log(1 / 2) + (2 + 1) / 1 - 1))
    t = gaussian_kl(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0.0), torch.tensor(1.0))
    assert float(t) == pytest.approx(0.5 * (np.log(0.5) + 2.0))
