"""aigc doctor: every line ok on a set-up project, and the fix named where it is not (a dead tracking
server, a wrong pin, telemetry turned back on, no DVC, a full disk); exit code 1 then."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml

from aigc import cli
from aigc.doctor import check_disk, run_checks
from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A set-up project: constraints.txt, params.yaml with a local store, DVC and git initialised."""
    shutil.copy2(ROOT / "constraints.txt", tmp_path / "constraints.txt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    analytics = false\n")
    (tmp_path / ".git").mkdir()
    return tmp_path


def shell(**extra: str) -> dict[str, str]:
    """A shell that exported nothing but PATH (with the venv's tools on it)."""
    return {"PATH": str(Path(sys.executable).parent)} | extra


def by_name(checks) -> dict[str, list]:
    out: dict[str, list] = {}
    for c in checks:
        out.setdefault(c.name, []).append(c)
    return out


def test_a_set_up_project_is_all_ok(project: Path):
    checks = run_checks(project, project / "params.yaml", shell())
    assert [c.line() for c in checks if c.failed] == []
    names = by_name(checks)
    assert {"python", "torch", "mlflow", "dvc", "prefect", "offline/quiet environment", "cpu", "cuda", "params", "dvc project",
            "mlflow store", "disk"} <= set(names)
    assert names["mlflow"][0].detail == "3.17.2"  # the pinned version, read from the installed package
    assert "no store file yet" in names["mlflow store"][0].detail
    assert "AVX2" in names["cpu"][0].detail and "PyTorch kernels" in names["cpu"][0].detail


def test_a_dead_tracking_server_is_named_with_the_fix(project: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture):
    uri = f"http://127.0.0.1:{free_port()}"
    [store] = by_name(run_checks(project, project / "params.yaml", shell(MLFLOW_TRACKING_URI=uri)))["mlflow store"]
    assert store.failed and uri in store.detail and "MLFLOW_TRACKING_URI" in store.detail
    assert "not reachable" in store.fix and "mlflow server" in store.fix

    # the command: one line per check, the failing one with its fix, exit code 1
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  mlflow store: {uri} (MLFLOW_TRACKING_URI) -> MLflow tracking server {uri} is not reachable" in out
    assert out.rstrip().endswith("1 problem(s)")


def test_a_live_local_store_answers(project: Path):
    from aigc.config import TrackingConfig
    from aigc.tracking import Run

    Run.start(TrackingConfig(uri=f"sqlite:///{project / 'mlflow.db'}", artifact_root=str(project / "art")),
              "r", {}, {}).end(True)
    [store] = by_name(run_checks(project, project / "params.yaml", shell()))["mlflow store"]
    assert not store.failed and store.detail.endswith("answers: 2 experiment(s)")  # Default and aigc


def test_a_version_off_its_pin_names_the_install_command(project: Path):
    (project / "constraints.txt").write_text((project / "constraints.txt").read_text()
                                             .replace("mlflow==3.17.2", "mlflow==3.1.0"))
    [mlflow] = by_name(run_checks(project, project / "params.yaml", shell()))["mlflow"]
    assert mlflow.failed and mlflow.detail == "3.17.2 installed, 3.1.0 pinned in constraints.txt"
    assert mlflow.fix.startswith("pip install -c constraints.txt 'mlflow==3.1.0'")


def test_telemetry_turned_back_on_is_wrong(project: Path):
    [bad] = by_name(run_checks(project, project / "params.yaml", shell(DO_NOT_TRACK="1")))["DO_NOT_TRACK"]
    assert bad.failed and bad.fix == "unset DO_NOT_TRACK (or export DO_NOT_TRACK=true)"


def test_no_dvc_no_git_and_a_bad_params_file_are_named(project: Path):
    shutil.rmtree(project / ".dvc")
    shutil.rmtree(project / ".git")
    (project / "params.yaml").write_text("train:\n  epochs: -1\n")
    checks = by_name(run_checks(project, project / "params.yaml", shell()))
    [dvc] = checks["dvc project"]
    assert dvc.failed and dvc.fix == "make dvc-init (or dvc init)"
    assert checks["git"][0].failed and "git init" in checks["git"][0].fix
    [params] = checks["params"]
    assert params.failed and "train.epochs" in params.detail


def test_too_little_free_disk_is_named(tmp_path: Path):
    [ok] = check_disk(tmp_path, min_free_gib=0.001)
    [low] = check_disk(tmp_path, min_free_gib=1e9)
    assert not ok.failed and low.failed and "dvc gc" in low.fix
