"""validate: raw folder -> the data-quality and privacy gate -> a scrubbed copy, a summary and a report.

    python -m pipeline.validate --raw data/raw --out data/validated \
        --summary reports/data_quality/summary.json --report reports/data_quality/report.html \
        --metrics reports/data_quality/metrics.json

Personal data in the metadata is scrubbed (privacy:) before anything is written; then the
great-expectations suite (validate:) runs on a per-record summary (aigc/quality). The summary, its
headline (the DVC metric ``dvc exp show`` lists) and the HTML report are written either way, and
logged to an MLflow run of this stage; OUT is written only when no critical expectation failed. A
failure stops ``dvc repro`` with one line naming the expectation, the observed value, the bound and
the first offending record ids.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from typing import Any

import great_expectations  # noqa: F401  (~2.5 s once per process: up front, so the gate's timer times the gate)

from aigc.config import DataConfig, PrivacyConfig, TrackingConfig, ValidateConfig, flatten
from aigc.data.sources import load_raw, raw_sha256, save_raw
from aigc.encryption import key_from_env
from aigc.errors import DataError
from aigc.io import atomic_path, write_json
from aigc.privacy import salt_from_env
from aigc.quality.gate import run_gate
from aigc.quality.report import render_html
from aigc.tracking import Run, git_commit
from pipeline._stage import main


def run_validate(data: DataConfig, validate: ValidateConfig, privacy: PrivacyConfig, tracking: TrackingConfig,
                 raw: str, out: str, summary: str, report: str, metrics: str | None = None) -> dict[str, Any]:
    """Scrub personal data from RAW and check it against the data-quality expectations; write the scrubbed
    records to OUT only if it passes. SUMMARY (JSON), its headline METRICS (JSON) and REPORT (HTML) say
    what passed, either way."""
    salt = salt_from_env(privacy)  # a missing salt fails before any work
    key = key_from_env() if privacy.encrypt_at_rest else None  # ... and so does a missing data key
    ds = load_raw(raw)
    params = flatten(validate, "validate.") | {k: v for k, v in flatten(privacy, "privacy.").items()
                                                if not k.startswith("privacy.dp.")} | {"data.blank_std": data.blank_std}
    tags = {"aigc.stage": "validate", "aigc.raw_images_sha256": raw_sha256(raw, key)} | (
        {"mlflow.source.git.commit": commit} if (commit := git_commit()) else {})
    tracker = Run.start(tracking, run_name=f"validate-{time.strftime('%Y%m%d-%H%M%S')}", params=params, tags=tags)
    ok = False
    try:
        t = time.perf_counter()
        result = run_gate(ds, validate, privacy, data.blank_std, salt)
        seconds = time.perf_counter() - t
        write_json(summary, result.summary)
        if metrics:
            write_json(metrics, result.headline())
        with atomic_path(report) as tmp:
            tmp.write_text(render_html(result, min_class_share=validate.min_class_share, max_examples=validate.examples,
                                       source=raw, gx_version=version("great-expectations"),
                                       withheld=key is not None), encoding="utf-8")
        for note in result.notes():
            print(note)
        tracker.log_metrics(result.metrics(seconds))
        tracker.set_tags({"aigc.dq_passed": str(result.passed).lower()})
        tracker.log_artifact(summary, "data_quality")
        tracker.log_artifact(report, "data_quality")
        if not result.passed:
            raise DataError(f"{result.failure_message()}; report: {report}")
        with atomic_path(out) as tmp:
            save_raw(result.scrubbed, tmp, key)
        ok = True
    finally:
        tracker.end(ok)
    print(result.done(seconds, out))
    return result.summary


if __name__ == "__main__":
    main(run_validate, name="validate", sections=("data", "validate", "privacy", "tracking"),
         paths=("raw", "out", "summary", "report", "metrics"))
