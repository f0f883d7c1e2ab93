"""evaluate: the trained generator -> every score beside its spread, floor and ceiling, pictures, the
training's MLflow run.

    python -m pipeline.evaluate --generator models/generator.pt --evaluator models/evaluator.pt \
        --processed data/processed --run models/run.json --cache-dir .cache/eval \
        --metrics reports/metrics.json --scores reports/scores.json --summary reports/eval/evaluation.json \
        --samples reports/eval/samples.png --nearest reports/eval/nearest.png \
        --classes reports/eval/classes.png --labels reports/eval/labels.png

The real splits' embeddings are cached under CACHE_DIR (keyed by data, split, size and the
evaluator's weights), so only the first evaluation with a given evaluator embeds them. The
register stage scores the champion with the same ``Scorer`` (one feature space per comparison).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aigc.config import EvaluateConfig, TrackingConfig
from aigc.data.preprocess import arrays_sha256, dataset_sha256, load_info, load_split
from aigc.errors import UserError
from aigc.images import make_grid, save_png
from aigc.io import file_sha256, write_json
from aigc.metrics import Embedding, Reference, calc_metrics, embed, protocol, real_embedding, reference
from aigc.metrics.evaluator import Evaluator, label_indices, load_evaluator, weights_sha256
from aigc.metrics.inception import InceptionEvaluator, load_inception
from aigc.metrics.figures import class_bars, nearest_grid
from aigc.metrics.labels import generated_label_accuracy, label_bars, per_class_floor
from aigc.metrics.memorisation import closest_pairs
from aigc.metrics.modes import class_histogram
from aigc.models import draw, load_generator
from aigc.runtime import resolve_device
from aigc.tracking import Run
from pipeline._stage import main, read_stage_json

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
    test_labels: torch.Tensor  # class indices of the test split
    lineage: dict[str, str]  # the evaluator's weights, the data and the settings, hashed
    device: torch.device
    seconds_real: float

    @classmethod
    def open(cls, cfg: EvaluateConfig, evaluator: str, processed: str, cache_dir: str | None) -> "Scorer":
        info = load_info(processed)
        train, test = load_split(processed, "train"), load_split(processed, "test")
        ev = load_evaluator(evaluator)
        shape = (int(info["channels"]), *map(int, info["resolution"]))
        if (ev.cfg.channels, ev.cfg.height, ev.cfg.width) != shape or list(ev.cfg.classes) != info["classes"]:
            raise UserError(f"{evaluator} was trained on other data ({ev.cfg.channels}x{ev.cfg.height}x"
                            f"{ev.cfg.width}, classes {list(ev.cfg.classes)}); retrain it (dvc repro train_evaluator)")
        if cfg.features == "inception":
            ev = InceptionEvaluator(ev, load_inception(cfg.inception_weights))
        device = resolve_device(cfg.device, "evaluate.device")
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
        test_labels = label_indices(test["labels"], ev.cfg)
        return cls(cfg, ev, ref, train, embedded["test"], test_labels, lineage, device, time.perf_counter() - t)

    @property
    def image_shape(self) -> tuple[int, int, int]:
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
        if requested is not None:  # agreement with the requested class, beside the evaluator's test accuracy
            scores |= generated_label_accuracy(emb, requested, classes, self.evaluator.cfg, self.test_emb,
                                               self.test_labels)
        t_metrics = time.perf_counter() - t
        return scores, fake, emb, {"sampling": t_sample, "embedding": t_embed, "metrics": t_metrics}


def evaluate(evaluate: EvaluateConfig, tracking: TrackingConfig, generator: str, evaluator: str, processed: str,
             run: str, cache_dir: str, metrics: str, summary: str, samples: str, nearest: str,
             classes: str, labels: str, scores: str | None = None) -> dict[str, Any]:
    """Score GENERATOR's samples against PROCESSED with EVALUATOR's features; log them to the training's run.
    METRICS holds every figure; SCORES (the DVC metric) the headline scores with their spreads and floors."""
    scores_path = scores
    cfg = evaluate
    t_start = time.perf_counter()
    tracker = Run.attach(read_stage_json(run, "run file", "train"), tracking)  # first: a dead server costs no work
    G, gnet = load_generator(generator)
    scorer = Scorer.open(cfg, evaluator, processed, cache_dir)
    if gnet.image_shape != scorer.image_shape:
        raise UserError(f"{generator} makes {gnet.image_shape} images but the data is {scorer.image_shape}; "
                        "retrain (dvc repro train)")

    # (1) Every metric, each score beside its spread, floor and ceiling.
    scores, fake, fake_emb, secs = scorer.score(G, gnet.z_dim, gnet.classes)
    ref, ev = scorer.ref, scorer.evaluator

    # (2) Pictures: samples, the likeliest copies beside their nearest training images, class shares.
    t = time.perf_counter()
    save_png(make_grid(fake[:cfg.grid_size]), samples)
    gen_idx, train_idx = closest_pairs(fake_emb, ref, min(cfg.nearest_pairs, len(fake)))
    save_png(nearest_grid(fake[gen_idx], torch.from_numpy(scorer.train["images"][train_idx.numpy()])), nearest)
    num_classes = ev.cfg.num_classes
    save_png(class_bars(list(ev.cfg.classes), ref.class_share.numpy(),
                        class_histogram(fake_emb, num_classes).numpy(),
                        class_histogram(ref.floor, num_classes).numpy()), classes)
    conditional = "label_accuracy" in scores
    save_png(label_bars(list(ev.cfg.classes), scores if conditional else
                        per_class_floor(scorer.test_emb, scorer.test_labels, list(ev.cfg.classes)),
                        f"label accuracy {scores['label_accuracy']:.3f} (floor {scores['label_accuracy_floor']:.3f})"
                        if conditional else "unconditional generator: no requested labels; the floor only"),
             labels)
    t_pictures = time.perf_counter() - t

    sizes = protocol(ref, cfg, cfg.num_samples)
    seconds = time.perf_counter() - t_start
    lineage = {"generator_sha256": file_sha256(generator)} | scorer.lineage
    report: dict[str, Any] = {k: round(v, 6) for k, v in scores.items()} | {"classes": num_classes} | sizes | {
        "seconds": round(seconds, 1), "lineage": lineage}
    write_json(metrics, report)
    if scores_path:
        write_json(scores_path, headline(scores))
    write_json(summary, {
        "protocol": (f"each score is the mean over {sizes['sets']} disjoint sets of {ref.sample_size} generated "
                     f"images, set i compared with reference subset i mod {len(ref.subsets)} ({len(ref.subsets)} "
                     f"disjoint seeded subsets of {ref.sample_size} train images); *_se is the standard error of "
                     f"that mean. Each *_floor is {ref.sample_size} real test images compared with every reference "
                     f"subset (mean, and *_floor_se over subsets; a bootstrap for is/modes/class_kl): what a "
                     f"perfect generator scores at this sample size. *_ceiling is the best value theory allows. "
                     f"dcr_score and copy_share compare each generated image with all {len(ref.train)} train "
                     f"and {len(ref.test)} test images."),
        "evaluate": cfg.model_dump(),
        "lineage": lineage,
        "generator": {"path": generator, "net": gnet.to_dict()},
        "evaluator": {"path": evaluator, "net": ev.cfg.to_dict()},
        "seconds": {"total": round(seconds, 2), "real_embeddings": round(scorer.seconds_real, 2),
                    **{k: round(v, 2) for k, v in secs.items()}, "pictures": round(t_pictures, 2)},
    })

    # MLflow: one chart per headline score (the eval/ group of the run page) and the registry's
    # default criterion, fid's gap to its floor; spreads, floors and ceilings are not charts but tags
    # (score.<key> = "value ± se · floor f ± se · ceiling c", side by side in the Compare view) and
    # one table artifact (evaluation/scores_table.json).
    with tracker.failing_as(f"the evaluate stage logged its scores to run {tracker.run_id}",
                            "every output is written, but the stage is not done: when the server answers again, "
                            "run `dvc repro` (it evaluates again and logs the scores)"):
        logged = {f"eval/{k}": float(scores[k]) for k in HEADLINE if k in scores}
        logged["eval/fid_gap"] = scores["fid"] - scores["fid_floor"]
        if scores["fid_floor"] > 0:
            logged["eval/fid_ratio"] = scores["fid"] / scores["fid_floor"]
        tracker.log_metrics(logged)
        shown = [k for k in HEADLINE if k in scores]
        tracker.log_table({"score": shown, **{col: [scores.get(f"{k}{suffix}") for k in shown] for col, suffix in
                                             (("value", ""), ("se", "_se"), ("floor", "_floor"),
                                              ("floor_se", "_floor_se"), ("ceiling", "_ceiling"))}},
                          "evaluation/scores_table.json")
        # The protocol as tags (tags may change when a run is evaluated again; params may not): the
        # Compare view shows at a glance whether two runs' scores are comparable.
        tracker.set_tags({f"score.{k}": describe(scores, k) for k in shown}
                         | {"aigc.evaluator_weights_sha256": lineage["evaluator_weights_sha256"]}
                         | {f"eval.{k}": v for k, v in sizes.items()}
                         | {"eval.features": cfg.features, "eval.evaluator_sha256": lineage["evaluator_weights_sha256"],
                            "eval.data_sha256": lineage["data_sha256"], "eval.settings_sha256": lineage["settings_sha256"],
                            "eval.seed": cfg.seed})
        for path in (metrics, summary, samples, nearest, classes, labels, *([scores_path] if scores_path else [])):
            tracker.log_artifact(path, "evaluation")
    if tracker.active:
        print(f"logged to MLflow run {tracker.run_id} in {tracker.uri}")
    print("  ".join(f"{k} {scores[k]:.4g}±{scores.get(f'{k}_se', float('nan')):.2g} (floor {scores[f'{k}_floor']:.4g})"
                    for k in scores if f"{k}_floor" in scores and not k.startswith("label_accuracy_")))
    print(f"{cfg.num_samples} samples evaluated in {seconds:.1f} s (sampling {secs['sampling']:.1f} s, embedding "
          f"{secs['embedding']:.1f} s, metrics {secs['metrics']:.1f} s, pictures {t_pictures:.1f} s)")
    return report


if __name__ == "__main__":
    main(evaluate, sections=("evaluate", "tracking"),
         paths=("generator", "evaluator", "processed", "run", "cache_dir", "metrics", "summary", "samples",
                "nearest", "classes", "labels", "scores"))
