"""validate: the data-quality and privacy gate on a corpus of bad datasets the tests write themselves.

Each bad dataset fails with the right one-line message (or has its personal data scrubbed), and
leaves what was there untouched; the built-in datasets pass. Corrupt files, mixed shapes, NaN
or out-of-range values in a CSV and an empty source never get past ingest: for those the gate
fails early, at ingest, with ingest's message (tests/test_ingest.py has the full set).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from aigc.config import DataConfig, PrivacyConfig, TrackingConfig, ValidateConfig, parse_params
from aigc.data.sources import RawDataset, load_raw, load_source, save_raw
from aigc.errors import ConfigError, DataError, UserError
from aigc.privacy import SALT_ENV, hash_value, name_like_columns
from aigc.privacy.pii import matches
from aigc.quality import run_gate
from aigc.quality.summary import record_stats
from pipeline.ingest import ingest
from pipeline.validate import run_validate as validate
from tests.conftest import digit_images

# Small fixtures: the record-count bound is lowered for them; every other bound is the default.
SMALL = ValidateConfig(min_records=10)
OFF = TrackingConfig(enabled=False)

EMAIL, NAME, PHONE = "ada.lovelace@example.org", "Ada Lovelace", "+44 20 7946 0958"
PLANTED = [EMAIL, NAME, PHONE, "Lovelace", "7946 0958"]


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray, **extra: list) -> DataConfig:
    n = len(images)
    df = pd.DataFrame(images.reshape(n, -1), columns=[f"pixel{i}" for i in range(images[0].size)])
    df.insert(0, "label", labels)
    for col, values in extra.items():
        df[col] = values
    df.to_csv(path, index=False)
    return DataConfig(source="csv", path=str(path))


def good(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    return digit_images(n, size=8, classes=4)


class Stage:
    """The validate stage's paths in a tmp folder, with a previous good output already there."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.raw, self.out = tmp / "raw", tmp / "validated"
        self.summary, self.report = tmp / "reports/dq/summary.json", tmp / "reports/dq/report.html"
        images, labels = good(60)
        save_raw(RawDataset(images[..., None], labels, pd.DataFrame({"id": range(60), "origin": "x",
                                                                       "label": labels})), self.out)
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.out.iterdir())}

    def ingest(self, cfg: DataConfig) -> None:
        ingest(cfg, str(self.raw))

    def run(self, cfg: ValidateConfig = SMALL, privacy: PrivacyConfig = PrivacyConfig(), tracking=OFF,
            data: DataConfig = DataConfig()) -> dict:
        return validate(data, cfg, privacy, tracking, str(self.raw), str(self.out), str(self.summary), str(self.report))

    def outputs_text(self) -> str:
        """Everything the stage wrote, as text (binary files decoded leniently)."""
        files = [p for p in [*self.out.rglob("*"), *self.summary.parent.rglob("*")] if p.is_file()]
        return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in files)


@pytest.fixture
def stage(tmp_path: Path) -> Stage:
    return Stage(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real MLflow SQLite store for this module (creating its tables costs seconds); each test
    uses an experiment of its own."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def tracking_to(store: str, tmp: Path, experiment: str) -> TrackingConfig:
    return TrackingConfig(uri=store, experiment=experiment, artifact_root=str(tmp / "mlartifacts"))


# --- the corpus: bad datasets that fail ----------------------------------------------------------

def _corrupt_image(tmp: Path) -> DataConfig:
    images, labels = good(20)
    for i, (im, y) in enumerate(zip(images, labels)):
        (tmp / "imgs" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp / "imgs" / str(y) / f"{i:03d}.png")
    (tmp / "imgs" / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    return DataConfig(source="folder", path=str(tmp / "imgs"))


def _mixed_shapes(tmp: Path) -> DataConfig:
    images, labels = good(20)
    for i, (im, y) in enumerate(zip(images, labels)):
        (tmp / "imgs" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp / "imgs" / str(y) / f"{i:03d}.png")
    Image.fromarray(np.full((10, 12), 7, np.uint8)).save(tmp / "imgs" / "2" / "odd.png")
    return DataConfig(source="folder", path=str(tmp / "imgs"))


def _nan_csv(tmp: Path) -> DataConfig:
    images, labels = good(20)
    cfg = write_csv(tmp / "nan.csv", images, labels)
    df = pd.read_csv(cfg.path).astype({"pixel5": float})
    df.loc[3, "pixel5"] = np.nan
    df.to_csv(cfg.path, index=False)
    return cfg


def _values_1000(tmp: Path) -> DataConfig:
    images, labels = good(20)
    cfg = write_csv(tmp / "big.csv", images, labels)
    df = pd.read_csv(cfg.path)
    df.loc[4, "pixel7"] = 1000
    df.to_csv(cfg.path, index=False)
    return cfg


def _empty(tmp: Path) -> DataConfig:
    (tmp / "empty").mkdir()
    return DataConfig(source="folder", path=str(tmp / "empty"))


def _label_11(tmp: Path) -> DataConfig:
    images, labels = good()
    labels[[7, 42]] = 11
    return write_csv(tmp / "l11.csv", images, labels)


def _duplicates_40(tmp: Path) -> DataConfig:
    images, labels = good()
    images[60:], labels[60:] = images[:40], labels[:40]  # 40 of 100 records repeat earlier ones
    return write_csv(tmp / "dup.csv", images, labels)


def _single_class(tmp: Path) -> DataConfig:
    images, _ = good()
    return write_csv(tmp / "one.csv", images, np.full(100, 3))


def _blank_20(tmp: Path) -> DataConfig:
    images, labels = good()
    for k in range(0, 100, 5):  # 20 % constant images, each a different grey (not duplicates)
        images[k] = k
    return write_csv(tmp / "blank.csv", images, labels)


def _too_few(tmp: Path) -> DataConfig:
    images, labels = good(8)
    return write_csv(tmp / "few.csv", images, labels)


@pytest.mark.parametrize(
    "make, where, expected",
    [
        (_corrupt_image, "ingest", r"1 unreadable image file\(s\): 1/broken.png"),
        (_mixed_shapes, "ingest", r"mixed image sizes: 8x8 \(20 file\(s\), e.g. 0/000.png\), 10x12 \(1 file\(s\), e.g. 2/odd.png\); set data.image_size"),
        (_nan_csv, "ingest", r"1 NaN pixel\(s\) \(float64\); first at \[3, 5\]"),
        (_values_1000, "ingest", r"integer pixels \(int64\) in 0..1000 are outside 0..255; first at \[4, 7\]"),
        (_empty, "ingest", "no images found"),
        (_label_11, "validate", r"labels: labels = \[0, 1, 2, 3, 11\], bound 0..9 \(validate.max_label\).*"
                                r"first offending records \(id\): 7, 42"),
        (_duplicates_40, "validate", r"duplicates: duplicate share = 0.4, bound <= 0.05 "
                                     r"\(validate.max_duplicate_share\); first offending records \(id\): "
                                     r"60, 61, 62, 63, 64 \(and 35 more\)"),
        (_single_class, "validate", r"class_count: distinct classes = 1, bound >= 2 \(validate.min_classes\)"),
        (_blank_20, "validate", r"blank: blank-image share = 0.2, bound <= 0.05 .*records \(id\): 0, 5, 10, 15, 20"),
        (_too_few, "validate", r"record_count: records = 8, bound 10..10000000"),
    ],
    ids=["corrupt-image", "mixed-shapes", "nan-csv", "values-1000", "empty-set", "label-11", "duplicates-40pct",
         "single-class", "blank-20pct", "too-few-records"],
)
def test_bad_dataset_fails_with_the_right_message_and_writes_nothing(stage: Stage, make, where, expected):
    cfg = make(stage.tmp)
    if where == "ingest":
        with pytest.raises(DataError, match=expected):
            stage.ingest(cfg)
        assert not stage.raw.exists()  # the gate failed early: nothing reaches validate
    else:
        stage.ingest(cfg)
        with pytest.raises(DataError, match=expected) as err:
            stage.run()
        msg = str(err.value)
        assert msg.startswith("data-quality gate failed: ") and "\n" not in msg
        assert msg.endswith(f"report: {stage.report}")
        # the person needs the summary and the report; the scrubbed data is never written
        summary = json.loads(stage.summary.read_text())
        assert summary["passed"] is False and summary["counts"]["failed_critical"] >= 1
        assert "FAILED" in stage.report.read_text()
    assert stage.snapshot() == stage.before
    assert not [p for p in stage.tmp.iterdir() if p.name.startswith((".validated", ".raw"))]  # no temp leftovers


def test_label_11_names_both_failures_and_shows_examples(stage: Stage):
    stage.ingest(_label_11(stage.tmp))
    with pytest.raises(DataError, match=r"1 more critical: class_share"):
        stage.run()
    summary = json.loads(stage.summary.read_text())
    labels = summary["expectations"]["labels"]
    assert labels == {"passed": False, "severity": "critical", "observed": [0, 1, 2, 3, 11],
                      "bound": "0..9 (validate.max_label) or -1 (unlabelled; validate.allow_unlabelled)",
                      "offending": 2, "first_ids": [7, 42]}
    page = stage.report.read_text()
    assert 'alt="record 7"' in page and 'alt="record 42"' in page  # example images of the failing kind


def test_encrypted_at_rest_the_report_shows_no_picture_of_a_record(stage: Stage, monkeypatch: pytest.MonkeyPatch):
    from aigc.encryption import KEY_ENV, KEY_FILE_ENV, generate_key

    monkeypatch.setenv(KEY_ENV, generate_key())
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    stage.ingest(_label_11(stage.tmp))
    with pytest.raises(DataError, match=r"first offending records \(id\): 7, 42"):  # the ids still name them
        stage.run(privacy=PrivacyConfig(encrypt_at_rest=True))
    page = stage.report.read_text()
    assert "data:image/png" not in page and 'alt="record' not in page  # no example, no sample strip
    # in place of each failed expectation's examples and of the sample strip
    assert page.count("Pictures withheld: <code>privacy.encrypt_at_rest</code> is on") == page.count("<h3><code>") + 1


def test_a_declared_class_list_catches_label_11_and_missing_classes(stage: Stage):
    stage.ingest(_label_11(stage.tmp))
    with pytest.raises(DataError, match=r"labels: .*bound in \[0, 1, 2, 3, 4\] \(validate.classes\)") as err:
        stage.run(ValidateConfig(min_records=10, classes=[0, 1, 2, 3, 4]))
    assert "classes_present" in str(err.value)
    assert json.loads(stage.summary.read_text())["expectations"]["classes_present"]["observed"] == [4]


def test_an_expectation_marked_as_warning_lets_the_run_go_on(stage: Stage, capsys: pytest.CaptureFixture):
    stage.ingest(_duplicates_40(stage.tmp))
    summary = stage.run(ValidateConfig(min_records=10, warn=["duplicates"]))
    assert summary["passed"] is True and summary["counts"]["warnings"] == 1
    dup = summary["expectations"]["duplicates"]
    assert dup["passed"] is False and dup["severity"] == "warning" and dup["observed"] == 0.4
    assert "warning: duplicates: duplicate share = 0.4" in capsys.readouterr().out
    assert len(load_raw(stage.out).images) == 100  # written; preprocess removes the duplicates later
    assert "warning</span>" in stage.report.read_text()


def test_a_bound_can_be_tuned(stage: Stage):
    stage.ingest(_blank_20(stage.tmp))
    assert stage.run(ValidateConfig(min_records=10, max_blank_share=0.25))["passed"] is True


# --- the corpus: personal data that is scrubbed -------------------------------------------------

def _pii_csv(tmp: Path) -> DataConfig:
    images, labels = good()
    emails = [EMAIL if i % 10 == 3 else None for i in range(100)]
    authors = [NAME if i < 5 else None for i in range(100)]
    notes = ["scanned in batch 2"] * 100
    notes[17] = f"scanned in batch 2; questions: call {PHONE} after 5pm"
    return write_csv(tmp / "pii.csv", images, labels, contact=emails, author=authors, notes=notes,
                     camera=["A", "B"] * 50)


@pytest.mark.parametrize(
    "column, kind, ids",
    [("contact", "email", [3, 13, 23, 33, 43, 53, 63, 73, 83, 93]),
     ("author", "person_name", [0, 1, 2, 3, 4]),
     ("notes", "phone", [17])],
    ids=["email-column", "name-column", "phone-in-free-text"],
)
def test_personal_data_is_found_and_dropped(stage: Stage, column: str, kind: str, ids: list[int]):
    stage.ingest(_pii_csv(stage.tmp))
    summary = stage.run()
    assert summary["passed"] is True
    found = summary["privacy"]["found"][column]
    assert found == {"kinds": [kind], "records": len(ids), "first_ids": ids, "action": "drop"}
    meta = load_raw(stage.out).metadata
    assert column not in meta.columns and "camera" in meta.columns  # only the flagged columns go
    # the gate checked again after the scrub, and the column is gone from what it checked
    assert not [k for k in summary["expectations"] if k.startswith(f"pii.{column}.")]
    assert summary["expectations"]["pii.camera.email"]["passed"] is True


def test_no_planted_value_reaches_any_output_or_mlflow(stage: Stage, store: str):
    stage.ingest(_pii_csv(stage.tmp))
    art = stage.tmp / "mlartifacts"
    stage.run(tracking=tracking_to(store, stage.tmp, "planted"))
    db = Path(store.removeprefix("sqlite:///"))
    everything = stage.outputs_text() + db.read_bytes().decode("utf-8", "replace") + "".join(
        p.read_bytes().decode("utf-8", "replace") for p in art.rglob("*") if p.is_file())
    assert list(art.rglob("summary.json")) and list(art.rglob("report.html"))  # logged, and checked
    for value in PLANTED:
        assert value.lower() not in everything.lower(), value
    assert NAME in load_raw(stage.raw).metadata["author"].tolist()  # it was there to be found


def test_hash_replaces_values_with_a_salted_sha256_and_never_writes_the_salt(stage: Stage,
                                                                            monkeypatch: pytest.MonkeyPatch):
    salt = "pepper-6f1c2e-never-on-disk"
    monkeypatch.setenv(SALT_ENV, salt)
    stage.ingest(_pii_csv(stage.tmp))
    summary = stage.run(privacy=PrivacyConfig(action="hash"))
    assert summary["passed"] and summary["privacy"]["actions"] == {"contact": "hash", "author": "hash", "notes": "hash"}
    meta = load_raw(stage.out).metadata
    assert meta["author"].iloc[0] == hash_value(NAME, salt)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", meta["author"].iloc[0])
    assert meta["author"].isna().sum() == 95  # missing stays missing
    assert hash_value(NAME, salt) != hash_value(NAME, "another salt")
    text = stage.outputs_text()
    assert salt not in text
    for value in PLANTED:
        assert value not in text, value


def test_hash_without_a_salt_is_a_clear_error_before_any_work(stage: Stage, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(SALT_ENV, raising=False)
    stage.ingest(_pii_csv(stage.tmp))
    with pytest.raises(UserError, match=rf"privacy.columns chooses hash, but \${SALT_ENV} is not set"):
        stage.run(privacy=PrivacyConfig(columns={"author": "hash"}))
    assert not stage.summary.exists() and stage.snapshot() == stage.before


def test_keep_is_an_explicit_opt_in_recorded_in_the_report(stage: Stage):
    stage.ingest(_pii_csv(stage.tmp))
    summary = stage.run(privacy=PrivacyConfig(columns={"camera": "drop", "notes": "keep"}))
    assert summary["passed"] is True
    assert summary["privacy"]["kept_by_opt_in"] == ["notes"]
    assert summary["privacy"]["actions"] == {"contact": "drop", "author": "drop", "notes": "keep", "camera": "drop"}
    meta = load_raw(stage.out).metadata
    assert PHONE in meta["notes"].iloc[17] and "camera" not in meta.columns  # kept as asked; dropped as asked
    assert "Kept by explicit opt-in" in stage.report.read_text()


# --- the default datasets pass --------------------------------------------------------------------

def test_digits_pass_with_the_default_bounds(stage: Stage, store: str):
    save_raw(load_source(DataConfig(source="digits")), stage.raw)
    summary = stage.run(ValidateConfig(), tracking=tracking_to(store, stage.tmp, "digits"))
    assert summary["passed"] is True and summary["counts"]["records"] == 1797
    assert all(e["passed"] for e in summary["expectations"].values())
    back = load_raw(stage.out)
    assert back.images.shape == (1797, 8, 8, 1) and back.metadata.columns.tolist() == ["id", "origin", "label"]

    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("validate-")
    assert run.data.tags["aigc.stage"] == "validate" and run.data.tags["aigc.dq_passed"] == "true"
    assert run.data.metrics["dq/passed"] == 1.0 and run.data.params["validate.max_duplicate_share"] == "0.05"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "data_quality")} == {
        "data_quality/summary.json", "data_quality/report.html"}


def test_a_failed_gate_is_a_failed_mlflow_run_with_its_report(stage: Stage, store: str):
    stage.ingest(_single_class(stage.tmp))
    with pytest.raises(DataError):
        stage.run(tracking=tracking_to(store, stage.tmp, "one-class"))
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("one-class").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["aigc.dq_passed"] == "false"
    assert len(client.list_artifacts(run.info.run_id, "data_quality")) == 2


@pytest.mark.slow
def test_mnist5k_passes_with_the_default_bounds(stage: Stage):
    save_raw(load_source(DataConfig()), stage.raw)
    summary = stage.run(ValidateConfig())
    assert summary["passed"] is True and summary["counts"]["records"] == 5000


def test_unlabelled_sources_skip_the_class_checks(stage: Stage):
    images, _ = good()
    np.savez(stage.tmp / "u.npz", images=images)
    stage.ingest(DataConfig(source="npz", path=str(stage.tmp / "u.npz")))
    summary = stage.run()
    assert summary["passed"] and "class_count" not in summary["expectations"]
    with pytest.raises(DataError, match=r"labels: .*bound 0..9 \(validate.max_label\); "
                                        r"first offending records \(id\): 0, 1"):
        stage.run(ValidateConfig(min_records=10, allow_unlabelled=False))


# --- the pieces ----------------------------------------------------------------------------------

def test_the_report_is_self_contained_and_shows_no_metadata_values(stage: Stage):
    stage.ingest(_pii_csv(stage.tmp))
    stage.run()
    page = stage.report.read_text()
    assert "<style>" in page and "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "@import" not in page
    assert page.count("data:image/png;base64,") == 16  # the sample strip; nothing failed
    assert "PASSED" in page and "<code>author</code>" in page


def test_gx_validates_a_summary_frame_not_pixels():
    images, labels = good()
    ds = RawDataset(images[..., None], labels, pd.DataFrame({"id": range(100), "origin": "o", "label": labels}))
    frame = record_stats(ds, blank_std=1.0)
    assert len(frame.columns) < 20 and {"shape", "dtype", "min", "max", "mean", "nonfinite", "label", "hash",
                                         "duplicate", "blank"} <= set(frame.columns)
    result = run_gate(ds, SMALL, PrivacyConfig(), 1.0, None)
    assert result.passed and len(result.frame) == 100


@pytest.mark.parametrize("text, kind", [
    ("mail me: jo.bloggs+gx@mail.example.co.uk", "email"),
    ("+44 20 7946 0958", "phone"), ("(555) 123-4567", "phone"), ("555.123.4567", "phone"),
    ("ssn 078-05-1120", "national_id"), ("NI: AB 12 34 56 C", "national_id"),
    ("lives at 221B Baker Street, London", "street_address"), ("10 Downing St", "street_address"),
])
def test_pii_patterns_find(text: str, kind: str):
    assert matches(kind, text)


@pytest.mark.parametrize("text", [
    "2024-01-15", "3.14159265", "mnist5k:4999", "imgs/3/001.png", "batch 12 of 40", "0.5 0.25 1.0",
    hash_value("Ada", "s"), "v1.2.3", "1,797 records", "28x28x1",
])
def test_pii_patterns_leave_ordinary_values_alone(text: str):
    assert not [k for k in ("email", "phone", "national_id", "street_address") if matches(k, text)]


def test_name_like_columns():
    cols = ["author", "PatientName", "owner_email", "photo-writer", "name", "class_name", "file", "camera", "id"]
    assert name_like_columns(cols, PrivacyConfig().name_columns) == ["author", "PatientName", "owner_email",
                                                                     "photo-writer", "name"]


@pytest.mark.parametrize("raw, key, fragment", [
    ({"validate": {"warn": ["dupes"]}}, "validate.warn.0", "must be one of 'record_count'"),
    ({"validate": {"max_duplicate_share": 1.5}}, "validate.max_duplicate_share", "less than or equal to 1"),
    ({"validate": {"min_records": 500, "max_records": 10}}, "validate", "must not exceed max_records"),
    ({"privacy": {"action": "encrypt"}}, "privacy.action", "must be one of 'drop', 'hash' or 'keep'"),
    ({"privacy": {"columns": {"author": "scramble"}}}, "privacy.columns.author", "must be one of"),
    ({"privacy": {"salt": "x"}}, "privacy.salt", "unknown key"),
])
def test_bad_gate_params_fail_at_load(raw: dict, key: str, fragment: str):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert str(err.value).startswith(f"params.yaml: {key} = ") and fragment in str(err.value)

