"""FedKD (Wu, Wu, Lyu, Qi, Huang, Xie, Nat. Commun. 13:2032, 2022), adapted to regression.

FedKD gives every client two models: a large private *mentor* that never leaves it and a small
shared *mentee* that is federated. They learn from each other by *adaptive mutual distillation*:
each model's loss is its task loss plus distillation losses on the outputs and on the hidden
states toward the other model, both divided by the sum of the two task losses (distillation counts
more when both predict well, i.e. when the other model is worth imitating). Only the mentee's
updates are communicated, compressed by SVD: each update matrix keeps its top singular values
holding a fraction ``T`` of the squared singular-value energy, and the factors ``U, S, V`` are sent;
the server reconstructs, averages and sends the averaged update back compressed the same way.
The paper grows ``T`` linearly from ``T_start`` to ``T_end`` over training.

**Regression adaptation.** The output distillation is ``MSE(f_mentor(x), f_mentee(x))`` (the
paper's KL between soft labels), the hidden loss is the MSE between the two networks' hidden
activations (the paper's hidden-state and attention losses), the task loss is MSE, and the
adaptive weight is ``1 / (L_task_mentor + L_task_mentee)`` (detached). Each model's loss uses the
other model's outputs as fixed targets. The mentor and the mentee are both the benchmark's
``MLP(n_features, hidden)``: the shared size budget of the comparison (the paper's mentee is
smaller; the communication saving here comes from the SVD alone).

Prediction (``predict_with``): the mentor (default), FedKD's personalised model that combines the
institution's data with the federation's knowledge distilled from the mentee, or the mentee.

Sent each round: the SVD factors of the mentee's update for every weight matrix and the raw update
of every bias vector; ``metrics['bytes_sent']`` and ``Update.nbytes()`` give the uplink size, and
``metrics['bytes_full']`` the size of the uncompressed update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmdh.algorithms.base import FederationSpec, LocalTraining, Params, Payload, Update, coerce_settings, ordered
from fedmdh.nn.mlp import load_prefixed as _load, prefixed_params as _prefixed
from fedmdh.algorithms.mlp_common import MLPAlgorithm
from fedmdh.data.federation import InstitutionData
from fedmdh.nn.mlp import MLP


def svd_compress(matrix: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top singular triplets of ``matrix`` holding at least ``energy`` of ``sum s^2``.

    Returns ``(U, S, Vt)`` with ``U`` ``(m, k)``, ``S`` ``(k,)``, ``Vt`` ``(k, n)`` as float32, where
    ``k`` is the smallest rank whose ``sum_{j<k} s_j^2 / sum_j s_j^2 >= energy`` (at least 1).
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}.")
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    total = float(np.sum(s * s))
    if total <= 0.0:
        k = 1
    else:
        kept = np.cumsum(s * s) / total
        k = int(np.searchsorted(kept, energy - 1e-12)) + 1
        k = min(max(k, 1), s.size)
    return u[:, :k].astype(np.float32), s[:k].astype(np.float32), vt[:k].astype(np.float32)


def svd_reconstruct(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """``U diag(S) Vt`` in float64."""
    return (np.asarray(u, np.float64) * np.asarray(s, np.float64)) @ np.asarray(vt, np.float64)


def compress_update(delta: Params, energy: float) -> Payload:
    """Weight matrices as ``<key>.U/.S/.V`` SVD factors; vectors raw, under ``<key>``."""
    out: Payload = {}
    for k, v in delta.items():
        if np.ndim(v) == 2:
            out[f"{k}.U"], out[f"{k}.S"], out[f"{k}.V"] = svd_compress(v, energy)
        else:
            out[k] = np.asarray(v, np.float32)
    return out


def decompress_update(payload: Payload, keys: Sequence[str], shapes: Params) -> Params:
    """The inverse of :func:`compress_update` (float64) for the parameter names ``keys``."""
    out: Params = {}
    for k in keys:
        if len(np.shape(shapes[k])) == 2:
            out[k] = svd_reconstruct(payload[f"{k}.U"], payload[f"{k}.S"], payload[f"{k}.V"])
        else:
            out[k] = np.asarray(payload[k], np.float64)
    return out


def forward_hidden(model: MLP, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's prediction and its hidden activations (after every nonlinearity)."""
    hidden = []
    for layer in model.net:
        x = layer(x)
        if not isinstance(layer, nn.Linear):
            hidden.append(x)
    return x.squeeze(-1), hidden


@dataclass(frozen=True)
class FedKDSettings:
    """FedKD's own settings (see :class:`FedKD`)."""

    energy: float = 0.95
    energy_end: float | None = 0.98
    energy_rounds: int = 400
    distill_weight: float = 0.05
    max_distill_weight: float = 0.2
    hidden_loss: bool = True
    predict_with: str = "mentee"

    def __post_init__(self) -> None:
        for nm, v in (("energy", self.energy),
                      ("energy_end", self.energy if self.energy_end is None else self.energy_end)):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{nm} must be in (0, 1], got {v}.")
        if self.energy_rounds < 1:
            raise ValueError(f"energy_rounds must be >= 1, got {self.energy_rounds}.")
        if self.distill_weight < 0 or self.max_distill_weight <= 0:
            raise ValueError(f"distill_weight must be >= 0 and max_distill_weight > 0, got {self.distill_weight}, "
                             f"{self.max_distill_weight}.")
        if self.predict_with not in ("mentor", "mentee"):
            raise ValueError(f"predict_with must be 'mentor' or 'mentee', got {self.predict_with!r}.")
        coerce_settings(self)


@dataclass
class FedKDClient:
    """An institution's private mentor, its working copy of the mentee, and their optimisers."""

    mentor: MLP
    mentee: MLP
    optimizer: torch.optim.Optimizer  # over both networks


class FedKD(MLPAlgorithm):
    """Private mentor + shared SVD-compressed mentee with adaptive mutual distillation.

    Parameters
    ----------
    training:
        Local optimisation of mentor and mentee (shared network size and budget).
    energy:
        SVD energy threshold ``T`` (``T_start``): fraction of ``sum s^2`` kept per update matrix.
    energy_end:
        ``T_end``: the threshold grows linearly from ``energy`` to ``energy_end`` over
        ``energy_rounds`` rounds; ``None`` keeps it constant.
    energy_rounds:
        Rounds over which the threshold grows.
    distill_weight:
        Multiplier of the adaptive distillation terms (1 in the paper).
    hidden_loss:
        Include the hidden-state MSE between mentor and mentee.
    predict_with:
        ``"mentor"`` or ``"mentee"``: the model an institution predicts with.
    """

    name = "fedkd"
    secure_reveals = "each institution's SVD factors of its update (an SVD needs the individual matrix)"

    Settings = FedKDSettings

    def __init__(self, training: LocalTraining | None = None, settings: FedKDSettings | None = None,
                 **hyperparameters: Any) -> None:
        super().__init__(training, settings, **hyperparameters)
        self._personal: tuple[Payload, Params] | None = None

    def energy_at(self, round_index: int) -> float:
        """The threshold ``T`` in (0-based) round ``round_index``."""
        if self.energy_end is None:
            return self.energy
        frac = min(max(round_index, 0) / self.energy_rounds, 1.0)
        return self.energy + (self.energy_end - self.energy) * frac

    def adaptive_weight(self, task_mentor: float, task_mentee: float) -> float:
        """``distill_weight / (L_mentor + L_mentee)``, capped at ``max_distill_weight``."""
        return min(self.distill_weight / max(task_mentor + task_mentee, 1e-12), self.max_distill_weight)

    # -- construction ---------------------------------------------------------------------------
    def init(self, spec: FederationSpec, seed: int) -> Payload:
        state: Payload = _prefixed(self._new_model(spec, seed, "fedkd", "mentee"), "mentee")
        return state

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> FedKDClient:
        mentor = self._new_model(spec, seed, "fedkd", "mentor", data.name)
        mentee = self._new_model(spec, seed, "fedkd", "mentee")
        params = list(mentor.parameters()) + list(mentee.parameters())
        return FedKDClient(mentor, mentee, self._new_optimizer_over(params))

    def _new_optimizer_over(self, params) -> torch.optim.Optimizer:
        from fedmdh.nn.mlp import make_optimizer

        t = self.training
        return make_optimizer(params, t.optimizer, t.lr, t.momentum, t.weight_decay)

    # -- local round ---------------------------------------------------------------------------
    def client_update(
        self, server_state: Payload, client_state: FedKDClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, FedKDClient]:
        c = client_state
        _load(c.mentee, server_state, "mentee")
        c.optimizer.state.clear()
        start = {k: v.detach().double().numpy().copy() for k, v in c.mentee.state_dict().items()}
        X, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
        n, steps = data.n_train, self.training.local_steps
        b = min(self.training.batch_size, n)
        c.mentor.train()
        c.mentee.train()
        total = 0.0
        for _ in range(steps):
            idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
            xb, yb = X[idx], y[idx]
            p_t, h_t = forward_hidden(c.mentor, xb)
            p_s, h_s = forward_hidden(c.mentee, xb)
            task_t = torch.mean((p_t - yb) ** 2)
            task_s = torch.mean((p_s - yb) ** 2)
            total += float(task_s.detach())
            loss = task_t + task_s
            if self.distill_weight > 0:
                w = self.adaptive_weight(float(task_t.detach()), float(task_s.detach()))
                # each model imitates the other's (fixed) outputs and hidden states
                d = torch.mean((p_t - p_s.detach()) ** 2) + torch.mean((p_s - p_t.detach()) ** 2)
                if self.hidden_loss:
                    for a, s in zip(h_t, h_s):
                        d = d + torch.mean((a - s.detach()) ** 2) + torch.mean((s - a.detach()) ** 2)
                loss = loss + w * d
            c.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            c.optimizer.step()
        delta = {k: v.detach().double().numpy() - start[k] for k, v in c.mentee.state_dict().items()}
        payload = compress_update(delta, self.energy_at(rnd - 1))
        sent = int(sum(a.nbytes for a in payload.values()))
        full = int(sum(np.asarray(v, np.float32).nbytes for v in delta.values()))
        metrics = {"loss": total / steps, "bytes_sent": float(sent), "bytes_full": float(full)}
        return Update(data.name, payload, n, metrics), c

    # -- aggregation ----------------------------------------------------------------------------
    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        ups = ordered(updates)
        keys = [k[len("mentee."):] for k in server_state if k.startswith("mentee.")]
        shapes = {k: server_state[f"mentee.{k}"] for k in keys}
        total = float(sum(u.num_examples for u in ups))
        avg = {k: np.zeros(np.shape(shapes[k]), np.float64) for k in keys}
        for u in ups:
            rec = decompress_update(u.payload, keys, shapes)
            for k in keys:
                avg[k] += rec[k] * (u.num_examples / total)
        # the averaged update goes back compressed the same way (downlink)
        down = decompress_update(compress_update(avg, self.energy_at(rnd - 1)), keys, shapes)
        new: Payload = dict(server_state)
        for k in keys:
            ref = np.asarray(server_state[f"mentee.{k}"])
            new[f"mentee.{k}"] = (ref.astype(np.float64) + down[k]).astype(ref.dtype)
        return new

    # -- prediction -----------------------------------------------------------------------------
    def personal_params(self, server_state: Payload, client_state: FedKDClient) -> Params:
        if self.predict_with == "mentor":
            return {k: v.detach().numpy().copy() for k, v in client_state.mentor.state_dict().items()}
        if self._personal is None or self._personal[0] is not server_state:
            mentee = {k[len("mentee."):]: v for k, v in server_state.items() if k.startswith("mentee.")}
            self._personal = (server_state, mentee)
        return self._personal[1]
