"""A full disk, injected for real: the writing process runs under RLIMIT_FSIZE, so its writes fail
with EFBIG exactly as they would with ENOSPC. The stage says so in one line and the previous output
survives byte for byte."""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _limited(max_bytes: int):
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return set_limit


@pytest.mark.slow
def test_ingest_on_a_full_disk_keeps_the_previous_output_and_says_so(tmp_path: Path):
    from aigc.config import DataConfig
    from pipeline.ingest import ingest

    ingest(DataConfig(source="digits"), str(tmp_path / "raw"))  # the previous output: 1,797 8x8 digits, ~120 kB
    before = _tree_digest(tmp_path / "raw")
    (tmp_path / "params.yaml").write_text("data:\n  source: mnist5k\n")  # 5,000 28x28 digits need ~4 MB
    # The limit applies to the stage process only; the Prefect server beside it (as in `make run`)
    # keeps its own database writable, so what the test sees is the stage's own handling.
    stage = (f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000)); "
             f"os.execv(sys.executable, [sys.executable, '-m', 'pipeline.ingest', '--params', "
             f"{str(tmp_path / 'params.yaml')!r}, '--out', {str(tmp_path / 'raw')!r}])")
    res = subprocess.run([sys.executable, "-m", "aigc.services.prefect_server", sys.executable, "-c", stage],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    err = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "file too large for this filesystem or limit (EFBIG)" in err[0] and "is untouched" in err[0], err[0]
    assert _tree_digest(tmp_path / "raw") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []  # no temp leftovers


def test_save_torch_and_write_json_on_a_full_disk(tmp_path: Path):
    """In-process twin of the test above, for the checkpoint writer and JSON outputs (fast)."""
    script = f"""
import sys, torch
from aigc.errors import UserError
from aigc.io import save_torch, write_json
for write in (lambda: save_torch({{"w": torch.zeros(100_000)}}, {str(tmp_path / 'ckpt.pt')!r}),
              lambda: write_json({str(tmp_path / 'm.json')!r}, {{"x": "y" * 200_000}})):
    try:
        write()
    except UserError as exc:
        print(exc)
    else:
        sys.exit("written despite the limit")
"""
    (tmp_path / "ckpt.pt").write_bytes(b"previous checkpoint")
    (tmp_path / "m.json").write_text("{}\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         preexec_fn=_limited(100_000))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all("(EFBIG)" in line and "is untouched" in line for line in lines), res.stdout
    assert (tmp_path / "ckpt.pt").read_bytes() == b"previous checkpoint"
    assert (tmp_path / "m.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "m.json"]
