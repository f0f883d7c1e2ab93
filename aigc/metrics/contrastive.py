"""A feature space learnt without labels: the evaluator's CNN trained with SimCLR's contrastive
objective (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv:2002.05709).

Each train image is augmented twice; the network (trunk, then a small projection head) must pick
out an image's other view among the 2B - 1 views of its batch (NT-Xent: a softmax over cosine
similarities at a temperature). The trunk's pooled features -- before the projection head, as
SimCLR evaluates them -- are then the feature space of FID, KID, PRDC and memorisation, exactly
where the classifier's penultimate layer is on labelled data.

The views decide what the space is blind to, and an evaluation space must not be blind to the
faults of generated images, so the augmentations are chosen for scoring, not for transfer:

* random shifts by whole pixels, up to ``shift`` of the side (the image padded, then cropped back
  to its size), for every image -- not SimCLR's resized crops: resizing blurs, and a space that
  learns to match a blurred view with a sharp one scores blurry samples as real (measured on the
  default data: blurred real digits then scored better than a trained generator);
* on colour data, horizontal flips and colour jitter with random greyscale (else the network
  matches views by their colour histogram alone); on grey data, brightness and contrast jitter;
* **no blur and no noise**: a space that ignores them could not tell a blurry or noisy generator
  from a sharp one.

The loss follows lightly's ``NTXentLoss`` (``lightly/loss/ntx_ent_loss.py``; lightly itself needs
torchvision, which cannot be installed beside this torch) and the augmentations are kornia's.
"""

from __future__ import annotations

import sys
import time

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aigc.config import ContrastiveConfig
from aigc.errors import UserError


def views(channels: int, height: int, width: int, shift: float) -> nn.Module:
    """The random augmentation one view of a [0, 1] batch (N, C, H, W) goes through (kornia; fresh
    parameters per image)."""
    pad = (round(shift * height), round(shift * width))
    # grey data is a stroke on a dark ground (pad with 0, the ground); photos continue by reflection
    ops: list[nn.Module] = [K.RandomCrop((height, width), padding=pad, pad_if_needed=False,
                                         padding_mode="constant" if channels == 1 else "reflect")]
    if channels == 3:
        ops += [K.RandomHorizontalFlip(), K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2)]
    else:
        ops += [K.ColorJitter(brightness=0.4, contrast=0.4, p=0.8)]
    return nn.Sequential(*ops)


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two views' projections (B, D): row i of ``z0`` and row i of ``z1``
    are a positive pair, every other row of either a negative; mean over the 2B anchors."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)  # (2B, D), unit length: dot products are cosines
    sim = z @ z.T / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))  # not itself
    b = len(z0)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)  # the other view's row
    return F.cross_entropy(sim, target)


@torch.no_grad()
def view_retrieval(model: nn.Module, images: torch.Tensor, augment: nn.Module, batch_size: int = 500) -> float:
    """Share of images whose nearest neighbour (cosine, in the trunk's features) among the other
    views of the set is their own second view: how well the space tells images apart (1 = every
    image recognised after augmentation; chance 1 / (2N - 1))."""
    model.eval()
    device = next(model.parameters()).device
    x = images.to(device, torch.float32)
    f0, f1 = [], []
    for i in range(0, len(x), batch_size):
        u = (x[i:i + batch_size] + 1) / 2
        f0.append(model.features(augment(u) * 2 - 1))
        f1.append(model.features(augment(u) * 2 - 1))
    z = F.normalize(torch.cat([torch.cat(f0), torch.cat(f1)]), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    n = len(x)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(device)
    return float((sim.argmax(1) == target).double().mean())


@torch.no_grad()
def knn_accuracy(model: nn.Module, train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 5, batch_size: int = 1000) -> float:
    """Accuracy of a k-nearest-neighbour vote (cosine) in the features: the usual check of a
    self-supervised space on data that has labels (not used to train it)."""
    model.eval()
    device = next(model.parameters()).device

    def feats(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.cat([model.features(x[i:i + batch_size].to(device, torch.float32)).cpu()
                                      for i in range(0, len(x), batch_size)]), dim=1)

    ftr, fte = feats(train), feats(test)
    nn_idx = (fte @ ftr.T).topk(min(k, len(ftr)), dim=1).indices  # (N_test, k)
    votes = train_labels[nn_idx]
    predicted = torch.mode(votes, dim=1).values
    return float((predicted == test_labels).double().mean())


def fit_contrastive(cfg: ContrastiveConfig, model: nn.Module, images: torch.Tensor, seed: int, *,
                    device: torch.device, progress: bool = True) -> tuple[int, float]:
    """Train ``model`` (an :class:`~aigc.metrics.evaluator.Evaluator` with a projection head) with
    NT-Xent on two views of each of ``images`` ([-1, 1], (N, C, H, W)); returns (steps, seconds)."""
    if len(images) < cfg.batch_size:
        raise UserError(f"the train split has {len(images)} images, fewer than evaluator.contrastive.batch_size = "
                        f"{cfg.batch_size}; lower the batch size")
    _, c, h, w = images.shape
    torch.manual_seed(seed)  # weights and every augmentation's parameters follow from the seed
    order = torch.Generator().manual_seed(seed)  # batch order, independent of the device
    augment = views(c, h, w, cfg.shift).to(device)
    x = images.to(device, torch.float32)
    n, b = len(x), cfg.batch_size
    steps_per_epoch = n // b  # full batches: the negatives per anchor stay 2(B-1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps_per_epoch * cfg.epochs)
    bar = tqdm(total=steps_per_epoch * cfg.epochs, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0, desc="evaluator (contrastive)")
    t = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=order).to(device)
        for i in range(steps_per_epoch):
            u = (x[perm[i * b:(i + 1) * b]] + 1) / 2  # kornia's colour ops work on [0, 1]
            v = torch.cat([augment(u), augment(u)]) * 2 - 1  # (2B, C, H, W): both views in one pass
            p = model.project(v)
            loss = nt_xent(p[:b], p[b:], cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return steps_per_epoch * cfg.epochs, time.perf_counter() - t
