"""The one training loop: a plain function of (config, recipe, data, hooks).

It owns everything a run of any family has in common -- epochs and batching, the device, the
threads and the memory layout (with the speed probe), torchrun/DDP sharding, the window of
per-step scalars and the divergence guard, the timers, checkpoints and resume, and the sample
grids -- and knows nothing about MLflow, files or Prefect. What a step computes is the
*recipe*'s (stylegan2-ada's ``Loss``): :class:`aigc.training.gan.GANRecipe` (D step, penalties,
G step, EMA, differential privacy) and :class:`aigc.training.vae.VAERecipe` (the ELBO). A new
family is a new recipe, never a second copy of this loop.

Progress leaves through plain hooks (stylegan2-ada's ``progress_fn`` / ``abort_fn`` idea):

* ``on_steps(window)`` every ``runtime.log_every`` steps: the named scalars each step reported
  (``aigc.stats.Stats``), whatever they are;
* ``on_epoch(end)`` every ``train.sample_every`` epochs: a sample grid from a fixed z (so grids from
  different epochs and runs are comparable), the training time so far and the generator sampled;
* ``abort()`` after every window: True ends training there (a time budget, a benchmark);
* ``on_checkpoint(state)`` before the first epoch and every ``runtime.checkpoint_every`` epochs:
  everything a run needs to go on from there; ``train(..., resume=state)`` then continues as if
  never stopped (on CPU the final weights are bitwise those of an uninterrupted run).

Per-step scalars stay on the device and are copied to the host once per window: no ``.item()`` on
the hot path. The guard reads them there: a non-finite value stops the run with
:class:`TrainingDiverged`, and so does whatever the recipe's own ``check`` refuses (a GAN's D
separating every real from every fake for ``train.guard_steps`` steps).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from aigc import distributed
from aigc.config import RuntimeConfig, TrainConfig
from aigc.errors import UserError
from aigc.images import make_grid
from aigc.models import NetConfig
from aigc.runtime import CoreWatch, ProbeResult, choose_threads, free_threads, probe, resolve_device, unmeasured, \
    usable_cores
from aigc.stats import Stats
from aigc.training.checkpoint import CHECKPOINT_FORMAT, check_resume, rng_state, set_rng_state


class TrainingDiverged(UserError):
    """The run stopped because training broke down (non-finite values, or D winning outright)."""


class Stateful(Protocol):
    """Extra state a caller keeps beside the networks: what a checkpoint stores under ``extra`` and
    a resume hands back."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainData:
    """The train split: images in [-1, 1], (N, C, H, W), and class indices (N,) when labelled."""

    images: torch.Tensor
    labels: torch.Tensor | None = None


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
    seconds: float  # training time so far (a resumed run's earlier part included); hooks not counted
    grid: np.ndarray  # uint8 (H, W, C) samples from the fixed z
    G: torch.nn.Module
    epsilon: float | None = None  # DP runs: the budget spent so far


@dataclass
class Hooks:
    """Where progress goes, and when to stop early (all optional)."""

    on_steps: Callable[[StepWindow], None] | None = None
    on_epoch: Callable[[EpochEnd], None] | None = None
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None
    abort: Callable[[], bool] | None = None
    progress: bool = True  # the tqdm bar on stderr


@dataclass
class Setup:
    """What the loop hands a recipe to build its networks and optimisers with."""

    device: torch.device
    memory_format: torch.memory_format
    compile: bool
    ddp: distributed.Dist
    seed: int
    data: torch.Tensor  # the whole split on the device, in ``memory_format``
    labels: torch.Tensor | None  # int64 on the device (conditional nets only)
    batch_size: int  # the global batch
    epochs: int  # epochs left to train (a resumed run: from its checkpoint on)
    resume: dict[str, Any] | None


@dataclass
class Batch:
    """One step's real batch (this rank's slice of the global batch) and where the step is."""

    real: torch.Tensor
    labels: torch.Tensor | None
    step: int  # steps done before this one
    size: int  # the global batch
    last_of_epoch: bool


class Recipe:
    """A family's part of training: its networks, optimisers and step (stylegan2-ada's ``Loss``).

    Subclasses set ``family``, ``net`` and ``hint`` and implement ``setup``, ``step``, ``sampled``,
    ``state_dict`` and ``load_state_dict``; the rest have defaults that fit most families.
    """

    family: str = ""  # the checkpoint's "family" field
    net: NetConfig
    hint: str = ""  # what to change when the run diverges (the end of TrainingDiverged's message)
    layouts: tuple[bool, ...] = (False,)  # memory layouts worth probing (channels_last, NCHW)

    def setup(self, ctx: Setup) -> None:
        """Build the networks and optimisers on ``ctx.device`` (the seed is already set)."""
        raise NotImplementedError

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        """Drop the ragged last batch: BatchNorm and D's statistics want full ones."""
        return n // batch_size

    def begin_epoch(self, epoch: int) -> str | None:
        """Called before each epoch; a returned reason ends training there, as complete."""
        return None

    def step(self, batch: Batch, stats: Stats) -> None:
        """One optimisation step; report what should be seen with ``stats.report(name, value)``."""
        raise NotImplementedError

    def check(self, step: int, epoch: int, row: dict[str, float]) -> None:
        """The recipe's own guard over each step's (host) scalars: raise TrainingDiverged to stop."""

    def train_mode(self) -> None:
        """Put the trained networks in training mode (after sampling)."""

    def sampled(self) -> torch.nn.Module:
        """The generator that is sampled, saved, evaluated and served."""
        raise NotImplementedError

    def prepare_sampling(self) -> None:
        """Called before a grid is drawn (e.g. re-estimate the EMA generator's BatchNorm)."""

    def finish(self, state: dict[str, Any]) -> None:
        """Called once after the last epoch, with the final checkpoint to amend."""

    def epsilon(self) -> float | None:
        """The differential-privacy budget spent so far, for runs that spend one."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The networks' and optimisers' state (and the recipe's counters) for a checkpoint."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what ``state_dict`` returned."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """State saved under the checkpoint's ``extra`` (e.g. a privacy accountant)."""
        return {}

    def privacy(self) -> dict[str, Any]:
        """The differential-privacy guarantee of the training (``{"dp": False}`` without DP)."""
        return {"dp": False}

    def likelihood(self, data: TrainData) -> dict[str, Any]:
        """Held-out negative log-likelihood in bits/dim, for the families that have one:
        ``{"bits_per_dim": x, "likelihood": how it was measured}``; a GAN has none."""
        return {"bits_per_dim": None, "likelihood": "none (a GAN has no likelihood)"}

    def postfix(self, last: dict[str, float]) -> dict[str, str]:
        """The progress bar's figures from the last window's means."""
        return {}

    def probe_key(self, batch_size: int) -> str:
        """What the speed probe caches its answer under: everything that changes the step's speed."""
        raise NotImplementedError

    def for_probe(self) -> "Recipe":
        """A fresh, untrained copy for the speed probe's trial steps."""
        raise NotImplementedError


@dataclass
class TrainResult:
    """What :func:`train` returns, for every family."""

    recipe: Recipe  # its networks as trained (recipe.G, recipe.D, recipe.encoder, ...)
    net: NetConfig  # the network as trained (a private D is built without spectral norm)
    steps: int
    epochs: int  # epochs trained (fewer than train.epochs when aborted or out of privacy budget)
    seconds: float
    images_per_s: float
    complete: bool  # every epoch ran (or the privacy budget allows no more): a rerun has nothing to add
    last: dict[str, float] = field(default_factory=dict)  # mean scalars of the last window
    threads: int = 0  # CPU threads at the end (0 on CUDA)
    device: str = "cpu"
    channels_last: bool = False  # the memory layout the step ran in
    probe: ProbeResult | None = None  # what runtime.channels_last / threads = auto measured (CPU only)
    state: dict[str, Any] = field(default_factory=dict)  # the final checkpoint

    @property
    def generator(self) -> torch.nn.Module:
        """What is saved, sampled, evaluated and served (a GAN's EMA generator when there is one)."""
        return self.recipe.sampled()

    def summary(self, tracking_seconds: float = 0.0) -> dict[str, Any]:
        """What run.json says of the training: speed, length, settings, the last window's means."""
        return {"images_per_s": round(self.images_per_s, 1), "seconds": round(self.seconds, 1), "steps": self.steps,
                "epochs": self.epochs, "tracking_seconds": round(tracking_seconds, 2), "threads": self.threads,
                "channels_last": self.channels_last,
                **{f"final_{k}": round(v, 4) for k, v in self.last.items() if k != "epsilon"}}


def train(cfg: TrainConfig, recipe: Recipe, data: TrainData, hooks: Hooks | None = None, *, seed: int,
          runtime: RuntimeConfig | None = None, resume: dict[str, Any] | None = None,
          extra: dict[str, Stateful] | None = None) -> TrainResult:
    """Train ``recipe`` on ``data`` for ``cfg.epochs`` epochs of ``cfg.batch_size`` images.

    ``resume``: a state ``on_checkpoint`` received (a checkpoint of this run) to go on from.
    ``extra``: objects saved in each checkpoint under ``extra`` and restored on resume.
    """
    hooks, runtime, extra = hooks or Hooks(), runtime or RuntimeConfig(), extra or {}
    net, images, labels = recipe.net, data.images, data.labels
    if net.conditional and (labels is None or len(labels) != len(images)):
        raise UserError(f"a conditional model needs one label per training image; got "
                        f"{'none' if labels is None else len(labels)} for {len(images)} images")
    if len(images) < cfg.batch_size:
        raise UserError(f"the train split has {len(images)} images, fewer than train.batch_size = "
                        f"{cfg.batch_size}; lower the batch size")
    if tuple(images.shape[1:]) != net.image_shape:
        raise UserError(f"images are {tuple(images.shape[1:])}, the model expects {net.image_shape}")

    # Under torchrun: join the process group; train.batch_size is the global batch (aigc/distributed.py).
    ddp = distributed.from_env()
    device = distributed.setup(ddp, resolve_device(runtime.device, "runtime.device"))
    distributed.per_rank_batch(cfg.batch_size, ddp)  # the global batch must split evenly over the ranks
    if resume is not None:
        check_resume(resume, cfg, recipe.family, net, seed)
    on_steps, on_epoch, on_checkpoint, progress = hooks.on_steps, hooks.on_epoch, hooks.on_checkpoint, hooks.progress
    if not ddp.is_main:  # hooks, the progress bar and every write belong to rank 0
        on_steps = on_epoch = on_checkpoint = None
        progress = False
    threads, watch = torch.get_num_threads(), None
    # "auto" layout / threads: measured on this very step once per machine (cached), before the
    # seed is set, so the run itself is the same with or without a probe.
    found = None
    if device.type == "cpu" and "auto" in (runtime.channels_last, runtime.threads) and not ddp.enabled:
        found = probe_machine(cfg, runtime, recipe, data, seed)
        if progress:
            tqdm.write(f"speed probe: {found.describe()}", file=sys.stderr)
    channels_last = (found.channels_last if found and runtime.channels_last == "auto"
                     else runtime.channels_last if runtime.channels_last != "auto" else device.type == "cuda")
    if device.type == "cpu":
        threads = choose_threads(runtime.threads)
        if found and runtime.threads == "auto":
            threads = min(threads, found.threads)  # two vCPUs on one physical core: one thread may win
        torch.set_num_threads(threads)
        watch = CoreWatch() if runtime.threads == "auto" else None
    fmt = torch.channels_last if channels_last and True in recipe.layouts else torch.contiguous_format

    torch.manual_seed(seed)  # weights, dropout, z and augmentation all follow from the seed
    order = torch.Generator().manual_seed(seed)  # batch order, independent of the device
    # The whole split lives on the device: batches are slices of one tensor, no per-item collation.
    x_data = images.to(device, dtype=torch.float32).contiguous(memory_format=fmt)
    y_data = labels.to(device, torch.int64) if net.conditional else None
    fixed_z = torch.randn(cfg.grid_size, net.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    # conditional: the grid shows the classes in order, in equal runs
    fixed_y = net.grid_labels(cfg.grid_size).to(device) if net.conditional else None
    n, b = len(x_data), cfg.batch_size  # b: the global batch
    spent_epochs = resume["epoch"] if resume is not None else 0
    recipe.setup(Setup(device, fmt, runtime.compile, ddp, seed, x_data, y_data, b, cfg.epochs - spent_epochs, resume))
    steps_per_epoch = recipe.steps_per_epoch(n, b)
    total = steps_per_epoch * cfg.epochs

    stats = Stats()
    last: dict[str, float] = {}
    step, start_epoch, seconds_before = 0, 0, 0.0
    if resume is not None:  # everything the loop carries from epoch to epoch, as it was
        recipe.load_state_dict(resume)
        for name, obj in extra.items():
            obj.load_state_dict(resume["extra"][name])
        step, start_epoch = resume["step"], resume["epoch"]
        last, seconds_before = dict(resume["loop"]["last"]), resume["loop"]["seconds"]
        set_rng_state(resume["rng"], order, device)
    t_start, t_hooks = time.perf_counter(), 0.0
    t_window, imgs_window = t_start, 0
    # In a log file (no terminal) a bar line every 15 s instead of every second.
    bar = tqdm(total=total, initial=step, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0, desc=f"epoch {start_epoch + 1}/{cfg.epochs}")

    def trained_seconds() -> float:
        return seconds_before + time.perf_counter() - t_start - t_hooks

    def state(epoch: int) -> dict[str, Any]:
        """The resume state at the end of ``epoch`` (0: before the first); tensors are the live ones."""
        return {
            "format": CHECKPOINT_FORMAT, "family": recipe.family, "net": net.to_dict(), "train": cfg.model_dump(),
            "seed": seed, "step": step, "epoch": epoch, **recipe.state_dict(),
            "rng": rng_state(order, device),
            "loop": {"last": dict(last), "seconds": trained_seconds()},
            "extra": {name: obj.state_dict() for name, obj in extra.items()} | recipe.extra_state(),
            "complete": False,
        }

    def in_hook(fn: Callable[[], None]) -> None:
        """Run ``fn`` off the clock: saving, sampling and hooks are not training time."""
        nonlocal t_hooks, t_window
        t_hook = time.perf_counter()
        fn()
        t_window = time.perf_counter()
        t_hooks += t_window - t_hook

    def flush(epoch: int) -> None:
        nonlocal t_window, imgs_window, last
        if not len(stats):
            return
        # the one host sync per window (and, distributed, the one all-reduce: the global batch's means)
        collected = stats.collect(reduce=lambda t: distributed.mean_across(t, ddp))
        for s, row in collected:  # the divergence guard
            for key, value in row.items():
                if not math.isfinite(value):
                    raise TrainingDiverged(f"training diverged at step {s} (epoch {epoch}): {key} = {value}; "
                                           f"no model was saved. {recipe.hint}")
            recipe.check(s, epoch, row)
        steps_, rows = [s for s, _ in collected], [r for _, r in collected]
        now = time.perf_counter()
        ips = imgs_window / max(now - t_window, 1e-9)
        keys = dict.fromkeys(k for r in rows for k in r)
        last = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
        bar.set_postfix(**recipe.postfix(last), img_s=f"{ips:.0f}", threads=threads)
        if on_steps:
            on_steps(StepWindow(epoch, steps_, rows, ips, trained_seconds(), recipe.sampled()))
        t_window, imgs_window = time.perf_counter(), 0

    def draw_grid(epoch: int) -> None:
        seconds = trained_seconds()
        with torch.no_grad():
            recipe.prepare_sampling()
            Gs = recipe.sampled()
            Gs.eval()
            grid = make_grid(Gs(fixed_z, *(() if fixed_y is None else (fixed_y,))).float())
            on_epoch(EpochEnd(epoch, step, seconds, grid, Gs, epsilon=recipe.epsilon()))
            recipe.train_mode()

    recipe.train_mode()
    stopped = budget_spent = False
    epoch = start_epoch
    if on_checkpoint is not None and resume is None:
        in_hook(lambda: on_checkpoint(state(0)))  # a run killed in its first epoch goes on from here
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if epoch > start_epoch + 1:
            bar.set_description(f"epoch {epoch}/{cfg.epochs}")
        why = recipe.begin_epoch(epoch)
        if why:
            bar.write(f"{why}; training stops at epoch {epoch - 1}")
            epoch -= 1
            budget_spent = True
            break
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(steps_per_epoch):
            # every rank draws the same global batch and keeps its slice (one process: all of it)
            idx = distributed.shard(perm[i * b:(i + 1) * b], ddp)
            recipe.step(Batch(x_data[idx], y_data[idx] if y_data is not None else None, step, b,
                              i == steps_per_epoch - 1), stats)
            step += 1
            imgs_window += b
            stats.end_step(step)
            bar.update(1)
            if len(stats) >= runtime.log_every:
                flush(epoch)
                if hooks.abort is not None and hooks.abort():
                    stopped = True
                    break
        if stopped:
            break
        flush(epoch)
        if hooks.abort is not None and hooks.abort():
            break  # after a whole epoch: complete if it was the last
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
            in_hook(lambda: draw_grid(epoch))
        # After the grid: a run resumed from here has every epoch's grid already.
        if on_checkpoint is not None and runtime.checkpoint_every and epoch % runtime.checkpoint_every == 0 \
                and epoch < cfg.epochs:
            in_hook(lambda: on_checkpoint(state(epoch)))
    bar.close()
    distributed.teardown(ddp)

    seconds = trained_seconds()
    # complete: every epoch ran, or the privacy budget allows no more (a rerun has nothing to add)
    complete = (not stopped and epoch == cfg.epochs) or budget_spent
    final = state(epoch) | {"complete": complete}
    recipe.finish(final)
    return TrainResult(recipe, net, step, epoch, seconds, step * b / max(seconds, 1e-9), complete, last,
                       threads=threads if device.type == "cpu" else 0, device=str(device),
                       channels_last=fmt == torch.channels_last, probe=found, state=final)


def probe_machine(cfg: TrainConfig, runtime: RuntimeConfig, recipe: Recipe, data: TrainData, seed: int,
                  steps: int = 3) -> ProbeResult:
    """The fastest layout and thread count for this step on this machine (aigc/runtime.py, probe):
    a few steps of this very loop in each setting, timed over the second window of ``steps``."""
    layouts = recipe.layouts
    n = min(len(data.images), cfg.batch_size * 2 * steps)
    if n < cfg.batch_size * 2:  # too little data for two windows
        return unmeasured("fewer than two batches of data", layouts, usable_cores())
    sub = TrainData(data.images[:n], data.labels[:n] if data.labels is not None else None)
    per_window = max(1, n // cfg.batch_size // 2)

    def measure(cl: bool, th: int) -> float:
        windows: list[float] = []
        trial = runtime.model_copy(update={"channels_last": cl, "threads": th, "log_every": per_window,
                                           "compile": False})
        train(cfg.model_copy(update={"epochs": 1}), recipe.for_probe(), sub,
              Hooks(on_steps=lambda w: windows.append(w.images_per_s), progress=False), seed=seed, runtime=trial)
        return windows[-1]

    try:
        return probe(recipe.probe_key(cfg.batch_size), measure, layouts=layouts)
    except TrainingDiverged:  # the data itself breaks the step: the run will say so, after its first checkpoint
        return unmeasured("the probe's trial steps diverged", layouts, usable_cores())
