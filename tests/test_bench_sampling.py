"""aigc_bench.sampling on tiny nets and 8x8 images: every (point, batch) gets its medians and rounds,
and bad arguments are refused in one line."""

from __future__ import annotations

import torch

from aigc.config import parse_params
from aigc_bench.sampling import markdown, run
from tests.conftest import ROOT, run_module


def test_sampling_benchmark_times_every_point_and_batch():
    params = parse_params({"pixelcnn": {"layers": 2, "width": 6}, "model": {"g_widths": [16, 8], "d_widths": [8]}})
    points = {"pixelcnn": ("pixelcnn", 1, 8), "pixelcnn_rgb": ("pixelcnn", 3, 8), "dcgan": ("dcgan", 1, 8)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run(points, [2, 4], 2, params, {"pixelcnn": 4, "pixelcnn_rgb": 4, "dcgan": 8})
    finally:
        torch.set_num_threads(threads)
    rows = {(r["point"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(p, b) for p in points for b in (2, 4)}
    for r in rows.values():
        assert len(r["rounds"]) == 2 and all(x > 0 for x in r["rounds"])
        assert min(r["rounds"]) <= r["samples_per_s"] <= max(r["rounds"])
    assert rows[("pixelcnn_rgb", 2)]["shape"] == [3, 8, 8] and rows[("pixelcnn", 2)]["net"] == {"layers": 2, "width": 6}
    from aigc import machine

    text = markdown(report | {"command": "test", "machine": machine.describe(), "threads": 1, "rounds": 2,
                              "load_average_before": (0.5, 0, 0), "load_average_after": (0.6, 0, 0), "seconds": 1.0,
                              "evaluate_batch": 4, "evaluate_samples": 100})
    assert "| pixelcnn_rgb | pixelcnn (2 layers x 6) | (3, 8, 8) | 4 |" in text
    assert "The evaluate stage's 100 samples of the pixelcnn" in text


def test_sampling_benchmark_refuses_bad_arguments_in_one_line():
    for args, says in ((["--points", "pixelcnn,gpt"], "unknown ['gpt']"),
                       (["--batches", "64,x"], "give whole numbers separated by commas"),
                       (["--rounds", "0"], "each must be at least 1")):
        res = run_module(["-m", "aigc_bench.sampling", *args], cwd=ROOT)
        assert res.returncode != 0 and res.stderr.strip().startswith("error: --") and says in res.stderr, res.stderr
        assert res.stderr.strip().count("\n") == 0
