"""The scorer: one feature space and one reference, so every generator it scores is comparable.

The evaluate stage scores the trained generator with it; the register stage scores the champion's
own generator with the same evaluator, data and ``evaluate`` settings (one feature space per
comparison). The real splits' embeddings are cached under ``cache_dir`` (keyed by data, split,
size and the evaluator's weights), so only the first evaluation with a given evaluator embeds them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aigc.config import EvaluateConfig
from aigc.data.preprocess import arrays_sha256, dataset_sha256, load_info, load_split
from aigc.errors import UserError
from aigc.metrics import Embedding, Reference, calc_metrics, embed, real_embedding, reference
from aigc.metrics.evaluator import Evaluator, label_indices, labelled, load_evaluator, objective_for, unavailable, \
    weights_sha256
from aigc.metrics.inception import InceptionEvaluator, load_inception
from aigc.metrics.labels import generated_label_accuracy
from aigc.models import draw
from aigc.runtime import resolve_device

# The scores a person compares: each in reports/scores.json (the DVC metric) with its spread and
# floor, and one MLflow chart each (eval/<key>); the rest of reports/metrics.json (ceilings, the
# floors' spreads, per-class figures, the protocol's sizes, lineage) is detail.
HEADLINE = ("fid", "kid", "is", "precision", "recall", "density", "coverage", "modes", "class_kl", "dcr_score",
            "copy_share", "label_accuracy")


def headline(scores: dict[str, Any]) -> dict[str, float]:
    """Each headline score, its standard error and its floor, in that order (``dvc exp show``'s columns)."""
    out = {}
    for key in HEADLINE:
        for name in (key, f"{key}_se", f"{key}_floor"):
            if isinstance(scores.get(name), (int, float)):
                out[name] = round(float(scores[name]), 6)
    return out


def describe(scores: dict[str, Any], key: str) -> str:
    """One score as a person reads it beside another run's: 'value ± se · floor f ± se · ceiling c'."""
    def g(name: str) -> str | None:
        v = scores.get(name)
        return f"{v:.4g}" if isinstance(v, (int, float)) else None

    text = g(key) or "—"
    if g(f"{key}_se"):
        text += f" ± {g(f'{key}_se')}"
    if g(f"{key}_floor"):
        text += f" · floor {g(f'{key}_floor')}" + (f" ± {g(f'{key}_floor_se')}" if g(f"{key}_floor_se") else "")
    if g(f"{key}_ceiling"):
        text += f" · ceiling {g(f'{key}_ceiling')}"
    return text


def settings_sha256(cfg: EvaluateConfig) -> str:
    """A hash of the evaluate settings the numbers depend on (``EvaluateConfig.scoring``)."""
    return hashlib.sha256(json.dumps(cfg.scoring(), sort_keys=True).encode()).hexdigest()


@dataclass
class Scorer:
    """One feature space and one reference: every generator scored by it is comparable."""

    cfg: EvaluateConfig
    evaluator: Evaluator | InceptionEvaluator  # the features' network (evaluate.features) with the classifier's logits
    ref: Reference
    train: dict[str, np.ndarray]
    test_emb: Embedding  # the test split, for label accuracy's floor (the evaluator's own test accuracy)
    test_labels: torch.Tensor  # class indices of the test split (empty when the evaluator has no classes)
    unavailable: dict[str, str]  # the class-based scores this feature space cannot give, each with why
    lineage: dict[str, str]  # the evaluator's weights, the data and the settings, hashed
    device: torch.device
    seconds_real: float

    @classmethod
    def open(cls, cfg: EvaluateConfig, evaluator: str, processed: str, cache_dir: str | None,
             device: str = "auto") -> "Scorer":
        """The scorer of ``processed`` in ``evaluator``'s feature space (``evaluate.features``); a
        UserError when the evaluator was trained on other data."""
        info = load_info(processed)
        train, test = load_split(processed, "train"), load_split(processed, "test")
        ev = load_evaluator(evaluator)
        shape = (int(info["channels"]), *map(int, info["resolution"]))
        classes_differ = ev.cfg.objective == "classifier" and list(ev.cfg.classes) != info["classes"]
        if (ev.cfg.channels, ev.cfg.height, ev.cfg.width) != shape or classes_differ:
            raise UserError(f"{evaluator} was trained on other data ({ev.cfg.channels}x{ev.cfg.height}x"
                            f"{ev.cfg.width}, classes {list(ev.cfg.classes)}); retrain it (dvc repro train_evaluator)")
        objective, _ = objective_for(cfg.features, info)
        if ev.cfg.objective != objective:
            raise UserError(f"{evaluator} is a {ev.cfg.objective} network but evaluate.features = {cfg.features} "
                            f"wants a {objective} one on this data; retrain it (dvc repro train_evaluator)")
        if cfg.features == "inception":
            ev = InceptionEvaluator(ev, load_inception(cfg.inception_weights))
        device = resolve_device(device, "runtime.device")
        t = time.perf_counter()
        embedded = {}
        for split, data in (("train", train), ("test", test)):
            emb, hit = real_embedding(ev, data["images"], split=split, cache_dir=cache_dir,
                                      data_sha256=arrays_sha256(data), batch_size=cfg.batch_size, device=device)
            embedded[split] = emb.with_pixels(data["images"])
            print(f"real {split} split ({len(data['images'])} images): {'cached' if hit else 'embedded and cached'}")
        ev.cpu()
        ref = reference(ev, embedded["train"], embedded["test"], train["labels"], cfg.num_samples, cfg.seed)
        lineage = {"evaluator_weights_sha256": weights_sha256(ev), "data_sha256": dataset_sha256(processed),
                   "settings_sha256": settings_sha256(cfg)}
        test_labels = label_indices(test["labels"], ev.cfg) if ev.cfg.num_classes else torch.zeros(0, dtype=torch.long)
        return cls(cfg, ev, ref, train, embedded["test"], test_labels, unavailable(ev.cfg, labelled(info)[0]),
                   lineage, device, time.perf_counter() - t)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this scorer compares."""
        c = self.evaluator.cfg
        return (c.channels, c.height, c.width)

    def score(self, G: torch.nn.Module, z_dim: int, classes: tuple[int, ...] = ()
              ) -> tuple[dict[str, float], torch.Tensor, Embedding, dict[str, float]]:
        """``cfg.num_samples`` seeded samples of G, embedded once, every metric: (scores, images,
        embedding, seconds per step). A conditional G (its label values ``classes``) draws its classes
        by the data's shares, and its label accuracy is scored too (aigc/metrics/labels.py)."""
        t = time.perf_counter()
        fake, requested = draw(G.to(self.device), z_dim, self.cfg.num_samples, self.cfg.seed, device=self.device,
                               batch_size=self.cfg.batch_size)
        G.cpu()
        t_sample = time.perf_counter() - t
        t = time.perf_counter()
        emb = embed(self.evaluator, fake, self.cfg.batch_size, self.device).with_pixels(fake)
        self.evaluator.cpu()
        t_embed = time.perf_counter() - t
        t = time.perf_counter()
        scores = calc_metrics(emb, self.ref, self.cfg)
        if requested is not None and self.evaluator.cfg.num_classes:  # agreement with the requested class,
            # beside the evaluator's test accuracy
            scores |= generated_label_accuracy(emb, requested, classes, self.evaluator.cfg, self.test_emb,
                                               self.test_labels)
        t_metrics = time.perf_counter() - t
        return scores, fake, emb, {"sampling": t_sample, "embedding": t_embed, "metrics": t_metrics}
