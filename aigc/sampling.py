"""Samples of a generator, optionally of one class: what ``aigc generate`` and the served model return.

A **conditional** generator (``model.conditional: true``) is asked for the class directly:
``G(z, y)``, no classifier involved, nothing rejected. Without a label it draws the classes by
the data's class shares (stored in its file).

An **unconditional** generator (z only) has no class input, so "a sample of class 3" is done
honestly by rejection: draw z in seeded batches, keep the images the evaluator classifier (the
metrics' feature network, aigc/metrics/evaluator.py) puts in class 3, stop when there are ``n``. At
most ``max_draws_per_image * n`` draws are made; a class the generator (nearly) never makes is an
error saying how often it came up, not an endless loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from aigc.errors import UserError
from aigc.images import to_uint8
from aigc.models import NetConfig, sample

if TYPE_CHECKING:  # importing aigc.metrics loads torchmetrics (~1.5 s): only labelled requests need it
    from aigc.metrics.evaluator import Evaluator

MAX_DRAWS_PER_IMAGE = 100  # rejection sampling gives up after this many draws per requested image
MAX_IMAGES = 10_000  # one request; larger batches belong to the evaluate stage, not to serving


def check_request(n: int, seed: int, max_images: int = MAX_IMAGES) -> None:
    """``max_images``: the cap that applies where the request is served (the HTTP server's is lower)."""
    if not 1 <= n <= max_images:
        raise UserError(f"n = {n}: ask for 1 to {max_images} images")
    if not 0 <= seed < 2**63:
        raise UserError(f"seed = {seed}: must be a non-negative integer")


def check_label(label: int, evaluator: Evaluator | None, cfg: NetConfig) -> int:
    """The evaluator's output index of ``label``; a clear error when a label cannot be honoured."""
    if evaluator is None:
        raise UserError(f"label {label} asked for, but there is no evaluator classifier to tell the classes apart "
                        "(the generator is unconditional; labels are drawn by rejection with the evaluator). "
                        "Pass the evaluator file (--evaluator models/evaluator.pt, written by the train_evaluator "
                        "stage) or a registered model that carries one")
    ev = evaluator.cfg
    if not ev.classes:
        raise UserError(f"label {label} asked for, but the data has no labels: the generator is unconditional and "
                        "the evaluator is self-supervised (no classes to tell apart); leave out the label")
    if (ev.channels, ev.height, ev.width) != cfg.image_shape:
        raise UserError(f"the evaluator classifies {ev.channels}x{ev.height}x{ev.width} images but the generator "
                        f"makes {cfg.channels}x{cfg.height}x{cfg.width}; use the evaluator trained on the same data")
    if label not in ev.classes:
        raise UserError(f"unknown label {label}: the classes are {list(ev.classes)}")
    return ev.classes.index(label)


@torch.no_grad()
def generate(G: nn.Module, cfg: NetConfig, n: int, seed: int, label: int | None = None,
             evaluator: Evaluator | None = None, max_draws_per_image: int = MAX_DRAWS_PER_IMAGE,
             batch_size: int = 256) -> torch.Tensor:
    """``n`` images in [-1, 1] (N, C, H, W); same arguments, same images.

    ``label`` (a dataset label value): a conditional generator makes that class; for an
    unconditional one, only images the evaluator classifies as that class (rejection sampling).
    """
    check_request(n, seed)
    if label is None:
        return sample(G, cfg.z_dim, n, seed, batch_size=batch_size)
    if cfg.conditional:  # the generator's own conditioning: every draw is kept
        return sample(G, cfg.z_dim, n, seed, batch_size=batch_size, labels=torch.tensor(cfg.class_index(label)))
    target = check_label(label, evaluator, cfg)
    evaluator.eval()
    kept: list[torch.Tensor] = []
    have, drawn, budget = 0, 0, max_draws_per_image * n
    draw = torch.Generator().manual_seed(seed)
    while have < n and drawn < budget:
        size = min(max(batch_size, 2 * (n - have)), budget - drawn)
        # Each batch gets its own seed from one seeded stream: the result depends on (seed, n) only.
        batch_seed = int(torch.randint(0, 2**62, (1,), generator=draw))
        x = sample(G, cfg.z_dim, size, batch_seed, batch_size=batch_size)
        hit = evaluator(x).argmax(dim=1) == target
        kept.append(x[hit])
        have += int(hit.sum())
        drawn += size
    if have < n:
        raise UserError(f"label {label} is too rare in this generator's samples: {have} of {drawn} draws were "
                        f"classified as {label} (needed {n}; gave up after {max_draws_per_image} draws per image). "
                        f"Ask for fewer images, or use a generator that covers this class")
    return torch.cat(kept)[:n]


def generate_uint8(G: nn.Module, cfg: NetConfig, n: int, seed: int, label: int | None = None,
                   evaluator: Evaluator | None = None) -> np.ndarray:
    """:func:`generate` as uint8 (N, H, W, C) arrays: what the served model answers."""
    return to_uint8(generate(G, cfg, n, seed, label, evaluator))
