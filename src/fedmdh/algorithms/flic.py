"""FLIC (Rakotomamonjy, Vono, Medina Ruiz, Ralaivola, TMLR 2024, arXiv 2301.11447) for regression.

FLIC personalises federated learning on heterogeneous feature spaces: every client has its own
*embedding function* ``phi_i`` from its feature space into a common latent space, where a model
shared by all clients operates. The latent distributions are tied together by *anchor*
distributions learned at the server as a Wasserstein barycenter: each client adds the Wasserstein
distance between its embedded data and the anchor to its loss, so the shared model sees the same
latent geometry from every client. Training alternates FedRep-style: steps on the shared model
with the embedding frozen, then steps on the embedding with the shared model frozen.

**Regression / heterogeneous-feature adaptation.**

- ``phi_i`` is the first layer of the shared network size, ``Linear(d, hidden[0]) - LeakyReLU``,
  over the union feature space (the institution's missing columns are 0, so effectively over its
  own columns); it is personal and never leaves the institution. The shared head is the rest of
  the network, ``hidden[1:] -> 1``, averaged by sample count. ``head . phi_i`` has exactly the
  size of the baselines' MLP.
- FLIC's anchors are per class; for a continuous target we use **one** anchor: a Gaussian
  ``N(m_G, S_G)`` that is the sample-weighted W2 barycenter
  (:func:`~fedmdh.algorithms.gaussian.barycenter`) of the institutions' latent Gaussians
  ``N(m_i, S_i)``. The alignment term is the closed-form ``W2^2`` between the minibatch's latent
  Gaussian and the anchor (:func:`~fedmdh.algorithms.gaussian.w2_squared_torch`), weighted by
  ``align_weight``; the regression loss is MSE.

Sent each round: the head's parameters and the latent Gaussian ``(m_i, S_i)`` of the
institution's training rows. Prediction: ``head(phi_i(x))`` with the institution's own ``phi_i``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmdh.algorithms.base import (
    Algorithm,
    FederationSpec,
    LocalTraining,
    Params,
    Payload,
    Update,
    coerce_settings,
    ordered,
    weighted_average,
)
from fedmdh.algorithms.gaussian import JITTER
from fedmdh.algorithms.gaussian import barycenter, batch_gaussian, psd_sqrt, w2_squared_torch
from fedmdh.algorithms.seeded import seeded
from fedmdh.data.federation import InstitutionData
from fedmdh.nn.mlp import Evaluator, dense_stack, load_prefixed as _load, make_optimizer, prefixed_params as _prefixed


class FLICNet(nn.Module):
    """``head(phi(x))``: a personal embedding layer and the shared rest of the MLP."""

    def __init__(self, d_in: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(d_in, hidden[0]), nn.LeakyReLU(0.2))
        layers, prev = dense_stack(hidden[0], hidden[1:], lambda: nn.LeakyReLU(0.2))
        layers.append(nn.Linear(prev, 1))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.phi(x)).squeeze(-1)


@dataclass(frozen=True)
class FLICSettings:
    """FLIC's own settings (see :class:`FLIC`)."""

    head_steps: int | None = None
    align_weight: float = 0.01
    barycenter_iters: int = 30

    def __post_init__(self) -> None:
        if self.head_steps is not None and self.head_steps < 0:
            raise ValueError(f"head_steps must be >= 0, got {self.head_steps}.")
        if self.align_weight < 0:
            raise ValueError(f"align_weight must be >= 0, got {self.align_weight}.")
        if self.barycenter_iters < 1:
            raise ValueError(f"barycenter_iters must be >= 1, got {self.barycenter_iters}.")
        coerce_settings(self)


@dataclass
class FLICClient:
    """An institution's private state: its network (the embedding is its own) and optimisers."""

    net: FLICNet
    head_opt: torch.optim.Optimizer
    phi_opt: torch.optim.Optimizer


class FLIC(Algorithm):
    """Personal embeddings, a W2-barycenter anchor and a shared head; see the module docstring.

    Parameters
    ----------
    training:
        Local optimisation (network size, optimiser, ``local_steps`` embedding steps a round).
    head_steps:
        Steps on the shared head (embedding frozen) before the embedding steps; ``None``: as many
        as ``local_steps``.
    align_weight:
        Weight of ``W2^2`` between the minibatch's latent Gaussian and the anchor.
    barycenter_iters:
        Maximum fixed-point iterations for the anchor per round, warm-started from the last anchor.
    """

    name = "flic"
    secure_reveals = "each institution's embedded latent samples (the Wasserstein barycenter needs individual inputs)"

    Settings = FLICSettings

    def __init__(self, training: LocalTraining | None = None, settings: FLICSettings | None = None,
                 **hyperparameters: Any) -> None:
        super().__init__(training, settings, **hyperparameters)
        self._evaluator: Evaluator | None = None

    @property
    def latent_dim(self) -> int:
        return int(self.training.hidden[0])

    def _net(self, d_in: int, seed: int) -> FLICNet:
        # every embedding starts from the same weights (a common initialisation, as in FedRep)
        return seeded(seed, ("flic", "net"), lambda: FLICNet(d_in, self.training.hidden))

    def init(self, spec: FederationSpec, seed: int) -> Payload:
        k = self.latent_dim
        state: Payload = _prefixed(self._net(spec.n_features, seed).head, "head")
        state["anchor_mean"] = np.zeros(k)
        state["anchor_cov"] = np.eye(k)
        state["anchor_ready"] = np.zeros(1)  # no anchor before the first round's statistics
        return state

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> FLICClient:
        net = self._net(spec.n_features, seed)
        t = self.training
        return FLICClient(
            net,
            make_optimizer(net.head.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay),
            make_optimizer(net.phi.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay),
        )

    def client_update(
        self, server_state: Payload, client_state: FLICClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, FLICClient]:
        c = client_state
        net = c.net
        _load(net.head, server_state, "head")
        c.head_opt.state.clear()
        c.phi_opt.state.clear()
        X, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
        n = data.n_train
        b = min(self.training.batch_size, n)
        align = self.align_weight > 0 and float(server_state["anchor_ready"][0]) > 0 and b >= 2
        if align:
            a_cov = np.asarray(server_state["anchor_cov"], np.float64)
            a_mean_t = torch.from_numpy(np.asarray(server_state["anchor_mean"], np.float32))
            a_sqrt_t = torch.from_numpy(psd_sqrt(a_cov).astype(np.float32))
            a_trace = float(np.trace(a_cov))
        net.train()
        # 1) the shared head, embedding frozen
        head_steps = self.training.local_steps if self.head_steps is None else self.head_steps
        for _ in range(head_steps):
            idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
            with torch.no_grad():
                z = net.phi(X[idx])
            loss = torch.mean((net.head(z).squeeze(-1) - y[idx]) ** 2)
            c.head_opt.zero_grad(set_to_none=True)
            loss.backward()
            c.head_opt.step()
        # 2) the personal embedding, head frozen, aligned to the anchor
        net.head.requires_grad_(False)
        total = 0.0
        try:
            for _ in range(self.training.local_steps):
                idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
                z = net.phi(X[idx])
                loss = torch.mean((net.head(z).squeeze(-1) - y[idx]) ** 2)
                total += float(loss.detach())
                if align:
                    m_b, s_b = batch_gaussian(z)
                    loss = loss + self.align_weight * w2_squared_torch(m_b, s_b, a_mean_t, a_sqrt_t, a_trace)
                c.phi_opt.zero_grad(set_to_none=True)
                loss.backward()
                c.phi_opt.step()
        finally:
            net.head.requires_grad_(True)
        net.eval()
        with torch.no_grad():
            zl = net.phi(X).double().numpy()
        k = zl.shape[1]
        payload: Payload = {
            **_prefixed(net.head, "head"),
            "latent_mean": zl.mean(axis=0),
            "latent_cov": np.cov(zl, rowvar=False).reshape(k, k) + JITTER * np.eye(k),
        }
        return Update(data.name, payload, n, {"loss": total / max(self.training.local_steps, 1)}), c

    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        ups = ordered(updates)
        weights = [u.num_examples for u in ups]
        keys = [k for k in ups[0].payload if k.startswith("head.")]
        new: Payload = dict(server_state)
        new.update(weighted_average([({k: u.payload[k] for k in keys}, u.num_examples) for u in ups]))
        warm = server_state["anchor_cov"] if float(server_state["anchor_ready"][0]) > 0 else None
        m, s = barycenter(
            [u.payload["latent_mean"] for u in ups], [u.payload["latent_cov"] for u in ups], weights,
            init=warm, max_iter=self.barycenter_iters,
        )
        new["anchor_mean"], new["anchor_cov"], new["anchor_ready"] = m, s, np.ones(1)
        return new

    def personal_params(self, server_state: Payload, client_state: FLICClient) -> Params:
        # the institution's own embedding (copied: it keeps training) and the shared head
        return {**_prefixed(client_state.net.phi, "phi"), **{k: v for k, v in server_state.items() if k.startswith("head.")}}

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        if self._evaluator is None:
            hidden = self.training.hidden
            self._evaluator = Evaluator(lambda d_in: FLICNet(d_in, hidden), "phi.0.weight")
        return self._evaluator(params, X)
