"""FedMDH: federated regression under multi-dimensional heterogeneity (GFAM + GPD-CGAN + RKD).

Reference: the FedMDH method as described in the project's brief and the authors' public code
(SICC-Group/FedMDH, commit 038a412); see ``shared/docs/FEDMDH_SPEC.md``. Our reading, with the
reference code's defects fixed (a fresh model per institution, statistics reset every round,
standardised features, the 1e-6 jitter on the diagonal only, no test labels anywhere).

The model of institution ``i`` is ``h(phi(x))``: an encoder ``phi`` from the union feature space
(the institution's missing columns are 0) into a ``k``-dimensional latent space, and a linear
predictor ``h``. ``phi`` is ``Linear(d, 64) - LeakyReLU - Linear(64, k) - LeakyReLU`` with
``k = hidden[-1] = 64``, so ``h . phi`` has the size of the baselines' MLP. Every round:

**GFAM** (global feature anchor based mapping). Each institution maps its rows into the shared
latent space *as seen through every institution's feature set*: a fraction ``mask_prob`` of each
minibatch is re-expressed in another institution's columns (features outside the intersection set
to 0), so one encoder learns to map every institution's feature space to the same latent point for
the same material. Each institution summarises its latent features by a Gaussian ``N(m_i, S_i)``;
the global anchor ``N(m_G, S_G)`` is their W2 barycenter weighted by sample counts (general
covariance, POT's fixed point), and the closed-form ``W2^2(N(batch), N(m_G, S_G))`` is added to
the local loss with weight ``align_weight``. Sent: the anchor statistics ``(m_i, S_i)``.

**GPD-CGAN** (global prediction-value distribution conditional GAN). A conditional generator
``G(z, y)`` (``z`` drawn from the anchor) and discriminator ``D(latent, y)`` are trained locally
with least-squares GAN losses on the institution's (latent, label) pairs and averaged every round
(FedGAN-style). The conditions ``y`` for generation are drawn from the global prediction
distribution (RKD), so an institution with few rows or a narrow label band trains ``h`` on
labelled latent samples across the whole range: ``gen_weight * MSE(h(G(z, y~)), y~)``.
Sent: ``G`` and ``D``'s parameters.

**RKD** (regression knowledge distillation). Each institution summarises its predictions on its
own training rows this round (mean, variance; reset every round); the global prediction
distribution is their mixture (pooled moments ``sum w mu`` and ``sum w (var + mu^2) - mu^2``).
It supplies the generator's conditions, and the local loss distils from the shared model:
``soft_weight * MSE(h(phi(x_view)), y_soft)`` where ``y_soft`` is the round's global model's
prediction for the row with all the institution's columns (so a row seen through fewer columns is
pulled toward what the shared model predicts with more). The reference code's soft-label term
regresses each row onto an independent draw from ``N(mu_G, sigma_G^2)``, which carries no
information about the row; we use the shared model's prediction as the soft label instead.
The Gaussian KL term ``KL(N(mu_G, sigma_G^2) || N(mu_batch, sigma_batch^2))`` is available with
``kl_weight`` (default 0: under label skew the local prediction distribution *should* differ from
the global one). Sent: ``(mu_i, sigma_i^2)``.

``phi`` and ``h`` are averaged by sample count every round. What leaves an institution is only
model/generator/discriminator parameters, anchor statistics, prediction-distribution summaries
and the sample count. Each component can be switched off (``gfam``, ``cgan``, ``rkd``); its
statistics and parameters are then neither computed nor sent.
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
    ordered,
    weighted_average,
)
from fedmdh.algorithms.gaussian import barycenter, batch_gaussian, gaussian_kl, mixture_moments, psd_sqrt, w2_squared_torch
from fedmdh.algorithms.seeded import seeded
from fedmdh.data.federation import InstitutionData
from fedmdh.nn.gan import ConditionalDiscriminator, ConditionalGenerator, lsgan_step
from fedmdh.nn.mlp import Evaluator, dense_stack, load_prefixed as _load, make_optimizer, prefixed_params as _prefixed

JITTER = 1e-6


class LatentRegressor(nn.Module):
    """``h(phi(x))``: encoder into the latent space and a linear predictor."""

    def __init__(self, d_in: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers, prev = dense_stack(d_in, hidden, lambda: nn.LeakyReLU(0.2))
        self.phi = nn.Sequential(*layers)
        self.h = nn.Linear(prev, 1)

    @property
    def latent_dim(self) -> int:
        return self.h.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.phi(x)).squeeze(-1)


@dataclass
class FedMDHClient:
    """An institution's private state: working copies of the networks and its optimisers."""

    net: LatentRegressor
    optimizer: torch.optim.Optimizer
    gen: ConditionalGenerator | None
    disc: ConditionalDiscriminator | None
    g_opt: torch.optim.Optimizer | None
    d_opt: torch.optim.Optimizer | None
    masks: np.ndarray  # (K, n_features) float32: each institution's feature set, as 0/1
    own: int  # index of this institution among the masks


class FedMDH(Algorithm):
    """GFAM + GPD-CGAN + RKD; see the module docstring.

    Parameters
    ----------
    training:
        Local optimisation of ``h . phi`` (shared network size and budget).
    gfam, cgan, rkd:
        Switch each component on or off (ablation).
    mask_prob:
        GFAM: fraction of each minibatch re-expressed in another institution's feature set.
    align_weight:
        GFAM: weight of the W2 alignment to the global anchor.
    align_steps:
        GFAM: how many of the round's local steps (from the first) carry the alignment term; each
        costs an eigendecomposition of a ``k x k`` matrix and its gradient.
    gen_weight:
        GPD-CGAN: weight of the generated-sample term in the predictor's loss.
    soft_weight:
        RKD: weight of the distillation term toward the shared model's prediction.
    kl_weight:
        RKD: weight of the Gaussian KL between global and batch prediction distributions.
    barycenter_iters:
        GFAM: fixed-point iterations per round for the anchor, warm-started from the last anchor.
    gan_steps, gan_lr, gan_weight_decay, gan_hidden:
        GPD-CGAN: discriminator/generator steps per round and their Adam settings, hidden width.
    """

    name = "fedmdh"

    def __init__(
        self,
        training: LocalTraining | None = None,
        gfam: bool = True,
        cgan: bool = True,
        rkd: bool = True,
        mask_prob: float = 0.3,
        align_weight: float = 0.01,
        gen_weight: float = 0.1,
        soft_weight: float = 0.1,
        kl_weight: float = 0.0,
        align_steps: int = 1,
        gan_steps: int = 1,
        barycenter_iters: int = 3,
        gan_lr: float = 3e-4,
        gan_weight_decay: float = 1e-2,
        gan_hidden: int = 128,
    ) -> None:
        super().__init__(training)
        for nm, v in (("mask_prob", mask_prob),):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{nm} must be in [0, 1], got {v}.")
        for nm, v in (("align_weight", align_weight), ("gen_weight", gen_weight), ("soft_weight", soft_weight),
                      ("kl_weight", kl_weight), ("gan_lr", gan_lr), ("gan_weight_decay", gan_weight_decay)):
            if v < 0:
                raise ValueError(f"{nm} must be >= 0, got {v}.")
        if align_steps < 0:
            raise ValueError(f"align_steps must be >= 0, got {align_steps}.")
        if gan_steps < 0 or gan_hidden < 1:
            raise ValueError("gan_steps must be >= 0 and gan_hidden >= 1.")
        self.gfam, self.cgan, self.rkd = bool(gfam), bool(cgan), bool(rkd)
        self.mask_prob = float(mask_prob)
        self.align_weight = float(align_weight)
        self.gen_weight = float(gen_weight)
        self.soft_weight = float(soft_weight)
        self.kl_weight = float(kl_weight)
        self.align_steps = int(align_steps)
        self.barycenter_iters = max(1, int(barycenter_iters))
        self.gan_steps = int(gan_steps)
        self.gan_lr = float(gan_lr)
        self.gan_weight_decay = float(gan_weight_decay)
        self.gan_hidden = int(gan_hidden)
        self._evaluator: Evaluator | None = None

    def hyperparameters(self) -> dict[str, Any]:
        d = super().hyperparameters()
        d.update(
            gfam=self.gfam, cgan=self.cgan, rkd=self.rkd, mask_prob=self.mask_prob,
            align_weight=self.align_weight, gen_weight=self.gen_weight, soft_weight=self.soft_weight,
            kl_weight=self.kl_weight, align_steps=self.align_steps,
            barycenter_iters=self.barycenter_iters, gan_steps=self.gan_steps, gan_lr=self.gan_lr,
            gan_weight_decay=self.gan_weight_decay, gan_hidden=self.gan_hidden,
        )
        return d

    # -- construction ---------------------------------------------------------------------------
    def _net(self, d_in: int, seed: int) -> LatentRegressor:
        return seeded(seed, ("fedmdh", "net"), lambda: LatentRegressor(d_in, self.training.hidden))

    def _gan(self, k: int, seed: int) -> tuple[ConditionalGenerator, ConditionalDiscriminator]:
        return seeded(seed, ("fedmdh", "gan"), lambda: (
            ConditionalGenerator(k, k, self.gan_hidden), ConditionalDiscriminator(k, self.gan_hidden)))

    def init(self, spec: FederationSpec, seed: int) -> Payload:
        net = self._net(spec.n_features, seed)
        state: Payload = {**_prefixed(net.phi, "phi"), **_prefixed(net.h, "h")}
        k = net.latent_dim
        if self.cgan:
            gen, disc = self._gan(k, seed)
            state.update(_prefixed(gen, "G"))
            state.update(_prefixed(disc, "D"))
        if self.gfam:
            # no anchor before the first round's statistics: alignment starts in round 2
            state["anchor_mean"] = np.zeros(k)
            state["anchor_cov"] = np.eye(k)
            state["anchor_ready"] = np.zeros(1)
        # the pooled label distribution in standardised units is N(0, 1) by construction
        state["pred_dist"] = np.array([0.0, 1.0])
        return state

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> FedMDHClient:
        net = self._net(spec.n_features, seed)
        t = self.training
        opt = make_optimizer(net.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay)
        gen = disc = g_opt = d_opt = None
        if self.cgan:
            gen, disc = self._gan(net.latent_dim, seed)
            g_opt = torch.optim.Adam(gen.parameters(), lr=self.gan_lr, weight_decay=self.gan_weight_decay, foreach=True)
            d_opt = torch.optim.Adam(disc.parameters(), lr=self.gan_lr, weight_decay=self.gan_weight_decay, foreach=True)
        names = list(spec.names)
        masks = np.zeros((len(names), spec.n_features), dtype=np.float32)
        for j, nm in enumerate(names):
            masks[j, spec.feature_idx[nm]] = 1.0
        own = names.index(data.name) if data.name in names else 0
        return FedMDHClient(net, opt, gen, disc, g_opt, d_opt, masks, own)

    # -- local round ---------------------------------------------------------------------------
    def _views(self, X: np.ndarray, client: FedMDHClient, rng: np.random.Generator) -> np.ndarray:
        """Re-express a fraction of rows in other institutions' feature sets (GFAM mapping)."""
        if not self.gfam or self.mask_prob == 0.0 or client.masks.shape[0] < 2:
            return X
        others = [j for j in range(client.masks.shape[0]) if j != client.own]
        pick = rng.random(X.shape[0]) < self.mask_prob
        which = rng.integers(0, len(others), size=X.shape[0])
        X = X.copy()
        if pick.any():
            sel = np.asarray(others)[which[pick]]
            X[pick] *= client.masks[sel]
        return X

    def client_update(
        self, server_state: Payload, client_state: FedMDHClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, FedMDHClient]:
        c = client_state
        net = c.net
        _load(net.phi, server_state, "phi")
        _load(net.h, server_state, "h")
        c.optimizer.state.clear()
        k = net.latent_dim
        mu_g, var_g = (float(v) for v in server_state["pred_dist"])
        anchor_ready = self.gfam and float(server_state["anchor_ready"][0]) > 0
        if self.gfam:
            a_mean = np.asarray(server_state["anchor_mean"], np.float64)
            a_cov = np.asarray(server_state["anchor_cov"], np.float64)
            a_sqrt = psd_sqrt(a_cov)
            a_mean_t = torch.from_numpy(a_mean.astype(np.float32))
            a_sqrt_t = torch.from_numpy(a_sqrt.astype(np.float32))
            a_trace = float(np.trace(a_cov))
        else:
            a_mean, a_sqrt = np.zeros(k), np.eye(k)
        gan_ready = self.cgan and float(server_state.get("anchor_ready", np.ones(1))[0]) > 0
        if self.cgan:
            _load(c.gen, server_state, "G")
            _load(c.disc, server_state, "D")

        X = torch.from_numpy(data.X)
        y = torch.from_numpy(data.y)
        teacher = None
        if self.rkd and self.soft_weight > 0:
            net.eval()
            with torch.no_grad():
                teacher = net(X)
        n, b = data.n_train, min(self.training.batch_size, data.n_train)

        def cond_labels(size: int) -> np.ndarray:
            if self.rkd:  # global prediction distribution
                return rng.normal(mu_g, np.sqrt(max(var_g, 1e-12)), size=size)
            return data.y[rng.integers(0, n, size=size)].astype(np.float64)  # own labels only

        def anchor_noise(size: int) -> torch.Tensor:
            eps = rng.standard_normal((size, k))
            return torch.from_numpy((a_mean + eps @ a_sqrt).astype(np.float32))

        steps = self.training.local_steps
        if gan_ready and self.gen_weight > 0:
            # the round's generated (latent, y~) pairs, drawn in one pass of the global generator
            y_gen_np = cond_labels(b * steps).astype(np.float32)
            c.gen.eval()
            with torch.no_grad():
                z_gen = c.gen(anchor_noise(b * steps), torch.from_numpy(y_gen_np))
            y_gen = torch.from_numpy(y_gen_np)
        net.train()
        total = 0.0
        for step in range(steps):
            idx = rng.choice(n, size=b, replace=False)
            xb = torch.from_numpy(self._views(data.X[idx], c, rng))
            z = net.phi(xb)
            pred = net.h(z).squeeze(-1)
            loss = torch.mean((pred - y[idx]) ** 2)
            total += float(loss.detach())
            if anchor_ready and self.align_weight > 0 and step < self.align_steps:
                m_b, s_b = batch_gaussian(z)
                loss = loss + self.align_weight * w2_squared_torch(m_b, s_b, a_mean_t, a_sqrt_t, a_trace)
            if gan_ready and self.gen_weight > 0:
                part = slice(step * b, (step + 1) * b)
                pg = net.h(z_gen[part]).squeeze(-1)
                loss = loss + self.gen_weight * torch.mean((pg - y_gen[part]) ** 2)
            if teacher is not None:
                loss = loss + self.soft_weight * torch.mean((pred - teacher[idx]) ** 2)
            if self.rkd and self.kl_weight > 0:
                loss = loss + self.kl_weight * gaussian_kl(
                    torch.tensor(mu_g), torch.tensor(max(var_g, 1e-6)), pred.mean(), pred.var() + 1e-6
                )
            c.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            c.optimizer.step()

        payload: Payload = {**_prefixed(net.phi, "phi"), **_prefixed(net.h, "h")}
        net.eval()
        with torch.no_grad():
            latent = net.phi(X)
            preds = net.h(latent).squeeze(-1)
        if self.cgan:
            self._train_gan(c, latent, y, cond_labels, anchor_noise, rng)
            payload.update(_prefixed(c.gen, "G"))
            payload.update(_prefixed(c.disc, "D"))
        if self.gfam:
            zl = latent.double().numpy()
            payload["anchor_mean"] = zl.mean(axis=0)
            cov = np.cov(zl, rowvar=False)
            payload["anchor_cov"] = cov + JITTER * np.eye(k)
        if self.rkd:
            p = preds.double().numpy()
            payload["pred_stats"] = np.array([p.mean(), p.var()])
        return Update(data.name, payload, data.n_train, {"loss": total / steps}), c

    def _train_gan(self, c: FedMDHClient, latent, y, cond_labels, anchor_noise, rng) -> None:
        n = latent.shape[0]
        b = min(self.training.batch_size, n)
        if b < 2:
            return
        c.g_opt.state.clear()
        c.d_opt.state.clear()
        c.gen.train()
        c.disc.train()
        for _ in range(self.gan_steps):
            idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
            real, y_real = latent[idx], y[idx]
            y_fake = torch.from_numpy(cond_labels(b).astype(np.float32))
            fake = c.gen(anchor_noise(b), y_fake)
            lsgan_step(c.disc, c.d_opt, c.g_opt, real, y_real, fake, y_fake)

    # -- aggregation ----------------------------------------------------------------------------
    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        ups = ordered(updates)
        weights = [u.num_examples for u in ups]
        new: Payload = dict(server_state)
        prefixes = ("phi.", "h.", "G.", "D.")
        keys = [k for k in ups[0].payload if k.startswith(prefixes)]
        new.update(weighted_average([({k: u.payload[k] for k in keys}, u.num_examples) for u in ups]))
        if self.gfam:
            warm = server_state["anchor_cov"] if float(server_state["anchor_ready"][0]) > 0 else None
            # a few fixed-point steps a round from the previous anchor: the anchor tracks the
            # barycenter as the latent statistics drift, without solving from scratch every round
            m, s = barycenter(
                [u.payload["anchor_mean"] for u in ups], [u.payload["anchor_cov"] for u in ups], weights, init=warm,
                max_iter=self.barycenter_iters if warm is not None else 30,
            )
            new["anchor_mean"], new["anchor_cov"], new["anchor_ready"] = m, s, np.ones(1)
        if self.rkd:
            mu, var = mixture_moments(
                [u.payload["pred_stats"][0] for u in ups], [u.payload["pred_stats"][1] for u in ups], weights
            )
            new["pred_dist"] = np.array([mu, var])
        return new

    def onchain_vectors(self, update: Update) -> dict[str, np.ndarray]:
        """Small vectors a ledger contract can aggregate itself: anchor mean and prediction moments."""
        out = {}
        if "anchor_mean" in update.payload:
            out["anchor_mean"] = np.asarray(update.payload["anchor_mean"], np.float64)
        if "pred_stats" in update.payload:
            out["pred_stats"] = np.asarray(update.payload["pred_stats"], np.float64)
        return out

    # -- prediction -----------------------------------------------------------------------------
    def personal_params(self, server_state: Payload, client_state: FedMDHClient) -> Params:
        # the institution's model: the shared encoder and predictor, fed its own columns
        return {k: v for k, v in server_state.items() if k.startswith(("phi.", "h."))}

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        if self._evaluator is None:
            hidden = self.training.hidden
            self._evaluator = Evaluator(lambda d_in: LatentRegressor(d_in, hidden), "phi.0.weight")
        return self._evaluator(params, X)


class FedMDHNoGFAM(FedMDH):
    """Ablation: FedMDH without GFAM (no cross-feature-set mapping, no anchor, no alignment)."""

    name = "fedmdh-no-gfam"

    def __init__(self, training: LocalTraining | None = None, **kw: Any) -> None:
        kw["gfam"] = False
        super().__init__(training, **kw)


class FedMDHNoCGAN(FedMDH):
    """Ablation: FedMDH without GPD-CGAN (no generator, no generated samples)."""

    name = "fedmdh-no-cgan"

    def __init__(self, training: LocalTraining | None = None, **kw: Any) -> None:
        kw["cgan"] = False
        super().__init__(training, **kw)


class FedMDHNoRKD(FedMDH):
    """Ablation: FedMDH without RKD (no prediction distribution, no distillation)."""

    name = "fedmdh-no-rkd"

    def __init__(self, training: LocalTraining | None = None, **kw: Any) -> None:
        kw["rkd"] = False
        super().__init__(training, **kw)
