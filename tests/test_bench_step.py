"""The speed benchmark times the step the train stage runs, whichever model params.yaml makes of
the data: with ``model.conditional: auto`` on labelled digits that is the conditional net, so the
probe, the project step and the reference loop all take the class."""

from __future__ import annotations

import pytest
import torch

from aigc.config import TrainConfig
from aigc.models import NetConfig
from aigc_bench.train_speed import project_step, reference_loop, step_labels

NET = NetConfig("dcgan", 8, 1, 8, 8, g_widths=(16, 8), d_widths=(8,), kernel=4, conditional=True,
                classes=(0, 1, 2), class_share=(1 / 3,) * 3)


def test_benchmark_labels_follow_the_net():
    assert step_labels(7, NET).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert step_labels(7, NetConfig("dcgan", 8, 1, 8, 8, g_widths=(16, 8), d_widths=(8,), kernel=4)) is None


def test_step_and_reference_loop_time_a_conditional_net():
    images = torch.rand(8 * 6, 1, 8, 8) * 2 - 1
    cfg = TrainConfig(batch_size=8, ema_kimg=0.0)
    assert project_step(images, NET, cfg, steps=6, threads=1, channels_last=False) > 0  # runtime knobs too
    assert reference_loop(images, NET, steps=6, threads=1, batch=8) > 0


def test_batch_size_benchmark_refuses_bad_sizes_in_one_line():
    from tests.conftest import ROOT, run_module

    for sizes, says in (("64,x", "give whole numbers separated by commas"),
                        ("64,1000", "each batch must be 8..512")):
        res = run_module(["-m", "aigc_bench.batch_size", "--sizes", sizes], cwd=ROOT)
        assert res.returncode != 0 and res.stderr.strip().startswith("error: --sizes") and says in res.stderr, res.stderr
        assert res.stderr.strip().count("\n") == 0


def test_layer_levers_marked_exact_compute_the_same_function():
    """aigc_bench.layers calls a formulation *exact* only when it is: outputs and input gradients
    match the layer's own (weights mapped), with and without a bias."""
    from torch import nn

    from aigc_bench.layers import im2col_from, subpixel_from_transposed, variants

    torch.manual_seed(0)
    for bias in (False, True):
        layers = [(nn.ConvTranspose2d(6, 5, 4, 2, 1, bias=bias), (3, 6, 7, 7)),
                  (nn.ConvTranspose2d(6, 1, 4, 2, 1, bias=bias), (3, 6, 7, 7)),
                  (nn.Conv2d(1, 5, 4, 2, 1, bias=bias), (3, 1, 12, 12)),
                  (nn.Conv2d(3, 4, 3, 1, 1, bias=bias), (3, 3, 9, 9))]
        for layer, shape in layers:
            forms = [im2col_from(layer)]
            if isinstance(layer, nn.ConvTranspose2d):
                forms.append(subpixel_from_transposed(layer))
            for form in forms:
                x1 = torch.randn(shape, requires_grad=True)
                x2 = x1.detach().clone().requires_grad_(True)
                y1, y2 = layer(x1), form(x2)
                assert y1.shape == y2.shape and torch.allclose(y1, y2, atol=1e-5), (layer, form)
                g = torch.randn_like(y1)
                y1.backward(g)
                y2.backward(g)
                assert torch.allclose(x1.grad, x2.grad, atol=1e-5), (layer, form)
    # D's first layer under spectral norm is a ParametrizedConv2d: still offered its im2col form
    sn = nn.utils.parametrizations.spectral_norm(nn.Conv2d(1, 8, 4, 2, 1))
    assert any(v.startswith("im2col") for v in variants(sn))
    assert [v for v, (_, exact) in variants(nn.ConvTranspose2d(8, 4, 4, 2, 1)).items() if not exact] == \
        ["3x3 conv + PixelShuffle", "nearest up-sampling + 3x3 conv"]


def test_layers_benchmark_refuses_zero_rounds_in_one_line():
    from tests.conftest import ROOT, run_module

    res = run_module(["-m", "aigc_bench.layers", "--rounds", "0"], cwd=ROOT)
    assert res.returncode != 0 and res.stderr.strip() == "error: --rounds 0 --reps 30 --steps 30: rounds and reps must be at least 1, steps at least 3"


@pytest.mark.slow
def test_layers_benchmark_reports_every_layer_of_the_stage_nets(tmp_path):
    import json

    from tests.conftest import ROOT, run_module

    res = run_module(["-m", "aigc_bench.layers", "--rounds", "1", "--reps", "1", "--steps", "4", "--out", str(tmp_path)], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "layers.json").read_text())
    as_is = [r["layer"] for r in report["layers"] if r["variant"] == "as is"]
    # params.yaml's default: conditional dcgan, G [64, 32] (project + 2 transposed convs), D [32, 64] + head
    assert as_is == ["G.project", "G.ups.0", "G.ups.1", "D.features.0", "D.features.2", "D.head"], as_is
    assert all(r["gflop_fwd_bwd"] > r["gflop_fwd"] > 0 and r["ms_fwd_bwd"] > 0 for r in report["layers"])
    text = (tmp_path / "layers.md").read_text()
    assert "of the peak" in text and "sub-pixel 2x2 conv (exact)" in text and report["machine"]["cpu_model"] in text


def test_thin_layers_as_im2col_keeps_the_function_and_restores_the_layers():
    from torch import nn

    from aigc_bench.layers import thin_layers_as_im2col

    torch.manual_seed(0)
    G_last = nn.ConvTranspose2d(8, 1, 4, 2, 1)
    D_first = nn.utils.parametrizations.spectral_norm(nn.Conv2d(1, 8, 4, 2, 1))
    wide = nn.Conv2d(8, 8, 3, 1, 1)
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        D_first.eval()  # no power iteration: the same weight both times
        before = (G_last(x), D_first(G_last(x)), wide(x))
        forward = nn.Conv2d.forward
        with thin_layers_as_im2col():
            assert nn.Conv2d.forward is not forward
            during = (G_last(x), D_first(G_last(x)), wide(x))
    assert nn.Conv2d.forward is forward
    for a, b in zip(before, during):
        assert torch.allclose(a, b, atol=1e-5)


def test_budget_estimate_scales_the_slow_machines_rate_by_flops_and_efficiency():
    """aigc_bench.budget: the slow machine's GFLOP/s on the reference step, scaled by the FLOPs per
    image and by the two steps' achieved GFLOP/s measured here, is the reference's img/s there times
    the speed ratio measured here; the FLOPs-only figure assumes equal efficiency; whole epochs only."""
    from aigc_bench.budget import epochs_within, estimate

    e = estimate(slow_img_s=106, ref_flops_per_image=681e6, ref_img_s=400, default_flops_per_image=147.5e6,
                 default_img_s=900)
    assert e["slow_gflops"] == pytest.approx(106 * 0.681)
    assert e["img_s"] == pytest.approx(106 * 900 / 400)
    assert e["flops_only_img_s"] == pytest.approx(106 * 681 / 147.5)
    assert e["efficiency_ratio"] == pytest.approx(900 * 147.5 / (400 * 681))
    assert epochs_within(8, e["img_s"], 4480) == 25  # 480 s x 238.5 img/s = 114,480 images = 25.55 epochs
    assert epochs_within(8, 1.0, 4480) == 0


def test_budget_benchmark_refuses_bad_arguments_in_one_line():
    from tests.conftest import ROOT, run_module

    res = run_module(["-m", "aigc_bench.budget", "--minutes", "0"], cwd=ROOT)
    assert res.returncode != 0 and res.stderr.strip() == "error: --minutes must be > 0 and --rounds >= 1", res.stderr
