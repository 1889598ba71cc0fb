"""FedProx (Li et al., MLSys 2020): FedAvg plus the proximal term ``mu/2 ||w - w_global||^2``.

Not a copy of FedAvg: it *is* :class:`~fedmdh.algorithms.fedavg.FedAvg` with ``proximal_mu > 0``.
"""

from __future__ import annotations

from fedmdh.algorithms.base import LocalTraining
from fedmdh.algorithms.fedavg import FedAvg

DEFAULT_MU = 0.01


class FedProx(FedAvg):
    """FedAvg with the proximal term; ``mu`` defaults to 0.01."""

    name = "fedprox"

    def __init__(self, training: LocalTraining | None = None, proximal_mu: float = DEFAULT_MU) -> None:
        if proximal_mu <= 0:
            raise ValueError(f"FedProx needs proximal_mu > 0 (0 is FedAvg), got {proximal_mu}.")
        super().__init__(training, proximal_mu=proximal_mu)
