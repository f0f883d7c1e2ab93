"""report: one run's outputs -> reports/run.html, the page that tells its story, also logged to the
training's MLflow run (with the registry's decision and the run file, so ``aigc report RUN_ID``
rebuilds the same page from MLflow alone).

    python -m pipeline.report --run models/run.json --train-metrics reports/train/metrics.json \
        --losses reports/train/losses.csv --samples reports/train/samples.png \
        --metrics reports/metrics.json --scores reports/scores.json --nearest reports/eval/nearest.png \
        --registry reports/registry.json --data-gate reports/data_quality/summary.json --out reports/run.html

Its own stage after register, not part of register: the page is presentation, and a change of
its template must not re-run the registry's decision (which re-scores the champion and may move
the alias); DVC rebuilds the page alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aigc.config import TrackingConfig
from aigc.io import atomic_path
from aigc.run_report import render_page, workspace_files
from aigc.tracking import Run
from pipeline._stage import main, read_stage_json


def report(tracking: TrackingConfig, run: str, train_metrics: str, losses: str, samples: str, metrics: str,
           scores: str, nearest: str, registry: str, data_gate: str, out: str) -> dict[str, Any]:
    """Write OUT, the one-page report of the run RUN names, from the stages' outputs; log it to that run."""
    info = read_stage_json(run, "run file", "train")
    page = render_page(workspace_files(run, train_metrics, losses, samples, metrics, scores, nearest, registry,
                                       data_gate))
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    tracker = Run.attach(info, tracking)
    for path in (out, registry, run):
        if Path(path).is_file():
            tracker.log_artifact(path, "report")
    where = f"; logged to MLflow run {tracker.run_id}" if tracker.active else ""
    print(f"wrote {out} ({len(page) // 1024} KiB){where}")
    return {"out": out, "run_id": tracker.run_id}


if __name__ == "__main__":
    main(report, sections=("tracking",),
         paths=("run", "train_metrics", "losses", "samples", "metrics", "scores", "nearest", "registry", "data_gate",
                "out"))
