"""The docs: the README stays a short front page, the MkDocs site builds offline with --strict (a
broken link or nav entry fails), the params reference is generated from the config models, and the
paths and make targets the pages name exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import yaml

from aigc.config import flatten, load_params
from tests.conftest import ROOT

# Paths a run creates (outputs, stores, caches): named in the docs, not in the repository.
OUTPUTS = ("data/", "reports/", "models/", "mlflow.db", "mlartifacts", ".cache/", ".services/", ".prefect/", "site/",
           ".venv", ".vendor/", "mlruns", "aigc_bench/.work", "aigc_bench/.work", ".dvc/")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", "\n".join(lines)), "dated figures belong in aigc_bench/README.md"


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"(?m)^([a-z][a-z-]*):", (ROOT / "Makefile").read_text()))
    named = {t for p in pages() for t in re.findall(r"`make ([a-z][a-z-]*)", p.read_text(encoding="utf-8"))}
    assert named and not named - targets, f"make targets named but missing: {sorted(named - targets)}"


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for page in pages():
        for span in re.findall(r"`([^`\s]+)`", page.read_text(encoding="utf-8")):
            path = span.split("::")[0].rstrip(".,:;)")
            if "/" not in path or any(c in path for c in "<>*{}$=~@") or "..." in path or path.startswith(
                    ("/", "http", "s3:", "ssh:", "models:", "sqlite:", "file:", "-")) or path.startswith(OUTPUTS):
                continue
            top = path.split("/")[0]  # a path into one of the repository's own folders (not an MLflow key)
            if (ROOT / top).is_dir() and re.fullmatch(r"[a-z_.]+(/[A-Za-z0-9_.-]+)+/?", path) and not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing


def _hook():
    spec = importlib.util.spec_from_file_location("params_reference", ROOT / "docs/hooks/params_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_params_reference_lists_every_key_of_params_yaml_with_its_default():
    page = _hook().reference()
    for key, value in flatten(load_params(ROOT / "params.yaml")).items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} is not in the params reference"
        assert f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`" in row \
            or f"`{__import__('json').dumps(value)}`" in row, (key, row)


def test_the_site_builds_offline_with_strict(tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "aigc.environment", sys.executable, "-m", "mkdocs", "build",
                          "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    html = (tmp_path / "site" / "reference" / "params" / "index.html").read_text(encoding="utf-8")
    assert "runtime.threads" in html and "fonts.googleapis.com" not in html
