"""DiffAugment: digit-safe transforms that fill with the background value -1."""

from __future__ import annotations

import pytest
import torch

from aigc.augment import check_policy, diff_augment, rand_cutout, rand_translation
from aigc.errors import UserError


def test_translation_shifts_in_background_never_zero():
    torch.manual_seed(0)
    x = torch.ones(64, 1, 16, 16)
    y = rand_translation(x)
    assert y.shape == x.shape
    assert set(y.unique().tolist()) == {-1.0, 1.0}  # background fill, not 0 (mid-grey in [-1, 1])
    # Shifts are at most 1/8 of the side (2 px of 16): the centre is always the image.
    assert (y[:, :, 2:14, 2:14] == 1).all()
    assert (y == -1).flatten(1).any(1).float().mean() > 0.5  # most images moved


def test_translation_moves_content():
    torch.manual_seed(1)
    x = -torch.ones(32, 1, 16, 16)
    x[:, :, 8, 8] = 1.0  # one lit pixel
    y = rand_translation(x)
    assert ((y == 1).flatten(1).sum(1) == 1).all()  # the pixel survives (shift <= 2 px)
    assert (y[:, :, 8, 8] != 1).any()  # and somewhere it moved


def test_cutout_blanks_a_square_to_minus_one():
    torch.manual_seed(0)
    x = torch.ones(64, 1, 8, 8)
    y = rand_cutout(x)
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    blanked = (y == -1).flatten(1).sum(1)
    assert (blanked >= 4).all() and (blanked <= 16).all()  # a 4x4 square, clipped at the border


def test_policy_order_gradient_and_colour_check():
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    diff_augment(x, ["translation", "cutout"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable: G learns through it
    assert diff_augment(x, []) is x
    with pytest.raises(UserError, match="'color'.*3-channel"):
        check_policy(["color"], channels=1)
    check_policy(["color", "translation"], channels=3)
    assert diff_augment(torch.rand(2, 3, 8, 8), ["color"]).shape == (2, 3, 8, 8)
