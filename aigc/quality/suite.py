"""The great-expectations suite, built in code from ``validate:`` in params.yaml, and its run.

Each :class:`Check` pairs one GX expectation with what a person needs to read its outcome:
its name (the key ``validate.warn`` takes), the bound with its params key, and how to state
the observed value. GX decides pass or fail and names the offending records (by ``id``);
the observed value is computed from the same frame, in the bound's own terms.

Every expectation goes into the ``ExpectationSuite`` constructor at once: adding them one by
one to a suite already in a context is pathologically slow in GX 1.24 (docs/development.md, "The stack").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from aigc import environment
from aigc.config import PrivacyConfig, ValidateConfig
from aigc.privacy.pii import HASHED_VALUE, PERSON_NAME, PII_PATTERNS, name_like_columns
from aigc.quality.summary import META

environment.apply()  # offline and quiet (GX_ANALYTICS_ENABLED), whoever imports us first


@dataclass(frozen=True)
class Check:
    name: str  # one of aigc.config.EXPECTATIONS
    expectation: Any  # a great_expectations Expectation
    what: str  # the observed quantity, in words ("duplicate share")
    bound: str  # the bound and its params key ("<= 0.05 (validate.max_duplicate_share)")
    observe: Callable[[pd.DataFrame], Any]  # the observed value, from the summary frame
    column: str | None = None  # pii: the metadata column
    kind: str | None = None  # pii: email | phone | national_id | street_address | person_name

    @property
    def key(self) -> str:
        """Unique within a suite: the name, or pii.<column>.<kind>."""
        return f"{self.name}.{self.column}.{self.kind}" if self.column else self.name


@dataclass
class Outcome:
    """One expectation's verdict on the frame."""

    check: Check
    success: bool
    severity: str  # critical | warning
    observed: Any
    offending: int | None  # records that broke it (None: a property of the whole table)
    ids: list[int] = field(default_factory=list)  # their ids, in record order

    @property
    def failed_critical(self) -> bool:
        return not self.success and self.severity == "critical"

    def to_dict(self, max_ids: int = 20) -> dict[str, Any]:
        # What is observed, in words, is the report's job: the metrics stay short in `dvc metrics show`.
        return {"passed": self.success, "severity": self.severity, "observed": self.observed,
                "bound": self.check.bound, "offending": self.offending, "first_ids": self.ids[:max_ids]}


def _r(x: float) -> float:
    return round(float(x), 4)


def _labelled(f: pd.DataFrame) -> pd.Series:
    return f["class"].dropna()


def quality_checks(cfg: ValidateConfig, frame: pd.DataFrame) -> list[Check]:
    """The data-quality expectations on the per-record frame (see aigc.quality.summary)."""
    import great_expectations.expectations as gxe

    allowed = ([-1] if cfg.allow_unlabelled else [])
    checks = [
        Check("record_count", gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_records, max_value=cfg.max_records),
              "records", f"{cfg.min_records}..{cfg.max_records} (validate.min_records, validate.max_records)",
              len),
        Check("image_shape", gxe.ExpectColumnUniqueValueCountToBeBetween(column="shape", min_value=1, max_value=1),
              "distinct image shapes (HxWxC)", "exactly 1", lambda f: sorted(f["shape"].unique().tolist())),
        Check("channels", gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=list(cfg.channels)),
              "channel counts", f"in {list(cfg.channels)} (validate.channels)",
              lambda f: sorted(int(v) for v in f["channels"].unique())),
        Check("dtype", gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
              "pixel dtypes", "uint8 (the raw format)", lambda f: sorted(f["dtype"].unique().tolist())),
        Check("pixel_min", gxe.ExpectColumnValuesToBeBetween(column="min", min_value=cfg.pixel_min),
              "lowest pixel value", f">= {cfg.pixel_min} (validate.pixel_min)", lambda f: _r(f["min"].min())),
        Check("pixel_max", gxe.ExpectColumnValuesToBeBetween(column="max", max_value=cfg.pixel_max),
              "highest pixel value", f"<= {cfg.pixel_max} (validate.pixel_max)", lambda f: _r(f["max"].max())),
        Check("finite", gxe.ExpectColumnValuesToBeInSet(column="nonfinite", value_set=[0]),
              "NaN/inf pixel values", "0", lambda f: int(f["nonfinite"].sum())),
    ]
    unlabelled = " or -1 (unlabelled; validate.allow_unlabelled)" if cfg.allow_unlabelled else ""
    if cfg.classes is not None:
        in_set = gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[*cfg.classes, *allowed])
        checks.append(Check("labels", in_set,
                            "labels", f"in {list(cfg.classes)} (validate.classes){unlabelled}",
                            lambda f: sorted(int(v) for v in f["label"].unique())))
    else:
        checks.append(Check("labels", gxe.ExpectColumnValuesToBeBetween(column="label", min_value=-1 if allowed else 0,
                                                                        max_value=cfg.max_label),
                            "labels", f"0..{cfg.max_label} (validate.max_label){unlabelled}",
                            lambda f: sorted(int(v) for v in f["label"].unique())))
    # Class checks need labels: an unlabelled source (labels all -1) trains an unconditional model.
    if frame["class"].notna().any():
        if cfg.classes is not None:
            missing = sorted(set(cfg.classes))
            checks.append(Check("classes_present", gxe.ExpectColumnDistinctValuesToContainSet(column="class",
                                                                                               value_set=missing),
                                "declared classes with no record", "none (validate.classes)",
                                lambda f: sorted(set(cfg.classes) - {int(v) for v in _labelled(f).unique()})))
        checks += [
            Check("class_count", gxe.ExpectColumnUniqueValueCountToBeBetween(column="class", min_value=cfg.min_classes),
                  "distinct classes", f">= {cfg.min_classes} (validate.min_classes)",
                  lambda f: int(_labelled(f).nunique())),
            Check("class_share", gxe.ExpectColumnValuesToBeBetween(column="class_share", min_value=cfg.min_class_share),
                  "smallest class share", f">= {cfg.min_class_share} (validate.min_class_share)",
                  lambda f: _r(f["class_share"].min())),
        ]
    checks += [
        # mostly: at least this share of the records must be "not a duplicate" / "not blank".
        Check("duplicates", gxe.ExpectColumnValuesToBeInSet(column="duplicate", value_set=[False],
                                                            mostly=_r(1.0 - cfg.max_duplicate_share)),
              "duplicate share", f"<= {cfg.max_duplicate_share} (validate.max_duplicate_share)",
              lambda f: _r(f["duplicate"].mean())),
        Check("blank", gxe.ExpectColumnValuesToBeInSet(column="blank", value_set=[False],
                                                       mostly=_r(1.0 - cfg.max_blank_share)),
              "blank-image share", f"<= {cfg.max_blank_share} (validate.max_blank_share, data.blank_std)",
              lambda f: _r(f["blank"].mean())),
    ]
    return checks


def pii_checks(frame: pd.DataFrame, privacy: PrivacyConfig, exempt: set[str] = frozenset()) -> list[Check]:
    """No metadata value that looks like personal data; no person names in a name-like column.

    ``exempt``: columns the user chose to keep (privacy: keep), which the report lists instead.
    """
    import great_expectations.expectations as gxe

    meta = [c[len(META):] for c in frame.columns if c.startswith(META) and c[len(META):] not in exempt]
    checks = []
    for col in meta:
        gx_col = META + col
        for kind, pattern in PII_PATTERNS.items():
            checks.append(Check(
                "pii", gxe.ExpectColumnValuesToNotMatchRegex(column=gx_col, regex=pattern),
                f"records with a value like {kind.replace('_', ' ')} in column {col!r}", "0 (privacy scrubs them)",
                lambda f, c=gx_col, p=pattern: int(f[c].dropna().astype(str).str.contains(p, regex=True).sum()),
                column=col, kind=kind))
    for col in name_like_columns(meta, privacy.name_columns):
        gx_col = META + col
        checks.append(Check(
            "pii", gxe.ExpectColumnValuesToMatchRegex(column=gx_col, regex=HASHED_VALUE),
            f"unhashed values in the name-like column {col!r}", "0 (privacy.name_columns; privacy scrubs them)",
            lambda f, c=gx_col: int((~f[c].dropna().astype(str).str.match(HASHED_VALUE)).sum()),
            column=col, kind=PERSON_NAME))
    return checks


def run_checks(frame: pd.DataFrame, checks: list[Check], warn: list[str], name: str) -> list[Outcome]:
    """Validate ``frame`` with one GX suite made of ``checks``; offending records named by ``id``."""
    if not checks:
        return []
    import great_expectations as gx
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                            ProgressBarsConfig)

    # In memory and quiet: no stores on disk, no Data Docs site (the report is ours), no progress
    # bars, no analytics.
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               progress_bars=ProgressBarsConfig(globally=False), analytics_enabled=False)
    ctx = gx.get_context(mode="ephemeral", project_config=config)
    batch = (ctx.data_sources.add_pandas("records").add_dataframe_asset("summary")
             .add_batch_definition_whole_dataframe("all"))
    for i, c in enumerate(checks):
        c.expectation.meta = {"aigc": i}
    suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=[c.expectation for c in checks]))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    res = vd.run(batch_parameters={"dataframe": frame},
                 result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]})

    outcomes: list[Outcome | None] = [None] * len(checks)
    for r in res.results:
        i = r.expectation_config.meta["aigc"]
        check = checks[i]
        if r.exception_info and r.exception_info.get("raised_exception"):
            # A broken expectation is a bug here, not bad data: let it show its traceback.
            raise RuntimeError(f"great-expectations could not evaluate {check.key}: "
                               f"{r.exception_info.get('exception_message')}")
        # Only the ids leave this function: the values GX also returns may be personal data.
        ids = [int(row["id"]) for row in (r.result.get("unexpected_index_list") or [])]
        outcomes[i] = Outcome(check, bool(r.success), "warning" if check.name in warn else "critical",
                              check.observe(frame), r.result.get("unexpected_count"), ids)
    missing = [checks[i].key for i, o in enumerate(outcomes) if o is None]
    assert not missing, f"great-expectations returned no result for {missing}"
    return outcomes  # type: ignore[return-value]
