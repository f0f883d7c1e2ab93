"""The lineage hash of a processed dataset is a hash of its split arrays, not of its summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aigc.config import DataConfig
from aigc.data.preprocess import DATASET_JSON, arrays_sha256, dataset_sha256, preprocess, save_processed
from aigc.data.sources import load_source


def test_equal_counts_different_pixels_hash_differently(tmp_path: Path):
    p = preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0)
    save_processed(p, tmp_path / "a")
    other = preprocess(load_source(DataConfig(source="digits")), DataConfig(), seed=0)
    other.train["images"][0, 0, 0, 0] += 0.5  # one pixel of one image
    save_processed(other, tmp_path / "b")
    # dataset.json (counts, shape, classes) is the same for both: the old hash could not tell them apart
    assert (tmp_path / "a" / DATASET_JSON).read_text() == (tmp_path / "b" / DATASET_JSON).read_text()
    assert dataset_sha256(tmp_path / "a") != dataset_sha256(tmp_path / "b")
    # the same arrays written again (another file, same content) hash the same
    before = dataset_sha256(tmp_path / "a")
    np.savez_compressed(tmp_path / "a" / "train.npz", **p.train)  # other bytes on disk, same arrays
    assert dataset_sha256(tmp_path / "a") == before


def test_labels_count_too():
    x = np.zeros((4, 1, 2, 2), np.float32)
    assert arrays_sha256({"images": x, "labels": np.array([0, 1, 2, 3])}) != \
        arrays_sha256({"images": x, "labels": np.array([0, 1, 3, 2])})
