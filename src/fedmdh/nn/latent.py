"""The latent regressor ``h(phi(x))`` that FedMDH and FedGen share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedmdh.nn.mlp import dense_stack


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
