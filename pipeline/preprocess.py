"""preprocess: raw folder -> cleaned, normalised train/test splits and dataset.json.

    python -m pipeline.preprocess --raw data/raw --out data/processed
"""

from __future__ import annotations

from typing import Any

from aigc.config import DataConfig, PrivacyConfig
from aigc.data.preprocess import preprocess as run_preprocess
from aigc.data.preprocess import save_processed
from aigc.data.sources import load_raw
from aigc.encryption import key_from_env
from aigc.io import atomic_path
from pipeline._stage import main


def preprocess(seed: int, data: DataConfig, privacy: PrivacyConfig, raw: str, out: str) -> dict[str, Any]:
    """Clean (duplicates, blank images), resize/pad, normalise to [-1, 1] and split RAW into OUT
    (each split AES-GCM encrypted with privacy.encrypt_at_rest)."""
    key = key_from_env() if privacy.encrypt_at_rest else None  # a missing key fails before any work
    processed = run_preprocess(load_raw(raw), data, seed)
    with atomic_path(out) as tmp:
        save_processed(processed, tmp, key)
    info = processed.info
    c = info["counts"]
    print(f"kept {c['kept']} of {c['raw']} images (removed {info['removed']['duplicates']} duplicates, "
          f"{info['removed']['blank']} blank); train {c['train']}, test {c['test']}; "
          f"{info['resolution'][0]}x{info['resolution'][1]}x{info['channels']}, {info['num_classes']} classes"
          f"{' (encrypted)' if key else ''}")
    return info


if __name__ == "__main__":
    main(preprocess, sections=("seed", "data", "privacy"), paths=("raw", "out"))
