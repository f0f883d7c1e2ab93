"""Privacy: find personal data in per-record metadata and de-identify it (drop, hash or keep).

The detection rules live in :mod:`aigc.privacy.pii` as plain regular expressions, so the
same rules drive the great-expectations gate (:mod:`aigc.quality`) and the scrub.
"""

from aigc.privacy.pii import (
    HASH_PREFIX,
    PII_PATTERNS,
    SALT_ENV,
    Scrubbed,
    hash_value,
    name_like_columns,
    salt_from_env,
    scannable_columns,
    scrub,
)

__all__ = ["HASH_PREFIX", "PII_PATTERNS", "SALT_ENV", "Scrubbed", "hash_value", "name_like_columns",
           "salt_from_env", "scannable_columns", "scrub"]
