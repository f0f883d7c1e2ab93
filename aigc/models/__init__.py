"""Generators and discriminators, built from a small typed config that the checkpoint carries.

``NetConfig`` holds everything needed to rebuild a network (family, z size, image shape), so
``load_generator(path)`` works from the file alone, without params.yaml or dataset.json
(nanoGPT's ``model_args``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aigc.errors import UserError

GENERATOR_FORMAT = "aigc.generator/1"


@dataclass(frozen=True)
class NetConfig:
    family: str  # "dcgan" | "mlp"
    z_dim: int
    channels: int
    height: int
    width: int
    # dcgan only (the defaults are the source documents' net, so older files rebuild unchanged):
    g_widths: tuple[int, ...] = (256, 128, 64)  # G's channels from the projection on; the last two layers upsample
    d_widths: tuple[int, ...] = (64, 128, 256)  # D's stride-2 convolutions
    kernel: int = 5
    d_dropout: float = 0.3
    spectral_norm: bool = False  # D's conv/linear weights divided by their largest singular value

    def __post_init__(self) -> None:
        # From JSON or a checkpoint the widths arrive as lists; keep the config hashable and comparable.
        object.__setattr__(self, "g_widths", tuple(int(w) for w in self.g_widths))
        object.__setattr__(self, "d_widths", tuple(int(w) for w in self.d_widths))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def init_weights(m: nn.Module) -> None:
    """The DCGAN paper's init: conv/linear weights N(0, 0.02), norm scales N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def build_generator(cfg: NetConfig) -> nn.Module:
    from aigc.models import dcgan, mlp

    family = {"dcgan": dcgan.Generator, "mlp": mlp.Generator}
    if cfg.family not in family:
        raise UserError(f"unknown model family {cfg.family!r}; expected one of {sorted(family)}")
    G = family[cfg.family](cfg)
    G.apply(init_weights)
    return G


def build_discriminator(cfg: NetConfig) -> nn.Module:
    from aigc.models import dcgan, mlp

    D = {"dcgan": dcgan.Discriminator, "mlp": mlp.Discriminator}[cfg.family](cfg)
    D.apply(init_weights)
    if cfg.spectral_norm:
        apply_spectral_norm(D)
    return D


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018) of every conv and linear weight of ``module``:
    each layer becomes 1-Lipschitz, which bounds how fast D's logits can run away from G."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(m)
    return module


def generator_payload(G: nn.Module, cfg: NetConfig) -> dict[str, Any]:
    """What the generator file holds: weights plus the config that rebuilds the network."""
    state = {k: v.detach().cpu() for k, v in G.state_dict().items()}
    return {"format": GENERATOR_FORMAT, "config": cfg.to_dict(), "state_dict": state}


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, NetConfig]:
    """Rebuild a generator from its file alone; returned in eval mode."""
    from aigc.io import load_net_file

    payload = load_net_file(path, GENERATOR_FORMAT, "generator", map_location=map_location)
    cfg = NetConfig(**payload["config"])
    G = build_generator(cfg)
    G.load_state_dict(payload["state_dict"])
    return G.eval(), cfg


@torch.no_grad()
def sample(G: nn.Module, z_dim: int, n: int, seed: int, device: str | torch.device = "cpu",
           batch_size: int = 256) -> torch.Tensor:
    """``n`` images in [-1, 1] (N, C, H, W) from ``G`` with a seeded z (same seed, same images)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=gen)
    was_training = G.training
    G.eval()
    out = torch.cat([G(z[i:i + batch_size].to(device)).float().cpu() for i in range(0, n, batch_size)])
    G.train(was_training)
    return out


def net_config(model: Any, info: dict[str, Any]) -> NetConfig:
    """The network config from params' ``model`` section and what dataset.json says of the data."""
    h, w = info["resolution"]
    return NetConfig(family=model.family, z_dim=model.z_dim, channels=int(info["channels"]), height=int(h), width=int(w),
                     g_widths=tuple(model.g_widths), d_widths=tuple(model.d_widths), kernel=model.kernel,
                     d_dropout=model.d_dropout, spectral_norm=model.spectral_norm)
