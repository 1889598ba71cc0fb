"""Conditional GAN blocks over (vector, y) pairs and least-squares GAN losses.

Used by FedMDH's GPD-CGAN (latent samples conditioned on a target value) and by the baselines that
generate features (FedGAN, FedGen). Shapes follow the FedMDH reference code:
``G = Linear(k+1, h) - BatchNorm - ReLU - Linear(h, k)`` and
``D = Linear(k+1, h) - BatchNorm - LeakyReLU(0.2) - Linear(h, 1)``.
"""

from __future__ import annotations

import torch
from torch import nn


class ConditionalGenerator(nn.Module):
    """``G(z, y) -> R^k``: a noise vector and a scalar condition to a sample."""

    def __init__(self, noise_dim: int, out_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(noise_dim + 1, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, y.reshape(-1, 1)], dim=1))


class ConditionalDiscriminator(nn.Module):
    """``D(v, y) -> score``: how real a (sample, condition) pair looks."""

    def __init__(self, in_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim + 1, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )

    def forward(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([v, y.reshape(-1, 1)], dim=1)).squeeze(-1)


def lsgan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """``1/2 E[(D(real) - 1)^2] + 1/2 E[D(fake)^2]``."""
    return 0.5 * torch.mean((d_real - 1.0) ** 2) + 0.5 * torch.mean(d_fake**2)


def lsgan_g_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """``E[(D(G(z, y)) - 1)^2]``."""
    return torch.mean((d_fake - 1.0) ** 2)


def first_adam_step(params, lr: float, weight_decay: float = 0.0, eps: float = 1e-8) -> None:
    """Adam's first step from zero moments, in closed form: ``p -= lr * g / (|g| + eps)`` with
    ``g = grad + weight_decay * p`` (the bias corrections cancel the moments' factors exactly).

    What ``torch.optim.Adam`` does on a freshly cleared state, up to rounding, without its per-step
    machinery (a third of the cost of a GAN step on these small networks).
    """
    with torch.no_grad():
        ps = [p for p in params if p.grad is not None]
        if not ps:
            return
        grads = [p.grad for p in ps]
        # the same elementwise operations as a loop over the tensors, in a few calls (torch._foreach_*)
        if weight_decay:
            grads = torch._foreach_add(grads, ps, alpha=weight_decay)
        denom = torch._foreach_abs(grads)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, grads, denom, value=-lr)


def lsgan_step(
    disc: nn.Module,
    d_opt: torch.optim.Optimizer | None,
    g_opt: torch.optim.Optimizer | None,
    real: torch.Tensor,
    y_real: torch.Tensor,
    fake: torch.Tensor,
    y_fake: torch.Tensor,
    first_adam: tuple[nn.Module, float, float] | None = None,
) -> float:
    """One discriminator step then one generator step on a batch; ``fake`` is the generator's output.

    With ``first_adam = (generator, lr, weight_decay)`` both steps are :func:`first_adam_step`
    (the optimisers are not used). The discriminator's parameters take no gradient from the
    generator's loss. Returns the generator's loss.
    """
    d_loss = lsgan_d_loss(disc(real, y_real), disc(fake.detach(), y_fake))
    if first_adam is None:
        d_opt.zero_grad(set_to_none=True)
    else:
        for p in disc.parameters():
            p.grad = None
    d_loss.backward()
    if first_adam is None:
        d_opt.step()
    else:
        first_adam_step(disc.parameters(), first_adam[1], first_adam[2])
    disc.requires_grad_(False)
    try:
        g_loss = lsgan_g_loss(disc(fake, y_fake))
        if first_adam is None:
            g_opt.zero_grad(set_to_none=True)
        else:
            for p in first_adam[0].parameters():
                p.grad = None
        g_loss.backward()
    finally:
        disc.requires_grad_(True)
    if first_adam is None:
        g_opt.step()
    else:
        first_adam_step(first_adam[0].parameters(), first_adam[1], first_adam[2])
    return float(g_loss.detach())
