"""What every metric shares: the embedded image sets, the reference they are compared with, the
registry of named metric functions, and the rule that puts each score beside its floor, its
spread and its ceiling.

The protocol (docs/evaluation.md). Precision/recall/density/coverage, FID, KID and IS all move
with the number of images on *both* sides of a comparison, so every comparison here is ``n``
images against ``n`` images, with ``n = min(num_samples, size of the test split)``:

* **reference** -- the train split is cut into ``R = |train| // n`` disjoint, seeded subsets of
  ``n`` images (the same subsets for every generator evaluated with the same data and seed);
* **score** -- the generated images are cut into ``num_samples // n`` disjoint sets of ``n``; set
  ``i`` is compared with reference subset ``i mod R``; the score is the mean over sets and its
  spread (``_se``) the standard error of that mean;
* **floor** -- the ``n`` real test images (never seen by the generator nor the evaluator) compared
  with each reference subset in turn: what a perfect generator, one that draws fresh images from
  the data's distribution, scores at the same sample size; its ``_se`` is the spread of one
  real-against-real comparison of ``n`` vs ``n`` (reference subsets scored against each other),
  an upper bound on the floor's own standard error;
* **ceiling** -- the best value theory allows at this sample size (``ceilings``).

With equal sizes a perfect generator's expected coverage is ``1 - C(n-1, k) / C(2n-1, k)``
(0.97 for n = 500, k = 5) instead of 0.41 when 500 images meet a 4,500-image reference, so
recall/coverage read as diversity and precision/density as fidelity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.config import EvaluateConfig


@dataclass(frozen=True)
class Embedding:
    """What the evaluator makes of a set of images: row i is image i."""

    features: torch.Tensor  # (N, F) float32: penultimate activations
    logits: torch.Tensor  # (N, K) float32: class logits
    pixels: torch.Tensor | None = None  # (N, C*H*W) float32 in [-1, 1]: the images, for pixel-space copies

    def __len__(self) -> int:
        return len(self.features)

    def take(self, idx: torch.Tensor | slice) -> "Embedding":
        return Embedding(self.features[idx], self.logits[idx], None if self.pixels is None else self.pixels[idx])

    def sets(self, n: int) -> list["Embedding"]:
        """Disjoint consecutive sets of ``n`` rows (a ragged rest is left out)."""
        return [self.take(slice(i, i + n)) for i in range(0, len(self) - n + 1, n)]

    def with_pixels(self, images: torch.Tensor | np.ndarray) -> "Embedding":
        """The same embedding carrying its images (N, C, H, W), flattened."""
        x = torch.as_tensor(images, dtype=torch.float32)
        return replace(self, pixels=x.reshape(len(x), -1))

    @property
    def predicted(self) -> torch.Tensor:
        """The evaluator's class index for each image, (N,) int64."""
        return self.logits.argmax(dim=1)


@dataclass(frozen=True)
class Reference:
    """The real data a generated set is judged against."""

    evaluator: nn.Module  # the feature network (torchmetrics' ``feature=`` module)
    train: Embedding  # the whole train split: DCR's "training records", the copies' pixels
    test: Embedding  # the whole test split: DCR's held-out records
    class_share: torch.Tensor  # (K,) float64: the train split's label distribution
    sample_size: int  # n: images in each scored set, in each reference subset and in the floor's set
    subsets: tuple[Embedding, ...]  # R disjoint seeded n-image subsets of the train split
    floor: Embedding  # n images of the test split (a seeded subset when n < its size)

    def subset(self, i: int) -> Embedding:
        """The reference subset generated set ``i`` is compared with."""
        return self.subsets[i % len(self.subsets)]


MetricFn = Callable[[Embedding, Reference, EvaluateConfig], dict[str, float]]
_METRICS: dict[str, MetricFn] = {}


_NEEDS_CLASSES: set[str] = set()


def register(fn: MetricFn | None = None, *, classes: bool = False) -> Any:
    """Add ``fn`` to the registry under its own name (stylegan2-ada's ``metric_main`` idea);
    ``@register(classes=True)``: it reads the evaluator's class logits, so a feature network
    without classes (contrastive) cannot give it."""
    def add(f: MetricFn) -> MetricFn:
        _METRICS[f.__name__] = f
        if classes:
            _NEEDS_CLASSES.add(f.__name__)
        return f

    return add(fn) if fn is not None else add


def needs_classes(name: str) -> bool:
    """Whether metric ``name`` reads class logits (see :func:`register`)."""
    return name in _NEEDS_CLASSES


def metric_names() -> list[str]:
    return list(_METRICS)


def metric(name: str) -> MetricFn:
    if name not in _METRICS:
        raise KeyError(f"unknown metric {name!r}; known: {metric_names()}")
    return _METRICS[name]


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None from a single value: no spread to measure)."""
    a = np.asarray(values, dtype=np.float64)
    if len(a) < 2:
        return float(a.mean()), None
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


def score_and_floor(fake: Embedding, ref: Reference, one: Callable[[Embedding, Embedding], dict[str, float]],
                    uses_reference: bool = True) -> dict[str, float]:
    """``one`` (a set of ``n`` images and a reference subset of ``n`` -> {name: value}) as the mean over
    the generated sets with its standard error, and the floor (the test split's ``n`` images against
    each subset) with its spread: ``{"fid": ..., "fid_se": ..., "fid_floor": ..., "fid_floor_se": ...}``.

    The floor is one held-out set, so its own sampling error cannot be seen from it; ``_floor_se``
    is the standard deviation of a single real-against-real comparison of ``n`` vs ``n`` (each
    reference subset scored against the next one), which bounds it from above.
    ``uses_reference=False``: ``one`` ignores its second argument (IS, the class histogram).
    """
    sets = fake.sets(ref.sample_size)
    if not sets:
        raise ValueError(f"{len(fake)} generated images are fewer than the sample size {ref.sample_size}")
    per_set = [one(s, ref.subset(i)) for i, s in enumerate(sets)]
    subsets = ref.subsets if uses_reference else ref.subsets[:1]
    floors = [one(ref.floor, r) for r in subsets]
    r = len(ref.subsets)
    real_pairs = [one(ref.subsets[(a + 1) % r], ref.subsets[a]) for a in range(r)] if r > 1 else []
    out: dict[str, float] = {}
    for key in per_set[0]:
        out[key], se = mean_se([d[key] for d in per_set])
        if se is not None:
            out[f"{key}_se"] = se
        out[f"{key}_floor"] = float(np.mean([d[key] for d in floors]))
        if real_pairs:
            out[f"{key}_floor_se"] = float(np.std([d[key] for d in real_pairs], ddof=1))
    return out


def expected_coverage(n_real: int, n_fake: int, k: int) -> float:
    """A perfect generator's expected coverage (Naeem et al. 2020, eq. 7): a real image's k-NN
    ball is empty of generated images when its k nearest among the other ``n_real - 1`` real and
    ``n_fake`` generated images are all real. Distribution-free (it depends only on ranks)."""
    empty = 1.0
    for i in range(k):
        empty *= (n_real - 1 - i) / (n_real - 1 + n_fake - i)
    return 1.0 - empty


def ceilings(n: int, k: int, num_classes: int) -> dict[str, float]:
    """The best value of each score a generator can hope for at sample size ``n``: exact
    expectations of a perfect generator where theory gives one (coverage, density, KID, class KL,
    modes), the bound of the scale otherwise (FID 0, precision/recall 1, IS the number of classes,
    no copies)."""
    return {"fid": 0.0, "kid": 0.0, "is": float(num_classes), "precision": 1.0, "recall": 1.0, "density": 1.0,
            "coverage": expected_coverage(n, n, k), "modes": float(num_classes), "class_kl": 0.0,
            "copy_share": 0.0}
