"""Images -> evaluator features and logits, and the cache of the real data's.

The real splits' embeddings do not change between evaluations of different generators, so they
are cached in a folder (``--cache-dir`` in dvc.yaml) under a hash of (data file, split, sample
size, extractor weights): a new evaluator or new data gives a new key, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aigc.io import atomic_path
from aigc.metrics.base import Embedding
from aigc.metrics.evaluator import weights_sha256

CACHE_FORMAT = "aigc.real-embedding/1"


class FeatureModule(nn.Module):
    """The evaluator's features (the classifier's penultimate layer, or Inception's pool3), as torchmetrics' ``feature=`` module.

    ``num_features`` is an int, so torchmetrics never probes the module with its 3x299x299 dummy
    (docs/development.md, "The stack"). Images (N, C, H, W) go through the network; a 2-D (N, F) tensor is taken as
    features this same network already produced (cached real data, or one pass shared by all
    metrics), so each image is embedded once.
    """

    def __init__(self, evaluator: nn.Module):
        super().__init__()
        self.evaluator = evaluator
        self.num_features = int(evaluator.cfg.features)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 2 else self.evaluator.features(x)


class LogitsModule(FeatureModule):
    """The evaluator's class logits, as InceptionScore's ``feature=`` module (same 2-D rule)."""

    def __init__(self, evaluator: nn.Module):
        super().__init__(evaluator)
        self.num_features = int(evaluator.cfg.num_classes)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 2 else self.evaluator(x)


@torch.no_grad()
def embed(evaluator: nn.Module, images: torch.Tensor | np.ndarray, batch_size: int = 500,
          device: str | torch.device = "cpu") -> Embedding:
    """Features and logits of [-1, 1] images (N, C, H, W) in one pass of the evaluator."""
    evaluator.eval().to(device)
    x = torch.as_tensor(images)
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f, lg = evaluator.embed_batch(x[i:i + batch_size].to(device, torch.float32))
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    if not feats:
        return Embedding(torch.zeros(0, evaluator.cfg.features), torch.zeros(0, evaluator.cfg.num_classes))
    return Embedding(torch.cat(feats), torch.cat(logits))


def cache_key(data_sha256: str, split: str, sample_size: int, extractor_sha256: str) -> str:
    """The hash that names a cached real embedding."""
    blob = json.dumps({"format": CACHE_FORMAT, "data": data_sha256, "split": split, "n": sample_size,
                       "extractor": extractor_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def real_embedding(evaluator: nn.Module, images: np.ndarray, *, data_sha256: str, split: str,
                   cache_dir: str | Path | None, batch_size: int = 500,
                   device: str | torch.device = "cpu") -> tuple[Embedding, bool]:
    """The embedding of a real split, from the cache when it holds it; ``(embedding, was_cached)``.

    A missing or unreadable cache file is (re)computed and written atomically, so two evaluations
    racing on one cache folder each leave a complete file.
    """
    key = cache_key(data_sha256, split, len(images), weights_sha256(evaluator))
    path = Path(cache_dir) / f"{split}-{len(images)}-{key[:20]}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") == key:
                return Embedding(blob["features"], blob["logits"]), True
        except Exception:  # a damaged file is only a cache miss
            pass
    emb = embed(evaluator, images, batch_size, device)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save({"key": key, "features": emb.features, "logits": emb.logits}, tmp)
    return emb, False
