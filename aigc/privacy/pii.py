"""What looks like personal data in per-record metadata, and how it is de-identified.

Two kinds of evidence:

- a **value** that matches one of :data:`PII_PATTERNS` (e-mail address, phone number,
  national-ID-like number, street address), in any text column;
- a **column name** that says it holds people (``privacy.name_columns``: ``author``,
  ``patient_name``, ``ownerName`` ...): person names have no reliable pattern, the column name
  is the signal. Such a column passes only when it is empty or every value is hashed.

The patterns are plain Python regular expressions, used unchanged by the great-expectations
gate (``expect_column_values_to_not_match_regex``), so what the gate checks and what the scrub
removes cannot drift apart. They err on the side of flagging: a false alarm costs a column
(or an explicit ``keep``), a miss leaks a person.

The scrub applies ``privacy.action`` (or the column's entry in ``privacy.columns``) to each
flagged column: ``drop`` removes it, ``hash`` replaces each value by a salted SHA-256 (HMAC,
keyed by the secret in ``$AIGC_PII_SALT``, which is read here and never written anywhere), and
``keep`` leaves it, as an explicit opt-in the report records.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field

import pandas as pd

from aigc.config import PrivacyConfig
from aigc.data.sources import RawDataset
from aigc.errors import UserError

SALT_ENV = "AIGC_PII_SALT"
HASH_PREFIX = "sha256:"
# A hashed value: what a name-like column may hold after the scrub.
HASHED_VALUE = r"^sha256:[0-9a-f]{64}$"

# The loader's own columns: ``id`` and ``label`` are integers it made; ``origin``, ``file`` and
# ``class_name`` are paths and folder names, still scanned for values but not judged by their
# column name (``class_name`` names a class, not a person).
LOADER_NUMERIC = ("id", "label")
LOADER_PROVENANCE = ("origin", "file", "class_name")

# (?<!\w) / (?!\w) instead of \b: a digit run inside a hex digest or a word is not a number on
# its own (a hashed value must never look like a phone number to the check after the scrub).
PII_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    # +44 20 7946 0958, (555) 123-4567, 555-123-4567, 555.123.4567: at least 3 digit groups.
    "phone": r"(?<!\w)(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]\d{3,4}[ .-]?\d{3,4}(?!\w)",
    # US social security numbers (123-45-6789) and UK national insurance numbers (QQ 12 34 56 C).
    "national_id": r"(?<!\w)(?:\d{3}[- ]\d{2}[- ]\d{4}|[A-CEGHJ-PR-TW-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D])(?!\w)",
    # 221B Baker Street, 10 Downing St, 1600 Pennsylvania Avenue NW
    "street_address": (r"(?<!\w)\d{1,5}[A-Za-z]?(?: +[A-Z][\w.'-]*){1,4} +(?:Street|St|Avenue|Ave|Road|Rd|"
                       r"Lane|Ln|Boulevard|Blvd|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Square|Sq)(?!\w)"),
}
PERSON_NAME = "person_name"

_COMPILED = {kind: re.compile(p) for kind, p in PII_PATTERNS.items()}


def _words(column: str) -> set[str]:
    """``patientName`` / ``photo-author`` / ``Owner Name`` -> {"patient", "name"} ..."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(column))
    return {w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w}


def scannable_columns(metadata: pd.DataFrame) -> list[str]:
    """Metadata columns whose values may hold personal data (all but the loader's numbers)."""
    return [c for c in metadata.columns if c not in LOADER_NUMERIC]


def name_like_columns(columns: list[str], words: list[str]) -> list[str]:
    """Columns whose name contains one of ``words`` (privacy.name_columns) as a word."""
    wanted = {w.lower() for w in words}
    return [c for c in columns if c not in LOADER_NUMERIC + LOADER_PROVENANCE and _words(c) & wanted]


def matches(kind: str, value: str) -> bool:
    """Does ``value`` contain something that looks like ``kind`` (one of PII_PATTERNS)?"""
    return _COMPILED[kind].search(value) is not None


def hash_value(value: object, salt: str) -> str:
    """Salted SHA-256 (HMAC-SHA-256 keyed by the salt): stable within a salt, useless without it."""
    digest = hmac.new(salt.encode("utf-8"), str(value).encode("utf-8"), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest


def hash_chosen(cfg: PrivacyConfig) -> bool:
    return cfg.action == "hash" or "hash" in cfg.columns.values()


def salt_from_env(cfg: PrivacyConfig) -> str | None:
    """The salt for ``hash`` from $AIGC_PII_SALT; None when nothing is hashed.

    Raises UserError when ``hash`` is chosen and the variable is unset or empty: hashing with a
    known (empty) salt would let anyone recompute the hashes of guessed names.
    """
    if not hash_chosen(cfg):
        return None
    salt = os.environ.get(SALT_ENV, "")
    if not salt:
        where = "privacy.action" if cfg.action == "hash" else "privacy.columns"
        raise UserError(f"{where} chooses hash, but ${SALT_ENV} is not set: export {SALT_ENV}=<a long random "
                        "secret> (it is read from the environment only, never written to disk or logs), "
                        "or choose drop")
    return salt


@dataclass
class Scrubbed:
    """The de-identified dataset and what was done to each column."""

    dataset: RawDataset
    actions: dict[str, str] = field(default_factory=dict)  # column -> drop | hash | keep


def scrub(ds: RawDataset, flagged: list[str], cfg: PrivacyConfig, salt: str | None) -> Scrubbed:
    """Apply the privacy action to every flagged column, and to every column ``privacy.columns``
    names with drop/hash (an explicit request to scrub is honoured even if nothing was flagged).

    Images and labels are untouched; only ``metadata`` changes. ``id`` and ``label`` are never
    scrubbed (they are the loader's own integers, and training needs them).
    """
    meta = ds.metadata
    explicit = [c for c, a in cfg.columns.items() if a != "keep" and c in meta.columns]
    actions: dict[str, str] = {}
    for col in dict.fromkeys([*flagged, *explicit]):  # ordered, unique
        if col in LOADER_NUMERIC:
            continue
        actions[col] = cfg.columns.get(col, cfg.action)
    if any(a == "hash" for a in actions.values()) and not salt:
        raise UserError(f"privacy: hash chosen but no salt given (${SALT_ENV})")

    meta = meta.copy()
    for col, action in actions.items():
        if action == "drop":
            meta = meta.drop(columns=[col])
        elif action == "hash":
            values = meta[col]
            meta[col] = values.map(lambda v: v if pd.isna(v) else hash_value(v, salt)).astype(object)
    return Scrubbed(RawDataset(ds.images, ds.labels, meta.reset_index(drop=True)), actions)
