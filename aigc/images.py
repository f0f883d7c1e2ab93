"""Image grids and PNG files, with no torchvision (there is no CPU build of it here)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from aigc.io import atomic_path


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C)."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    x = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def make_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2,
              min_side: int = 256) -> np.ndarray:
    """Tile [-1, 1] (N, C, H, W) images into one uint8 (H', W', C) picture on a grey background.

    Small images (8x8 digits) are scaled up by an integer factor (nearest neighbour) so the
    grid is at least ``min_side`` pixels wide and a person can see the digits.
    """
    tiles = to_uint8(images)
    n, h, w, c = tiles.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = tile
    scale = max(1, math.ceil(min_side / grid.shape[1]))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid


def save_png(grid: np.ndarray, path: str | Path) -> None:
    """Write a uint8 (H, W, C) picture as PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")
