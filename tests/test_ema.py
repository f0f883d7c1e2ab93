"""The EMA of G follows stylegan2-ada's ramp-up formula; its BatchNorm statistics fit its own weights."""

from __future__ import annotations

import pytest
import torch

from aigc.ema import GeneratorEMA, ema_beta, recompute_batchnorm
from aigc.models import NetConfig, build_generator


def test_beta_matches_the_formula():
    # ema_nimg = min(ema_kimg * 1000, seen * rampup); beta = 0.5 ** (batch / ema_nimg)
    assert ema_beta(64, seen=640, ema_kimg=10, rampup=0.05) == pytest.approx(0.5 ** (64 / 32))  # ramping up
    assert ema_beta(64, seen=10**7, ema_kimg=10, rampup=0.05) == pytest.approx(0.5 ** (64 / 10_000))  # capped
    assert ema_beta(64, seen=640, ema_kimg=10, rampup=None) == pytest.approx(0.5 ** (64 / 10_000))
    # Half-life: after ema_nimg images at the cap the old average weighs one half.
    assert ema_beta(100, 10**7, 1, None) ** 10 == pytest.approx(0.5)


def test_update_is_the_lerp_and_copies_buffers():
    net = NetConfig("dcgan", 8, 1, 8, 8)
    G = build_generator(net)
    ema = GeneratorEMA(G, ema_kimg=1, rampup=0.05)
    before = [p.clone() for p in ema.G.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
        for b in G.buffers():
            b.add_(3)
    beta = ema.update(G, batch=16, seen=320)
    assert beta == pytest.approx(0.5 ** (16 / 16))  # min(1000, 320 * 0.05) = 16 images
    for p0, p_ema, p in zip(before, ema.G.parameters(), G.parameters()):
        torch.testing.assert_close(p_ema, beta * p0 + (1 - beta) * p)
    for b_ema, b in zip(ema.G.buffers(), G.buffers()):
        torch.testing.assert_close(b_ema, b)
    assert not any(p.requires_grad for p in ema.G.parameters()) and not ema.G.training


def test_batchnorm_statistics_are_those_of_the_ema_weights():
    net = NetConfig("dcgan", 8, 1, 8, 8)
    G = build_generator(net)
    with torch.no_grad():  # weights unlike the ones the running statistics came from
        G.project[0].weight.mul_(3.0).add_(0.1)
    recompute_batchnorm(G, net.z_dim, "cpu", batches=1, batch_size=512, seed=5)
    z = torch.randn(512, net.z_dim, generator=torch.Generator().manual_seed(5))
    h = G.project[0](z)
    bn = G.project[1]
    torch.testing.assert_close(bn.running_mean, h.mean(0).detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, h.var(0).detach(), rtol=1e-4, atol=1e-5)
    assert not G.training and bn.momentum == 0.1  # back to eval, momentum restored
