"""The PixelCNN recipe of the training loop: maximum likelihood.

It minimises the exact negative log-likelihood of each image under the gated PixelCNN
(aigc/models/pixelcnn.py), the cross-entropy of every sub-pixel's 256-level softmax against the
image's own level, summed over the C*H*W sub-pixels; with ``net.conditional`` the net sees the
label. No second network, no sampling in the step: one forward, one backward, Adam at
``pixelcnn.lr``.

Each step reports --

* ``loss``: -log p(x), nats per image (what is minimised; the VAE's ``neg_elbo`` scale);
* ``bits_per_dim``: the same in bits per sub-pixel, loss / (C*H*W * ln 2) (8 = uniform over 256 levels);

and the loop (aigc/training/loop.py) does the rest: epochs, the guard, checkpoints, grids, DDP.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from aigc.config import PixelCNNConfig, RuntimeConfig, TrainConfig
from aigc.errors import UserError
from aigc.models import NetConfig, build_generator
from aigc.stats import Stats
from aigc.training.loop import Batch, Hooks, Recipe, Setup, Stateful, TrainData, TrainResult, train

PIXELCNN_KEYS = ("loss", "bits_per_dim")


class NLL(nn.Module):
    """The PixelCNN's -log p(x[, y]) per image as a module's forward, so DDP (and torch.compile) can
    wrap the training pass; the PixelCNN's own forward samples."""

    def __init__(self, G: nn.Module) -> None:
        super().__init__()
        self.G = G

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.G.nll(x, y)


@dataclasses.dataclass(eq=False)
class PixelCNNRecipe(Recipe):
    """The gated PixelCNN trained by maximum likelihood (``pixelcnn``)."""

    pixelcnn: PixelCNNConfig
    net: NetConfig
    family = "pixelcnn"
    hint = "Lower pixelcnn.lr"

    def __post_init__(self) -> None:
        if self.net.family != "pixelcnn":
            raise UserError(f"the PixelCNN recipe trains the pixelcnn family, not {self.net.family!r}")
        self.dims = self.net.channels * self.net.height * self.net.width  # sub-pixels per image

    def setup(self, ctx: Setup) -> None:
        self.G = build_generator(self.net).to(ctx.device)
        self.opt = torch.optim.Adam(self.G.parameters(), lr=self.pixelcnn.lr)
        model = NLL(self.G)
        self.model = torch.compile(model) if ctx.compile else model
        if ctx.ddp.enabled:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if ctx.device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())

    def step(self, batch: Batch, stats: Stats) -> None:
        with self.amp:
            loss = self.model(batch.real, batch.labels).float().mean()  # nats per image
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        stats.report("loss", loss)
        stats.report("bits_per_dim", loss / (self.dims * math.log(2)))

    def train_mode(self) -> None:
        self.G.train()

    def sampled(self) -> torch.nn.Module:
        return self.G

    def finish(self, state: dict[str, Any]) -> None:
        self.G.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"pixelcnn": self.pixelcnn.model_dump(), "G": self.G.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.opt.load_state_dict(state["opt"])

    def likelihood(self, data: TrainData) -> dict[str, Any]:
        from aigc.training.likelihood import bits_per_dim

        return {"bits_per_dim": bits_per_dim(self.G, data.images, data.labels), "likelihood": "exact"}

    def postfix(self, last: dict[str, float]) -> dict[str, str]:
        return {"bpd": f"{last.get('bits_per_dim', float('nan')):.3f}"}

    def probe_key(self, batch_size: int) -> str:
        return f"pixelcnn {json.dumps(self.net.to_dict() | {'classes': None, 'class_share': None}, sort_keys=True)} " \
               f"batch {batch_size}"

    def for_probe(self) -> "PixelCNNRecipe":
        return PixelCNNRecipe(self.pixelcnn, self.net)

    @property
    def nets(self) -> dict[str, torch.nn.Module]:
        return {"G": self.G}


def train_pixelcnn(cfg: TrainConfig, pixelcnn: PixelCNNConfig, net: NetConfig, images: torch.Tensor, seed: int, *,
                   labels: torch.Tensor | None = None, hooks: Hooks | None = None,
                   runtime: RuntimeConfig | None = None, resume: dict[str, Any] | None = None,
                   extra: dict[str, Stateful] | None = None, **hook_fns: Any) -> TrainResult:
    """The loop with the PixelCNN recipe on ``images`` ([-1, 1], (N, C, H, W)) by maximum
    likelihood; ``labels`` (class indices (N,)) when ``net.conditional``. ``hook_fns``: the fields
    of :class:`Hooks` (on_steps=..., progress=False), instead of ``hooks``."""
    return train(cfg, PixelCNNRecipe(pixelcnn, net), TrainData(images, labels), hooks or Hooks(**hook_fns),
                 seed=seed, runtime=runtime, resume=resume, extra=extra)
