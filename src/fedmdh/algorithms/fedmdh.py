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

**Two readings of GFAM's mapping** (``mapping``):

- ``"union"``: one encoder ``phi`` over the union feature space, averaged like ``h``, trained on
  the views above; the institution's model is ``h(phi(x))`` with its missing columns at 0.
- ``"per-institution"`` (the brief's ``phi_i: R^{d_i} -> R^k``): each institution has its own
  encoder ``phi_i`` over its own columns only, which never leaves it; only ``h``, ``G``, ``D``, the
  anchor statistics and the prediction moments are shared. The W2 alignment to the anchor is what
  puts every institution's ``phi_i`` into one latent space for the shared ``h``; there are no
  views (an institution's encoder never sees another's columns). This is the reading that works
  when institutions share no column (H = 0), where every view of the union reading is an
  all-zero row.

With ``holder_average`` (union reading), the first layer's weight of each input column is averaged
over the institutions that hold that column only (by their sample counts): an institution's
gradient never reaches a column it lacks, so the plain average only shrinks the holders' steps
on their private columns by their share of the rows (to 4 % for a 65-row institution beside
1,600 others).

``phi`` (union reading) and ``h`` are averaged by sample count every round; with ``eval_average``
(default 0.9 in ``fedmdh.defaults``) the institutions evaluate and keep a moving average of those
aggregates over rounds, while training continues from the aggregate itself. What leaves an institution is only
model/generator/discriminator parameters, anchor statistics, prediction-distribution summaries
and the sample count. Each component can be switched off (``gfam``, ``cgan``, ``rkd``); its
statistics and parameters are then neither computed nor sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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
from fedmdh.algorithms.gaussian import (
    JITTER,
    anchor_sqrt,
    barycenter,
    barycenter_step,
    barycenter_term,
    batch_gaussian,
    gaussian_kl,
    mixture_moments,
    w2_squared_torch,
)
from fedmdh.algorithms.seeded import seeded
from fedmdh.algorithms.sums import SumReader, cast, moment_sums, moments_from_sums
from fedmdh.data.federation import InstitutionData
from fedmdh.nn.gan import ConditionalDiscriminator, ConditionalGenerator, lsgan_step
from fedmdh.nn.fast import (
    clip_grad_norm_,
    load_state,
    plain_sgd_lr,
    prefixed_state,
    set_training,
    sgd_step,
)
from fedmdh.nn.latent import LatentRegressor
from fedmdh.nn.mlp import Evaluator, make_optimizer

MAPPINGS = ("union", "per-institution")


def _anchor_sqrt(cov: np.ndarray) -> np.ndarray:
    """``psd_sqrt(cov)`` (the same bits), its eigendecomposition remembered for the last anchor:
    every institution of a simulated round needs the same one, and so does the next aggregation."""
    return anchor_sqrt(cov)


#: the shared networks' entries: averaged every round (the regressor, generator and discriminator)
_SHARED_PREFIXES = ("phi.", "h.", "G.", "D.")


def track_average(old: Payload, new: Payload) -> Payload:
    """With ``eval_average`` (beta) in the server state, add to ``new`` the exponential moving
    average of the shared model over rounds, ``avg.k = beta avg.k + (1 - beta) k`` for every ``phi.``
    and ``h.`` entry (computed in float64, stored in the entry's dtype; ``avg.k`` starts at the first
    aggregate): the model the institutions evaluate and keep, while training continues from the
    plain aggregate. Deterministic, so any peer recomputes it."""
    if "eval_average" not in old:
        return new
    beta = float(np.asarray(old["eval_average"])[0])
    for k in [k for k in new if k.startswith(("phi.", "h."))]:
        cur = np.asarray(new[k])
        prev = old.get(f"avg.{k}")
        avg = cur.astype(np.float64) if prev is None else beta * np.asarray(prev, np.float64) + (1 - beta) * cur
        new[f"avg.{k}"] = avg.astype(cur.dtype)
    return new


@dataclass(frozen=True)
class FedMDHSettings:
    """FedMDH's own settings (see :class:`FedMDH`), validated once here."""

    gfam: bool = True
    cgan: bool = True
    rkd: bool = True
    mapping: str = "union"
    holder_average: bool = False
    empty_views: bool = True
    mask_prob: float = 0.3
    align_weight: float = 0.01
    gen_weight: float = 0.1
    soft_weight: float = 0.1
    kl_weight: float = 0.0
    align_steps: int = 1
    barycenter_iters: int = 1
    gan_steps: int = 1
    gan_lr: float = 3e-4
    gan_weight_decay: float = 1e-2
    gan_hidden: int = 128
    max_grad_norm: float | None = None
    eval_average: float = 0.0

    def __post_init__(self) -> None:
        if self.max_grad_norm is False:  # TOML has no null: false switches the clip off
            object.__setattr__(self, "max_grad_norm", None)
        g = self.max_grad_norm
        if g is not None and (isinstance(g, bool) or not g > 0):
            raise ValueError(f"max_grad_norm must be > 0, got {g}.")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}.")
        for nm in ("align_weight", "gen_weight", "soft_weight", "kl_weight", "gan_lr", "gan_weight_decay"):
            if getattr(self, nm) < 0:
                raise ValueError(f"{nm} must be >= 0, got {getattr(self, nm)}.")
        if self.align_steps < 0:
            raise ValueError(f"align_steps must be >= 0, got {self.align_steps}.")
        if self.gan_steps < 0 or self.gan_hidden < 1:
            raise ValueError("gan_steps must be >= 0 and gan_hidden >= 1.")
        if isinstance(self.gfam, str):  # gfam = "per-institution" picks the mapping; "off" switches it off
            if self.gfam in ("off", "false"):
                object.__setattr__(self, "gfam", False)
            else:
                object.__setattr__(self, "mapping", self.gfam)
                object.__setattr__(self, "gfam", True)
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {', '.join(MAPPINGS)}, got {self.mapping!r}.")
        if not 0.0 <= float(self.eval_average) < 1.0:
            raise ValueError(f"eval_average must be in [0, 1), got {self.eval_average}.")
        object.__setattr__(self, "barycenter_iters", max(1, int(self.barycenter_iters)))
        coerce_settings(self)


@dataclass
class FedMDHClient:
    """An institution's private state: working copies of the networks and its optimisers."""

    net: LatentRegressor
    optimizer: torch.optim.Optimizer
    gen: ConditionalGenerator | None
    disc: ConditionalDiscriminator | None
    g_opt: torch.optim.Optimizer | None
    d_opt: torch.optim.Optimizer | None
    masks: np.ndarray  # (K, n_features) float32: each institution's feature set, as 0/1 (union reading)
    own: int  # index of this institution among the masks
    own_idx: np.ndarray  # (d_i,) int64: the institution's columns in the union space
    view_sets: np.ndarray | None = None  # the institutions whose columns give views (computed once)


class FedMDH(Algorithm):
    """GFAM + GPD-CGAN + RKD; see the module docstring.

    Parameters
    ----------
    training:
        Local optimisation of ``h . phi`` (shared network size and budget).
    gfam, cgan, rkd:
        Switch each component on or off (ablation). ``gfam`` also takes a mapping's name
        (``"union"`` or ``"per-institution"``), shorthand for ``gfam=True, mapping=...``.
    mapping:
        GFAM's encoder: ``"union"`` (one shared encoder over the union feature space) or
        ``"per-institution"`` (a private encoder per institution over its own columns).
    holder_average:
        Union reading: average the first layer's weights of each column over its holders only.
    empty_views:
        Union reading: also view rows in the columns of institutions sharing none with this one
        (all-zero rows, which pull the prediction for "no information" toward the labels).
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
        GFAM: fixed-point iterations per round for the anchor, warm-started from the last anchor
        (30 in the first round). One (the default) tracks the barycenter as the latent statistics
        drift, at a third of the eigendecompositions of three; level with three on validation
        (docs/tuning.md).
    gan_steps, gan_lr, gan_weight_decay, gan_hidden:
        GPD-CGAN: discriminator/generator steps per round and their Adam settings, hidden width.
    max_grad_norm:
        Clip the gradient of ``h . phi`` to this L2 norm before every local step
        (``torch.nn.utils.clip_grad_norm_``; ``None`` or ``False``, i.e. ``max_grad_norm = false``
        under ``[algorithm.fedmdh]`` in a config file: no clipping). With SGD at lr 0.2 a small
        institution whose whole training set is one minibatch, or one with hundreds of columns,
        can start a round at the edge of stability: the first step enlarges the latent codes, the
        next gradients grow tenfold a step and the round ends in NaN. A bounded step cannot run
        away like that. ``fedmdh.defaults`` sets 2.0 (chosen on validation, docs/tuning.md).
    eval_average:
        ``beta`` of an exponential moving average over rounds of the shared ``phi`` and ``h``
        (:func:`track_average`, part of the aggregate, so every peer computes the same one): the
        model each institution evaluates, selects its round on and keeps. Local training always
        starts from the round's plain aggregate, so training is unchanged. ``0``: no average (the
        institutions keep the aggregate itself). With SGD at lr 0.2 consecutive aggregates scatter
        around a minimum; their average sits nearer it. Union reading only: the per-institution
        reading ignores it (a private encoder has no aggregates to average).
    """

    name = "fedmdh"
    # every shared network and statistic is a sum over institutions (see secure_contribution)
    secure_reveals = None

    Settings = FedMDHSettings
    #: settings an ablation fixes, whatever it is given
    FORCED: dict[str, Any] = {}

    def __init__(self, training: LocalTraining | None = None, settings: FedMDHSettings | None = None,
                 **hyperparameters: Any) -> None:
        if settings is not None and self.FORCED:
            settings = replace(settings, **self.FORCED)
        elif settings is None:
            hyperparameters.update(self.FORCED)
        super().__init__(training, settings, **hyperparameters)
        self._evaluator: Evaluator | None = None
        self._shared: tuple[Payload, Params] | None = None

    # -- construction ---------------------------------------------------------------------------
    @property
    def per_institution(self) -> bool:
        """Whether each institution has its own encoder over its own columns."""
        return self.mapping == "per-institution"

    def _net(self, d_in: int, seed: int) -> LatentRegressor:
        return seeded(seed, ("fedmdh", "net"), lambda: LatentRegressor(d_in, self.training.hidden))

    def _own_net(self, d_in: int, seed: int) -> LatentRegressor:
        # every private encoder of a width starts from the same weights (a common initialisation)
        return seeded(seed, ("fedmdh", "own-net", d_in), lambda: LatentRegressor(d_in, self.training.hidden))

    def _gan(self, k: int, seed: int) -> tuple[ConditionalGenerator, ConditionalDiscriminator]:
        return seeded(seed, ("fedmdh", "gan"), lambda: (
            ConditionalGenerator(k, k, self.gan_hidden), ConditionalDiscriminator(k, self.gan_hidden)))

    def init(self, spec: FederationSpec, seed: int) -> Payload:
        net = self._net(spec.n_features, seed)
        state: Payload = prefixed_state(net.h, "h") if self.per_institution else {
            **prefixed_state(net.phi, "phi"), **prefixed_state(net.h, "h")}
        k = net.latent_dim
        if self.holder_average and not self.per_institution:
            # which institution holds which column: public (the setup's layout)
            for nm in spec.names:
                held = np.zeros(spec.n_features)
                held[np.asarray(spec.feature_idx[nm])] = 1.0
                state[f"holders.{nm}"] = held
        if self.cgan:
            gen, disc = self._gan(k, seed)
            state.update(prefixed_state(gen, "G"))
            state.update(prefixed_state(disc, "D"))
        if self.gfam:
            # no anchor before the first round's statistics: alignment starts in round 2
            state["anchor_mean"] = np.zeros(k)
            state["anchor_cov"] = np.eye(k)
            state["anchor_ready"] = np.zeros(1)
        # the pooled label distribution in standardised units is N(0, 1) by construction
        state["pred_dist"] = np.array([0.0, 1.0])
        if self.eval_average > 0 and not self.per_institution:
            state["eval_average"] = np.array([self.eval_average])
        return state

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> FedMDHClient:
        own_idx = np.asarray(spec.feature_idx.get(data.name, data.feature_idx), dtype=np.int64)
        net = self._own_net(own_idx.size, seed) if self.per_institution else self._net(spec.n_features, seed)
        t = self.training
        opt = make_optimizer(net.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay)
        gen = disc = g_opt = d_opt = None
        if self.cgan:
            gen, disc = self._gan(net.latent_dim, seed)
            g_opt = torch.optim.Adam(gen.parameters(), lr=self.gan_lr, weight_decay=self.gan_weight_decay, foreach=True)
            d_opt = torch.optim.Adam(disc.parameters(), lr=self.gan_lr, weight_decay=self.gan_weight_decay, foreach=True)
        names = list(spec.names)
        masks = np.zeros((0 if self.per_institution else len(names), spec.n_features), dtype=np.float32)
        for j, nm in enumerate(names if not self.per_institution else ()):
            masks[j, spec.feature_idx[nm]] = 1.0
        own = names.index(data.name) if data.name in names else 0
        return FedMDHClient(net, opt, gen, disc, g_opt, d_opt, masks, own, own_idx)

    # -- local round ---------------------------------------------------------------------------
    def _view_sets(self, client: FedMDHClient) -> np.ndarray:
        """The institutions whose feature sets give this one's views (computed once per client).

        With ``empty_views`` off, only institutions that share a column with this one give views (a
        view in the columns of an institution with none in common is an all-zero row)."""
        if client.view_sets is None:
            mine = client.masks[client.own]
            client.view_sets = np.asarray([j for j in range(client.masks.shape[0]) if j != client.own and (
                self.empty_views or float(client.masks[j] @ mine) > 0)], dtype=np.int64)
        return client.view_sets

    def _viewing(self, client: FedMDHClient) -> bool:
        return self.gfam and self.mask_prob > 0.0 and client.masks.shape[0] >= 2 and self._view_sets(client).size > 0

    def _views(self, X: np.ndarray, client: FedMDHClient, rng: np.random.Generator) -> np.ndarray:
        """Re-express a fraction of rows in other institutions' feature sets (GFAM mapping)."""
        if not self._viewing(client):
            return X
        others = self._view_sets(client)
        pick = rng.random(X.shape[0]) < self.mask_prob
        which = rng.integers(0, others.size, size=X.shape[0])
        X = X.copy()
        if pick.any():
            X[pick] *= client.masks[others[which[pick]]]
        return X

    def _round_views(self, X: np.ndarray, batches: Sequence[np.ndarray], client: FedMDHClient,
                     rng: np.random.Generator) -> list[np.ndarray]:
        """:meth:`_views` of every minibatch of the round, in one pass: the draws are those of a
        call per minibatch in turn (the same stream), the rows are gathered and masked at once."""
        rows = X[np.concatenate(batches)]
        if self._viewing(client):
            others = self._view_sets(client)
            draws = [(rng.random(idx.size) < self.mask_prob, rng.integers(0, others.size, size=idx.size))
                     for idx in batches]
            pick = np.concatenate([p for p, _ in draws])
            which = np.concatenate([w for _, w in draws])
            if pick.any():
                rows[pick] *= client.masks[others[which[pick]]]
        out, at = [], 0
        for idx in batches:
            out.append(rows[at:at + idx.size])
            at += idx.size
        return out

    def client_update(
        self, server_state: Payload, client_state: FedMDHClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, FedMDHClient]:
        c = client_state
        net = c.net
        if not self.per_institution:
            load_state(net.phi, server_state, "phi")
        load_state(net.h, server_state, "h")
        X_in = np.ascontiguousarray(data.X[:, c.own_idx]) if self.per_institution else data.X
        c.optimizer.state.clear()
        k = net.latent_dim
        mu_g, var_g = (float(v) for v in server_state["pred_dist"])
        anchor_ready = self.gfam and float(server_state["anchor_ready"][0]) > 0
        if self.gfam:
            a_mean = np.asarray(server_state["anchor_mean"], np.float64)
            a_cov = np.asarray(server_state["anchor_cov"], np.float64)
            a_sqrt = _anchor_sqrt(a_cov)
            a_mean_t = torch.from_numpy(a_mean.astype(np.float32))
            a_sqrt_t = torch.from_numpy(a_sqrt.astype(np.float32))
            a_trace = float(np.trace(a_cov))
        else:
            a_mean, a_sqrt = np.zeros(k), np.eye(k)
        gan_ready = self.cgan and float(server_state.get("anchor_ready", np.ones(1))[0]) > 0
        if self.cgan:
            load_state(c.gen, server_state, "G")
            load_state(c.disc, server_state, "D")

        X = torch.from_numpy(X_in)
        y = torch.from_numpy(data.y)
        n, b = data.n_train, min(self.training.batch_size, data.n_train)
        steps = self.training.local_steps
        # the round's minibatches, drawn first: the shared model's predictions (RKD's soft labels)
        # are needed for those rows only
        batches = [rng.choice(n, size=b, replace=False) for _ in range(steps)]
        teacher = None
        if self.rkd and self.soft_weight > 0:
            rows = np.unique(np.concatenate(batches))
            # (``net`` has no layer that behaves differently in training and evaluation mode, so it
            # is never switched between them; the generator and discriminator, with BatchNorm, are)
            with torch.no_grad():
                teacher = torch.zeros(n)
                teacher[torch.from_numpy(rows)] = net(torch.from_numpy(np.ascontiguousarray(X_in[rows])))

        def cond_labels(size: int) -> np.ndarray:
            if self.rkd:  # global prediction distribution
                return rng.normal(mu_g, np.sqrt(max(var_g, 1e-12)), size=size)
            return data.y[rng.integers(0, n, size=size)].astype(np.float64)  # own labels only

        def anchor_noise(size: int) -> torch.Tensor:
            eps = rng.standard_normal((size, k))
            return torch.from_numpy((a_mean + eps @ a_sqrt).astype(np.float32))

        if gan_ready and self.gen_weight > 0:
            # the round's generated (latent, y~) pairs, drawn in one pass of the global generator
            y_gen_np = cond_labels(b * steps).astype(np.float32)
            set_training(c.gen, False)
            with torch.no_grad():
                z_gen = c.gen(anchor_noise(b * steps), torch.from_numpy(y_gen_np))
            y_gen = torch.from_numpy(y_gen_np)
        total = 0.0
        views = self._round_views(X_in, batches, c, rng)  # no other draw happens during the steps
        params = list(net.parameters())
        sgd_lr = plain_sgd_lr(c.optimizer)
        for step, idx in enumerate(batches):
            z = net.phi(torch.from_numpy(views[step]))
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
            for p in params:  # zero_grad(set_to_none=True)
                p.grad = None
            loss.backward()
            if self.max_grad_norm is not None:
                clip_grad_norm_(params, self.max_grad_norm)
            if sgd_lr is not None:
                sgd_step(params, sgd_lr)
            else:
                c.optimizer.step()

        payload: Payload = prefixed_state(net.h, "h") if self.per_institution else {
            **prefixed_state(net.phi, "phi"), **prefixed_state(net.h, "h")}
        with torch.no_grad():
            latent = net.phi(X)
            preds = net.h(latent).squeeze(-1)
        if self.cgan:
            self._train_gan(c, latent, y, cond_labels, anchor_noise, rng)
            payload.update(prefixed_state(c.gen, "G"))
            payload.update(prefixed_state(c.disc, "D"))
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
        set_training(c.gen, True)
        set_training(c.disc, True)
        # one step a round from cleared moments is Adam's first step: computed in closed form
        first = (c.gen, self.gan_lr, self.gan_weight_decay) if self.gan_steps == 1 else None
        for _ in range(self.gan_steps):
            idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
            real, y_real = latent[idx], y[idx]
            y_fake = torch.from_numpy(cond_labels(b).astype(np.float32))
            fake = c.gen(anchor_noise(b), y_fake)
            lsgan_step(c.disc, c.d_opt, c.g_opt, real, y_real, fake, y_fake, first_adam=first)
        # the moments are cleared at the start of every round: nothing of them is kept (or stored)
        c.g_opt.state.clear()
        c.d_opt.state.clear()

    # -- aggregation ----------------------------------------------------------------------------
    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        ups = ordered(updates)
        weights = [u.num_examples for u in ups]
        new: Payload = dict(server_state)
        keys = [k for k in ups[0].payload if k.startswith(_SHARED_PREFIXES)]
        new.update(weighted_average([({k: u.payload[k] for k in keys}, u.num_examples) for u in ups]))
        if self.holder_average and "phi.0.weight" in new:
            new["phi.0.weight"] = self._holder_average(server_state, ups)
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
        return track_average(server_state, new)

    @staticmethod
    def _holder_average(server_state: Payload, ups: Sequence[Update]) -> np.ndarray:
        """The first layer's weights, each input column averaged over the institutions holding it
        (sample-weighted, in institution order, float64); a column nobody holds keeps its weights."""
        ref = np.asarray(server_state["phi.0.weight"])
        acc = np.zeros(ref.shape, dtype=np.float64)
        total = np.zeros(ref.shape[1], dtype=np.float64)
        for u in ups:
            held = np.asarray(server_state[f"holders.{u.institution}"], dtype=np.float64)
            acc += np.asarray(u.payload["phi.0.weight"], dtype=np.float64) * (held * u.num_examples)
            total += held * u.num_examples
        out = np.where(total > 0, acc / np.maximum(total, 1e-300), np.asarray(ref, dtype=np.float64))
        return out.astype(ref.dtype)

    @staticmethod
    def _holders(update: Update, server_state: Payload | None) -> np.ndarray | None:
        """The institution's public holder mask when the first layer is holder-averaged, else None."""
        key = f"holders.{update.institution}"
        if server_state is None or key not in server_state or "phi.0.weight" not in update.payload:
            return None
        return np.asarray(server_state[key], dtype=np.float64)

    def secure_contribution(self, update: Update, server_state: Payload) -> np.ndarray:
        """What the payload's keys say it shares, as sums. In order: ``n_i w_i`` for every shared
        network entry (``phi.``, ``h.``, ``G.``, ``D.``, by key; holder-averaged: ``phi.0.weight``
        column ``j`` times ``n_i held_ij``, then ``n_i held_i``); the anchor's ``n_i m_i`` and
        covariance term ``n_i (r S_i r)^1/2`` with ``r = S^1/2`` of the public anchor ``S`` of the
        server state (the identity before the first round's: then the term is ``n_i S_i^1/2`` and the
        step gives ``(sum_i w_i S_i^1/2)^2``): one fixed-point step of the W2 barycenter from ``S``
        (:func:`~fedmdh.algorithms.gaussian.barycenter_term`); RKD's ``n_i mu_i`` and
        ``n_i (var_i + mu_i^2)``."""
        p, n = update.payload, float(update.num_examples)
        held = self._holders(update, server_state)
        parts = []
        for key in sorted(k for k in p if k.startswith(_SHARED_PREFIXES)):
            w = np.asarray(p[key], dtype=np.float64)
            parts.append((w * (held * n) if held is not None and key == "phi.0.weight" else w * n).ravel())
        if held is not None:
            parts.append(held * n)
        if "anchor_mean" in p:
            parts.append(np.asarray(p["anchor_mean"], dtype=np.float64) * n)
            cov = np.asarray(p["anchor_cov"], dtype=np.float64)
            parts.append(barycenter_term(server_state["anchor_cov"], cov).ravel() * n)
        if "pred_stats" in p:
            mu, var = (float(v) for v in np.asarray(p["pred_stats"], dtype=np.float64)[:2])
            parts.append(moment_sums(n, mu, var))
        return np.concatenate(parts)

    def aggregate_from_sum(self, server_state: Payload, template: Update, total: np.ndarray, count: float) -> Payload:
        """The next server state from the sum of :meth:`secure_contribution`: :meth:`aggregate` with one
        barycenter step a round."""
        p = template.payload
        new: Payload = dict(server_state)
        sums = SumReader(total, "FedMDH")
        held = self._holders(template, server_state)
        keys = sorted(k for k in p if k.startswith(_SHARED_PREFIXES))
        summed = {k: sums.take(int(np.size(p[k]))).reshape(np.shape(p[k])) for k in keys}
        for k in keys:
            new[k] = cast(summed[k] / count, np.asarray(p[k]).dtype)
        if held is not None:  # _holder_average: a column nobody holds keeps its weights
            weight = sums.take(held.size)
            ref = np.asarray(server_state["phi.0.weight"])
            mean = np.where(weight > 0, summed["phi.0.weight"] / np.maximum(weight, 1e-300), ref.astype(np.float64))
            new["phi.0.weight"] = mean.astype(ref.dtype)
        if "anchor_mean" in p:
            k = int(np.size(p["anchor_mean"]))
            new["anchor_mean"] = sums.take(k) / count
            term = sums.take(k * k).reshape(k, k) / count
            new["anchor_cov"] = barycenter_step(server_state["anchor_cov"], term)
            new["anchor_ready"] = np.ones(1)
        if "pred_stats" in p:
            new["pred_dist"] = moments_from_sums(sums.take(2), count)
        sums.done()
        return track_average(server_state, new)  # aggregate's last step

    def onchain_vectors(self, update: Update) -> dict[str, np.ndarray]:
        """Small vectors a ledger contract can aggregate itself: anchor mean and prediction moments."""
        out = {}
        if "anchor_mean" in update.payload:
            out["anchor_mean"] = np.asarray(update.payload["anchor_mean"], np.float64)
        if "pred_stats" in update.payload:
            out["pred_stats"] = np.asarray(update.payload["pred_stats"], np.float64)
        return out

    # -- private state ---------------------------------------------------------------------------
    def client_arrays(self, client_state: FedMDHClient) -> Payload:
        """What an institution keeps between rounds: its private encoder (per-institution reading),
        nothing otherwise. The shared networks are reloaded from the aggregate at the start of every
        round and the optimisers' state is cleared there, so storing them would change nothing; the
        masks and column indices follow from the setup (:meth:`init_client`)."""
        if not self.per_institution:
            return {}
        return prefixed_state(client_state.net.phi, "net.phi")

    def load_client(self, client_state: FedMDHClient, arrays: Mapping[str, np.ndarray]) -> FedMDHClient:
        if self.per_institution:
            missing = [k for k in client_state.net.phi.state_dict() if f"net.phi.{k}" not in arrays]
            if missing:
                raise ValueError(f"client state lacks net.phi.{missing[0]}.")
            load_state(client_state.net.phi, arrays, "net.phi")
        return client_state

    # -- prediction -----------------------------------------------------------------------------
    def personal_params(self, server_state: Payload, client_state: FedMDHClient) -> Params:
        if self.per_institution:
            # its own encoder (copied: it keeps training) over its own columns, the shared predictor
            return {**prefixed_state(client_state.net.phi, "phi"),
                    **{k: v for k, v in server_state.items() if k.startswith("h.")},
                    "input_idx": np.array(client_state.own_idx, dtype=np.int64)}
        # the institution's model: the shared encoder and predictor, fed its own columns; one dict
        # per aggregate (every institution's), so an evaluation loads it once
        if self._shared is None or self._shared[0] is not server_state:
            # with eval_average, the moving average (track_average's "avg." entries) is the model kept
            pre = "avg." if "avg.h.weight" in server_state else ""
            self._shared = (server_state, {k[len(pre):]: v for k, v in server_state.items()
                                           if k.startswith((f"{pre}phi.", f"{pre}h."))})
        return self._shared[1]

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        if self._evaluator is None:
            hidden = self.training.hidden
            self._evaluator = Evaluator(lambda d_in: LatentRegressor(d_in, hidden), "phi.0.weight")
        if "input_idx" in params:  # a private encoder over the institution's own columns
            X = np.ascontiguousarray(np.asarray(X)[:, np.asarray(params["input_idx"], dtype=np.int64)])
        return self._evaluator(params, X)


class FedMDHNoGFAM(FedMDH):
    """Ablation: FedMDH without GFAM (no cross-feature-set mapping, no anchor, no alignment)."""

    name = "fedmdh-no-gfam"

    FORCED = {"gfam": False}


class FedMDHNoCGAN(FedMDH):
    """Ablation: FedMDH without GPD-CGAN (no generator, no generated samples)."""

    name = "fedmdh-no-cgan"

    FORCED = {"cgan": False}


class FedMDHNoRKD(FedMDH):
    """Ablation: FedMDH without RKD (no prediction distribution, no distillation)."""

    name = "fedmdh-no-rkd"

    FORCED = {"rkd": False}
