"""The source documents' fully connected GAN, with a tanh output so it matches data in [-1, 1].

(As written in the documents the generator's output was linear; with data in [-1, 1] that
produced no digits at all. The tanh and a proper two-step update fix it.)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Generator(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.shape = cfg.image_shape
        out = math.prod(self.shape)
        self.net = nn.Sequential(  # z (N, z_dim) -> (N, C*H*W)
            nn.Linear(cfg.z_dim, 128), nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(128, 256), nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(256, 512), nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(512, out), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.shape)


class Discriminator(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.net = nn.Sequential(  # (N, C, H, W) -> (N,) logits
            nn.Flatten(),
            nn.Linear(math.prod(cfg.image_shape), 512), nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(512, 256), nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(256, 128), nn.LeakyReLU(0.01, inplace=True),
            nn.Linear(128, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)
