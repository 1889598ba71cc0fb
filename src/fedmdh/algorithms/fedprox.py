"""FedProx (Li et al., MLSys 2020): FedAvg plus the proximal term ``mu/2 ||w - w_global||^2``.

Not a copy of FedAvg: it *is* :class:`~fedmdh.algorithms.fedavg.FedAvg` with ``proximal_mu > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmdh.algorithms.fedavg import FedAvg, FedAvgSettings

DEFAULT_MU = 0.01


@dataclass(frozen=True)
class FedProxSettings(FedAvgSettings):
    """FedAvg's settings with ``proximal_mu > 0`` (0 would be FedAvg)."""

    proximal_mu: float = DEFAULT_MU

    def __post_init__(self) -> None:
        if not self.proximal_mu > 0:
            raise ValueError(f"FedProx needs proximal_mu > 0 (0 is FedAvg), got {self.proximal_mu}.")
        super().__post_init__()


class FedProx(FedAvg):
    """FedAvg with the proximal term; ``mu`` defaults to 0.01."""

    name = "fedprox"
    Settings = FedProxSettings
