"""DCGAN (the source documents' convolutional GAN, TensorFlow-tutorial layout), with its widths
and kernel size as knobs.

Spatial sizes are derived from the image (:func:`blocks`): G projects z to a small base and
doubles H and W once per block; D halves them once per convolution. The base is the side halved
while it stays a whole number >= 4, but at least twice (the two upsampling layers that
``g_widths`` always had): 28 -> 7, 32 -> 4, 64 -> 4, 48 -> 6, 8 -> 2. So H and W must be
multiples of 4 (the same sizes as before); a side that halves further gets more blocks.

Widths of the extra blocks (each block beyond two): G repeats the widest of ``g_widths`` right
after the projection (the low-resolution end), D appends the widest of ``d_widths`` after its
listed convolutions, one per extra G block, so the default two ``d_widths`` halve down to G's
base. With two blocks (28x28, 8x8) the networks are exactly those ``g_widths``/``d_widths``
always described.

* default (``g_widths`` 256-128-64, ``d_widths`` 64-128-256, 5x5): the source documents' net;
* light (``g_widths`` 128-64, ``d_widths`` 64-128, 4x4): fewer, narrower layers; 4x4 kernels
  tile a stride-2 (transposed) convolution evenly, with no checkerboard of uneven overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aigc.errors import UserError

MIN_BASE = 4  # G starts from the smallest side >= this reached by halving (DCGAN's 4x4)
MIN_BLOCKS = 2  # the two upsampling layers of g_widths: 28x28 starts at 7x7, 8x8 at 2x2


def blocks(h: int, w: int, family: str) -> int:
    """How many times G doubles (and D halves) H and W: the halvings that keep both sides whole
    and >= 4, but at least 2. A UserError naming the sizes that work when H or W is not a
    multiple of 4 (the only sides that at least two halvings keep whole)."""
    if h % 4 or w % 4 or h < 4 or w < 4:
        bad = max(s for s in (h, w) if s % 4 or s < 4)
        sizes = sorted({max(4, bad // 4 * 4), max(4, -(-bad // 4) * 4)})
        alt = ", or use model.family: mlp"
        raise UserError(f"the {family} family builds for sides that are multiples of 4 (4, 8, 12, ..., 28, 32, "
                        f"..., 64, ...); the data is {h}x{w}; set data.image_size to {' or '.join(map(str, sizes))}"
                        f"{alt}")
    k = MIN_BLOCKS
    while h % 2 ** (k + 1) == 0 and w % 2 ** (k + 1) == 0 and min(h, w) // 2 ** (k + 1) >= MIN_BASE:
        k += 1
    return k


@dataclass(frozen=True)
class Layer:
    """One layer of G's plan: ``c_in`` -> ``c_out`` channels, doubling H and W (``up``) or keeping them."""

    c_in: int
    c_out: int
    up: bool
    last: bool  # to the image's C channels, with a bias and no norm (tanh follows)


@dataclass(frozen=True)
class GeneratorPlan:
    """G's layers, shared by this family and the conditional one (aigc/models/conditional.py)."""

    base: tuple[int, int]  # (H, W) of the projection
    width0: int  # channels of the projection
    layers: tuple[Layer, ...]


def generator_plan(cfg) -> GeneratorPlan:
    """z -> (width0, *base), then ``extra`` doubling blocks at the widest g_width, then g_widths as
    they always were (the first ones keep the size, the last two double it), ending at C channels."""
    c, h, w = cfg.image_shape
    k = blocks(h, w, "dcgan")
    widths = tuple(cfg.g_widths)
    extra = k - MIN_BLOCKS
    chans = (max(widths),) * extra + widths + (c,)
    n = len(chans) - 1
    layers = tuple(Layer(chans[i], chans[i + 1], up=i < extra or i >= n - 2, last=i == n - 1) for i in range(n))
    return GeneratorPlan(base=(h // 2 ** k, w // 2 ** k), width0=chans[0], layers=layers)


def discriminator_widths(cfg) -> tuple[int, ...]:
    """D's stride-2 convolutions: d_widths, then the widest of them once per block G has beyond
    two, so that the default two d_widths halve down to G's base (and a d_widths of another length
    keeps the depth it had at 28x28 and 8x8)."""
    c, h, w = cfg.image_shape
    widths = tuple(cfg.d_widths)
    return widths + (max(widths),) * (blocks(h, w, "dcgan") - MIN_BLOCKS)


def _same(k: int) -> int:
    return k // 2  # padding that keeps the size at stride 1 ("same" in Keras)


def _up2(c_in: int, c_out: int, k: int, bias: bool) -> nn.ConvTranspose2d:
    """A transposed convolution that exactly doubles H and W, for odd or even ``k``."""
    pad = (k - 1) // 2
    return nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=pad, output_padding=2 - k + 2 * pad, bias=bias)


def g_conv(layer: Layer, k: int, upsample: str = "transposed") -> nn.Module:
    """The (transposed) convolution of one planned layer; with ``upsample="nearest"`` a doubling
    layer is nearest-neighbour upsampling followed by a size-keeping convolution (Odena et al.,
    "Deconvolution and checkerboard artifacts", 2016)."""
    if layer.up and upsample == "nearest":  # (N, c_in, s, s) -> (N, c_in, 2s, 2s) -> (N, c_out, 2s, 2s)
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                             nn.Conv2d(layer.c_in, layer.c_out, k, padding="same", bias=layer.last))
    if layer.up:  # (N, c_in, s, s) -> (N, c_out, 2s, 2s)
        return _up2(layer.c_in, layer.c_out, k, bias=layer.last)
    return nn.ConvTranspose2d(layer.c_in, layer.c_out, k, stride=1, padding=_same(k), bias=False)  # size kept


class Generator(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        plan = generator_plan(cfg)
        self.base, self.width0 = plan.base, plan.width0
        n0 = plan.width0 * plan.base[0] * plan.base[1]
        self.project = nn.Sequential(  # z (N, z_dim) -> (N, width0*base_h*base_w)
            nn.Linear(cfg.z_dim, n0, bias=False),
            nn.BatchNorm1d(n0),
            nn.LeakyReLU(0.2, inplace=True),
        )
        layers: list[nn.Module] = []
        for layer in plan.layers:
            layers.append(g_conv(layer, cfg.kernel, cfg.upsample))
            layers += [nn.Tanh()] if layer.last else [nn.BatchNorm2d(layer.c_out), nn.LeakyReLU(0.2, inplace=True)]
        self.net = nn.Sequential(*layers)  # -> (N, C, h, w) in [-1, 1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, self.width0, *self.base)
        return self.net(x)


class Discriminator(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        k = cfg.kernel
        widths = discriminator_widths(cfg)
        layers: list[nn.Module] = []
        for c_in, c_out in zip((c, *widths[:-1]), widths):  # each halves H and W
            layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=(k - 1) // 2),
                       nn.LeakyReLU(0.2, inplace=True)]
            if cfg.d_dropout > 0:
                layers.append(nn.Dropout(cfg.d_dropout))
        self.features = nn.Sequential(*layers)
        with torch.no_grad():  # the flattened size, whatever the kernel and the resolution
            n = self.features(torch.zeros(1, c, h, w)).numel()
        self.head = nn.Linear(n, 1)  # one logit: real vs fake

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(1)
