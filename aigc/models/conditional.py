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
    """dcgan's G (same layers, widths, kernel and shapes) with conditional BatchNorm; ``G(z, y)``."""

    conditional = True

    def __init__(self, cfg) -> None:
        super().__init__()
        plan = dcgan.generator_plan(cfg)  # the same layers as dcgan's G
        self.base, self.width0 = plan.base, plan.width0
        self.num_classes = cfg.num_classes
        self.class_share = torch.tensor(cfg.class_share, dtype=torch.float64)  # for sampling without labels
        width = plan.width0 * plan.base[0] * plan.base[1]
        self.project = nn.Linear(cfg.z_dim, width, bias=False)  # z (N, z_dim) -> (N, width0*base_h*base_w)
        self.bn0 = ConditionalBatchNorm(width, cfg.num_classes, 1)
        self.ups = nn.ModuleList()
        self.bns = nn.ModuleList()
        for layer in plan.layers:  # the last one to C channels in [-1, 1], without a norm
            self.ups.append(dcgan.g_conv(layer, cfg.kernel, cfg.upsample))
            if not layer.last:
                self.bns.append(ConditionalBatchNorm(layer.c_out, cfg.num_classes, 2))
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.project(z), y)).view(-1, self.width0, *self.base)
        for up, bn in zip(self.ups[:-1], self.bns):
            x = self.act(bn(up(x), y))
        return torch.tanh(self.ups[-1](x))


class ProjectionDiscriminator(nn.Module):
    """dcgan's D (same convolutions, same linear head) plus the class projection; ``D(x, y)``."""

    conditional = True

    def __init__(self, cfg) -> None:
        super().__init__()
        base = dcgan.Discriminator(cfg)
        self.features = base.features  # x (N, C, H, W) -> (N, d_widths[-1], h/2^L, w/2^L)
        self.head = base.head  # psi: phi(x) (N, F) -> (N, 1), the unconditional part
        # V: one F-vector per class, Glorot-uniform as in the authors' code (sngan_projection): with
        # nn.Embedding's N(0, 1) the inner product over F = 4,096 features would swamp psi at the
        # start. Measured on 8x8 digits (lr 1e-3, the heavy 5x5 net): label accuracy 0.98 after 150 steps with this
        # init, 0.37 with N(0, 0.02).
        self.embed = nn.Embedding(cfg.num_classes, self.head.in_features)
        nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        phi = self.features(x).flatten(1)  # (N, F)
        return self.head(phi).squeeze(1) + (self.embed(y) * phi).sum(1)  # (N,) logits
