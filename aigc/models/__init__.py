"""Generators and discriminators, built from a small typed config that the checkpoint carries.

``NetConfig`` holds everything needed to rebuild a network (family, z size, image shape, and for
a conditional model its classes and their shares in the data), so ``load_generator(path)`` works
from the file alone, without params.yaml or dataset.json (nanoGPT's ``model_args``).

Families: ``dcgan`` and ``mlp`` (GANs: G and D), ``vae`` (encoder and decoder; the decoder is
the generator), ``pixelcnn`` (autoregressive, aigc/models/pixelcnn.py: the one network is the
generator; its ``G(z)`` samples, with one z per sub-pixel, so z_dim = C*H*W). ``conditional``
dcgan swaps in aigc/models/conditional.py (conditional-BatchNorm G, projection D); a conditional
vae feeds the class to both halves, a conditional pixelcnn adds a per-class bias in each gated
layer. A conditional generator is called ``G(z, y)`` with class indices y; :func:`sample` draws y
by the data's class shares when no labels are given.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from aigc.errors import UserError

GENERATOR_FORMAT = "aigc.generator/1"


@dataclass(frozen=True)
class NetConfig:
    family: str  # "dcgan" | "mlp" | "vae" | "pixelcnn"
    z_dim: int
    channels: int
    height: int
    width: int
    # dcgan only (the defaults are the source documents' net, so older files rebuild unchanged):
    g_widths: tuple[int, ...] = (256, 128, 64)  # G's channels from the projection on; the last two layers upsample
    d_widths: tuple[int, ...] = (64, 128, 256)  # D's stride-2 convolutions
    kernel: int = 5
    upsample: str = "transposed"  # G's doubling layers: "transposed" | "nearest" (upsample, then a convolution)
    d_dropout: float = 0.3
    spectral_norm: bool = False  # D's conv/linear weights divided by their largest singular value
    # pixelcnn only (0 in files of the other families, so older files load unchanged):
    pixel_layers: int = 0  # gated layers (the first one 7x7 with mask A, the rest 3x3 with mask B)
    pixel_width: int = 0  # channels of each stack
    # Conditional models only (defaults keep older, unconditional files loading):
    conditional: bool = False
    classes: tuple[int, ...] = ()  # the dataset's label values; class index i is classes[i]
    class_share: tuple[float, ...] = ()  # each class's share of the train split (labels drawn by it)

    def __post_init__(self) -> None:
        # From JSON or a checkpoint the widths arrive as lists; keep the config hashable and comparable.
        object.__setattr__(self, "g_widths", tuple(int(w) for w in self.g_widths))
        object.__setattr__(self, "d_widths", tuple(int(w) for w in self.d_widths))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"classes": list(self.classes), "class_share": list(self.class_share)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NetConfig":
        return cls(**(d | {"classes": tuple(int(k) for k in d.get("classes", ())),
                           "class_share": tuple(float(s) for s in d.get("class_share", ()))}))

    def class_index(self, label: int) -> int:
        """The class index of a dataset label value; a UserError naming the classes if unknown."""
        if label not in self.classes:
            raise UserError(f"unknown label {label}: the classes are {list(self.classes)}")
        return self.classes.index(label)

    def grid_labels(self, n: int) -> torch.Tensor:
        """Class indices for a sample grid of ``n``: the classes in order, in equal runs."""
        return torch.arange(n) * self.num_classes // n

    def class_indices(self, labels: Any) -> torch.Tensor:
        """Dataset label values (array-like) -> class indices (N,) int64; unknown values are a UserError."""
        values = torch.as_tensor(labels, dtype=torch.int64)
        lookup = {k: i for i, k in enumerate(self.classes)}
        bad = sorted(set(values.tolist()) - set(lookup))
        if bad:
            raise UserError(f"labels {bad[:5]} are not among the model's classes {list(self.classes)}"
                            + ("; -1 marks an unlabelled image, and conditional training needs every image "
                               "labelled" if -1 in bad else ""))
        return torch.tensor([lookup[v] for v in values.tolist()], dtype=torch.int64)


def init_weights(m: nn.Module) -> None:
    """The DCGAN paper's init: conv/linear weights N(0, 0.02), norm scales N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:  # conditional BN has no own affine
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def _check_conditional(cfg: NetConfig) -> None:
    if cfg.conditional and cfg.family == "mlp":
        raise UserError("model.conditional = True: the mlp family has no conditional variant; use dcgan or vae")
    if cfg.conditional and (cfg.num_classes < 2 or len(cfg.class_share) != cfg.num_classes):
        raise UserError(f"a conditional model needs at least 2 classes with their shares; got classes "
                        f"{list(cfg.classes)} and shares {list(cfg.class_share)}")


def build_generator(cfg: NetConfig) -> nn.Module:
    """The generator (for ``vae``: the decoder), initialised."""
    from aigc.models import conditional, dcgan, mlp, pixelcnn, vae

    family = {"dcgan": dcgan.Generator, "mlp": mlp.Generator, "vae": vae.Decoder, "pixelcnn": pixelcnn.PixelCNN}
    if cfg.family not in family:
        raise UserError(f"unknown model family {cfg.family!r}; expected one of {sorted(family)}")
    _check_conditional(cfg)
    G = (conditional.Generator if cfg.conditional and cfg.family == "dcgan" else family[cfg.family])(cfg)
    if cfg.family in ("dcgan", "mlp"):  # the DCGAN init is a GAN recipe; vae and pixelcnn keep PyTorch's defaults
        G.apply(init_weights)
    return G


def build_discriminator(cfg: NetConfig) -> nn.Module:
    from aigc.models import conditional, dcgan, mlp

    if cfg.family == "vae":
        raise UserError("the vae family has no discriminator (its other half is build_encoder)")
    if cfg.family == "pixelcnn":
        raise UserError("the pixelcnn family has no discriminator: it is trained by maximum likelihood alone")
    _check_conditional(cfg)
    D = (conditional.ProjectionDiscriminator if cfg.conditional
         else {"dcgan": dcgan.Discriminator, "mlp": mlp.Discriminator}[cfg.family])(cfg)
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


def build_encoder(cfg: NetConfig) -> nn.Module:
    """The vae family's encoder q(z | x[, y])."""
    from aigc.models import vae

    if cfg.family != "vae":
        raise UserError(f"the {cfg.family} family has no encoder" + (
            " (it is an autoregressive model: its likelihood is exact)" if cfg.family == "pixelcnn" else ""))
    _check_conditional(cfg)
    return vae.Encoder(cfg)


def is_conditional(G: nn.Module) -> bool:
    """Whether ``G`` is called as ``G(z, y)``."""
    return bool(getattr(G, "conditional", False))


def generator_payload(G: nn.Module, cfg: NetConfig) -> dict[str, Any]:
    """What the generator file holds: weights plus the config that rebuilds the network."""
    state = {k: v.detach().cpu() for k, v in G.state_dict().items()}
    return {"format": GENERATOR_FORMAT, "config": cfg.to_dict(), "state_dict": state}


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, NetConfig]:
    """Rebuild a generator from its file alone; returned in eval mode."""
    from aigc.io import load_net_file

    payload = load_net_file(path, GENERATOR_FORMAT, "generator", map_location=map_location)
    cfg = NetConfig.from_dict(payload["config"])
    G = build_generator(cfg)
    G.load_state_dict(payload["state_dict"])
    return G.eval(), cfg


@torch.no_grad()
def draw(G: nn.Module, z_dim: int, n: int, seed: int, device: str | torch.device = "cpu",
         batch_size: int = 256, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` images in [-1, 1] (N, C, H, W) from ``G`` with a seeded z (same seed, same images), and
    the class indices they were asked for (None for an unconditional G).

    A conditional G gets ``labels`` (class indices, (N,)) or, without them, classes drawn by the
    data's class shares from the same seeded stream, after z (so z is the same either way).
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=gen)
    y = None
    if is_conditional(G):
        y = (torch.multinomial(G.class_share, n, replacement=True, generator=gen) if labels is None
             else torch.as_tensor(labels, dtype=torch.int64).expand(n))
    was_training = G.training
    G.eval()
    # A progress bar once sampling has taken 5 s (an autoregressive G: minutes for the evaluate stage's 10,000).
    with tqdm(total=n, desc="sampling", unit="img", delay=5, leave=False, disable=n <= batch_size,
              mininterval=1.0 if sys.stderr.isatty() else 15.0) as bar:
        parts = []
        for i in range(0, n, batch_size):
            zb = z[i:i + batch_size].to(device)
            parts.append((G(zb) if y is None else G(zb, y[i:i + batch_size].to(device))).float().cpu())
            bar.update(len(zb))
    out = torch.cat(parts)
    G.train(was_training)
    return out, y


def sample(G: nn.Module, z_dim: int, n: int, seed: int, device: str | torch.device = "cpu",
           batch_size: int = 256, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The images of :func:`draw` (a conditional G without ``labels``: classes by the data's shares)."""
    return draw(G, z_dim, n, seed, device, batch_size, labels)[0]


def _labelled(info: dict[str, Any]) -> tuple[list[int], list[int], int]:
    """dataset.json's labelled classes, their train-split counts, and the unlabelled (-1) count."""
    classes = [int(k) for k in info.get("classes", [])]
    per_class = info.get("counts", {}).get("train_per_class", {})
    return classes, [int(per_class.get(str(k), 0)) for k in classes], int(per_class.get("-1", 0))


def conditioning(model: Any, info: dict[str, Any]) -> tuple[bool, str]:
    """Whether the model is conditional on this data, and why in words (``model.conditional``:
    true, false, or "auto": conditional when the family has a conditional variant, dataset.json
    lists 2+ classes and every training image is labelled).

    ``model.conditional: true`` on data that cannot support it is a UserError naming what is
    missing; "auto" falls back to an unconditional model and says why.
    """
    setting = getattr(model, "conditional", False)
    if setting is False:
        return False, "model.conditional = false"
    classes, counts, unlabelled = _labelled(info)
    if setting == "auto":
        if model.family == "mlp":
            return False, "model.conditional = auto -> unconditional: the mlp family has no conditional variant"
        if len(classes) < 2 or sum(counts) == 0:
            return False, (f"model.conditional = auto -> unconditional: dataset.json lists {len(classes)} "
                           f"class(es) {classes}; conditioning needs 2 or more")
        if unlabelled:
            return False, (f"model.conditional = auto -> unconditional: {unlabelled} of {unlabelled + sum(counts)} "
                           "training images have no label (-1)")
        return True, f"model.conditional = auto -> conditional on {len(classes)} classes (every training image labelled)"
    if len(classes) < 2 or sum(counts) == 0:
        raise UserError(f"model.conditional = true needs labelled data with at least 2 classes, but dataset.json "
                        f"lists {len(classes)} class(es) {classes}; use a source with labels or set "
                        "model.conditional: false (or auto)")
    if unlabelled:
        raise UserError(f"model.conditional = true needs every training image labelled, but {unlabelled} of "
                        f"{unlabelled + sum(counts)} have no label (-1); label them, drop them from the source, "
                        "or set model.conditional: false (or auto)")
    return True, "model.conditional = true"


def net_config(model: Any, info: dict[str, Any], conditional: bool | None = None, pixelcnn: Any = None) -> NetConfig:
    """The network config from params' ``model`` section and what dataset.json says of the data
    (and, for the pixelcnn family, its size from params' ``pixelcnn`` section; its z_dim is C*H*W,
    one z per sub-pixel, whatever ``model.z_dim`` says).

    A conditional model takes its classes and their train-split shares from dataset.json; whether
    the model is conditional is :func:`conditioning`'s answer (true on a dataset without labels
    is a UserError saying so; "auto" decides by the data), unless the caller already has it.
    """
    h, w = info["resolution"]
    base = dict(family=model.family, z_dim=model.z_dim, channels=int(info["channels"]), height=int(h), width=int(w),
                g_widths=tuple(model.g_widths), d_widths=tuple(model.d_widths), kernel=model.kernel, upsample=model.upsample,
                d_dropout=model.d_dropout, spectral_norm=model.spectral_norm)
    if model.family == "pixelcnn":
        if pixelcnn is None:
            raise UserError("the pixelcnn family needs the pixelcnn section (layers, width) to build its network")
        base |= dict(z_dim=base["channels"] * base["height"] * base["width"], pixel_layers=pixelcnn.layers,
                     pixel_width=pixelcnn.width)
    if not (conditioning(model, info)[0] if conditional is None else conditional):
        return NetConfig(**base)
    classes, counts, _ = _labelled(info)
    share = tuple(c / sum(counts) for c in counts)
    return NetConfig(**base, conditional=True, classes=tuple(classes), class_share=share)
