"""Training-step speed: the stage's own step against a plain reference loop, the machine's peak,
and the train stage itself.

Everything is measured in one process on the same machine, with the architecture and recipe
the train stage runs (params.yaml's ``model`` and ``train`` sections, on the default data's
1x28x28 shape), so the benchmark and the stage cannot drift apart:

* the fp32 matmul peak (GFLOP/s) at the thread count used, the ceiling for this step;
* the project's step (``aigc.training.train_gan`` with the stage's config), images/s from its
  own per-window timing, in both memory layouts, and its FLOPs per step from
  ``torch.utils.flop_counter.FlopCounterMode``;
* a reference loop written here the standard way (``DataLoader`` over a ``TensorDataset``, two
  Adam optimisers, the pytorch/examples DCGAN recipe, a ``.item()`` per step), same networks;
* the train stage as ``dvc repro`` runs it (``python -m pipeline.train``: its own process, its
  Prefect flow, MLflow tracking, the hooks) for a few epochs, against ``train_gan`` called here
  for the same epochs with the same config: the two figures are the same quantity
  (``images_per_s`` of reports/train/metrics.json), so any gap is what the stage adds;
* the per-machine probe's choice (``train.channels_last: auto``), ``torch.compile``, and thread
  counts with one core held by a busy process (what a shared machine looks like).

Variants run interleaved over rounds; medians and ratios are reported, never one time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from aigc.config import DEFAULT_PARAMS, DataConfig, RuntimeConfig, TrainConfig, load_params
from aigc.losses import d_loss_nonsaturating, g_loss_nonsaturating
from aigc.models import NetConfig, build_discriminator, build_generator, net_config
from aigc.training import GANRecipe, TrainData, probe_machine, train_gan

ROOT = Path(__file__).resolve().parents[1]
def mnist_like(n: int) -> torch.Tensor:
    """The default data's shape (1x28x28 in [-1, 1]); speed does not depend on the pixels."""
    from aigc.data.preprocess import normalise
    from aigc.data.sources import load_mnist5k

    return torch.from_numpy(normalise(load_mnist5k(DataConfig()).images[:n]))


def step_labels(n: int, net: NetConfig) -> torch.Tensor | None:
    """Class indices for ``n`` benchmark images (0..classes-1 in turn) when ``net`` is conditional,
    else None: speed does not depend on which labels."""
    return torch.arange(n) % net.num_classes if net.conditional else None


def stage_config(params: str | Path = ROOT / DEFAULT_PARAMS) -> tuple[NetConfig, TrainConfig]:
    """The network and training recipe the train stage builds from params.yaml, on the default
    data's shape (1x28x28, ten equally likely classes when the model is conditional)."""
    p = load_params(params)
    info = {"resolution": [28, 28], "channels": 1, "classes": list(range(10)),
            "counts": {"train_per_class": {str(k): 450 for k in range(10)}}}
    if p.model.family == "vae":
        raise SystemExit("error: aigc_bench.train_speed measures the GAN step; params.yaml has model.family: vae")
    return net_config(p.model, info), p.train


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


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, runtime) overrides: the knobs of the runtime section (threads, layout, compile, ...) go there."""
    rt = {k: v for k, v in overrides.items() if k in RuntimeConfig.model_fields}
    return {k: v for k, v in overrides.items() if k not in rt}, rt


def project_step(images: torch.Tensor, net: NetConfig, cfg: TrainConfig, steps: int, **overrides: Any) -> float:
    """Images/s of the stage's step (``cfg`` + ``overrides``, train or runtime knobs): the median of
    its windows after the first (warm-up)."""
    train_kw, rt_kw = split_overrides(overrides)
    run = cfg.model_copy(update={"epochs": 1, "guard_steps": 0} | train_kw)
    rt = RuntimeConfig(**({"log_every": max(steps // 5, 2)} | rt_kw))
    windows: list[float] = []
    labels = step_labels(len(images[: run.batch_size * steps]), net)
    train_gan(run, net, images[: run.batch_size * steps], seed=0, on_steps=lambda w: windows.append(w.images_per_s),
              progress=False, labels=labels, runtime=rt)
    return statistics.median(windows[1:])


def step_flops(images: torch.Tensor, net: NetConfig, cfg: TrainConfig) -> int:
    """FLOPs of one project step (D update + G update + EMA), counted by PyTorch: a 2-step run minus
    a 1-step run, so what a run does once (the EMA generator's BatchNorm re-estimation at the end,
    8 x 256 forward passes of G) is not counted as the step's."""
    run = cfg.model_copy(update={"epochs": 1, "guard_steps": 0})
    counts = []
    for steps in (1, 2):
        n = run.batch_size * steps
        labels = step_labels(n, net)
        with FlopCounterMode(display=False) as counter:
            train_gan(run, net, images[:n], seed=0, progress=False, labels=labels,
                      runtime=RuntimeConfig(threads=1, channels_last=False))
        counts.append(counter.get_total_flops())
    return counts[1] - counts[0]


def reference_loop(images: torch.Tensor, net: NetConfig, steps: int, threads: int, batch: int) -> float:
    """Images/s of the textbook loop (pytorch/examples dcgan/main.py shape), same networks; a
    conditional net gets the class as its extra argument (reals: labels 0..9 in turn, fakes: drawn)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    G, D = build_generator(net), build_discriminator(net)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    n = batch * steps
    labels = step_labels(n, net) if net.conditional else torch.zeros(n, dtype=torch.int64)
    cond = (lambda y: (y,)) if net.conditional else (lambda y: ())
    loader = DataLoader(TensorDataset(images[:n], labels), batch_size=batch, shuffle=True, drop_last=True)
    times = []
    for real, y_real in loader:
        t = time.perf_counter()
        z = torch.randn(batch, net.z_dim)
        y_fake = torch.randint(0, max(net.num_classes, 1), (batch,))
        fake = G(z, *cond(y_fake))
        # (1) Update D network
        D.zero_grad()
        d_loss = d_loss_nonsaturating(D(real, *cond(y_real)), D(fake.detach(), *cond(y_fake)))
        d_loss.backward()
        opt_d.step()
        # (2) Update G network
        G.zero_grad()
        g_loss = g_loss_nonsaturating(D(fake, *cond(y_fake)))
        g_loss.backward()
        opt_g.step()
        d_loss.item(), g_loss.item()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[2:])


class BusyCore:
    """One process spinning on a core, as a noisy neighbour does."""

    def __enter__(self) -> "BusyCore":
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def stage_vs_step(epochs: int = 2, rounds: int = 2) -> dict[str, Any]:
    """The train stage (``python -m pipeline.train``, as ``dvc repro`` runs it, MLflow on a scratch
    store) against ``train_gan`` called here with the same params and split, interleaved; both
    figures are ``images_per_s`` over the whole run (training time only, hooks excluded)."""
    from aigc.data.preprocess import load_split, preprocess, save_processed
    from aigc.data.sources import load_source

    raw = yaml.safe_load((ROOT / DEFAULT_PARAMS).read_text())
    raw["train"] = raw.get("train", {}) | {"epochs": epochs}
    p = load_params(ROOT / DEFAULT_PARAMS, overrides={"train.epochs": epochs})
    got: dict[str, list[float]] = {"stage": [], "in_process": []}
    with tempfile.TemporaryDirectory(prefix="aigc-bench-") as tmp:
        work = Path(tmp)
        raw.setdefault("tracking", {})["uri"] = f"sqlite:///{work / 'mlflow.db'}"
        raw["tracking"]["artifact_root"] = str(work / "artifacts")
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        save_processed(preprocess(load_source(p.data), p.data, p.seed), work / "processed")
        split = load_split(work / "processed", "train")
        from aigc.data.preprocess import load_info

        net = net_config(p.model, load_info(work / "processed"))
        images = torch.from_numpy(split["images"])
        labels = net.class_indices(split["labels"]) if net.conditional else None
        for r in range(rounds):
            for name in (("stage", "in_process") if r % 2 == 0 else ("in_process", "stage")):
                if name == "in_process":
                    res = train_gan(p.train, net, images, p.seed, progress=False, labels=labels, runtime=p.runtime)
                    got[name].append(res.images_per_s)
                    continue
                out = work / f"out{r}"
                cmd = [sys.executable, "-m", "pipeline.train", "--params", str(work / "params.yaml"),
                       "--processed", str(work / "processed"), "--generator", str(out / "g.pt"),
                       "--checkpoint", str(out / "ckpt.pt"), "--run", str(out / "run.json"),
                       "--metrics", str(out / "metrics.json"), "--losses", str(out / "losses.csv"),
                       "--samples", str(out / "samples.png")]
                env = os.environ | {"MLFLOW_TRACKING_URI": raw["tracking"]["uri"]}
                res_p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if res_p.returncode != 0:
                    raise SystemExit(f"error: the train stage failed in the benchmark:\n{res_p.stderr[-2000:]}")
                got[name].append(json.loads((out / "metrics.json").read_text())["images_per_s"])
            print(f"  stage vs step round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in got.items()),
                  file=sys.stderr)
    med = {k: statistics.median(v) for k, v in got.items()}
    return {"epochs": epochs, "median_img_s": {k: round(v, 1) for k, v in med.items()},
            "all_img_s": {k: [round(x, 1) for x in v] for k, v in got.items()},
            "stage_over_step": round(med["stage"] / med["in_process"], 3)}


def run(rounds: int = 3, steps: int = 25, compile_check: bool = True, stage_epochs: int = 2) -> dict[str, Any]:
    from aigc.runtime import usable_cores

    cores = usable_cores()
    net, cfg = stage_config()
    images = mnist_like(cfg.batch_size * steps)
    flops = step_flops(images, net, cfg)
    rt = load_params(ROOT / "params.yaml").runtime
    found = (probe_machine(cfg, rt, GANRecipe(cfg, net), TrainData(images, step_labels(len(images), net)), seed=0)
             if rt.channels_last == "auto" else None)

    # "nhwc"/"nchw": the stage's step in each layout at all cores; the stage itself uses the
    # probe's choice (train.channels_last: auto) or the layout params.yaml names.
    samples: dict[str, list[float]] = {k: [] for k in ("peak_gflops", "nhwc", "nchw", "reference")}
    for r in range(rounds):
        order = ["nhwc", "reference", "nchw"]
        for name in order if r % 2 == 0 else order[::-1]:
            if name == "reference":
                samples[name].append(reference_loop(images, net, steps, cores, cfg.batch_size))
            else:
                samples[name].append(project_step(images, net, cfg, steps, threads=cores, channels_last=name == "nhwc"))
        samples["peak_gflops"].append(matmul_peak(cores))
        print(f"  speed round {r + 1}/{rounds}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in samples.items()}
    chosen = (found.channels_last if found is not None else rt.channels_last is True)
    project = med["nhwc" if chosen else "nchw"]
    best = max(med["nhwc"], med["nchw"])
    if compile_check:
        project_step(images, net, cfg, 6, threads=cores, compile=True, channels_last=chosen)  # compile once (not timed)
        samples["compile"] = [project_step(images, net, cfg, steps, threads=cores, compile=True, channels_last=chosen)]
        med["compile"] = samples["compile"][0]

    loaded: dict[str, float] = {}
    if cores >= 2:
        with BusyCore():
            for name, threads in (("threads_all", cores), ("threads_1", 1), ("threads_auto", "auto")):
                loaded[name] = project_step(images, net, cfg, steps, threads=threads, channels_last=chosen)
            loaded["peak_gflops_1_thread"] = matmul_peak(1)

    stage = stage_vs_step(epochs=stage_epochs) if stage_epochs else None
    achieved = flops * project / cfg.batch_size / 1e9
    return {
        "cores": cores,
        "batch_size": cfg.batch_size,
        "architecture": (f"{net.family} 1x28x28, z {net.z_dim}, G {list(net.g_widths)}, D {list(net.d_widths)}, "
                         f"kernel {net.kernel}, spectral_norm {net.spectral_norm}; loss {cfg.loss}, "
                         f"EMA {cfg.ema_kimg > 0}, augment {list(cfg.augment)} (params.yaml)"),
        "flops_per_step": flops,
        "gflop_per_step": round(flops / 1e9, 2),
        "median": {k: round(v, 1) for k, v in med.items()} | {"project": round(project, 1)},
        "all": {k: [round(x, 1) for x in v] for k, v in samples.items()},
        "achieved_gflops": round(achieved, 1),
        "fraction_of_peak": round(achieved / med["peak_gflops"], 3),
        "speedup_vs_reference": round(project / med["reference"], 3),
        "channels_last_setting": rt.channels_last,
        "channels_last_chosen": chosen,
        "probe": None if found is None else {"describe": found.describe(), "speeds": found.speeds,
                                             "cached": found.cached, "seconds": found.seconds},
        "channels_last_ratio": round(med["nhwc"] / med["nchw"], 3),
        "chosen_layout_vs_best": round(project / best, 3),
        "compile_ratio": round(med["compile"] / project, 3) if "compile" in med else None,
        "one_core_busy": {k: round(v, 1) for k, v in loaded.items()},
        "auto_vs_1_thread_under_load": round(loaded["threads_auto"] / loaded["threads_1"], 3) if loaded else None,
        "stage_vs_step": stage,
        "reference_flops_note": "the reference computes D's weight gradients in the G step too (more FLOPs), "
                                "and has no EMA, spectral norm or hinge loss",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
