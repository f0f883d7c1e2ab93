"""The stats sink: any name, reported any number of times, collected per window; the recorder
writes whatever was reported."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from aigc.stats import Stats
from aigc.tracking import Run
from aigc.training import StepWindow
from pipeline.train import Recorder


def test_rows_keep_each_steps_names_and_average_repeats():
    s = Stats()
    s.report("d_loss", torch.tensor(1.0))
    s.report("d_loss", torch.tensor([2.0, 4.0]))  # a tensor is averaged first (3), then with the 1
    s.report("ema_beta", 0.5)
    s.end_step(1)
    s.report("g_loss", torch.tensor(-1.5))
    s.report("r1_penalty", torch.tensor(0.25))
    s.end_step(2)
    assert len(s) == 2
    assert s.collect() == [(1, {"d_loss": 2.0, "ema_beta": 0.5}), (2, {"g_loss": -1.5, "r1_penalty": 0.25})]
    assert len(s) == 0 and s.collect() == []


def test_recorder_writes_every_reported_name(tmp_path: Path):
    rec = Recorder(Run.disabled())
    rec.on_steps(StepWindow(1, [1, 2], [{"d_loss": 1.0, "r1_penalty": 0.5}, {"d_loss": 0.9, "gp_penalty": 2.0}], 10.0))
    rec.write_losses(str(tmp_path / "losses.csv"))
    rows = list(csv.DictReader((tmp_path / "losses.csv").open()))
    assert list(rows[0]) == ["step", "epoch", "d_loss", "r1_penalty", "gp_penalty"]
    assert rows[0]["r1_penalty"] == "0.5" and rows[0]["gp_penalty"] == "" and rows[1]["gp_penalty"] == "2.0"
    assert float(rows[1]["d_loss"]) == pytest.approx(0.9)
