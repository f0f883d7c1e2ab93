"""Atomic outputs: a stage that fails leaves the previous output (or nothing), never half of one."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Works for files and folders alike: whatever the body creates at the temporary path
    becomes ``path``. On an exception the temporary path is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        _raise_if_disk_full(exc, path)
        raise
    target = tmp / path.name  # let the body create a file or a folder under a fresh name
    try:
        try:
            yield target
        except OSError as exc:
            _raise_if_disk_full(exc, path)
            raise
        if not target.exists():
            raise RuntimeError(f"nothing was written for {path}")
        if path.is_dir() and not path.is_symlink():
            # A folder cannot be replaced by rename in one step: move the old one aside first,
            # so a crash between the two renames still leaves a complete copy on disk.
            old = tmp / ".old"
            os.replace(path, old)
            os.replace(target, path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large for this filesystem or limit",
             errno.EDQUOT: "disk quota exceeded"}


def _raise_if_disk_full(exc: OSError, path: Path) -> None:
    """A write that ran out of room is the user's to fix, not a bug: one clear line, the old file kept."""
    if exc.errno in DISK_FULL:
        from aigc.errors import UserError

        raise UserError(f"cannot write {path}: {DISK_FULL[exc.errno]} ({errno.errorcode[exc.errno]}); the previous "
                        f"{path.name} (if any) is untouched. Free space under {path.parent.resolve()} and rerun") from None


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` atomically, serialised in memory first so that a full disk surfaces as Python's
    own OSError (errno ENOSPC/EFBIG) rather than an opaque error from torch's C++ writer."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


class _PythonWrites:
    """A file seen by numpy as a plain writable object, so it writes through Python's ``write``:
    a full disk then raises OSError with its errno (ENOSPC/EFBIG) instead of numpy's short-write
    OSError that carries none."""

    def __init__(self, f: Any) -> None:
        self.write = f.write


def save_npy(path: str | Path, array: Any) -> None:
    """``np.save`` to ``path`` (inside an :func:`atomic_path` body) with a full disk reported clearly."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(_PythonWrites(f), array, allow_pickle=False)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def load_net_file(path: str | Path, fmt: str, kind: str, missing_hint: str = "",
                  map_location: Any = "cpu") -> dict[str, Any]:
    """The payload of a network file (``{"format", "config", "state_dict"}``), checked, or a UserError
    naming what is wrong with it. ``kind`` names the file in messages ("generator", "evaluator")."""
    import torch

    from aigc.errors import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"{kind} file {path} not found{missing_hint}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused a Python object (a class, a function): such a file can run code when
        # unpickled, so it is never loaded. torch's message is many lines; keep the one that names it.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        what = next((line for line in lines if "Unsupported global" in line or "WeightsUnpickler" in line),
                    lines[0] if lines else "")
        raise UserError(f"{path}: not a readable {kind} file (UnpicklingError: it holds Python objects, not only "
                        f"weights: {what[:300]}); a file like this can run code when loaded, so it is refused") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: not a readable {kind} file ({type(exc).__name__}: {first[:300]})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise UserError(f"{path}: not an aigc {kind} file (expected format {fmt!r})")
    return payload


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def params_sha256(params: dict[str, Any]) -> str:
    """A stable hash of a training's params (run.json ``params``): same params, same hash. The
    training's run is tagged with it (and named with its first characters); the registry tags each
    version with it."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


# --- CSV: every CSV the project writes goes through these (tests/test_hostile_files.py checks) ---------

# A cell a spreadsheet would run as a formula (OWASP, "CSV injection"): = + - @, tab, carriage return.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # "-5", "+1.5e3": a number, never a formula


def csv_cell(value: Any) -> Any:
    """``value`` as it may go into a CSV file: a string that a spreadsheet would run as a formula
    (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) gets a leading ``'``, which
    spreadsheets show as text. Numbers, and strings that are a plain number ("-5"), are left alone."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _NUMBER.match(value):
        return "'" + value
    return value


def csv_safe(df: Any) -> Any:
    """A copy of the DataFrame ``df`` with every string cell and column name passed through
    :func:`csv_cell`; numeric columns are untouched (a negative number stays a number)."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = df.copy()
    out.columns = [csv_cell(c) for c in df.columns]
    for i in range(out.shape[1]):
        col = out.iloc[:, i]
        if is_object_dtype(col.dtype) or is_string_dtype(col.dtype):  # text (or mixed): numbers are never touched
            out.isetitem(i, col.map(csv_cell).astype(object))
    return out


def write_csv(df: Any, path: str | Path | None = None) -> str | None:
    """``df.to_csv`` (no index) of :func:`csv_safe` ``(df)``: to ``path``, or returned as text when ``path``
    is None. The one place the project writes a DataFrame as CSV."""
    return csv_safe(df).to_csv(path, index=False)


def write_csv_rows(f: Any, fieldnames: list[str], rows: Any, restval: Any = "") -> None:
    """``csv.DictWriter(f, fieldnames, restval).writeheader()`` and ``writerows(rows)``, with the header and
    every cell through :func:`csv_cell`: the one place the project writes CSV rows by hand."""
    import csv

    writer = csv.writer(f)
    writer.writerow([csv_cell(k) for k in fieldnames])
    writer.writerows([csv_cell(r.get(k, restval)) for k in fieldnames] for r in rows)
