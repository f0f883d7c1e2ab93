"""A feature space for data without labels: the SimCLR loss against its definition, the contrastive
evaluator's network, file and training, which evaluator ``evaluate.features`` picks for which data,
and how the scores, the registry gates and the example folders behave when there are no classes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aigc.config import ContrastiveConfig, DataConfig, EvaluateConfig, EvaluatorConfig, RegisterConfig
from aigc.data.examples import write_example
from aigc.data.sources import load_source
from aigc.errors import UserError
from aigc.metrics import calc_metrics, embed, reference
from aigc.metrics.contrastive import nt_xent, views
from aigc.metrics.evaluator import (Evaluator, evaluator_net, evaluator_payload, load_evaluator, objective_for,
                                    train_evaluator, unavailable)
from aigc.promotion import gates

LABELLED = {"resolution": [8, 8], "channels": 1, "classes": [0, 1, 2], "counts": {"train": 30,
            "train_per_class": {"0": 10, "1": 10, "2": 10}}}
UNLABELLED = {"resolution": [8, 8], "channels": 1, "classes": [], "counts": {"train": 30, "train_per_class": {"-1": 30}}}
PARTLY = {"resolution": [8, 8], "channels": 1, "classes": [0, 1], "counts": {"train": 30,
          "train_per_class": {"-1": 10, "0": 10, "1": 10}}}


def test_nt_xent_is_simclr_s_loss_by_brute_force():
    g = torch.Generator().manual_seed(0)
    z0, z1, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 0.3
    z = torch.nn.functional.normalize(torch.cat([z0, z1]), dim=1)
    total = 0.0
    for i in range(10):  # anchor i's positive is its other view; every other view is a negative
        j = (i + 5) % 10
        others = [k for k in range(10) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / sum(math.exp(float(z[i] @ z[k]) / t) for k in others))
    assert float(nt_xent(z0, z1, t)) == pytest.approx(total / 10, rel=1e-5)
    assert float(nt_xent(z0, z0 + 1e-3, 0.05)) < float(nt_xent(z0, z1, 0.05))  # matching views: a low loss


@pytest.mark.parametrize("channels", [1, 3])
def test_views_keep_shape_and_range_and_differ(channels: int):
    torch.manual_seed(0)
    x = torch.rand(6, channels, 16, 16)
    a, b = views(channels, 16, 16, 0.125)(x), views(channels, 16, 16, 0.125)(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("info, features, want", [
    (LABELLED, "auto", "classifier"), (UNLABELLED, "auto", "contrastive"), (PARTLY, "auto", "contrastive"),
    (LABELLED, "contrastive", "contrastive"), (LABELLED, "inception", "classifier"),
    (UNLABELLED, "inception", "contrastive")])
def test_auto_picks_the_classifier_only_when_every_image_is_labelled(info, features, want):
    assert objective_for(features, info)[0] == want


@pytest.mark.parametrize("info, what", [(UNLABELLED, "lists 0 class"), (PARTLY, "10 of 30 training images have no label")])
def test_a_classifier_on_data_it_cannot_learn_from_is_one_line(info, what):
    with pytest.raises(UserError) as err:
        objective_for("classifier", info)
    assert what in str(err.value) and "evaluate.features: auto" in str(err.value)


def _data(n: int = 64, side: int = 8, labelled: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 1, side, side), dtype=np.float32) * 2 - 1)
    return {"images": images, "labels": np.arange(n) % 3 if labelled else np.full(n, -1)}


def test_a_contrastive_evaluator_trains_has_no_logits_and_rebuilds_from_its_file(tmp_path: Path):
    cfg = EvaluatorConfig(base_channels=4, features=8, contrastive=ContrastiveConfig(epochs=2, batch_size=16))
    net = evaluator_net(cfg, UNLABELLED, "contrastive")
    assert net.classes == () and net.objective == "contrastive"
    result = train_evaluator(cfg, net, _data(), _data(32, seed=1), seed=0, progress=False, device="cpu")
    assert result.steps == 2 * (64 // 16) and result.test_accuracy is None
    assert 0 <= result.checks["test_view_retrieval"] <= 1 and "test_knn_accuracy" not in result.checks
    summary = result.summary()
    assert summary["objective"] == "contrastive" and "test_accuracy" not in summary
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    ev = result.model
    assert ev(x).shape == (5, 0) and ev.features(x).shape == (5, 8) and not ev.has_logits
    torch.save(evaluator_payload(ev), tmp_path / "e.pt")
    again = load_evaluator(tmp_path / "e.pt")
    assert again.cfg == ev.cfg and torch.equal(again.features(x), ev.features(x))
    # ... and training again with the same seed gives the same network
    twice = train_evaluator(cfg, net, _data(), _data(32, seed=1), seed=0, progress=False, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(twice.model.state_dict().values(), ev.state_dict().values(),
                                                   strict=True))


def test_on_labelled_data_the_contrastive_space_reports_a_knn_accuracy():
    cfg = EvaluatorConfig(base_channels=4, features=8, contrastive=ContrastiveConfig(epochs=1, batch_size=16))
    result = train_evaluator(cfg, evaluator_net(cfg, LABELLED, "contrastive"), _data(labelled=True),
                             _data(30, labelled=True, seed=1), seed=0, progress=False, device="cpu")
    assert 0 <= result.checks["test_knn_accuracy"] <= 1
    assert "knn accuracy" in result.describe(30)


def test_without_classes_the_class_scores_are_not_computed_but_said_to_be_unavailable():
    cfg = EvaluatorConfig(base_channels=4, features=8, contrastive=ContrastiveConfig(epochs=1, batch_size=16))
    train, test = _data(60), _data(20, seed=1)
    ev = train_evaluator(cfg, evaluator_net(cfg, UNLABELLED, "contrastive"), train, test, seed=0, progress=False,
                         device="cpu").model
    ref = reference(ev, embed(ev, train["images"]).with_pixels(train["images"]),
                    embed(ev, test["images"]).with_pixels(test["images"]), train["labels"], 40, seed=0)
    fake = torch.rand(40, 1, 8, 8) * 2 - 1
    scores = calc_metrics(embed(ev, fake).with_pixels(fake), ref, EvaluateConfig(num_samples=40, kid_subsets=5,
                                                                                 kid_subset_size=10))
    assert {"fid", "kid", "precision", "coverage", "dcr_score", "copy_share"} <= set(scores)
    assert not {"is", "modes", "class_kl"} & set(scores)
    assert all(math.isfinite(v) for v in scores.values())
    why = unavailable(ev.cfg, data_labelled=False)
    assert why == {k: "not available: unlabelled" for k in ("is", "modes", "class_kl", "label_accuracy")}
    assert "self-supervised" in unavailable(ev.cfg, data_labelled=True)["modes"]


def test_the_modes_gate_says_why_it_is_skipped_and_a_class_metric_cannot_rank():
    candidate = {"fid": 3.0, "fid_floor": 1.0, "dcr_score": 1.0, "copy_share": 0.0, "classes": 0,
                 "not_available": {"modes": "not available: unlabelled", "is": "not available: unlabelled"}}
    by_name = {g.name: g for g in gates(candidate, RegisterConfig(), True, None)}
    assert by_name["modes"].passed and by_name["modes"].observed == "not available: unlabelled"
    assert all(g.passed for g in by_name.values())
    metric = {g.name: g for g in gates(candidate, RegisterConfig(metric="modes"), True, None)}["metric"]
    assert not metric.passed and metric.observed == "not available: unlabelled"
    # with classes the gate still counts them (and fails a generator that misses most)
    labelled = {g.name: g for g in gates(candidate | {"classes": 10, "modes": 3, "not_available": {}},
                                         RegisterConfig(), True, None)}
    assert not labelled["modes"].passed


@pytest.mark.parametrize("kind, shape, classes", [("digits", (1, 28, 28), []), ("photos32", (3, 32, 32), [0, 1]),
                                                  ("digits64", (3, 64, 64), [])])
def test_example_folders_read_back_as_the_folder_source(tmp_path: Path, kind: str, shape, classes):
    counts = write_example(kind, tmp_path / kind, n=12)
    assert sum(counts.values()) == 12
    ds = load_source(DataConfig(source="folder", path=str(tmp_path / kind)))
    assert ds.images.shape == (12, shape[1], shape[2], shape[0])  # (N, H, W, C) as the source reads them
    assert sorted(set(ds.labels.tolist()) - {-1}) == classes
    with pytest.raises(UserError, match="not empty"):
        write_example(kind, tmp_path / kind, n=4)
    with pytest.raises(UserError, match="unknown example data"):
        write_example("cats", tmp_path / "new")


def test_asking_an_unlabelled_model_for_a_label_is_one_line():
    from aigc.models import NetConfig, build_generator
    from aigc.sampling import generate

    net = NetConfig("dcgan", 8, 1, 8, 8, g_widths=(8, 4), d_widths=(4, 8))
    ev = Evaluator(evaluator_net(EvaluatorConfig(base_channels=4, features=8), UNLABELLED, "contrastive"))
    with pytest.raises(UserError, match="the data has no labels: .* leave out the label"):
        generate(build_generator(net), net, 4, seed=0, label=1, evaluator=ev)


def test_more_views_per_batch_than_images_is_one_line():
    cfg = EvaluatorConfig(base_channels=4, features=8, contrastive=ContrastiveConfig(epochs=1, batch_size=128))
    with pytest.raises(UserError, match=r"the train split has 64 images, fewer than evaluator.contrastive.batch_size "
                                        r"= 128; lower the batch size"):
        train_evaluator(cfg, evaluator_net(cfg, UNLABELLED, "contrastive"), _data(), _data(8), seed=0,
                        progress=False, device="cpu")


@pytest.mark.parametrize("n", [1, 5001])
def test_an_example_folder_of_a_count_outside_the_digits_is_one_line(tmp_path: Path, n: int):
    with pytest.raises(UserError, match=rf"-n {n}: choose 2 to 5000 images"):
        write_example("digits", tmp_path / "d", n=n)
    assert not (tmp_path / "d").exists()


def test_the_scorer_refuses_an_evaluator_of_the_other_kind(tmp_path: Path):
    """A classifier file scored with evaluate.features: contrastive (or the reverse) is one line
    asking to retrain it, never a silent mix of feature spaces."""
    from aigc.data.preprocess import preprocess, save_processed
    from aigc.metrics.scorer import Scorer

    save_processed(preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0), tmp_path / "p")
    info = {"resolution": [8, 8], "channels": 1, "classes": list(range(10))}
    ev = Evaluator(evaluator_net(EvaluatorConfig(base_channels=4, features=8), info, "classifier"))
    torch.save(evaluator_payload(ev), tmp_path / "e.pt")
    with pytest.raises(UserError, match=r"is a classifier network but evaluate.features = contrastive wants a "
                                        r"contrastive one on this data; retrain it \(dvc repro train_evaluator\)"):
        Scorer.open(EvaluateConfig(num_samples=50, features="contrastive"), str(tmp_path / "e.pt"),
                    str(tmp_path / "p"), None, "cpu")
