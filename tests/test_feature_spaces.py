"""The self-supervised feature space ranks a generator's progress as the classifier's does. On the
default data (5,000 real MNIST digits) one conditional dcgan (the default recipe with the light net,
G 128-64 / D 64-128, the default until issue 26: its first epochs improve steadily, where the
narrow default's first two are both noise-like) is trained for a few epochs and snapshotted after each; FID in each space -- the classifier's (labels used) and the
contrastive network's (no labels) -- must order real held-out images (the floor) and the snapshots
identically, so a ranking of runs made where there are no labels is the one the labels would give.
Blurred real images and noise must land above the floor in the learnt space as in the classifier's
(tests/test_evaluate.py). Measured (aigc_bench/README.md): the two spaces disagree on where blur
sits among early snapshots -- the classifier scores 3x3-blurred digits better than a 4-epoch
generator, the learnt space worse than a 3-epoch one -- so that order is not asserted.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from aigc.config import DataConfig, EvaluateConfig, EvaluatorConfig, Params, RuntimeConfig
from aigc.data.preprocess import preprocess
from aigc.data.sources import load_source
from aigc.metrics import calc_metrics, embed, reference
from aigc.metrics.evaluator import evaluator_net, train_evaluator
from aigc.models import draw
from aigc.training import Hooks, recipe_for, train

pytestmark = pytest.mark.slow

EPOCHS = 4  # snapshots after epochs 1..4 of the light net's recipe; FID falls ~3-8x per epoch here
LIGHT = {"g_widths": [128, 64], "d_widths": [64, 128]}


@pytest.fixture(scope="module")
def fids() -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)  # one core per pytest-xdist worker
    p = preprocess(load_source(DataConfig()), DataConfig(), seed=0)
    n = len(p.test["labels"])
    params = Params()
    cfg = params.train.model_copy(update={"epochs": EPOCHS})
    model = params.model.model_copy(update=LIGHT)
    recipe, data, _ = recipe_for(model, cfg, params.vae, params.privacy.dp, p.info, p.train)
    snapshots: dict[str, torch.nn.Module] = {}

    def keep(end) -> None:
        snapshots[f"epoch{end.epoch}"] = copy.deepcopy(end.G).eval()

    result = train(cfg, recipe, data, Hooks(on_epoch=keep, progress=False), seed=params.seed,
                   runtime=RuntimeConfig(threads=1, channels_last=False))
    test = torch.from_numpy(p.test["images"])
    cases = {name: draw(G, result.net.z_dim, 2 * n, seed=0)[0] for name, G in snapshots.items()} | {
        "blurred": F.avg_pool2d(F.pad(test.repeat(2, 1, 1, 1), (1, 1, 1, 1), mode="replicate"), 3, stride=1),
        "noise": torch.rand(2 * n, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1,
    }
    out = {}
    for features in ("classifier", "contrastive"):
        ecfg = EvaluatorConfig()
        ev = train_evaluator(ecfg, evaluator_net(ecfg, p.info, features), p.train, p.test, seed=0,
                             progress=False, device="cpu").model
        tr, te = p.train["images"], p.test["images"]
        ref = reference(ev, embed(ev, tr).with_pixels(tr), embed(ev, te).with_pixels(te), p.train["labels"],
                        num_samples=2 * n, seed=0)
        scores = {name: calc_metrics(embed(ev, x).with_pixels(x), ref, EvaluateConfig(num_samples=2 * n),
                                     names=["fid"]) for name, x in cases.items()}
        out[features] = {"real": scores["noise"]["fid_floor"]} | {k: s["fid"] for k, s in scores.items()}
    print(out)
    return out


def test_both_spaces_rank_the_floor_and_the_epochs_the_same_way(fids):
    runs = ["real", *(f"epoch{e}" for e in range(1, EPOCHS + 1))]
    order = {space: sorted(runs, key=f.get) for space, f in fids.items()}
    assert order["contrastive"] == order["classifier"], fids
    assert order["contrastive"] == ["real", *(f"epoch{e}" for e in range(EPOCHS, 0, -1))], fids  # later is better


def test_each_epoch_is_clearly_better_than_the_one_before_in_both_spaces(fids):
    """At least 20% lower FID per epoch (measured: 1.4x to 16x), far beyond the ~1-3% spread of one
    FID at this sample size: the ranking above is not decided by noise."""
    for space, f in fids.items():
        values = [f[f"epoch{e}"] for e in range(1, EPOCHS + 1)]
        assert all(b < 0.8 * a for a, b in zip(values, values[1:], strict=False)), (space, f)


def test_blur_and_noise_score_far_above_the_floor_in_the_learnt_space(fids):
    f = fids["contrastive"]
    assert f["noise"] > f["blurred"] > 10 * f["real"], f
