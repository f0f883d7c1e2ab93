"""``aigc doctor``: is this machine set up to run the pipeline? One line per check, ``ok`` or what
is wrong and what to do; the exit code is non-zero when something is wrong.

Checks: the pinned stack (installed versions against constraints.txt), the offline/quiet
environment (aigc/environment.py; a telemetry switch the user turned back on is wrong), the CPU's
vector extensions and what PyTorch uses of them, CUDA, params.yaml, the MLflow tracking store
(``MLFLOW_TRACKING_URI`` or ``tracking.uri``: reachable?), DVC and git (initialised?), free disk.
Information that is not a fault (no AVX-512, no CUDA) is reported as ``info``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from aigc import environment

# The stack whose versions matter (docs/development.md, "The stack": the combinations known to work together).
STACK = ("torch", "numpy", "pandas", "scikit-learn", "pydantic", "mlflow", "prefect", "fastapi", "SQLAlchemy", "dvc",
         "great-expectations", "torchmetrics", "Jinja2")
# Telemetry and analytics switches: a value other than aigc's means the tools try to phone home.
TELEMETRY = ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED", "DVC_NO_ANALYTICS",
             "GX_ANALYTICS_ENABLED")
MIN_FREE_GIB = 2.0  # a default run writes well under 1 GiB; the DVC cache and MLflow artifacts grow per run


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | info | FAIL
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        text = f"{self.status:<5} {self.name}: {self.detail}"
        return text + (f" -> {self.fix}" if self.fix else "")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(constraints: Path) -> dict[str, str]:
    pins = {}
    for line in constraints.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def check_stack(constraints: Path) -> list[Check]:
    if not constraints.is_file():
        return [Check("stack", "FAIL", f"{constraints} not found",
                      "run aigc doctor in the project folder (where constraints.txt is)")]
    pins = read_pins(constraints)
    out = []
    for name in STACK:
        want = pins.get(_norm(name))
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(Check(name, "FAIL", f"not installed (pinned {want})", "make install"))
            continue
        if want is None:
            out.append(Check(name, "info", f"{have} (not pinned in {constraints.name})"))
        elif have.split("+")[0] != want.split("+")[0]:
            out.append(Check(name, "FAIL", f"{have} installed, {want} pinned in {constraints.name}",
                             f"pip install -c {constraints.name} '{name}=={want}' (or make install)"))
        else:
            out.append(Check(name, "ok", have))
    return out


def check_environment(environ: Mapping[str, str]) -> list[Check]:
    """The quiet variables as this shell has them; aigc sets each one that is unset when it starts."""
    out = []
    for key, value in environment.quiet(Path.cwd()).items():
        have = environ.get(key)
        if have is None:
            continue
        if key in TELEMETRY and have != value:
            out.append(Check(key, "FAIL", f"{have!r} turns telemetry on (aigc's value: {value!r})",
                             f"unset {key} (or export {key}={value})"))
        elif have != value and key != "PREFECT_HOME":
            out.append(Check(key, "info", f"{have!r} (yours; aigc's default would be {value!r})"))
    unset = [k for k in environment.quiet(Path.cwd()) if k not in environ]
    out.insert(0, Check("offline/quiet environment", "ok",
                        f"{len(environment.quiet(Path.cwd())) - len(unset)} of its variables exported here, the "
                        f"other {len(unset)} set by aigc when it starts (aigc/environment.py); `make ui` and "
                        f"`make serve` run under it too"))
    return out


def check_cpu() -> list[Check]:
    import torch

    from aigc.machine import cpu

    info = cpu()
    model, flags = info["model"], set(info["flags"])
    have = {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags, "AVX-512 BF16": "avx512_bf16" in flags,
            "AMX": "amx_tile" in flags}
    uses = torch.backends.cpu.get_cpu_capability()
    text = (f"{model}, {info['logical_cpus']} logical cores; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items())
            + f"; PyTorch kernels: {uses}")
    if not have["AVX2"] and flags:
        return [Check("cpu", "info", text + " (no AVX2: expect training several times slower than the README's figures)")]
    return [Check("cpu", "ok", text)]


def check_cuda(train_device: str | None) -> list[Check]:
    import torch

    if torch.cuda.is_available():
        return [Check("cuda", "ok", f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}; "
                                    f"runtime.device auto uses it (bf16 autocast)")]
    if train_device == "cuda":
        return [Check("cuda", "FAIL", "no CUDA device, but params.yaml asks for runtime.device: cuda",
                      "set runtime.device: auto (or cpu)")]
    return [Check("cuda", "info", f"no CUDA device (PyTorch {torch.__version__}): training runs on the CPU")]


def check_params(params: Path) -> tuple[list[Check], object | None]:
    from aigc.config import load_params
    from aigc.errors import ConfigError

    if not params.is_file():
        return [Check("params", "FAIL", f"{params} not found", "run aigc doctor in the project folder")], None
    try:
        loaded = load_params(params)
    except ConfigError as exc:
        return [Check("params", "FAIL", str(exc), f"fix {params} (aigc check-params {params})")], None
    return [Check("params", "ok", f"{params} is valid")], loaded


def check_tracking(cfg, environ: Mapping[str, str]) -> list[Check]:
    if not cfg.enabled:
        return [Check("mlflow store", "info", "tracking.enabled: false: nothing is recorded")]
    from aigc.errors import UserError
    from aigc.tracking import check_store

    uri = environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    source = "MLFLOW_TRACKING_URI" if environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    try:
        what = check_store(uri)
    except UserError as exc:
        return [Check("mlflow store", "FAIL", f"{uri} ({source})", str(exc))]
    return [Check("mlflow store", "ok", f"{uri} ({source}) answers: {what}")]


def check_dvc(root: Path, path: str | None = None) -> list[Check]:
    out = []
    if shutil.which("dvc", path=path) is None:
        out.append(Check("dvc command", "FAIL", "the dvc command is not on PATH", "source .venv/bin/activate (or make install)"))
    if not (root / ".dvc").is_dir():
        out.append(Check("dvc project", "FAIL", f"{root} is not a DVC project (no .dvc/)", "make dvc-init (or dvc init)"))
    else:
        config = (root / ".dvc" / "config").read_text() if (root / ".dvc" / "config").is_file() else ""
        quiet = "analytics = false" in config
        out.append(Check("dvc project", "ok" if quiet else "FAIL", "initialised" + ("" if quiet else ", but analytics are on"),
                         "" if quiet else "dvc config core.analytics false (make dvc-init)"))
    if not (root / ".git").exists():
        out.append(Check("git", "FAIL", f"{root} is not a git repository: dvc exp run needs a commit to start from",
                         "git init && git add -A && git commit -m start"))
    return out


def check_disk(root: Path, min_free_gib: float = MIN_FREE_GIB) -> list[Check]:
    free = shutil.disk_usage(root).free / 2**30
    if free < min_free_gib:
        return [Check("disk", "FAIL", f"{free:.1f} GiB free under {root} (< {min_free_gib:g} GiB)",
                      "free space: dvc gc -w removes unused cache entries; rm -rf .cache/eval")]
    return [Check("disk", "ok", f"{free:.1f} GiB free under {root}")]


def run_checks(root: Path, params: Path, environ: Mapping[str, str] | None = None) -> list[Check]:
    """Every check, for the project at ``root`` with ``params``; ``environ`` is the shell's
    environment as it was before aigc added its own variables (default: this process's)."""
    env = dict(os.environ if environ is None else environ)
    checks = [Check("python", "ok" if sys.version_info[:2] == (3, 11) else "FAIL", sys.version.split()[0],
                    "" if sys.version_info[:2] == (3, 11) else "use Python 3.11 (pyproject.toml)")]
    checks += check_stack(root / "constraints.txt")
    checks += check_environment(env)
    checks += check_cpu()
    param_checks, loaded = check_params(params)
    checks += param_checks
    checks += check_cuda(loaded.runtime.device if loaded is not None else None)
    if loaded is not None:
        checks += check_tracking(loaded.tracking, env)
    checks += check_dvc(root, env.get("PATH"))
    checks += check_disk(root)
    return checks
