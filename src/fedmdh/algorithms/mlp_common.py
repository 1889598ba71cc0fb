"""Pieces shared by the algorithms whose model is one MLP over the union feature space."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmdh.algorithms.base import Algorithm, FederationSpec
from fedmdh.nn.mlp import MLP, Evaluator, make_mlp, make_optimizer
from fedmdh.seeding import derive_seed


@dataclass
class MLPClient:
    """An institution's private working state: its network and optimiser (never sent)."""

    model: MLP
    optimizer: torch.optim.Optimizer


class MLPAlgorithm(Algorithm):
    """Base for algorithms whose prediction model is ``MLP(n_features, hidden)``."""

    _evaluator: Evaluator | None = None

    def _new_model(self, spec: FederationSpec, seed: int, *purpose: Any) -> MLP:
        return make_mlp(spec.n_features, self.training.hidden, derive_seed(seed, "init", *purpose))

    def _new_optimizer(self, model: MLP) -> torch.optim.Optimizer:
        t = self.training
        return make_optimizer(model.parameters(), t.optimizer, t.lr, t.momentum, t.weight_decay)

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        if self._evaluator is None:
            hidden = self.training.hidden
            self._evaluator = Evaluator(lambda d_in: MLP(d_in, hidden), "net.0.weight")
        return self._evaluator(params, X)
