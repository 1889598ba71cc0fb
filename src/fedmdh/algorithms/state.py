"""An institution's private state as plain arrays, and back, bit for bit.

A deployed node answers each message in a fresh process and must survive a restart, so whatever an
algorithm keeps between rounds (its networks, its optimisers' moments, FLIC's personal embedding,
FedKD's mentor, masks) has to live in a dict of named arrays that the node writes to its own
folder. The simulator makes the same round trip every round, so the two runtimes cannot drift.

Client states are dataclasses; each field is serialised by kind:

- a ``torch.nn.Module``: its ``state_dict`` (parameters and buffers), ``<field>.<key>``;
- a ``torch.optim.Optimizer``: its per-parameter state, ``<field>.state.<index>.<key>``
  (tensors as arrays; plain numbers as 0-d arrays under ``<field>.num.<index>.<key>``);
- a numpy array or a plain number: itself, ``<field>``;
- ``None``: nothing.

Loading goes into a freshly built state (``init_client``), which supplies the structure:
module shapes, optimiser hyperparameters, which fields exist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

Arrays = dict[str, np.ndarray]


def _tensor_array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def state_arrays(client: Any) -> Arrays:
    """Every field of the dataclass ``client`` as named arrays (see the module docstring)."""
    if not dataclasses.is_dataclass(client):
        raise TypeError(f"client state must be a dataclass, got {type(client).__name__}.")
    out: Arrays = {}
    for f in dataclasses.fields(client):
        value = getattr(client, f.name)
        if value is None:
            continue
        if isinstance(value, torch.nn.Module):
            for k, v in value.state_dict().items():
                out[f"{f.name}.{k}"] = _tensor_array(v)
        elif isinstance(value, torch.optim.Optimizer):
            for idx, entry in value.state_dict()["state"].items():
                for k, v in entry.items():
                    if isinstance(v, torch.Tensor):
                        out[f"{f.name}.state.{idx}.{k}"] = _tensor_array(v)
                    elif isinstance(v, (int, float, bool)):
                        out[f"{f.name}.num.{idx}.{k}"] = np.asarray(v)
        elif isinstance(value, np.ndarray):
            out[f.name] = value.copy()
        elif isinstance(value, (bool, int, float, np.integer, np.floating)):
            out[f.name] = np.asarray(value)
        else:
            raise TypeError(f"client state field {f.name!r} of type {type(value).__name__} cannot be serialised.")
    return out


def _load_optimizer(opt: torch.optim.Optimizer, name: str, arrays: Mapping[str, np.ndarray]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in arrays.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != name or parts[1] not in ("state", "num"):
            continue
        idx, k = int(parts[2]), parts[3]
        state.setdefault(idx, {})[k] = (torch.from_numpy(np.array(value)) if parts[1] == "state"
                                        else np.asarray(value).item())
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def load_state_arrays(client: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """``client`` (freshly built) with the arrays of :func:`state_arrays` loaded into it; returns it."""
    for f in dataclasses.fields(client):
        value = getattr(client, f.name)
        if value is None:
            continue
        if isinstance(value, torch.nn.Module):
            sd = value.state_dict()
            missing = [k for k in sd if f"{f.name}.{k}" not in arrays]
            if missing:
                raise ValueError(f"client state lacks {f.name}.{missing[0]}.")
            with torch.no_grad():
                for k, v in sd.items():
                    v.copy_(torch.from_numpy(np.array(arrays[f"{f.name}.{k}"])).to(v.dtype))
        elif isinstance(value, torch.optim.Optimizer):
            _load_optimizer(value, f.name, arrays)
        elif f.name in arrays:
            a = np.array(arrays[f.name])
            setattr(client, f.name, a if isinstance(value, np.ndarray) else type(value)(a.item()))
        else:
            raise ValueError(f"client state lacks {f.name}.")
    return client
