"""Metrics of a generator: a registry of named functions, each returning ``{name: value}`` with the
floor beside each score (stylegan2-ada's ``metric_main``).

    ref = reference(evaluator, train_emb, test_emb, train_labels, num_samples, seed)
    scores = calc_metrics(embed(evaluator, fake_images), ref, cfg)
    # {"fid": 12.3, "fid_floor": 2.1, "kid": ..., "is": ..., "precision": ..., "dcr_score": ...}

Registered (module: names it returns):

* ``fid`` (fid.py): fid -- torchmetrics, evaluator features
* ``kid`` (fid.py): kid -- torchmetrics, evaluator features
* ``inception_score`` (fid.py): is -- torchmetrics, evaluator logits
* ``precision_recall`` (manifold.py): precision, recall, density, coverage -- Naeem et al. 2020
* ``modes`` (modes.py): modes, class_kl -- predicted-class histogram vs the data's
* ``memorisation`` (memorisation.py): dcr_score, dcr_closer_to_train -- distance to closest record

Each score ``x`` comes with ``x_floor``, the same metric for real held-out images at the same
sample size (aigc/metrics/base.py states the protocol). Nothing here knows about files, MLflow or
Prefect: the evaluate stage wires it up.
"""

from __future__ import annotations

import numpy as np
import torch

from aigc.config import EvaluateConfig
from aigc.errors import UserError
from aigc.metrics.base import Embedding, Reference, metric, metric_names
from aigc.metrics.evaluator import Evaluator, label_indices
from aigc.metrics.features import embed, real_embedding

# Importing a metric module registers its metrics; the order of these imports is the report's.
from aigc.metrics import fid, manifold, modes  # noqa: E402, F401, I001
from aigc.metrics import memorisation  # noqa: E402, F401, I001

__all__ = ["Embedding", "Reference", "calc_metrics", "embed", "metric_names", "real_embedding", "reference"]


def reference(evaluator: Evaluator, train: Embedding, test: Embedding, train_labels: np.ndarray,
              num_samples: int, seed: int) -> Reference:
    """The reference a generated set of ``num_samples`` images is judged against, with the sample
    size of the comparison: ``n = min(num_samples, len(test))``."""
    if len(test) < 2:
        raise UserError(f"the test split has {len(test)} image(s); evaluation needs at least 2 "
                        "(raise data.test_size)")
    n = min(num_samples, len(test))
    if n < 2:
        raise UserError(f"evaluate.num_samples = {num_samples}: need at least 2 images to compare")
    k = evaluator.cfg.num_classes
    counts = torch.bincount(label_indices(train_labels, evaluator.cfg), minlength=k).double()
    floor_idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Reference(evaluator=evaluator, train=train, test=test, class_share=counts / counts.sum(),
                     sample_size=n, floor=test.take(floor_idx))


def calc_metrics(fake: Embedding, ref: Reference, cfg: EvaluateConfig,
                 names: list[str] | None = None) -> dict[str, float]:
    """Every registered metric (or ``names``) of the generated embedding, each score beside its floor.

    Seeded from ``cfg.seed`` (KID draws random subsets) without touching the caller's RNG state.
    """
    out: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for name in names or metric_names():
            out.update(metric(name)(fake, ref, cfg))
    return out
