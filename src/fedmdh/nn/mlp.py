"""The regression network shared by the baselines, and conversion to and from plain arrays."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import nn

Params = dict[str, np.ndarray]
T = TypeVar("T")


def dense_stack(d_in: int, widths: Sequence[int], activation: Callable[[], nn.Module]) -> tuple[list[nn.Module], int]:
    """``[Linear(d_in, w0), act, Linear(w0, w1), act, ...]`` and the last width (``d_in`` if none)."""
    layers: list[nn.Module] = []
    prev = d_in
    for width in widths:
        layers += [nn.Linear(prev, width), activation()]
        prev = width
    return layers, prev


class MLP(nn.Module):
    """A fully connected regressor: ``d_in -> hidden... -> 1`` with ReLU activations."""

    def __init__(self, d_in: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        layers, prev = dense_stack(d_in, hidden, nn.ReLU)
        layers.append(nn.Linear(prev, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


#: torch's global generator is one per process: building seeded modules holds this lock, so that
#: several institutions served by threads of one process (tests, the task service) stay deterministic
SEEDED_INIT_LOCK = threading.RLock()


def seeded_build(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with torch's global generator seeded with ``seed``, then restored (under a lock)."""
    with SEEDED_INIT_LOCK:
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            return build()
        finally:
            torch.random.set_rng_state(state)


def make_mlp(d_in: int, hidden: Sequence[int], seed: int) -> MLP:
    """An MLP whose initial weights depend only on ``seed``."""
    return seeded_build(seed, lambda: MLP(d_in, hidden))


def get_params(model: nn.Module) -> Params:
    """A copy of the model's parameters as float32 numpy arrays, in state-dict order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_params(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Load plain arrays into the model (shapes must match)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(torch.from_numpy(np.asarray(params[k], dtype=np.float32)))


def prefixed_params(module: nn.Module, prefix: str) -> Params:
    """A copy of a sub-module's state as arrays named ``"<prefix>.<key>"`` (payload keys)."""
    return {f"{prefix}.{k}": v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_prefixed(module: nn.Module, params: Mapping[str, np.ndarray], prefix: str) -> None:
    """Load the arrays named ``"<prefix>.<key>"`` into a sub-module (dtypes follow the module)."""
    with torch.no_grad():
        for k, v in module.state_dict().items():
            v.copy_(torch.from_numpy(np.asarray(params[f"{prefix}.{k}"])).to(v.dtype))


def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Predictions of ``model`` on ``X`` as a float64 array."""
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).double().numpy()


class Evaluator:
    """An evaluation copy of a network for ``predict(params, X)``.

    Rebuilt when the input width changes; reloaded only when handed a different params dict (the
    same dict serves every institution when the model is shared, so a round loads it once).
    ``params`` keys are the network's state-dict keys.
    """

    def __init__(self, build: Callable[[int], nn.Module], input_key: str) -> None:
        self._build = build
        self._input_key = input_key
        self._model: nn.Module | None = None
        self._d_in = -1
        self._loaded: object = None

    def __call__(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        d_in = int(np.shape(params[self._input_key])[1])
        if self._model is None or d_in != self._d_in:
            self._model, self._d_in, self._loaded = self._build(d_in), d_in, None
        if params is not self._loaded:
            set_params(self._model, params)
            self._loaded = params
        self._model.eval()
        return predict(self._model, X)


def make_optimizer(
    params, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd`` or ``adam`` over ``params``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'.")


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: np.ndarray,
    y: np.ndarray,
    steps: int,
    batch_size: int,
    rng: np.random.Generator,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> float:
    """Run ``steps`` minibatch steps of MSE (+ ``extra_loss``) and return the mean data loss.

    Each batch is drawn without replacement from the rows by ``rng``, so the run is determined by
    the generator's state.
    """
    Xt = torch.from_numpy(X)
    yt = torch.from_numpy(y)
    n = X.shape[0]
    b = min(batch_size, n)
    total = 0.0
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(n, size=b, replace=False))
        pred = model(Xt[idx])
        loss = torch.mean((pred - yt[idx]) ** 2)
        total += float(loss.detach())
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return total / max(steps, 1)
