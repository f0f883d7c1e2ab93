"""DCGAN (the source documents' convolutional GAN, TensorFlow-tutorial layout), with its widths
and kernel size as knobs.

Spatial sizes are derived from the image: the generator starts at (H/4, W/4) and its last two
layers double it, so 28x28 MNIST starts at 7x7 and 8x8 digits at 2x2. H and W must be
multiples of 4.

* default (``g_widths`` 256-128-64, ``d_widths`` 64-128-256, 5x5): the source documents' net;
* light (``g_widths`` 128-64, ``d_widths`` 64-128, 4x4): fewer, narrower layers; 4x4 kernels
  tile a stride-2 (transposed) convolution evenly, with no checkerboard of uneven overlaps.
"""

from __future__ import annotations

import torch
from torch import nn

from aigc.errors import UserError


def _same(k: int) -> int:
    return k // 2  # padding that keeps the size at stride 1 ("same" in Keras)


def _up2(c_in: int, c_out: int, k: int, bias: bool) -> nn.ConvTranspose2d:
    """A transposed convolution that exactly doubles H and W, for odd or even ``k``."""
    pad = (k - 1) // 2
    return nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=pad, output_padding=2 - k + 2 * pad, bias=bias)


class Generator(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        if h % 4 or w % 4:
            raise UserError(f"the dcgan family needs a resolution divisible by 4, the data is {h}x{w}; "
                            "set data.image_size (e.g. 28 or 32) or use model.family: mlp")
        widths, k = tuple(cfg.g_widths), cfg.kernel
        self.base = (h // 4, w // 4)
        self.width0 = widths[0]
        self.project = nn.Sequential(  # z (N, z_dim) -> (N, widths[0]*h/4*w/4)
            nn.Linear(cfg.z_dim, widths[0] * self.base[0] * self.base[1], bias=False),
            nn.BatchNorm1d(widths[0] * self.base[0] * self.base[1]),
            nn.LeakyReLU(0.2, inplace=True),
        )
        layers: list[nn.Module] = []
        outs = (*widths[1:], c)
        for i, (c_in, c_out) in enumerate(zip(widths, outs)):
            last = i == len(outs) - 1
            if i < len(outs) - 2:  # (N, c_in, h/4, w/4) -> (N, c_out, h/4, w/4)
                layers.append(nn.ConvTranspose2d(c_in, c_out, k, stride=1, padding=_same(k), bias=False))
            else:  # the last two: (N, c_in, s, s) -> (N, c_out, 2s, 2s)
                layers.append(_up2(c_in, c_out, k, bias=last))
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
        self.net = nn.Sequential(*layers)  # -> (N, C, h, w) in [-1, 1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, self.width0, *self.base)
        return self.net(x)


class Discriminator(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        k = cfg.kernel
        layers: list[nn.Module] = []
        for c_in, c_out in zip((c, *cfg.d_widths[:-1]), cfg.d_widths):  # each halves H and W
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
