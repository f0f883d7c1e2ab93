"""ingest: the raw images named in params.yaml (``data.source``) -> a raw folder.

    python -m pipeline.ingest --out data/raw
"""

from __future__ import annotations

from typing import Any

from aigc.config import DataConfig, PrivacyConfig
from aigc.data.sources import load_source, save_raw
from aigc.encryption import key_from_env
from aigc.io import atomic_path
from pipeline._stage import main


def ingest(data: DataConfig, out: str, privacy: PrivacyConfig = PrivacyConfig()) -> dict[str, Any]:
    """Read the raw images named by data.source (and data.path) into OUT: images.npy, labels.npy, metadata.csv
    (each AES-GCM encrypted as <name>.enc with privacy.encrypt_at_rest)."""
    key = key_from_env() if privacy.encrypt_at_rest else None  # a missing key fails before any work
    ds = load_source(data)  # raises DataError, naming the offending files, before anything is written
    with atomic_path(out) as tmp:
        save_raw(ds, tmp, key)
    n, h, w, c = ds.images.shape
    summary = {"source": data.source, "images": n, "shape": [h, w, c],
               "labelled": int((ds.labels >= 0).sum()), "metadata_columns": list(ds.metadata.columns)}
    summary["encrypted"] = key is not None
    print(f"ingested {n} images of {h}x{w}x{c} from {data.source} into {out}{' (encrypted)' if key else ''}")
    return summary


if __name__ == "__main__":
    main(ingest, sections=("data", "privacy"), paths=("out",))
