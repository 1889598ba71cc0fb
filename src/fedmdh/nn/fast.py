"""Fast torch helpers of the algorithms' local steps: the same bits as the torch calls they stand for, in fewer
calls (a round of FedMDH makes thousands of them; see ``benchmarks/fedmdh_speed.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn


def module_state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's state-dict entries (parameters and buffers themselves), listed once per module:
    loading and sending them every round then skips rebuilding the state dict."""
    hit = module.__dict__.get("_fedmdh_state")
    if hit is None:
        hit = list(module.state_dict(keep_vars=True).items())
        module.__dict__["_fedmdh_state"] = hit
    return hit


def prefixed_state(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """``fedmdh.nn.mlp.prefixed_params`` (the same arrays) from the cached entries."""
    return {f"{prefix}.{k}": v.detach().cpu().numpy().copy() for k, v in module_state(module)}


def load_state(module: nn.Module, params: Mapping[str, np.ndarray], prefix: str) -> None:
    """``fedmdh.nn.mlp.load_prefixed`` (the same copies) into the cached entries."""
    with torch.no_grad():
        for k, v in module_state(module):
            v.copy_(torch.from_numpy(np.asarray(params[f"{prefix}.{k}"])).to(v.dtype))


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (for finite gradients the same bits: the
    same total norm and factor; a factor of 1 multiplies nothing), in fewer calls."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)


def plain_sgd_lr(opt: torch.optim.Optimizer) -> float | None:
    """The learning rate of ``opt`` if it is plain SGD (one group; no momentum, weight decay,
    dampening, Nesterov or maximize), else ``None``. Its step is then ``p -= lr * grad``, which
    :func:`sgd_step` takes in one call (``torch.optim.SGD`` on CPU tensors loops over them with
    ``p.add_(grad, alpha=-lr)``: the same operation, the same bits)."""
    if type(opt) is not torch.optim.SGD or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if g["momentum"] or g["weight_decay"] or g["nesterov"] or g["maximize"] or g["dampening"]:
        return None
    lr = g["lr"]
    return float(lr) if isinstance(lr, (int, float)) else None


def sgd_step(params: Sequence[torch.Tensor], lr: float) -> None:
    with torch.no_grad():
        ps = [p for p in params if p.grad is not None]
        if ps:
            torch._foreach_add_(ps, [p.grad for p in ps], alpha=-lr)


def set_training(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)`` over its submodules listed once (no recursion a call), and only when
    the mode changes."""
    if module.training is mode:
        return
    mods = module.__dict__.get("_fedmdh_modules")
    if mods is None:
        mods = list(module.modules())
        module.__dict__["_fedmdh_modules"] = mods
    for m in mods:
        m.training = mode
