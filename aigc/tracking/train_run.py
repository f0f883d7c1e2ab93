"""The train stage's MLflow side: the recorder of the loop's scalars and grids, the run it records
into (started, or reopened when training resumes), and what is logged once training is done.

The training loop knows nothing of this: it reports windows and grids to plain hooks
(aigc/training/loop.py), and :class:`Recorder` is those hooks.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc import machine
from aigc.config import DPConfig, ModelConfig, PixelCNNConfig, TrackingConfig, TrainConfig, VAEConfig
from aigc.io import params_sha256
from aigc.io import atomic_path, write_csv_rows
from aigc.models import NetConfig
from aigc.tracking import Run, git_commit
from aigc.training import EpochEnd, StepWindow, TrainResult
from aigc.training.checkpoint import run_params

UNGROUPED = {"epsilon"}  # the privacy guarantee, not a training curve


class Recorder:
    """Collects the per-step scalars for the DVC plot file and forwards them to MLflow in batches.

    It takes whatever names the loop and the losses reported (aigc/stats.py): a new penalty or
    statistic appears in losses.csv and MLflow without a change here. In MLflow they are grouped
    as ``train/<name>`` (one chart section of the run page) and the throughput as ``perf/images_per_s``.
    Its state (every row, the throughput per window, each epoch's grid) goes into the checkpoint, so a
    resumed run writes the whole curve and can send MLflow whatever it missed.
    """

    def __init__(self, run: Run, state: dict[str, Any] | None = None) -> None:
        self.run = run
        self.rows: list[dict[str, float]] = []
        self.keys: dict[str, None] = {}  # every reported name, in order of first appearance
        self.speed: list[tuple[int, float]] = []  # (last step of a window, images per second)
        self.grids: dict[int, np.ndarray] = {}  # epoch -> sample grid
        self.tracking_seconds = 0.0  # time spent in MLflow calls while training (the overhead)
        # A test hook that only waits (seconds per window), so a test can stop the process at a chosen step.
        self.pause = float(os.environ.get("AIGC_TEST_WINDOW_PAUSE", "0") or 0)
        if state:
            self.rows = [dict(r) for r in state["rows"]]
            self.keys = dict.fromkeys(state["keys"])
            self.speed = [(int(s), float(v)) for s, v in state["speed"]]
            self.grids = {int(e): np.frombuffer(zlib.decompress(g["data"].numpy().tobytes()), np.uint8)
                          .reshape(g["shape"]) for e, g in state["grids"].items()}

    @property
    def grid(self) -> np.ndarray | None:
        return self.grids[max(self.grids)] if self.grids else None

    def state(self) -> dict[str, Any]:
        grids = {e: {"shape": list(g.shape), "data": torch.frombuffer(bytearray(zlib.compress(g.tobytes())), dtype=torch.uint8)}
                 for e, g in self.grids.items()}
        return {"rows": [dict(r) for r in self.rows], "keys": list(self.keys), "speed": list(self.speed), "grids": grids}

    @staticmethod
    def mlflow_rows(rows: list[dict[str, Any]], speed: list[tuple[int, float]]) -> list[tuple[str, float, int]]:
        """(key, value, step) for MLflow: the loop's scalars under ``train/``, the throughput under ``perf/``;
        a DP run's spent ``epsilon`` (once per epoch) keeps its own top-level name, beside the scores."""
        return ([(k if k in UNGROUPED else f"train/{k}", v, r["step"])
                 for r in rows for k, v in r.items() if k not in ("step", "epoch")]
                + [("perf/images_per_s", v, s) for s, v in speed])

    def resend(self) -> None:
        """Send everything recorded so far; a re-opened run keeps only what MLflow lacks."""
        self.run.log_metric_rows(self.mlflow_rows(self.rows, self.speed))
        for epoch, grid in sorted(self.grids.items()):
            self.run.log_image(grid, key="samples", step=epoch)

    def on_steps(self, w: StepWindow) -> None:
        t = time.perf_counter()
        new = [{"step": step, "epoch": w.epoch, **row} for step, row in zip(w.steps, w.rows)]
        for row in w.rows:
            self.keys.update(dict.fromkeys(row))
        self.rows.extend(new)
        self.speed.append((w.steps[-1], w.images_per_s))
        metrics = self.mlflow_rows(new, self.speed[-1:])
        self.run.log_metric_rows(metrics)
        self.tracking_seconds += time.perf_counter() - t
        if self.pause:
            time.sleep(self.pause)

    def on_epoch(self, end: EpochEnd) -> None:
        t = time.perf_counter()
        self.grids[end.epoch] = end.grid
        self.run.log_image(end.grid, key="samples", step=end.epoch)
        self.tracking_seconds += time.perf_counter() - t

    def write_losses(self, path: str) -> None:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            # A name reported only on some steps (R1 every r1_interval) leaves the others blank.
            write_csv_rows(f, ["step", "epoch", *self.keys],
                           ({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows))



def run_name(kind: str, model: ModelConfig, train: TrainConfig, vae: VAEConfig, params_hash: str,
             pixelcnn: PixelCNNConfig | None = None) -> str:
    """What tells this run from its neighbours in the MLflow run list: the family, its loss (GANs:
    train.loss; VAE: the likelihood; PixelCNN: its layers and width), the augmentation, and the
    first characters of the params hash (equal names, equal params)."""
    if model.family == "pixelcnn":
        pixelcnn = pixelcnn or PixelCNNConfig()
        parts = [kind, f"L{pixelcnn.layers}", f"w{pixelcnn.width}"]
    elif model.family == "vae":
        parts = [kind, vae.likelihood, f"beta{vae.beta:g}"]
    else:
        parts = [kind, train.loss, "+".join(train.augment) if train.augment else "noaug"]
    return "-".join([*parts, params_hash[:7]])


# The final values reports/train/metrics.json (a DVC metric: `dvc exp show` columns) carries; the
# loop's other statistics (D's outputs, the EMA's beta) stay in losses.csv, run.json and MLflow.
FINAL_LOSSES = ("d_loss", "g_loss", "loss", "neg_elbo", "bits_per_dim")


@dataclass
class TrainIdentity:
    """What names a training run: its params (and their hash), the data, the commit, the MLflow run
    name and tags -- shared by the run, its checkpoint's fingerprint and run.json."""

    params: dict[str, Any]
    params_hash: str
    dataset_sha: str
    commit: str | None
    kind: str  # dcgan, cdcgan, mlp, vae, cvae, pixelcnn, cpixelcnn
    name: str
    tags: dict[str, str]
    machine_tags: dict[str, str]  # the CPU and the kernels in force (an ISA cap exported by the user shows here)

    @classmethod
    def of(cls, seed: int, model: ModelConfig, train: TrainConfig, vae: VAEConfig, dp: DPConfig, net: NetConfig,
           dataset_sha: str, pixelcnn: PixelCNNConfig | None = None) -> "TrainIdentity":
        params, commit = run_params(seed, model, train, vae, dp, pixelcnn), git_commit()
        kind, params_hash, machine_tags = f"{'c' if net.conditional else ''}{model.family}", params_sha256(params), \
            machine.tags()
        tags = {"aigc.stage": "train", "aigc.dataset_sha256": dataset_sha, "aigc.family": model.family,
                "aigc.conditional": str(net.conditional).lower(), "aigc.params_sha256": params_hash,
                "aigc.dp": str(dp.enabled).lower()} | machine_tags | (
                    {"mlflow.source.git.commit": commit} if commit else {})
        return cls(params, params_hash, dataset_sha, commit, kind,
                   run_name(kind, model, train, vae, params_hash, pixelcnn), tags, machine_tags)

    def reports(self, run: Run, result: TrainResult, summary: dict[str, Any], privacy: dict[str, Any]) -> tuple[
            dict[str, Any], dict[str, Any]]:
        """(reports/train/metrics.json, models/run.json): the headline numbers, and the whole record."""
        headline = {k: summary[k] for k in ("images_per_s", "seconds", "epochs", "epsilon", "delta", "test_bits_per_dim")
                    if summary.get(k) is not None} | {
            f"final_{k}": summary[f"final_{k}"] for k in FINAL_LOSSES if f"final_{k}" in summary}
        record = run.info() | {"git_commit": self.commit, "dataset_sha256": self.dataset_sha, "params": self.params,
                               "params_sha256": self.params_hash, "run_name": self.name, "net": result.net.to_dict(),
                               "device": result.device, "training": summary, "privacy": privacy}
        return headline, record


def open_train_run(cfg: TrackingConfig, previous: dict[str, Any] | None, resume: dict[str, Any] | None,
                   ident: TrainIdentity) -> Run:
    """The MLflow run a training records into: the interrupted run itself when resuming its
    checkpoint (and the server still has it), else a new one, which marks the interrupted run it
    replaces KILLED (not a finished one whose checkpoint is merely older)."""
    old_run = (previous or {}).get("run") or {}
    if resume is not None and old_run.get("run_id"):
        reopened = Run.reopen(old_run, cfg)
        if reopened is not None:
            reopened.set_tags({"aigc.resumed_from_epoch": resume["epoch"]} | ident.machine_tags)  # this process's kernels
            reopened.buffer(cfg.retry_seconds)
            return reopened
    run = Run.start(cfg, run_name=ident.name, params=ident.params, tags=ident.tags)
    if old_run.get("run_id") and Run.mark_killed(old_run, cfg):
        print(f"MLflow run {old_run['run_id']} of the interrupted training is marked KILLED")
        run.set_tags({"aigc.previous_run": old_run["run_id"]})
    run.buffer(cfg.retry_seconds)
    return run


def log_training(run: Run, result: TrainResult, summary: dict[str, Any], privacy: dict[str, Any],
                 artifacts: dict[str, list[str | Path]], started: float) -> None:
    """What a finished training adds to its run: the speed probe's answer, throughput, the loop's
    settings as tags, the privacy guarantee, and the output files (``{artifact folder: paths}``)."""
    found = result.probe  # runtime.channels_last / threads = auto: what the probe measured
    if found is not None:
        run.set_tags({"aigc.speed_probe": found.describe()[:5000]})
        run.log_metrics({f"perf/probe_{k.replace('/', '_')}_img_s": v for k, v in found.speeds.items()})
    if summary.get("test_bits_per_dim") is not None:  # the held-out likelihood, beside the scores
        run.log_metrics({"test_bits_per_dim": summary["test_bits_per_dim"]}, step=result.steps)
    run.set_tags({"aigc.likelihood": summary.get("likelihood", "")})
    run.log_metrics({"perf/images_per_s": summary["images_per_s"], "perf/train_seconds": summary["seconds"]},
                    step=result.steps)
    run.set_tags({"aigc.epochs": summary["epochs"], "aigc.steps": summary["steps"],
                  "aigc.channels_last": str(summary["channels_last"]).lower(), "aigc.threads": summary["threads"]})
    if privacy["dp"]:  # epsilon itself is logged once per epoch by the loop
        run.set_tags({"aigc.dp.epsilon": str(privacy["epsilon"]), "aigc.dp.delta": str(privacy["delta"])})
    for folder, paths in artifacts.items():
        for path in paths:
            run.log_artifact(path, folder)
    run.log_metrics({"perf/tracking_seconds": summary["tracking_seconds"] + time.perf_counter() - started})
