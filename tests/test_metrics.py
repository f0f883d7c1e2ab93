"""The metrics' parts on sets where the answer is known: the evaluator network and its file, the
real-data cache, precision/recall direction, modes, class KL and the DCR score."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prdc import compute_prdc

from aigc.config import EvaluateConfig, EvaluatorConfig
from aigc.errors import UserError
from aigc.metrics import Embedding, calc_metrics, embed, metric_names, real_embedding, reference
from aigc.metrics.evaluator import (Evaluator, EvaluatorNet, evaluator_net, evaluator_payload, label_indices,
                                    load_evaluator, weights_sha256)
from aigc.metrics.features import FeatureModule, LogitsModule
from aigc.metrics.manifold import knn_radii, prdc
from aigc.metrics.base import ceilings, expected_coverage
from aigc.metrics.memorisation import dcr_ratio, nearest
from aigc.metrics.modes import class_histogram, class_kl, covered_modes

INFO_8 = {"resolution": [8, 8], "channels": 1, "classes": list(range(10))}


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 7, 9)])
def test_evaluator_sizes_itself_from_the_data(shape: tuple[int, int, int]):
    net = evaluator_net(EvaluatorConfig(features=32), {"channels": shape[0], "resolution": list(shape[1:]),
                                                       "classes": [0, 1, 2]})
    ev = Evaluator(net).eval()
    x = torch.rand(4, *shape) * 2 - 1
    assert ev.features(x).shape == (4, 32) and ev(x).shape == (4, 3)
    e = embed(ev, x, batch_size=3)
    assert torch.allclose(e.logits, ev(x), atol=1e-5)  # one pass gives both, in eval mode


def test_evaluator_rebuilds_from_its_file_alone(tmp_path: Path):
    ev = Evaluator(evaluator_net(EvaluatorConfig(), INFO_8)).eval()
    torch.save(evaluator_payload(ev), tmp_path / "e.pt")
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from aigc.metrics.evaluator import load_evaluator; "
            "ev = load_evaluator(sys.argv[1]); torch.save(ev(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "e.pt"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, timeout=120)
    assert torch.allclose(torch.load(tmp_path / "y.pt"), ev(x), atol=1e-6)
    again = load_evaluator(tmp_path / "e.pt")
    assert weights_sha256(again) == weights_sha256(ev)
    assert again.cfg == ev.cfg and again.cfg.classes == tuple(range(10))


def test_bad_evaluator_files_and_unlabelled_data(tmp_path: Path):
    with pytest.raises(UserError, match="not found.*train_evaluator"):
        load_evaluator(tmp_path / "missing.pt")
    torch.save({"format": "something else"}, tmp_path / "g.pt")
    with pytest.raises(UserError, match="not an aigc evaluator file"):
        load_evaluator(tmp_path / "g.pt")
    with pytest.raises(UserError, match="needs labelled data"):
        evaluator_net(EvaluatorConfig(), INFO_8 | {"classes": []})


def test_labels_map_to_outputs_and_unknown_labels_fail():
    net = EvaluatorNet(1, 8, 8, classes=(3, 7, 9))
    assert label_indices(np.array([9, 3, 7]), net).tolist() == [2, 0, 1]
    with pytest.raises(UserError, match=r"labels \[5\]"):
        label_indices(np.array([3, 5]), net)


def test_torchmetrics_feature_modules_take_images_or_features():
    ev = Evaluator(EvaluatorNet(1, 8, 8, classes=tuple(range(4)), features=16)).eval()
    f, lg = FeatureModule(ev), LogitsModule(ev)
    assert (f.num_features, lg.num_features) == (16, 4)  # ints: torchmetrics never probes with 299x299
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(f(f(x)), f(x)) and torch.equal(lg(lg(x)), lg(x))


def test_real_embedding_cache_hits_and_misses(tmp_path: Path):
    ev = Evaluator(EvaluatorNet(1, 8, 8, classes=(0, 1), features=8)).eval()
    images = np.random.default_rng(0).uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32)
    kw = dict(data_sha256="a" * 64, split="train", cache_dir=tmp_path / "cache")
    first, hit1 = real_embedding(ev, images, **kw)
    second, hit2 = real_embedding(ev, images, **kw)
    assert (hit1, hit2) == (False, True) and torch.equal(first.features, second.features)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # nothing half-written left beside it
    _, hit = real_embedding(ev, images, **(kw | {"split": "test"}))
    assert not hit
    _, hit = real_embedding(ev, images, **(kw | {"data_sha256": "b" * 64}))
    assert not hit
    other = Evaluator(EvaluatorNet(1, 8, 8, classes=(0, 1), features=8)).eval()  # new weights
    assert weights_sha256(other) != weights_sha256(ev)
    _, hit = real_embedding(other, images, **kw)
    assert not hit
    for f in (tmp_path / "cache").iterdir():  # a damaged file is a miss, then rewritten
        f.write_bytes(b"garbage")
    _, hit = real_embedding(ev, images, **kw)
    assert not hit
    _, hit = real_embedding(ev, images, **kw)
    assert hit


def test_precision_and_recall_point_the_right_way():
    """Generated images all in one small corner of the real data: every one is realistic
    (precision 1) but they cover little of it (recall low). Spread far wider than the real data:
    few are realistic (precision low) but the real data is all covered (recall 1). A toolkit
    with the two swapped (toshas/torch-fidelity#58) fails this."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 2, generator=g)
    corner = torch.randn(1000, 2, generator=g) * 0.1 + 0.5
    wide = torch.randn(1000, 2, generator=g) * 8.0
    narrow = prdc(real, corner, k=5)
    assert narrow["precision"] > 0.95 and narrow["recall"] < 0.2 and narrow["coverage"] < 0.2
    broad = prdc(real, wide, k=5)
    assert broad["precision"] < 0.3 and broad["recall"] > 0.9 and broad["density"] < 0.3
    same = prdc(real, torch.randn(1000, 2, generator=g), k=5)
    assert all(0.85 < same[k] < 1.15 for k in ("precision", "recall", "density")) and same["coverage"] > 0.9


def test_prdc_matches_the_definitions_by_brute_force():
    rng = np.random.default_rng(1)
    real, fake, k = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 0.5, 3
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    r_real = np.sort(d_rr, axis=1)[:, k]  # k-th neighbour, the point itself at index 0
    r_fake = np.sort(d_ff, axis=1)[:, k]
    expected = {
        "precision": np.mean([(d_rf[:, j] < r_real).any() for j in range(30)]),
        "recall": np.mean([(d_rf[i] < r_fake).any() for i in range(40)]),
        "density": np.mean([(d_rf[:, j] < r_real).sum() / k for j in range(30)]),
        "coverage": np.mean([d_rf[i].min() < r_real[i] for i in range(40)]),
    }
    assert prdc(torch.from_numpy(real), torch.from_numpy(fake), k) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(4))
def test_prdc_agrees_with_the_authors_package(seed: int):
    """Same numbers as prdc.compute_prdc (Naeem et al.'s own code), real radii given or not."""
    rng = np.random.default_rng(seed)
    n, m, dim, k = rng.integers(50, 400), rng.integers(50, 400), int(rng.integers(2, 64)), int(rng.integers(1, 10))
    real = rng.normal(size=(n, dim)).astype(np.float32)
    fake = (rng.normal(size=(m, dim)) * rng.uniform(0.5, 2) + rng.uniform(-1, 1)).astype(np.float32)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        theirs = {name: float(v) for name, v in compute_prdc(real, fake, k).items()}
    r, f = torch.from_numpy(real), torch.from_numpy(fake)
    assert prdc(r, f, k) == pytest.approx(theirs, abs=1e-9)
    assert prdc(r, f, k, real_radii=knn_radii(r, k, batch_size=37)) == pytest.approx(theirs, abs=1e-9)


def test_modes_and_class_kl():
    data = torch.full((10,), 0.1, dtype=torch.float64)
    collapsed = torch.zeros(10, dtype=torch.float64)
    collapsed[3] = 1.0
    assert covered_modes(collapsed, data, 0.2) == 1
    assert class_kl(collapsed, data) == pytest.approx(np.log(10))
    assert covered_modes(data, data, 0.2) == 10 and class_kl(data, data) == pytest.approx(0.0)
    few = torch.tensor([0.3, 0.3, 0.3, 0.01, 0.09] + [0.0] * 5, dtype=torch.float64)
    assert covered_modes(few, data, 0.2) == 4  # 0.01 < 0.2 x 0.1
    logits = torch.eye(3)[[0, 0, 1, 2]] * 5
    assert class_histogram(Embedding(torch.zeros(4, 2), logits), 3).tolist() == [0.5, 0.25, 0.25]


def test_dcr_ratio_is_unclipped_and_measured_against_the_floor():
    assert dcr_ratio(0.9, 0.9) == pytest.approx(1.0)  # as close to train as fresh real images
    assert dcr_ratio(0.85, 0.9) == pytest.approx(1.5)  # not clipped at 1
    assert dcr_ratio(0.91, 0.9) == pytest.approx(0.9)  # 10% copies on top of an honest generator
    assert dcr_ratio(1.0, 0.9) == 0.0 and dcr_ratio(0.5, 0.5) == pytest.approx(1.0)
    assert np.isnan(dcr_ratio(1.0, 1.0))  # no room to measure: NaN, which the registry's gate refuses


def test_expected_coverage_matches_a_simulation_and_the_ceilings():
    """Naeem et al.'s eq. 7 (distribution-free) against coverage measured on 40 draws of two
    samples of the same Gaussian; 500 vs 4,500 is the old protocol's 0.41, 500 vs 500 ~0.97."""
    assert expected_coverage(4500, 500, 5) == pytest.approx(0.41, abs=0.01)
    assert expected_coverage(500, 500, 5) == pytest.approx(0.969, abs=0.002)
    g = torch.Generator().manual_seed(0)
    sims = [prdc(torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g), k=3)["coverage"]
            for _ in range(40)]
    assert np.mean(sims) == pytest.approx(expected_coverage(200, 200, 3), abs=0.01)
    top = ceilings(500, 5, 10)
    assert top["coverage"] == expected_coverage(500, 500, 5) and top["density"] == 1.0 and top["is"] == 10.0


def test_nearest_with_and_without_self():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    d, i = nearest(a, a)
    assert d.tolist() == pytest.approx([0, 0, 0], abs=1e-3)
    d, i = nearest(a, a, exclude_self=True, batch_size=2)
    assert i.tolist() == [1, 0, 1] and d.tolist() == pytest.approx([1, 1, 4], abs=1e-4)


def test_registry_and_the_floor_spread_and_ceiling_beside_each_score():
    assert metric_names() == ["fid", "kid", "inception_score", "precision_recall", "modes", "memorisation"]
    ev = Evaluator(EvaluatorNet(1, 8, 8, classes=tuple(range(4)), features=8)).eval()
    x = torch.rand(300, 1, 8, 8) * 2 - 1
    ref = reference(ev, embed(ev, x[:200]).with_pixels(x[:200]), embed(ev, x[200:250]).with_pixels(x[200:250]),
                    np.arange(200) % 4, 120, seed=0)
    assert ref.sample_size == 50 and len(ref.floor) == 50
    assert len(ref.subsets) == 4 and all(len(r) == 50 for r in ref.subsets)  # 200 // 50 disjoint subsets
    rows = torch.cat([r.features for r in ref.subsets])
    assert len(torch.unique(rows, dim=0)) == 200  # disjoint: every train image once
    cfg = EvaluateConfig(num_samples=120, kid_subsets=5)
    fake = x[250:].repeat(3, 1, 1, 1)[:120]
    scores = calc_metrics(embed(ev, fake).with_pixels(fake), ref, cfg)
    for name in ("fid", "kid", "is", "precision", "recall", "density", "coverage", "modes", "class_kl", "dcr_score",
                 "copy_share"):
        for key in (name, f"{name}_se", f"{name}_floor", f"{name}_floor_se"):
            assert np.isfinite(scores[key]), key
    for name in ("fid", "kid", "is", "precision", "recall", "density", "coverage", "modes", "class_kl", "copy_share"):
        assert np.isfinite(scores[f"{name}_ceiling"]), name
    assert scores == calc_metrics(embed(ev, fake).with_pixels(fake), ref, cfg)  # seeded
    with pytest.raises(UserError, match="prdc_k"):
        calc_metrics(embed(ev, x[:120]), ref, cfg.model_copy(update={"prdc_k": 50}), names=["precision_recall"])
