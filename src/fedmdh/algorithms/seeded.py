"""Seeded construction of torch modules and the masks of the institutions' feature sets.

Shared by the baselines that build several networks (FedGAN, FLIC, FedGen, FedKD): a module's
initial weights depend only on ``derive_seed(seed, *purpose)``; the global torch RNG is saved and
restored, so nothing else in the process is affected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from fedmdh.algorithms.base import FederationSpec
from fedmdh.nn.mlp import seeded_build
from fedmdh.seeding import derive_seed

T = TypeVar("T")


def seeded(seed: int, purpose: tuple[object, ...], build: Callable[[], T]) -> T:
    """``build()`` with torch's RNG seeded from ``(seed, *purpose)``; the global RNG is restored."""
    return seeded_build(derive_seed(seed, "init", *purpose), build)


def own_mask(spec: FederationSpec, name: str) -> np.ndarray:
    """``(n_features,)`` float32: 1 on the institution's own columns of the union space, 0 elsewhere."""
    mask = np.zeros(spec.n_features, dtype=np.float32)
    mask[np.asarray(spec.feature_idx[name])] = 1.0
    return mask

