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

from aigc import distributed
from aigc.config import ModelConfig, PrivacyConfig, TrackingConfig, TrainConfig, VAEConfig, flatten
from aigc.data.preprocess import DATASET_JSON, dataset_sha256, load_info, load_split
from aigc.images import save_png
from aigc.io import atomic_path, save_torch, file_sha256, write_json
from aigc.models import generator_payload, net_config
from aigc.tracking import Run, git_commit
from aigc.training import EpochEnd, StepWindow, checkpoint_payload, train_gan
from aigc.vae import train_vae, vae_checkpoint_payload
from pipeline._stage import main


class Recorder:
    """Collects the per-step scalars for the DVC plot file and forwards them to MLflow in batches.

    It takes whatever names the loop and the losses reported (aigc/stats.py): a new penalty or
    statistic appears in losses.csv and MLflow without a change here.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.rows: list[dict[str, float]] = []
        self.keys: dict[str, None] = {}  # every reported name, in order of first appearance
        self.grid: np.ndarray | None = None
        self.tracking_seconds = 0.0  # time spent in MLflow calls while training (the overhead)

    def on_steps(self, w: StepWindow) -> None:
        t = time.perf_counter()
        for step, row in zip(w.steps, w.rows):
            self.rows.append({"step": step, "epoch": w.epoch, **row})
            self.keys.update(dict.fromkeys(row))
        metrics = [(k, v, step) for step, row in zip(w.steps, w.rows) for k, v in row.items()]
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
            # A name reported only on some steps (R1 every r1_interval) leaves the others blank.
            writer = csv.DictWriter(f, fieldnames=["step", "epoch", *self.keys], restval="")
            writer.writeheader()
            writer.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows)


def train(seed: int, model: ModelConfig, train: TrainConfig, tracking: TrackingConfig, processed: str,
          generator: str, checkpoint: str, run: str, metrics: str, losses: str, samples: str,
          vae: VAEConfig = VAEConfig(), privacy: PrivacyConfig = PrivacyConfig()) -> dict[str, Any]:
    """Train the model (GAN: G and D; vae: encoder and decoder) on PROCESSED's train split and
    record the run in MLflow. With privacy.dp.enabled D is trained with DP-SGD (Opacus)."""
    dp = privacy.dp
    info = load_info(processed)
    split = load_split(processed, "train")
    net = net_config(model, info)  # a conditional model on unlabelled data stops here
    labels = net.class_indices(split["labels"]) if net.conditional else None
    dataset_sha = dataset_sha256(processed)  # the split arrays, not the summary in dataset.json
    commit = git_commit()
    params = {"seed": seed} | flatten(model, "model.") | flatten(train, "train.")
    if model.family == "vae":
        params |= flatten(vae, "vae.")
    if dp.enabled:
        params |= flatten(dp, "privacy.dp.")
    kind = f"{'c' if net.conditional else ''}{model.family}"  # dcgan, cdcgan, vae, cvae
    tags = {"aigc.stage": "train", "aigc.dataset_sha256": dataset_sha, "aigc.family": model.family,
            "aigc.conditional": str(net.conditional).lower(), "aigc.dp": str(dp.enabled).lower()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    ddp = distributed.from_env()  # under torchrun only rank 0 tracks and writes (aigc/distributed.py)
    tracker = (Run.disabled() if not ddp.is_main else
               Run.start(tracking, run_name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}", params=params, tags=tags))
    if tracker.active:
        print(f"MLflow run {tracker.run_id} in {tracker.uri} (experiment {tracking.experiment!r})")
    rec = Recorder(tracker)
    ok = False
    try:
        images = torch.from_numpy(split["images"])
        if model.family == "vae":
            result = train_vae(train, vae, net, images, seed, on_steps=rec.on_steps, on_epoch=rec.on_epoch,
                               labels=labels)
            state, G_saved = vae_checkpoint_payload(result, train, vae, seed), result.G
        else:
            result = train_gan(train, net, images, seed, on_steps=rec.on_steps, on_epoch=rec.on_epoch,
                               labels=labels, dp=dp)
            net = result.net  # a private D is built without spectral norm (aigc/privacy/dp.py)
            # The EMA generator when train.ema_kimg > 0: what is sampled, evaluated, registered, served.
            state, G_saved = checkpoint_payload(result, train, seed), result.generator
        if not ddp.is_main:
            ok = True
            return {"rank": ddp.rank, "steps": result.steps}

        # save_torch: atomic, and a full disk is one clear error with the previous file kept.
        save_torch(generator_payload(G_saved, net), generator)
        save_torch(state, checkpoint)
        rec.write_losses(losses)
        save_png(rec.grid, samples)
        summary = {
            "images_per_s": round(result.images_per_s, 1),
            "seconds": round(result.seconds, 1),
            "steps": result.steps,
            "epochs": result.epochs,
            "tracking_seconds": round(rec.tracking_seconds, 2),
            "threads": result.threads,
            **{f"final_{k}": round(v, 4) for k, v in result.last.items() if k != "epsilon"},
        }
        privacy_summary = result.dp.summary() if getattr(result, "dp", None) is not None else {"dp": False}
        if privacy_summary["dp"]:  # the guarantee beside the scores: dvc exp show lists epsilon next to fid
            summary |= {"epsilon": privacy_summary["epsilon"], "delta": privacy_summary["delta"],
                        "noise_multiplier": privacy_summary["noise_multiplier"]}
        write_json(metrics, summary)
        write_json(run, tracker.info() | {"git_commit": commit, "dataset_sha256": dataset_sha, "params": params,
                                          "net": net.to_dict(), "device": result.device,
                                          "privacy": privacy_summary})

        t = time.perf_counter()
        # (epsilon is already logged once per epoch by the loop; delta is a tag)
        tracker.log_metrics({k: v for k, v in summary.items() if k not in ("tracking_seconds", "epsilon", "delta")},
                            step=result.steps)
        if privacy_summary["dp"]:
            tracker.set_tags({"aigc.dp.epsilon": str(privacy_summary["epsilon"]),
                              "aigc.dp.delta": str(privacy_summary["delta"])})
        tracker.log_artifact(generator, "model")
        tracker.log_artifact(checkpoint, "checkpoint")
        for path in (losses, samples, metrics, Path(processed) / DATASET_JSON):
            tracker.log_artifact(path, "reports")
        tracker.log_metrics({"tracking_seconds": rec.tracking_seconds + time.perf_counter() - t})
        ok = True
    finally:
        tracker.end(ok)
    print(f"trained {kind}: {result.steps} steps in {result.seconds:.0f} s ({result.images_per_s:.0f} img/s); final "
          + ", ".join(f"{k} {v:.3f}" for k, v in result.last.items()))
    return summary


if __name__ == "__main__":
    main(train, sections=("seed", "model", "train", "vae", "tracking", "privacy"),
         paths=("processed", "generator", "checkpoint", "run", "metrics", "losses", "samples"))
