"""The VAE training loop: one plain function of (config, tensors, hooks), like ``train_gan``.

It maximises the ELBO (Kingma & Welling 2014) of each image,

    log p(x) >= E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)),

with the reconstruction likelihood ``vae.likelihood`` (aigc/models/vae.py says how the decoder's
output parameterises it), optionally a KL weight ``vae.beta`` ramped up from 0 over
``vae.kl_warmup_epochs`` (Bowman et al. 2016: the warm-up keeps the encoder from collapsing onto
the prior before the decoder learns to use z). With ``net.conditional`` both halves see the label.

Progress leaves through the same hooks as the GAN loop (aigc/training.py): ``on_steps`` gets
windows of per-step scalars, in nats per image --

* ``loss``: what is minimised, recon + beta_t * kl;
* ``recon``: -log p(x|z), the reconstruction term (one z per image);
* ``kl``: KL(q(z|x) || p(z));
* ``neg_elbo``: recon + kl, the negative ELBO (an upper bound on -log p(x); lower is better);
* ``beta``: the KL weight used at that step;

and ``on_epoch`` gets a grid of samples decoded from a fixed z (and fixed classes).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aigc.config import TrainConfig, VAEConfig
from aigc.errors import UserError
from aigc.images import make_grid
from aigc.models import NetConfig, build_encoder, build_generator
from aigc.runtime import CoreWatch, choose_threads, free_threads, resolve_device
from aigc.stats import Stats
from aigc.training import CHECKPOINT_FORMAT, EpochEnd, StepWindow, TrainingDiverged, rng_state, set_rng_state

VAE_KEYS = ("loss", "recon", "kl", "neg_elbo", "beta")


@dataclass
class VAEResult:
    G: torch.nn.Module  # the decoder: this family's generator
    encoder: torch.nn.Module
    opt: torch.optim.Optimizer
    net: NetConfig
    steps: int
    epochs: int
    seconds: float
    images_per_s: float
    last: dict[str, float] = field(default_factory=dict)  # mean scalars of the last window
    rng: dict[str, Any] = field(default_factory=dict)
    threads: int = 0
    device: str = "cpu"
    state: dict[str, Any] = field(default_factory=dict)  # the final checkpoint (complete when all epochs ran)


def recon_nll(logits: torch.Tensor, x: torch.Tensor, likelihood: str, sigma: float) -> torch.Tensor:
    """-log p(x|z) per image (N,), nats; ``x`` in [-1, 1], ``logits`` the decoder's raw output."""
    if likelihood == "bernoulli":
        # The pixel intensity (x + 1) / 2 in [0, 1] as the Bernoulli target (the usual MNIST VAE).
        return F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").flatten(1).sum(1)
    mean = torch.tanh(logits / 2)
    d = x[0].numel()
    return 0.5 * ((x - mean) / sigma).pow(2).flatten(1).sum(1) + d * (math.log(sigma) + 0.5 * math.log(2 * math.pi))


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


def train_vae(
    cfg: TrainConfig,
    vae: VAEConfig,
    net: NetConfig,
    images: torch.Tensor,
    seed: int,
    on_steps: Callable[[StepWindow], None] | None = None,
    on_epoch: Callable[[EpochEnd], None] | None = None,
    progress: bool = True,
    labels: torch.Tensor | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    abort: Callable[[], bool] | None = None,
) -> VAEResult:
    """Train the encoder and decoder on ``images`` ([-1, 1], (N, C, H, W)) by maximising the ELBO.

    ``labels``: class indices (N,), needed when ``net.conditional``. ``on_checkpoint`` and
    ``resume`` work as in :func:`aigc.training.train_gan`; so does ``abort`` (asked after every
    window: True ends training there, e.g. a benchmark's time budget).
    """
    if net.family != "vae":
        raise UserError(f"train_vae trains the vae family, not {net.family!r}")
    if len(images) < cfg.batch_size:
        raise UserError(f"the train split has {len(images)} images, fewer than train.batch_size = "
                        f"{cfg.batch_size}; lower the batch size")
    if tuple(images.shape[1:]) != net.image_shape:
        raise UserError(f"images are {tuple(images.shape[1:])}, the model expects {net.image_shape}")
    if net.conditional and (labels is None or len(labels) != len(images)):
        raise UserError(f"a conditional model needs one label per training image; got "
                        f"{'none' if labels is None else len(labels)} for {len(images)} images")

    device = resolve_device(cfg.device)
    threads, watch = torch.get_num_threads(), None
    if device.type == "cpu":
        threads = choose_threads(cfg.threads)
        torch.set_num_threads(threads)
        watch = CoreWatch() if cfg.threads == "auto" else None
    torch.manual_seed(seed)  # weights and the reparameterisation noise follow from the seed
    order = torch.Generator().manual_seed(seed)  # batch order, independent of the device
    encoder, decoder = build_encoder(net).to(device), build_generator(net).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=vae.lr)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())

    data = images.to(device, dtype=torch.float32)
    y_data = labels.to(device, torch.int64) if net.conditional else None
    fixed_z = torch.randn(cfg.grid_size, net.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    fixed_y = net.grid_labels(cfg.grid_size).to(device) if net.conditional else None
    n, b = len(data), cfg.batch_size
    steps_per_epoch = n // b
    total = steps_per_epoch * cfg.epochs
    warmup_steps = vae.kl_warmup_epochs * steps_per_epoch

    stats = Stats()  # the same sink as the GAN loop: the recorder takes whatever names appear
    last: dict[str, float] = {}
    step, start_epoch, seconds_before = 0, 0, 0.0
    if resume is not None:
        if resume.get("format") != CHECKPOINT_FORMAT or resume.get("family") != "vae" or resume["seed"] != seed:
            raise UserError("the checkpoint is not of this VAE run; delete it to train from the start")
        encoder.load_state_dict(resume["encoder"])
        decoder.load_state_dict(resume["decoder"])
        opt.load_state_dict(resume["opt"])
        step, start_epoch = resume["step"], resume["epoch"]
        last, seconds_before = dict(resume["loop"]["last"]), resume["loop"]["seconds"]
        set_rng_state(resume["rng"], order, device)
    t_start, t_hooks = time.perf_counter(), 0.0
    t_window, imgs_window = t_start, 0
    bar = tqdm(total=total, initial=step, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0, desc=f"epoch {start_epoch + 1}/{cfg.epochs}")

    def state(epoch: int) -> dict[str, Any]:
        """The resume state at the end of ``epoch`` (0: before the first); tensors are the live ones."""
        return {
            "format": CHECKPOINT_FORMAT, "family": "vae", "net": net.to_dict(), "train": cfg.model_dump(),
            "vae": vae.model_dump(), "seed": seed, "step": step, "epoch": epoch,
            "decoder": decoder.state_dict(), "encoder": encoder.state_dict(), "opt": opt.state_dict(),
            "rng": rng_state(order, device),
            "loop": {"last": dict(last), "seconds": seconds_before + time.perf_counter() - t_start - t_hooks},
            "extra": {}, "complete": False,
        }

    def checkpoint(epoch: int) -> None:
        nonlocal t_hooks, t_window
        t_hook = time.perf_counter()
        on_checkpoint(state(epoch))
        t_window = time.perf_counter()
        t_hooks += t_window - t_hook

    def flush(epoch: int) -> None:
        nonlocal t_window, imgs_window, last
        if not len(stats):
            return
        collected = stats.collect()  # one host sync per window
        for s_, row in collected:
            for key, value in row.items():
                if not math.isfinite(value):
                    raise TrainingDiverged(f"training diverged at step {s_} (epoch {epoch}): {key} = {value}; no model "
                                           "was saved. Lower vae.lr, or use vae.likelihood: bernoulli")
        steps_, rows = [s_ for s_, _ in collected], [r for _, r in collected]
        now = time.perf_counter()
        ips = imgs_window / max(now - t_window, 1e-9)
        last = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        bar.set_postfix(neg_elbo=f"{last['neg_elbo']:.1f}", kl=f"{last['kl']:.1f}", img_s=f"{ips:.0f}",
                        threads=threads)
        if on_steps:
            on_steps(StepWindow(epoch, steps_, rows, ips, seconds_before + now - t_start - t_hooks, decoder))
        t_window, imgs_window = time.perf_counter(), 0

    encoder.train()
    decoder.train()
    epoch, stopped = start_epoch, False
    if on_checkpoint is not None and resume is None:
        checkpoint(0)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if epoch > start_epoch + 1:
            bar.set_description(f"epoch {epoch}/{cfg.epochs}")
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * b:(i + 1) * b]
            x = data[idx]
            y = y_data[idx] if y_data is not None else None
            beta = vae.beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps else vae.beta

            # One step on the batch's mean of recon + beta * KL (the negative ELBO when beta = 1).
            with amp:
                recon, kl = elbo_terms(encoder, decoder, x, y, vae)
                recon, kl = recon.float().mean(), kl.float().mean()
                loss = recon + beta * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

            step += 1
            imgs_window += b
            for name, value in (("loss", loss), ("recon", recon), ("kl", kl), ("neg_elbo", recon + kl), ("beta", beta)):
                stats.report(name, value)
            stats.end_step(step)
            bar.update(1)
            if len(stats) >= cfg.log_every:
                flush(epoch)
                if abort is not None and abort():
                    stopped = True
                    break
        flush(epoch)
        if stopped or (abort is not None and abort()):
            break
        if watch is not None:
            wanted = free_threads(watch.others_busy())
            if wanted != threads:
                threads = wanted
                torch.set_num_threads(threads)
        if on_epoch and (epoch % cfg.sample_every == 0 or epoch == cfg.epochs):
            t_hook = time.perf_counter()
            with torch.no_grad():
                decoder.eval()
                grid = make_grid(decoder(fixed_z, *(() if fixed_y is None else (fixed_y,))).float())
                on_epoch(EpochEnd(epoch, step, seconds_before + t_hook - t_start - t_hooks, grid, decoder))
                decoder.train()
            t_window = time.perf_counter()  # sampling and hooks are not training time
            t_hooks += t_window - t_hook
        if on_checkpoint is not None and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 \
                and epoch < cfg.epochs:
            checkpoint(epoch)
    bar.close()

    seconds = seconds_before + time.perf_counter() - t_start - t_hooks
    final = state(cfg.epochs) | {"complete": True}
    return VAEResult(decoder.eval(), encoder.eval(), opt, net, step, cfg.epochs, seconds, step * b / max(seconds, 1e-9),
                     last, final["rng"], threads=threads if device.type == "cpu" else 0, device=str(device),
                     state=final)


@torch.no_grad()
def neg_elbo(result: VAEResult, images: torch.Tensor, vae: VAEConfig, labels: torch.Tensor | None = None,
             batch_size: int = 500, seed: int = 0) -> float:
    """Mean negative ELBO (nats per image, beta = 1) of ``images`` under a trained VAE: held-out data
    scored on the same scale as training's ``neg_elbo``."""
    enc, dec = result.encoder.cpu().eval(), result.G.cpu().eval()
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch_size):
            y = labels[i:i + batch_size] if labels is not None else None
            recon, kl = elbo_terms(enc, dec, images[i:i + batch_size].float(), y, vae)
            total += float((recon + kl).sum())
    return total / max(len(images), 1)


def vae_checkpoint_payload(result: VAEResult) -> dict[str, Any]:
    """Everything needed to resume or audit a VAE run: both halves, the optimiser, step, RNG."""
    return dict(result.state)
