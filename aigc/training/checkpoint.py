"""Checkpoints and the resume policy: what a checkpoint holds, and when a stage may go on from one.

The loop (aigc/training/loop.py) writes a resume state before the first epoch, every
``runtime.checkpoint_every`` epochs and at the end: the networks and optimisers (the recipe's), every
random stream (:func:`rng_state`), the loop's counters and the callers' ``extra`` state. The train
stage adds a :func:`fingerprint` of what the result depends on -- the params that change it, the
data's hash and the project's code -- and goes on from a checkpoint only when that fingerprint is
its own (:func:`resumable`); otherwise it starts fresh and says why (:func:`why_not`).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aigc.config import DPConfig, ModelConfig, PixelCNNConfig, TrainConfig, VAEConfig, flatten
from aigc.errors import UserError
from aigc.io import file_sha256
from aigc.models import NetConfig

CHECKPOINT_FORMAT = "aigc.checkpoint/3"
ROOT = Path(__file__).resolve().parents[2]


def rng_state(order: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random stream a run draws from: torch's (CPU, and CUDA when used), the batch-order
    generator, numpy's and Python's global ones -- as tensors and plain values, so the checkpoint
    loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "order": order.get_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], order: torch.Generator, device: torch.device) -> None:
    """Put back what :func:`rng_state` took."""
    torch.set_rng_state(state["torch"])
    order.set_state(state["order"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_resume(state: dict[str, Any], cfg: TrainConfig, family: str, net: NetConfig, seed: int) -> None:
    """A resume state must be of this run: same format, family, network, seed and epochs left to train."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"cannot resume from a checkpoint of format {state.get('format')!r} "
                        f"(this version writes {CHECKPOINT_FORMAT!r}); delete it to train from the start")
    if state.get("family") != family or NetConfig.from_dict(state["net"]) != net or state["seed"] != seed:
        raise UserError("the checkpoint is of another model family, network or seed; delete it to train from the start")
    if state["epoch"] > cfg.epochs:
        raise UserError(f"the checkpoint is at epoch {state['epoch']}, past train.epochs = {cfg.epochs}; "
                        "delete it to train from the start")


def code_files(root: Path = ROOT) -> dict[str, str]:
    """sha256 of every module of the project (aigc/, pipeline/): the code a result may depend on.
    All of them, not only those this process imported, so the fingerprint does not depend on what
    else happened to be loaded; a change anywhere in them means starting fresh (the message names
    the files)."""
    return {p.relative_to(root).as_posix(): file_sha256(p)
            for package in ("aigc", "pipeline") for p in sorted((root / package).rglob("*.py"))}


def run_params(seed: int, model: ModelConfig, train: TrainConfig, vae: VAEConfig, dp: DPConfig,
               pixelcnn: PixelCNNConfig | None = None) -> dict[str, Any]:
    """The params a training's result depends on, flat (``{"train.lr_g": ...}``): what its MLflow
    run records and its checkpoint's fingerprint holds (the vae section for the vae family only,
    the pixelcnn section for the pixelcnn family only, privacy.dp only when enabled; the runtime
    section never)."""
    params = {"seed": seed} | flatten(model, "model.") | flatten(train, "train.")
    if model.family == "vae":
        params |= flatten(vae, "vae.")
    if model.family == "pixelcnn":
        params |= flatten(pixelcnn or PixelCNNConfig(), "pixelcnn.")
    if dp.enabled:
        params |= flatten(dp, "privacy.dp.")
    return params


def fingerprint(params: dict[str, Any], dataset_sha: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed: the params that change the result
    (flat, ``{"train.lr_g": ...}``; the runtime section is not among them), the data and the code."""
    parts = {"params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()},
             "dataset_sha256": dataset_sha, "code": code_files()}
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


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any] | None, str]:
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


def resumable(path: str | Path, fp: dict[str, Any], epochs: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None,
                                                                            str]:
    """(the state to resume from or None, the previous checkpoint or None, what to tell the user):
    the policy of the train stage, which resumes only a checkpoint of this very run."""
    previous, unreadable = read_checkpoint(path)
    if previous is not None and previous["fingerprint"]["sha256"] == fp["sha256"]:
        left = "nothing left to train" if previous["complete"] else f"{epochs - previous['epoch']} epoch(s) to go"
        return previous, previous, (f"resuming from {path}: epoch {previous['epoch']}/{epochs}, step "
                                    f"{previous['step']} ({left})")
    if previous is not None:
        return None, previous, f"starting fresh: {path} is of another run ({why_not(previous['fingerprint'], fp)})"
    return None, None, "" if unreadable == "no checkpoint" else f"starting fresh: {unreadable}"
