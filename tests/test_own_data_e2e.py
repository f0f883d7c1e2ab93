"""Your own images, end to end: three example folders (``aigc example-data``) go through the real
pipeline with ``dvc exp run -S data.source=folder -S data.path=...``, as the README says, up to the
registry's decision and the run report -- an unlabelled flat folder of grey 28x28 digits, 32x32 RGB
photo crops in word-named class folders, and an unlabelled flat folder of 64x64 RGB digits. Tiny
copies (160 images, one epoch): what is checked is that every stage works on each shape, scores in
the right feature space and says what it cannot score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from aigc.data.examples import write_example
from tests.conftest import assert_score, sh, tiny_project

pytestmark = pytest.mark.slow

N = 160  # >= validate.min_records (100) after the 10% test split is taken


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_project(tmp_path_factory.mktemp("own-data"), **{"evaluator__contrastive__epochs": 1,
                                                               "evaluator__contrastive__batch_size": 32})
    for kind in ("digits", "photos32", "digits64"):
        write_example(kind, root / "data/source" / kind, n=N)
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "t"], root)
    sh(["dvc", "init", "-q"], root)
    sh(["dvc", "config", "core.analytics", "false"], root)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "baseline"], root)
    return root


def exp_run(project: Path, kind: str) -> dict:
    """``dvc exp run`` on the example folder ``kind``; what the workspace then holds."""
    # under one Prefect server for the run's stages, as `make run` does (each stage would start its own)
    sh(["-m", "aigc.services.prefect_server", "dvc", "exp", "run", "--name", kind, "-S", "data.source=folder",
        "-S", f"data.path=data/source/{kind}"], project)
    read = lambda f: json.loads((project / f).read_text())  # noqa: E731
    return {"info": read("data/processed/dataset.json"), "evaluator": read("reports/evaluator/metrics.json"),
            "metrics": read("reports/metrics.json"), "registry": read("reports/registry.json"),
            "page": (project / "reports/run.html").read_text(), "run": read("models/run.json")}


def decided_with_a_reason(registry: dict) -> None:
    assert registry["outcome"] in ("promoted", "refused"), registry
    assert registry["reason"] and registry["version"], registry


def test_an_unlabelled_folder_of_grey_digits_is_scored_in_a_self_supervised_space(project: Path):
    out = exp_run(project, "digits")
    assert out["info"]["resolution"] == [28, 28] and out["info"]["channels"] == 1 and out["info"]["classes"] == []
    assert out["evaluator"]["objective"] == "contrastive" and "test_view_retrieval" in out["evaluator"]
    m = out["metrics"]
    assert m["features"] == "contrastive" and m["classes"] == 0
    for name in ("fid", "kid", "precision", "recall", "density", "coverage", "dcr_score", "copy_share"):
        assert_score(m, name)
    assert m["not_available"] == {k: "not available: unlabelled" for k in ("is", "modes", "class_kl",
                                                                         "label_accuracy")}
    assert not {"is", "modes", "label_accuracy"} & set(m)
    decided_with_a_reason(out["registry"])
    gates = out["registry"]["decision"]["gates"]
    assert gates["modes"]["observed"] == "not available: unlabelled" and gates["modes"]["passed"]
    assert "not available: unlabelled" in out["page"] and out["run"]["run_id"] in out["page"]
    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(out["run"]["run_id"])
    assert run.data.tags["eval.features"] == "contrastive" and "eval/fid" in run.data.metrics
    assert run.data.tags["score.modes"] == "not available: unlabelled"


def test_rgb_32_in_word_named_class_folders_gets_the_classifier_and_a_conditional_model(project: Path):
    out = exp_run(project, "photos32")
    info = out["info"]
    assert info["resolution"] == [32, 32] and info["channels"] == 3 and len(info["classes"]) == 2
    assert sorted(info["class_names"].values()) == ["china", "flower"]
    assert out["evaluator"]["objective"] == "classifier" and 0 <= out["evaluator"]["test_accuracy"] <= 1
    m = out["metrics"]
    assert m["features"] == "classifier" and m["classes"] == 2 and m["not_available"] == {}
    assert {"fid", "is", "modes", "label_accuracy"} <= set(m)
    assert out["run"]["net"]["conditional"] is True
    decided_with_a_reason(out["registry"])


def test_an_unlabelled_folder_of_rgb_64_trains_and_is_registered_or_refused(project: Path):
    out = exp_run(project, "digits64")
    assert out["info"]["resolution"] == [64, 64] and out["info"]["channels"] == 3
    assert out["metrics"]["features"] == "contrastive" and out["metrics"]["not_available"]["modes"]
    decided_with_a_reason(out["registry"])
    assert (project / "reports/eval/samples.png").stat().st_size > 0
    assert (project / "reports/eval/classes.png").stat().st_size > 0  # the picture says why there are no bars
