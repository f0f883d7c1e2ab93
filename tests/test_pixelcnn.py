"""The pixelcnn family (fast, tiny nets on 8x8 images): causal masks over sub-pixels, the sampler
(deterministic in z, cached = full recompute, conditional), exact bits/dim, the recipe's step,
bitwise resume, the generator file round-trip, and the refusals."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from aigc import distributed
from aigc.config import ModelConfig, PixelCNNConfig, RuntimeConfig, TrainConfig, VAEConfig, parse_params
from aigc.errors import ConfigError, UserError
from aigc.training.likelihood import bits_per_dim, vae_bits_per_dim
from aigc.models import NetConfig, build_discriminator, build_generator, generator_payload, load_generator, net_config
from aigc.stats import Stats
from aigc.training import PixelCNNRecipe, Setup, family_train, neg_elbo, recipe_for, train_pixelcnn, train_vae
from aigc.training.loop import Batch
from aigc.training.vae import VAERecipe

RT = RuntimeConfig(log_every=2, threads=1, channels_last=False, checkpoint_every=1)
CLASSES = dict(conditional=True, classes=(0, 1, 2), class_share=(0.5, 0.3, 0.2))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets gain nothing from a second thread, and on a busy shared machine every split op waits
    for a descheduled one (the 3-channel full-recompute check: 65 s on 2 threads, 0.3 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixel_net(channels: int = 1, size: int = 8, layers: int = 3, width: int = 12, **kw) -> NetConfig:
    return NetConfig("pixelcnn", channels * size * size, channels, size, size, pixel_layers=layers,
                     pixel_width=width, **kw)


def tiny(n: int = 48, channels: int = 1) -> torch.Tensor:
    """Images on the 256 levels, in [-1, 1]."""
    return torch.randint(0, 256, (n, channels, 8, 8), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("channels", [1, 3])
def test_masks_are_causal_over_sub_pixels(channels: int):
    """Changing sub-pixel k (raster order, then R -> G -> B) never moves the logits of sub-pixels
    <= k, and does move a later one: every k, one batch of perturbed copies."""
    torch.manual_seed(0)
    G = build_generator(pixel_net(channels)).double().eval()  # float64: a masked-out weight contributes exactly 0
    x = tiny(1, channels).double()
    order = [(r, c, ch) for r in range(8) for c in range(8) for ch in range(channels)]
    changed = x.repeat(len(order), 1, 1, 1)
    for i, (r, c, ch) in enumerate(order):
        changed[i, ch, r, c] = -1.0 if x[0, ch, r, c] > 0 else 1.0
    with torch.no_grad():
        moved = (G.logits(changed) - G.logits(x)).abs().amax(1)  # (K, C, H, W): largest change over the 256 levels
    moved = moved.permute(0, 2, 3, 1).reshape(len(order), -1)  # sub-pixels in sampling order
    for k in range(len(order)):
        assert moved[k, :k + 1].max() == 0, f"sub-pixel {order[k]} leaks into earlier or its own logits"
        if k < len(order) - 1:
            assert moved[k, k + 1:].max() > 1e-6, f"sub-pixel {order[k]} moves no later logit"


@pytest.mark.parametrize("channels,conditional", [(1, True), (3, True), (1, False)])
def test_sampling_is_deterministic_and_the_cached_sampler_equals_a_full_recompute(channels: int, conditional: bool):
    torch.manual_seed(1)
    # 3 layers: the first (mask A, no residual), a middle one (residual) and the last (skip only)
    G = build_generator(pixel_net(channels, layers=3, **(CLASSES if conditional else {}))).eval()
    z = torch.randn(4, channels * 64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 1]) if conditional else None
    torch.set_num_threads(2)
    fast = G(z, y)
    assert torch.get_num_threads() == 2  # the sampler's one thread is given back
    torch.set_num_threads(1)
    assert torch.equal(fast, G(z, y))
    assert torch.equal(fast, G(z, y, cached=False))
    assert fast.shape == (4, channels, 8, 8) and fast.min() >= -1 and fast.max() <= 1
    assert torch.equal(fast, torch.round((fast + 1) * 127.5) / 127.5 - 1)  # on the 256 levels
    assert fast.std() > 0.1  # not one flat level everywhere
    assert not torch.equal(fast, G(torch.randn(4, channels * 64), y))


def test_conditional_sampling_uses_the_label():
    torch.manual_seed(2)
    G = build_generator(pixel_net(**CLASSES)).eval()
    z = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    a, b = G(z, torch.zeros(6, dtype=torch.long)), G(z, torch.full((6,), 2))
    assert (a != b).float().mean() > 0.1  # same z, another class: other images


def test_a_uniform_model_scores_8_bits_per_dim():
    G = build_generator(pixel_net(channels=3))
    last = G.head[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)  # every logit 0: each sub-pixel uniform over 256 levels
    assert bits_per_dim(G, tiny(10, 3), batch_size=4) == pytest.approx(8.0, abs=1e-6)


def test_one_step_lowers_the_loss_on_a_batch_it_sees_again():
    recipe = PixelCNNRecipe(PixelCNNConfig(lr=1e-3), pixel_net())
    x = tiny(16)
    torch.manual_seed(0)
    recipe.setup(Setup(torch.device("cpu"), torch.contiguous_format, False, distributed.Dist(), 0, x, None, 16, 1,
                       None))
    rows = []
    for step in range(3):
        stats = Stats()
        recipe.step(Batch(x, None, step, 16, False), stats)
        stats.end_step(step + 1)
        rows.append(stats.collect()[0][1])
    assert rows[1]["loss"] < rows[0]["loss"] and rows[2]["loss"] < rows[1]["loss"]
    assert rows[0]["bits_per_dim"] == pytest.approx(rows[0]["loss"] / (64 * math.log(2)), rel=1e-6)
    assert 7.0 < rows[0]["bits_per_dim"] < 9.0  # an untrained net is near uniform (8)


def test_resumed_ends_bitwise_equal():
    net = pixel_net(**CLASSES)
    cfg = TrainConfig(epochs=3, batch_size=16, grid_size=3)
    labels = torch.arange(48) % 3
    saved: list[dict] = []
    full = train_pixelcnn(cfg, PixelCNNConfig(), net, tiny(), seed=2, labels=labels, progress=False,
                          on_checkpoint=lambda s: saved.append(roundtrip(s)), runtime=RT)
    final = roundtrip(full.state)
    assert final["complete"] and final["family"] == "pixelcnn" and np.isfinite(full.last["bits_per_dim"])
    resumed = train_pixelcnn(cfg, PixelCNNConfig(), net, tiny(), seed=2, labels=labels, progress=False,
                             resume=saved[1], runtime=RT)
    again = roundtrip(resumed.state)
    for key in ("G", "opt", "rng", "step", "epoch"):
        assert_same(final[key], again[key], key)


def assert_same(a, b, where: str) -> None:
    """Bitwise equal, tensor by tensor (tests/test_resume.py's check)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_generator_file_round_trip_gives_the_same_samples(tmp_path):
    torch.manual_seed(4)
    net = pixel_net(channels=3, **CLASSES)
    G = build_generator(net).eval()
    path = tmp_path / "generator.pt"
    torch.save(generator_payload(G, net), path)
    loaded, cfg = load_generator(path)
    assert cfg == net and cfg.z_dim == 3 * 64
    z, y = torch.randn(3, cfg.z_dim), torch.tensor([2, 0, 1])
    assert torch.equal(G(z, y), loaded(z, y))


def test_recipe_for_builds_a_conditional_pixelcnn_with_one_z_per_sub_pixel():
    info = {"resolution": [8, 8], "channels": 1, "classes": [0, 1, 2],
            "counts": {"train_per_class": {"0": 24, "1": 12, "2": 12}}}
    split = {"images": tiny().numpy(), "labels": np.arange(48) % 3}
    recipe, data, why = recipe_for(ModelConfig(family="pixelcnn"), TrainConfig(), VAEConfig(),
                                   parse_params({}).privacy.dp, info, split, PixelCNNConfig(layers=2, width=8))
    assert isinstance(recipe, PixelCNNRecipe) and "conditional on 3 classes" in why
    assert (recipe.net.z_dim, recipe.net.pixel_layers, recipe.net.pixel_width) == (64, 2, 8)
    assert net_config(ModelConfig(family="pixelcnn", conditional=False), info, pixelcnn=PixelCNNConfig()).z_dim == 64


def test_pixelcnn_epochs_are_the_familys_own_budget():
    train = TrainConfig(epochs=20)
    assert family_train(ModelConfig(family="pixelcnn"), train, PixelCNNConfig(epochs=4)).epochs == 4
    assert family_train(ModelConfig(family="pixelcnn"), train, PixelCNNConfig(epochs=None)) == train  # null: train's
    for family in ("dcgan", "vae"):  # the other families never read it
        assert family_train(ModelConfig(family=family), train, PixelCNNConfig(epochs=4)) == train


@pytest.mark.parametrize("value, rule", [(0, "greater than or equal to 1"), ("5", "must be a valid integer"),
                                         (2.5, "must be a valid integer")])
def test_bad_pixelcnn_epochs_is_one_line_naming_key_value_and_rule(value, rule):
    with pytest.raises(ConfigError) as err:
        parse_params({"model": {"family": "pixelcnn"}, "pixelcnn": {"epochs": value}})
    msg = str(err.value)
    assert msg.startswith(f"params.yaml: pixelcnn.epochs = {value!r}: ") and rule in msg, msg
    assert len(msg.splitlines()) == 1


def test_dp_with_pixelcnn_is_one_config_error_line():
    with pytest.raises(ConfigError) as err:
        parse_params({"model": {"family": "pixelcnn"}, "privacy": {"dp": {"enabled": True}}})
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "model.family = 'pixelcnn'" in msg and "privacy.dp.enabled" in msg


def test_build_discriminator_refuses_pixelcnn_in_one_line():
    with pytest.raises(UserError) as err:
        build_discriminator(pixel_net())
    assert len(str(err.value).splitlines()) == 1 and "pixelcnn family has no discriminator" in str(err.value)


def test_vae_importance_weighted_bound_is_below_the_elbo():
    """k = 1 is the ELBO (up to the KL's Monte Carlo estimate); more samples give a tighter bound
    (measured: 0.933 -> 0.923 bits/dim at k = 64 after 5 epochs on these 48 binary images)."""
    x = (tiny() > 0.3).float() * 2 - 1
    result = train_vae(TrainConfig(epochs=5, batch_size=16), VAEConfig(), NetConfig("vae", 8, 1, 8, 8), x, seed=0,
                       progress=False, runtime=RT)
    recipe: VAERecipe = result.recipe
    elbo_bpd = neg_elbo(recipe, x) / (64 * math.log(2))
    one = vae_bits_per_dim(recipe.encoder, recipe.decoder, x, k=1)
    many = vae_bits_per_dim(recipe.encoder, recipe.decoder, x, k=64)
    assert one == pytest.approx(elbo_bpd, rel=0.01)
    assert many < min(one, elbo_bpd) - 0.003


def test_the_train_stage_trains_a_pixelcnn_and_its_file_samples(tmp_path):
    """pipeline/train.py's run_train on the 8x8 digits: the pixelcnn section reaches the net, the
    run's params and metrics.json; the generator file rebuilds the net and samples from it alone."""
    import json

    from aigc.config import DataConfig, TrackingConfig
    from aigc.data.preprocess import preprocess, save_processed
    from aigc.data.sources import load_source
    from aigc.models import sample
    from pipeline.train import run_train

    processed = tmp_path / "processed"
    save_processed(preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0), processed)
    out = {k: str(tmp_path / "out" / k) for k in ("generator", "checkpoint", "run", "metrics", "losses", "samples")}
    run_train(0, ModelConfig(family="pixelcnn"), TrainConfig(epochs=3, batch_size=256, grid_size=4),
              TrackingConfig(enabled=False), str(processed), **out, runtime=RT,
              pixelcnn=PixelCNNConfig(layers=2, width=8, epochs=1))
    record, metrics = json.loads(open(out["run"]).read()), json.loads(open(out["metrics"]).read())
    assert record["params"]["pixelcnn.layers"] == 2 and "vae.lr" not in record["params"]
    # the family's own budget: pixelcnn.epochs, not train.epochs (both recorded as params.yaml has them)
    assert metrics["epochs"] == 1 and record["params"]["pixelcnn.epochs"] == 1 and record["params"]["train.epochs"] == 3
    assert record["net"]["pixel_width"] == 8 and record["net"]["conditional"] and record["net"]["z_dim"] == 64
    assert 0 < metrics["final_bits_per_dim"] < 8.5
    # the test split's exact likelihood, a dvc exp show column beside the scores
    assert 0 < metrics["test_bits_per_dim"] < 8.5 and record["training"]["likelihood"] == "exact"
    G, cfg = load_generator(out["generator"])
    x = sample(G, cfg.z_dim, 3, seed=0)
    assert x.shape == (3, 1, 8, 8) and torch.equal(x, sample(G, cfg.z_dim, 3, seed=0))
