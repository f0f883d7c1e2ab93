"""Differential privacy for the discriminator: DP-SGD with Opacus, on D only.

Only D reads real images, so only D is trained privately; G learns from D's outputs, which is
post-processing of a private mechanism and spends no budget (Xie et al. 2018, dpgan-revisit).
What Opacus does here, and what this module adds around it (:func:`make_private`):

* D is checked by Opacus' ``ModuleValidator`` first (BatchNorm mixes samples, so it is refused,
  naming the layer). Spectral norm passes the validator but Opacus cannot compute per-sample
  gradients through its parametrisation, so a private D is built without it (:func:`private_net`).
* Real batches are Poisson-sampled by Opacus' ``DPDataLoader`` (each image in a batch with
  probability q = 1 / batches per epoch), which is what its accountant assumes.
* The noise multiplier comes from ``make_private_with_epsilon``: the smallest sigma for which
  the planned D steps (train.epochs x batches per epoch) stay within (target_epsilon, delta).
* Real and fake images go through D in *one* forward pass, as dpgan-revisit does: every row's
  gradient (fakes too) is clipped to C, summed, noised once, and divided by the expected rows
  (real + fake). A fake row does not depend on any training record (G only saw D's private
  outputs), so the sensitivity to one record stays C and the accounting is Opacus' own. Opacus'
  old dcgan example ran two forward passes and double-charged or mixed rows (opacus #418, #494).
* In G's step D's hooks are off (``disable_hooks()``, dpgan-revisit's ``train_g_step``) and D is
  frozen, so the fakes' gradients never land in ``grad_sample`` to be clipped into D's next step;
  D's optimiser is zeroed right after its step, so no ``grad_sample`` outlives it.
* Every D optimiser step is one accountant step (Opacus' step hook); :meth:`PrivateD.state_dict`
  holds the accountant's history so a resumed run continues the budget instead of resetting it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aigc.config import DPConfig
from aigc.errors import UserError

STATE_FORMAT = "aigc.dp/1"


def private_net(net: Any) -> Any:
    """The network config a private D is built from: no spectral norm (Opacus has no per-sample
    gradient for the parametrisation); everything else as given."""
    return dataclasses.replace(net, spectral_norm=False) if getattr(net, "spectral_norm", False) else net


def check_discriminator(D: nn.Module) -> None:
    """Opacus' ``ModuleValidator`` on ``D``; a UserError naming every offending layer."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(D, strict=False)
    if errors:
        raise UserError("the discriminator cannot be trained with differential privacy (privacy.dp.enabled): "
                        + "; ".join(str(e).strip() for e in errors)
                        + ". Use a D without BatchNorm (GroupNorm, LayerNorm or no normalisation)")


def check_delta(delta: float, n: int) -> None:
    if delta >= 1.0 / n:
        raise UserError(f"privacy.dp.delta = {delta:g} is not below 1/N = 1/{n} = {1.0 / n:.3g} for the {n} training "
                        f"images: a delta that large allows leaking a whole record; set privacy.dp.delta below "
                        f"{1.0 / n:.3g} (e.g. {10 ** math.floor(math.log10(0.1 / n)):g})")


def steps_of(accountant_state: dict[str, Any]) -> int:
    """Optimiser steps an accountant's ``state_dict()`` has recorded (its history is
    (noise multiplier, sample rate, steps) runs)."""
    return int(sum(h[2] for h in accountant_state.get("history", [])))


def epsilon_for(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon after ``steps`` steps of the subsampled Gaussian mechanism, by Opacus' accountant."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)] if steps else []
    return float(acc.get_epsilon(delta=delta)) if steps else 0.0


@dataclass
class PrivateD:
    """D, its optimiser and the real-data loader after Opacus' ``make_private``, and the budget."""

    engine: Any  # opacus.PrivacyEngine
    D: nn.Module  # opacus GradSampleModule around the plain D
    opt: torch.optim.Optimizer  # opacus DPOptimizer around D's Adam
    loader: Any  # opacus DPDataLoader: Poisson batches of (images[, labels])
    cfg: DPConfig
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    planned_steps: int
    optimizer_steps: int = 0  # D's parameter updates, counted by a hook on the inner optimiser

    @property
    def module(self) -> nn.Module:
        """The plain D (state-dict keys without Opacus' ``_module.`` prefix)."""
        return self.D._module

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One epoch of Poisson-sampled real batches: (images, labels or None); a batch may be empty."""
        for batch in self.loader:
            yield batch[0], (batch[1] if len(batch) > 1 else None)

    @property
    def steps(self) -> int:
        """Steps the accountant has recorded."""
        return steps_of(self.engine.accountant.state_dict())

    def epsilon(self) -> float:
        """epsilon spent so far at ``delta``."""
        return float(self.engine.accountant.get_epsilon(delta=self.cfg.delta)) if self.steps else 0.0

    def epsilon_after(self, more_steps: int) -> float:
        """epsilon after ``more_steps`` further D steps."""
        return epsilon_for(self.cfg.accountant, self.noise_multiplier, self.sample_rate, self.steps + more_steps,
                           self.cfg.delta)

    def step_d(self) -> None:
        """D's optimiser step (clip, noise, account), then zeroed: no ``grad_sample`` is left over."""
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @contextmanager
    def hooks_off(self) -> Iterator[None]:
        """G's step: D's per-sample gradient hooks disabled (and re-enabled after, even on error)."""
        self.D.disable_hooks()
        try:
            yield
        finally:
            self.D.enable_hooks()

    def state_dict(self) -> dict[str, Any]:
        """A plain dict: the accountant's history and the mechanism's settings (resume continues from it)."""
        return {"format": STATE_FORMAT, "accountant": self.cfg.accountant,
                "accountant_state": accountant_state(self.engine),
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "max_grad_norm": self.cfg.max_grad_norm, "delta": self.cfg.delta,
                "target_epsilon": self.cfg.target_epsilon, "steps": self.steps, "epsilon": self.epsilon()}

    def summary(self) -> dict[str, Any]:
        """What metrics.json, run.json and the MLflow run say about the guarantee."""
        return {"dp": True, "epsilon": round(self.epsilon(), 4), "delta": self.cfg.delta,
                "target_epsilon": self.cfg.target_epsilon, "noise_multiplier": round(self.noise_multiplier, 4),
                "sample_rate": round(self.sample_rate, 6), "max_grad_norm": self.cfg.max_grad_norm,
                "accountant": self.cfg.accountant, "d_steps": self.steps}


def accountant_state(engine: Any) -> dict[str, Any]:
    """The accountant's ``state_dict()`` as a plain dict (its history of (sigma, q, steps) runs)."""
    state = dict(engine.accountant.state_dict())
    state["history"] = [tuple(h) for h in state.get("history", [])]
    return state


def restore_accountant(engine: Any, state: dict[str, Any]) -> None:
    """Load an accountant history saved by :func:`accountant_state` (resume keeps the epsilon spent)."""
    engine.accountant.load_state_dict({k: (list(v) if k == "history" else v) for k, v in state.items()})


def make_private(cfg: DPConfig, D: nn.Module, opt_d: torch.optim.Optimizer, images: torch.Tensor,
                 labels: torch.Tensor | None, batch_size: int, epochs: int, fake_batch: int,
                 resume: dict[str, Any] | None = None) -> PrivateD:
    """Wrap D, its optimiser and the real images with Opacus for (cfg.target_epsilon, cfg.delta)-DP
    over ``epochs`` epochs of Poisson batches of expected size ~``batch_size``.

    ``fake_batch``: the fake rows D sees beside the reals in each step (counted in the mean).
    ``resume``: a :meth:`PrivateD.state_dict` of an earlier part of this training: its sigma is
    kept and its steps count against the budget (the planned steps are the remaining ones).
    """
    from opacus import PrivacyEngine

    quiet_opacus()
    n = len(images)
    check_delta(cfg.delta, n)
    check_discriminator(D)
    for m in D.modules():  # Opacus' backward hooks return views: an in-place activation on them is refused
        if getattr(m, "inplace", False):
            m.inplace = False
    dataset = torch.utils.data.TensorDataset(images, *(() if labels is None else (labels,)))
    # drop_last: N // batch steps per epoch (q = 1 / that), as many D steps as a plain epoch makes
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True)
    engine = PrivacyEngine(accountant=cfg.accountant)
    steps_per_epoch = len(loader)
    if resume is not None:  # refuse before anything is wrapped: the spent steps count against the budget
        spent = steps_of(resume["accountant_state"])
        after = epsilon_for(cfg.accountant, resume["noise_multiplier"], 1.0 / steps_per_epoch,
                            spent + epochs * steps_per_epoch, cfg.delta)
        if after > cfg.target_epsilon * 1.001:
            raise UserError(f"privacy budget: {spent} D steps already spent epsilon {resume.get('epsilon', 0):.3g}, "
                            f"and {epochs * steps_per_epoch} more would reach {after:.3g} > privacy.dp.target_epsilon "
                            f"= {cfg.target_epsilon:g}; nothing was trained")
    common = dict(module=D, optimizer=opt_d, data_loader=loader, max_grad_norm=cfg.max_grad_norm,
                  loss_reduction="mean", poisson_sampling=True)
    try:
        if resume is None:
            D_p, opt_p, loader_p = engine.make_private_with_epsilon(
                **common, target_epsilon=cfg.target_epsilon, target_delta=cfg.delta, epochs=epochs)
        else:
            restore_accountant(engine, resume["accountant_state"])
            D_p, opt_p, loader_p = engine.make_private(**common, noise_multiplier=resume["noise_multiplier"])
    except ValueError as exc:  # Opacus' get_noise_multiplier: "The privacy budget is too low."
        if "budget" not in str(exc):
            raise
        raise UserError(f"privacy.dp.target_epsilon = {cfg.target_epsilon:g} cannot be met for {epochs} epoch(s) of "
                        f"{len(loader)} D steps at delta {cfg.delta:g} ({exc}); raise the budget or train fewer "
                        "epochs") from None
    sigma = float(opt_p.noise_multiplier)
    q = 1.0 / len(loader)
    # Reals and fakes share one forward pass: the mean is over both (dpgan-revisit's expected_batch_size).
    opt_p.expected_batch_size += fake_batch
    pd = PrivateD(engine, D_p, opt_p, loader_p, cfg, sigma, q, len(loader_p), epochs * len(loader_p))
    # Count D's parameter updates independently of the accountant's own hook, so the two can be compared.
    opt_p.original_optimizer.register_step_post_hook(lambda *_: setattr(pd, "optimizer_steps", pd.optimizer_steps + 1))
    return pd


class _DropLastNote(logging.Filter):
    """Opacus logs that DPDataLoader ignores ``drop_last``: it does, by design (Poisson batches);
    drop_last is there only to make ``len(loader)`` = N // batch, which sets q."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "drop_last" not in record.getMessage()


def quiet_opacus() -> None:
    """Opacus warns about the secure RNG on every run (the noise uses torch's generator, as every
    non-``secure_mode`` run does); once is enough for a pipeline log."""
    warnings.filterwarnings("once", message=".*[Ss]ecure RNG turned off.*")
    # D's inputs need no gradient in its own step (reals, detached fakes): PyTorch then notes that
    # Opacus' full backward hooks fire on the outputs' gradients only, which is all they need.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                              "to module outputs")
    logging.getLogger("opacus.data_loader").addFilter(_DropLastNote())
