"""preprocess: cleaning counts, normalisation, resize/pad, a seeded stratified split, dataset.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aigc.config import DataConfig, PrivacyConfig
from aigc.data.preprocess import load_info, load_split, preprocess, resize
from aigc.data.sources import RawDataset
from aigc.errors import DataError
from pipeline.preprocess import preprocess as preprocess_stage
from tests.conftest import digit_images


def raw(images: np.ndarray, labels: np.ndarray) -> RawDataset:
    n = len(images)
    meta = pd.DataFrame({"id": np.arange(n), "origin": [f"t:{i}" for i in range(n)], "label": labels})
    return RawDataset(images[..., None] if images.ndim == 3 else images, labels, meta)


def test_duplicates_and_blanks_are_removed_and_counted():
    images, labels = digit_images(40)
    images[5] = images[3]  # exact duplicate
    images[6] = images[3]
    images[10] = 0  # blank
    images[11] = 200  # constant
    p = preprocess(raw(images, labels), DataConfig(test_size=0.25), seed=0)
    assert p.info["removed"] == {"duplicates": 2, "blank": 2}
    assert p.info["counts"]["kept"] == 36
    kept_ids = set(p.train["ids"]) | set(p.test["ids"])
    assert {5, 6, 10, 11}.isdisjoint(kept_ids) and 3 in kept_ids


def test_normalised_to_minus_one_one_in_nchw():
    images, labels = digit_images(40)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    p = preprocess(raw(images, labels), DataConfig(), seed=0)
    x = np.concatenate([p.train["images"], p.test["images"]])
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0


def test_split_is_stratified_and_seeded():
    images, labels = digit_images(80, classes=4)
    a = preprocess(raw(images, labels), DataConfig(test_size=0.25), seed=1)
    b = preprocess(raw(images, labels), DataConfig(test_size=0.25), seed=1)
    c = preprocess(raw(images, labels), DataConfig(test_size=0.25), seed=2)
    assert np.bincount(a.test["labels"]).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(a.test["ids"], b.test["ids"])
    assert not np.array_equal(a.test["ids"], c.test["ids"])
    assert a.info["split"]["stratified"] is True


def test_pad_and_resize():
    images = digit_images(4, size=8)[0][..., None]
    padded = resize(images, 12, "pad")
    assert padded.shape == (4, 12, 12, 1) and (padded[:, :2] == 0).all()
    np.testing.assert_array_equal(padded[:, 2:10, 2:10], images)
    assert resize(images, 4, "resize").shape == (4, 4, 4, 1)
    with pytest.raises(DataError, match="smaller than the images"):
        resize(images, 4, "pad")


def test_too_few_images_left():
    images = np.zeros((5, 8, 8), np.uint8)
    with pytest.raises(DataError, match="only 0 image"):
        preprocess(raw(images, np.zeros(5, np.int64)), DataConfig(), seed=0)


def test_stage_writes_splits_and_dataset_json(tmp_path: Path):
    from aigc.data.sources import save_raw

    images, labels = digit_images(40)
    save_raw(raw(images, labels), tmp_path / "raw")
    info = preprocess_stage(0, DataConfig(image_size=12), PrivacyConfig(), str(tmp_path / "raw"),
                            str(tmp_path / "processed"))
    on_disk = load_info(tmp_path / "processed")
    assert on_disk == json.loads(json.dumps(info))
    assert on_disk["resolution"] == [12, 12] and on_disk["channels"] == 1 and on_disk["classes"] == [0, 1, 2, 3]
    assert len(load_split(tmp_path / "processed", "train")["images"]) == on_disk["counts"]["train"] == 36


def test_missing_or_foreign_processed_folder(tmp_path: Path):
    with pytest.raises(DataError, match="dataset.json not found; run the preprocess stage first"):
        load_info(tmp_path)
    with pytest.raises(DataError, match="train.npz not found; run the preprocess stage first"):
        load_split(tmp_path, "train")
    (tmp_path / "dataset.json").write_text('{"format": "other/9"}')
    with pytest.raises(DataError, match="format 'other/9', expected 'aigc.dataset/1'; rerun preprocess"):
        load_info(tmp_path)
