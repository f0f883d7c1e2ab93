"""FID, KID and the Inception Score, computed by torchmetrics on the evaluator's outputs.

The feature network (the project's classifier, or Inception: aigc/metrics/features.py) gives
``FeatureModule`` (features) for FID and KID, ``LogitsModule`` (class logits) for IS. Each
reference subset's statistics are accumulated once and kept across sets
(``reset_real_features=False``); each generated set, then the floor's set, is scored in turn.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from aigc.config import EvaluateConfig
from aigc.metrics.base import Embedding, Reference, register, score_and_floor
from aigc.metrics.features import FeatureModule, LogitsModule


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """KID is thousands of 100x100 kernel matrices: too small to split across threads, and on a
    busy machine every split op waits for a descheduled thread (measured here: 0.4 s in one run,
    9.4 s in the next while other processes held the cores), so it runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _quiet(metric_cls, **kwargs):
    # torchmetrics warns that a custom feature extractor gives scores not comparable with
    # published (Inception) ones: true, and the README says so.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return metric_cls(**kwargs)


@register
def fid(fake: Embedding, ref: Reference, cfg: EvaluateConfig) -> dict[str, float]:
    """Frechet distance between Gaussians fitted to the features (lower is better; 0 = same statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # here: a stage that scores nothing skips ~1-2 s

    per_subset = {}
    for r in ref.subsets:
        m = _quiet(FrechetInceptionDistance, feature=FeatureModule(ref.evaluator), reset_real_features=False)
        m.update(r.features, real=True)
        per_subset[id(r)] = m

    def one(s: Embedding, r: Embedding) -> dict[str, float]:
        if not torch.isfinite(s.features).all():
            # a broken generator's NaN images: LAPACK's eigensolver crashes the process on NaN
            # input (a segfault, not an exception), so the score is NaN without calling it
            return {"fid": float("nan")}
        m = per_subset[id(r)]
        m.reset()  # the fake side only
        m.update(s.features, real=False)
        return {"fid": float(m.compute())}

    return score_and_floor(fake, ref, one)


@register
def kid(fake: Embedding, ref: Reference, cfg: EvaluateConfig) -> dict[str, float]:
    """Kernel (polynomial MMD^2) distance of the features, unbiased (lower is better; about 0 = same)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(cfg.kid_subset_size, ref.sample_size)
    per_subset = {}
    for r in ref.subsets:
        m = _quiet(KernelInceptionDistance, feature=FeatureModule(ref.evaluator), subsets=cfg.kid_subsets,
                   subset_size=size, reset_real_features=False)
        m.update(r.features, real=True)
        per_subset[id(r)] = m

    def one(s: Embedding, r: Embedding) -> dict[str, float]:
        m = per_subset[id(r)]
        m.reset()
        m.update(s.features, real=False)
        with _one_thread():
            return {"kid": float(m.compute()[0])}  # the mean over subsets

    return score_and_floor(fake, ref, one)


@register(classes=True)
def inception_score(fake: Embedding, ref: Reference, cfg: EvaluateConfig) -> dict[str, float]:
    """exp E KL(p(y|x) || p(y)) on the evaluator's logits: confident and varied. Good up to the real
    data's own value (the floor) only: a generator scores above it by drawing every class in equal
    shares with over-confident, prototypical images, and far below it when collapsed or noise.
    The registry compares its distance to the floor."""
    from torchmetrics.image.inception import InceptionScore

    m = _quiet(InceptionScore, feature=LogitsModule(ref.evaluator), splits=1)

    def one(s: Embedding, _: Embedding) -> dict[str, float]:
        m.reset()
        # Log-probabilities floored at -50: a saturated softmax (images far from every class)
        # then gives 0 log 0 = 0 instead of NaN; the score moves by less than 1e-20.
        m.update(s.logits.log_softmax(dim=1).clamp(min=-50.0))
        with warnings.catch_warnings():  # one split has no standard deviation; only the mean is used
            warnings.simplefilter("ignore", UserWarning)
            return {"is": float(m.compute()[0])}

    return score_and_floor(fake, ref, one, uses_reference=False)

