"""Mode coverage and the class-histogram divergence, from the evaluator's predicted classes."""

from __future__ import annotations

import torch

from aigc.config import EvaluateConfig
from aigc.metrics.base import Embedding, Reference, register, score_and_floor


def class_histogram(e: Embedding, num_classes: int) -> torch.Tensor:
    """Share of the images the evaluator puts in each class, (K,) float64."""
    counts = torch.bincount(e.predicted, minlength=num_classes).double()
    return counts / counts.sum().clamp(min=1)


def covered_modes(share: torch.Tensor, data_share: torch.Tensor, min_share: float) -> int:
    """Classes whose share of the samples is at least ``min_share`` times their share of the data."""
    return int(((share >= min_share * data_share) & (share > 0)).sum())


def class_kl(share: torch.Tensor, data_share: torch.Tensor) -> float:
    """KL(generated histogram || data's class distribution) in nats: 0 = the data's proportions;
    finite even when classes are missing (0 log 0 = 0), log K when everything is one class of K
    balanced ones."""
    p, q = share, data_share.clamp(min=1e-12)
    nz = p > 0
    return float((p[nz] * (p[nz] / q[nz]).log()).sum())


@register(classes=True)
def modes(fake: Embedding, ref: Reference, cfg: EvaluateConfig) -> dict[str, float]:
    """Covered modes (higher is better, up to the number of classes) and class KL (lower is better)."""
    k = len(ref.class_share)

    def one(s: Embedding, _: Embedding) -> dict[str, float]:
        share = class_histogram(s, k)
        return {"modes": covered_modes(share, ref.class_share, cfg.mode_min_share),
                "class_kl": class_kl(share, ref.class_share)}

    return score_and_floor(fake, ref, one, uses_reference=False)
