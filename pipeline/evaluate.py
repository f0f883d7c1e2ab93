"""evaluate: the trained generator -> every score beside its floor, pictures, the training's MLflow run.

    python -m pipeline.evaluate --generator models/generator.pt --evaluator models/evaluator.pt \
        --processed data/processed --run models/run.json --cache-dir .cache/eval \
        --metrics reports/metrics.json --summary reports/eval/evaluation.json \
        --samples reports/eval/samples.png --nearest reports/eval/nearest.png \
        --classes reports/eval/classes.png --labels reports/eval/labels.png

The real splits' embeddings are cached under CACHE_DIR (keyed by data, split, size and the
evaluator's weights), so only the first evaluation with a given evaluator embeds them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from aigc.config import EvaluateConfig, TrackingConfig
from aigc.data.preprocess import load_info, load_split
from aigc.errors import UserError
from aigc.images import make_grid, save_png
from aigc.io import file_sha256, write_json
from aigc.metrics import calc_metrics, embed, real_embedding, reference
from aigc.metrics.figures import class_bars, nearest_grid
from aigc.metrics.memorisation import closest_pairs
from aigc.metrics.modes import class_histogram
from aigc.models import draw, load_generator
from aigc.metrics.evaluator import label_indices, load_evaluator, weights_sha256
from aigc.metrics.labels import label_accuracy, label_bars, per_class_floor
from aigc.runtime import resolve_device
from aigc.tracking import Run
from pipeline._stage import main, read_stage_json


def evaluate(evaluate: EvaluateConfig, tracking: TrackingConfig, generator: str, evaluator: str, processed: str,
             run: str, cache_dir: str, metrics: str, summary: str, samples: str, nearest: str,
             classes: str, labels: str) -> dict[str, float]:
    """Score GENERATOR's samples against PROCESSED with EVALUATOR's features; log them to the training's run."""
    cfg = evaluate
    t_start = time.perf_counter()
    tracker = Run.attach(read_stage_json(run, "run file", "train"), tracking)  # first: a dead server costs no work
    info = load_info(processed)
    train, test = load_split(processed, "train"), load_split(processed, "test")
    G, gnet = load_generator(generator)
    ev = load_evaluator(evaluator)
    shape = (int(info["channels"]), *map(int, info["resolution"]))
    if gnet.image_shape != shape:
        raise UserError(f"{generator} makes {gnet.image_shape} images but the data is {shape}; "
                        "retrain (dvc repro train)")
    if (ev.cfg.channels, ev.cfg.height, ev.cfg.width) != shape or list(ev.cfg.classes) != info["classes"]:
        raise UserError(f"{evaluator} was trained on other data ({ev.cfg.channels}x{ev.cfg.height}x{ev.cfg.width}, "
                        f"classes {list(ev.cfg.classes)}); retrain it (dvc repro train_evaluator)")
    device = resolve_device(cfg.device, "evaluate.device")

    # (1) The real splits' embeddings: cached across evaluations.
    t = time.perf_counter()
    embedded = {}
    for split, data in (("train", train), ("test", test)):
        embedded[split], hit = real_embedding(ev, data["images"], split=split, cache_dir=cache_dir,
                                              data_sha256=file_sha256(Path(processed) / f"{split}.npz"),
                                              batch_size=cfg.batch_size, device=device)
        print(f"real {split} split ({len(data['images'])} images): {'cached' if hit else 'embedded and cached'}")
    t_real = time.perf_counter() - t

    # (2) The generated images, embedded once for every metric.
    t = time.perf_counter()
    # A conditional G draws its classes by the data's shares; `requested` holds them (None otherwise).
    fake, requested = draw(G.to(device), gnet.z_dim, cfg.num_samples, cfg.seed, device=device,
                           batch_size=cfg.batch_size)
    t_sample = time.perf_counter() - t
    t = time.perf_counter()
    fake_emb = embed(ev, fake, cfg.batch_size, device)
    ev.cpu()
    t_embed = time.perf_counter() - t

    # (3) Every metric, each score beside its floor.
    t = time.perf_counter()
    ref = reference(ev, embedded["train"], embedded["test"], train["labels"], cfg.num_samples, cfg.seed)
    scores = calc_metrics(fake_emb, ref, cfg)
    # Label accuracy (conditional generators): agreement with the requested class, beside the
    # evaluator's own test accuracy (aigc/metrics/labels.py).
    test_idx = label_indices(test["labels"], ev.cfg)
    if requested is not None:
        asked = label_indices(torch.tensor(gnet.classes)[requested].numpy(), ev.cfg)
        scores |= label_accuracy(fake_emb, asked, embedded["test"], test_idx, list(ev.cfg.classes))
    t_metrics = time.perf_counter() - t

    # (4) Pictures: samples, the likeliest copies beside their nearest training images, class shares.
    t = time.perf_counter()
    save_png(make_grid(fake[:cfg.grid_size]), samples)
    gen_idx, train_idx = closest_pairs(fake_emb, ref, min(cfg.nearest_pairs, len(fake)))
    save_png(nearest_grid(fake[gen_idx], torch.from_numpy(train["images"][train_idx.numpy()])), nearest)
    num_classes = ev.cfg.num_classes
    save_png(class_bars(list(ev.cfg.classes), ref.class_share.numpy(),
                        class_histogram(fake_emb, num_classes).numpy(),
                        class_histogram(ref.floor, num_classes).numpy()), classes)
    save_png(label_bars(list(ev.cfg.classes), scores if requested is not None else
                        per_class_floor(embedded["test"], test_idx, list(ev.cfg.classes)),
                        f"label accuracy {scores['label_accuracy']:.3f} (floor {scores['label_accuracy_floor']:.3f})"
                        if requested is not None else "unconditional generator: no requested labels; the floor only"),
             labels)
    t_pictures = time.perf_counter() - t

    sets = cfg.num_samples // ref.sample_size
    seconds = time.perf_counter() - t_start
    report = {k: round(v, 6) for k, v in scores.items()} | {
        "classes": num_classes,
        "num_samples": cfg.num_samples,
        "sample_size": ref.sample_size,  # images in each scored set and in the floor's set
        "sets": sets,  # scores are means over this many disjoint generated sets
        "reference_size": len(ref.train),  # each set (and the floor) is compared with the whole train split
        "heldout_size": len(ref.test),
        "seconds": round(seconds, 1),
    }
    write_json(metrics, report)
    write_json(summary, {
        "protocol": (f"each score is the mean over {sets} disjoint sets of {ref.sample_size} generated images, "
                     f"each compared with the {len(ref.train)} train images; each *_floor is {ref.sample_size} "
                     f"real test images compared with the same train images (what a perfect generator would "
                     f"score at this sample size). dcr_score uses all {cfg.num_samples} generated images against "
                     f"the {len(ref.train)} train and {len(ref.test)} test images; its floor is the test images, "
                     f"each left out of the held-out set in turn."),
        "evaluate": cfg.model_dump(),
        "generator": {"path": generator, "sha256": file_sha256(generator), "net": gnet.to_dict()},
        "evaluator": {"path": evaluator, "weights_sha256": weights_sha256(ev), "net": ev.cfg.to_dict()},
        "seconds": {"total": round(seconds, 2), "real_embeddings": round(t_real, 2), "sampling": round(t_sample, 2),
                    "embedding": round(t_embed, 2), "metrics": round(t_metrics, 2), "pictures": round(t_pictures, 2)},
    })

    tracker.log_metrics({f"eval/{k}": v for k, v in report.items()})
    tracker.set_tags({"aigc.evaluator_weights_sha256": weights_sha256(ev)})
    for path in (metrics, summary, samples, nearest, classes, labels):
        tracker.log_artifact(path, "evaluation")
    if tracker.active:
        print(f"logged to MLflow run {tracker.run_id} in {tracker.uri}")
    print("  ".join(f"{k} {scores[k]:.4g} (floor {scores[f'{k}_floor']:.4g})"
                    for k in scores if f"{k}_floor" in scores and not k.startswith("label_accuracy_")))
    print(f"{cfg.num_samples} samples evaluated in {seconds:.1f} s (sampling {t_sample:.1f} s, embedding "
          f"{t_embed:.1f} s, metrics {t_metrics:.1f} s, pictures {t_pictures:.1f} s)")
    return report


if __name__ == "__main__":
    main(evaluate, sections=("evaluate", "tracking"),
         paths=("generator", "evaluator", "processed", "run", "cache_dir", "metrics", "summary", "samples",
                "nearest", "classes", "labels"))
