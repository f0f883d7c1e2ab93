"""Time to quality: FID (with its floor) against training wall-clock for the default recipe.

    python -m benchmarks.time_to_quality [--every 3]      # after `make run` (~8 min)

Trains the default run (params.yaml: seed, model, train) on the workspace's processed data and
scores a snapshot of the generator every ``--every`` epochs with the evaluator the pipeline
trained (models/evaluator.pt), after training, so scoring never counts as training time.
Writes reports/benchmarks/time_to_quality.{json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from aigc.config import load_params
from aigc.data.preprocess import load_info, load_split
from aigc.errors import UserError
from aigc.metrics import calc_metrics, embed, reference
from aigc.metrics.evaluator import load_evaluator
from aigc.models import build_generator, net_config, sample
from aigc.training import EpochEnd, train_gan

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.time_to_quality", description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=3, help="epochs between scored snapshots (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=2000, help="generated images per score (default: %(default)s)")
    ap.add_argument("--processed", default=str(ROOT / "data" / "processed"))
    ap.add_argument("--evaluator", default=str(ROOT / "models" / "evaluator.pt"))
    args = ap.parse_args()
    try:
        params = load_params(ROOT / "params.yaml")
        info = load_info(args.processed)
        ev = load_evaluator(args.evaluator)
    except UserError as exc:
        sys.exit(f"error: {exc} (run `make run` first: this benchmark uses its data and evaluator)")
    train, test = load_split(args.processed, "train"), load_split(args.processed, "test")
    net = net_config(params.model, info)
    cfg = params.train.model_copy(update={"sample_every": args.every})
    load0 = os.getloadavg()

    snapshots: list[tuple[int, float, dict]] = []

    def snapshot(end: EpochEnd) -> None:
        snapshots.append((end.epoch, end.seconds, copy.deepcopy(end.G.state_dict())))

    result = train_gan(cfg, net, torch.from_numpy(train["images"]), params.seed, on_epoch=snapshot)

    ref = reference(ev, embed(ev, train["images"]), embed(ev, test["images"]), train["labels"], args.samples,
                    params.evaluate.seed)
    G = build_generator(net)
    rows = []
    for epoch, seconds, state in snapshots:
        G.load_state_dict(state)
        fake = embed(ev, sample(G, net.z_dim, args.samples, params.evaluate.seed))
        scores = calc_metrics(fake, ref, params.evaluate, names=["fid"])
        rows.append({"epoch": epoch, "train_seconds": round(seconds, 1), "fid": round(scores["fid"], 3),
                     "fid_floor": round(scores["fid_floor"], 3)})
        print(f"epoch {epoch:3d}  {seconds:6.0f} s  FID {scores['fid']:.2f} (floor {scores['fid_floor']:.2f})")

    OUT.mkdir(parents=True, exist_ok=True)
    report = {"recipe": {"model": params.model.model_dump(), "train": params.train.model_dump(), "seed": params.seed},
              "samples_per_score": args.samples, "sample_size": ref.sample_size, "images_per_s": round(result.images_per_s, 1),
              "threads": result.threads, "load_average_before": load0, "load_average_after": os.getloadavg(),
              "curve": rows}
    (OUT / "time_to_quality.json").write_text(json.dumps(report, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["train_seconds"] for r in rows], [r["fid"] for r in rows], "o-", label="generator")
    ax.plot([r["train_seconds"] for r in rows], [r["fid_floor"] for r in rows], "--", color="grey",
            label="floor (real test vs train)")
    for r in rows:
        ax.annotate(str(r["epoch"]), (r["train_seconds"], r["fid"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    ax.set(xlabel="training wall-clock (s)", ylabel="FID (evaluator features)", yscale="log",
           title=f"Time to quality: {params.model.family}, batch {cfg.batch_size}, {result.images_per_s:.0f} img/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "time_to_quality.png")
    print(f"wrote {OUT / 'time_to_quality.json'} and time_to_quality.png")


if __name__ == "__main__":
    main()
