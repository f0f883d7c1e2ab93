"""`dvc plots show` offline: the page built by `make plots-template` (vega, vega-lite and
vega-embed from npm, inlined) loads no script from the network, and headless Chromium draws the
losses chart from it (a non-blank screenshot). Needs npm (skipped without); Chromium is optional."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigc.errors import UserError
from pipeline.plots_template import build_template

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def packages() -> list[str]:
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("VEGA_PACKAGES"))
    return line.split(":=")[1].split()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    root = tmp_path_factory.mktemp("plots")
    vendored = ROOT / ".vendor/npm"  # `make install` already fetched them: reuse, else fetch
    packs = vendored if vendored.is_dir() and len(list(vendored.glob("*.tgz"))) == 3 else root / "npm"
    if packs != vendored:
        packs.mkdir()
        subprocess.run(["npm", "pack", "--silent", "--pack-destination", str(packs), *packages()], check=True,
                       capture_output=True, timeout=300)
    return build_template(packs, root / "template.html")


def test_template_errors_name_the_folder(tmp_path: Path):
    with pytest.raises(UserError, match=r"0 vega-<version>.tgz packs, expected one; .*make plots-template"):
        build_template(tmp_path, tmp_path / "t.html")
    assert not (tmp_path / "t.html").exists()


def test_dvc_plots_show_with_the_template_is_offline_and_draws_the_losses(template: Path, tmp_path: Path):
    project = tmp_path / "p"
    (project / "reports/train").mkdir(parents=True)
    steps = np.arange(1, 201)
    rows = [f"{s},{1.4 - 0.3 * np.log(s) / 5:.4f},{0.7 + 0.4 * np.sin(s / 20):.4f}" for s in steps]
    (project / "reports/train/losses.csv").write_text("step,d_loss,g_loss\n" + "\n".join(rows) + "\n")
    (project / "dvc.yaml").write_text("plots:\n  - GAN losses per step:\n      template: linear\n      x: step\n"
                                      "      y:\n        reports/train/losses.csv: [d_loss, g_loss]\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=project, check=True)
    out = subprocess.run([*dvc, "plots", "show", "--html-template", str(template), "-o", "html"], cwd=project,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    page = (project / "html/index.html").read_text()
    assert "vegaEmbed" in page and "GAN losses per step" in page
    assert not re.search(r"<script[^>]*\bsrc\s*=", page), "a script is loaded from a file or URL"
    assert not re.search(r"<link[^>]*https?://", page)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return
    shot = tmp_path / "plots.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={shot}", "--window-size=800,500",
                    "--virtual-time-budget=5000", (project / "html/index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    chart = pixels[30:340, 40:350]  # the chart's area, where the lines are drawn
    assert (chart < 200).mean() > 0.02, "the chart area is (nearly) blank"
    assert pixels.std() > 10
