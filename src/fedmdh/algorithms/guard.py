"""The local guard: every institution also trains its own local model, and keeps the federated one
only where its own validation rows say it is worth it.

A federation is only worth joining if it does not make an institution worse than training alone.
:class:`LocalGuard` wraps a federated algorithm: each institution trains the wrapped algorithm's
round as before (the same update leaves it, bit for bit) and, beside it, the ``local`` reference on
its own rows, which never leaves it. What an institution keeps is chosen on its own validation
rows by :mod:`fedmdh.runtime.protocol` (:func:`~fedmdh.runtime.protocol.evaluate_round`): its best
round of the federated model, its best round of the local model, and the weight ``lam`` of
``lam * federated + (1 - lam) * local`` (``mode="choose"``: 0 or 1; ``mode="blend"``: a grid).

The reference is exactly the ``local`` algorithm: the same initial weights, optimiser and
minibatches (its generator is a copy of the institution's round generator, taken before the
wrapped algorithm draws from it), so an institution that keeps its local model has the ``local``
run's model bit for bit.

Parameter names: the current round's model is ``federated/<key>`` and ``local/<key>``; a kept model
adds ``blend`` (the 0-d weight ``lam``), and :meth:`LocalGuard.predict` evaluates the mixture.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmdh.algorithms.base import Algorithm, FederationSpec, Params, Payload, Update
from fedmdh.data.federation import InstitutionData

#: ``choose``: the federated or the local model; ``blend``: also their mixtures
GUARD_MODES = ("off", "choose", "blend")
BLEND_WEIGHTS = {"choose": (0.0, 1.0), "blend": (0.0, 0.25, 0.5, 0.75, 1.0)}
FEDERATED, LOCAL = "federated", "local"


@dataclass
class GuardClient:
    """The wrapped algorithm's private state and the local reference's."""

    inner: Any
    reference: Any


class LocalGuard(Algorithm):
    """``inner`` with a local reference model at every institution; see the module docstring.

    Parameters
    ----------
    inner:
        A federated algorithm (not a reference).
    reference:
        The ``local`` algorithm, with its own settings (its defaults: Adam, lr 1e-3).
    mode:
        ``"choose"`` or ``"blend"`` (see :data:`BLEND_WEIGHTS`).
    """

    def __init__(self, inner: Algorithm, reference: Algorithm, mode: str = "blend") -> None:
        if mode not in BLEND_WEIGHTS:
            raise ValueError(f"local guard mode must be one of {', '.join(BLEND_WEIGHTS)}, got {mode!r}.")
        if not inner.federated or inner.centralized:
            raise ValueError(f"{inner.name} is a reference; the local guard wraps federated algorithms.")
        super().__init__(inner.training)
        self.inner = inner
        self.reference = reference
        self.mode = mode

    # the wrapped algorithm's identity: the ledger, reports and saved models name it
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def __getattr__(self, attr: str) -> Any:
        # the wrapped algorithm's settings read through (``guarded.proximal_mu``)
        if attr in ("inner", "reference", "mode") or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    @property
    def weights(self) -> tuple[float, ...]:
        return BLEND_WEIGHTS[self.mode]

    def hyperparameters(self) -> dict[str, Any]:
        return {**self.inner.hyperparameters(), "local_guard": self.mode,
                "local_reference": self.reference.hyperparameters()}

    def init(self, spec: FederationSpec, seed: int) -> Payload:
        return self.inner.init(spec, seed)

    def init_client(self, spec: FederationSpec, data: InstitutionData, seed: int) -> GuardClient:
        return GuardClient(self.inner.init_client(spec, data, seed), self.reference.init_client(spec, data, seed))

    def client_update(
        self, server_state: Payload, client_state: GuardClient, data: InstitutionData, rng: np.random.Generator, rnd: int
    ) -> tuple[Update, GuardClient]:
        ref_rng = copy.deepcopy(rng)  # the round's stream as the local algorithm would get it
        update, client_state.inner = self.inner.client_update(server_state, client_state.inner, data, rng, rnd)
        _, client_state.reference = self.reference.client_update({}, client_state.reference, data, ref_rng, rnd)
        return update, client_state

    def aggregate(
        self, server_state: Payload, updates: Sequence[Update], rng: np.random.Generator, rnd: int
    ) -> Payload:
        return self.inner.aggregate(server_state, updates, rng, rnd)

    # what the wrapped algorithm sends, it sends as itself (class attributes are not read through)
    @property
    def secure_reveals(self) -> str | None:  # type: ignore[override]
        return self.inner.secure_reveals

    @property
    def dp_applies(self) -> bool:  # type: ignore[override]
        return self.inner.dp_applies

    def secure_contribution(self, update: Update, server_state: Payload) -> np.ndarray:
        return self.inner.secure_contribution(update, server_state)

    def aggregate_from_sum(self, server_state: Payload, template: Update, total: np.ndarray, count: float) -> Payload:
        return self.inner.aggregate_from_sum(server_state, template, total, count)

    def client_arrays(self, client_state: GuardClient) -> Payload:
        return {**{f"inner/{k}": v for k, v in self.inner.client_arrays(client_state.inner).items()},
                **{f"reference/{k}": v for k, v in self.reference.client_arrays(client_state.reference).items()}}

    def load_client(self, client_state: GuardClient, arrays: Mapping[str, np.ndarray]) -> GuardClient:
        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        client_state.inner = self.inner.load_client(client_state.inner, part("inner/"))
        client_state.reference = self.reference.load_client(client_state.reference, part("reference/"))
        return client_state

    def personal_params(self, server_state: Payload, client_state: GuardClient) -> Params:
        fed = self.inner.personal_params(server_state, client_state.inner)
        loc = self.reference.personal_params({}, client_state.reference)
        return {**{f"{FEDERATED}/{k}": v for k, v in fed.items()}, **{f"{LOCAL}/{k}": v for k, v in loc.items()}}

    def parts(self, params: Mapping[str, np.ndarray]) -> dict[str, tuple[Algorithm, Params]]:
        """``{"federated": (inner, its params), "local": (reference, its params)}``."""
        return {FEDERATED: (self.inner, split(params, FEDERATED)), LOCAL: (self.reference, split(params, LOCAL))}

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        lam = float(np.asarray(params["blend"])) if "blend" in params else 1.0
        out = np.zeros(np.shape(X)[0], dtype=np.float64)
        if lam > 0:
            out = self.inner.predict(split(params, FEDERATED), X)
            if lam < 1:
                out = lam * out
        if lam < 1:
            out = out + (1.0 - lam) * self.reference.predict(split(params, LOCAL), X)
        return out


def split(params: Mapping[str, np.ndarray], part: str) -> Params:
    """The arrays of one part (``federated`` or ``local``), without the prefix."""
    prefix = f"{part}/"
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def combine(federated: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray], lam: float) -> Params:
    """The kept model's arrays: both parts and the weight of the federated one."""
    return {**{f"{FEDERATED}/{k}": v for k, v in federated.items()}, **{f"{LOCAL}/{k}": v for k, v in local.items()},
            "blend": np.asarray(float(lam))}
