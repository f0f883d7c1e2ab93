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


def test_colour_on_an_rgb_batch_changes_every_image_keeps_shape_and_image_mean_within_brightness():
    torch.manual_seed(0)
    x = (torch.rand(64, 3, 16, 16) * 2 - 1).requires_grad_()  # RGB in [-1, 1]
    y = diff_augment(x, ["color"])
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert ((y - x).abs().flatten(1).amax(1) > 1e-3).all()  # every image changed, each by its own draw
    # Saturation keeps each pixel's channel mean and contrast the image mean, so the image mean moves only
    # by the brightness shift, in [-0.5, 0.5) as in the reference.
    shift = (y - x).mean(dim=(1, 2, 3))
    assert shift.abs().max() <= 0.5 and shift.std() > 0.1
    # Not clipped back to [-1, 1] (the reference does not: a clip would cut G's gradient where it clips),
    # so every pixel still passes a gradient.
    y.sum().backward()
    assert (x.grad != 0).float().mean() > 0.99
    assert y.abs().max() > 1
