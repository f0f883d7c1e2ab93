"""The model families: the conditional DCGAN (conditional-BatchNorm G, projection D) and the VAE,
trained on tiny real data (scikit-learn's 8x8 digits), sampled, evaluated and served."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aigc.config import DataConfig, EvaluateConfig, EvaluatorConfig, ModelConfig, RuntimeConfig, TrackingConfig, TrainConfig, \
    VAEConfig
from aigc.data.preprocess import preprocess, save_processed
from aigc.data.sources import load_source
from aigc.errors import ConfigError, UserError
from aigc.metrics import embed
from aigc.metrics.base import Embedding
from aigc.metrics.evaluator import label_indices
from aigc.metrics.labels import label_accuracy
from aigc.models import (NetConfig, build_discriminator, build_encoder, build_generator, draw, generator_payload,
                         load_generator, net_config, sample)
from aigc.sampling import generate
from aigc.training import neg_elbo, train_gan, train_vae

INFO = {"resolution": [8, 8], "channels": 1, "classes": [0, 1, 2],
        "counts": {"train_per_class": {"0": 50, "1": 30, "2": 20}}}


def cnet(family: str = "dcgan", classes: int = 3) -> NetConfig:
    return NetConfig(family, 8, 1, 8, 8, conditional=True, classes=tuple(range(classes)),
                     class_share=tuple([1 / classes] * classes))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8x8 digits, processed, with a trained evaluator (the metrics' classifier)."""
    from pipeline.train_evaluator import run_train_evaluator as train_evaluator

    root = tmp_path_factory.mktemp("families")
    save_processed(preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0), root / "processed")
    train_evaluator(0, EvaluatorConfig(epochs=2), str(root / "processed"), str(root / "evaluator.pt"),
                    str(root / "evaluator.json"))
    return root


def split(root: Path, name: str = "train") -> dict[str, np.ndarray]:
    from aigc.data.preprocess import load_split

    return load_split(root / "processed", name)


# --- config and the networks ----------------------------------------------------------------------


def test_net_config_takes_classes_and_shares_from_dataset_json():
    net = net_config(ModelConfig(conditional=True), INFO)
    assert net.conditional and net.classes == (0, 1, 2) and net.class_share == pytest.approx((0.5, 0.3, 0.2))
    assert net_config(ModelConfig(conditional=False), INFO).classes == ()  # unconditional: no classes in the file


@pytest.mark.parametrize("info, says", [
    (INFO | {"classes": [], "counts": {"train_per_class": {"-1": 100}}}, "needs labelled data with at least 2 classes"),
    (INFO | {"counts": {"train_per_class": {"0": 5, "1": 5, "2": 5, "-1": 3}}}, "3 of 18 have no label"),
])
def test_conditional_without_labels_is_one_clear_error(info, says):
    with pytest.raises(UserError, match=says) as exc:
        net_config(ModelConfig(conditional=True), info)
    assert "model.conditional" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("model, info, conditional, says", [
    (ModelConfig(conditional="auto"), INFO, True, "conditional on 3 classes"),
    (ModelConfig(conditional="auto", family="vae"), INFO, True, "conditional on 3 classes"),
    (ModelConfig(conditional="auto"), INFO | {"classes": [], "counts": {"train_per_class": {"-1": 100}}}, False,
     "unconditional: dataset.json lists 0 class(es)"),
    (ModelConfig(conditional="auto"), INFO | {"counts": {"train_per_class": {"0": 5, "1": 5, "2": 5, "-1": 3}}}, False,
     "unconditional: 3 of 18 training images have no label"),
    (ModelConfig(conditional="auto", family="mlp"), INFO, False, "the mlp family has no conditional variant"),
    (ModelConfig(conditional=False), INFO, False, "model.conditional = false"),
])
def test_auto_conditions_only_on_fully_labelled_data_and_says_why(model, info, conditional, says):
    from aigc.models import conditioning

    chosen, why = conditioning(model, info)
    assert chosen is conditional and says in why and "\n" not in why
    assert net_config(model, info).conditional is conditional


def test_auto_is_the_only_string_conditional_accepts():
    from aigc.config import parse_params

    assert parse_params({"model": {"family": "mlp", "conditional": "auto"}}).model.conditional == "auto"
    with pytest.raises(ConfigError) as exc:
        parse_params({"model": {"conditional": "yes"}})
    assert "model.conditional" in str(exc.value)


def test_mlp_cannot_be_conditional_at_load():
    from aigc.config import parse_params

    with pytest.raises(ConfigError) as exc:
        parse_params({"model": {"family": "mlp", "conditional": True}})
    assert str(exc.value).count("\n") == 0 and "model = " in str(exc.value) and "no conditional variant" in str(exc.value)


def test_projection_discriminator_uses_the_label():
    D = build_discriminator(cnet()).eval()  # eval: no dropout, so only the label differs
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = [D(x, torch.full((4,), k)) for k in range(3)]
    assert out[0].shape == (4,)
    for k in (1, 2):
        assert not torch.allclose(out[0], out[k]), k
    # The label enters only through the projection <embed(y), phi(x)>: with equal embeddings, equal outputs.
    with torch.no_grad():
        D.embed.weight[1] = D.embed.weight[0]
    torch.testing.assert_close(D(x, torch.zeros(4, dtype=torch.long)), D(x, torch.ones(4, dtype=torch.long)))


@pytest.mark.parametrize("family", ["dcgan", "vae"])
def test_conditional_generators_take_the_label_and_draw_classes_by_share(family: str):
    net = NetConfig(family, 8, 1, 8, 8, conditional=True, classes=(3, 5, 7), class_share=(0.8, 0.2, 0.0))
    G = build_generator(net).eval()
    z = torch.randn(6, 8)
    a, b = G(z, torch.zeros(6, dtype=torch.long)), G(z, torch.ones(6, dtype=torch.long))
    assert a.shape == (6, 1, 8, 8) and a.min() >= -1 and a.max() <= 1 and not torch.allclose(a, b)
    images, y = draw(G, 8, 1000, seed=1)
    assert images.shape == (1000, 1, 8, 8)
    assert (y == 2).sum() == 0 and 0.74 < (y == 0).float().mean() < 0.86  # shares 0.8 / 0.2 / 0 (+-4.7 sd)
    again, y2 = draw(G, 8, 1000, seed=1)
    assert torch.equal(y, y2) and torch.equal(images, again)  # same seed, same classes, same images


def test_vae_halves_fit_together():
    net = NetConfig("vae", 8, 1, 28, 28)
    enc, dec = build_encoder(net), build_generator(net)
    mu, logvar = enc(torch.rand(3, 1, 28, 28))
    assert mu.shape == logvar.shape == (3, 8)
    assert dec.logits(mu).shape == dec(mu).shape == (3, 1, 28, 28)
    with pytest.raises(UserError, match="multiples of 4.*the data is 10x10; set data.image_size to 8 or 12"):
        build_encoder(NetConfig("vae", 8, 1, 10, 10))
    with pytest.raises(UserError, match="no discriminator"):
        build_discriminator(net)


# --- training on 8x8 digits -------------------------------------------------------------------------


def test_conditional_gan_makes_the_requested_class_after_a_short_training(digits: Path):
    from aigc.metrics.evaluator import load_evaluator

    tr = split(digits)
    net = net_config(ModelConfig(z_dim=16, conditional=True), json.loads((digits / "processed/dataset.json").read_text()))
    cfg = TrainConfig(epochs=6, batch_size=64, lr_g=1e-3, lr_d=1e-3, grid_size=10)
    grids = []
    result = train_gan(cfg, net, torch.from_numpy(tr["images"]), seed=0, labels=net.class_indices(tr["labels"]),
                       on_epoch=grids.append, progress=False)
    assert grids[-1].grid.ndim == 3
    ev = load_evaluator(digits / "evaluator.pt")
    fake, y = draw(result.generator, net.z_dim, 1000, seed=0)
    hit = (embed(ev, fake).predicted == label_indices(np.array(net.classes)[y.numpy()], ev.cfg)).float().mean()
    assert hit > 0.5, f"label accuracy {hit:.3f} (chance 0.1)"  # 5x chance after 150 steps (measured 0.98)


def test_vae_elbo_falls_and_its_samples_rebuild_from_the_file_alone(digits: Path, tmp_path: Path):
    tr, te = split(digits), split(digits, "test")
    net = NetConfig("vae", 8, 1, 8, 8)
    windows = []
    vae = VAEConfig(kl_warmup_epochs=1)
    result = train_vae(TrainConfig(epochs=4, batch_size=64, grid_size=4), vae, net, torch.from_numpy(tr["images"]),
                       seed=0, on_steps=windows.append, progress=False, runtime=RuntimeConfig(log_every=5))
    rows = [r for w in windows for r in w.rows]
    assert [r["beta"] for r in rows[:3]] == pytest.approx([1 / 25, 2 / 25, 3 / 25]) and rows[-1]["beta"] == 1.0
    first, last = np.mean([r["neg_elbo"] for r in rows[:5]]), np.mean([r["neg_elbo"] for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    assert all(r["neg_elbo"] == pytest.approx(r["recon"] + r["kl"], rel=1e-4) for r in rows)
    # Held-out digits score better under the trained model than under an untrained one.
    untrained = train_vae(TrainConfig(epochs=1, batch_size=1617), vae.model_copy(update={"lr": 1e-12}), net,
                          torch.from_numpy(tr["images"]), seed=0, progress=False)
    assert neg_elbo(result.recipe, torch.from_numpy(te["images"])) < neg_elbo(untrained.recipe, torch.from_numpy(te["images"]))

    torch.save(generator_payload(result.generator, net), tmp_path / "g.pt")
    expected = sample(result.generator, net.z_dim, 6, seed=3)
    code = ("import sys, torch; from aigc.models import load_generator, sample; "
            "G, cfg = load_generator(sys.argv[1]); assert cfg.family == 'vae'; "
            "torch.save(sample(G, cfg.z_dim, 6, seed=3), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.pt"), str(tmp_path / "x.pt")], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "x.pt"), expected)


def test_conditional_vae_trains_with_labels_and_refuses_without():
    net = cnet("vae")
    x = torch.rand(48, 1, 8, 8) * 2 - 1
    y = torch.arange(48) % 3
    result = train_vae(TrainConfig(epochs=1, batch_size=16), VAEConfig(), net, x, seed=0, labels=y, progress=False)
    assert result.steps == 3 and np.isfinite(result.last["neg_elbo"])
    with pytest.raises(UserError, match="needs one label per training image; got none"):
        train_vae(TrainConfig(epochs=1, batch_size=16), VAEConfig(), net, x, seed=0, progress=False)
    with pytest.raises(UserError, match="needs one label per training image; got none"):
        train_gan(TrainConfig(epochs=1, batch_size=16), cnet(), x, seed=0, progress=False)


def test_gaussian_likelihood_trains_too():
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    r = train_vae(TrainConfig(epochs=2, batch_size=16), VAEConfig(likelihood="gaussian", sigma=0.5),
                  NetConfig("vae", 4, 1, 8, 8), x, seed=0, progress=False)
    assert np.isfinite(r.last["neg_elbo"])


# --- sampling, the CLI and serving --------------------------------------------------------------------


@pytest.fixture(params=["dcgan", "pixelcnn"])
def conditional_file(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A conditional generator file of each family that has its own conditioning (the pixelcnn's
    z is one normal per sub-pixel, drawn and turned into levels inside G like any family's)."""
    shape = dict(z_dim=64, pixel_layers=2, pixel_width=6) if request.param == "pixelcnn" else dict(z_dim=8)
    net = NetConfig(request.param, channels=1, height=8, width=8, conditional=True, classes=(2, 4, 6),
                    class_share=(0.5, 0.25, 0.25), **shape)
    torch.manual_seed(0)
    torch.save(generator_payload(build_generator(net), net), tmp_path / "cg.pt")
    return tmp_path / "cg.pt"


def test_generate_label_on_a_conditional_model_never_rejects(conditional_file: Path):
    G, cfg = load_generator(conditional_file)
    assert cfg.conditional and cfg.classes == (2, 4, 6)
    # No evaluator at all, and exactly the images G(z, 4) of the seeded z: nothing drawn and thrown away.
    images = generate(G, cfg, 5, seed=9, label=4)
    z = torch.randn(5, cfg.z_dim, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(images, G(z, torch.ones(5, dtype=torch.long)))
    with pytest.raises(UserError, match=r"^unknown label 3: the classes are \[2, 4, 6\]$"):
        generate(G, cfg, 5, seed=9, label=3)


def test_generate_command_on_a_conditional_model(conditional_file: Path, tmp_path: Path, capsys):
    from aigc.cli import main as cli

    assert cli(["generate", "--model", str(conditional_file), "-n", "4", "--label", "6", "--out",
                str(tmp_path / "six.png")]) == 0
    assert "4 samples of class 6 from" in (out := capsys.readouterr().out) and "conditioned on the class" in out
    assert cli(["generate", "--model", str(conditional_file), "-n", "4", "--label", "5", "--out",
                str(tmp_path / "five.png")]) == 1
    err = capsys.readouterr().err
    assert err == "error: unknown label 5: the classes are [2, 4, 6]\n"
    assert not (tmp_path / "five.png").exists()


def test_served_conditional_model_uses_its_own_conditioning(conditional_file: Path):
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModelContext

    from pipeline.serving import GeneratorModel

    model = GeneratorModel()
    # No evaluator artifact: a conditional model needs none for labels.
    model.load_context(PythonModelContext(artifacts={"generator": str(conditional_file)}, model_config={}))
    out = model.predict(None, pd.DataFrame({"n": [3, 2], "seed": [0, 1], "label": [2, 6]}))
    assert out.shape == (5, 8, 8, 1) and out.dtype == np.uint8
    G, cfg = load_generator(conditional_file)
    from aigc.images import to_uint8

    np.testing.assert_array_equal(out[:3], to_uint8(sample(G, cfg.z_dim, 3, 0, labels=torch.tensor(0))))
    with pytest.raises(MlflowException, match="unknown label 3"):
        model.predict(None, pd.DataFrame({"n": [1], "seed": [0], "label": [3]}))


# --- label accuracy ----------------------------------------------------------------------------------


def test_label_accuracy_against_its_floor():
    def emb(pred: list[int]) -> Embedding:
        return Embedding(torch.zeros(len(pred), 2), torch.nn.functional.one_hot(torch.tensor(pred), 3).float())

    # Generated: class 0 asked 4x, right 3x; class 1 asked 2x, right 2x; class 2 never asked.
    fake, asked = emb([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1])
    # Real test: the evaluator is right on 1 of 2 zeros, 2 of 2 ones, 1 of 1 two.
    test, truth = emb([0, 2, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 2])
    s = label_accuracy(fake, asked, test, truth, [5, 6, 7])
    assert s["label_accuracy"] == pytest.approx(5 / 6) and s["label_accuracy_floor"] == pytest.approx(4 / 5)
    assert s["label_accuracy_5"] == pytest.approx(0.75) and s["label_accuracy_5_floor"] == pytest.approx(0.5)
    assert s["label_accuracy_6"] == 1.0 and "label_accuracy_7" not in s
    assert s["label_accuracy_ratio"] == pytest.approx((5 / 6) / 0.8)
    assert s["label_accuracy_worst_ratio"] == pytest.approx(1.0) and s["label_accuracy_worst_class"] == 6.0


def test_evaluate_stage_scores_label_accuracy_of_a_conditional_generator(digits: Path, tmp_path: Path):
    from pipeline.evaluate import run_evaluate

    info = json.loads((digits / "processed/dataset.json").read_text())
    net = net_config(ModelConfig(z_dim=8, conditional=True), info)
    torch.manual_seed(0)
    torch.save(generator_payload(build_generator(net), net), tmp_path / "g.pt")
    (tmp_path / "run.json").write_text(json.dumps({"run_id": None}))
    out = {k: str(tmp_path / f"{k}.{ext}") for k, ext in
           (("metrics", "json"), ("summary", "json"), ("samples", "png"), ("nearest", "png"), ("classes", "png"),
            ("labels", "png"))}
    report = run_evaluate(EvaluateConfig(num_samples=360, kid_subsets=5), TrackingConfig(enabled=False),
                      generator=str(tmp_path / "g.pt"), evaluator=str(digits / "evaluator.pt"),
                      processed=str(digits / "processed"), run=str(tmp_path / "run.json"),
                      cache_dir=str(tmp_path / "cache"), **out)
    acc = json.loads((digits / "evaluator.json").read_text())["test_accuracy"]
    assert report["label_accuracy_floor"] == pytest.approx(acc, abs=1e-3)  # the floor is the evaluator's test accuracy
    assert 0 <= report["label_accuracy"] <= 1 and report["label_accuracy_ratio"] < 0.5  # untrained: near chance
    assert {f"label_accuracy_{k}" for k in range(10)} <= set(report)
    assert Path(out["labels"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
