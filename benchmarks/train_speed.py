"""Training-step speed: the project's loop against a plain reference loop and the machine's peak.

Everything is measured in one process on the same machine, architecture and batch size:

* the fp32 matmul peak (GFLOP/s) at the thread count used, the ceiling for this step;
* the project's step (``aigc.training.train_gan``), images/s from its own per-window timing,
  and its FLOPs per step from ``torch.utils.flop_counter.FlopCounterMode``;
* a reference loop written here the standard way (``DataLoader`` over a ``TensorDataset``, two
  Adam optimisers, the pytorch/examples DCGAN recipe, a ``.item()`` per step);
* the switches (``torch.compile``, channels_last) and thread counts with one core held by a
  busy process (what a shared machine looks like), including ``threads: auto``.

Variants run interleaved over rounds; medians and ratios are reported, never one time.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from aigc.config import TrainConfig
from aigc.losses import d_loss_nonsaturating, g_loss_nonsaturating
from aigc.models import NetConfig, build_discriminator, build_generator
from aigc.training import train_gan

BATCH = 64


def mnist_like(n: int) -> torch.Tensor:
    """The default data's shape (1x28x28 in [-1, 1]); speed does not depend on the pixels."""
    from aigc.config import DataConfig
    from aigc.data.preprocess import normalise
    from aigc.data.sources import load_mnist5k

    return torch.from_numpy(normalise(load_mnist5k(DataConfig()).images[:n]))


def matmul_peak(threads: int, sizes: tuple[int, ...] = (1024, 2048), reps: int = 10) -> float:
    """Best fp32 GFLOP/s of square matmuls at ``threads`` threads: the machine's practical peak."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def project_step(images: torch.Tensor, net: NetConfig, steps: int, **overrides: Any) -> float:
    """Images/s of the project's loop: the median of its windows after the first (warm-up)."""
    cfg = TrainConfig(epochs=1, batch_size=BATCH, log_every=max(steps // 5, 2), **overrides)
    windows: list[float] = []
    train_gan(cfg, net, images[: BATCH * steps], seed=0, on_steps=lambda w: windows.append(w.images_per_s),
              progress=False)
    return statistics.median(windows[1:])


def step_flops(images: torch.Tensor, net: NetConfig) -> int:
    """FLOPs of one project step (D update + G update), counted by PyTorch."""
    with FlopCounterMode(display=False) as counter:
        train_gan(TrainConfig(epochs=1, batch_size=BATCH, threads=1), net, images[:BATCH], seed=0, progress=False)
    return counter.get_total_flops()


def reference_loop(images: torch.Tensor, net: NetConfig, steps: int, threads: int) -> float:
    """Images/s of the textbook loop (pytorch/examples dcgan/main.py shape), same networks."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    G, D = build_generator(net), build_discriminator(net)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loader = DataLoader(TensorDataset(images[: BATCH * steps]), batch_size=BATCH, shuffle=True, drop_last=True)
    times = []
    for (real,) in loader:
        t = time.perf_counter()
        z = torch.randn(BATCH, net.z_dim)
        fake = G(z)
        # (1) Update D network
        D.zero_grad()
        d_loss = d_loss_nonsaturating(D(real), D(fake.detach()))
        d_loss.backward()
        opt_d.step()
        # (2) Update G network
        G.zero_grad()
        g_loss = g_loss_nonsaturating(D(fake))
        g_loss.backward()
        opt_g.step()
        d_loss.item(), g_loss.item()
        times.append(time.perf_counter() - t)
    return BATCH / statistics.median(times[2:])


class BusyCore:
    """One process spinning on a core, as a noisy neighbour does."""

    def __enter__(self) -> "BusyCore":
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def run(rounds: int = 3, steps: int = 25, compile_check: bool = True) -> dict[str, Any]:
    from aigc.runtime import usable_cores

    cores = usable_cores()
    images = mnist_like(BATCH * steps)
    net = NetConfig("dcgan", 100, 1, 28, 28)
    flops = step_flops(images, net)

    # "project" is the step as configured by default (TrainConfig); "other_layout" flips channels_last.
    default_cl = TrainConfig().channels_last
    samples: dict[str, list[float]] = {k: [] for k in ("peak_gflops", "project", "reference", "other_layout")}
    for r in range(rounds):
        order = ["project", "reference", "other_layout"]
        for name in order if r % 2 == 0 else order[::-1]:
            if name == "project":
                samples[name].append(project_step(images, net, steps, threads=cores))
            elif name == "reference":
                samples[name].append(reference_loop(images, net, steps, cores))
            else:
                samples[name].append(project_step(images, net, steps, threads=cores, channels_last=not default_cl))
        samples["peak_gflops"].append(matmul_peak(cores))
        print(f"  speed round {r + 1}/{rounds}", file=sys.stderr)
    if compile_check:
        project_step(images, net, 6, threads=cores, compile=True)  # compile once (not timed)
        samples["compile"] = [project_step(images, net, steps, threads=cores, compile=True)]

    loaded: dict[str, float] = {}
    if cores >= 2:
        with BusyCore():
            for name, threads in (("threads_all", cores), ("threads_1", 1), ("threads_auto", "auto")):
                loaded[name] = project_step(images, net, steps, threads=threads)
            loaded["peak_gflops_1_thread"] = matmul_peak(1)

    med = {k: statistics.median(v) for k, v in samples.items()}
    achieved = flops * med["project"] / BATCH / 1e9
    return {
        "cores": cores,
        "batch_size": BATCH,
        "architecture": "dcgan 1x28x28, z 100",
        "flops_per_step": flops,
        "gflop_per_step": round(flops / 1e9, 2),
        "median": {k: round(v, 1) for k, v in med.items()},
        "all": {k: [round(x, 1) for x in v] for k, v in samples.items()},
        "achieved_gflops": round(achieved, 1),
        "fraction_of_peak": round(achieved / med["peak_gflops"], 3),
        "speedup_vs_reference": round(med["project"] / med["reference"], 3),
        "channels_last_default": default_cl,
        # speed with channels_last over speed without it, whichever is the default
        "channels_last_ratio": round((med["project"] / med["other_layout"]) if default_cl
                                     else (med["other_layout"] / med["project"]), 3),
        "compile_ratio": round(med["compile"] / med["project"], 3) if "compile" in med else None,
        "one_core_busy": {k: round(v, 1) for k, v in loaded.items()},
        "auto_vs_1_thread_under_load": round(loaded["threads_auto"] / loaded["threads_1"], 3) if loaded else None,
        "reference_flops_note": "the reference computes D's weight gradients in the G step too (more FLOPs)",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
