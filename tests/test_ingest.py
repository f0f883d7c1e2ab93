"""ingest: every source format on tiny fixtures, and every bad input failing clearly with nothing written."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aigc.config import DataConfig
from aigc.data.sources import load_raw, load_source
from aigc.errors import DataError
from pipeline.ingest import ingest
from tests.conftest import digit_images


def write_idx(path: Path, array: np.ndarray, dtype_code: int = 0x08, gz: bool = False) -> Path:
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[dtype_code]
    raw = header + array.astype(dtype).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, suffix: str = ".png") -> Path:
    for i, (im, y) in enumerate(zip(images, labels)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / str(y) / f"{i:03d}{suffix}")
    return root


# --- every source -------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_idx_with_labels_beside(tmp_path: Path, gz: bool):
    images, labels = digit_images(12)
    img = write_idx(tmp_path / "train-images-idx3-ubyte", images, gz=gz)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels.astype(np.uint8), gz=gz)
    ds = load_source(DataConfig(source="idx", path=str(img)))
    assert ds.images.shape == (12, 8, 8, 1)
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    # a folder works too: the images file is found inside
    assert len(load_source(DataConfig(source="idx", path=str(tmp_path))).images) == 12


def test_npz_keeps_labels_and_per_record_metadata(tmp_path: Path):
    images, labels = digit_images(10)
    np.savez(tmp_path / "d.npz", images=images, labels=labels, camera=np.array(["a", "b"] * 5))
    ds = load_source(DataConfig(source="npz", path=str(tmp_path / "d.npz")))
    assert ds.images.shape == (10, 8, 8, 1)
    assert list(ds.metadata.columns) == ["id", "origin", "label", "camera"]
    assert ds.metadata["camera"].tolist()[:2] == ["a", "b"]


def test_npz_rgb_without_labels(tmp_path: Path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=rgb)
    ds = load_source(DataConfig(source="npz", path=str(tmp_path / "rgb.npz")))
    assert ds.images.shape == (6, 8, 8, 3) and (ds.labels == -1).all()


def test_csv_label_pixels_and_extra_columns(tmp_path: Path):
    images, labels = digit_images(9, size=4)
    df = pd.DataFrame(images.reshape(9, -1), columns=[f"pixel{i}" for i in range(16)])
    df.insert(0, "label", labels)
    df["author"] = "someone"
    df.to_csv(tmp_path / "d.csv", index=False)
    ds = load_source(DataConfig(source="csv", path=str(tmp_path / "d.csv")))
    assert ds.images.shape == (9, 4, 4, 1)
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert "author" in ds.metadata.columns  # kept: the data gate decides what to scrub


def test_folder_subfolder_names_are_labels_with_metadata_csv(tmp_path: Path):
    images, labels = digit_images(8)
    root = write_folder(tmp_path / "imgs", images, labels)
    pd.DataFrame({"file": ["0/000.png"], "note": ["first"]}).to_csv(root / "metadata.csv", index=False)
    ds = load_source(DataConfig(source="folder", path=str(root)))
    assert ds.images.shape == (8, 8, 8, 1)
    assert sorted(ds.labels.tolist()) == sorted(labels.tolist())
    row = ds.metadata.set_index("file").loc["0/000.png"]
    assert row["note"] == "first" and row["label"] == 0


def test_folder_named_classes_and_jpeg_rgb(tmp_path: Path):
    rgb = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for i, name in enumerate(["cat", "dog", "cat", "dog"]):
        (tmp_path / name).mkdir(exist_ok=True)
        Image.fromarray(rgb[i]).save(tmp_path / name / f"{i}.jpg")
    ds = load_source(DataConfig(source="folder", path=str(tmp_path)))
    assert ds.images.shape == (4, 8, 8, 3)
    assert dict(zip(ds.metadata["class_name"], ds.labels)) == {"cat": 0, "dog": 1}


def test_builtin_digits():
    ds = load_source(DataConfig(source="digits"))
    assert ds.images.shape == (1797, 8, 8, 1) and ds.images.max() == 255 and set(ds.labels) == set(range(10))


@pytest.mark.slow
def test_builtin_mnist5k():
    ds = load_source(DataConfig(source="mnist5k"))
    assert ds.images.shape == (5000, 28, 28, 1) and np.bincount(ds.labels).tolist() == [500] * 10


def test_ingest_stage_writes_a_raw_folder_that_loads_back(tmp_path: Path):
    images, labels = digit_images(10)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    out = tmp_path / "raw"
    summary = ingest(DataConfig(source="npz", path=str(tmp_path / "d.npz")), str(out))
    assert summary["images"] == 10
    back = load_raw(out)
    np.testing.assert_array_equal(back.images[..., 0], images)
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "labels.npy", "metadata.csv"]


# --- bad inputs: a clear message, and nothing written -------------------------------------------

def _corrupt_folder(tmp: Path) -> DataConfig:
    images, labels = digit_images(6)
    root = write_folder(tmp / "imgs", images, labels)
    (root / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return DataConfig(source="folder", path=str(root))


def _mixed_shapes(tmp: Path) -> DataConfig:
    images, labels = digit_images(6)
    root = write_folder(tmp / "imgs", images, labels)
    Image.fromarray(np.full((10, 12), 7, np.uint8)).save(root / "2" / "odd.png")
    return DataConfig(source="folder", path=str(root))


def _float_npz(tmp: Path) -> DataConfig:
    np.savez(tmp / "f.npz", images=np.random.default_rng(0).random((5, 8, 8)) * 3.7)  # [0, 3.7]: no known range
    return DataConfig(source="npz", path=str(tmp / "f.npz"))


def _empty_folder(tmp: Path) -> DataConfig:
    (tmp / "empty").mkdir()
    return DataConfig(source="folder", path=str(tmp / "empty"))


def _empty_csv(tmp: Path) -> DataConfig:
    (tmp / "e.csv").write_text("label,pixel0,pixel1,pixel2,pixel3\n")
    return DataConfig(source="csv", path=str(tmp / "e.csv"))


def _nan_csv(tmp: Path) -> DataConfig:
    (tmp / "n.csv").write_text("label,pixel0,pixel1,pixel2,pixel3\n1,0,255,3,4\n2,0,,3,4\n")
    return DataConfig(source="csv", path=str(tmp / "n.csv"))


def _big_values_csv(tmp: Path) -> DataConfig:
    (tmp / "b.csv").write_text("label,pixel0,pixel1,pixel2,pixel3\n1,0,255,3,4\n2,0,1000,3,4\n")
    return DataConfig(source="csv", path=str(tmp / "b.csv"))


def _truncated_idx(tmp: Path) -> DataConfig:
    path = write_idx(tmp / "t-images-idx3-ubyte", digit_images(4)[0])
    path.write_bytes(path.read_bytes()[:-10])
    return DataConfig(source="idx", path=str(path))


def _int_idx(tmp: Path) -> DataConfig:
    images = digit_images(4)[0].astype(np.int32)
    images[2, 3, 4] = 70_000
    return DataConfig(source="idx", path=str(write_idx(tmp / "i-images-idx3-ubyte", images, 0x0C)))


def _unknown_idx_type(tmp: Path) -> DataConfig:
    path = write_idx(tmp / "u-images-idx3-ubyte", digit_images(4)[0])
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0A  # not a type the IDX format defines
    path.write_bytes(bytes(raw))
    return DataConfig(source="idx", path=str(path))


def _float_idx_labels(tmp: Path) -> DataConfig:
    images, labels = digit_images(4)
    path = write_idx(tmp / "l-images-idx3-ubyte", images)
    write_idx(tmp / "l-labels-idx1-ubyte", labels + 0.5, 0x0D)
    return DataConfig(source="idx", path=str(path))


def _missing_path(tmp: Path) -> DataConfig:
    return DataConfig(source="npz", path=str(tmp / "nowhere.npz"))


@pytest.mark.parametrize(
    "make, expected",
    [
        (_corrupt_folder, r"1 unreadable image file\(s\): 1/broken.png"),
        (_mixed_shapes, r"mixed image sizes: 8x8 \(6 file\(s\), e.g. 0/000.png\), 10x12 \(1 file\(s\), e.g. 2/odd.png\)"),
        (_float_npz, r"float pixels in \[0\.0\d+, 3\.6\d+\] are not in an unambiguous range.*data.float_range"),
        (_empty_folder, "no images found"),
        (_empty_csv, "no images found"),
        (_nan_csv, r"1 NaN pixel\(s\) \(float64\); first at \[1, 1\]"),
        (_big_values_csv, r"integer pixels \(int64\) in 0..1000 are outside 0..255; first at \[1, 1\]"),
        (_truncated_idx, "truncated"),
        (_int_idx, r"in 0..70000 are outside 0..255; first at \[2, 3, 4\]"),
        (_unknown_idx_type, r"IDX data type 0x0a is not one of the format's types \(0x08, 0x09, 0x0b"),
        (_float_idx_labels, r"l-labels-idx1-ubyte: labels must be integers, got float32"),
        (_missing_path, "does not exist"),
    ],
    ids=["corrupt-image", "mixed-shapes", "float-dtype", "empty-folder", "empty-csv", "nan-csv",
         "values-1000", "truncated-idx", "int32-idx", "unknown-idx-type", "float-idx-labels", "missing-path"],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path: Path, make, expected):
    cfg = make(tmp_path)
    out = tmp_path / "raw"
    with pytest.raises(DataError, match=expected):
        ingest(cfg, str(out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]  # no temp leftovers


# --- own folders: unlabelled or word-named classes, colour, mixed sizes -------------------------

@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images  # two 427x640 RGB photos shipped with scikit-learn

    return tuple(load_sample_images().images)


def photo_tiles(n: int, side: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct RGB tiles (N, side, side, 3) uint8: random 96x96 crops of scikit-learn's sample
    photos, resized with PIL (nothing downloads)."""
    rng = np.random.default_rng(seed)
    tiles = []
    for i in range(n):
        photo = _photos()[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
        tile = Image.fromarray(photo[y:y + 96, x:x + 96]).resize((side, side), Image.Resampling.LANCZOS)
        tiles.append(np.asarray(tile))
    return np.stack(tiles)


def _fails_in_one_line(cfg: DataConfig, tmp: Path, message: str) -> None:
    out = tmp / "raw"
    with pytest.raises(DataError) as err:
        ingest(cfg, str(out))
    assert str(err.value) == message and "\n" not in message
    assert not out.exists() and not [p for p in tmp.iterdir() if p.name.startswith(".raw")]  # nothing half-written


def test_folder_of_mixed_sizes_names_each_size_with_an_example(tmp_path: Path):
    root = tmp_path / "own"
    for name, side in (("a.png", 32), ("b.png", 64), ("c.png", 32), ("d.jpg", 48)):
        (root / "cat").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_tiles(1, side, seed=side)[0]).save(root / "cat" / name)
    _fails_in_one_line(DataConfig(source="folder", path=str(root)), tmp_path,
                       f"{root}: mixed image sizes: 32x32 (2 file(s), e.g. cat/a.png), 64x64 (1 file(s), e.g. cat/b.png), "
                       "48x48 (1 file(s), e.g. cat/d.jpg); set data.image_size (and data.resize_mode: pad or resize) "
                       "to bring them to one square side, or resize them to one size first")


@pytest.mark.parametrize("mode", ["resize", "pad"])
def test_folder_of_mixed_sizes_is_brought_to_data_image_size(tmp_path: Path, mode: str):
    root = tmp_path / "own"
    root.mkdir()
    small, large = photo_tiles(2, 32), photo_tiles(2, 64, seed=1)
    for i, im in enumerate([*small, *large]):
        Image.fromarray(im).save(root / f"{i}.png")
    cfg = DataConfig(source="folder", path=str(root), image_size=64, resize_mode=mode)
    ds = load_source(cfg)
    assert ds.images.shape == (4, 64, 64, 3) and (ds.labels == -1).all()
    np.testing.assert_array_equal(ds.images[2:], large)  # files already at the size are kept as they are
    if mode == "pad":  # centred on black, as preprocess pads a one-size source
        np.testing.assert_array_equal(ds.images[0, 16:48, 16:48], small[0])
        assert ds.images[0, :16].max() == 0


def test_folder_of_mixed_grey_and_rgb_says_so(tmp_path: Path):
    root = tmp_path / "own"
    root.mkdir()
    Image.fromarray(photo_tiles(1, 32)[0]).save(root / "colour.png")
    Image.fromarray(digit_images(1, size=32)[0][0]).save(root / "grey.png")
    _fails_in_one_line(DataConfig(source="folder", path=str(root)), tmp_path,
                       f"{root}: mixed channel counts: RGB (1 file(s), e.g. colour.png), grey (1 file(s), e.g. "
                       "grey.png); convert them to one (all grey or all RGB) first")


def test_loose_files_beside_a_class_folder_are_refused(tmp_path: Path):
    root = tmp_path / "own"
    (root / "cat").mkdir(parents=True)
    tiles = photo_tiles(3, 32)
    Image.fromarray(tiles[0]).save(root / "cat" / "0.png")
    Image.fromarray(tiles[1]).save(root / "loose1.png")
    Image.fromarray(tiles[2]).save(root / "loose2.png")
    _fails_in_one_line(DataConfig(source="folder", path=str(root)), tmp_path,
                       f"{root}: 2 loose image file(s) (loose1.png, loose2.png) beside 1 class folder(s) (cat/); "
                       "loose files and class folders cannot be mixed: move the loose files into a class folder, "
                       "or flatten the folder (no sub-folders) for unlabelled images")


def test_word_named_class_folders_are_numbered_in_sorted_order_and_named_in_dataset_json(tmp_path: Path):
    from aigc.data.preprocess import preprocess

    root = tmp_path / "own"
    tiles = photo_tiles(9, 32)
    for i, name in enumerate(["dog", "cat", "emu"] * 3):
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(tiles[i]).save(root / name / f"{i}.png")
    ds = load_source(DataConfig(source="folder", path=str(root)))
    assert ds.images.shape == (9, 32, 32, 3)
    assert dict(zip(ds.metadata["class_name"], ds.labels.tolist())) == {"cat": 0, "dog": 1, "emu": 2}
    assert np.bincount(ds.labels).tolist() == [3, 3, 3]
    info = preprocess(ds, DataConfig(source="folder", test_size=0.34), seed=0).info
    assert info["classes"] == [0, 1, 2] and info["class_names"] == {"0": "cat", "1": "dog", "2": "emu"}
    assert info["resolution"] == [32, 32] and info["channels"] == 3


def test_flat_folder_is_unlabelled_and_has_no_class_names(tmp_path: Path):
    from aigc.data.preprocess import preprocess

    root = tmp_path / "own"
    root.mkdir()
    for i, im in enumerate(photo_tiles(6, 64)):
        Image.fromarray(im).save(root / f"{i}.jpg", quality=95)
    ds = load_source(DataConfig(source="folder", path=str(root)))
    assert ds.images.shape == (6, 64, 64, 3) and ds.labels.tolist() == [-1] * 6
    assert "class_name" not in ds.metadata.columns
    info = preprocess(ds, DataConfig(source="folder", test_size=0.34), seed=0).info
    assert info["classes"] == [] and "class_names" not in info
    assert info["counts"]["train_per_class"] == {"-1": 3}


def test_bad_input_leaves_a_previous_output_untouched(tmp_path: Path):
    images, labels = digit_images(10)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    out = tmp_path / "raw"
    ingest(DataConfig(source="npz", path=str(tmp_path / "d.npz")), str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError):
        ingest(_float_npz(tmp_path), str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_many_offenders_are_listed_up_to_five(tmp_path: Path):
    root = tmp_path / "imgs"
    (root / "0").mkdir(parents=True)
    for i in range(8):
        (root / "0" / f"bad{i}.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"8 unreadable.*bad4.png \(UnidentifiedImageError\) \(and 3 more\)"):
        load_source(DataConfig(source="folder", path=str(root)))


def test_folder_source_pointing_at_a_file(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        load_source(DataConfig(source="folder", path=str(tmp_path / "x.png")))


def test_incomplete_raw_folder(tmp_path: Path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="incomplete raw dataset .*images.npy missing.*run the ingest stage"):
        load_raw(tmp_path / "raw")


# --- unusual but legitimate pixels: scaled exactly or refused by name, never clipped -------------

def test_16bit_png_and_tiff_are_scaled_not_clipped(tmp_path: Path):
    rng = np.random.default_rng(1)
    deep = rng.integers(0, 65536, size=(6, 8, 8), dtype=np.uint16)
    root = tmp_path / "deep"
    for i, im in enumerate(deep):
        (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / str(i % 2) / f"{i}.{'png' if i < 3 else 'tif'}")
    ds = load_source(DataConfig(source="folder", path=str(root)))
    order = [0, 2, 4, 1, 3, 5]  # sorted by folder, then name
    expected = np.round(deep[order] / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(ds.images[..., 0], expected)
    assert abs(ds.images.mean() - deep.mean() / 257.0) < 1.0  # not clipped to near-white (254 before)


def test_16bit_refused_names_the_files_and_the_option(tmp_path: Path):
    images, labels = digit_images(4)
    root = write_folder(tmp_path / "imgs", images, labels)
    Image.fromarray(np.full((8, 8), 40_000, np.uint16)).save(root / "1" / "deep.png")
    with pytest.raises(DataError, match=r"1 16-bit image file\(s\): 1/deep.png; set data.high_bit_depth: scale"):
        load_source(DataConfig(source="folder", path=str(root), high_bit_depth="refuse"))


def test_uint16_npz_is_scaled(tmp_path: Path):
    deep = np.array([0, 257, 65535, 32896], np.uint16).reshape(1, 2, 2).repeat(3, axis=0)
    np.savez(tmp_path / "d.npz", images=deep)
    ds = load_source(DataConfig(source="npz", path=str(tmp_path / "d.npz")))
    assert ds.images[0, ..., 0].tolist() == [[0, 1], [255, 128]]


@pytest.mark.parametrize("lo, hi, declared", [(0.0, 1.0, "auto"), (-1.0, 1.0, "auto"), (0.0, 255.0, "auto"),
                                              (0.0, 1.0, "0..1"), (-1.0, 1.0, "-1..1")])
def test_float_images_in_a_known_range_are_accepted(tmp_path: Path, lo: float, hi: float, declared: str):
    images = digit_images(5)[0].astype(np.float64)  # 0..255 whole numbers
    floats = lo + images / 255.0 * (hi - lo)
    np.savez(tmp_path / "f.npz", images=floats.astype(np.float32))
    ds = load_source(DataConfig(source="npz", path=str(tmp_path / "f.npz"), float_range=declared))
    np.testing.assert_array_equal(ds.images[..., 0], images.astype(np.uint8))


def test_float_outside_the_declared_range_is_refused(tmp_path: Path):
    np.savez(tmp_path / "f.npz", images=np.linspace(-1, 1, 5 * 64).reshape(5, 8, 8))
    with pytest.raises(DataError, match=r"float pixels in \[-1, 1\], outside the declared data.float_range 0..1; "
                                        r"first at \[0, 0, 0\]"):
        load_source(DataConfig(source="npz", path=str(tmp_path / "f.npz"), float_range="0..1"))


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_nan_and_inf_are_named_with_their_first_indices(tmp_path: Path, bad: float, word: str):
    images = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    images[3, 2, 1] = bad
    images[4, 0, 0] = bad
    np.savez(tmp_path / "f.npz", images=images)
    with pytest.raises(DataError, match=rf"2 {word} pixel\(s\) \(float32\); first at \[3, 2, 1\], \[4, 0, 0\]"):
        load_source(DataConfig(source="npz", path=str(tmp_path / "f.npz")))


def test_float_idx_in_0_1_is_accepted(tmp_path: Path):
    images = digit_images(4)[0]
    path = write_idx(tmp_path / "f-images-idx3-ubyte", images / 255.0, 0x0D)
    np.testing.assert_array_equal(load_source(DataConfig(source="idx", path=str(path))).images[..., 0], images)


def test_float_tiff_folder_shares_one_range(tmp_path: Path):
    images, labels = digit_images(4)
    root = tmp_path / "f"
    for i, (im, y) in enumerate(zip(images, labels)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((im / 255.0).astype(np.float32)).save(root / str(y) / f"{i}.tif")
    ds = load_source(DataConfig(source="folder", path=str(root)))
    np.testing.assert_array_equal(np.sort(ds.images.ravel()), np.sort(images.ravel()))


def test_palette_cmyk_and_exif_rotated_images(tmp_path: Path):
    grey = digit_images(3, size=8)[0]
    root = tmp_path / "odd"
    root.mkdir()
    Image.fromarray(grey[0]).convert("P").save(root / "a_palette.png")  # a palette of greys stays grey
    ds = load_source(DataConfig(source="folder", path=str(root)))
    assert ds.images.shape == (1, 8, 8, 1)
    np.testing.assert_array_equal(ds.images[0, ..., 0], grey[0])

    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = np.random.default_rng(2).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(colour / "cmyk.jpg", quality=100)
    (ds_cmyk,) = load_source(DataConfig(source="folder", path=str(colour))).images
    assert ds_cmyk.shape == (8, 6, 3)
    assert np.abs(ds_cmyk.astype(int) - rgb).mean() < 20  # CMYK converted back to RGB, not garbage

    turned = tmp_path / "turned"
    turned.mkdir()
    marked = np.zeros((16, 12, 3), np.uint8)
    marked[:4, :4] = 255  # a bright top-left corner, smooth enough for JPEG
    im = Image.fromarray(marked)
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation 6: the camera was turned; show it rotated 90 degrees clockwise
    im.save(turned / "rotated.jpg", exif=exif, quality=100)
    (upright,) = load_source(DataConfig(source="folder", path=str(turned))).images
    assert upright.shape == (12, 16, 3)
    assert upright[:4, -4:].mean() > 200 and upright[:4, :4].mean() < 50  # turned clockwise: top-right
