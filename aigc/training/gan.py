"""The GAN recipe of the training loop: D step, penalties, G step, EMA, and DP hooks.

What runs in a step is switched by ``train`` params: the loss (bce, hinge, wgan), WGAN-GP's
gradient penalty, a lazy R1 step, DiffAugment on everything D sees, and an EMA of G, which is
then the generator that is sampled and saved. D's step and G's step are separate blocks under
banners: a wrapper of D (differential privacy) needs to see them apart.

With ``dp`` (privacy.dp, enabled) D is trained with DP-SGD (aigc/privacy/dp.py): real batches are
Poisson-sampled, reals and fakes go through D in one pass, D's hooks are off in G's step, and the
epsilon spent is reported as the scalar ``epsilon`` at the end of every epoch.

The guard: D separating every real from every fake image for ``train.guard_steps`` consecutive
steps stops the run (G gets no useful signal then); the loop itself stops on non-finite values.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from typing import Any

import torch

from aigc import distributed
from aigc.augment import check_policy, diff_augment
from aigc.config import DPConfig, RuntimeConfig, TrainConfig
from aigc.ema import GeneratorEMA
from aigc.errors import UserError
from aigc.losses import D_LOSSES, G_LOSSES, gradient_penalty, lazy_regularisation_scaling, r1_penalty
from aigc.models import NetConfig, build_discriminator, build_generator
from aigc.stats import Stats
from aigc.training.loop import Batch, Hooks, Recipe, Setup, Stateful, TrainData, TrainingDiverged, TrainResult, train


@dataclasses.dataclass(eq=False)
class GANRecipe(Recipe):
    """G and D trained adversarially with the recipe ``cfg`` describes (and ``dp``, when enabled)."""

    cfg: TrainConfig
    net: NetConfig
    dp: DPConfig | None = None
    family = "gan"
    hint = ("Lower train.lr_d / train.lr_g, or switch train.loss / add model.spectral_norm or train.r1_gamma")

    def __post_init__(self) -> None:
        check_policy(tuple(self.cfg.augment), self.net.channels)
        if self.private:
            from aigc.privacy import dp as dp_lib

            if distributed.from_env().enabled:
                raise UserError("privacy.dp.enabled under torchrun: DP training runs in one process here (Opacus' "
                                "DPDDP is not wired in); run it without torchrun")
            dp_lib.quiet_opacus()
            self.net = dp_lib.private_net(self.net)  # no spectral norm in a private D (Opacus cannot clip through it)
        self.layouts = (True, False) if self.net.family == "dcgan" else (False,)
        self.separated_run = 0  # consecutive steps in which D separated every real from every fake
        self.pd: Any = None  # DP: D, its optimiser and the real batches, wrapped by Opacus

    @property
    def private(self) -> bool:
        return self.dp is not None and self.dp.enabled

    def setup(self, ctx: Setup) -> None:
        cfg, net = self.cfg, self.net
        self.device, self.b, self.seed = ctx.device, ctx.batch_size, ctx.seed
        self.ddp = ctx.ddp
        G = build_generator(net).to(ctx.device)
        D = build_discriminator(net).to(ctx.device)
        self.G, self.D = G.to(memory_format=ctx.memory_format), D.to(memory_format=ctx.memory_format)
        # The optimisers hold the real modules; the step may run compiled views of them.
        G_step, D_step = (torch.compile(self.G), torch.compile(self.D)) if ctx.compile else (self.G, self.D)
        self.G_step, self.D_step = distributed.wrap(G_step, D_step, ctx.ddp, ctx.device)  # DDP (+ SyncBatchNorm on CUDA)
        self.D_frozen = distributed.unwrap(self.D_step)  # the G step's D: no gradients, so no DDP reduction
        betas = (cfg.beta1, cfg.beta2)
        lr_d, betas_d = cfg.lr_d, betas
        self.lazy_r1 = cfg.r1_gamma > 0
        if self.lazy_r1:  # interval + 1 D steps per interval: stylegan2-ada's correction keeps the schedule
            lr_d, betas_d = lazy_regularisation_scaling(cfg.lr_d, betas, cfg.r1_interval)
        # Adam's fused kernel (one call for all parameters, CPU and CUDA): the same update as the
        # per-parameter loop, at a fraction of its dispatch cost on these small networks. Opacus wraps
        # D's optimiser and steps it itself, so a private D keeps the plain one.
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=betas, fused=True)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=betas_d, fused=not self.private)
        self.ema = GeneratorEMA(self.G, cfg.ema_kimg, cfg.ema_rampup) if cfg.ema_kimg > 0 else None
        self.d_loss_fn, self.g_loss_fn = D_LOSSES[cfg.loss], G_LOSSES[cfg.loss]
        # Mixed precision on CUDA only (bf16 needs no loss scaling); CPU stays fp32.
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if ctx.device.type == "cuda" and torch.cuda.is_bf16_supported() else nullcontext())
        self.policy = tuple(cfg.augment)
        self.share = (torch.tensor(net.class_share, dtype=torch.float32, device=ctx.device)
                      if net.conditional else None)
        if self.private:  # Poisson batches (expected size ~b), b fakes beside them; sigma from the budget
            from aigc.privacy import dp as dp_lib

            spent = (ctx.resume or {}).get("extra", {}).get("dp")  # resumed: sigma kept, the spent steps count
            self.pd = dp_lib.make_private(self.dp, self.D, self.opt_d, ctx.data, ctx.labels, ctx.batch_size,
                                          ctx.epochs if spent else ctx.epochs + (ctx.resume or {}).get("epoch", 0),
                                          ctx.batch_size, resume=spent)
            self.D_step = self.D_frozen = self.pd.D
            self.opt_d = self.pd.opt
        self.poisson = None

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        return self.pd.steps_per_epoch if self.pd is not None else n // batch_size

    def begin_epoch(self, epoch: int) -> str | None:
        if self.pd is None:
            return None
        after = self.pd.epsilon_after(self.pd.steps_per_epoch)
        if after > self.dp.target_epsilon * 1.001:
            return (f"privacy budget: another epoch would spend epsilon {after:.3g} > privacy.dp.target_epsilon = "
                    f"{self.dp.target_epsilon:g}")
        self.poisson = self.pd.batches()
        return None

    def _cond(self, y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return (y,) if self.net.conditional else ()  # conditional: the extra argument of G and D

    def _D_sees(self, x: torch.Tensor, y: torch.Tensor | None = None, D_: torch.nn.Module | None = None) -> torch.Tensor:
        """D's logits for ``x`` (of classes ``y`` when conditional) as D sees it: through DiffAugment,
        in D's step and in G's alike."""
        return (D_ or self.D_step)(diff_augment(x, self.policy) if self.policy else x, *self._cond(y))

    def step(self, batch: Batch, stats: Stats) -> None:
        cfg, net, b, pd = self.cfg, self.net, batch.size, self.pd
        # every rank draws the same z and keeps its slice (one process: all of it)
        z = distributed.shard(torch.randn(b, net.z_dim, device=self.device), self.ddp)
        # conditional: the reals' own labels; the fakes' drawn by the data's class shares
        real, y_real, y_fake = batch.real, batch.labels, None
        if self.poisson is not None:  # DP: a Poisson batch (its size varies; it may be empty)
            real, y_real = next(self.poisson)
        if net.conditional:
            y_fake = distributed.shard(torch.multinomial(self.share, b, replacement=True), self.ddp)

        # (1) Update D: tell real from fake (the loss of train.loss), plus WGAN-GP's penalty.
        with self.amp:
            fake = self.G_step(z, *self._cond(y_fake))
            # One pass of D over reals and fakes together: D has no BatchNorm, so this is the same
            # function as two passes, at one call's overhead (one spectral-norm power iteration,
            # one dropout draw); under DP each row is also clipped once.
            logits = self._D_sees(torch.cat([real, fake.detach()]),
                                  torch.cat([y_real, y_fake]) if net.conditional else None)
            real_logits, fake_logits = logits[:len(real)], logits[len(real):]
            d_loss = self.d_loss_fn(real_logits, fake_logits)
            d_total = d_loss
            if cfg.gp_weight > 0:  # on real/fake mixtures, judged with the reals' labels
                gp = gradient_penalty(lambda x: self._D_sees(x, y_real), real, fake)
                d_total = d_loss + cfg.gp_weight * gp
                stats.report("gp_penalty", gp)
        self.opt_d.zero_grad(set_to_none=True)
        d_total.backward()
        if pd is not None:
            pd.step_d()  # clip, noise, account; then zeroed, so no grad_sample reaches G's step
        else:
            self.opt_d.step()
        stats.report("d_loss", d_loss)
        if len(real_logits):  # an empty Poisson batch (DP) has no D(x)
            stats.report("d_real", torch.sigmoid(real_logits.detach().float()).mean())  # mean D(x) as a probability
        stats.report("d_fake", torch.sigmoid(fake_logits.detach().float()).mean())
        if len(real_logits):
            stats.report("d_separated", (real_logits.detach().min() > fake_logits.detach().max()).float())

        # (1b) Lazy R1 on real images, every r1_interval steps, as its own D step (stylegan2-ada's
        # "Dreg"): gamma/2 * ||dD(x)/dx||^2, times the interval it stands for.
        if self.lazy_r1 and batch.step % cfg.r1_interval == 0:
            with self.amp:
                r1 = r1_penalty(lambda x: self._D_sees(x, y_real), real)
            self.opt_d.zero_grad(set_to_none=True)
            (r1 * (cfg.r1_gamma / 2) * cfg.r1_interval).backward()
            self.opt_d.step()
            stats.report("r1_penalty", r1)

        # (2) Update G: make D call the fakes real. D is frozen here: its weight gradients would
        # be thrown away, and not computing them saves a third of D's backward pass.
        # DP: D's per-sample hooks are off too, so the fakes' gradients never enter D's clipping.
        self.D.requires_grad_(False)
        with pd.hooks_off() if pd is not None else nullcontext():
            with self.amp:
                g_logits = self._D_sees(fake, y_fake, self.D_frozen)
                g_loss = self.g_loss_fn(g_logits)
            self.opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
        self.opt_g.step()
        self.D.requires_grad_(True)
        stats.report("g_loss", g_loss)

        # (3) The EMA of G follows the step just taken.
        if self.ema is not None:
            stats.report("ema_beta", self.ema.update(self.G, b, seen=(batch.step + 1) * b))
        if pd is not None and batch.last_of_epoch:
            stats.report("epsilon", pd.epsilon())  # the budget spent, once per epoch (a float: no device sync)

    def check(self, step: int, epoch: int, row: dict[str, float]) -> None:
        self.separated_run = self.separated_run + 1 if row.get("d_separated") == 1.0 else 0
        if self.cfg.guard_steps and self.separated_run >= self.cfg.guard_steps:
            raise TrainingDiverged(
                f"training stopped at step {step} (epoch {epoch}): D separated every real from every fake image for "
                f"{self.separated_run} consecutive steps (train.guard_steps), so G gets no useful signal; no model "
                "was saved. Weaken D (model.spectral_norm, train.r1_gamma, train.augment, a lower train.lr_d)")

    def train_mode(self) -> None:
        self.G.train()
        self.D.train()

    def sampled(self) -> torch.nn.Module:
        return self.ema.G if self.ema is not None else self.G

    def prepare_sampling(self) -> None:
        if self.ema is not None:
            self.ema.recompute_batchnorm(self.net.z_dim, self.device, seed=self.seed)

    def finish(self, state: dict[str, Any]) -> None:
        if self.ema is not None:  # the saved EMA generator with BatchNorm statistics of its own weights
            self.prepare_sampling()
            state["G_ema"] = self.ema.G.state_dict()

    def epsilon(self) -> float | None:
        return self.pd.epsilon() if self.pd is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"G": self.G.state_dict(), "G_ema": self.ema.G.state_dict() if self.ema is not None else None,
                "D": self.D.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "guard": {"separated_run": self.separated_run}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None:
            self.ema.G.load_state_dict(state["G_ema"])
        self.separated_run = state["guard"]["separated_run"]

    def extra_state(self) -> dict[str, Any]:
        return {"dp": self.pd.state_dict()} if self.pd is not None else {}

    def privacy(self) -> dict[str, Any]:
        return self.pd.summary() if self.pd is not None else {"dp": False}

    def postfix(self, last: dict[str, float]) -> dict[str, str]:
        return {"D": f"{last.get('d_loss', float('nan')):.3f}", "G": f"{last.get('g_loss', float('nan')):.3f}"}

    def probe_key(self, batch_size: int) -> str:
        # Every field of the network (derived, so a new field keys the cache too; the classes' values
        # and shares do not change the step, their count does) and the switches of the recipe that
        # change what a step computes.
        cfg, net = self.cfg, self.net
        shape = {k: v for k, v in net.to_dict().items() if k not in ("classes", "class_share")}
        return (f"gan {json.dumps(shape | {'num_classes': net.num_classes}, sort_keys=True)} batch {batch_size} "
                f"{cfg.loss} gp={cfg.gp_weight > 0} r1={cfg.r1_gamma > 0} augment={list(cfg.augment)} "
                f"ema={cfg.ema_kimg > 0}")

    def for_probe(self) -> "GANRecipe":
        # the plain step (no DP) of the network as trained, without the guard
        return GANRecipe(self.cfg.model_copy(update={"guard_steps": 0}), self.net)

    @property
    def nets(self) -> dict[str, torch.nn.Module]:
        return {"G": self.G, "D": self.D} | ({"G_ema": self.ema.G} if self.ema is not None else {})


def train_gan(cfg: TrainConfig, net: NetConfig, images: torch.Tensor, seed: int, *,
              labels: torch.Tensor | None = None, dp: DPConfig | None = None, hooks: Hooks | None = None,
              runtime: RuntimeConfig | None = None, resume: dict[str, Any] | None = None,
              extra: dict[str, Stateful] | None = None,
              **hook_fns: Any) -> TrainResult:
    """The loop with the GAN recipe: G and D on ``images`` ([-1, 1], (N, C, H, W)); a conditional
    ``net`` also needs ``labels`` (class indices (N,)); ``dp`` (enabled) trains D privately.
    ``hook_fns``: the fields of :class:`Hooks` (on_steps=..., progress=False), instead of ``hooks``."""
    return train(cfg, GANRecipe(cfg, net, dp), TrainData(images, labels),
                 hooks or Hooks(**hook_fns), seed=seed, runtime=runtime,
                 resume=resume, extra=extra)
