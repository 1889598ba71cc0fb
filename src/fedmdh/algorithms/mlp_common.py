"""Pieces shared by the algorithms whose model is one MLP over the union feature space."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmdh.algorithms.base import Algorithm, FederationSpec
from fedmdh.nn.mlp import MLP, make_mlp, make_optimizer, predict, set_params
from fedmdh.seeding import derive_seed


@dataclass
class MLPClient:
    """An institution's private working state: its network and optimiser (never sent)."""

    model: MLP
    optimizer: torch.optim.Optimizer


class MLPAlgorithm(Algorithm):
    """Base for algorithms whose prediction model is ``MLP(n_features, hidden)``."""

    _eval_model: MLP | None = None
    _eval_loaded: object = None  # the params object last loaded into the evaluation model

    def _new_model(self, spec: FederationSpec, seed: int, *purpose: Any) -> MLP:
        return make_mlp(spec.n_features, self.training.hidden, derive_seed(seed, "init", *purpose))

    def _new_optimizer(self, model: MLP) -> torch.optim.Optimizer:
        t = self.training
        return make_optimizer(model.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay)

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        first = next(iter(params.values()))
        d_in = int(np.shape(first)[1])
        if self._eval_model is None or self._eval_model.net[0].in_features != d_in:
            self._eval_model = MLP(d_in, self.training.hidden)
            self._eval_loaded = None
        if params is not self._eval_loaded:  # the same dict for every institution under FedAvg
            set_params(self._eval_model, params)
            self._eval_loaded = params
        self._eval_model.eval()
        return predict(self._eval_model, X)
