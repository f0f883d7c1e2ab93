"""The speed benchmark times the step the train stage runs, whichever model params.yaml makes of
the data: with ``model.conditional: auto`` on labelled digits that is the conditional net, so the
probe, the project step and the reference loop all take the class."""

from __future__ import annotations

import torch

from aigc.config import TrainConfig
from aigc.models import NetConfig
from benchmarks.train_speed import project_step, reference_loop, step_labels

NET = NetConfig("dcgan", 8, 1, 8, 8, g_widths=(16, 8), d_widths=(8,), kernel=4, conditional=True,
                classes=(0, 1, 2), class_share=(1 / 3,) * 3)


def test_benchmark_labels_follow_the_net():
    assert step_labels(7, NET).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert step_labels(7, NetConfig("dcgan", 8, 1, 8, 8, g_widths=(16, 8), d_widths=(8,), kernel=4)) is None


def test_step_and_reference_loop_time_a_conditional_net():
    images = torch.rand(8 * 6, 1, 8, 8) * 2 - 1
    cfg = TrainConfig(batch_size=8, channels_last=False, threads=1, ema_kimg=0.0)
    assert project_step(images, NET, cfg, steps=6, threads=1) > 0
    assert reference_loop(images, NET, steps=6, threads=1, batch=8) > 0


def test_batch_size_benchmark_refuses_bad_sizes_in_one_line():
    from tests.conftest import ROOT, run_module

    for sizes, says in (("64,x", "give whole numbers separated by commas"),
                        ("64,1000", "each batch must be 8..512")):
        res = run_module(["-m", "benchmarks.batch_size", "--sizes", sizes], cwd=ROOT)
        assert res.returncode != 0 and res.stderr.strip().startswith("error: --sizes") and says in res.stderr, res.stderr
        assert res.stderr.strip().count("\n") == 0
