"""The GAN training loop: one plain function of (config, tensors, hooks).

It knows nothing about MLflow, files or Prefect. Progress leaves through two hooks
(stylegan2-ada's ``progress_fn`` idea):

* ``on_steps(window)`` every ``train.log_every`` steps: the per-step scalars of that window;
* ``on_epoch(end)`` every ``train.sample_every`` epochs: an :class:`EpochEnd` with a sample grid
  from a fixed z (so grids from different epochs and runs are comparable), the training time
  so far, and the live generator (for a hook that snapshots or scores it; it must not change it).

Per-step scalars stay on the device and are copied to the host once per window: no ``.item()``
on the hot path, so a CUDA step never waits on a host sync.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from aigc.config import TrainConfig
from aigc.errors import UserError
from aigc.images import make_grid
from aigc.losses import d_loss_nonsaturating, g_loss_nonsaturating
from aigc.models import NetConfig, build_discriminator, build_generator
from aigc.runtime import CoreWatch, choose_threads, free_threads, resolve_device

STEP_KEYS = ("d_loss", "g_loss", "d_real", "d_fake")  # d_real = mean D(x), d_fake = mean D(G(z))


@dataclass
class StepWindow:
    """Scalars of consecutive steps, handed to ``on_steps`` in one batch."""

    epoch: int
    steps: list[int]
    rows: list[dict[str, float]]  # one {d_loss, g_loss, d_real, d_fake} per step
    images_per_s: float  # throughput over this window


@dataclass
class EpochEnd:
    """What ``on_epoch`` receives."""

    epoch: int
    step: int
    seconds: float  # training time so far; time spent in hooks and sampling is not counted
    grid: np.ndarray  # uint8 (H, W, C) samples from the fixed z
    G: torch.nn.Module


@dataclass
class TrainResult:
    G: torch.nn.Module
    D: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    net: NetConfig
    steps: int
    epochs: int
    seconds: float
    images_per_s: float
    last: dict[str, float] = field(default_factory=dict)  # mean scalars of the last window
    rng: dict[str, Any] = field(default_factory=dict)
    threads: int = 0  # CPU threads at the end (0 on CUDA)
    device: str = "cpu"


def train_gan(
    cfg: TrainConfig,
    net: NetConfig,
    images: torch.Tensor,
    seed: int,
    on_steps: Callable[[StepWindow], None] | None = None,
    on_epoch: Callable[[EpochEnd], None] | None = None,
    progress: bool = True,
    labels: torch.Tensor | None = None,
) -> TrainResult:
    """Train G and D on ``images`` ([-1, 1], (N, C, H, W)) with the non-saturating GAN loss.

    A conditional ``net`` also needs ``labels``: class indices (N,) of the images. Real images are
    judged with their own labels, fakes with classes drawn by ``net.class_share``.
    """
    # conditional: the labels must come with the images
    if net.conditional and (labels is None or len(labels) != len(images)):
        raise UserError(f"a conditional model needs one label per training image; got "
                        f"{'none' if labels is None else len(labels)} for {len(images)} images")
    if len(images) < cfg.batch_size:
        raise UserError(f"the train split has {len(images)} images, fewer than train.batch_size = "
                        f"{cfg.batch_size}; lower the batch size")
    if tuple(images.shape[1:]) != net.image_shape:
        raise UserError(f"images are {tuple(images.shape[1:])}, the model expects {net.image_shape}")

    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    watch = None
    if device.type == "cpu":
        threads = choose_threads(cfg.threads)
        torch.set_num_threads(threads)
        watch = CoreWatch() if cfg.threads == "auto" else None
    torch.manual_seed(seed)  # weights, dropout and z all follow from the seed
    order = torch.Generator().manual_seed(seed)  # batch order, independent of the device
    G = build_generator(net).to(device)
    D = build_discriminator(net).to(device)
    fmt = torch.channels_last if cfg.channels_last and net.family == "dcgan" else torch.contiguous_format
    G, D = G.to(memory_format=fmt), D.to(memory_format=fmt)
    # The optimisers hold the real modules; the step may run compiled views of them.
    G_step, D_step = (torch.compile(G), torch.compile(D)) if cfg.compile else (G, D)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    # Mixed precision on CUDA only (bf16 needs no loss scaling); CPU stays fp32.
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())

    # The whole split lives on the device: batches are slices of one tensor, no per-item collation.
    data = images.to(device, dtype=torch.float32).contiguous(memory_format=fmt)
    fixed_z = torch.randn(cfg.grid_size, net.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    # conditional: label tensors on the device; the grid shows the classes in order, in equal runs
    fixed_y = None
    if net.conditional:
        y_data = labels.to(device, torch.int64)
        share = torch.tensor(net.class_share, dtype=torch.float32, device=device)
        fixed_y = (torch.arange(cfg.grid_size) * net.num_classes // cfg.grid_size).to(device)
    cond = (lambda y: (y,)) if net.conditional else (lambda y: ())  # extra args of G and D
    n, b = len(data), cfg.batch_size
    steps_per_epoch = n // b  # drop the ragged last batch: BatchNorm and D's statistics want full ones
    total = steps_per_epoch * cfg.epochs

    buf: list[torch.Tensor] = []
    buf_steps: list[int] = []
    last: dict[str, float] = {}
    step, t_start, t_hooks = 0, time.perf_counter(), 0.0
    t_window, imgs_window = t_start, 0
    # In a log file (no terminal) a bar line every 15 s instead of every second.
    bar = tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0, desc=f"epoch 1/{cfg.epochs}")

    def flush(epoch: int) -> None:
        nonlocal t_window, imgs_window, last
        if not buf:
            return
        values = torch.stack(buf).float().cpu().tolist()  # the one host sync per window
        rows = [dict(zip(STEP_KEYS, v)) for v in values]
        now = time.perf_counter()
        ips = imgs_window / max(now - t_window, 1e-9)
        last = {k: float(np.mean([r[k] for r in rows])) for k in STEP_KEYS}
        bar.set_postfix(D=f"{last['d_loss']:.3f}", G=f"{last['g_loss']:.3f}", img_s=f"{ips:.0f}", threads=threads)
        if on_steps:
            on_steps(StepWindow(epoch, list(buf_steps), rows, ips))
        buf.clear()
        buf_steps.clear()
        t_window, imgs_window = time.perf_counter(), 0

    G.train()
    D.train()
    for epoch in range(1, cfg.epochs + 1):
        if epoch > 1:
            bar.set_description(f"epoch {epoch}/{cfg.epochs}")
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(steps_per_epoch):
            real = data[perm[i * b:(i + 1) * b]]
            z = torch.randn(b, net.z_dim, device=device)
            # conditional: the reals' own labels; the fakes' drawn by the data's class shares
            y_real = y_fake = None
            if net.conditional:
                y_real = y_data[perm[i * b:(i + 1) * b]]
                y_fake = torch.multinomial(share, b, replacement=True)

            # (1) Update D: maximise log D(x) + log(1 - D(G(z)))
            with amp:
                fake = G_step(z, *cond(y_fake))
                real_logits = D_step(real, *cond(y_real))
                fake_logits = D_step(fake.detach(), *cond(y_fake))
                d_loss = d_loss_nonsaturating(real_logits, fake_logits)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

            # (2) Update G: maximise log D(G(z)). D is frozen here: its weight gradients would
            # be thrown away, and not computing them saves a third of D's backward pass.
            D.requires_grad_(False)
            with amp:
                g_logits = D_step(fake, *cond(y_fake))
                g_loss = g_loss_nonsaturating(g_logits)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            D.requires_grad_(True)

            step += 1
            imgs_window += b
            buf.append(torch.stack([d_loss.detach(), g_loss.detach(),
                                    torch.sigmoid(real_logits.detach()).mean(),
                                    torch.sigmoid(fake_logits.detach()).mean()]))
            buf_steps.append(step)
            bar.update(1)
            if len(buf) >= cfg.log_every:
                flush(epoch)
        flush(epoch)
        if watch is not None:
            # Re-check between epochs: a neighbour that grabbed (or freed) a core changes the
            # best thread count for the next epoch.
            wanted = free_threads(watch.others_busy())
            if wanted != threads:
                threads = wanted
                torch.set_num_threads(threads)
                bar.write(f"CPU threads -> {threads} (other processes hold cores)" if threads == 1 else
                          f"CPU threads -> {threads}")
        if on_epoch and (epoch % cfg.sample_every == 0 or epoch == cfg.epochs):
            t_hook = time.perf_counter()
            with torch.no_grad():
                G.eval()
                grid = make_grid(G(fixed_z, *cond(fixed_y)).float())
                on_epoch(EpochEnd(epoch, step, t_hook - t_start - t_hooks, grid, G))
                G.train()
            t_window = time.perf_counter()  # sampling and hooks are not training time
            t_hooks += t_window - t_hook
    bar.close()

    seconds = time.perf_counter() - t_start - t_hooks
    rng = {"torch": torch.get_rng_state(), "order": order.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return TrainResult(G, D, opt_g, opt_d, net, step, cfg.epochs, seconds, step * b / seconds, last, rng,
                       threads=threads if device.type == "cpu" else 0, device=str(device))


def checkpoint_payload(result: TrainResult, train_cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """Everything needed to resume or audit a run: both networks, both optimisers, step, RNG."""
    return {
        "format": "aigc.checkpoint/1",
        "net": result.net.to_dict(),
        "train": train_cfg.model_dump(),
        "seed": seed,
        "step": result.steps,
        "epoch": result.epochs,
        "G": result.G.state_dict(),
        "D": result.D.state_dict(),
        "opt_g": result.opt_g.state_dict(),
        "opt_d": result.opt_d.state_dict(),
        "rng": result.rng,
    }
