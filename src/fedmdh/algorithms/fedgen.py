"""FedGen (Zhu, Hong, Zhou, ICML 2021), data-free knowledge distillation, adapted to regression.

FedGen's server learns a lightweight generator ``G(z, y)`` of *latent features* conditioned on the
target, without any data: it trains ``G`` so that the ensemble of the clients' predictor heads
recognises ``y`` from ``G(z, y)``, with ``y`` drawn from the global label distribution. The
generator is broadcast, and each client regularises its head with generated latents
(``E_y E_z loss(h(G(z, y)), y)``), which carries the ensemble's knowledge of the whole label range
into every client. The model itself (feature extractor + head) is averaged as in FedAvg.

**Regression / heterogeneous-feature adaptation.**

- The model is the shared network ``h(phi(x))`` of :class:`~fedmdh.nn.latent.LatentRegressor`
  (``phi`` the hidden layers over the union feature space, ``h`` a linear head), averaged by
  sample count.
- The condition is continuous: ``G`` is :class:`~fedmdh.nn.gan.ConditionalGenerator` with a
  scalar ``y``. Targets are sampled from the *pooled label distribution*, a Gaussian whose moments
  are the mixture moments (:func:`~fedmdh.algorithms.gaussian.mixture_moments`) of the
  institutions' label summaries ``(mean, var)`` weighted by counts (FedGen counts labels per class).
- The generator loss is the count-weighted MSE ``sum_i w_i MSE(h_i(G(z, y)), y)`` of the
  institutions' heads ``h_i`` sent this round (FedGen's ensemble cross-entropy), plus FedGen's
  diversity term ``exp(-mean_{jk} ||z_j - z_k|| * ||G_j - G_k||)`` weighted by ``diversity_weight``.
- "Server-side" is the aggregation: ``G`` is trained inside :meth:`FedGen.aggregate`, with its
  noise drawn from the aggregation's generator (derived by every peer from the task's seed and
  the round), so every peer recomputes the same
  generator bit for bit.
- Institutions add ``gen_weight * MSE(h(G(z, y~)), y~)`` to their loss (gradient to ``h`` only).

Sent each round: ``phi``'s and ``h``'s parameters and the label summary ``(mean, var)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
from fedmdh.nn.latent import LatentRegressor
from fedmdh.nn.mlp import load_prefixed as _load, prefixed_params as _prefixed
from fedmdh.algorithms.gaussian import mixture_moments
from fedmdh.algorithms.seeded import seeded
from fedmdh.data.federation import InstitutionData
from fedmdh.nn.gan import ConditionalGenerator
from fedmdh.nn.mlp import Evaluator, make_optimizer


@dataclass(frozen=True)
class FedGenSettings:
    """FedGen's own settings (see :class:`FedGen`)."""

    gen_weight: float = 0.1
    gen_steps: int = 5
    gen_batch: int = 64
    gen_lr: float = 1e-3
    diversity_weight: float = 1.0
    noise_dim: int = 16
    gen_hidden: int = 128
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        for nm in ("gen_weight", "diversity_weight"):
            if getattr(self, nm) < 0:
                raise ValueError(f"{nm} must be >= 0, got {getattr(self, nm)}.")
        if self.gen_lr <= 0:
            raise ValueError(f"gen_lr must be > 0, got {self.gen_lr}.")
        if self.gen_steps < 0 or self.gen_batch < 2 or self.noise_dim < 1 or self.gen_hidden < 1:
            raise ValueError("gen_steps must be >= 0, gen_batch >= 2, noise_dim and gen_hidden >= 1.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}.")
        coerce_settings(self)


@dataclass
class FedGenClient:
    """An institution's working copies (network, generator) and optimiser (never sent)."""

    net: LatentRegressor
    optimizer: torch.optim.Optimizer
    gen: ConditionalGenerator


def diversity_loss(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """FedGen's diversity term ``exp(-mean_{jk} ||z_j - z_k|| * ||out_j - out_k||)``."""
    return torch.exp(-torch.mean(torch.cdist(z, z) * torch.cdist(out, out)))


class FedGen(Algorithm):
    """Aggregation-side latent generator distilled from the heads; see the module docstring.

    Parameters
    ----------
    training:
        Local optimisation of ``h . phi`` (shared network size and budget).
    gen_weight:
        Weight of the generated-latent term in the institutions' loss.
    gen_steps, gen_batch, gen_lr:
        Generator steps per aggregation, their batch size and Adam learning rate.
    diversity_weight:
        Weight of FedGen's diversity term in the generator's loss.
    noise_dim, gen_hidden:
        Generator noise dimension and hidden width.
    max_grad_norm:
        Clip the norm of each local step's gradient to this (``None``: no clipping). The
        generated-latent term trains the head alone on latents that carry no information about
        the labels; at the chosen learning rate one such step can blow the shared head up.
    """

    name = "fedgen"
    secure_reveals = "each institution's predictor head (the server trains its generator on the individual heads)"

    Settings = FedGenSettings

    def __init__(self, training: LocalTraining | None = None, settings: FedGenSettings | None = None,
                 **hyperparameters: Any) -> None:
        super().__init__(training, settings, **hyperparameters)
        self._evaluator: Evaluator | None = None
        self._personal: tuple[Payload, Params] | None = None

    @property
    def latent_dim(self) -> int:
        return int(self.training.hidden[-1])

    # -- construction ---------------------------------------------------------------------------
    def _net(self, d_in: int, seed: int) -> LatentRegressor:
        return seeded(seed, ("fedgen", "net"), lambda: LatentRegressor(d_in, self.training.hidden))

    def _gen(self, seed: int) -> ConditionalGenerator:
        return seeded(seed, ("fedgen", "gen"), lambda: ConditionalGenerator(self.noise_dim, self.latent_dim, self.gen_hidden))

    def init(self, spec: FederationSpec, seed: int) -> Payload:
        net = self._net(spec.n_features, seed)
        state: Payload = {**_prefixed(net.phi, "phi"), **_prefixed(net.h, "h"), **_prefixed(self._gen(seed), "G")}
        state["label_dist"] = np.array([0.0, 1.0])  # pooled standardised labels: N(0, 1)
        return state

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> FedGenClient:
        net = self._net(spec.n_features, seed)
        t = self.training
        return FedGenClient(net, make_optimizer(net.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay), self._gen(seed))

    # -- the generator --------------------------------------------------------------------------
    def generate_latent(self, server_state: Payload, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Latent features ``G(z, y)`` of the state's generator, ``(len(y), latent_dim)`` float32."""
        gen = self._scratch_gen()
        _load(gen, server_state, "G")
        return self._sample(gen, np.asarray(y, np.float32), rng).numpy()

    def _sample(self, gen: ConditionalGenerator, y: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        z = torch.from_numpy(rng.standard_normal((len(y), self.noise_dim)).astype(np.float32))
        gen.train()  # batch statistics, as the generator was trained
        with torch.no_grad():
            return gen(z, torch.from_numpy(y))

    def _scratch_gen(self) -> ConditionalGenerator:
        """A generator module to load weights into (built without touching the global torch RNG)."""
        return seeded(0, ("fedgen", "scratch-gen"), lambda: ConditionalGenerator(self.noise_dim, self.latent_dim, self.gen_hidden))

    # -- local round ---------------------------------------------------------------------------
    def client_update(
        self, server_state: Payload, client_state: FedGenClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, FedGenClient]:
        c = client_state
        net = c.net
        _load(net.phi, server_state, "phi")
        _load(net.h, server_state, "h")
        c.optimizer.state.clear()
        steps, n = self.training.local_steps, data.n_train
        b = min(self.training.batch_size, n)
        regularise = self.gen_weight > 0 and rnd > 1 and b >= 2
        if regularise:  # the generator is trained from the first aggregation on
            _load(c.gen, server_state, "G")
            mu, var = (float(v) for v in server_state["label_dist"])
            y_gen = rng.normal(mu, np.sqrt(max(var, 1e-12)), size=b * steps).astype(np.float32)
            z_gen = self._sample(c.gen, y_gen, rng)
            y_gen_t = torch.from_numpy(y_gen)
        X, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
        net.train()
        total = 0.0
        for step in range(steps):
            idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
            loss = torch.mean((net(X[idx]) - y[idx]) ** 2)
            total += float(loss.detach())
            if regularise:
                part = slice(step * b, (step + 1) * b)
                loss = loss + self.gen_weight * torch.mean((net.h(z_gen[part]).squeeze(-1) - y_gen_t[part]) ** 2)
            c.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), self.max_grad_norm)
            c.optimizer.step()
        yd = data.y.astype(np.float64)
        payload: Payload = {
            **_prefixed(net.phi, "phi"), **_prefixed(net.h, "h"), "label_stats": np.array([yd.mean(), yd.var()]),
        }
        return Update(data.name, payload, n, {"loss": total / steps}), c

    # -- aggregation ----------------------------------------------------------------------------
    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        ups = ordered(updates)
        weights = np.array([u.num_examples for u in ups], dtype=np.float64)
        weights = weights / weights.sum()
        keys = [k for k in ups[0].payload if k.startswith(("phi.", "h."))]
        new: Payload = dict(server_state)
        new.update(weighted_average([({k: u.payload[k] for k in keys}, u.num_examples) for u in ups]))
        mu, var = mixture_moments(
            [u.payload["label_stats"][0] for u in ups], [u.payload["label_stats"][1] for u in ups], weights
        )
        new["label_dist"] = np.array([mu, var])
        new.update(self._train_generator(server_state, ups, weights, mu, var, rng))
        return new

    def _train_generator(
        self, server_state: Payload, ups: Sequence[Update], weights: np.ndarray, mu: float, var: float,
        rng: np.random.Generator,
    ) -> Payload:
        """``G`` after ``gen_steps`` Adam steps on the heads' weighted MSE plus diversity."""
        gen = self._scratch_gen()
        _load(gen, server_state, "G")
        heads = []
        for u in ups:
            h = seeded(0, ("fedgen", "scratch-head"), lambda: torch.nn.Linear(self.latent_dim, 1))
            _load(h, u.payload, "h")
            h.requires_grad_(False)
            heads.append(h)
        opt = torch.optim.Adam(gen.parameters(), lr=self.gen_lr)
        gen.train()
        sd = np.sqrt(max(var, 1e-12))
        for _ in range(self.gen_steps):
            y = torch.from_numpy(rng.normal(mu, sd, size=self.gen_batch).astype(np.float32))
            z = torch.from_numpy(rng.standard_normal((self.gen_batch, self.noise_dim)).astype(np.float32))
            latent = gen(z, y)
            loss = torch.zeros(())
            for w, h in zip(weights, heads):
                loss = loss + float(w) * torch.mean((h(latent).squeeze(-1) - y) ** 2)
            if self.diversity_weight > 0:
                loss = loss + self.diversity_weight * diversity_loss(z, latent)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return _prefixed(gen, "G")

    # -- prediction -----------------------------------------------------------------------------
    def personal_params(self, server_state: Payload, client_state: FedGenClient) -> Params:
        # the shared model; one dict per server state, so evaluation loads it once per round
        if self._personal is None or self._personal[0] is not server_state:
            self._personal = (server_state, {k: v for k, v in server_state.items() if k.startswith(("phi.", "h."))})
        return self._personal[1]

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        if self._evaluator is None:
            hidden = self.training.hidden
            self._evaluator = Evaluator(lambda d_in: LatentRegressor(d_in, hidden), "phi.0.weight")
        return self._evaluator(params, X)
