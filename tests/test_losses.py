"""Each loss and penalty on a tiny case whose value is known by hand, and which way it points."""

from __future__ import annotations

import math

import pytest
import torch

from aigc.losses import (
    D_LOSSES,
    G_LOSSES,
    d_loss_hinge,
    d_loss_nonsaturating,
    d_loss_wasserstein,
    g_loss_hinge,
    g_loss_nonsaturating,
    g_loss_wasserstein,
    gradient_penalty,
    lazy_regularisation_scaling,
    r1_penalty,
)

T = torch.tensor


def test_nonsaturating_bce_values_and_sign():
    zero = torch.zeros(4)
    assert d_loss_nonsaturating(zero, zero).item() == pytest.approx(2 * math.log(2))  # D undecided
    assert g_loss_nonsaturating(zero).item() == pytest.approx(math.log(2))
    # D right (real high, fake low): small D loss, large G loss; D fooled: the reverse.
    assert d_loss_nonsaturating(T([8.0]), T([-8.0])).item() < 1e-3
    assert g_loss_nonsaturating(T([-8.0])).item() == pytest.approx(8.0, abs=1e-3)
    assert d_loss_nonsaturating(T([-8.0]), T([8.0])).item() == pytest.approx(16.0, abs=1e-2)


def test_hinge_values_and_sign():
    real, fake = T([2.0, 0.5]), T([-2.0, 0.5])
    # relu(1 - [2, .5]) = [0, .5] -> .25; relu(1 + [-2, .5]) = [0, 1.5] -> .75
    assert d_loss_hinge(real, fake).item() == pytest.approx(1.0)
    assert g_loss_hinge(fake).item() == pytest.approx(0.75)  # -mean(fake)
    assert d_loss_hinge(T([5.0]), T([-5.0])).item() == 0.0  # beyond the margin: no loss
    assert g_loss_hinge(T([3.0])).item() < g_loss_hinge(T([-3.0])).item()  # G gains by raising D(fake)


def test_wasserstein_values_and_sign():
    assert d_loss_wasserstein(T([1.0, 3.0]), T([0.0, 2.0])).item() == pytest.approx(-1.0)  # mean fake - mean real
    assert g_loss_wasserstein(T([0.0, 2.0])).item() == pytest.approx(-1.0)
    assert set(D_LOSSES) == set(G_LOSSES) == {"bce", "hinge", "wgan"}


def linear_critic(w: float):
    return lambda x: (w * x).flatten(1).sum(1)  # dD/dx = w at every pixel


def test_r1_is_the_squared_input_gradient_norm():
    x = torch.randn(3, 1, 2, 2)
    assert r1_penalty(linear_critic(3.0), x).item() == pytest.approx(9.0 * 4)  # |3|^2 over 4 pixels
    # D(x) = sum x^2: grad 2x, penalty mean_i sum 4 x_i^2
    quad = lambda x: x.square().flatten(1).sum(1)  # noqa: E731
    assert r1_penalty(quad, x).item() == pytest.approx((4 * x.square().flatten(1).sum(1)).mean().item(), rel=1e-5)
    assert r1_penalty(linear_critic(0.0), x).item() == 0.0  # flat D: nothing to penalise


def test_r1_penalty_gradient_reaches_d_and_flattens_it():
    w = torch.tensor(2.0, requires_grad=True)
    r1 = r1_penalty(lambda x: (w * x).flatten(1).sum(1), torch.randn(2, 1, 2, 2))
    r1.backward()
    assert w.grad.item() == pytest.approx(2 * 2.0 * 4)  # d(4 w^2)/dw = 8w > 0: descent shrinks |w|


def test_gradient_penalty_is_zero_at_unit_norm_and_grows_off_it():
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    # 4 pixels of slope w: gradient norm 2|w|.
    assert gradient_penalty(linear_critic(0.5), real, fake).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_penalty(linear_critic(3.0), real, fake).item() == pytest.approx((6.0 - 1.0) ** 2, rel=1e-5)
    assert gradient_penalty(linear_critic(0.0), real, fake).item() == pytest.approx(1.0, rel=1e-4)


def test_lazy_regularisation_scaling_is_stylegan2_adas():
    lr, betas = lazy_regularisation_scaling(0.0025, (0.0, 0.99), 16)
    ratio = 16 / 17
    assert lr == pytest.approx(0.0025 * ratio)
    assert betas == pytest.approx((0.0, 0.99 ** ratio))
    lr, betas = lazy_regularisation_scaling(1e-3, (0.5, 0.9), 1)  # every step: half of each
    assert lr == pytest.approx(5e-4) and betas == pytest.approx((0.5 ** 0.5, 0.9 ** 0.5))
