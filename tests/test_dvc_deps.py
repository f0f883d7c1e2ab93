"""dvc.yaml keeps its promises: every project module a stage imports is one of its deps (or left out
on purpose, with the reason in dvc.yaml), and knobs that do not change a result are not params of
the stage, so changing them does not retrain."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from aigc.config import RuntimeConfig, TrainConfig

from tests.conftest import ROOT

OWN = ("aigc", "pipeline")


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from aigc import distributed`
    return {n for n in names if n.split(".")[0] in OWN}


def imported_files(entry: str) -> set[str]:
    """Every project file ``python -m entry`` imports, transitively (packages' __init__ included)."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            f = _module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(_imports(f))
    return {str(f.relative_to(ROOT)) for f in seen if f.read_text().strip()}  # an empty __init__ holds no code


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _ignored() -> set[str]:
    ignored: set[str] = set()
    for line in (ROOT / "dvc.yaml").read_text().splitlines():
        m = re.match(r"\s*#\s*deps-check:\s*ignore\s+(.*)", line)
        if m:
            ignored.update(m.group(1).split())
    return ignored


def _covered(f: str, entries) -> bool:
    """``f`` is one of ``entries`` or inside one of them (a folder: ``aigc/metrics``, ``aigc/tracking``)."""
    return any(f == e or f.startswith(e + "/") for e in entries)


def test_every_module_a_stage_imports_is_in_its_deps():
    ignored = _ignored()
    assert ignored, "dvc.yaml lost its deps-check comment"
    missing = {}
    for name, stage in _stages().items():
        m = re.match(r"python -m (pipeline\.\w+)", " ".join(stage["cmd"].split()))
        assert m, f"stage {name} is not run as python -m pipeline.<stage>"
        deps = [d.rstrip("/") for d in stage.get("deps", [])]
        uncovered = sorted(f for f in imported_files(m.group(1))
                           if not _covered(f, ignored) and not _covered(f, deps))
        if uncovered:
            missing[name] = uncovered
    assert not missing, f"modules imported but not in deps (add them to dvc.yaml): {missing}"


def test_the_checker_sees_imports_through_packages():
    # the train stage reaches aigc/models/dcgan.py only through aigc.models' build_generator
    files = imported_files("pipeline.train")
    assert {"aigc/models/__init__.py", "aigc/training/loop.py", "aigc/distributed.py", "aigc/stats.py"} <= files


def test_speed_and_logging_knobs_do_not_retrain():
    params = _stages()["train"]["params"]
    for knob in ("train", "tracking", "runtime", *(f"runtime.{k}" for k in RuntimeConfig.model_fields), "tracking.uri",
                 "tracking.experiment", "tracking.artifact_root", "tracking.retry_seconds"):
        assert knob not in params, f"train depends on {knob}: changing it would retrain for nothing"
    # ...while every other train knob is a param: a change of the recipe must retrain
    assert {f"train.{k}" for k in TrainConfig.model_fields} <= set(params)


def test_the_checkpoint_survives_a_rerun_of_its_stage():
    # DVC deletes a stage's outputs before it runs it again, unless they persist: the checkpoint
    # must, or a killed training could never go on from it (docs/faults.md, "Resume after a kill").
    outs = _stages()["train"]["outs"]
    assert {"models/checkpoint.pt": {"persist": True}} in outs
