"""The framework-neutral interface every algorithm implements.

An algorithm is a handful of functions over plain arrays, with no transport, files or global RNG:

- ``init(spec, seed) -> server_state``: the first global payload (a dict of arrays).
- ``init_client(spec, data, seed) -> client_state``: what an institution keeps to itself.
- ``client_update(server_state, client_state, data, rng, rnd) -> (Update, client_state)``: local
  training in round ``rnd`` (1-based) with the institution's own generator; the :class:`Update`
  is everything that leaves the institution this round.
- ``aggregate(server_state, updates, rng, rnd) -> server_state``: deterministic: updates are
  ordered by institution name and summed in float64, and any randomness comes from ``rng``, which
  every peer derives from the task's seed and the round; so any peer (another institution, a
  verifier replaying a ledger) recomputes the same bits. The server state holds only what every
  party may see: schedules (FedKD's threshold, FedGAN's warm-up) follow from ``rnd``, not from
  counters carried in the state.
- ``client_arrays(client_state) -> dict of arrays`` and ``load_client(client_state, arrays)``:
  an institution's private state as plain arrays and back, bit-exactly (a deployed node keeps it
  in its own folder between messages; the simulator goes through the same round trip).
- ``personal_params(server_state, client_state) -> Params``: the model institution ``i`` predicts
  with, as plain arrays; ``predict(params, X)`` evaluates it.

The in-process simulator, a distributed engine and a ledger verifier all drive these functions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from fedmdh.data.federation import FederationSetup, InstitutionData, PreparedFederation

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

    @classmethod
    def from_setup(cls, setup: "FederationSetup") -> "FederationSpec":
        """The same spec from what a federated setup phase fixed (a deployed node builds it so)."""
        return cls(
            names=tuple(setup.names),
            n_features=len(setup.features),
            feature_idx={n: setup.feature_idx(n) for n in setup.names},
            n_train=dict(setup.n_train),
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


_CASTS: dict[str, Callable[[Any], Any]] = {"float": float, "int": int, "bool": bool, "str": str}


def coerce_settings(settings: Any) -> None:
    """Cast every field of a frozen settings dataclass to its annotated type (``float``, ``int``, ``bool``,
    ``str``, each optionally ``| None``, which keeps a ``None``); call it last in ``__post_init__``."""
    for f in fields(settings):
        kinds = [t.strip() for t in str(f.type).split("|")]
        value = getattr(settings, f.name)
        if value is None and "None" in kinds:
            continue
        cast = _CASTS.get(kinds[0]) if len([k for k in kinds if k != "None"]) == 1 else None
        if cast is not None:
            object.__setattr__(settings, f.name, cast(value))


@dataclass(frozen=True)
class NoSettings:
    """The settings of an algorithm that has none of its own."""


class Algorithm(ABC):
    """Base class: subclasses set ``name`` and implement the pure functions described above."""

    name: ClassVar[str] = ""
    #: ``False`` for references that do not communicate (local-only).
    federated: ClassVar[bool] = True
    #: ``True`` for the pooled reference: the simulator trains it on all rows in one place.
    centralized: ClassVar[bool] = False
    #: Under ``--secure``: what the aggregator would still see in the clear, or ``None`` where the
    #: aggregate is a function of sums over institutions (:meth:`secure_contribution` and
    #: :meth:`aggregate_from_sum` are implemented; :mod:`fedmdh.algorithms.sums`).
    secure_reveals: ClassVar[str | None] = "its individual updates"
    #: Its released sums are sample-weighted parameters ``n_i w_i`` only, so differential privacy on
    #: them (:mod:`fedmdh.secure.dp`: each change clipped, Gaussian noise added) bounds what they reveal.
    dp_applies: ClassVar[bool] = False

    #: The algorithm's own hyperparameters: a frozen dataclass that validates them once, at construction
    #: (its ``__post_init__``); :meth:`hyperparameters` reads them back for logs and the task manifest.
    Settings: ClassVar[type] = NoSettings

    def __init__(self, training: LocalTraining | None = None, settings: Any = None, **hyperparameters: Any) -> None:
        self.training = training or LocalTraining()
        if settings is not None and hyperparameters:
            raise TypeError("give the settings or hyperparameters by keyword, not both")
        self.settings = settings if settings is not None else type(self).Settings(**hyperparameters)
        if not isinstance(self.settings, type(self).Settings):
            raise TypeError(f"{self.name}'s settings are a {type(self).Settings.__name__}, "
                            f"got {type(self.settings).__name__}")

    def __getattr__(self, attr: str) -> Any:
        # the settings read as attributes (``algo.proximal_mu``); only called when normal lookup fails
        settings = self.__dict__.get("settings")
        if settings is not None and attr in {f.name for f in fields(settings)}:
            return getattr(settings, attr)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that define this run (recorded in config files and logs): the local training's,
        then the algorithm's own."""
        d = asdict(self.training)
        d["hidden"] = list(d["hidden"])
        d.update(asdict(self.settings))
        return d

    @abstractmethod
    def init(self, spec: FederationSpec, seed: int) -> Payload: ...

    @abstractmethod
    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> Any: ...

    @abstractmethod
    def client_update(
        self, server_state: Payload, client_state: Any, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, Any]: ...

    @abstractmethod
    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload: ...

    def client_arrays(self, client_state: Any) -> Payload:
        """The institution's private state as named arrays (see :mod:`fedmdh.algorithms.state`)."""
        from fedmdh.algorithms.state import state_arrays

        return state_arrays(client_state)

    def load_client(self, client_state: Any, arrays: Mapping[str, np.ndarray]) -> Any:
        """``client_state`` (a fresh ``init_client``) with every array of :meth:`client_arrays` loaded."""
        from fedmdh.algorithms.state import load_state_arrays

        return load_state_arrays(client_state, arrays)

    def secure_contribution(self, update: Update, server_state: Payload) -> np.ndarray:
        """The float64 vector institution ``update.institution`` contributes to the round's sum (its
        own computation: in a deployment, on its node); ``server_state``: the round's start, which
        every institution holds. Only where :attr:`secure_reveals` is ``None``."""
        raise NotImplementedError(f"{self.name} has no aggregate from sums: it would reveal {self.secure_reveals}.")

    def aggregate_from_sum(self, server_state: Payload, template: Update, total: np.ndarray, count: float) -> Payload:
        """The next server state from ``total``, the sum of every institution's
        :meth:`secure_contribution`, and the public ``count = sum_i n_i``; ``template``: any one update
        of the round (its layout only). Equal to :meth:`aggregate` up to the sum's rounding."""
        raise NotImplementedError(f"{self.name} has no aggregate from sums: it would reveal {self.secure_reveals}.")

    @abstractmethod
    def personal_params(self, server_state: Payload, client_state: Any) -> Params: ...

    @abstractmethod
    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray: ...
