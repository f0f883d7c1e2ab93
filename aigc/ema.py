"""An exponential moving average of the generator's weights, with stylegan2-ada's ramp-up.

Averaging G's weights over the last few thousand images smooths the noise of the adversarial
game: the EMA generator usually draws cleaner samples than the live one. A fixed decay such as
0.9999 has a half-life of ~7,000 steps -- longer than a whole 10-minute run here, so it would
mostly remember the random init. stylegan2-ada sets the half-life in images instead
(``ema_kimg``), and ramps it up with the images seen so far (``ema_rampup``), so early in a run
the average only spans the recent past:

    ema_nimg = min(ema_kimg * 1000, seen * ema_rampup)      (no ramp-up: ema_kimg * 1000)
    beta     = 0.5 ** (batch / ema_nimg)                    (per step)

Buffers are not averaged. BatchNorm's running statistics are the one buffer that depends on the
weights: those of the live G describe the live G's activations, not the EMA weights'. So
``recompute_batchnorm`` re-estimates them for the EMA weights from fresh z before the EMA
generator is sampled or saved.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch: int, seen: int, ema_kimg: float, rampup: float | None) -> float:
    """The decay of one step of ``batch`` images after ``seen`` images (stylegan2-ada's formula)."""
    ema_nimg = ema_kimg * 1000
    if rampup:
        ema_nimg = min(ema_nimg, seen * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


class GeneratorEMA:
    """The averaged copy of ``G`` (``self.G``: eval mode, no gradients)."""

    def __init__(self, G: nn.Module, ema_kimg: float, rampup: float | None) -> None:
        self.G = copy.deepcopy(G).eval().requires_grad_(False)
        self.ema_kimg, self.rampup = ema_kimg, rampup
        self._params, self._buffers = list(self.G.parameters()), list(self.G.buffers())  # updated in place

    @torch.no_grad()
    def update(self, G: nn.Module, batch: int, seen: int) -> float:
        """Move the average towards ``G`` after ``seen`` images; returns the decay used."""
        beta = ema_beta(batch, seen, self.ema_kimg, self.rampup)
        # ema += (1 - beta) * (live - ema), i.e. beta * ema + (1 - beta) * live: one fused call for all
        # parameters instead of one allocation and copy per tensor
        torch._foreach_lerp_(self._params, list(G.parameters()), 1.0 - beta)
        # BN statistics are re-estimated by recompute_batchnorm before use (an MLP G has no buffers)
        if self._buffers:
            torch._foreach_copy_(self._buffers, list(G.buffers()))
        return beta

    def recompute_batchnorm(self, z_dim: int, device: torch.device | str, seed: int = 0) -> None:
        """Re-estimate the EMA generator's BatchNorm statistics for its own weights."""
        recompute_batchnorm(self.G, z_dim, device, seed=seed)


@torch.no_grad()
def recompute_batchnorm(G: nn.Module, z_dim: int, device: torch.device | str, batches: int = 8,
                        batch_size: int = 256, seed: int = 0) -> None:
    """Re-estimate every BatchNorm's running mean/var of ``G`` for its current weights: a cumulative
    average over ``batches`` batches of seeded z (momentum None); ``G`` is left in eval mode."""
    norms = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        G.eval()
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    gen = torch.Generator().manual_seed(seed)
    G.train()
    for _ in range(batches):
        z = torch.randn(batch_size, z_dim, generator=gen).to(device)
        if getattr(G, "conditional", False):  # cBN's statistics see the classes in their data shares
            y = torch.multinomial(G.class_share.float(), batch_size, replacement=True, generator=gen)
            G(z, y.to(device))
        else:
            G(z)
    G.eval()
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
