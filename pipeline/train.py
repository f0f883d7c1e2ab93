"""train: processed splits -> generator, checkpoint, losses, sample grid, one MLflow run.

    python -m pipeline.train --processed data/processed --generator models/generator.pt \
        --checkpoint models/checkpoint.pt --run models/run.json \
        --metrics reports/train/metrics.json --losses reports/train/losses.csv \
        --samples reports/train/samples.png
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.config import ModelConfig, TrackingConfig, TrainConfig, flatten
from aigc.data.preprocess import DATASET_JSON, dataset_sha256, load_info, load_split
from aigc.images import save_png
from aigc.io import atomic_path, write_json
from aigc.models import generator_payload, net_config
from aigc.tracking import Run, git_commit
from aigc.training import STEP_KEYS, EpochEnd, StepWindow, checkpoint_payload, train_gan
from pipeline._stage import main


class Recorder:
    """Collects the per-step scalars for the DVC plot file and forwards them to MLflow in batches."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rows: list[dict[str, float]] = []
        self.grid: np.ndarray | None = None
        self.tracking_seconds = 0.0  # time spent in MLflow calls while training (the overhead)

    def on_steps(self, w: StepWindow) -> None:
        t = time.perf_counter()
        for step, row in zip(w.steps, w.rows):
            self.rows.append({"step": step, "epoch": w.epoch, **row})
        metrics = [(k, row[k], step) for step, row in zip(w.steps, w.rows) for k in STEP_KEYS]
        metrics.append(("images_per_s", w.images_per_s, w.steps[-1]))
        self.run.log_metric_rows(metrics)
        self.tracking_seconds += time.perf_counter() - t

    def on_epoch(self, end: EpochEnd) -> None:
        t = time.perf_counter()
        self.grid = end.grid
        self.run.log_image(end.grid, key="samples", step=end.epoch)
        self.tracking_seconds += time.perf_counter() - t

    def write_losses(self, path: str) -> None:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "epoch", *STEP_KEYS])
            writer.writeheader()
            writer.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows)


def train(seed: int, model: ModelConfig, train: TrainConfig, tracking: TrackingConfig, processed: str,
          generator: str, checkpoint: str, run: str, metrics: str, losses: str, samples: str) -> dict[str, Any]:
    """Train the generator and discriminator on PROCESSED's train split and record the run in MLflow."""
    info = load_info(processed)
    split = load_split(processed, "train")
    net = net_config(model, info)
    dataset_sha = dataset_sha256(processed)  # the split arrays, not the summary in dataset.json
    commit = git_commit()
    params = {"seed": seed} | flatten(model, "model.") | flatten(train, "train.")
    tags = {"aigc.stage": "train", "aigc.dataset_sha256": dataset_sha, "aigc.family": model.family}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tracker = Run.start(tracking, run_name=f"{model.family}-{time.strftime('%Y%m%d-%H%M%S')}", params=params, tags=tags)
    if tracker.active:
        print(f"MLflow run {tracker.run_id} in {tracker.uri} (experiment {tracking.experiment!r})")
    rec = Recorder(tracker)
    ok = False
    try:
        result = train_gan(train, net, torch.from_numpy(split["images"]), seed,
                           on_steps=rec.on_steps, on_epoch=rec.on_epoch)

        with atomic_path(generator) as tmp:
            torch.save(generator_payload(result.G, net), tmp)
        with atomic_path(checkpoint) as tmp:
            torch.save(checkpoint_payload(result, train, seed), tmp)
        rec.write_losses(losses)
        save_png(rec.grid, samples)
        summary = {
            "images_per_s": round(result.images_per_s, 1),
            "seconds": round(result.seconds, 1),
            "steps": result.steps,
            "epochs": result.epochs,
            "tracking_seconds": round(rec.tracking_seconds, 2),
            "threads": result.threads,
            **{f"final_{k}": round(v, 4) for k, v in result.last.items()},
        }
        write_json(metrics, summary)
        write_json(run, tracker.info() | {"git_commit": commit, "dataset_sha256": dataset_sha, "params": params,
                                          "net": net.to_dict(), "device": result.device})

        t = time.perf_counter()
        tracker.log_metrics({k: v for k, v in summary.items() if k != "tracking_seconds"}, step=result.steps)
        tracker.log_artifact(generator, "model")
        tracker.log_artifact(checkpoint, "checkpoint")
        for path in (losses, samples, metrics, Path(processed) / DATASET_JSON):
            tracker.log_artifact(path, "reports")
        tracker.log_metrics({"tracking_seconds": rec.tracking_seconds + time.perf_counter() - t})
        ok = True
    finally:
        tracker.end(ok)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s ({result.images_per_s:.0f} img/s); "
          f"final D loss {result.last.get('d_loss', float('nan')):.3f}, G loss {result.last.get('g_loss', float('nan')):.3f}")
    return summary


if __name__ == "__main__":
    main(train, sections=("seed", "model", "train", "tracking"),
         paths=("processed", "generator", "checkpoint", "run", "metrics", "losses", "samples"))
