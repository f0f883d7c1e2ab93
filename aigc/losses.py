"""Adversarial losses and D's regularisers (stylegan2-ada's ``training/loss.py`` role).

Losses are functions of D's logits; penalties are functions of a callable ``D`` and its inputs,
so a conditional discriminator passes ``lambda x: D(x, y)``. Nothing here knows about optimisers
or where scalars are logged: the loop reports what these return.

Sign convention: every function returns a quantity to *minimise*. D's losses average each side
over its own rows and count an empty side as 0 (a DP run's Poisson batch of reals can be empty).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Critic = Callable[[torch.Tensor], torch.Tensor]


def _mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x``; 0 (with a zero gradient) when ``x`` is empty."""
    return x.sum() / max(x.numel(), 1)


# --- non-saturating BCE (Goodfellow et al. 2014; the DCGAN paper) ---------------------------------

def d_loss_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator: maximise log D(x) + log(1 - D(G(z))), as BCE-with-logits on 1s and 0s."""
    return (_mean(F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits), reduction="none"))
            + _mean(F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="none")))


def g_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator: maximise log D(G(z)) (Goodfellow et al.'s non-saturating form), not
    minimise log(1 - D(G(z))), whose gradient vanishes while D easily wins early on."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# --- hinge (Lim & Ye 2017; SAGAN, BigGAN) ---------------------------------------------------------

def d_loss_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator: mean relu(1 - D(x)) + mean relu(1 + D(G(z))): no gradient from samples
    already on the right side of the margin."""
    return _mean(F.relu(1.0 - real_logits)) + _mean(F.relu(1.0 + fake_logits))


def g_loss_hinge(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator: -mean D(G(z)) (the hinge GAN's generator loss, as in SAGAN/BigGAN)."""
    return -fake_logits.mean()


# --- Wasserstein (Arjovsky et al. 2017); needs a Lipschitz D: the gradient penalty -----------------

def d_loss_wasserstein(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Critic: mean D(G(z)) - mean D(x), minus the estimated Wasserstein-1 distance."""
    return _mean(fake_logits) - _mean(real_logits)


def g_loss_wasserstein(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator: -mean D(G(z))."""
    return -fake_logits.mean()


D_LOSSES = {"bce": d_loss_nonsaturating, "hinge": d_loss_hinge, "wgan": d_loss_wasserstein}
G_LOSSES = {"bce": g_loss_nonsaturating, "hinge": g_loss_hinge, "wgan": g_loss_wasserstein}


# --- penalties ------------------------------------------------------------------------------------

def _input_grad_sq_norm(D: Critic, x: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm of dD(x)/dx, differentiable (for the penalty's own backward)."""
    x = x.detach().requires_grad_(True)
    logits = D(x)
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return grad.float().square().flatten(1).sum(1)


def r1_penalty(D: Critic, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean ||dD(x)/dx||^2 on real images. The loss term is
    ``gamma / 2 * r1_penalty``; it pushes D's surface flat on the data, so G is not chased off it."""
    return _input_grad_sq_norm(D, real).mean()


def gradient_penalty(D: Critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): mean (||dD(x^)/dx^|| - 1)^2 at random points x^ on the
    lines between real and fake images. The loss term is ``weight * gradient_penalty`` (10)."""
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    mixed = alpha * real.detach() + (1 - alpha) * fake.detach()
    return (_input_grad_sq_norm(D, mixed).add(1e-12).sqrt() - 1.0).square().mean()


def lazy_regularisation_scaling(lr: float, betas: tuple[float, float], interval: int) -> tuple[float, tuple[float, float]]:
    """stylegan2-ada's lazy-regularisation correction: with a separate regulariser step every
    ``interval`` steps, D's optimiser steps interval + 1 times per interval; lr and the Adam
    betas are scaled by ratio = interval / (interval + 1) (lr * ratio, beta ** ratio) so the
    schedule over an interval matches the unregularised one."""
    ratio = interval / (interval + 1)
    return lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)
