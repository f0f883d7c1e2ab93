"""DCGAN (the source documents' convolutional GAN, TensorFlow-tutorial layout).

Spatial sizes are derived from the image: the generator starts at (H/4, W/4) and doubles
twice, so 28x28 MNIST starts at 7x7 and 8x8 digits at 2x2. H and W must be multiples of 4.
"""

from __future__ import annotations

import torch
from torch import nn

from aigc.errors import UserError


def _same(k: int) -> int:
    return k // 2  # padding that keeps the size at stride 1 ("same" in Keras)


class Generator(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        if h % 4 or w % 4:
            raise UserError(f"the dcgan family needs a resolution divisible by 4, the data is {h}x{w}; "
                            "set data.image_size (e.g. 28 or 32) or use model.family: mlp")
        self.base = (h // 4, w // 4)
        k = 5
        self.project = nn.Sequential(  # z (N, z_dim) -> (N, 256*h/4*w/4)
            nn.Linear(cfg.z_dim, 256 * self.base[0] * self.base[1], bias=False),
            nn.BatchNorm1d(256 * self.base[0] * self.base[1]),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.net = nn.Sequential(
            # (N, 256, h/4, w/4) -> (N, 128, h/4, w/4)
            nn.ConvTranspose2d(256, 128, k, stride=1, padding=_same(k), bias=False),
            nn.BatchNorm2d(128),
            nn.LeakyReLU(0.2, inplace=True),
            # -> (N, 64, h/2, w/2)
            nn.ConvTranspose2d(128, 64, k, stride=2, padding=_same(k), output_padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2, inplace=True),
            # -> (N, C, h, w) in [-1, 1]
            nn.ConvTranspose2d(64, c, k, stride=2, padding=_same(k), output_padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, 256, *self.base)
        return self.net(x)


class Discriminator(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        k = 5
        layers: list[nn.Module] = []
        for c_in, c_out in ((c, 64), (64, 128), (128, 256)):  # each halves H and W (ceil)
            layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=_same(k)),
                       nn.LeakyReLU(0.2, inplace=True),
                       nn.Dropout(0.3)]
        self.features = nn.Sequential(*layers)
        for _ in range(3):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.head = nn.Linear(256 * h * w, 1)  # one logit: real vs fake

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)).squeeze(1)
