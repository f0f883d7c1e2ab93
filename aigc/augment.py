"""Differentiable augmentation for D (DiffAugment; Zhao et al. 2020, mit-han-lab/data-efficient-gans).

With only a few thousand images D memorises the training set and its feedback to G degrades.
DiffAugment applies the same kind of random transform to *everything D sees* -- real and fake,
in D's step and in G's -- so D cannot tell real from fake by the transform, and G's gradient
flows back through it (every op here is differentiable in the image).

Digit-safe policies only: translation (up to 1/8 of the side) and cutout (a square of half the
side), both filling with the background value -1 (the data are in [-1, 1]; the reference code
fills with 0, mid-grey here); ``color`` (brightness, saturation, contrast) for 3-channel data
only. No flips or rotations: they change what a digit is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKGROUND = -1.0  # the value of an empty pixel in [-1, 1] data
POLICIES = ("translation", "cutout", "color")


def rand_translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its side (integer pixels), filling with the background."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, size=[n, 1, 1], device=x.device)
    ty = torch.randint(-sw, sw + 1, size=[n, 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1], value=BACKGROUND)  # the one-pixel frame is what shifts in
    return padded.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)


def rand_cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Blank a random square of ``ratio`` of the side in each image (to the background value)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), size=[n, 1, 1], device=x.device)
    oy = torch.randint(0, w + (1 - cw % 2), size=[n, 1, 1], device=x.device)
    gb, gx, gy = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(ch, device=x.device),
                                torch.arange(cw, device=x.device), indexing="ij")
    gx = torch.clamp(gx + ox - ch // 2, min=0, max=h - 1)
    gy = torch.clamp(gy + oy - cw // 2, min=0, max=w - 1)
    keep = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    keep[gb, gx, gy] = 0
    keep = keep.unsqueeze(1)
    return x * keep + BACKGROUND * (1 - keep)


def rand_color(x: torch.Tensor) -> torch.Tensor:
    """Random brightness, saturation and contrast (the reference's colour policy; 3 channels)."""
    n = x.shape[0]
    x = x + (torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


_OPS = {"color": rand_color, "translation": rand_translation, "cutout": rand_cutout}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...] | list[str]) -> torch.Tensor:
    """``x`` (N, C, H, W) with each transform of ``policy`` applied, in the reference's order
    (colour, translation, cutout); a fresh random draw per image and per call."""
    for name in ("color", "translation", "cutout"):
        if name in policy:
            x = _OPS[name](x)
    return x


def check_policy(policy: tuple[str, ...] | list[str], channels: int) -> None:
    """A UserError when the policy does not fit the data (colour needs 3 channels)."""
    from aigc.errors import UserError

    if "color" in policy and channels != 3:
        raise UserError(f"train.augment includes 'color', which needs 3-channel data; the data have {channels} "
                        "channel(s): remove 'color'")
