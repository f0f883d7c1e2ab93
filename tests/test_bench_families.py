"""aigc_bench.families and time_to_quality know the pixelcnn: the families sweep's table shows
bits/dim and samples/s beside the FID gap, the time-to-quality candidates build a pixelcnn recipe
from params.yaml, and bad arguments are refused in one line (no training here: the sweep itself is
minutes of CPU, run by hand and recorded in aigc_bench/README.md)."""

from __future__ import annotations

from aigc import machine
from aigc.config import load_params
from aigc_bench.families import FAMILIES, markdown
from aigc_bench.time_to_quality import CANDIDATES, recipe
from tests.conftest import ROOT, run_module


def test_families_table_has_bits_per_dim_and_sampling_speed():
    row = {"epoch": 3, "train_seconds": 250.0, "images_per_s": 54.0, "samples_per_s": 80.0, "fid": 5.0,
           "fid_floor": 0.25, "fid_gap": 4.75, "test_bits_per_dim": 1.0123, "label_accuracy": 0.9,
           "label_accuracy_floor": 0.97}
    gan = row | {"test_bits_per_dim": None, "samples_per_s": 40000.0}
    report = {"machine": machine.describe(), "threads": 1, "load_average_before": (1.0, 0, 0),
              "load_average_after": (2.0, 0, 0), "budget_s": 240, "samples_per_score": 2000,
              "families": {"cpixelcnn": {"curve": [row]}, "cdcgan": {"curve": [gan]}, "vae": {"curve": []}}}
    text = markdown(report)
    assert "| cpixelcnn | 3 | 250 | 54 | 80 | 4.75 | 0.900 / 0.970 | 1.012 |" in text
    assert "| cdcgan | 3 | 250 | 54 | 40000 | 4.75 | 0.900 / 0.970 | - |" in text
    assert "| vae |" not in text  # no epoch within the budget: no row
    assert FAMILIES["pixelcnn"] == ("pixelcnn", False) and FAMILIES["cpixelcnn"] == ("pixelcnn", True)


def test_time_to_quality_has_pixelcnn_candidates():
    params = load_params(ROOT / "params.yaml")
    names = [n for n in CANDIDATES if "pixelcnn" in n]
    assert len(names) == 2
    models = [recipe(params, n)[0] for n in names]
    assert {m.family for m in models} == {"pixelcnn"} and {m.conditional for m in models} == {False, True}


def test_families_refuses_bad_arguments_in_one_line():
    for args, says in ((["--families", "dcgan,gpt"], "unknown ['gpt']"),
                       (["--threads", "0"], "threads must be at least 1")):
        res = run_module(["-m", "aigc_bench.families", *args], cwd=ROOT)
        assert res.returncode != 0 and res.stderr.strip().startswith("error: --") and says in res.stderr, res.stderr
        assert res.stderr.strip().count("\n") == 0
