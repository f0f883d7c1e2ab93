"""Memorisation: does the generator hand back its training images?

Two measures, each beside its floor (real test images, which the generator never saw):

* **DCR ratio** (``dcr_score``), in the evaluator's feature space. For each generated image: is it
  closer to its nearest training record than to its nearest held-out (test) record?
  ``p = dcr_closer_to_train`` is the share that is. A generator that draws fresh images lands
  closer to the training set with some probability ``p0`` -- not 1/2 as SDMetrics'
  ``DCROverfittingProtection`` assumes (that needs equal set sizes), and not |train| / (|train| +
  |test|) either (the feature network was trained on the train split, which moves every distance
  to it). So ``p0`` is *measured*: the same share for the real test images, each left out of the
  held-out set in turn (``dcr_closer_to_train_floor``). The score is the unclipped ratio
  ``(1 - p) / (1 - p0)``: about 1 for an honest generator, falling towards 0 as copies take over,
  above 1 for images further from the training set than fresh real ones are.
* **Near-duplicate share** (``copy_share``), in pixel space. The threshold is the
  ``evaluate.copy_quantile`` quantile (1% by default) of the test images' distances to their
  nearest training image; ``copy_share`` is the share of generated images closer than that to a
  training image. An honest generator makes about ``copy_quantile`` of them (the floor); mixing 10%
  exact training copies into its samples adds 0.10. The DCR ratio barely moves for a few copies
  (p is already ~0.9); this share does, so the registry gates on both.

Each is computed per generated set of ``n`` (aigc/metrics/base.py) against the whole train and
test splits; the spread is the standard error over sets.
"""

from __future__ import annotations

import math

import torch

from aigc.config import EvaluateConfig
from aigc.metrics.base import Embedding, Reference, mean_se, register


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


def dcr_ratio(closer_to_train: float, closer_to_train_floor: float) -> float:
    """``(1 - p) / (1 - p0)``, unclipped: 1 = as far from the training set as fresh real images, 0 =
    every sample sits on a training record. NaN when the floor itself is always closer to train
    (``p0 = 1``: no room to measure)."""
    room = 1.0 - closer_to_train_floor
    return (1.0 - closer_to_train) / room if room > 0 else math.nan


def _per_set(flags: torch.Tensor, n: int) -> list[float]:
    """Share of True per consecutive set of ``n`` (the scored sets of base.py)."""
    usable = len(flags) // n * n
    return flags[:usable].double().reshape(-1, n).mean(dim=1).tolist()


@register
def memorisation(fake: Embedding, ref: Reference, cfg: EvaluateConfig) -> dict[str, float]:
    """DCR ratio (1 = no sign of copying) with p and the floor's p; the pixel-space near-duplicate share."""
    n = ref.sample_size
    d_train, _ = nearest(fake.features, ref.train.features)
    d_test, _ = nearest(fake.features, ref.test.features)
    closer = _per_set(d_train < d_test, n)

    t_train, _ = nearest(ref.test.features, ref.train.features)
    t_test, _ = nearest(ref.test.features, ref.test.features, exclude_self=True)
    p0 = float((t_train < t_test).double().mean())
    p0_se = math.sqrt(p0 * (1 - p0) / len(ref.test))  # binomial: one share of |test| images

    p, p_se = mean_se(closer)
    ratio, ratio_se = mean_se([dcr_ratio(x, p0) for x in closer])
    out = {"dcr_score": ratio, "dcr_score_floor": 1.0,
           "dcr_closer_to_train": p, "dcr_closer_to_train_floor": p0, "dcr_closer_to_train_floor_se": p0_se}
    if ratio_se is not None:
        out |= {"dcr_score_se": ratio_se, "dcr_closer_to_train_se": p_se}
    if p0 < 1:
        out["dcr_score_floor_se"] = p0_se / (1 - p0)

    if fake.pixels is not None and ref.train.pixels is not None and ref.test.pixels is not None:
        held_out, _ = nearest(ref.test.pixels, ref.train.pixels)
        threshold = float(torch.quantile(held_out.double(), cfg.copy_quantile))
        g, _ = nearest(fake.pixels, ref.train.pixels)
        share, share_se = mean_se(_per_set(g < threshold, n))
        floor = float((held_out < threshold).double().mean())
        out |= {"copy_share": share, "copy_share_floor": floor,
                "copy_share_floor_se": math.sqrt(max(floor * (1 - floor), 1e-12) / len(held_out)),
                "copy_threshold": threshold}
        if share_se is not None:
            out["copy_share_se"] = share_se
    return out


def closest_pairs(fake: Embedding, ref: Reference, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` generated images nearest to a training record (the likeliest copies), closest
    first: (generated indices, their nearest training indices). In pixel space when the images
    are at hand (what a person sees as a copy), else in features."""
    pixels = fake.pixels is not None and ref.train.pixels is not None
    d, idx = nearest(fake.pixels, ref.train.pixels) if pixels else nearest(fake.features, ref.train.features)
    order = torch.argsort(d)[:n]
    return order, idx[order]
