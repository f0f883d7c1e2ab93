"""The ``aigc`` command: small jobs around the pipeline (the pipeline itself is ``dvc repro``).

    aigc check-params [params.yaml]          validate params.yaml, print the resolved values
    aigc generate --model models/generator.pt -n 64 --seed 0 --out grid.png
    aigc generate --model models:/aigc-generator@champion -n 64 --seed 0 --label 3 --out grid.png
    aigc report [RUN_ID] [--out run.html]   the one-page run report, rebuilt from MLflow (default: ./run-<id>.html)
    aigc doctor                              is this machine set up? (exit code 1 when not)
    aigc example-data photos32 data/source/photos32    a folder of example images (digits | photos32 | digits64)
    aigc keygen --out ~/.config/aigc/data.key              a new data key (privacy.encrypt_at_rest)
    aigc rekey data/raw data/validated data/processed --new-key-file NEW  re-encrypt under a new key

``--label`` on a conditional model (model.conditional: true) uses its own conditioning; on an
unconditional one it rejection-samples with the evaluator classifier (aigc/sampling.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from aigc.errors import UserError


def _check_params(args: argparse.Namespace) -> None:
    from aigc.config import flatten, load_params

    params = load_params(args.params)
    for key, value in flatten(params).items():
        print(f"{key} = {value!r}")
    print(f"{args.params}: OK", file=sys.stderr)


def _model_files(args: argparse.Namespace, tmp: str) -> tuple[dict[str, Path], str]:
    """The generator (and evaluator) files behind --model: a local file, or a registered
    version (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) downloaded into ``tmp``."""
    if args.model.startswith("models:"):
        from aigc.tracking import Registry

        from aigc.config import TrackingConfig, load_section

        # MLFLOW_TRACKING_URI if set, else params.yaml's tracking.uri: the pipeline's own rule
        registry = Registry.open(load_section(args.params, "tracking", TrackingConfig))
        version = registry.resolve(args.model)
        files = registry.download(version, tmp)
        what = f"{args.model} (version {version.version})"
    else:
        files, what = {"generator": Path(args.model)}, args.model
    if args.evaluator:
        files["evaluator"] = Path(args.evaluator)
    return files, what


def _generate(args: argparse.Namespace) -> None:
    from aigc.images import make_grid, save_png
    from aigc.models import load_generator
    from aigc.sampling import generate

    with tempfile.TemporaryDirectory(prefix="aigc-generate-") as tmp:
        files, what = _model_files(args, tmp)
        G, cfg = load_generator(files["generator"])
        evaluator = None
        # A conditional generator makes the class itself; only an unconditional one needs the evaluator.
        if args.label is not None and not cfg.conditional and "evaluator" in files:
            from aigc.metrics.evaluator import load_evaluator  # loads torchmetrics: only for labels

            evaluator = load_evaluator(files["evaluator"])
        images = generate(G, cfg, args.n, args.seed, args.label, evaluator)
    save_png(make_grid(images), args.out)
    label = f" of class {args.label}" if args.label is not None else ""
    how = ""
    if args.label is not None:
        how = "; conditioned on the class" if cfg.conditional else "; class by rejection with the evaluator"
    kind = f"conditional {cfg.family}" if cfg.conditional else cfg.family
    print(f"wrote {args.n} samples{label} from {what} ({kind}, {cfg.height}x{cfg.width}x{cfg.channels}{how}) "
          f"to {args.out}")


def _stage_path(stage: str, flag: str, dvc_yaml: str = "dvc.yaml") -> str:
    """The path a stage's command passes as ``flag`` in ``dvc_yaml``: paths live in dvc.yaml only."""
    import shlex

    import yaml

    try:
        cmd = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"][stage]["cmd"]
        argv = shlex.split(cmd)
        return argv[argv.index(flag) + 1]
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(f"cannot read the {stage} stage's {flag} path from {dvc_yaml} ({type(exc).__name__}); run "
                        f"this in the project folder, or pass the file (--run-file) or a run id") from None


def _report(args: argparse.Namespace) -> None:
    import json

    from aigc.config import TrackingConfig, load_section
    from aigc.io import atomic_path
    from aigc.run_report import ARTIFACT_FOLDERS, artifact_files, render_page
    from aigc.tracking import fetch_run, resolve_uri

    run_id, uri = args.run_id, None
    if run_id is None:  # the workspace's run: the one the run file names
        args.run_file = args.run_file or _stage_path("report", "--run")
        try:
            info = json.loads(Path(args.run_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"no RUN_ID given and {args.run_file} cannot be read ({type(exc).__name__}); pass a "
                            f"run id (the MLflow UI shows it) or train first (dvc repro)") from None
        run_id, uri = info.get("run_id"), info.get("tracking_uri")
        if not run_id:
            raise UserError(f"{args.run_file} names no MLflow run (tracking was off); pass a run id")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri or resolve_uri(load_section(args.params, "tracking",
                                                                                     TrackingConfig))
    with tempfile.TemporaryDirectory(prefix="aigc-report-") as tmp:
        record = fetch_run(uri, run_id, tmp, ARTIFACT_FOLDERS)
        extra = {"run_id": record.run_id, "run_name": record.run_name, "experiment": record.experiment,
                 "tracking_uri": uri, "params": record.params, "tags": record.tags}
        page = render_page(artifact_files(Path(tmp), extra))
    out = args.out or f"run-{record.run_id[:8]}.html"  # the run's own id, though RUN_ID was a prefix
    with atomic_path(out) as path:
        path.write_text(page, encoding="utf-8")
    print(f"wrote {out}: the report of MLflow run {record.run_id} ({record.run_name}) in {uri}")


def _doctor(args: argparse.Namespace) -> int:
    environ = dict(os.environ)  # as the shell set it, before aigc adds its quiet variables
    from aigc.doctor import run_checks

    checks = run_checks(Path.cwd(), Path(args.params), environ)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if c.failed]
    print(f"{len(failed)} problem(s)" if failed else "all ok")
    return 1 if failed else 0
def _example_data(args: argparse.Namespace) -> None:
    from aigc.data.examples import write_example

    counts = write_example(args.kind, args.out, args.n, args.seed)
    where = ", ".join(f"{k}/ {v}" if k != "." else f"{v} flat" for k, v in counts.items())
    print(f"wrote {sum(counts.values())} images to {args.out} ({where}); train on them with:\n"
          f"  dvc exp run -S data.source=folder -S data.path={args.out}")


def _keygen(args: argparse.Namespace) -> None:
    import os

    from aigc.encryption import KEY_FILE_ENV, generate_key

    out = Path(args.out).expanduser().resolve()
    here = Path.cwd().resolve()
    if out == here or here in out.parents:
        raise UserError(f"{out} lies inside this project, where git or DVC could copy it; write the key outside "
                        "the repository (e.g. ~/.config/aigc/data.key)")
    if out.exists():
        raise UserError(f"{out} exists; a key is never overwritten (data encrypted with it would be lost)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # readable by its owner only
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(generate_key() + "\n")
    print(f"wrote a new 256-bit data key to {out} (mode 600); use it with: export {KEY_FILE_ENV}={out}")


def _rekey(args: argparse.Namespace) -> None:
    from aigc.encryption import key_from_env, parse_key, rekey

    old = key_from_env()
    try:
        new = parse_key(Path(args.new_key_file).expanduser().read_text(encoding="ascii"),
                        f"--new-key-file {args.new_key_file}")
    except OSError as exc:
        raise UserError(f"--new-key-file {args.new_key_file} cannot be read ({type(exc).__name__})") from None
    for folder in args.folders:
        files = rekey(folder, old, new)
        print(f"re-encrypted {len(files)} file(s) in {folder} under the new key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aigc", description="aigc: train, evaluate and register generative image models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-params", help="validate params.yaml and print every resolved value")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.set_defaults(func=_check_params)

    p = sub.add_parser("generate", help="sample images from a generator (file or registered model) into a PNG grid")
    p.add_argument("--model", required=True,
                   help="generator file (models/generator.pt) or registered model (models:/aigc-generator@champion, "
                        "models:/aigc-generator/3)")
    p.add_argument("--label", type=int, default=None,
                   help="images of this class: a conditional model makes it directly; for an unconditional one, "
                        "only images the evaluator classifies as it (rejection sampling; needs an evaluator)")
    p.add_argument("--evaluator", default=None,
                   help="evaluator file for --label with a generator file (models/evaluator.pt); a registered "
                        "model carries its own")
    p.add_argument("--params", default="params.yaml",
                   help="params file whose tracking.uri holds registered models, unless MLFLOW_TRACKING_URI is set "
                        "(default: %(default)s)")
    p.add_argument("-n", type=int, default=64, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for z: same seed, same images (default: %(default)s)")
    p.add_argument("--out", default="samples.png", help="PNG to write (default: %(default)s)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("report", help="the one-page report of a run (samples, losses, scores beside floors, the "
                                      "registry's decision, lineage), rebuilt from its MLflow artifacts")
    p.add_argument("run_id", nargs="?", default=None,
                   help="MLflow run id, or its start (the 8 characters of run-<id>.html will do) when no other run "
                        "id starts the same (default: the run the run file names)")
    p.add_argument("--out", default=None,
                   help="HTML file to write (default: run-<first 8 of the id>.html in the current folder; the "
                        "report stage's own page, reports/run.html, is left alone)")
    p.add_argument("--run-file", default=None,
                   help="run file naming the default run (default: the report stage's --run in ./dvc.yaml)")
    p.add_argument("--params", default="params.yaml",
                   help="params file whose tracking.uri holds the run, unless MLFLOW_TRACKING_URI is set or the run "
                        "file names its store (default: %(default)s)")
    p.set_defaults(func=_report)

    p = sub.add_parser("doctor", help="check this machine's set-up: pinned versions, offline settings, CPU, CUDA, "
                                      "the MLflow store, DVC, disk; exit code 1 when something is wrong")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("example-data", help="write a folder of example images to try data.source: folder "
                                            "(digits: unlabelled grey 28x28; photos32: RGB 32x32 in china/ and "
                                            "flower/; digits64: unlabelled RGB 64x64), made offline")
    p.add_argument("kind", choices=["digits", "photos32", "digits64"])
    p.add_argument("out", help="folder to create (must be new or empty)")
    p.add_argument("-n", type=int, default=2000, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="crops and colours follow from it (default: %(default)s)")
    p.set_defaults(func=_example_data)

    p = sub.add_parser("keygen", help="write a new random data key (privacy.encrypt_at_rest) to a file outside the repository")
    p.add_argument("--out", required=True, help="key file to create (mode 600; never overwritten)")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("rekey", help="re-encrypt encrypted data folders from the current key ($AIGC_DATA_KEY or "
                                     "$AIGC_DATA_KEY_FILE) to a new one (key rotation)")
    p.add_argument("folders", nargs="+", help="folders holding *.enc files (data/raw data/validated)")
    p.add_argument("--new-key-file", required=True, help="the new key's file (aigc keygen --out ...)")
    p.set_defaults(func=_rekey)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
