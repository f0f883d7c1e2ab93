"""Differential privacy for D (aigc/privacy/dp.py) with the real Opacus, on tiny 8x8 data.

The budget is checked against Opacus' RDP analysis called directly (not through the accountant
the run used), the G step is shown to leave no per-sample gradients on D, the accountant counts
exactly D's optimiser steps, and a private D learns the same way round as a non-private one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aigc.config import DPConfig, RuntimeConfig, TrainConfig, parse_params
from aigc.errors import ConfigError, UserError
from aigc.models import NetConfig, build_discriminator
from aigc.privacy import dp as dp_lib
from aigc.training import train_gan

NET = NetConfig("dcgan", 8, 1, 8, 8, g_widths=(16, 8), d_widths=(8, 16), kernel=4, spectral_norm=True)
CFG = TrainConfig(epochs=2, batch_size=32, grid_size=4, loss="hinge", ema_kimg=0.0)
RT = RuntimeConfig(log_every=4)


def images(n: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def independent_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """epsilon of the subsampled Gaussian mechanism from Opacus' RDP analysis functions, on a denser
    grid of orders than the accountant's default."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 50.0 for x in range(1, 500)] + list(range(11, 256))
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                              orders=orders), delta=delta)
    return float(eps)


@pytest.fixture(scope="module")
def private_run():
    rows: list[dict] = []
    eps_at_epoch: list[float | None] = []
    dp = DPConfig(enabled=True, target_epsilon=8.0, delta=1e-4, max_grad_norm=1.0)
    result = train_gan(CFG, NET, images(), seed=0, progress=False, dp=dp,
                       on_steps=lambda w: rows.extend(w.rows), on_epoch=lambda e: eps_at_epoch.append(e.epsilon), runtime=RT)
    return result, rows, eps_at_epoch, dp


def test_epsilon_matches_an_independent_rdp_computation(private_run):
    result, rows, eps_at_epoch, dp = private_run
    pd = result.recipe.pd
    assert pd.sample_rate == pytest.approx(1 / 10)  # 320 images, batches of 32: q = 1/10, 10 steps per epoch
    assert result.steps == pd.planned_steps == 20
    spent = pd.epsilon()
    expected = independent_epsilon(pd.sample_rate, pd.noise_multiplier, result.steps, dp.delta)
    assert spent == pytest.approx(expected, rel=0.01)
    # the noise was chosen for the budget: spent just under it, not far below
    assert 0.9 * dp.target_epsilon <= spent <= dp.target_epsilon * 1.001
    # reported once per epoch, rising, and the last equals the final epsilon
    per_epoch = [r["epsilon"] for r in rows if "epsilon" in r]
    assert len(per_epoch) == 2 and 0 < per_epoch[0] < per_epoch[1] == pytest.approx(spent)
    assert eps_at_epoch == pytest.approx(per_epoch)


def test_accountant_steps_equal_d_optimiser_steps_and_the_checkpoint_keeps_them(private_run):
    result, _, _, _ = private_run
    pd = result.recipe.pd
    assert pd.optimizer_steps == pd.steps == result.steps == 20
    state = result.state["extra"]["dp"]
    assert dp_lib.steps_of(state["accountant_state"]) == 20
    assert state["noise_multiplier"] == pd.noise_multiplier and state["epsilon"] == pytest.approx(pd.epsilon())
    # the plain D is saved (no Opacus prefix), built without spectral norm
    assert not any(k.startswith("_module.") for k in result.state["D"])
    assert result.net.spectral_norm is False
    assert not any("parametrizations" in k for k in result.recipe.D.state_dict())


def test_no_grad_sample_is_left_on_d_after_training(private_run):
    result, _, _, _ = private_run
    assert all(getattr(p, "grad_sample", None) is None for p in result.recipe.D.parameters())


def test_the_g_step_does_not_reach_d_per_sample_gradients():
    """With hooks off (and D frozen) a G-step backward through D leaves no grad_sample; the control,
    the same backward with hooks on, does: the check can fail."""
    torch.manual_seed(0)
    D = build_discriminator(dp_lib.private_net(NET))
    opt = torch.optim.Adam(D.parameters())
    pd = dp_lib.make_private(DPConfig(enabled=True, delta=1e-4), D, opt, images(), None, 32, 1, 32)
    fake = torch.randn(8, 1, 8, 8, requires_grad=True)

    D.requires_grad_(False)
    with pd.hooks_off():
        pd.D(fake).mean().backward()
    D.requires_grad_(True)
    assert fake.grad is not None  # the G step's gradient still flows through D to the fakes
    assert all(getattr(p, "grad_sample", None) is None for p in D.parameters())
    assert pd.D.hooks_enabled

    pd.D(fake).mean().backward()  # control: a backward with the hooks on
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 8 for p in D.parameters())


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_a_private_d_learns_the_same_way_round_as_a_plain_one(loss: str):
    """synthcity #330 trained its private D with the sign flipped. Reals are bright images, G starts
    near 0: after a few steps a D that learns the right way says real to the reals (d_real > d_fake)
    and its loss falls, private (a generous budget, so little noise) or not."""
    real = (torch.rand(320, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.2 + 0.8)
    cfg = CFG.model_copy(update={"loss": loss, "epochs": 3, "lr_d": 2e-3, "lr_g": 1e-5})
    for dp in (None, DPConfig(enabled=True, target_epsilon=500.0, delta=1e-4, max_grad_norm=1.0)):
        rows: list[dict] = []
        train_gan(cfg, NET, real, seed=0, progress=False, dp=dp, on_steps=lambda w: rows.extend(w.rows), runtime=RT)
        first, last = rows[:4], rows[-4:]
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        assert mean(last, "d_real") > mean(last, "d_fake"), (dp, last)
        assert mean(last, "d_loss") < mean(first, "d_loss"), (dp, first, last)


def test_conditional_projection_d_trains_privately():
    net = NetConfig("dcgan", 8, 1, 8, 8, g_widths=(16, 8), d_widths=(8,), kernel=4, conditional=True,
                    classes=(0, 1, 2, 3), class_share=(0.25,) * 4)
    labels = torch.arange(320) % 4
    result = train_gan(CFG.model_copy(update={"epochs": 1}), net, images(), seed=0, progress=False, labels=labels,
                       dp=DPConfig(enabled=True, target_epsilon=5.0, delta=1e-4), runtime=RT)
    assert result.recipe.pd.steps == result.recipe.pd.optimizer_steps == result.steps == 10
    assert 0 < result.recipe.pd.epsilon() <= 5.0 * 1.001


def test_a_tiny_budget_is_never_exceeded_or_refused_before_training():
    result = train_gan(CFG.model_copy(update={"epochs": 1}), NET, images(), seed=0, progress=False,
                       dp=DPConfig(enabled=True, target_epsilon=0.1, delta=1e-4), runtime=RT)
    assert result.steps == 10 and 0 < result.recipe.pd.epsilon() <= 0.1 * 1.001
    assert result.recipe.pd.noise_multiplier >= 9  # that budget buys D almost nothing but noise
    # below what any noise level Opacus searches can meet: refused, nothing trained
    with pytest.raises(UserError, match=r"privacy.dp.target_epsilon = 0.05 cannot be met for 1 epoch\(s\) of 10 D "
                                        r"steps at delta 0.0001 \(The privacy budget is too low.\); raise the budget"):
        train_gan(CFG.model_copy(update={"epochs": 1}), NET, images(), seed=0, progress=False,
                  dp=DPConfig(enabled=True, target_epsilon=0.05, delta=1e-4), runtime=RT)


def test_a_resumed_run_keeps_the_budget_it_spent_and_refuses_to_exceed_it(private_run):
    result, _, _, dp = private_run
    state = result.recipe.pd.state_dict()
    D = build_discriminator(dp_lib.private_net(NET))
    # two more epochs at the same sigma would take the spent epsilon (~8) past the 8.0 budget
    with pytest.raises(UserError, match=r"privacy budget: 20 D steps already spent epsilon [78][.\d]*, and 20 more "
                                        r"would reach 1\d\.\d+ > privacy\.dp\.target_epsilon = 8; nothing was trained"):
        dp_lib.make_private(dp, D, torch.optim.Adam(D.parameters()), images(), None, 32, 2, 32, resume=state)
    assert all(not m._forward_hooks for m in D.modules())  # refused before Opacus hooked any layer
    # with a larger budget the resumed accountant continues from 20 steps, not from zero
    pd = dp_lib.make_private(dp.model_copy(update={"target_epsilon": 50.0}), D, torch.optim.Adam(D.parameters()),
                             images(), None, 32, 1, 32, resume=state)
    assert pd.steps == 20 and pd.epsilon() == pytest.approx(result.recipe.pd.epsilon())


def test_batchnorm_in_d_is_refused_naming_the_layer():
    D = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))
    with pytest.raises(UserError, match=r"BatchNorm.*GroupNorm"):
        dp_lib.check_discriminator(D)


def test_delta_must_be_below_one_over_n():
    with pytest.raises(UserError, match=r"privacy.dp.delta = 0.01 is not below 1/N = 1/320"):
        train_gan(CFG, NET, images(), seed=0, progress=False, dp=DPConfig(enabled=True, delta=0.01), runtime=RT)


@pytest.mark.parametrize("train, key", [({"r1_gamma": 1.0}, "train.r1_gamma = 1.0"),
                                        ({"loss": "wgan", "gp_weight": 10.0}, "train.gp_weight = 10.0"),
                                        ({"runtime": {"compile": True}}, "runtime.compile = true")])
def test_penalties_that_need_double_backward_are_refused_at_load(train: dict, key: str):
    section = train if "runtime" in train else {"train": train}
    with pytest.raises(ConfigError) as err:
        parse_params(section | {"privacy": {"dp": {"enabled": True}}})
    assert str(err.value).startswith(f"params.yaml: {key} with privacy.dp.enabled = true") and "\n" not in str(err.value)
    parse_params(section | {"privacy": {"dp": {"enabled": False}}})


def test_window_scalars_stay_finite_with_dp(private_run):
    _, rows, _, _ = private_run
    assert rows and all(math.isfinite(v) for r in rows for v in r.values())
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(rows[0])


def test_a_killed_private_run_resumes_with_its_accountant(private_run):
    """The accountant travels in the periodic checkpoint (extra.dp): resumed after epoch 1, the run
    spends the same epsilon over the same number of D steps as the uninterrupted one."""
    result, _, _, dp = private_run
    states: list[dict] = []
    cfg, rt = CFG, RuntimeConfig(threads=1, channels_last=False, log_every=4)
    train_gan(cfg, NET, images(), seed=0, progress=False, dp=dp, on_checkpoint=states.append, runtime=rt)
    after_epoch_1 = next(s for s in states if s["epoch"] == 1)
    assert dp_lib.steps_of(after_epoch_1["extra"]["dp"]["accountant_state"]) == 10
    resumed = train_gan(cfg, NET, images(), seed=0, progress=False, dp=dp, resume=after_epoch_1, runtime=rt)
    assert resumed.recipe.pd.steps == resumed.recipe.pd.optimizer_steps + 10 == result.recipe.pd.steps == 20
    assert resumed.recipe.pd.noise_multiplier == result.recipe.pd.noise_multiplier
    assert resumed.recipe.pd.epsilon() == pytest.approx(result.recipe.pd.epsilon(), rel=1e-9)
