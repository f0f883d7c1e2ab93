"""evaluate: the trained generator -> every score beside its spread, floor and ceiling, pictures, the
training's MLflow run.

    python -m pipeline.evaluate --generator models/generator.pt --evaluator models/evaluator.pt \
        --processed data/processed --run models/run.json --cache-dir .cache/eval \
        --metrics reports/metrics.json --scores reports/scores.json --summary reports/eval/evaluation.json \
        --samples reports/eval/samples.png --nearest reports/eval/nearest.png \
        --classes reports/eval/classes.png --labels reports/eval/labels.png

The scoring is ``aigc/evaluation.py`` and ``aigc/metrics/scorer.py`` (the real splits' embeddings
cached under CACHE_DIR); the register stage scores the champion with the same ``Scorer``.
"""

from __future__ import annotations

import time
from typing import Any

from aigc.config import EvaluateConfig, RuntimeConfig, TrackingConfig
from aigc.evaluation import evaluate_generator, log_evaluation
from aigc.io import write_json
from aigc.tracking import Run
from pipeline._stage import main, read_stage_json


def run_evaluate(cfg: EvaluateConfig, tracking: TrackingConfig, generator: str, evaluator: str, processed: str,
                 run: str, cache_dir: str, metrics: str, summary: str, samples: str, nearest: str,
                 classes: str, labels: str, scores: str | None = None,
                 runtime: RuntimeConfig = RuntimeConfig()) -> dict[str, Any]:
    """Score GENERATOR's samples against PROCESSED with EVALUATOR's features; log them to the training's run.
    METRICS holds every figure; SCORES (the DVC metric) the headline scores with their spreads and floors."""
    t_start = time.perf_counter()
    tracker = Run.attach(read_stage_json(run, "run file", "train"), tracking)  # first: a dead server costs no work
    ev = evaluate_generator(cfg, generator, evaluator, processed, cache_dir, samples, nearest, classes, labels,
                            started=t_start, device=runtime.device)
    write_json(metrics, ev.report)
    if scores:
        write_json(scores, ev.headline)
    write_json(summary, ev.summary)
    log_evaluation(tracker, ev, [metrics, summary, samples, nearest, classes, labels, *([scores] if scores else [])])
    if tracker.active:
        print(f"logged to MLflow run {tracker.run_id} in {tracker.uri}")
    print(ev.describe())
    return ev.report


if __name__ == "__main__":
    main(run_evaluate, name="evaluate", sections={"cfg": "evaluate", "tracking": "tracking", "runtime": "runtime"},
         paths=("generator", "evaluator", "processed", "run", "cache_dir", "metrics", "summary", "samples",
                "nearest", "classes", "labels", "scores"))
