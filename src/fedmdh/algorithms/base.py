"""The framework-neutral interface every algorithm implements.

An algorithm is a handful of functions over plain arrays, with no transport, files or global RNG:

- ``init(spec, seed) -> server_state``: the first global payload (a dict of arrays).
- ``init_client(spec, data, seed) -> client_state``: what an institution keeps to itself.
- ``client_update(server_state, client_state, data, rng) -> (Update, client_state)``: local
  training; the :class:`Update` is everything that leaves the institution this round.
- ``aggregate(server_state, updates) -> server_state``: deterministic: updates are ordered by
  institution name and summed in float64, so any peer (another institution, a verifier replaying
  a ledger) recomputes the same bits.
- ``personal_params(server_state, client_state) -> Params``: the model institution ``i`` predicts
  with, as plain arrays; ``predict(params, X)`` evaluates it.

The in-process simulator, a distributed engine and a ledger verifier all drive these functions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedmdh.data.federation import InstitutionData, PreparedFederation

Params = dict[str, np.ndarray]
Payload = dict[str, np.ndarray]


@dataclass(frozen=True)
class FederationSpec:
    """What every party may know about the federation: names, sizes, the union feature space."""

    names: tuple[str, ...]
    n_features: int
    feature_idx: Mapping[str, np.ndarray]
    n_train: Mapping[str, int]

    @classmethod
    def from_federation(cls, fed: PreparedFederation) -> "FederationSpec":
        return cls(
            names=fed.names,
            n_features=fed.n_features,
            feature_idx={d.name: d.feature_idx for d in fed.institutions},
            n_train={d.name: d.n_train for d in fed.institutions},
        )


@dataclass(frozen=True)
class Update:
    """What one institution sends after a round: arrays, its sample count and scalar metrics."""

    institution: str
    payload: Payload
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def nbytes(self) -> int:
        return int(sum(np.asarray(v).nbytes for v in self.payload.values()))


@dataclass(frozen=True)
class LocalTraining:
    """Local optimisation settings shared by the gradient-based algorithms.

    Attributes
    ----------
    hidden:
        Hidden layer widths of the regression network (the same for every algorithm).
    optimizer:
        ``"sgd"`` or ``"adam"``.
    lr, momentum, weight_decay:
        Optimiser settings.
    local_steps:
        Minibatch steps per institution per round (the communication budget is
        ``rounds x local_steps``).
    batch_size:
        Rows per minibatch.
    """

    hidden: tuple[int, ...] = (64, 64)
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    local_steps: int = 5
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}.")
        if self.lr <= 0 or self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("lr must be > 0, local_steps and batch_size >= 1.")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {self.hidden}.")


def weighted_average(results: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> Params:
    """Sample-weighted mean of parameter dicts, summed in float64 in the order given.

    ``results`` is a sequence of ``(params, weight)``; the caller fixes the order (by institution)
    so that the sum is reproducible bit for bit. The result has the dtype of the first input.
    """
    if not results:
        raise ValueError("weighted_average needs at least one result.")
    total = float(sum(w for _, w in results))
    if total <= 0:
        raise ValueError("weights must sum to a positive number.")
    first = results[0][0]
    out: Params = {}
    for key, ref in first.items():
        acc = np.zeros(np.shape(ref), dtype=np.float64)
        for params, w in results:
            acc += np.asarray(params[key], dtype=np.float64) * (float(w) / total)
        out[key] = acc.astype(np.asarray(ref).dtype)
    return out


def ordered(updates: Sequence[Update]) -> list[Update]:
    """Updates sorted by institution name: the one order every peer uses."""
    names = [u.institution for u in updates]
    if len(set(names)) != len(names):
        raise ValueError(f"more than one update from the same institution: {names}.")
    return sorted(updates, key=lambda u: u.institution)


class Algorithm(ABC):
    """Base class: subclasses set ``name`` and implement the pure functions described above."""

    name: ClassVar[str] = ""
    #: ``False`` for references that do not communicate (local-only).
    federated: ClassVar[bool] = True
    #: ``True`` for the pooled reference: the simulator trains it on all rows in one place.
    centralized: ClassVar[bool] = False

    def __init__(self, training: LocalTraining | None = None) -> None:
        self.training = training or LocalTraining()

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that define this run (recorded in config files and logs)."""
        from dataclasses import asdict

        d = asdict(self.training)
        d["hidden"] = list(d["hidden"])
        return d

    @abstractmethod
    def init(self, spec: FederationSpec, seed: int) -> Payload: ...

    @abstractmethod
    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> Any: ...

    @abstractmethod
    def client_update(
        self, server_state: Payload, client_state: Any, data: InstitutionData, rng: np.random.Generator
    ) -> tuple[Update, Any]: ...

    @abstractmethod
    def aggregate(self, server_state: Payload, updates: Sequence[Update]) -> Payload: ...

    @abstractmethod
    def personal_params(self, server_state: Payload, client_state: Any) -> Params: ...

    @abstractmethod
    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray: ...
