"""Closed-form oracles for the arithmetic every peer must recompute identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmdh.algorithms import Update, make_algorithm
from fedmdh.algorithms.base import ordered, weighted_average
from fedmdh.algorithms.fedavg import proximal_term
from fedmdh.data.federation import pool_moments, sufficient_stats
from fedmdh.seeding import rng_for


def test_weighted_average_closed_form():
    # Prepare
    w0 = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([3.0], dtype=np.float32)}
    w1 = {"w": np.array([4.0, -2.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    # Execute
    out = weighted_average([(w0, 1), (w1, 2)])
    # Assert
    np.testing.assert_array_equal(out["w"], np.array([(1 * 1 + 4 * 2) / 3, (2 * 1 - 2 * 2) / 3], dtype=np.float32))
    np.testing.assert_array_equal(out["b"], np.array([3.0 / 3], dtype=np.float32))
    assert out["w"].dtype == np.float32


def test_weighted_average_rejects_empty_and_zero_weights():
    with pytest.raises(ValueError):
        weighted_average([])
    with pytest.raises(ValueError):
        weighted_average([({"w": np.ones(2)}, 0)])


def test_fedavg_aggregate_is_independent_of_arrival_order():
    # float32 sums in arrival order would differ bit-wise; ordered float64 sums do not
    rng = np.random.default_rng(0)
    ups = [
        Update(f"inst{i}", {"w": rng.normal(size=1000).astype(np.float32) * 10.0 ** rng.integers(-3, 4)}, int(n))
        for i, n in enumerate(rng.integers(10, 1000, size=5))
    ]
    algo = make_algorithm("fedavg")
    a = algo.aggregate({}, ups, rng_for(0, "aggregate"), 1)
    b = algo.aggregate({}, list(reversed(ups)), rng_for(0, "aggregate"), 1)
    c = algo.aggregate({}, [ups[i] for i in (2, 0, 4, 1, 3)], rng_for(0, "aggregate"), 1)
    assert a["w"].tobytes() == b["w"].tobytes() == c["w"].tobytes()
    expected = sum(u.payload["w"].astype(np.float64) * u.num_examples for u in ups) / sum(u.num_examples for u in ups)
    np.testing.assert_allclose(a["w"], expected.astype(np.float32), rtol=1e-6)


def test_ordered_rejects_two_updates_from_one_institution():
    with pytest.raises(ValueError, match="same institution"):
        ordered([Update("a", {}, 1), Update("a", {}, 2)])


def test_pooled_moments_equal_moments_of_the_pooled_rows():
    # Prepare: three institutions with overlapping columns and missing values
    rng = np.random.default_rng(1)
    cols = {"a": ("x", "y"), "b": ("y", "z"), "c": ("x", "y", "z")}
    data = {k: rng.normal(loc=i, scale=i + 1, size=(20 + 10 * i, len(c))) for i, (k, c) in enumerate(cols.items())}
    data["c"][3, 1] = np.nan
    stats = {k: sufficient_stats(cols[k], data[k]) for k in cols}
    # Execute
    mean, std = pool_moments(stats, ("x", "y", "z"))
    # Assert: against numpy on the concatenated observed values
    for j, col in enumerate(("x", "y", "z")):
        values = np.concatenate([data[k][:, cols[k].index(col)] for k in cols if col in cols[k]])
        values = values[~np.isnan(values)]
        assert mean[j] == pytest.approx(values.mean(), rel=1e-12)
        assert std[j] == pytest.approx(values.std(), rel=1e-9)


def test_pooled_moments_of_a_constant_column_scale_one():
    stats = {"a": sufficient_stats(("x",), np.full((5, 1), 2.0)), "b": sufficient_stats(("x",), np.full((3, 1), 2.0))}
    mean, std = pool_moments(stats, ("x",))
    assert mean[0] == 2.0 and std[0] == 1.0


def test_proximal_term_closed_form():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    anchor = [torch.tensor([[0.0, 1.0]]), torch.tensor([0.0])]
    mu = 0.3
    expected = mu / 2 * ((1 - 0) ** 2 + (2 - 1) ** 2 + 0.5**2)
    assert float(proximal_term(model, anchor, mu).detach()) == pytest.approx(expected)
