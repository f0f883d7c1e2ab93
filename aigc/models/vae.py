"""The variational autoencoder family (Kingma & Welling 2014): a conv encoder q(z|x[,y]) and a
conv decoder p(x|z[,y]), sized from the data like dcgan (aigc/models/dcgan.py, ``blocks``): H and W
multiples of 4; the encoder halves them once per block down to the base (28 -> 7, 32 -> 4, 64 -> 4,
8 -> 2) and the decoder doubles them back. Widths 32 then 64; extra blocks (beyond two, at 32 px
and up) repeat the widest, 64, at the low-resolution end, so 28x28 and 8x8 nets are as before.

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

import math

import torch
import torch.nn.functional as F
from torch import nn

from aigc.models import dcgan

HIDDEN = 256  # width of the dense layer between the convolutions and z
WIDTHS = (32, 64)  # the encoder's stride-2 convolutions (the decoder's, reversed)


def _plan(h: int, w: int) -> tuple[tuple[int, ...], tuple[int, int]]:
    """The encoder's widths (32, 64, then 64 per extra block) and the base (H, W) it halves down to."""
    k = dcgan.blocks(h, w, "vae")
    return WIDTHS + (max(WIDTHS),) * (k - len(WIDTHS)), (h // 2 ** k, w // 2 ** k)


class Encoder(nn.Module):
    """x (N, C, H, W) [, y] -> (mu, logvar), each (N, z_dim)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        widths, self.base = _plan(h, w)
        self.num_classes = cfg.num_classes if cfg.conditional else 0
        layers: list[nn.Module] = []
        for c_in, c_out in zip((c, *widths[:-1]), widths):  # each halves H and W: (N, 32, H/2, W/2), (N, 64, H/4, W/4), ...
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.conv = nn.Sequential(*layers, nn.Flatten())  # -> (N, 64 * base_h * base_w)
        self.fc = nn.Sequential(nn.Linear(widths[-1] * self.base[0] * self.base[1] + self.num_classes, HIDDEN),
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
        widths, self.base = _plan(h, w)
        self.width0 = widths[-1]
        self.conditional = bool(cfg.conditional)
        self.num_classes = cfg.num_classes if cfg.conditional else 0
        self.class_share = torch.tensor(cfg.class_share, dtype=torch.float64)  # for sampling without labels
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_dim + self.num_classes, HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(HIDDEN, self.width0 * self.base[0] * self.base[1]), nn.ReLU(inplace=True),
        )
        chans = (*widths[::-1], c)  # the encoder's widths reversed, ending at C
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):  # each doubles: ..., (N, 32, H/2, W/2), (N, C, H, W)
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(chans) - 2:  # the last one without an activation: raw parameters
                layers.append(nn.ReLU(inplace=True))
        self.deconv = nn.Sequential(*layers)

    def logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)
        return self.deconv(self.fc(z).view(-1, self.width0, *self.base))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.logits(z, y) / 2)  # = 2 sigmoid(o) - 1: images in [-1, 1]


def recon_nll(logits: torch.Tensor, x: torch.Tensor, likelihood: str, sigma: float) -> torch.Tensor:
    """-log p(x|z) per image (N,), nats; ``x`` in [-1, 1], ``logits`` the decoder's raw output."""
    if likelihood == "bernoulli":
        # The pixel intensity (x + 1) / 2 in [0, 1] as the Bernoulli target (the usual MNIST VAE).
        return F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").flatten(1).sum(1)
    mean = torch.tanh(logits / 2)
    d = x[0].numel()
    return 0.5 * ((x - mean) / sigma).pow(2).flatten(1).sum(1) + d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
