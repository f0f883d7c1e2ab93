"""The conditional DCGAN: G conditioned through conditional BatchNorm, D a projection discriminator.

* **G** is the dcgan generator with every BatchNorm made class-conditional (de Vries et al. 2017,
  as in BigGAN and PyTorch-StudioGAN's ``cBN``): the normalisation is shared, the scale and shift
  are looked up per class, so the class steers every layer rather than only the input.
* **D** is the dcgan discriminator with a projection head (Miyato & Koyama 2018, StudioGAN's
  ``PD``): ``D(x, y) = psi(phi(x)) + <embed(y), phi(x)>``, where ``phi(x)`` is D's feature
  vector and ``psi`` its unconditional linear head. The label enters as an inner product with the
  features, which the paper shows is the form the optimal conditional discriminator takes
  (log-ratio of class-conditional densities), instead of being concatenated to the input.

Both take class *indices* 0..K-1 (``NetConfig.classes[i]`` is the dataset's label value of index i).
"""

from __future__ import annotations

import torch
from torch import nn

from aigc.errors import UserError
from aigc.models import dcgan


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine; the per-class scale (init 1) and shift (init 0) come from
    two embeddings. Works on (N, F) and (N, C, H, W)."""

    def __init__(self, num_features: int, num_classes: int, dims: int) -> None:
        super().__init__()
        self.bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        nn.init.normal_(self.gain.weight, 1.0, 0.02)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = (-1, x.shape[1]) + (1,) * (x.dim() - 2)  # broadcast over H, W
        return self.bn(x) * self.gain(y).view(shape) + self.bias(y).view(shape)


class Generator(nn.Module):
    """dcgan's G (same layers and shapes) with conditional BatchNorm; ``G(z, y)``."""

    conditional = True

    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        if h % 4 or w % 4:
            raise UserError(f"the dcgan family needs a resolution divisible by 4, the data is {h}x{w}; "
                            "set data.image_size (e.g. 28 or 32)")
        k, p = 5, dcgan._same(5)
        self.base = (h // 4, w // 4)
        self.num_classes = cfg.num_classes
        self.class_share = torch.tensor(cfg.class_share, dtype=torch.float64)  # for sampling without labels
        width = 256 * self.base[0] * self.base[1]
        self.project = nn.Linear(cfg.z_dim, width, bias=False)  # z (N, z_dim) -> (N, 256*h/4*w/4)
        self.bn0 = ConditionalBatchNorm(width, cfg.num_classes, 1)
        # (N, 256, h/4, w/4) -> (N, 128, h/4, w/4)
        self.up1 = nn.ConvTranspose2d(256, 128, k, stride=1, padding=p, bias=False)
        self.bn1 = ConditionalBatchNorm(128, cfg.num_classes, 2)
        # -> (N, 64, h/2, w/2)
        self.up2 = nn.ConvTranspose2d(128, 64, k, stride=2, padding=p, output_padding=1, bias=False)
        self.bn2 = ConditionalBatchNorm(64, cfg.num_classes, 2)
        # -> (N, C, h, w) in [-1, 1]
        self.out = nn.ConvTranspose2d(64, c, k, stride=2, padding=p, output_padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.project(z), y)).view(-1, 256, *self.base)
        x = self.act(self.bn1(self.up1(x), y))
        x = self.act(self.bn2(self.up2(x), y))
        return torch.tanh(self.out(x))


class ProjectionDiscriminator(nn.Module):
    """dcgan's D (same convolutions, same linear head) plus the class projection; ``D(x, y)``."""

    conditional = True

    def __init__(self, cfg) -> None:
        super().__init__()
        base = dcgan.Discriminator(cfg)
        self.features = base.features  # x (N, C, H, W) -> (N, 256, h/8, w/8)
        self.head = base.head  # psi: phi(x) (N, F) -> (N, 1), the unconditional part
        # V: one F-vector per class, Glorot-uniform as in the authors' code (sngan_projection): with
        # nn.Embedding's N(0, 1) the inner product over F = 4,096 features would swamp psi at the
        # start. Measured on 8x8 digits (lr 1e-3): label accuracy 0.98 after 150 steps with this
        # init, 0.37 with N(0, 0.02).
        self.embed = nn.Embedding(cfg.num_classes, self.head.in_features)
        nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        phi = self.features(x).flatten(1)  # (N, F)
        return self.head(phi).squeeze(1) + (self.embed(y) * phi).sum(1)  # (N,) logits
