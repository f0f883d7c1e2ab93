"""Metrics of a generator: a registry of named functions, each returning ``{name: value}`` with the
floor beside each score (stylegan2-ada's ``metric_main``).

    ref = reference(evaluator, train_emb, test_emb, train_labels, num_samples, seed)
    scores = calc_metrics(embed(evaluator, fake_images), ref, cfg)
    # {"fid": 12.3, "fid_se": 0.1, "fid_floor": 2.1, "fid_floor_se": 0.2, "fid_ceiling": 0.0, "kid": ...}

Registered (module: names it returns):

* ``fid`` (fid.py): fid -- torchmetrics, evaluator features
* ``kid`` (fid.py): kid -- torchmetrics, evaluator features
* ``inception_score`` (fid.py): is -- torchmetrics, evaluator logits
* ``precision_recall`` (manifold.py): precision, recall, density, coverage -- Naeem et al. 2020
* ``modes`` (modes.py): modes, class_kl -- predicted-class histogram vs the data's

``inception_score`` and ``modes`` read the evaluator's class logits (``needs_classes``): with a
self-supervised feature network (unlabelled data) they are not computed, and the evaluation says
"not available: unlabelled" in their place.
* ``memorisation`` (memorisation.py): dcr_score, dcr_closer_to_train, copy_share -- distance to
  the closest record (features) and the near-duplicate share (pixels)

Each score ``x`` comes with ``x_se`` (its standard error over the generated sets), ``x_floor``
(the same metric for real held-out images at the same sample size) with ``x_floor_se``, and
``x_ceiling`` where theory gives one (aigc/metrics/base.py states the protocol). A new metric is
one function decorated with ``@register`` in a module imported below. Nothing here knows about
files, MLflow or Prefect: the evaluate and register stages wire it up.
"""

from __future__ import annotations

import numpy as np
import torch

from aigc.config import EvaluateConfig
from aigc.errors import UserError
from aigc.metrics.base import Embedding, Reference, ceilings, metric, metric_names, needs_classes
from aigc.metrics.evaluator import Evaluator, label_indices
from aigc.metrics.features import embed, real_embedding

# Importing a metric module registers its metrics; the order of these imports is the report's.
from aigc.metrics import fid, manifold, modes  # noqa: E402, F401, I001
from aigc.metrics import memorisation  # noqa: E402, F401, I001

__all__ = ["Embedding", "Reference", "calc_metrics", "embed", "metric_names", "protocol", "real_embedding",
           "reference"]


def reference(evaluator: Evaluator, train: Embedding, test: Embedding, train_labels: np.ndarray,
              num_samples: int, seed: int) -> Reference:
    """The reference a generated set of ``num_samples`` images is judged against (base.py): sample
    size ``n = min(num_samples, len(test))``, the train split cut into ``len(train) // n`` disjoint
    seeded subsets of ``n``, and ``n`` test images for the floor."""
    if len(test) < 2:
        raise UserError(f"the test split has {len(test)} image(s); evaluation needs at least 2 "
                        "(raise data.test_size)")
    n = min(num_samples, len(test), len(train))
    if n < 2:
        raise UserError(f"evaluate.num_samples = {num_samples}: need at least 2 images to compare")
    k = evaluator.cfg.num_classes
    if k:
        counts = torch.bincount(label_indices(train_labels, evaluator.cfg), minlength=k).double()
        class_share = counts / counts.sum()
    else:  # a feature network without classes (contrastive): no class histogram to compare with
        class_share = torch.zeros(0, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    floor_idx = torch.randperm(len(test), generator=g)[:n].sort().values
    order = torch.randperm(len(train), generator=g)
    subsets = tuple(train.take(order[i * n:(i + 1) * n].sort().values) for i in range(len(train) // n))
    return Reference(evaluator=evaluator, train=train, test=test, class_share=class_share,
                     sample_size=n, subsets=subsets, floor=test.take(floor_idx))


def calc_metrics(fake: Embedding, ref: Reference, cfg: EvaluateConfig,
                 names: list[str] | None = None) -> dict[str, float]:
    """Every registered metric (or ``names``) of the generated embedding, each score beside its
    spread, floor and ceiling. Metrics of the predicted classes (``needs_classes``) are left out
    when the feature network has no class logits (a contrastive one: ``unavailable`` says why).

    Seeded from ``cfg.seed`` (KID draws random subsets) without touching
    the caller's RNG state.
    """
    out: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for name in names or metric_names():
            if len(ref.class_share) or not needs_classes(name):
                out.update(metric(name)(fake, ref, cfg))
    top = ceilings(ref.sample_size, cfg.prdc_k, len(ref.class_share))
    out |= {f"{key}_ceiling": value for key, value in top.items() if key in out}
    return out


def protocol(ref: Reference, cfg: EvaluateConfig, num_fake: int) -> dict[str, int]:
    """The sizes that make two evaluations comparable (logged with the scores)."""
    return {"num_samples": num_fake, "sample_size": ref.sample_size, "sets": num_fake // ref.sample_size,
            "reference_subsets": len(ref.subsets), "reference_size": ref.sample_size,
            "train_size": len(ref.train), "heldout_size": len(ref.test), "prdc_k": cfg.prdc_k}
