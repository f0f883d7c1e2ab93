"""The ``aigc`` command: small jobs around the pipeline (the pipeline itself is ``dvc repro``).

    aigc check-params [params.yaml]          validate params.yaml, print the resolved values
    aigc generate --model models/generator.pt -n 64 --seed 0 --out grid.png
"""

from __future__ import annotations

import argparse
import sys

from aigc.errors import UserError


def _check_params(args: argparse.Namespace) -> None:
    from aigc.config import flatten, load_params

    params = load_params(args.params)
    for key, value in flatten(params).items():
        print(f"{key} = {value!r}")
    print(f"{args.params}: OK", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    from aigc.images import make_grid, save_png
    from aigc.models import load_generator, sample

    if args.n < 1:
        raise UserError(f"-n must be at least 1, got {args.n}")
    G, cfg = load_generator(args.model)
    images = sample(G, cfg.z_dim, args.n, args.seed)
    save_png(make_grid(images), args.out)
    print(f"wrote {args.n} samples from {args.model} ({cfg.family}, {cfg.height}x{cfg.width}x{cfg.channels}) to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aigc", description="aigc: train, evaluate and register generative image models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-params", help="validate params.yaml and print every resolved value")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.set_defaults(func=_check_params)

    p = sub.add_parser("generate", help="sample images from a generator file into a PNG grid")
    p.add_argument("--model", required=True, help="generator file, e.g. models/generator.pt")
    p.add_argument("-n", type=int, default=64, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for z: same seed, same images (default: %(default)s)")
    p.add_argument("--out", default="samples.png", help="PNG to write (default: %(default)s)")
    p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
