"""The variational autoencoder family (Kingma & Welling 2014): a conv encoder q(z|x[,y]) and a
conv decoder p(x|z[,y]), sized from the data (H and W divisible by 4, like dcgan).

The decoder is this family's *generator*: ``G(z)`` (or ``G(z, y)`` when conditional) returns
images in [-1, 1], so sampling, evaluation, registration and serving treat it like a GAN's G.
Its raw output ``o`` is the likelihood's parameter (aigc/training/vae.py): Bernoulli logits of the pixel
intensity (x + 1) / 2, or a Gaussian mean; either way the image is ``tanh(o / 2)``
(= 2 sigmoid(o) - 1, the Bernoulli mean mapped back to [-1, 1]), so one decoder serves both
likelihoods and the file does not need to say which was trained.

A conditional VAE (Sohn et al. 2015) gives both networks the class as a one-hot vector, beside the
flattened features in the encoder and beside z in the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aigc.errors import UserError

HIDDEN = 256  # width of the dense layer between the convolutions and z


def _check(h: int, w: int) -> None:
    if h % 4 or w % 4:
        raise UserError(f"the vae family needs a resolution divisible by 4, the data is {h}x{w}; "
                        "set data.image_size (e.g. 28 or 32)")


class Encoder(nn.Module):
    """x (N, C, H, W) [, y] -> (mu, logvar), each (N, z_dim)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        _check(h, w)
        self.num_classes = cfg.num_classes if cfg.conditional else 0
        self.conv = nn.Sequential(
            nn.Conv2d(c, 32, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),  # (N, 32, H/2, W/2)
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),  # (N, 64, H/4, W/4)
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(64 * (h // 4) * (w // 4) + self.num_classes, HIDDEN),
                                nn.LeakyReLU(0.2, inplace=True))
        self.mu = nn.Linear(HIDDEN, cfg.z_dim)
        self.logvar = nn.Linear(HIDDEN, cfg.z_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        if self.num_classes:
            h = torch.cat([h, F.one_hot(y, self.num_classes).to(h.dtype)], 1)
        h = self.fc(h)
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """z (N, z_dim) [, y] -> likelihood parameters ``logits`` / images ``forward`` (N, C, H, W)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        _check(h, w)
        self.conditional = bool(cfg.conditional)
        self.num_classes = cfg.num_classes if cfg.conditional else 0
        self.class_share = torch.tensor(cfg.class_share, dtype=torch.float64)  # for sampling without labels
        self.base = (h // 4, w // 4)
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_dim + self.num_classes, HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(HIDDEN, 64 * self.base[0] * self.base[1]), nn.ReLU(inplace=True),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (N, 32, H/2, W/2)
            nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),  # (N, C, H, W): raw parameters
        )

    def logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)
        return self.deconv(self.fc(z).view(-1, 64, *self.base))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.logits(z, y) / 2)  # = 2 sigmoid(o) - 1: images in [-1, 1]
