"""What every metric shares: the embedded image sets, the reference they are compared with, the
registry of named metric functions, and the rule that puts each score beside its floor.

The protocol (README, "Evaluation"): FID, IS, precision/recall/density/coverage, modes and class KL
all move with the number of images compared, so a score and its floor must use the same numbers.
With ``n = min(num_samples, size of the test split)``:

* **score** -- the generated images are cut into ``num_samples // n`` disjoint sets of ``n``; each
  set is compared with the whole train split (the *reference*); the score is the mean over sets;
* **floor** -- ``n`` images of the real test split (never seen by the generator) compared with the
  same reference: what a perfect generator, one that draws fresh images from the data's
  distribution, would score at the same sample size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aigc.config import EvaluateConfig


@dataclass(frozen=True)
class Embedding:
    """What the evaluator makes of a set of images: row i is image i."""

    features: torch.Tensor  # (N, F) float32: penultimate activations
    logits: torch.Tensor  # (N, K) float32: class logits

    def __len__(self) -> int:
        return len(self.features)

    def take(self, idx: torch.Tensor | slice) -> "Embedding":
        return Embedding(self.features[idx], self.logits[idx])

    def sets(self, n: int) -> list["Embedding"]:
        """Disjoint consecutive sets of ``n`` rows (a ragged rest is left out)."""
        return [self.take(slice(i, i + n)) for i in range(0, len(self) - n + 1, n)]

    @property
    def predicted(self) -> torch.Tensor:
        """The evaluator's class index for each image, (N,) int64."""
        return self.logits.argmax(dim=1)


@dataclass(frozen=True)
class Reference:
    """The real data a generated set is judged against."""

    evaluator: nn.Module  # the feature network (torchmetrics' ``feature=`` module)
    train: Embedding  # the whole train split: FID/KID/PRDC's reference, DCR's "training records"
    test: Embedding  # the whole test split: DCR's held-out records
    class_share: torch.Tensor  # (K,) float64: the train split's label distribution
    sample_size: int  # n: images in each scored set and in the floor's set
    floor: Embedding  # n images of the test split (a seeded subset when n < its size)


MetricFn = Callable[[Embedding, Reference, EvaluateConfig], dict[str, float]]
_METRICS: dict[str, MetricFn] = {}


def register(fn: MetricFn) -> MetricFn:
    """Add ``fn`` to the registry under its own name (stylegan2-ada's ``metric_main`` idea)."""
    _METRICS[fn.__name__] = fn
    return fn


def metric_names() -> list[str]:
    return list(_METRICS)


def metric(name: str) -> MetricFn:
    if name not in _METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {metric_names()}")
    return _METRICS[name]


def score_and_floor(fake: Embedding, ref: Reference, one: Callable[[Embedding], dict[str, float]]) -> dict[str, float]:
    """``one`` (a set of ``n`` images -> {name: value}) as the mean over the generated sets, and its
    floor on the test split's ``n`` images: ``{"fid": ..., "fid_floor": ..., ...}``."""
    sets = fake.sets(ref.sample_size)
    if not sets:
        raise ValueError(f"{len(fake)} generated images are fewer than the sample size {ref.sample_size}")
    per_set = [one(s) for s in sets]
    floor = one(ref.floor)
    out: dict[str, float] = {}
    for key in per_set[0]:
        out[key] = float(np.mean([d[key] for d in per_set]))
        out[f"{key}_floor"] = float(floor[key])
    return out
