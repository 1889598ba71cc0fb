"""FedAvg (McMahan et al., AISTATS 2017) over the union feature space, with FedProx's term.

Every institution trains the global network for ``local_steps`` minibatch steps from the current
global weights; the new global weights are the sample-weighted mean of the institutions' weights.
Features an institution lacks are 0 after pooled standardisation (the pooled mean), so all
institutions share one input layer over the union of the feature names.

``proximal_mu > 0`` adds FedProx's proximal term ``mu/2 ||w - w_global||^2`` to the local loss
(Li et al., MLSys 2020); ``proximal_mu = 0`` is plain FedAvg. :mod:`fedmdh.algorithms.fedprox`
is exactly that.
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
from fedmdh.algorithms.mlp_common import MLPAlgorithm, MLPClient
from fedmdh.algorithms.sums import contribution, mean_from_sum
from fedmdh.data.federation import InstitutionData
from fedmdh.nn.mlp import get_params, set_params, train_steps


def proximal_term(model: torch.nn.Module, anchor: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """``mu/2 * sum ||w - w_anchor||^2`` over the model's parameters."""
    total = torch.zeros(())
    for w, w0 in zip(model.parameters(), anchor, strict=True):
        total = total + torch.sum((w - w0) ** 2)
    return 0.5 * mu * total


@dataclass(frozen=True)
class FedAvgSettings:
    """``proximal_mu``: weight of the proximal term; 0 is FedAvg."""

    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}.")
        coerce_settings(self)


class FedAvg(MLPAlgorithm):
    """Sample-weighted parameter averaging; optional proximal term (FedProx).

    Parameters
    ----------
    training:
        Local optimisation settings. Every round starts from the global weights with empty
        optimiser state (no momentum or Adam moments carry over between rounds).
    proximal_mu:
        Weight of the proximal term; 0 is FedAvg (:class:`FedAvgSettings`).
    """

    name = "fedavg"
    secure_reveals = None  # the new weights are sum_i n_i w_i / sum_i n_i; the counts are public
    dp_applies = True
    Settings = FedAvgSettings

    def init(self, spec: FederationSpec, seed: int) -> Payload:
        return get_params(self._new_model(spec, seed, "global"))

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> MLPClient:
        model = self._new_model(spec, seed, "global")
        return MLPClient(model, self._new_optimizer(model))

    def client_update(
        self, server_state: Payload, client_state: MLPClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, MLPClient]:
        model, optimizer = client_state.model, client_state.optimizer
        set_params(model, server_state)
        optimizer.state.clear()  # every round starts from fresh optimiser state, like a new optimiser
        extra = None
        if self.proximal_mu > 0:
            anchor = [p.detach().clone() for p in model.parameters()]
            mu = self.proximal_mu

            def extra(m: torch.nn.Module) -> torch.Tensor:
                return proximal_term(m, anchor, mu)

        loss = train_steps(
            model, optimizer, data.X, data.y, self.training.local_steps, self.training.batch_size, rng, extra
        )
        return Update(data.name, get_params(model), data.n_train, {"loss": loss}), client_state

    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        ups = ordered(updates)
        return weighted_average([(u.payload, u.num_examples) for u in ups])

    def secure_contribution(self, update: Update, server_state: Payload) -> np.ndarray:
        return contribution(update)

    def aggregate_from_sum(self, server_state: Payload, template: Update, total: np.ndarray, count: float) -> Payload:
        return mean_from_sum(template.payload, total, count)

    def personal_params(self, server_state: Payload, client_state: MLPClient) -> Params:
        # the global weights themselves: states are never mutated in place, so no copy is needed
        return server_state
