"""train: processed splits -> generator, checkpoint, losses, sample grid, one MLflow run.

    python -m pipeline.train --processed data/processed --generator models/generator.pt \
        --checkpoint models/checkpoint.pt --run models/run.json \
        --metrics reports/train/metrics.json --losses reports/train/losses.csv \
        --samples reports/train/samples.png

Resume: the checkpoint (a ``persist: true`` output in dvc.yaml, so DVC leaves it in place when it
reruns the stage) is written before the first epoch, every ``train.checkpoint_every`` epochs and
at the end. It carries a fingerprint of what the result depends on -- the params the stage depends
on, the data's hash and the code of the project's modules -- and the MLflow run.
A stage that finds a checkpoint with the same fingerprint goes on from it, in the same MLflow run;
one with another fingerprint starts fresh, says why, and marks the old run KILLED if it was left
RUNNING. A finished checkpoint with the same fingerprint means nothing is left to train: the stage
rewrites its outputs and uploads what the tracking server missed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc import distributed, machine
from aigc.config import ModelConfig, PrivacyConfig, TrackingConfig, TrainConfig, VAEConfig, flatten
from aigc.data.preprocess import DATASET_JSON, dataset_sha256, load_info, load_split
from aigc.images import save_png
from aigc.io import atomic_path, file_sha256, params_sha256, save_torch, write_json
from aigc.models import conditioning, generator_payload, net_config
from aigc.tracking import Run, TrackingUnavailable, git_commit
from aigc.training import CHECKPOINT_FORMAT, EpochEnd, StepWindow, checkpoint_payload, train_gan
from aigc.vae import train_vae, vae_checkpoint_payload
from pipeline._stage import main

# Knobs that change how fast or how often, not what is trained: a resume across a change of them
# gives the same networks (threads and the memory format change the last bits of float sums).
RESUME_NEUTRAL = {"threads", "compile", "channels_last", "log_every", "checkpoint_every"}


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
            writer = csv.DictWriter(f, fieldnames=["step", "epoch", *self.keys], restval="")
            writer.writeheader()
            writer.writerows({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in self.rows)


# The final values reports/train/metrics.json (a DVC metric: `dvc exp show` columns) carries; the
# loop's other statistics (D's outputs, the EMA's beta) stay in losses.csv, run.json and MLflow.
FINAL_LOSSES = ("d_loss", "g_loss", "loss", "neg_elbo")


def run_name(kind: str, model: ModelConfig, train: TrainConfig, vae: VAEConfig, params_hash: str) -> str:
    """What tells this run from its neighbours in the MLflow run list: the family, its loss (GANs:
    train.loss; VAE: the likelihood), the augmentation, and the first characters of the params hash
    (equal names, equal params)."""
    if model.family == "vae":
        parts = [kind, vae.likelihood, f"beta{vae.beta:g}"]
    else:
        parts = [kind, train.loss, "+".join(train.augment) if train.augment else "noaug"]
    return "-".join([*parts, params_hash[:7]])


def code_files() -> dict[str, str]:
    """sha256 of every module of the project (aigc/, pipeline/): the code a result may depend on.
    All of them, not only those this process imported, so the fingerprint does not depend on what
    else happened to be loaded; a change anywhere in them means starting fresh (the message names
    the files)."""
    root = Path(__file__).resolve().parents[1]
    return {p.relative_to(root).as_posix(): file_sha256(p)
            for package in ("aigc", "pipeline") for p in sorted((root / package).rglob("*.py"))}


def fingerprint(seed: int, model: ModelConfig, train_cfg: TrainConfig, vae: VAEConfig, dataset_sha: str,
                dp: Any = None) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed: params (privacy.dp's included), data, code."""
    parts = {"params": {"seed": seed} | flatten(model, "model.")
             | {k: v for k, v in flatten(train_cfg, "train.").items() if k.removeprefix("train.") not in RESUME_NEUTRAL}
             | (flatten(vae, "vae.") if model.family == "vae" else {})
             | (flatten(dp, "privacy.dp.") if dp is not None and dp.enabled else {}),
             "dataset_sha256": dataset_sha, "code": code_files()}
    parts["params"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in parts["params"].items()}
    return {"sha256": hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest(), **parts}


def why_not(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two fingerprints, in a few words."""
    reasons = []
    params = [f"{k} {old['params'].get(k)!r} -> {new['params'].get(k)!r}"
              for k in sorted(set(old["params"]) | set(new["params"])) if old["params"].get(k) != new["params"].get(k)]
    if params:
        reasons.append("params changed (" + ", ".join(params[:3]) + (", ..." if len(params) > 3 else "") + ")")
    if old["dataset_sha256"] != new["dataset_sha256"]:
        reasons.append("the data changed")
    code = sorted(k for k in set(old["code"]) | set(new["code"]) if old["code"].get(k) != new["code"].get(k))
    if code:
        reasons.append("the code changed (" + ", ".join(code[:3]) + (", ..." if len(code) > 3 else "") + ")")
    return "; ".join(reasons) or "it differs"


def read_checkpoint(path: str) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint a previous run of the stage left, or None and why not."""
    if not Path(path).exists():
        return None, "no checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file just means: start from the beginning
        return None, f"{path} is unreadable ({type(exc).__name__})"
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "fingerprint" not in state:
        return None, f"{path} is not a resumable checkpoint of this version"
    return state, ""


def train(seed: int, model: ModelConfig, train: TrainConfig, tracking: TrackingConfig, processed: str,
          generator: str, checkpoint: str, run: str, metrics: str, losses: str, samples: str,
          vae: VAEConfig = VAEConfig(), privacy: PrivacyConfig = PrivacyConfig()) -> dict[str, Any]:
    """Train the model (GAN: G and D; vae: encoder and decoder) on PROCESSED's train split and
    record the run in MLflow; a killed run goes on from its checkpoint. With privacy.dp.enabled D is
    trained with DP-SGD (Opacus)."""
    dp = privacy.dp
    info = load_info(processed)
    split = load_split(processed, "train")
    conditional, why = conditioning(model, info)  # model.conditional: true on unlabelled data stops here
    print(why, flush=True)  # "auto" says what it chose and why
    net = net_config(model, info, conditional)
    labels = net.class_indices(split["labels"]) if net.conditional else None
    dataset_sha = dataset_sha256(processed)  # the split arrays, not the summary in dataset.json
    commit = git_commit()
    params = {"seed": seed} | flatten(model, "model.") | flatten(train, "train.")
    if model.family == "vae":
        params |= flatten(vae, "vae.")
    if dp.enabled:
        params |= flatten(dp, "privacy.dp.")
    kind = f"{'c' if net.conditional else ''}{model.family}"  # dcgan, cdcgan, vae, cvae
    params_hash = params_sha256(params)
    tags = {"aigc.stage": "train", "aigc.dataset_sha256": dataset_sha, "aigc.family": model.family,
            "aigc.conditional": str(net.conditional).lower(), "aigc.params_sha256": params_hash,
            "aigc.dp": str(dp.enabled).lower()}
    # The CPU and the kernels in force (an ISA cap exported by the user, e.g. ATEN_CPU_CAPABILITY=avx2, shows here).
    machine_tags = machine.tags()
    tags |= machine_tags
    if "aigc.machine.isa_caveat" in tags:
        print(f"kernels capped by the environment: {tags['aigc.machine.isa_caveat']} ({tags['aigc.machine.kernels']})")
    if commit:
        tags["mlflow.source.git.commit"] = commit
    name = run_name(kind, model, train, vae, params_hash)
    ddp = distributed.from_env()  # under torchrun only rank 0 tracks and writes (aigc/distributed.py)

    # Resume when the last checkpoint is of this very run (same params, data and code).
    fp = fingerprint(seed, model, train, vae, dataset_sha, dp)
    previous, unreadable = read_checkpoint(checkpoint)
    resume = previous if previous is not None and previous["fingerprint"]["sha256"] == fp["sha256"] else None
    if resume is not None:
        left = "nothing left to train" if resume["complete"] else f"{train.epochs - resume['epoch']} epoch(s) to go"
        print(f"resuming from {checkpoint}: epoch {resume['epoch']}/{train.epochs}, step {resume['step']} ({left})")
    elif previous is not None:
        print(f"starting fresh: {checkpoint} is of another run ({why_not(previous['fingerprint'], fp)})")
    elif unreadable != "no checkpoint":
        print(f"starting fresh: {unreadable}")

    tracker = Run.disabled()
    if ddp.is_main:
        old_run = (previous or {}).get("run") or {}
        if resume is not None and old_run.get("run_id"):
            reopened = Run.reopen(old_run, tracking)
            if reopened is not None:
                tracker = reopened
                tracker.set_tags({"aigc.resumed_from_epoch": resume["epoch"]} | machine_tags)  # this process's kernels
        if not tracker.active:
            tracker = Run.start(tracking, run_name=name, params=params, tags=tags)
            # The interrupted run this one replaces (not a finished one whose checkpoint is merely older).
            if old_run.get("run_id") and Run.mark_killed(old_run, tracking):
                print(f"MLflow run {old_run['run_id']} of the interrupted training is marked KILLED")
                tracker.set_tags({"aigc.previous_run": old_run["run_id"]})
        tracker.buffer(tracking.retry_seconds)
    if tracker.active:
        print(f"MLflow run {tracker.run_id} in {tracker.uri} (experiment {tracking.experiment!r})")
    rec = Recorder(tracker, resume["recorder"] if resume is not None else None)
    if resume is not None:
        rec.resend()  # what the server missed before the kill (or during an outage)

    def stage_state(state: dict[str, Any]) -> dict[str, Any]:
        return state | {"fingerprint": fp, "run": tracker.info(), "recorder": rec.state()}

    def save_checkpoint(state: dict[str, Any]) -> None:
        save_torch(stage_state(state), checkpoint)
        print(f"checkpoint: epoch {state['epoch']}/{train.epochs}, step {state['step']} -> {checkpoint}")

    ok = False
    try:
        images = torch.from_numpy(split["images"])
        if model.family == "vae":
            result = train_vae(train, vae, net, images, seed, on_steps=rec.on_steps, on_epoch=rec.on_epoch,
                               labels=labels, on_checkpoint=save_checkpoint, resume=resume)
            state, G_saved = vae_checkpoint_payload(result), result.G
        else:
            result = train_gan(train, net, images, seed, on_steps=rec.on_steps, on_epoch=rec.on_epoch,
                               labels=labels, on_checkpoint=save_checkpoint, resume=resume, dp=dp)
            net = result.net  # a private D is built without spectral norm (aigc/privacy/dp.py)
            # The EMA generator when train.ema_kimg > 0: what is sampled, evaluated, registered, served.
            state, G_saved = checkpoint_payload(result), result.generator
        if not ddp.is_main:
            ok = True
            return {"rank": ddp.rank, "steps": result.steps}

        # save_torch: atomic, and a full disk is one clear error with the previous file kept.
        save_torch(generator_payload(G_saved, net), generator)
        save_torch(stage_state(state), checkpoint)
        rec.write_losses(losses)
        save_png(rec.grid, samples)
        summary = {
            "images_per_s": round(result.images_per_s, 1),
            "seconds": round(result.seconds, 1),
            "steps": result.steps,
            "epochs": result.epochs,
            "tracking_seconds": round(rec.tracking_seconds, 2),
            "threads": result.threads,
            "channels_last": getattr(result, "channels_last", False),
            **{f"final_{k}": round(v, 4) for k, v in result.last.items() if k != "epsilon"},
        }
        privacy_summary = result.dp.summary() if getattr(result, "dp", None) is not None else {"dp": False}
        if privacy_summary["dp"]:  # the guarantee beside the scores: dvc exp show lists epsilon next to fid
            summary |= {"epsilon": privacy_summary["epsilon"], "delta": privacy_summary["delta"],
                        "noise_multiplier": privacy_summary["noise_multiplier"]}
        headline = {k: summary[k] for k in ("images_per_s", "seconds", "epochs")} | {
            f"final_{k}": summary[f"final_{k}"] for k in FINAL_LOSSES if f"final_{k}" in summary} | {
            k: summary[k] for k in ("epsilon", "delta") if k in summary}  # differential privacy's guarantee
        write_json(metrics, headline)
        write_json(run, tracker.info() | {"git_commit": commit, "dataset_sha256": dataset_sha, "params": params,
                                          "params_sha256": params_hash, "run_name": name, "net": net.to_dict(),
                                          "device": result.device, "training": summary, "privacy": privacy_summary})

        t = time.perf_counter()
        found = getattr(result, "probe", None)  # train.channels_last / threads = auto: what the probe measured
        if found is not None:
            tracker.set_tags({"aigc.speed_probe": found.describe()[:5000]})
            tracker.log_metrics({f"perf/probe_{k.replace('/', '_')}_img_s": v for k, v in found.speeds.items()})
        tracker.log_metrics({"perf/images_per_s": summary["images_per_s"], "perf/train_seconds": summary["seconds"]},
                            step=result.steps)
        tracker.set_tags({"aigc.epochs": summary["epochs"], "aigc.steps": summary["steps"],
                          "aigc.channels_last": str(summary["channels_last"]).lower(), "aigc.threads": summary["threads"]})
        if privacy_summary["dp"]:  # epsilon itself is logged once per epoch by the loop
            tracker.set_tags({"aigc.dp.epsilon": str(privacy_summary["epsilon"]),
                              "aigc.dp.delta": str(privacy_summary["delta"])})
        tracker.log_artifact(generator, "model")
        tracker.log_artifact(checkpoint, "checkpoint")
        for path in (losses, samples, metrics, Path(processed) / DATASET_JSON):
            tracker.log_artifact(path, "reports")
        tracker.log_metrics({"perf/tracking_seconds": rec.tracking_seconds + time.perf_counter() - t})
        ok = True
    finally:
        undelivered = tracker.end(ok)  # waits for the outbox (at most tracking.retry_seconds of outage)
    if undelivered:
        raise TrackingUnavailable(
            f"{undelivered}. Training finished and every output is written; when the server is back, run "
            f"`dvc repro` (or this command) again: the stage goes on from {checkpoint} with nothing left to "
            "train and uploads the rest")
    print(f"trained {kind}: {result.steps} steps in {result.seconds:.0f} s ({result.images_per_s:.0f} img/s); final "
          + ", ".join(f"{k} {v:.3f}" for k, v in result.last.items()))
    return summary


if __name__ == "__main__":
    main(train, sections=("seed", "model", "train", "vae", "tracking", "privacy"),
         paths=("processed", "generator", "checkpoint", "run", "metrics", "losses", "samples"))
