"""The per-record summary frame the data-quality gate validates: one row per image, no pixels.

great-expectations on 5,000 x 784 pixel columns takes ~18 s here; on this frame (shape, dtype,
min, max, mean, std, NaN/inf count, label, content hash, duplicate and blank flags and the
metadata columns) it takes well under a second, and it states the same facts (docs/development.md, "The stack").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from aigc.data.preprocess import blank_mask, content_hashes, duplicate_mask
from aigc.data.sources import RawDataset
from aigc.privacy.pii import scannable_columns

META = "meta."  # prefix of the metadata columns, so a source column named "min" cannot clash


def record_stats(ds: RawDataset, blank_std: float) -> pd.DataFrame:
    """One row per record: what each image is (shape, dtype, range, NaN/inf, hash, duplicate,
    blank) and its label. Duplicates and blanks follow preprocess's own rules exactly."""
    images = ds.images
    n = len(images)
    flat = images.reshape(n, -1)
    floating = np.issubdtype(flat.dtype, np.floating)
    nonfinite = (~np.isfinite(flat)).sum(axis=1) if floating else np.zeros(n, dtype=np.int64)
    finite = np.where(np.isfinite(flat), flat, np.nan) if floating else flat
    _, h, w, c = images.shape
    labels = ds.labels.astype(np.int64)
    labelled = labels >= 0
    # The share of the labelled records that carry this record's class (NaN when unlabelled).
    classes, counts = np.unique(labels[labelled], return_counts=True)
    share_of = dict(zip(classes.tolist(), (counts / max(1, labelled.sum())).tolist()))
    hashes = content_hashes(images)
    return pd.DataFrame({
        "id": ds.metadata["id"].to_numpy(np.int64),
        "shape": f"{h}x{w}x{c}",
        "height": h,
        "width": w,
        "channels": c,
        "dtype": str(images.dtype),
        "min": np.nanmin(finite, axis=1) if floating else flat.min(axis=1),
        "max": np.nanmax(finite, axis=1) if floating else flat.max(axis=1),
        "mean": np.nanmean(finite, axis=1) if floating else flat.mean(axis=1),
        "std": np.nanstd(finite, axis=1) if floating else flat.std(axis=1),
        "nonfinite": nonfinite.astype(np.int64),
        "label": labels,
        "class": pd.Series(labels, dtype="Int64").mask(~labelled).array,
        "class_share": np.array([share_of.get(int(k), np.nan) if k >= 0 else np.nan for k in labels]),
        "hash": hashes,
        "duplicate": duplicate_mask(hashes),
        "blank": blank_mask(images, blank_std),
    })


def with_metadata(stats: pd.DataFrame, metadata: pd.DataFrame) -> pd.DataFrame:
    """``stats`` plus every metadata column that may hold personal data, as text, under ``meta.``.

    As text because the PII rules are patterns on text: a phone number stored as a number in
    one file and as a string in another must be judged alike. Missing values stay missing.
    """
    cols = {}
    for c in scannable_columns(metadata):
        values = metadata[c].reset_index(drop=True)
        cols[META + str(c)] = values.astype(object).where(values.notna(), None).map(
            lambda v: v if v is None or isinstance(v, str) else str(v))
    return pd.concat([stats, pd.DataFrame(cols, index=stats.index)], axis=1) if cols else stats.copy()
