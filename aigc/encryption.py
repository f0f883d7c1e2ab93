"""Encryption at rest for every copy of a record (``data/raw``, ``data/validated``,
``data/processed``): AES-256-GCM.

With ``privacy.encrypt_at_rest: true`` ingest, validate and preprocess write each data file of
their output folder as ``<name>.enc``; the stages that read them decrypt in memory, so the DVC cache
and any DVC remote hold only ciphertext of the records (the reports withhold their pictures of
records: docs/privacy.md has the table).

The key is 32 random bytes, base64-encoded, read from the environment and never written anywhere:

* ``$AIGC_DATA_KEY``: the key itself, or
* ``$AIGC_DATA_KEY_FILE``: the path of a file holding it, outside the repository
  (``aigc keygen --out ~/.config/aigc/data.key``).

A file is ``MAGIC (8) | key id (8) | nonce (12) | ciphertext | tag (16)``. The file name is
authenticated too (a file renamed or swapped for another fails), and the key id (an HMAC of the
key, which reveals nothing of it) tells "encrypted with another key" apart from "modified": a
wrong key is one error naming the variable, a flipped byte an authentication error, never garbage.
``aigc rekey`` re-encrypts a folder under a new key (key rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from aigc.errors import UserError

KEY_ENV = "AIGC_DATA_KEY"
KEY_FILE_ENV = "AIGC_DATA_KEY_FILE"
MAGIC = b"AIGCENC1"
SUFFIX = ".enc"
KEY_BYTES = 32
_NONCE = 12
_HEADER = len(MAGIC) + 8 + _NONCE


def generate_key() -> str:
    """A new random 256-bit key, base64-encoded (what ``$AIGC_DATA_KEY`` holds)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def parse_key(text: str, source: str) -> bytes:
    """The 32 key bytes from their base64 text; a UserError naming ``source`` otherwise (never the value)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise UserError(f"{source} is not a base64-encoded {KEY_BYTES}-byte key; make one with `aigc keygen`")
    return key


def key_from_env(environ: Mapping[str, str] | None = None, repo: str | Path | None = None) -> bytes:
    """The data key from ``$AIGC_DATA_KEY`` or the file ``$AIGC_DATA_KEY_FILE`` names.

    ``repo`` (default: the working directory): a key file inside it is refused, since it would
    travel with the code (git) or the data (DVC).
    """
    env = os.environ if environ is None else environ
    if env.get(KEY_ENV):
        return parse_key(env[KEY_ENV], f"${KEY_ENV}")
    if env.get(KEY_FILE_ENV):
        path = Path(env[KEY_FILE_ENV]).expanduser().resolve()
        root = Path(repo if repo is not None else Path.cwd()).resolve()
        if path == root or root in path.parents:
            raise UserError(f"${KEY_FILE_ENV} = {path} lies inside the project ({root}), where git or DVC could copy "
                            f"it; keep the key file outside the repository")
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"${KEY_FILE_ENV} = {path} cannot be read ({type(exc).__name__}); point it at the key "
                            "file `aigc keygen` wrote") from None
        return parse_key(text, f"the key file ${KEY_FILE_ENV} = {path}")
    raise UserError(f"privacy.encrypt_at_rest needs the data key: set ${KEY_ENV} (base64 of 32 bytes) or "
                    f"${KEY_FILE_ENV} (a file holding it, outside the repository); `aigc keygen` makes one")


def key_id(key: bytes) -> bytes:
    """8 bytes that identify a key without revealing it."""
    return hmac.new(key, b"aigc data key id", hashlib.sha256).digest()[:8]


def encrypt(data: bytes, key: bytes, name: str) -> bytes:
    """``data`` sealed under ``key``; ``name`` (the file's plain name) is authenticated with it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(_NONCE)  # random 96-bit nonce per file: no reuse across the few files of a key
    header = MAGIC + key_id(key) + nonce
    return header + AESGCM(key).encrypt(nonce, data, header + name.encode("utf-8"))


def decrypt(blob: bytes, key: bytes, name: str, where: str) -> bytes:
    """The plaintext of ``blob``; a UserError if it is not ours, under another key, or modified."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(blob) < _HEADER + 16 or not blob.startswith(MAGIC):
        raise UserError(f"{where} is not an aigc encrypted file (truncated or another format); rerun the stage "
                        "that wrote it")
    header = blob[:_HEADER]
    if header[len(MAGIC):len(MAGIC) + 8] != key_id(key):
        raise UserError(f"{where} was encrypted with another key than the one in ${KEY_ENV}/${KEY_FILE_ENV}; set "
                        f"the key it was written with (or re-encrypt it: aigc rekey)")
    try:
        return AESGCM(key).decrypt(header[len(MAGIC) + 8:], blob[_HEADER:], header + name.encode("utf-8"))
    except InvalidTag:
        raise UserError(f"{where} failed authentication (AES-GCM): the file was modified or damaged after it was "
                        "written; restore it (dvc checkout) or rerun the stage that wrote it") from None


def write_file(path: str | Path, data: bytes, key: bytes | None) -> Path:
    """Write ``data`` to ``path`` in clear (key None) or sealed to ``path.enc``; the path written."""
    path = Path(path)
    if key is None:
        path.write_bytes(data)
        return path
    out = path.with_name(path.name + SUFFIX)
    out.write_bytes(encrypt(data, key, path.name))
    return out


def read_file(path: str | Path, key: bytes | None = None) -> bytes:
    """The plain bytes of ``path``, or of ``path.enc`` decrypted in memory (the key from the
    environment when not given). FileNotFoundError when neither exists."""
    path = Path(path)
    sealed = path.with_name(path.name + SUFFIX)
    if not sealed.exists():
        return path.read_bytes()
    return decrypt(sealed.read_bytes(), key if key is not None else key_from_env(), path.name, str(sealed))


def is_encrypted(folder: str | Path) -> bool:
    return any(Path(folder).glob(f"*{SUFFIX}"))


def rekey(folder: str | Path, old: bytes, new: bytes) -> list[Path]:
    """Re-encrypt every ``*.enc`` file of ``folder`` from key ``old`` to key ``new`` (key rotation).
    All files are decrypted first, so a wrong ``old`` key or a damaged file changes nothing."""
    from aigc.io import atomic_path

    files = sorted(Path(folder).glob(f"*{SUFFIX}"))
    if not files:
        raise UserError(f"{folder} holds no encrypted files (*{SUFFIX})")
    plain = {f: decrypt(f.read_bytes(), old, f.name.removesuffix(SUFFIX), str(f)) for f in files}
    for f, data in plain.items():
        with atomic_path(f) as tmp:
            tmp.write_bytes(encrypt(data, new, f.name.removesuffix(SUFFIX)))
    return files
