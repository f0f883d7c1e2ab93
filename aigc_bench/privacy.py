"""The privacy/quality trade-off: the default recipe non-private, and with DP-SGD on D at epsilon 10 and 1.

    python -m aigc_bench.privacy [--epochs 3] [--samples 2000] [--budgets none,10,1]

Builds the default data in memory (params.yaml's data section: 5,000 MNIST digits, 4,500 train),
trains the evaluator once (params.yaml's evaluator section), then trains params.yaml's model/train
recipe for ``--epochs`` epochs once per budget: ``none`` (non-private) and each epsilon (privacy.dp
with that target_epsilon, params.yaml's delta and max_grad_norm). Every run makes the same number of
D steps (a DP epoch has N // batch Poisson batches, as the plain epoch has N // batch batches).
The generator is scored after training: FID and its gap to the floor, and memorisation (the DCR
ratio, 1 = as far from the training set as fresh real images; the near-duplicate share), on
``--samples`` images; throughput is training images per second. Writes
reports/benchmarks/privacy.{json,md} with the CPU model, its flags and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from aigc import machine
from aigc.config import load_params
from aigc.metrics import calc_metrics, embed, reference
from aigc.models import draw, net_config
from aigc.training import train_gan
from aigc_bench.families import evaluator_setup

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.privacy", description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run, the same for all (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=2000, help="generated images per score (default: %(default)s)")
    ap.add_argument("--budgets", default="none,10,1", help="comma-separated: none and/or target epsilons")
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    load0 = os.getloadavg()

    data, train_x, test_x, enet, ev = evaluator_setup(params)
    # with pixels: the near-duplicate share is measured in pixel space
    ref = reference(ev, embed(ev, train_x).with_pixels(train_x), embed(ev, test_x).with_pixels(test_x),
                    data.train["labels"], args.samples, params.evaluate.seed)
    print(f"evaluator ready; {len(train_x)} train / {len(test_x)} test images", flush=True)

    net = net_config(params.model, data.info)
    labels = net.class_indices(data.train["labels"]) if net.conditional else None
    cfg = params.train.model_copy(update={"epochs": args.epochs})
    report = {"epochs": args.epochs, "batch_size": cfg.batch_size, "train_images": len(train_x),
              "samples_per_score": args.samples, "sample_size": ref.sample_size, "recipe": {
                  "model": params.model.model_dump(), "train": cfg.model_dump(mode="json")},
              "delta": params.privacy.dp.delta, "max_grad_norm": params.privacy.dp.max_grad_norm,
              "machine": machine.describe(), "cores": os.cpu_count(), "load_average_before": load0,
              "runs": {}}
    for budget in args.budgets.split(","):
        dp = None
        if budget != "none":
            dp = params.privacy.dp.model_copy(update={"enabled": True, "target_epsilon": float(budget)})
        load_start, t = os.getloadavg(), time.perf_counter()
        result = train_gan(cfg, net, train_x, params.seed, dp=dp, progress=False, labels=labels)
        wall = time.perf_counter() - t
        fake, _ = draw(result.generator, net.z_dim, args.samples, params.evaluate.seed)
        scores = calc_metrics(embed(ev, fake).with_pixels(fake), ref, params.evaluate, names=["fid", "memorisation"])
        row = {"d_steps": result.steps, "train_seconds": round(result.seconds, 1), "wall_seconds": round(wall, 1),
               "images_per_s": round(result.images_per_s, 1), "fid": round(scores["fid"], 3),
               "fid_floor": round(scores["fid_floor"], 3), "fid_gap": round(scores["fid"] - scores["fid_floor"], 3),
               "dcr_score": round(scores["dcr_score"], 4), "copy_share": round(scores["copy_share"], 4),
               "load_average_start": load_start, "load_average_end": os.getloadavg()}
        if result.recipe.privacy()["dp"]:
            row |= {k: v for k, v in result.recipe.privacy().items() if k != "dp"}
        name = "non-private" if dp is None else f"epsilon={budget}"
        report["runs"][name] = row
        print(f"{name}: {row}", flush=True)
    base = report["runs"].get("non-private")
    if base:
        for row in report["runs"].values():
            row["fid_gap_ratio"] = round(row["fid_gap"] / base["fid_gap"], 2) if base["fid_gap"] > 0 else None
            row["throughput_ratio"] = round(row["images_per_s"] / base["images_per_s"], 3)
    report["load_average_after"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "privacy.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Privacy/quality trade-off ({args.epochs} epochs, {cfg.batch_size}-image batches, "
             f"{len(train_x)} train images)", "",
             f"CPU: {machine.one_line(report['machine'])}; load average before {load0[0]:.1f}, after "
             f"{report['load_average_after'][0]:.1f} (the machine is shared).", "",
             "| run | D steps | sigma | epsilon (delta) | FID | FID gap | gap / non-private | DCR ratio | copy share | img/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["runs"].items():
        eps = f"{r['epsilon']:.3g} ({r['delta']:g})" if "epsilon" in r else "-"
        lines.append(f"| {name} | {r['d_steps']} | {r.get('noise_multiplier', '-')} | {eps} | {r['fid']:.2f} | "
                     f"{r['fid_gap']:.2f} | {r.get('fid_gap_ratio', '-')} | {r['dcr_score']:.3f} | "
                     f"{r['copy_share']:.3f} | {r['images_per_s']:.0f} |")
    lines += ["", f"CPU vector flags: {' '.join(report['machine']['vector_flags'])}", ""]
    (OUT / "privacy.md").write_text("\n".join(lines))
    print(f"wrote {OUT / 'privacy.json'} and privacy.md")


if __name__ == "__main__":
    main()
