"""Memorisation: distance to closest record (DCR) in the evaluator's feature space.

For each generated image: the distance to its nearest training record and to its nearest
held-out (test) record. ``dcr_closer_to_train`` is the share of generated images closer to a
training record. SDMetrics' ``DCROverfittingProtection`` turns that share p into a score,
``min(1, 2 (1 - p))``: 1 = no sign of copying, 0 = every sample sits on a training record.

Its factor 2 assumes training and held-out sets of equal size: a generator that never saw the
training set lands closer to it with probability |train| / (|train| + |held-out|), which is 1/2
only then (SDMetrics warns when the held-out set is under half the training set). Here the test
split is a ninth of the train split, so the score uses that expected share p0 in place of 1/2:
``min(1, (1 - p) / (1 - p0))`` -- the same as SDMetrics' when the sets are equal, 1 for a
generator that copies nothing, 0 for one that only copies.

The floor is the same score for the real test images, each left out of the held-out set in turn
(leave-one-out): about 1, up to sampling noise.
"""

from __future__ import annotations

import torch

from aigc.config import EvaluateConfig
from aigc.metrics.base import Embedding, Reference, register


def nearest(a: torch.Tensor, b: torch.Tensor, batch_size: int = 2048,
            exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a``, the Euclidean distance to its nearest row of ``b`` and that row's index.

    ``exclude_self`` (``a`` is ``b``): skip each row's own entry (leave-one-out).
    """
    dists, idx = [], []
    for i in range(0, len(a), batch_size):
        d = torch.cdist(a[i:i + batch_size], b)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + i] = float("inf")
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def dcr_score(closer_to_train: float, n_train: int, n_holdout: int) -> float:
    """SDMetrics' overfitting-protection score with the expected share of an honest generator,
    |train| / (|train| + |held-out|), in place of its fixed 1/2."""
    p0 = n_train / (n_train + n_holdout)
    return float(min(1.0, max(0.0, (1.0 - closer_to_train) / (1.0 - p0))))


@register
def memorisation(fake: Embedding, ref: Reference, cfg: EvaluateConfig) -> dict[str, float]:
    """DCR score of all generated images (1 = no sign of copying) and its leave-one-out floor."""
    d_train, _ = nearest(fake.features, ref.train.features)
    d_test, _ = nearest(fake.features, ref.test.features)
    p = float((d_train < d_test).double().mean())

    t_train, _ = nearest(ref.test.features, ref.train.features)
    t_test, _ = nearest(ref.test.features, ref.test.features, exclude_self=True)
    p_floor = float((t_train < t_test).double().mean())
    return {
        "dcr_score": dcr_score(p, len(ref.train), len(ref.test)),
        "dcr_score_floor": dcr_score(p_floor, len(ref.train), len(ref.test) - 1),
        "dcr_closer_to_train": p,
    }


def closest_pairs(fake: Embedding, ref: Reference, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` generated images nearest to a training record (the likeliest copies), closest
    first: (generated indices, their nearest training indices)."""
    d, idx = nearest(fake.features, ref.train.features)
    order = torch.argsort(d)[:n]
    return order, idx[order]
