"""Local-only reference: each institution trains alone on its own rows and never communicates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmdh.algorithms.base import FederationSpec, Params, Payload, Update
from fedmdh.algorithms.mlp_common import MLPAlgorithm, MLPClient
from fedmdh.data.federation import InstitutionData
from fedmdh.nn.mlp import get_params, train_steps


class Local(MLPAlgorithm):
    """Each institution trains its own network; the optimiser state persists across rounds.

    The network has the same size as the federated ones and sees the union feature space, in
    which the institution's missing columns are always 0, so it is equivalent to a network over
    the institution's own columns.
    """

    name = "local"
    secure_reveals = "nothing, it never communicates, so there is nothing to protect"
    federated = False

    def init(self, spec: FederationSpec, seed: int) -> Payload:
        return {}

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> MLPClient:
        model = self._new_model(spec, seed, "local", data.name)
        return MLPClient(model, self._new_optimizer(model))

    def client_update(
        self, server_state: Payload, client_state: MLPClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, MLPClient]:
        loss = train_steps(
            client_state.model,
            client_state.optimizer,
            data.X,
            data.y,
            self.training.local_steps,
            self.training.batch_size,
            rng,
        )
        return Update(data.name, {}, data.n_train, {"loss": loss}), client_state

    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        return server_state

    def personal_params(self, server_state: Payload, client_state: MLPClient) -> Params:
        return get_params(client_state.model)
