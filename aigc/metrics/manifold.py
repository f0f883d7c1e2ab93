"""Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity
Metrics for Generative Models").

Each real image gets a ball reaching its k-th nearest real neighbour (in evaluator features):

* precision -- share of generated images inside some real ball (fidelity);
* recall -- share of real images inside some generated ball, balls built the same way on the
  generated set (diversity);
* density -- how many real balls hold each generated image, over k (about 1 when the sets match);
* coverage -- share of real balls that hold at least one generated image (diversity, robust to
  outliers).

The authors' package ``prdc`` (0.2) was read line by line and is correct -- precision counts
*generated* samples inside *real* balls and recall the reverse, as in the paper (a popular toolkit
has had them swapped: toshas/torch-fidelity#58). It is not called here only because it recomputes
the real set's own k-NN radii on every call, and the evaluation scores 20 sets and the floor
against the same few reference subsets. This is the same computation with each subset's radii
computed once; the tests check it against ``prdc`` itself and check the direction of precision and
recall on sets where the answer is known.

The sets compared are of equal size (aigc/metrics/base.py): with 500 generated images against a
4,500-image reference a perfect generator's expected coverage is only 0.41 and recall saturates,
so neither reads as diversity; 500 against 500 puts a perfect generator's coverage at 0.97.
"""

from __future__ import annotations

import torch

from aigc.config import EvaluateConfig
from aigc.errors import UserError
from aigc.metrics.base import Embedding, Reference, register, score_and_floor


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64, like prdc (scikit-learn upcasts float32 there), so borderline cases agree.
    return torch.cdist(a.double(), b.double())


def knn_radii(x: torch.Tensor, k: int, batch_size: int = 2048) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (the row itself is 0th)."""
    return torch.cat([_distances(x[i:i + batch_size], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), batch_size)])


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int, real_radii: torch.Tensor | None = None) -> dict[str, float]:
    """The four scores of real features (N, F) and generated features (M, F); ``real_radii`` (N,) from
    ``knn_radii(real, k)`` when several generated sets share one real set."""
    r_real = knn_radii(real, k) if real_radii is None else real_radii
    r_fake = knn_radii(fake, k)
    d = _distances(real, fake)  # (N, M): real i to generated j
    in_real_ball = d < r_real[:, None]
    return {
        "precision": float(in_real_ball.any(dim=0).double().mean()),
        "recall": float((d < r_fake[None, :]).any(dim=1).double().mean()),
        "density": float(in_real_ball.sum(dim=0).double().mean() / k),
        "coverage": float((d.min(dim=1).values < r_real).double().mean()),
    }


@register
def precision_recall(fake: Embedding, ref: Reference, cfg: EvaluateConfig) -> dict[str, float]:
    """Precision, recall, density, coverage of each generated set against its reference subset."""
    if cfg.prdc_k >= ref.sample_size:
        raise UserError(f"evaluate.prdc_k = {cfg.prdc_k} needs more than {cfg.prdc_k} images per set; "
                        f"the sets hold {ref.sample_size}: lower prdc_k")
    radii = {id(r): knn_radii(r.features, cfg.prdc_k) for r in ref.subsets}
    return score_and_floor(fake, ref, lambda s, r: prdc(r.features, s.features, cfg.prdc_k, radii[id(r)]))
