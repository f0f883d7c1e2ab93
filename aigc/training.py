"""The GAN training loop: one plain function of (config, tensors, hooks).

It knows nothing about MLflow, files or Prefect. Progress leaves through plain hooks
(stylegan2-ada's ``progress_fn`` / ``abort_fn`` idea):

* ``on_steps(window)`` every ``train.log_every`` steps: the named scalars each step reported
  (``aigc.stats.Stats``: losses, penalties, D's outputs, the EMA decay ...), whatever they are;
* ``on_epoch(end)`` every ``train.sample_every`` epochs: an :class:`EpochEnd` with a sample grid
  from a fixed z (so grids from different epochs and runs are comparable), the training time
  so far, and the generator that is sampled (for a hook that snapshots or scores it; it must not
  change it);
* ``abort()`` after every window: True ends training there (a time budget, a benchmark);
* ``on_checkpoint(state)`` before the first epoch and after every ``train.checkpoint_every``
  epochs: everything a run needs to go on from there (:func:`resume_state`), for a hook that saves
  it. ``train_gan(..., resume=state)`` then continues as if never stopped: on CPU the final
  weights are bitwise those of an uninterrupted run (tests/test_resume.py).

What runs in a step is switched by ``train`` params: the loss (bce, hinge, wgan), the gradient
penalty, a lazy R1 step, DiffAugment on everything D sees, and an EMA of G, which is then the
generator that is sampled and saved. D's step and G's step are separate blocks under banners:
a wrapper of D (differential privacy) needs to see them apart.

With ``dp`` (privacy.dp, enabled) D is trained with DP-SGD (aigc/privacy/dp.py): real batches are
Poisson-sampled, reals and fakes go through D in one pass, D's hooks are off in G's step, and the
epsilon spent is reported as the scalar ``epsilon`` at the end of every epoch.

Per-step scalars stay on the device and are copied to the host once per window: no ``.item()``
on the hot path, so a CUDA step never waits on a host sync. The divergence guard reads them
there: a non-finite value, or D separating every real from every fake image for
``train.guard_steps`` consecutive steps, stops the run with :class:`TrainingDiverged`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from aigc import distributed
from aigc.augment import check_policy, diff_augment
from aigc.config import DPConfig, TrainConfig
from aigc.ema import GeneratorEMA
from aigc.errors import UserError
from aigc.images import make_grid
from aigc.losses import D_LOSSES, G_LOSSES, gradient_penalty, lazy_regularisation_scaling, r1_penalty
from aigc.models import NetConfig, build_discriminator, build_generator
from aigc.runtime import (CoreWatch, ProbeResult, choose_threads, free_threads, probe, resolve_device, unmeasured,
                          usable_cores)
from aigc.stats import Stats


class TrainingDiverged(UserError):
    """The run stopped because the game broke down (non-finite values, or D winning outright)."""


CHECKPOINT_FORMAT = "aigc.checkpoint/2"


class Stateful(Protocol):
    """Extra state a wrapper keeps beside the networks (e.g. a privacy accountant): what a
    checkpoint stores under ``extra`` and a resume hands back."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rng_state(order: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random stream a run draws from: torch's (CPU, and CUDA when used), the batch-order
    generator, numpy's and Python's global ones -- as tensors and plain values, so the checkpoint
    loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "order": order.get_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], order: torch.Generator, device: torch.device) -> None:
    """Put back what :func:`rng_state` took."""
    torch.set_rng_state(state["torch"])
    order.set_state(state["order"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_resume(state: dict[str, Any], cfg: TrainConfig, net: NetConfig, seed: int) -> None:
    """A resume state must be of this run: same format, network, seed and epochs left to train."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"cannot resume from a checkpoint of format {state.get('format')!r} "
                        f"(this version writes {CHECKPOINT_FORMAT!r}); delete it to train from the start")
    if NetConfig.from_dict(state["net"]) != net or state["seed"] != seed:
        raise UserError("the checkpoint is of another network or seed; delete it to train from the start")
    if state["epoch"] > cfg.epochs:
        raise UserError(f"the checkpoint is at epoch {state['epoch']}, past train.epochs = {cfg.epochs}; "
                        "delete it to train from the start")


@dataclass
class StepWindow:
    """Scalars of consecutive steps, handed to ``on_steps`` in one batch."""

    epoch: int
    steps: list[int]
    rows: list[dict[str, float]]  # one {name: value} per step: whatever that step reported
    images_per_s: float  # throughput over this window
    seconds: float = 0.0  # training time so far
    G: torch.nn.Module | None = None  # the generator that is sampled (the EMA one when on); do not change it


@dataclass
class EpochEnd:
    """What ``on_epoch`` receives."""

    epoch: int
    step: int
    seconds: float  # training time so far; time spent in hooks and sampling is not counted
    grid: np.ndarray  # uint8 (H, W, C) samples from the fixed z
    G: torch.nn.Module
    epsilon: float | None = None  # DP runs: the budget spent so far


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
    G_ema: torch.nn.Module | None = None  # the EMA generator (train.ema_kimg > 0), BN statistics re-estimated
    channels_last: bool = False  # the memory layout the step ran in
    probe: ProbeResult | None = None  # what train.channels_last / train.threads = auto measured (CPU only)
    state: dict[str, Any] = field(default_factory=dict)  # the final checkpoint (complete when all epochs ran)
    dp: Any = None  # DP runs: the aigc.privacy.dp.PrivateD (accountant, sigma, q); D above is the plain module

    @property
    def generator(self) -> torch.nn.Module:
        """What is saved, sampled, evaluated and served: the EMA generator when there is one."""
        return self.G_ema if self.G_ema is not None else self.G


def train_gan(
    cfg: TrainConfig,
    net: NetConfig,
    images: torch.Tensor,
    seed: int,
    on_steps: Callable[[StepWindow], None] | None = None,
    on_epoch: Callable[[EpochEnd], None] | None = None,
    progress: bool = True,
    abort: Callable[[], bool] | None = None,
    labels: torch.Tensor | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    extra: dict[str, Stateful] | None = None,
    dp: DPConfig | None = None,
) -> TrainResult:
    """Train G and D on ``images`` ([-1, 1], (N, C, H, W)) with the recipe ``cfg`` describes.

    A conditional ``net`` also needs ``labels``: class indices (N,) of the images. Real images are
    judged with their own labels, fakes with classes drawn by ``net.class_share``.

    ``dp`` (enabled) trains D with differential privacy (aigc/privacy/dp.py).

    ``resume``: a state ``on_checkpoint`` received (a checkpoint of this run) to go on from.
    ``extra``: objects with ``state_dict``/``load_state_dict`` saved in each checkpoint under
    ``extra`` and restored on resume. A private run's accountant travels the same way (``extra.dp``),
    so a resumed run goes on spending the same budget instead of starting again from epsilon 0.
    """
    extra = extra or {}
    private = dp is not None and dp.enabled
    # conditional: the labels must come with the images
    if net.conditional and (labels is None or len(labels) != len(images)):
        raise UserError(f"a conditional model needs one label per training image; got "
                        f"{'none' if labels is None else len(labels)} for {len(images)} images")
    if len(images) < cfg.batch_size:
        raise UserError(f"the train split has {len(images)} images, fewer than train.batch_size = "
                        f"{cfg.batch_size}; lower the batch size")
    if tuple(images.shape[1:]) != net.image_shape:
        raise UserError(f"images are {tuple(images.shape[1:])}, the model expects {net.image_shape}")
    policy = tuple(cfg.augment)
    check_policy(policy, net.channels)

    # Under torchrun: join the process group; train.batch_size is the global batch (aigc/distributed.py).
    ddp = distributed.from_env()
    device = distributed.setup(ddp, resolve_device(cfg.device))
    distributed.per_rank_batch(cfg.batch_size, ddp)  # the global batch must split evenly over the ranks
    if private:
        from aigc.privacy import dp as dp_lib

        if ddp.enabled:
            raise UserError("privacy.dp.enabled under torchrun: DP training runs in one process here (Opacus' "
                            "DPDDP is not wired in); run it without torchrun")
        dp_lib.quiet_opacus()
        net = dp_lib.private_net(net)  # no spectral norm in a private D (Opacus cannot clip through it)
    if resume is not None:  # against the network as trained (a private D's included)
        check_resume(resume, cfg, net, seed)
    if not ddp.is_main:  # hooks, the progress bar and every write belong to rank 0
        on_steps = on_epoch = on_checkpoint = None
        progress = False
    threads = torch.get_num_threads()
    watch = None
    # "auto" layout / threads: measured on this very step once per machine (cached), before the
    # seed is set, so the run itself is the same with or without a probe.
    found = None
    if device.type == "cpu" and "auto" in (cfg.channels_last, cfg.threads) and not ddp.enabled:
        found = probe_machine(cfg, net, images, labels, seed, layouts=(True, False) if net.family == "dcgan" else (False,))
        if progress:
            tqdm.write(f"speed probe: {found.describe()}", file=sys.stderr)
    channels_last = (found.channels_last if found and cfg.channels_last == "auto"
                     else cfg.channels_last if cfg.channels_last != "auto" else device.type == "cuda")
    if device.type == "cpu":
        threads = choose_threads(cfg.threads)
        if found and cfg.threads == "auto":
            threads = min(threads, found.threads)  # two vCPUs on one physical core: one thread may win
        torch.set_num_threads(threads)
        watch = CoreWatch() if cfg.threads == "auto" else None
    torch.manual_seed(seed)  # weights, dropout, z and augmentation all follow from the seed
    order = torch.Generator().manual_seed(seed)  # batch order, independent of the device
    G = build_generator(net).to(device)
    D = build_discriminator(net).to(device)
    fmt = torch.channels_last if channels_last and net.family == "dcgan" else torch.contiguous_format
    G, D = G.to(memory_format=fmt), D.to(memory_format=fmt)
    # The optimisers hold the real modules; the step may run compiled views of them.
    G_step, D_step = (torch.compile(G), torch.compile(D)) if cfg.compile else (G, D)
    G_step, D_step = distributed.wrap(G_step, D_step, ddp, device)  # DDP (+ SyncBatchNorm on CUDA)
    D_frozen = distributed.unwrap(D_step)  # the G step's D: no gradients, so no DDP reduction
    betas = (cfg.beta1, cfg.beta2)
    lr_d, betas_d = cfg.lr_d, betas
    lazy_r1 = cfg.r1_gamma > 0
    if lazy_r1:  # interval + 1 D steps per interval: stylegan2-ada's correction keeps the schedule
        lr_d, betas_d = lazy_regularisation_scaling(cfg.lr_d, betas, cfg.r1_interval)
    # Adam's fused kernel (one call for all parameters, CPU and CUDA): the same update as the
    # per-parameter loop, at a fraction of its dispatch cost on these small networks. Opacus wraps
    # D's optimiser and steps it itself, so a private D keeps the plain one.
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=betas, fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr_d, betas=betas_d, fused=not private)
    ema = GeneratorEMA(G, cfg.ema_kimg, cfg.ema_rampup) if cfg.ema_kimg > 0 else None
    pd = None  # DP: D, its optimiser and the real batches, wrapped by Opacus
    d_loss_fn, g_loss_fn = D_LOSSES[cfg.loss], G_LOSSES[cfg.loss]
    # Mixed precision on CUDA only (bf16 needs no loss scaling); CPU stays fp32.
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())

    cond = (lambda y: (y,)) if net.conditional else (lambda y: ())  # conditional: the extra argument of G and D

    def D_sees(x: torch.Tensor, y: torch.Tensor | None = None, D_: torch.nn.Module | None = None) -> torch.Tensor:
        """D's logits for ``x`` (of classes ``y`` when conditional) as D sees it: through DiffAugment,
        in D's step and in G's alike."""
        return (D_ or D_step)(diff_augment(x, policy) if policy else x, *cond(y))

    # The whole split lives on the device: batches are slices of one tensor, no per-item collation.
    data = images.to(device, dtype=torch.float32).contiguous(memory_format=fmt)
    fixed_z = torch.randn(cfg.grid_size, net.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    # conditional: label tensors on the device; the grid shows the classes in order, in equal runs
    fixed_y = None
    if net.conditional:
        y_data = labels.to(device, torch.int64)
        share = torch.tensor(net.class_share, dtype=torch.float32, device=device)
        fixed_y = net.grid_labels(cfg.grid_size).to(device)
    n, b = len(data), cfg.batch_size  # b: the global batch
    steps_per_epoch = n // b  # drop the ragged last batch: BatchNorm and D's statistics want full ones
    if private:  # Poisson batches (expected size ~b), b fakes beside them; sigma from the budget
        spent = (resume or {}).get("extra", {}).get("dp")  # resumed: sigma kept, the spent steps count
        pd = dp_lib.make_private(dp, D, opt_d, data, y_data if net.conditional else None, b,
                                 cfg.epochs - (resume["epoch"] if spent else 0), b, resume=spent)
        D_step = D_frozen = pd.D
        opt_d = pd.opt
        steps_per_epoch = pd.steps_per_epoch
    total = steps_per_epoch * cfg.epochs

    stats = Stats()
    last: dict[str, float] = {}
    separated_run = 0  # consecutive steps in which D separated every real from every fake
    step, start_epoch, seconds_before = 0, 0, 0.0
    if resume is not None:  # everything the loop carries from epoch to epoch, as it was
        G.load_state_dict(resume["G"])
        D.load_state_dict(resume["D"])
        opt_g.load_state_dict(resume["opt_g"])
        opt_d.load_state_dict(resume["opt_d"])
        if ema is not None:
            ema.G.load_state_dict(resume["G_ema"])
        for name, obj in extra.items():
            obj.load_state_dict(resume["extra"][name])
        step, start_epoch = resume["step"], resume["epoch"]
        separated_run, last, seconds_before = resume["loop"]["separated_run"], dict(resume["loop"]["last"]), \
            resume["loop"]["seconds"]
        set_rng_state(resume["rng"], order, device)
    t_start, t_hooks = time.perf_counter(), 0.0
    t_window, imgs_window = t_start, 0
    # In a log file (no terminal) a bar line every 15 s instead of every second.
    bar = tqdm(total=total, initial=step, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0, desc=f"epoch {start_epoch + 1}/{cfg.epochs}")

    def sampled() -> torch.nn.Module:
        return ema.G if ema is not None else G

    def state(epoch: int) -> dict[str, Any]:
        """The resume state at the end of ``epoch`` (0: before the first)."""
        return {
            "format": CHECKPOINT_FORMAT, "net": net.to_dict(), "train": cfg.model_dump(), "seed": seed,
            "step": step, "epoch": epoch,
            "G": G.state_dict(), "G_ema": ema.G.state_dict() if ema is not None else None, "D": D.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "rng": rng_state(order, device),
            "loop": {"separated_run": separated_run, "last": dict(last),
                     "seconds": seconds_before + time.perf_counter() - t_start - t_hooks},
            "extra": {name: obj.state_dict() for name, obj in extra.items()}
                     | ({"dp": pd.state_dict()} if pd is not None else {}),
            "complete": False,
        }

    def checkpoint(epoch: int) -> None:
        nonlocal t_hooks, t_window
        t_hook = time.perf_counter()
        on_checkpoint(state(epoch))
        t_window = time.perf_counter()  # saving is not training time
        t_hooks += t_window - t_hook

    def flush(epoch: int) -> None:
        nonlocal t_window, imgs_window, last, separated_run
        if not len(stats):
            return
        # the one host sync per window (and, distributed, the one all-reduce: the global batch's means)
        collected = stats.collect(reduce=lambda t: distributed.mean_across(t, ddp))
        for s, row in collected:  # the divergence guard
            for key, value in row.items():
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"training diverged at step {s} (epoch {epoch}): {key} = {value}; no model was saved. "
                        f"Lower train.lr_d / train.lr_g, or switch train.loss / add model.spectral_norm or train.r1_gamma")
            separated_run = separated_run + 1 if row.get("d_separated") == 1.0 else 0
            if cfg.guard_steps and separated_run >= cfg.guard_steps:
                raise TrainingDiverged(
                    f"training stopped at step {s} (epoch {epoch}): D separated every real from every fake image for "
                    f"{separated_run} consecutive steps (train.guard_steps), so G gets no useful signal; no model was "
                    "saved. Weaken D (model.spectral_norm, train.r1_gamma, train.augment, a lower train.lr_d)")
        steps_, rows = [s for s, _ in collected], [r for _, r in collected]
        now = time.perf_counter()
        ips = imgs_window / max(now - t_window, 1e-9)
        keys = dict.fromkeys(k for r in rows for k in r)
        last = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
        bar.set_postfix(D=f"{last.get('d_loss', float('nan')):.3f}", G=f"{last.get('g_loss', float('nan')):.3f}",
                        img_s=f"{ips:.0f}", threads=threads)
        if on_steps:
            on_steps(StepWindow(epoch, steps_, rows, ips, seconds_before + now - t_start - t_hooks, sampled()))
        t_window, imgs_window = time.perf_counter(), 0

    G.train()
    D.train()
    stopped = budget_spent = False
    epoch = start_epoch
    if on_checkpoint is not None and resume is None:
        checkpoint(0)  # a run killed in its first epoch goes on from here (and its MLflow run with it)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if epoch > start_epoch + 1:
            bar.set_description(f"epoch {epoch}/{cfg.epochs}")
        if pd is not None and pd.epsilon_after(steps_per_epoch) > dp.target_epsilon * 1.001:
            bar.write(f"privacy budget: another epoch would spend epsilon {pd.epsilon_after(steps_per_epoch):.3g} > "
                      f"privacy.dp.target_epsilon = {dp.target_epsilon:g}; training stops at epoch {epoch - 1}")
            epoch -= 1
            budget_spent = True
            break
        perm = torch.randperm(n, generator=order).to(device)
        poisson = pd.batches() if pd is not None else None
        for i in range(steps_per_epoch):
            # every rank draws the same global batch and z and keeps its slice (one process: all of it)
            z = distributed.shard(torch.randn(b, net.z_dim, device=device), ddp)
            # conditional: the reals' own labels; the fakes' drawn by the data's class shares
            y_real = y_fake = None
            if poisson is not None:  # DP: a Poisson batch (its size varies; it may be empty)
                real, y_real = next(poisson)
            else:
                idx = distributed.shard(perm[i * b:(i + 1) * b], ddp)
                real = data[idx]
                if net.conditional:
                    y_real = y_data[idx]
            if net.conditional:
                y_fake = distributed.shard(torch.multinomial(share, b, replacement=True), ddp)

            # (1) Update D: tell real from fake (the loss of train.loss), plus WGAN-GP's penalty.
            with amp:
                fake = G_step(z, *cond(y_fake))
                # One pass of D over reals and fakes together: D has no BatchNorm, so this is the same
                # function as two passes, at one call's overhead (one spectral-norm power iteration,
                # one dropout draw); under DP each row is also clipped once.
                logits = D_sees(torch.cat([real, fake.detach()]),
                                torch.cat([y_real, y_fake]) if net.conditional else None)
                real_logits, fake_logits = logits[:len(real)], logits[len(real):]
                d_loss = d_loss_fn(real_logits, fake_logits)
                d_total = d_loss
                if cfg.gp_weight > 0:  # on real/fake mixtures, judged with the reals' labels
                    gp = gradient_penalty(lambda x: D_sees(x, y_real), real, fake)
                    d_total = d_loss + cfg.gp_weight * gp
                    stats.report("gp_penalty", gp)
            opt_d.zero_grad(set_to_none=True)
            d_total.backward()
            if pd is not None:
                pd.step_d()  # clip, noise, account; then zeroed, so no grad_sample reaches G's step
            else:
                opt_d.step()
            stats.report("d_loss", d_loss)
            if len(real_logits):  # an empty Poisson batch (DP) has no D(x)
                stats.report("d_real", torch.sigmoid(real_logits.detach().float()).mean())  # mean D(x) as a probability
            stats.report("d_fake", torch.sigmoid(fake_logits.detach().float()).mean())
            if len(real_logits):
                stats.report("d_separated", (real_logits.detach().min() > fake_logits.detach().max()).float())

            # (1b) Lazy R1 on real images, every r1_interval steps, as its own D step (stylegan2-ada's
            # "Dreg"): gamma/2 * ||dD(x)/dx||^2, times the interval it stands for.
            if lazy_r1 and step % cfg.r1_interval == 0:
                with amp:
                    r1 = r1_penalty(lambda x: D_sees(x, y_real), real)
                opt_d.zero_grad(set_to_none=True)
                (r1 * (cfg.r1_gamma / 2) * cfg.r1_interval).backward()
                opt_d.step()
                stats.report("r1_penalty", r1)

            # (2) Update G: make D call the fakes real. D is frozen here: its weight gradients would
            # be thrown away, and not computing them saves a third of D's backward pass.
            # DP: D's per-sample hooks are off too, so the fakes' gradients never enter D's clipping.
            D.requires_grad_(False)
            with pd.hooks_off() if pd is not None else nullcontext():
                with amp:
                    g_logits = D_sees(fake, y_fake, D_frozen)
                    g_loss = g_loss_fn(g_logits)
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
            opt_g.step()
            D.requires_grad_(True)
            stats.report("g_loss", g_loss)

            # (3) The EMA of G follows the step just taken.
            if ema is not None:
                stats.report("ema_beta", ema.update(G, b, seen=(step + 1) * b))

            step += 1
            imgs_window += b
            if pd is not None and i == steps_per_epoch - 1:
                stats.report("epsilon", pd.epsilon())  # the budget spent, once per epoch (a float: no device sync)
            stats.end_step(step)
            bar.update(1)
            if len(stats) >= cfg.log_every:
                flush(epoch)
                if abort is not None and abort():
                    stopped = True
                    break
        if stopped:
            break
        flush(epoch)
        if abort is not None and abort():
            break
        if watch is not None:
            # Re-check between epochs: a neighbour that grabbed (or freed) a core changes the
            # best thread count for the next epoch.
            wanted = min(free_threads(watch.others_busy()), found.threads if found else threads)
            if wanted != threads:
                threads = wanted
                torch.set_num_threads(threads)
                bar.write(f"CPU threads -> {threads} (other processes hold cores)" if threads == 1 else
                          f"CPU threads -> {threads}")
        if on_epoch and (epoch % cfg.sample_every == 0 or epoch == cfg.epochs):
            t_hook = time.perf_counter()
            with torch.no_grad():
                if ema is not None:
                    ema.recompute_batchnorm(net.z_dim, device, seed=seed)
                Gs = sampled()
                Gs.eval()
                grid = make_grid(Gs(fixed_z, *cond(fixed_y)).float())
                on_epoch(EpochEnd(epoch, step, t_hook - t_start - t_hooks, grid, Gs,
                                  epsilon=pd.epsilon() if pd is not None else None))
                G.train()
            t_window = time.perf_counter()  # sampling and hooks are not training time
            t_hooks += t_window - t_hook
        # After the grid: a run resumed from here has every epoch's grid already.
        if on_checkpoint is not None and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 \
                and epoch < cfg.epochs:
            checkpoint(epoch)
    bar.close()
    distributed.teardown(ddp)

    seconds = seconds_before + time.perf_counter() - t_start - t_hooks
    # complete: every epoch ran, or the privacy budget allows no more (a rerun has nothing to add)
    final = state(epoch) | {"complete": (not stopped and epoch == cfg.epochs) or budget_spent}
    if ema is not None:
        ema.recompute_batchnorm(net.z_dim, device, seed=seed)
        final["G_ema"] = ema.G.state_dict()
    return TrainResult(G, D, opt_g, opt_d, net, step, epoch, seconds, step * b / max(seconds, 1e-9), last,
                       final["rng"], threads=threads if device.type == "cpu" else 0, device=str(device),
                       G_ema=ema.G if ema is not None else None, state=final,
                       channels_last=fmt == torch.channels_last, probe=found, dp=pd)


def probe_machine(cfg: TrainConfig, net: NetConfig, images: torch.Tensor, labels: torch.Tensor | None, seed: int,
                  layouts: tuple[bool, ...] = (True, False), steps: int = 3) -> ProbeResult:
    """The fastest layout and thread count for this step on this machine (aigc/runtime.py, probe):
    a few steps of this very function in each setting, timed over the second window of ``steps``."""
    n = min(len(images), cfg.batch_size * 2 * steps)
    if n < cfg.batch_size * 2:  # too little data for two windows
        return unmeasured("fewer than two batches of data", layouts, usable_cores())
    sub, sub_labels = images[:n], (labels[:n] if labels is not None else None)
    per_window = max(1, n // cfg.batch_size // 2)

    def measure(cl: bool, th: int) -> float:
        windows: list[float] = []
        trial = cfg.model_copy(update={"channels_last": cl, "threads": th, "epochs": 1, "log_every": per_window,
                                       "guard_steps": 0, "compile": False})
        train_gan(trial, net, sub, seed, on_steps=lambda w: windows.append(w.images_per_s), progress=False,
                  labels=sub_labels)
        return windows[-1]

    # The cache key: every field of the network (derived, so a new field keys the cache too; the
    # classes' values and shares do not change the step, their count does) and the switches of the
    # recipe that change what a step computes.
    shape = {k: v for k, v in net.to_dict().items() if k not in ("classes", "class_share")}
    workload = (f"gan {json.dumps(shape | {'num_classes': net.num_classes}, sort_keys=True)} batch {cfg.batch_size} "
                f"{cfg.loss} gp={cfg.gp_weight > 0} r1={cfg.r1_gamma > 0} augment={list(cfg.augment)} "
                f"ema={cfg.ema_kimg > 0}")
    try:
        return probe(workload, measure, layouts=layouts)
    except TrainingDiverged:  # the data itself breaks the step: the run will say so, after its first checkpoint
        return unmeasured("the probe's trial steps diverged", layouts, usable_cores())


def checkpoint_payload(result: TrainResult) -> dict[str, Any]:
    """Everything needed to resume or audit a run: both networks, the EMA, both optimisers, step,
    every RNG state, the loop's counters (the stage adds its own: fingerprint, MLflow run, curves)."""
    return dict(result.state)
