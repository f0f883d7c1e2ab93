"""One generator's evaluation: every score beside its spread, floor and ceiling, its pictures, and
what of it goes to the training's MLflow run. The evaluate stage (``pipeline/evaluate.py``) reads
its inputs, calls :func:`evaluate_generator`, writes the JSON files and calls :func:`log_evaluation`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from aigc.config import EvaluateConfig
from aigc.encryption import is_encrypted
from aigc.errors import UserError
from aigc.images import make_grid, save_png
from aigc.io import file_sha256
from aigc.metrics import protocol
from aigc.metrics.figures import class_bars, nearest_grid, notice
from aigc.metrics.labels import label_bars, per_class_floor
from aigc.metrics.memorisation import closest_pairs
from aigc.metrics.modes import class_histogram
from aigc.metrics.scorer import HEADLINE, Scorer, describe, headline
from aigc.models import load_generator

if TYPE_CHECKING:
    from aigc.tracking import Run


@dataclass
class Evaluation:
    """What one evaluation found: the scores, and the reports the stage writes of them."""

    cfg: EvaluateConfig
    scores: dict[str, float]
    report: dict[str, Any]  # reports/metrics.json: every figure
    summary: dict[str, Any]  # reports/eval/evaluation.json: the protocol, settings, lineage, nets, timings
    sizes: dict[str, int]  # the protocol's sizes (sets, sample size, ...)
    lineage: dict[str, str]  # the generator, the evaluator's weights, the data and the settings, hashed
    seconds: float
    steps: dict[str, float]  # seconds per step: sampling, embedding, metrics, pictures
    unavailable: dict[str, str]  # scores this feature space cannot give (unlabelled data), each with why

    @property
    def headline(self) -> dict[str, float]:
        """reports/scores.json (the DVC metric): each headline score, its spread and its floor."""
        return headline(self.scores)

    def describe(self) -> str:
        """The two lines the stage prints: every score with its spread and floor, and the timings."""
        scores, secs = self.scores, self.steps
        return ("  ".join(f"{k} {scores[k]:.4g}±{scores.get(f'{k}_se', float('nan')):.2g} (floor {scores[f'{k}_floor']:.4g})"
                          for k in scores if f"{k}_floor" in scores and not k.startswith("label_accuracy_"))
                + ("".join(f"\n{', '.join(k for k, v in self.unavailable.items() if v == why)}: {why}"
                           for why in dict.fromkeys(self.unavailable.values())))
                + f"\n{self.cfg.num_samples} samples evaluated in {self.seconds:.1f} s (sampling {secs['sampling']:.1f} s, "
                f"embedding {secs['embedding']:.1f} s, metrics {secs['metrics']:.1f} s, pictures {secs['pictures']:.1f} s)")


def evaluate_generator(cfg: EvaluateConfig, generator: str, evaluator: str, processed: str, cache_dir: str | None,
                       samples: str, nearest: str, classes: str, labels: str,
                       started: float | None = None, device: str = "auto") -> Evaluation:
    """Score GENERATOR's samples against PROCESSED with EVALUATOR's features and save its pictures
    (SAMPLES, NEAREST, CLASSES, LABELS). ``started`` (``time.perf_counter()``): when the stage
    began, for the reported seconds; by default now."""
    t_start = time.perf_counter() if started is None else started
    G, gnet = load_generator(generator)
    scorer = Scorer.open(cfg, evaluator, processed, cache_dir, device)
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
    # With the data encrypted at rest the grid may not hold a record in clear: its training images are
    # withheld (a grey checkerboard), the generated images and the distances' scores stay.
    withheld = is_encrypted(processed)
    save_png(nearest_grid(fake[gen_idx], torch.from_numpy(scorer.train["images"][train_idx.numpy()]),
                          redact=withheld), nearest)
    num_classes = ev.cfg.num_classes
    if num_classes:
        save_png(class_bars(list(ev.cfg.classes), ref.class_share.numpy(),
                            class_histogram(fake_emb, num_classes).numpy(),
                            class_histogram(ref.floor, num_classes).numpy()), classes)
        conditional = "label_accuracy" in scores
        save_png(label_bars(list(ev.cfg.classes), scores if conditional else
                            per_class_floor(scorer.test_emb, scorer.test_labels, list(ev.cfg.classes)),
                            f"label accuracy {scores['label_accuracy']:.3f} (floor {scores['label_accuracy_floor']:.3f})"
                            if conditional else "unconditional generator: no requested labels; the floor only"),
                 labels)
    else:  # a self-supervised feature space: no classes to count or to agree with
        why = scorer.unavailable["modes"]
        save_png(notice("class shares and mode coverage", why), classes)
        save_png(notice("label accuracy", why), labels)
    t_pictures = time.perf_counter() - t

    sizes = protocol(ref, cfg, cfg.num_samples)
    seconds = time.perf_counter() - t_start
    lineage = {"generator_sha256": file_sha256(generator)} | scorer.lineage
    report: dict[str, Any] = {k: round(v, 6) for k, v in scores.items()} | {"classes": num_classes} | sizes | {
        "features": ev.cfg.objective if cfg.features != "inception" else "inception",
        "not_available": scorer.unavailable, "records_withheld": withheld, "seconds": round(seconds, 1),
        "lineage": lineage}
    summary = {
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
        "not_available": scorer.unavailable,
        "seconds": {"total": round(seconds, 2), "real_embeddings": round(scorer.seconds_real, 2),
                    **{k: round(v, 2) for k, v in secs.items()}, "pictures": round(t_pictures, 2)},
    }
    return Evaluation(cfg, scores, report, summary, sizes, lineage, seconds, secs | {"pictures": t_pictures},
                      scorer.unavailable)


def log_evaluation(tracker: Run, ev: Evaluation, files: list[str]) -> None:
    """The evaluation into the training's MLflow run, its written FILES as artifacts (evaluation/).

    One chart per headline score (the eval/ group of the run page) and the registry's default
    criterion, fid's gap to its floor; spreads, floors and ceilings are not charts but tags
    (score.<key> = "value ± se · floor f ± se · ceiling c", side by side in the Compare view) and
    one table artifact (evaluation/scores_table.json). A server that fails past MLflow's own
    retries ends the stage with one line (``Run.failing_as``)."""
    scores, sizes, lineage, cfg = ev.scores, ev.sizes, ev.lineage, ev.cfg
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
                         | {f"score.{k}": why for k, why in ev.unavailable.items()}
                         | {"eval.features": ev.report["features"],
                            "eval.evaluator_sha256": lineage["evaluator_weights_sha256"],
                            "eval.data_sha256": lineage["data_sha256"], "eval.settings_sha256": lineage["settings_sha256"],
                            "eval.seed": cfg.seed})
        for path in files:
            tracker.log_artifact(path, "evaluation")
