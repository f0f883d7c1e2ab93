"""The training loop on tiny data: hooks, batched scalars, determinism, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc.config import TrainConfig
from aigc.errors import UserError
from aigc.models import NetConfig
from aigc.training import EpochEnd, StepWindow, train_gan


def tiny(n: int = 48) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


CFG = TrainConfig(epochs=2, batch_size=16, log_every=2, sample_every=1, grid_size=4)


@pytest.mark.parametrize("family", ["dcgan", "mlp"])
def test_hooks_get_every_step_in_batches(family: str):
    windows: list[StepWindow] = []
    ends: list[EpochEnd] = []
    result = train_gan(CFG, NetConfig(family, 8, 1, 8, 8), tiny(), seed=0, on_steps=windows.append,
                       on_epoch=ends.append, progress=False)
    assert result.steps == 6  # 48 // 16 per epoch, 2 epochs
    steps = [s for w in windows for s in w.steps]
    assert steps == list(range(1, 7))
    assert all(len(w.rows) <= CFG.log_every for w in windows)
    rows = [r for w in windows for r in w.rows]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert all(0 <= r["d_real"] <= 1 and 0 <= r["d_fake"] <= 1 for r in rows)
    assert [(e.epoch, e.step) for e in ends] == [(1, 3), (2, 6)]
    assert ends[0].grid.dtype == np.uint8 and ends[0].grid.ndim == 3
    assert 0 < ends[0].seconds < ends[1].seconds <= result.seconds
    assert ends[0].G is result.G


def test_same_seed_same_losses_and_weights():
    net = NetConfig("dcgan", 8, 1, 8, 8)
    runs = []
    for _ in range(2):
        rows: list[dict] = []
        r = train_gan(CFG, net, tiny(), seed=7, on_steps=lambda w: rows.extend(w.rows), progress=False)
        runs.append((rows, r.G.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        torch.testing.assert_close(v, runs[1][1][k])


def test_batch_larger_than_the_data():
    with pytest.raises(UserError, match="fewer than train.batch_size = 64"):
        train_gan(TrainConfig(batch_size=64), NetConfig("mlp", 8, 1, 8, 8), tiny(20), seed=0, progress=False)


def test_wrong_image_shape():
    with pytest.raises(UserError, match="the model expects"):
        train_gan(CFG, NetConfig("mlp", 8, 1, 28, 28), tiny(), seed=0, progress=False)


def test_cuda_requested_without_one():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="no CUDA device"):
        train_gan(TrainConfig(device="cuda", batch_size=16), NetConfig("mlp", 8, 1, 8, 8), tiny(), seed=0, progress=False)


def test_channels_last_trains_the_same_networks():
    # NHWC is a memory layout, not a different model: same seed, (numerically) the same losses.
    rows = {}
    for cl in (False, True):
        got: list[dict] = []
        cfg = CFG.model_copy(update={"channels_last": cl, "epochs": 1})
        train_gan(cfg, NetConfig("dcgan", 8, 1, 8, 8), tiny(), seed=3, on_steps=lambda w: got.extend(w.rows),
                  progress=False)
        rows[cl] = got
    for a, b in zip(rows[False], rows[True]):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k
