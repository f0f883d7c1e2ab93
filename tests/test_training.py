"""The training loop on tiny data: hooks, batched scalars, determinism, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc.config import RuntimeConfig, TrainConfig
from aigc.errors import UserError
from aigc.models import NetConfig
from aigc.training import EpochEnd, StepWindow, train_gan


def tiny(n: int = 48) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


# explicit layout and threads: these tests are about the loop, not the per-machine probe (test_runtime.py)
CFG = TrainConfig(epochs=2, batch_size=16, sample_every=1, grid_size=4)
RT = RuntimeConfig(log_every=2, channels_last=False, threads=1)


@pytest.mark.parametrize("family", ["dcgan", "mlp"])
def test_hooks_get_every_step_in_batches(family: str):
    windows: list[StepWindow] = []
    ends: list[EpochEnd] = []
    result = train_gan(CFG, NetConfig(family, 8, 1, 8, 8), tiny(), seed=0, on_steps=windows.append,
                       on_epoch=ends.append, progress=False, runtime=RT)
    assert result.steps == 6  # 48 // 16 per epoch, 2 epochs
    steps = [s for w in windows for s in w.steps]
    assert steps == list(range(1, 7))
    assert all(len(w.rows) <= RT.log_every for w in windows)
    rows = [r for w in windows for r in w.rows]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert all(0 <= r["d_real"] <= 1 and 0 <= r["d_fake"] <= 1 for r in rows)
    assert [(e.epoch, e.step) for e in ends] == [(1, 3), (2, 6)]
    assert ends[0].grid.dtype == np.uint8 and ends[0].grid.ndim == 3
    assert 0 < ends[0].seconds < ends[1].seconds <= result.seconds
    assert ends[0].G is result.generator


def test_same_seed_same_losses_and_weights():
    net = NetConfig("dcgan", 8, 1, 8, 8)
    runs = []
    for _ in range(2):
        rows: list[dict] = []
        r = train_gan(CFG, net, tiny(), seed=7, on_steps=lambda w: rows.extend(w.rows), progress=False, runtime=RT)
        runs.append((rows, r.recipe.G.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        torch.testing.assert_close(v, runs[1][1][k])


def test_batch_larger_than_the_data():
    with pytest.raises(UserError, match="fewer than train.batch_size = 64"):
        train_gan(TrainConfig(batch_size=64), NetConfig("mlp", 8, 1, 8, 8), tiny(20), seed=0, progress=False, runtime=RT)


def test_wrong_image_shape():
    with pytest.raises(UserError, match="the model expects"):
        train_gan(CFG, NetConfig("mlp", 8, 1, 28, 28), tiny(), seed=0, progress=False, runtime=RT)


def test_cuda_requested_without_one():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="no CUDA device"):
        train_gan(TrainConfig(batch_size=16), NetConfig("mlp", 8, 1, 8, 8), tiny(), seed=0, progress=False,
                  runtime=RuntimeConfig(device="cuda"))


def test_channels_last_trains_the_same_networks():
    # NHWC is a memory layout, not a different model: same seed, (numerically) the same losses.
    rows = {}
    for cl in (False, True):
        got: list[dict] = []
        # bce: its losses are O(1); hinge's G loss sits near 0, where a relative tolerance means nothing
        cfg = CFG.model_copy(update={"epochs": 1, "loss": "bce"})
        train_gan(cfg, NetConfig("dcgan", 8, 1, 8, 8), tiny(), seed=3, on_steps=lambda w: got.extend(w.rows),
                  progress=False, runtime=RT.model_copy(update={"channels_last": cl}))
        rows[cl] = got
    for a, b in zip(rows[False], rows[True]):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k


# --- the switches of issue 9: stats sink, losses, R1, spectral norm, EMA, DiffAugment, guard ---------


def rows_of(cfg: TrainConfig, net: NetConfig, images: torch.Tensor, seed: int = 0, **kw) -> tuple[list, object]:
    steps: list[tuple[int, dict]] = []
    result = train_gan(cfg, net, images, seed=seed, progress=False,
                       on_steps=lambda w: steps.extend(zip(w.steps, w.rows)), **kw, runtime=RT)
    return steps, result


@pytest.mark.parametrize("loss,extra", [("hinge", {}), ("wgan", {"gp_weight": 10.0})])
def test_other_losses_train_and_report_their_scalars(loss: str, extra: dict):
    cfg = CFG.model_copy(update={"loss": loss, **extra})
    steps, _ = rows_of(cfg, NetConfig("dcgan", 8, 1, 8, 8), tiny())
    assert len(steps) == 6 and all(math.isfinite(v) for _, r in steps for v in r.values())
    assert ("gp_penalty" in steps[0][1]) == (loss == "wgan")


def test_r1_runs_lazily_with_scaled_lr_and_betas():
    cfg = CFG.model_copy(update={"r1_gamma": 1.0, "r1_interval": 4})
    steps, result = rows_of(cfg, NetConfig("dcgan", 8, 1, 8, 8), tiny())
    assert [s for s, r in steps if "r1_penalty" in r] == [1, 5]  # steps 1, 1 + 4, ...
    assert all(r["r1_penalty"] >= 0 for _, r in steps if "r1_penalty" in r)
    group = result.recipe.opt_d.param_groups[0]
    assert group["lr"] == pytest.approx(cfg.lr_d * 4 / 5)
    assert group["betas"] == pytest.approx((cfg.beta1 ** 0.8, cfg.beta2 ** 0.8))
    assert result.recipe.opt_g.param_groups[0]["lr"] == cfg.lr_g  # G's optimiser is untouched


def test_spectral_norm_on_and_off():
    from torch import nn

    from aigc.models import build_discriminator

    plain = build_discriminator(NetConfig("dcgan", 8, 1, 8, 8))
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())
    D = build_discriminator(NetConfig("dcgan", 8, 1, 8, 8, spectral_norm=True))
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    for _ in range(30):  # each training-mode forward runs one power iteration
        D(torch.randn(4, 1, 8, 8))
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)
    raw = [torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
           for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert any(abs(s - 1.0) > 0.1 for s in raw)  # without it, weights are not unit-norm


def test_ema_generator_is_the_result_and_reports_its_decay():
    cfg = CFG.model_copy(update={"ema_kimg": 1.0, "ema_rampup": 0.5})
    ends: list[EpochEnd] = []
    steps, result = rows_of(cfg, NetConfig("dcgan", 8, 1, 8, 8), tiny(), on_epoch=ends.append)
    # beta = 0.5 ** (batch / min(1000, seen * 0.5)) with seen = step * 16
    for s, r in steps:
        assert r["ema_beta"] == pytest.approx(0.5 ** (16 / min(1000, s * 16 * 0.5)))
    assert result.recipe.ema.G is not None and result.generator is result.recipe.ema.G and ends[-1].G is result.recipe.ema.G
    differs = any(not torch.equal(a, b) for a, b in zip(result.recipe.ema.G.parameters(), result.recipe.G.parameters()))
    assert differs and not result.recipe.ema.G.training


def test_diffaugment_is_on_everything_d_sees_in_both_steps(monkeypatch: pytest.MonkeyPatch):
    """With cutout, every batch D sees -- reals and fakes in D's step, fakes in G's -- carries a
    blanked square of exactly -1; without it, none does. D runs twice per step either way: once on
    the reals and fakes together (D's step), once on the fakes (G's step)."""
    import aigc.training.gan as training

    seen: list[torch.Tensor] = []
    build = training.build_discriminator

    def recording(net):
        D = build(net)
        D.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
        return D

    monkeypatch.setattr(training, "build_discriminator", recording)
    ones = torch.ones(48, 1, 8, 8)  # real images without a single background pixel
    for policy in ([], ["cutout"]):
        seen.clear()
        train_gan(CFG.model_copy(update={"augment": policy, "epochs": 1}), NetConfig("dcgan", 8, 1, 8, 8), ones,
                  seed=0, progress=False, runtime=RT)
        assert len(seen) == 3 * 2  # 3 steps x (reals + fakes in D's step, fakes in G's step)
        assert [len(x) for x in seen] == [32, 16] * 3  # batch 16: 16 reals and 16 fakes, then 16 fakes
        blanked = torch.stack([(x == -1).flatten(1).sum(1).min() for x in seen])
        if policy:
            assert (blanked >= 4).all()  # every image of every batch had its square cut out
        else:
            assert (blanked == 0).all()


def test_guard_stops_on_a_non_finite_loss_and_names_the_step():
    from aigc.training import TrainingDiverged

    images = tiny()
    images[:, :, 0, 0] = float("nan")  # every batch poisoned: the first step already fails
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1 \(epoch 1\): d_loss = nan"):
        train_gan(CFG, NetConfig("dcgan", 8, 1, 8, 8), images, seed=0, progress=False, runtime=RT)


def test_guard_stops_when_d_wins_outright():
    from aigc.training import TrainingDiverged

    # Reals all white, a D with a 10x learning rate: it separates them from G's grey at once.
    cfg = CFG.model_copy(update={"guard_steps": 4, "lr_d": 0.002, "epochs": 20})
    with pytest.raises(TrainingDiverged, match=r"D separated every real from every fake image for 4 consecutive"):
        train_gan(cfg, NetConfig("dcgan", 8, 1, 8, 8), torch.ones(48, 1, 8, 8), seed=0, progress=False, runtime=RT)
    steps, _ = rows_of(cfg.model_copy(update={"guard_steps": 0, "epochs": 2}), NetConfig("dcgan", 8, 1, 8, 8),
                       torch.ones(48, 1, 8, 8))
    assert len(steps) == 6  # guard_steps 0: off


def test_abort_hook_ends_training_early():
    calls = []
    result = train_gan(CFG.model_copy(update={"epochs": 5}), NetConfig("mlp", 8, 1, 8, 8), tiny(), seed=0,
                       progress=False, abort=lambda: calls.append(1) or len(calls) >= 2, runtime=RT)
    assert result.steps == 3  # a window of log_every = 2 steps, then the epoch's last step (a window of 1)


@pytest.mark.parametrize("family", ["mlp", "vae"])
def test_an_aborted_run_is_not_complete_in_every_family(family: str):
    """One loop for every family: an abort ends the run incomplete, so a rerun goes on from it (the
    VAE's own loop used to report complete: True after an abort)."""
    from aigc.config import VAEConfig
    from aigc.training import train_vae

    net = NetConfig(family, 8, 1, 8, 8)
    calls: list[int] = []
    kw = dict(seed=0, progress=False, abort=lambda: calls.append(1) or len(calls) >= 2, runtime=RT)
    result = (train_vae(CFG, VAEConfig(), net, tiny(), **kw) if family == "vae" else train_gan(CFG, net, tiny(), **kw))
    assert result.steps == 3 and result.epochs == 1  # two windows of log_every = 2 steps, stopped in epoch 1
    assert not result.complete and result.state["complete"] is False and result.state["epoch"] == 1
