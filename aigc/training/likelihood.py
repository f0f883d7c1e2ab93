"""Likelihood of held-out images, in bits per dimension (per sub-pixel), for the families that have one.

* :func:`bits_per_dim`: a PixelCNN's exact -log2 p(x) / (C*H*W) over the 256 levels of each
  sub-pixel (8 bits/dim is the uniform distribution; lower is better).
* :func:`vae_bits_per_dim`: a VAE's importance-weighted bound (Burda et al. 2016, "Importance
  Weighted Autoencoders") on -log p(x) with k samples of q(z|x), in the same units -- an *upper*
  bound on the VAE's NLL under its own likelihood (tighter as k grows; k = 1 is the ELBO).

They are not yet among the evaluate stage's metrics (pipeline/evaluate.py); they return plain
floats of a model and a split.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aigc.config import VAEConfig


@torch.no_grad()
def bits_per_dim(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                 batch_size: int = 500) -> float:
    """Mean exact NLL of ``images`` ([-1, 1], (N, C, H, W), quantised to 0..255) under a PixelCNN
    (aigc/models/pixelcnn.py; ``labels``: class indices when it is conditional), in bits/dim."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(images), batch_size):
        y = labels[i:i + batch_size].to(device) if labels is not None else None
        total += float(model.nll(images[i:i + batch_size].to(device), y).double().sum())
    model.train(was_training)
    return total / (max(len(images), 1) * images[0].numel() * math.log(2))


@torch.no_grad()
def vae_bits_per_dim(encoder: nn.Module, decoder: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                     k: int = 64, vae: VAEConfig | None = None, batch_size: int = 100, seed: int = 0) -> float:
    """The k-sample importance-weighted bound on a VAE's -log p(x), in bits/dim:

        -log p(x) <= -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x),   z_i ~ q(z|x),

    averaged over ``images`` ([-1, 1], (N, C, H, W)) and divided by C*H*W ln 2.

    It is an upper bound on the NLL under the VAE's *own* likelihood ``vae.likelihood``, which is
    not the PixelCNN's scale: the Bernoulli "likelihood" of a grey level in [0, 1] is a
    cross-entropy, not a normalised distribution over the 256 levels (it is not even normalised
    over [0, 1]), and the Gaussian is a density over continuous x, whose -log differs from a
    probability of the level by the log of the bin width (ln(2/255) per dim on the [-1, 1] scale)
    and is only comparable once the data are dequantised. The numbers are comparable with
    :func:`bits_per_dim` only if the likelihood is discretised (e.g. a discretised Gaussian or
    logistic that integrates each of the 256 bins).
    """
    from aigc.models.vae import recon_nll  # the ELBO's own reconstruction term

    vae = vae or VAEConfig()
    enc_training, dec_training = encoder.training, decoder.training
    encoder.eval()
    decoder.eval()
    device = next(decoder.parameters()).device
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).float()
            y = labels[i:i + batch_size].to(device) if labels is not None else None
            cond = () if y is None else (y,)
            mu, logvar = encoder(x, *cond)
            std = (0.5 * logvar).exp()
            log_w = []
            for _ in range(k):
                eps = torch.randn_like(mu)
                z = mu + eps * std
                log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
                log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar).sum(1)
                log_px = -recon_nll(decoder.logits(z, *cond), x, vae.likelihood, vae.sigma)
                log_w.append((log_px + log_pz - log_qz).double())
            bound = -(torch.logsumexp(torch.stack(log_w), 0) - math.log(k))  # (N,) nats
            total += float(bound.sum())
    encoder.train(enc_training)
    decoder.train(dec_training)
    return total / (max(len(images), 1) * images[0].numel() * math.log(2))
