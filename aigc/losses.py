"""Adversarial losses. Logits in, scalar losses out; nothing here knows about optimisers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator: maximise log D(x) + log(1 - D(G(z))), as BCE-with-logits on 1s and 0s."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator: maximise log D(G(z)) (Goodfellow et al.'s non-saturating form), not
    minimise log(1 - D(G(z))), whose gradient vanishes while D easily wins early on."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
