"""train: processed splits -> generator, checkpoint, losses, sample grid, one MLflow run.

    python -m pipeline.train --processed data/processed --generator models/generator.pt \
        --checkpoint models/checkpoint.pt --run models/run.json \
        --metrics reports/train/metrics.json --losses reports/train/losses.csv \
        --samples reports/train/samples.png

Resume: the checkpoint (``persist: true`` in dvc.yaml, so DVC leaves it in place) carries a
fingerprint of the params, data and code; a checkpoint of this very run is gone on from, in the
same MLflow run (aigc/training/checkpoint.py says when, aigc/tracking/train_run.py which run).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aigc import distributed
from aigc.config import ModelConfig, PixelCNNConfig, PrivacyConfig, RuntimeConfig, TrackingConfig, TrainConfig, \
    VAEConfig
from aigc.data.preprocess import DATASET_JSON, dataset_sha256, load_info, load_split
from aigc.images import save_png
from aigc.io import save_torch, write_json
from aigc.models import generator_payload
from aigc.tracking import Run, TrackingUnavailable
from aigc.tracking.train_run import Recorder, TrainIdentity, log_training, open_train_run
from aigc.training import Hooks, family_train, fingerprint, recipe_for, resumable, split_data
from aigc.training import train as train_loop  # the stage's own `train` is its params section
from pipeline._stage import main


def run_train(seed: int, model: ModelConfig, train: TrainConfig, tracking: TrackingConfig, processed: str,
              generator: str, checkpoint: str, run: str, metrics: str, losses: str, samples: str,
              vae: VAEConfig = VAEConfig(), privacy: PrivacyConfig = PrivacyConfig(),
              runtime: RuntimeConfig = RuntimeConfig(), pixelcnn: PixelCNNConfig = PixelCNNConfig()) -> dict[str, Any]:
    """Train the model (GAN: G and D; vae: encoder and decoder; pixelcnn: the one net) on PROCESSED's train split and
    record the run in MLflow; a killed run goes on from its checkpoint. With privacy.dp.enabled D is
    trained with DP-SGD (Opacus)."""
    recipe, data, why = recipe_for(model, train, vae, privacy.dp, load_info(processed), load_split(processed, "train"),
                                   pixelcnn)
    print(why, flush=True)  # model.conditional = auto says what it chose and why
    if train.preset_note():
        print(train.preset_note(), flush=True)
    # The section as the family trains (pixelcnn: its own epochs); the run's params stay params.yaml's.
    run_cfg = family_train(model, train, pixelcnn)
    ident = TrainIdentity.of(seed, model, train, vae, privacy.dp, recipe.net, dataset_sha256(processed), pixelcnn)
    if "aigc.machine.isa_caveat" in ident.tags:
        print(f"kernels capped by the environment: {ident.tags['aigc.machine.isa_caveat']} "
              f"({ident.tags['aigc.machine.kernels']})")
    fp = fingerprint(ident.params, ident.dataset_sha)
    resume, previous, said = resumable(checkpoint, fp, run_cfg.epochs)  # only a checkpoint of this very run
    if said:
        print(said)
    is_main = distributed.from_env().is_main  # under torchrun only rank 0 tracks and writes
    tracker = open_train_run(tracking, previous, resume, ident) if is_main else Run.disabled()
    if tracker.active:
        print(f"MLflow run {tracker.run_id} in {tracker.uri} (experiment {tracking.experiment!r})")
    rec = Recorder(tracker, resume["recorder"] if resume is not None else None)
    if resume is not None:
        rec.resend()  # what the server missed before the kill (or during an outage)

    def with_stage(state: dict[str, Any]) -> dict[str, Any]:
        return state | {"fingerprint": fp, "run": tracker.info(), "recorder": rec.state()}

    def save_checkpoint(state: dict[str, Any]) -> None:
        save_torch(with_stage(state), checkpoint)  # atomic; a full disk is one clear error, the old file kept
        print(f"checkpoint: epoch {state['epoch']}/{run_cfg.epochs}, step {state['step']} -> {checkpoint}")

    ok = False
    try:
        result = train_loop(run_cfg, recipe, data, Hooks(rec.on_steps, rec.on_epoch, save_checkpoint), seed=seed,
                            runtime=runtime, resume=resume)
        if is_main:
            save_torch(generator_payload(result.generator, result.net), generator)  # a GAN's EMA G when on
            save_torch(with_stage(result.state), checkpoint)
            rec.write_losses(losses)
            save_png(rec.grid, samples)
            started, summary, dp = time.perf_counter(), result.summary(rec.tracking_seconds), result.recipe.privacy()
            summary |= {k: dp[k] for k in ("epsilon", "delta", "noise_multiplier") if dp["dp"]}  # beside the scores
            nll = result.recipe.likelihood(split_data(load_split(processed, "test"), recipe))  # the held-out split's
            summary |= {"test_bits_per_dim": nll["bits_per_dim"], "likelihood": nll["likelihood"]}
            headline, record = ident.reports(tracker, result, summary, dp)
            write_json(metrics, headline)
            write_json(run, record)
            log_training(tracker, result, summary, dp, {"model": [generator], "checkpoint": [checkpoint], "reports": [
                losses, samples, metrics, Path(processed) / DATASET_JSON]}, started)
        ok = True
    finally:
        undelivered = tracker.end(ok)  # waits for the outbox (at most tracking.retry_seconds of outage)
    if undelivered:
        raise TrackingUnavailable(f"{undelivered}. Training finished and every output is written; when the server is "
                                  f"back, run `dvc repro` (or this command) again: the stage goes on from {checkpoint} "
                                  "with nothing left to train and uploads the rest")
    if not is_main:
        return {"rank": distributed.from_env().rank, "steps": result.steps}
    print(f"trained {ident.kind}: {result.steps} steps in {result.seconds:.0f} s ({result.images_per_s:.0f} img/s); "
          "final " + ", ".join(f"{k} {v:.3f}" for k, v in result.last.items()))
    return summary


if __name__ == "__main__":
    main(run_train, name="train", sections=("seed", "model", "train", "runtime", "vae", "pixelcnn", "privacy",
                                                "tracking"),
         paths=("processed", "generator", "checkpoint", "run", "metrics", "losses", "samples"))
