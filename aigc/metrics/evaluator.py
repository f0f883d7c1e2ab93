"""The evaluator: a small CNN classifier whose features and logits the metrics are computed on.

FID's authors advise against Inception features for MNIST-like data and recommend a domain
classifier's features instead; Inception weights cannot be downloaded here anyway. So the
pipeline trains its own feature network on the processed train split:

* its penultimate activations (``features``) feed FID, KID, precision/recall/density/coverage
  and the memorisation check;
* its logits feed the Inception Score and mode coverage.

Like the generator, the file carries the network's config (``EvaluatorNet``), so
``load_evaluator(path)`` rebuilds it from the file alone, and its size follows the data
(``dataset.json``): 8x8 digits and 28x28 MNIST both work.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aigc.config import EvaluatorConfig
from aigc.errors import UserError
from aigc.io import load_net_file
from aigc.runtime import resolve_device

EVALUATOR_FORMAT = "aigc.evaluator/1"


@dataclass(frozen=True)
class EvaluatorNet:
    """Everything needed to rebuild the classifier (stored in its file)."""

    channels: int
    height: int
    width: int
    classes: tuple[int, ...]  # the dataset's label values; output i of the network is classes[i]
    base_channels: int = 16
    features: int = 64

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvaluatorNet":
        return cls(**(d | {"classes": tuple(int(k) for k in d["classes"])}))


def _half(n: int) -> int:
    """Side after a 3x3, stride-2, padding-1 convolution: ceil(n / 2)."""
    return (n - 1) // 2 + 1


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class Evaluator(nn.Module):
    """Inception's shape in miniature: 3x3 convolutions (b, 2b s2, F s2, F), then a global average
    pool whose F values are the features, then one dense layer to the K logits.

    Pooled convolution features (what Inception's pool3 gives FID) measure texture and stroke
    statistics as well as the class: uniform noise lands far from every digit (the worst FID),
    where the features of a dense layer trained only to separate classes put noise near the
    middle of the data and score it better than a generator stuck on one class.
    """

    def __init__(self, cfg: EvaluatorNet):
        super().__init__()
        self.cfg = cfg
        b, f = cfg.base_channels, cfg.features
        self.trunk = nn.Sequential(
            *_conv(cfg.channels, b, 1),  # (b, H, W)
            *_conv(b, 2 * b, 2),  # (2b, H/2, W/2)
            *_conv(2 * b, f, 2),  # (F, H/4, W/4)
            *_conv(f, f, 1),  # (F, H/4, W/4)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (F,): the feature vector
        )
        # Dropout (training only: keeps the logits from leaning on a few features), then logits.
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(f, cfg.num_classes))  # (K,)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (N, C, H, W) -> penultimate features (N, F)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> class logits (N, K)."""
        return self.head(self.trunk(x))

    def embed_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (features, logits) in one pass (aigc/metrics/inception.py has the same interface)."""
        f = self.trunk(x)
        return f, self.head(f)


def evaluator_net(cfg: EvaluatorConfig, info: dict[str, Any]) -> EvaluatorNet:
    """The network config from params' ``evaluator`` section and what dataset.json says of the data."""
    classes = tuple(int(k) for k in info.get("classes", []))
    if len(classes) < 2:
        raise UserError(f"the evaluator is a classifier and needs labelled data with at least 2 classes; "
                        f"dataset.json lists {len(classes)} class(es). Use a source with labels")
    h, w = info["resolution"]
    return EvaluatorNet(channels=int(info["channels"]), height=int(h), width=int(w), classes=classes,
                        base_channels=cfg.base_channels, features=cfg.features)


def label_indices(labels: np.ndarray, net: EvaluatorNet) -> torch.Tensor:
    """Dataset label values -> output indices 0..K-1 (labels need not be 0..K-1)."""
    classes = np.asarray(net.classes)
    idx = np.searchsorted(classes, labels)
    idx = np.clip(idx, 0, len(classes) - 1)
    if not np.array_equal(classes[idx], labels):
        bad = sorted(set(np.asarray(labels)[classes[idx] != labels].tolist()))[:5]
        raise UserError(f"labels {bad} are not among the dataset's classes {list(net.classes)}; rerun preprocess")
    return torch.from_numpy(idx.astype(np.int64))


@dataclass
class EvaluatorResult:
    model: Evaluator
    steps: int
    seconds: float
    train_accuracy: float
    test_accuracy: float


def fit_evaluator(cfg: EvaluatorConfig, net: EvaluatorNet, images: torch.Tensor, labels: torch.Tensor,
                  test_images: torch.Tensor, test_labels: torch.Tensor, seed: int,
                  progress: bool = True, device: str = "auto") -> EvaluatorResult:
    """Train the classifier on (images, label indices) with cross-entropy and Adam; measure it on the test split."""
    if len(images) < cfg.batch_size:
        raise UserError(f"the train split has {len(images)} images, fewer than evaluator.batch_size = "
                        f"{cfg.batch_size}; lower the batch size")
    device = resolve_device(device, "runtime.device")
    torch.manual_seed(seed)  # weights and dropout follow from the seed
    order = torch.Generator().manual_seed(seed)  # batch order, independent of the device
    model = Evaluator(net).to(device)
    x, y = images.to(device, torch.float32), labels.to(device)
    n, b = len(x), cfg.batch_size
    steps_per_epoch = n // b  # drop the ragged last batch: BatchNorm wants full ones
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # One-cycle schedule (warm up to lr, anneal to ~0). Measured on the default data, 5 epochs:
    # 0.96-0.97 test accuracy; a constant lr of 2e-3 gave 0.94, of 5e-3 0.82.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps_per_epoch * cfg.epochs)
    bar = tqdm(total=steps_per_epoch * cfg.epochs, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0, desc="evaluator")
    t = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * b:(i + 1) * b]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t
    model.eval()
    return EvaluatorResult(model.cpu(), steps_per_epoch * cfg.epochs, seconds,
                           accuracy(model, images, labels), accuracy(model, test_images, test_labels))


@torch.no_grad()
def accuracy(model: Evaluator, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Share of ``images`` whose predicted class index equals ``labels``."""
    model.eval()
    device = next(model.parameters()).device
    right = sum(int((model(images[i:i + batch_size].to(device)).argmax(1).cpu() == labels[i:i + batch_size]).sum())
                for i in range(0, len(images), batch_size))
    return right / max(len(images), 1)


def evaluator_payload(model: Evaluator) -> dict[str, Any]:
    """What the evaluator file holds: weights plus the config that rebuilds the network."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": EVALUATOR_FORMAT, "config": model.cfg.to_dict(), "state_dict": state}


def load_evaluator(path: str | Path, map_location: str | torch.device = "cpu") -> Evaluator:
    """Rebuild the evaluator from its file alone; returned in eval mode."""
    payload = load_net_file(path, EVALUATOR_FORMAT, "evaluator", map_location=map_location,
                            missing_hint="; run the train_evaluator stage (dvc repro train_evaluator)")
    model = Evaluator(EvaluatorNet.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def weights_sha256(model: nn.Module) -> str:
    """A hash of the weights themselves (names, shapes, bytes): the same network gives the same hash,
    however the file holding it was written."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
