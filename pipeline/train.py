"""train: processed splits -> generator, checkpoint, losses, sample grid, one MLflow run.

    python -m pipeline.train --processed data/processed --generator models/generator.pt \
        --checkpoint models/checkpoint.pt --run models/run.json \
        --metrics reports/train/metrics.json --losses reports/train/losses.csv \
        --samples reports/train/samples.png

Resume: the checkpoint (``persist: true`` in dvc.yaml, so DVC leaves it in place) carries a
fingerprint of the params, data and code; a checkpoint of this very run is gone on from, in the
same MLflow run (aigc/training/checkpoint.py says when, aigc/tracking_train.py which run).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from aigc import distributed, machine
from aigc.config import ModelConfig, PrivacyConfig, RuntimeConfig, TrackingConfig, TrainConfig, VAEConfig
from aigc.data.preprocess import DATASET_JSON, dataset_sha256, load_info, load_split
from aigc.images import save_png
from aigc.io import params_sha256, save_torch, write_json
from aigc.models import conditioning, generator_payload, net_config
from aigc.tracking import Run, TrackingUnavailable, git_commit
from aigc.tracking_train import Recorder, log_training, open_train_run, run_name
from aigc.training import GANRecipe, Hooks, TrainData, VAERecipe, fingerprint, resumable
from aigc.training import train as train_loop  # the stage's own `train` is its params section
from aigc.training.checkpoint import run_params
from pipeline._stage import main

# The final values reports/train/metrics.json (a DVC metric: `dvc exp show` columns) carries; the
# loop's other statistics (D's outputs, the EMA's beta) stay in losses.csv, run.json and MLflow.
FINAL_LOSSES = ("d_loss", "g_loss", "loss", "neg_elbo")


def run_train(seed: int, model: ModelConfig, train: TrainConfig, tracking: TrackingConfig, processed: str,
              generator: str, checkpoint: str, run: str, metrics: str, losses: str, samples: str,
              vae: VAEConfig = VAEConfig(), privacy: PrivacyConfig = PrivacyConfig(),
              runtime: RuntimeConfig = RuntimeConfig()) -> dict[str, Any]:
    """Train the model (GAN: G and D; vae: encoder and decoder) on PROCESSED's train split and
    record the run in MLflow; a killed run goes on from its checkpoint. With privacy.dp.enabled D is
    trained with DP-SGD (Opacus)."""
    info, split = load_info(processed), load_split(processed, "train")
    conditional, why = conditioning(model, info)  # model.conditional: true on unlabelled data stops here
    print(why, flush=True)  # "auto" says what it chose and why
    net = net_config(model, info, conditional)
    recipe = VAERecipe(vae, net) if model.family == "vae" else GANRecipe(train, net, privacy.dp)
    data = TrainData(torch.from_numpy(split["images"]), net.class_indices(split["labels"]) if net.conditional else None)
    dataset_sha, commit, params = dataset_sha256(processed), git_commit(), run_params(seed, model, train, vae, privacy.dp)
    kind, params_hash = f"{'c' if net.conditional else ''}{model.family}", params_sha256(params)  # dcgan, cdcgan, ...
    machine_tags = machine.tags()  # the CPU and the kernels in force (an ISA cap exported by the user shows here)
    tags = {"aigc.stage": "train", "aigc.dataset_sha256": dataset_sha, "aigc.family": model.family,
            "aigc.conditional": str(net.conditional).lower(), "aigc.params_sha256": params_hash,
            "aigc.dp": str(privacy.dp.enabled).lower()} | machine_tags | ({"mlflow.source.git.commit": commit} if commit else {})
    if "aigc.machine.isa_caveat" in tags:
        print(f"kernels capped by the environment: {tags['aigc.machine.isa_caveat']} ({tags['aigc.machine.kernels']})")
    fp = fingerprint(params, dataset_sha)
    resume, previous, said = resumable(checkpoint, fp, train.epochs)  # only a checkpoint of this very run
    print(said) if said else None
    is_main = distributed.from_env().is_main  # under torchrun only rank 0 tracks and writes
    tracker = open_train_run(tracking, previous, resume, run_name(kind, model, train, vae, params_hash), params,
                             tags, machine_tags) if is_main else Run.disabled()
    if tracker.active:
        print(f"MLflow run {tracker.run_id} in {tracker.uri} (experiment {tracking.experiment!r})")
    rec = Recorder(tracker, resume["recorder"] if resume is not None else None)
    if resume is not None:
        rec.resend()  # what the server missed before the kill (or during an outage)

    def with_stage(state: dict[str, Any]) -> dict[str, Any]:
        return state | {"fingerprint": fp, "run": tracker.info(), "recorder": rec.state()}

    def save_checkpoint(state: dict[str, Any]) -> None:
        save_torch(with_stage(state), checkpoint)
        print(f"checkpoint: epoch {state['epoch']}/{train.epochs}, step {state['step']} -> {checkpoint}")

    ok = False
    try:
        result = train_loop(train, recipe, data, Hooks(rec.on_steps, rec.on_epoch, save_checkpoint), seed=seed,
                       runtime=runtime, resume=resume)
        if not is_main:
            ok = True
            return {"rank": distributed.from_env().rank, "steps": result.steps}
        # save_torch: atomic, and a full disk is one clear error with the previous file kept.
        save_torch(generator_payload(result.generator, result.net), generator)  # a GAN's EMA G when on
        save_torch(with_stage(result.state), checkpoint)
        rec.write_losses(losses)
        save_png(rec.grid, samples)
        started, summary, dp = time.perf_counter(), result.summary(rec.tracking_seconds), result.recipe.privacy()
        if dp["dp"]:  # the guarantee beside the scores: dvc exp show lists epsilon next to fid
            summary |= {k: dp[k] for k in ("epsilon", "delta", "noise_multiplier")}
        write_json(metrics, {k: summary[k] for k in ("images_per_s", "seconds", "epochs", "epsilon", "delta")
                             if k in summary} | {f"final_{k}": summary[f"final_{k}"] for k in FINAL_LOSSES
                                                 if f"final_{k}" in summary})
        write_json(run, tracker.info() | {"git_commit": commit, "dataset_sha256": dataset_sha, "params": params,
                                          "params_sha256": params_hash, "run_name": run_name(kind, model, train, vae,
                                                                                             params_hash),
                                          "net": result.net.to_dict(), "device": result.device, "training": summary,
                                          "privacy": dp})
        log_training(tracker, result, summary, dp, {"model": [generator], "checkpoint": [checkpoint], "reports": [
            losses, samples, metrics, Path(processed) / DATASET_JSON]}, started)
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
    main(run_train, name="train", sections=("seed", "model", "train", "runtime", "vae", "privacy", "tracking"),
         paths=("processed", "generator", "checkpoint", "run", "metrics", "losses", "samples"))
