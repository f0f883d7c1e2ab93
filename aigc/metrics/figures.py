"""The evaluation's pictures, as uint8 arrays (aigc.images.save_png writes them)."""

from __future__ import annotations

import io

import numpy as np
import torch

from aigc.images import make_grid


def withheld_like(images: torch.Tensor, cell: int = 2) -> torch.Tensor:
    """A grey checkerboard of ``images``' shape: what a picture shows in place of a training record
    it may not hold in clear (``privacy.encrypt_at_rest``). Nothing of the record is in it."""
    _, _, h, w = images.shape
    yy, xx = torch.meshgrid(torch.arange(h) // cell, torch.arange(w) // cell, indexing="ij")
    board = ((yy + xx) % 2).float() * 0.5 - 0.25  # two greys, -0.25 and 0.25 in [-1, 1]
    return board.expand_as(images).clone()


def nearest_grid(fake: torch.Tensor, train: torch.Tensor, pairs_per_row: int = 4, redact: bool = False) -> np.ndarray:
    """Generated images each followed by its nearest training image: rows of
    ``[fake_1, nearest_1, fake_2, nearest_2, ...]`` ([-1, 1] (N, C, H, W) each, same N). With
    ``redact`` the training images are replaced by a grey checkerboard (:func:`withheld_like`)."""
    if redact:
        train = withheld_like(train)
    interleaved = torch.stack([fake, train], dim=1).flatten(0, 1)
    return make_grid(interleaved, nrow=2 * pairs_per_row)


def class_bars(classes: list[int], data_share: np.ndarray, generated: np.ndarray, real_test: np.ndarray) -> np.ndarray:
    """Bar chart of the class shares: the data's labels, the generated images' and the real test
    images' predicted classes (the floor), as an RGB uint8 picture."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    x = np.arange(len(classes))
    w = 0.28
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(classes) + 2), 3.2), dpi=100)
    ax.bar(x - w, data_share, w, label="data (train labels)", color="#999999")
    ax.bar(x, real_test, w, label="real test (predicted): the floor", color="#4c72b0")
    ax.bar(x + w, generated, w, label="generated (predicted)", color="#dd8452")
    ax.set_xticks(x, [str(c) for c in classes])
    ax.set_xlabel("class")
    ax.set_ylabel("share of images")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from PIL import Image

    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def notice(title: str, text: str) -> np.ndarray:
    """A picture that says in words why a chart is not drawn (the stage's output file still exists:
    a DVC output, and an empty one would look broken), as an RGB uint8 picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 1.4), dpi=100)
    ax.axis("off")
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize=10, weight="bold")
    ax.text(0.5, 0.3, text, ha="center", va="center", fontsize=8, wrap=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from PIL import Image

    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
