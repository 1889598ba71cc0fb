"""FedGAN (Rasouli, Sun, Rajagopal, arXiv 2006.07228), adapted to regression on heterogeneous features.

FedGAN trains a generator ``G`` and discriminator ``D`` locally at every agent and averages both
at an intermediary every ``K`` local steps (here: every round, i.e. ``K = gan_steps``). The paper
generates unconditional samples; for regression we make the GAN conditional on the target,
``G(z, y) -> x`` and ``D(x, y)``, and use its samples to augment each institution's regressor.

**Regression / heterogeneous-feature adaptation.**

- The GAN lives in the *union* feature space (``x`` has ``n_features`` entries). An institution's
  real rows are 0 outside its own columns, so its generated rows are multiplied by its own column
  mask before the discriminator sees them (``D`` compares like with like); the averaged ``G``
  therefore learns, column by column, the conditional distribution ``x | y`` of the institutions
  that hold that column.
- Locally, the GAN's fake conditions are the institution's own labels (resampled), so ``D`` can
  only tell real from fake by ``x | y``, not by the label distribution.
- Augmentation: ``gen_weight * MSE(f(G(z, y~) * mask_i), y~)`` is added to the regressor's loss,
  with ``y~`` drawn from the pooled label distribution (the mixture of the institutions' label
  summaries ``(mean, var)``, combined with :func:`~fedmdh.algorithms.gaussian.mixture_moments`),
  so an institution with a narrow label band trains on labelled rows across the whole range, seen
  through its own columns. Augmentation starts after ``warmup_rounds`` rounds of GAN training.
- The regressor ``f`` is the shared :class:`~fedmdh.nn.mlp.MLP`, averaged FedAvg-style.

Sent each round: the regressor's, ``G``'s and ``D``'s parameters and the label summary
``(mean, var)`` of the institution's training labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmdh.algorithms.base import (
    FederationSpec,
    Params,
    Payload,
    Update,
    coerce_settings,
    ordered,
    weighted_average,
)
from fedmdh.nn.mlp import load_prefixed as _load, prefixed_params as _prefixed
from fedmdh.algorithms.gaussian import mixture_moments
from fedmdh.algorithms.mlp_common import MLPAlgorithm
from fedmdh.algorithms.sums import contribution, mean_from_sum, moment_sums, moments_from_sums
from fedmdh.algorithms.seeded import own_mask, seeded
from fedmdh.data.federation import InstitutionData
from fedmdh.nn.gan import ConditionalDiscriminator, ConditionalGenerator, lsgan_step
from fedmdh.nn.mlp import MLP

_SHARED = ("reg.", "G.", "D.")


@dataclass(frozen=True)
class FedGANSettings:
    """FedGAN's own settings (see :class:`FedGAN`)."""

    gen_weight: float = 0.1
    gan_steps: int = 2
    warmup_rounds: int = 20
    noise_dim: int = 16
    gan_hidden: int = 128
    gan_lr: float = 1e-3
    gan_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for nm in ("gen_weight", "gan_weight_decay"):
            if getattr(self, nm) < 0:
                raise ValueError(f"{nm} must be >= 0, got {getattr(self, nm)}.")
        if self.gan_lr <= 0:
            raise ValueError(f"gan_lr must be > 0, got {self.gan_lr}.")
        if self.gan_steps < 1 or self.warmup_rounds < 0 or self.noise_dim < 1 or self.gan_hidden < 1:
            raise ValueError("gan_steps, noise_dim and gan_hidden must be >= 1 and warmup_rounds >= 0.")
        coerce_settings(self)


@dataclass
class FedGANClient:
    """An institution's private working copies and optimisers (never sent)."""

    reg: MLP
    optimizer: torch.optim.Optimizer
    gen: ConditionalGenerator
    disc: ConditionalDiscriminator
    g_opt: torch.optim.Optimizer
    d_opt: torch.optim.Optimizer
    mask: np.ndarray  # (n_features,) float32, the institution's own columns


class FedGAN(MLPAlgorithm):
    """Federated conditional GAN whose samples augment a FedAvg regressor; see the module docstring.

    Parameters
    ----------
    training:
        Local optimisation of the regressor (shared network size and budget).
    gen_weight:
        Weight of the generated-sample term in the regressor's loss (0: FedAvg plus a GAN).
    gan_steps:
        Local discriminator/generator steps per round (FedGAN's synchronisation interval ``K``).
    warmup_rounds:
        Rounds of GAN training before generated samples augment the regressor.
    noise_dim, gan_hidden:
        Generator noise dimension and hidden width of ``G`` and ``D``.
    gan_lr, gan_weight_decay:
        Adam settings of ``G`` and ``D``.
    """

    name = "fedgan"
    # the regressor, generator and discriminator are sample-weighted means and the label distribution's
    # mixture moments follow from sum_i n_i mu_i and sum_i n_i (var_i + mu_i^2)
    secure_reveals = None

    Settings = FedGANSettings

    # -- construction ---------------------------------------------------------------------------
    def _gan(self, spec: FederationSpec, seed: int) -> tuple[ConditionalGenerator, ConditionalDiscriminator]:
        d = spec.n_features
        return seeded(
            seed, ("fedgan", "gan"),
            lambda: (ConditionalGenerator(self.noise_dim, d, self.gan_hidden), ConditionalDiscriminator(d, self.gan_hidden)),
        )

    def init(self, spec: FederationSpec, seed: int) -> Payload:
        gen, disc = self._gan(spec, seed)
        state: Payload = {
            **_prefixed(self._new_model(spec, seed, "global"), "reg"),
            **_prefixed(gen, "G"),
            **_prefixed(disc, "D"),
        }
        state["label_dist"] = np.array([0.0, 1.0])  # pooled standardised labels: N(0, 1)
        return state

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> FedGANClient:
        reg = self._new_model(spec, seed, "global")
        gen, disc = self._gan(spec, seed)
        kw = dict(lr=self.gan_lr, weight_decay=self.gan_weight_decay)
        return FedGANClient(
            reg, self._new_optimizer(reg), gen, disc,
            torch.optim.Adam(gen.parameters(), **kw), torch.optim.Adam(disc.parameters(), **kw),
            own_mask(spec, data.name),
        )

    # -- local round ---------------------------------------------------------------------------
    def generate(self, gen: ConditionalGenerator, y: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Synthetic rows ``G(z, y) * mask`` in the union feature space, ``(len(y), n_features)`` float32."""
        z = torch.from_numpy(rng.standard_normal((len(y), self.noise_dim)).astype(np.float32))
        gen.eval()
        with torch.no_grad():
            x = gen(z, torch.from_numpy(np.asarray(y, np.float32)))
        return (x.numpy() * mask).astype(np.float32)

    def _train_gan(self, c: FedGANClient, data: InstitutionData, rng: np.random.Generator) -> float:
        n = data.n_train
        b = min(self.training.batch_size, n)
        if b < 2:
            return 0.0
        c.g_opt.state.clear()
        c.d_opt.state.clear()
        c.gen.train()
        c.disc.train()
        mask = torch.from_numpy(c.mask)
        X, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
        g_total = 0.0
        for _ in range(self.gan_steps):
            idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
            y_fake = y[torch.from_numpy(rng.integers(0, n, size=b))]  # local conditions: D judges x | y
            z = torch.from_numpy(rng.standard_normal((b, self.noise_dim)).astype(np.float32))
            fake = c.gen(z, y_fake) * mask
            g_total += lsgan_step(c.disc, c.d_opt, c.g_opt, X[idx], y[idx], fake, y_fake)
        return g_total / self.gan_steps

    def client_update(
        self, server_state: Payload, client_state: FedGANClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, FedGANClient]:
        c = client_state
        _load(c.reg, server_state, "reg")
        _load(c.gen, server_state, "G")
        _load(c.disc, server_state, "D")
        c.optimizer.state.clear()
        steps, n = self.training.local_steps, data.n_train
        b = min(self.training.batch_size, n)
        augment = self.gen_weight > 0 and rnd - 1 >= self.warmup_rounds
        if augment:  # the round's synthetic rows, from the global generator before local GAN steps
            mu, var = (float(v) for v in server_state["label_dist"])
            y_gen = rng.normal(mu, np.sqrt(max(var, 1e-12)), size=b * steps).astype(np.float32)
            x_gen = torch.from_numpy(self.generate(c.gen, y_gen, c.mask, rng))
            y_gen_t = torch.from_numpy(y_gen)
        X, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
        c.reg.train()
        total = 0.0
        for step in range(steps):
            idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
            loss = torch.mean((c.reg(X[idx]) - y[idx]) ** 2)
            total += float(loss.detach())
            if augment:
                part = slice(step * b, (step + 1) * b)
                loss = loss + self.gen_weight * torch.mean((c.reg(x_gen[part]) - y_gen_t[part]) ** 2)
            c.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            c.optimizer.step()
        g_loss = self._train_gan(c, data, rng)
        yd = data.y.astype(np.float64)
        payload: Payload = {
            **_prefixed(c.reg, "reg"), **_prefixed(c.gen, "G"), **_prefixed(c.disc, "D"),
            "label_stats": np.array([yd.mean(), yd.var()]),
        }
        return Update(data.name, payload, n, {"loss": total / steps, "g_loss": g_loss}), c

    # -- aggregation ----------------------------------------------------------------------------
    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        ups = ordered(updates)
        keys = [k for k in ups[0].payload if k.startswith(_SHARED)]
        new: Payload = dict(server_state)
        new.update(weighted_average([({k: u.payload[k] for k in keys}, u.num_examples) for u in ups]))
        mu, var = mixture_moments(
            [u.payload["label_stats"][0] for u in ups], [u.payload["label_stats"][1] for u in ups],
            [u.num_examples for u in ups],
        )
        new["label_dist"] = np.array([mu, var])
        return new

    def secure_contribution(self, update: Update, server_state: Payload) -> np.ndarray:
        keys = sorted(k for k in update.payload if k.startswith(_SHARED))
        mu, var = (float(v) for v in np.asarray(update.payload["label_stats"], dtype=np.float64)[:2])
        return np.concatenate([contribution(update, keys), moment_sums(float(update.num_examples), mu, var)])

    def aggregate_from_sum(self, server_state: Payload, template: Update, total: np.ndarray, count: float) -> Payload:
        keys = sorted(k for k in template.payload if k.startswith(_SHARED))
        new: Payload = dict(server_state)
        new.update(mean_from_sum({k: template.payload[k] for k in keys}, total[:-2], count))
        new["label_dist"] = moments_from_sums(total[-2:], count)
        return new

    # -- prediction -----------------------------------------------------------------------------
    _personal: tuple[Payload, Params] | None = None

    def personal_params(self, server_state: Payload, client_state: FedGANClient) -> Params:
        # the shared regressor; one dict per server state, so evaluation loads it once per round
        if self._personal is None or self._personal[0] is not server_state:
            reg = {k[len("reg."):]: v for k, v in server_state.items() if k.startswith("reg.")}
            self._personal = (server_state, reg)
        return self._personal[1]
