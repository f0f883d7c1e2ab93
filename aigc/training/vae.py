"""The VAE recipe of the training loop: the ELBO.

It maximises the ELBO (Kingma & Welling 2014) of each image,

    log p(x) >= E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)),

with the reconstruction likelihood ``vae.likelihood`` (aigc/models/vae.py says how the decoder's
output parameterises it), optionally a KL weight ``vae.beta`` ramped up from 0 over
``vae.kl_warmup_epochs`` (Bowman et al. 2016: the warm-up keeps the encoder from collapsing onto
the prior before the decoder learns to use z). With ``net.conditional`` both halves see the label.

Each step reports, in nats per image --

* ``loss``: what is minimised, recon + beta_t * kl;
* ``recon``: -log p(x|z), the reconstruction term (one z per image);
* ``kl``: KL(q(z|x) || p(z));
* ``neg_elbo``: recon + kl, the negative ELBO (an upper bound on -log p(x); lower is better);
* ``beta``: the KL weight used at that step;

and the loop (aigc/training/loop.py) does the rest: epochs, the guard, checkpoints, grids, DDP.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from aigc.config import RuntimeConfig, TrainConfig, VAEConfig
from aigc.errors import UserError
from aigc.models import NetConfig, build_encoder, build_generator
from aigc.models.vae import recon_nll
from aigc.stats import Stats
from aigc.training.loop import Batch, Hooks, Recipe, Setup, Stateful, TrainData, TrainResult, train

VAE_KEYS = ("loss", "recon", "kl", "neg_elbo", "beta")
IWAE_SAMPLES = 64  # samples of q(z|x) in the held-out likelihood bound (Burda et al. 2016 use 5000 at the end)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image (N,), nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def elbo_terms(encoder: torch.nn.Module, decoder: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None,
               vae: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(recon, kl), each (N,): one reparameterised z ~ q(z|x) per image."""
    cond = () if y is None else (y,)
    mu, logvar = encoder(x, *cond)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # the reparameterisation trick
    return recon_nll(decoder.logits(z, *cond), x, vae.likelihood, vae.sigma), kl_normal(mu, logvar)


class ELBO(nn.Module):
    """Encoder and decoder as one module whose forward gives the ELBO's terms, so DDP can wrap the
    pair as one (its gradients are all-reduced in one pass)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, vae: VAEConfig) -> None:
        super().__init__()
        self.encoder, self.decoder, self.vae = encoder, decoder, vae

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return elbo_terms(self.encoder, self.decoder, x, y, self.vae)


@dataclasses.dataclass(eq=False)
class VAERecipe(Recipe):
    """The encoder and decoder trained by maximising the ELBO (``vae``)."""

    vae: VAEConfig
    net: NetConfig
    family = "vae"
    hint = "Lower vae.lr, or use vae.likelihood: bernoulli"

    def __post_init__(self) -> None:
        if self.net.family != "vae":
            raise UserError(f"the VAE recipe trains the vae family, not {self.net.family!r}")

    def setup(self, ctx: Setup) -> None:
        self.encoder = build_encoder(self.net).to(ctx.device)
        self.decoder = build_generator(self.net).to(ctx.device)  # the decoder: this family's generator
        self.opt = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()], lr=self.vae.lr)
        model = ELBO(self.encoder, self.decoder, self.vae)
        self.model = torch.compile(model) if ctx.compile else model
        if ctx.ddp.enabled:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if ctx.device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())
        self.warmup_steps = self.vae.kl_warmup_epochs * self.steps_per_epoch(len(ctx.data), ctx.batch_size)

    def step(self, batch: Batch, stats: Stats) -> None:
        vae, step = self.vae, batch.step
        beta = vae.beta * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else vae.beta
        # One step on the batch's mean of recon + beta * KL (the negative ELBO when beta = 1).
        with self.amp:
            recon, kl = self.model(batch.real, batch.labels)
            recon, kl = recon.float().mean(), kl.float().mean()
            loss = recon + beta * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        for name, value in (("loss", loss), ("recon", recon), ("kl", kl), ("neg_elbo", recon + kl), ("beta", beta)):
            stats.report(name, value)

    def train_mode(self) -> None:
        self.encoder.train()
        self.decoder.train()

    def sampled(self) -> torch.nn.Module:
        return self.decoder

    def finish(self, state: dict[str, Any]) -> None:
        self.encoder.eval()
        self.decoder.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"vae": self.vae.model_dump(), "decoder": self.decoder.state_dict(),
                "encoder": self.encoder.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.decoder.load_state_dict(state["decoder"])
        self.opt.load_state_dict(state["opt"])

    def likelihood(self, data: TrainData, k: int = IWAE_SAMPLES) -> dict[str, Any]:
        from aigc.training.likelihood import vae_bits_per_dim

        return {"bits_per_dim": vae_bits_per_dim(self.encoder, self.decoder, data.images, data.labels, k=k,
                                                 vae=self.vae),
                "likelihood": f"upper bound (importance-weighted, k={k}; under vae.likelihood {self.vae.likelihood})"}

    def postfix(self, last: dict[str, float]) -> dict[str, str]:
        return {"neg_elbo": f"{last.get('neg_elbo', float('nan')):.1f}", "kl": f"{last.get('kl', float('nan')):.1f}"}

    def probe_key(self, batch_size: int) -> str:
        return f"vae {json.dumps(self.net.to_dict() | {'classes': None, 'class_share': None}, sort_keys=True)} " \
               f"batch {batch_size} {self.vae.likelihood}"

    def for_probe(self) -> "VAERecipe":
        return VAERecipe(self.vae, self.net)

    @property
    def nets(self) -> dict[str, torch.nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}


def train_vae(cfg: TrainConfig, vae: VAEConfig, net: NetConfig, images: torch.Tensor, seed: int, *,
              labels: torch.Tensor | None = None, hooks: Hooks | None = None, runtime: RuntimeConfig | None = None,
              resume: dict[str, Any] | None = None, extra: dict[str, Stateful] | None = None,
              **hook_fns: Any) -> TrainResult:
    """The loop with the VAE recipe: encoder and decoder on ``images`` ([-1, 1], (N, C, H, W)) by
    maximising the ELBO; ``labels`` (class indices (N,)) when ``net.conditional``. ``hook_fns``:
    the fields of :class:`Hooks` (on_steps=..., progress=False), instead of ``hooks``."""
    return train(cfg, VAERecipe(vae, net), TrainData(images, labels),
                 hooks or Hooks(**hook_fns), seed=seed, runtime=runtime,
                 resume=resume, extra=extra)


@torch.no_grad()
def neg_elbo(recipe: VAERecipe, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 500,
             seed: int = 0) -> float:
    """Mean negative ELBO (nats per image, beta = 1) of ``images`` under a trained VAE: held-out data
    scored on the same scale as training's ``neg_elbo``."""
    enc, dec = recipe.encoder.cpu().eval(), recipe.decoder.cpu().eval()
    vae = recipe.vae.model_copy(update={"beta": 1.0})
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch_size):
            y = labels[i:i + batch_size] if labels is not None else None
            recon, kl = elbo_terms(enc, dec, images[i:i + batch_size].float(), y, vae)
            total += float((recon + kl).sum())
    return total / max(len(images), 1)
