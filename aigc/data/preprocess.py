"""Clean, resize, normalise and split a raw dataset; describe the result in ``dataset.json``.

The processed folder holds ``train.npz`` and ``test.npz`` (``images`` float32 (N, C, H, W)
in [-1, 1], ``labels`` int64, ``ids`` of the raw records) and ``dataset.json``: what the
data is (resolution, channels, classes, counts, what cleaning removed). Training reads
``dataset.json`` instead of repeating any of it in params.

With ``privacy.encrypt_at_rest`` the splits are written as ``train.npz.enc``/``test.npz.enc``
(AES-256-GCM, aigc/encryption.py) and every reader decrypts them in memory (:func:`load_split`);
``dataset.json`` (shape, counts, class names: no record) stays in clear.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aigc import encryption
from aigc.config import DataConfig
from aigc.data.sources import RawDataset, resize
from aigc.errors import DataError

DATASET_JSON = "dataset.json"
FORMAT = "aigc.dataset/1"


def content_hashes(images: np.ndarray) -> list[str]:
    """SHA-256 of each image's shape and bytes: equal hash = exactly equal image."""
    return [hashlib.sha256(repr(im.shape).encode() + im.tobytes()).hexdigest() for im in images]


def duplicate_mask(hashes: list[str]) -> np.ndarray:
    """True for every record whose content hash was seen earlier (the first occurrence is kept)."""
    seen: set[str] = set()
    dup = np.zeros(len(hashes), dtype=bool)
    for i, h in enumerate(hashes):
        dup[i] = h in seen
        seen.add(h)
    return dup


def blank_mask(images: np.ndarray, blank_std: float) -> np.ndarray:
    """True for blank/constant images: pixel std below ``blank_std`` (0..255 scale); 0 means constant only."""
    std = images.reshape(len(images), -1).std(axis=1)
    return std < blank_std if blank_std > 0 else std == 0


def clean(ds: RawDataset, blank_std: float) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of the records to keep, and counts of what was removed.

    Exact duplicates (by content hash) keep their first occurrence; blank/constant images
    (pixel std below ``blank_std`` on the 0..255 scale) are dropped.
    """
    blank = blank_mask(ds.images, blank_std)
    dup = duplicate_mask(content_hashes(ds.images))
    keep = np.flatnonzero(~dup & ~blank)
    removed = {"duplicates": int(dup.sum()), "blank": int((blank & ~dup).sum())}
    return keep, removed


def class_names(metadata: pd.DataFrame, classes: np.ndarray) -> dict[str, str]:
    """``{label value: class name}`` from the folder source's ``class_name`` column (empty without
    one: MNIST and numeric folders are named by their label values)."""
    if "class_name" not in metadata.columns:
        return {}
    pairs = metadata.loc[metadata["label"] >= 0, ["label", "class_name"]].drop_duplicates("label")
    lookup = dict(zip(pairs["label"].astype(int), pairs["class_name"].astype(str)))
    return {str(int(k)): lookup[int(k)] for k in classes if int(k) in lookup}


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1] (the range of the generator's tanh)."""
    return (images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5) - 1.0


@dataclass
class Processed:
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    info: dict[str, Any]


def preprocess(ds: RawDataset, cfg: DataConfig, seed: int) -> Processed:
    """Clean -> resize/pad -> normalise -> stratified, seeded train/test split."""
    keep, removed = clean(ds, cfg.blank_std)
    if len(keep) < 2:
        raise DataError(f"only {len(keep)} image(s) left after cleaning ({removed}); need at least 2 to split")
    images = ds.images[keep]
    labels = ds.labels[keep]
    ids = ds.metadata["id"].to_numpy()[keep]
    if cfg.image_size is not None:
        images = resize(images, cfg.image_size, cfg.resize_mode)

    # Stratify when every class can give at least one record to each side.
    classes, per_class = np.unique(labels, return_counts=True)
    n_test = int(np.ceil(cfg.test_size * len(labels)))
    stratified = bool(len(classes) > 1 and per_class.min() >= 2 and len(classes) <= n_test <= len(labels) - len(classes))
    idx = np.arange(len(labels))
    try:
        from sklearn.model_selection import train_test_split  # only here: 1-2 s of import every later stage skips

        tr, te = train_test_split(idx, test_size=cfg.test_size, random_state=seed,
                                  stratify=labels if stratified else None, shuffle=True)
    except ValueError as exc:
        raise DataError(f"cannot split {len(labels)} images with data.test_size = {cfg.test_size}: {exc}") from None

    x = normalise(images)
    n, c, h, w = x.shape
    labelled = classes[classes >= 0]
    info = {
        "format": FORMAT,
        "resolution": [h, w],
        "channels": c,
        "layout": "NCHW",
        "range": [-1.0, 1.0],
        "classes": [int(k) for k in labelled],
        "num_classes": int(len(labelled)),
        "counts": {
            "raw": int(len(ds.images)),
            "kept": int(n),
            "train": int(len(tr)),
            "test": int(len(te)),
            "train_per_class": {str(int(k)): int(v) for k, v in zip(*np.unique(labels[tr], return_counts=True))},
        },
        "removed": removed,
        "split": {"test_size": cfg.test_size, "seed": seed, "stratified": stratified},
        "resized": None if cfg.image_size is None else {"size": cfg.image_size, "mode": cfg.resize_mode},
    }
    names = class_names(ds.metadata.iloc[keep], labelled)
    if names:  # a folder of word-named classes (cat/, dog/): label value -> name, for reports
        info["class_names"] = names
    tr, te = np.sort(tr), np.sort(te)  # each split in raw-record order: stable, diff-friendly
    return Processed(
        train={"images": x[tr], "labels": labels[tr], "ids": ids[tr]},
        test={"images": x[te], "labels": labels[te], "ids": ids[te]},
        info=info,
    )


def save_processed(p: Processed, folder: Path, key: bytes | None = None) -> None:
    """Write the splits and ``dataset.json`` into ``folder`` (which must be new); with a ``key``
    each split AES-GCM encrypted as ``<split>.npz.enc``, never in clear on disk."""
    folder.mkdir(parents=True)
    for split, arrays in (("train", p.train), ("test", p.test)):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        encryption.write_file(folder / f"{split}.npz", buf.getvalue(), key)
    (folder / DATASET_JSON).write_text(json.dumps(p.info, indent=2) + "\n", encoding="utf-8")


def load_split(folder: str | Path, split: str) -> dict[str, np.ndarray]:
    """One split's arrays; an encrypted split is decrypted in memory with the key from the environment."""
    path = Path(folder) / f"{split}.npz"
    if path.exists():  # in clear: read from the file, without a second copy of it in memory
        source: Path | io.BytesIO = path
    else:
        try:
            source = io.BytesIO(encryption.read_file(path))
        except FileNotFoundError:
            raise DataError(f"{path} not found; run the preprocess stage first (dvc repro preprocess)") from None
    with np.load(source, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / DATASET_JSON
    if not path.exists():
        raise DataError(f"{path} not found; run the preprocess stage first (dvc repro preprocess)")
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT:
        raise DataError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}; rerun preprocess")
    return info


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """A hash of the arrays themselves (names, dtypes, shapes, bytes), not of the file holding them:
    two datasets with equal counts but different pixels or labels hash differently."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def dataset_sha256(folder: str | Path) -> str:
    """The lineage hash of a processed dataset: its train and test split arrays (the run's
    ``aigc.dataset_sha256``, checked again by evaluate and register)."""
    return hashlib.sha256("".join(f"{split}:{arrays_sha256(load_split(folder, split))}"
                                  for split in ("train", "test")).encode()).hexdigest()
