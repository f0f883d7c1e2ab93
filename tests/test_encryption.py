"""Encryption at rest (aigc/encryption.py): the raw/validated folders round-trip through AES-GCM, and a
missing key, a wrong key, a key file in the repository and one flipped byte each fail with one clear
line; the ingest stage writes only ciphertext; keygen and rekey (rotation) work."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aigc import encryption
from aigc.cli import main as cli_main
from aigc.config import DataConfig, PrivacyConfig
from aigc.data.sources import RawDataset, load_raw, save_raw
from aigc.errors import UserError
from tests.conftest import digit_images

SECRET = "ada.lovelace@example.org"


def dataset() -> RawDataset:
    images, labels = digit_images(12)
    meta = pd.DataFrame({"id": range(12), "origin": ["x"] * 12, "label": labels,
                         "contributor_email": [SECRET] * 12})
    return RawDataset(images[..., None], labels, meta)


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> bytes:
    text = encryption.generate_key()
    monkeypatch.setenv(encryption.KEY_ENV, text)
    monkeypatch.delenv(encryption.KEY_FILE_ENV, raising=False)
    return base64.b64decode(text)


def test_round_trip_in_memory_and_nothing_in_clear_on_disk(tmp_path: Path, key: bytes):
    ds = dataset()
    save_raw(ds, tmp_path / "raw", key)
    names = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert names == ["images.npy.enc", "labels.npy.enc", "metadata.csv.enc"]
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "raw").iterdir())
    assert SECRET.encode() not in on_disk and b"contributor_email" not in on_disk and b"NUMPY" not in on_disk
    back = load_raw(tmp_path / "raw")  # the key from $AIGC_DATA_KEY
    np.testing.assert_array_equal(back.images, ds.images)
    np.testing.assert_array_equal(back.labels, ds.labels)
    assert back.metadata["contributor_email"].tolist() == [SECRET] * 12


def test_the_same_bytes_as_a_plain_snapshot(tmp_path: Path, key: bytes):
    ds = dataset()
    save_raw(ds, tmp_path / "plain")
    save_raw(ds, tmp_path / "sealed", key)
    for name in ("images.npy", "labels.npy", "metadata.csv"):
        assert encryption.read_file(tmp_path / "sealed" / name) == (tmp_path / "plain" / name).read_bytes()


def test_missing_key_names_both_variables(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch):
    save_raw(dataset(), tmp_path / "raw", key)
    monkeypatch.delenv(encryption.KEY_ENV)
    with pytest.raises(UserError) as err:
        load_raw(tmp_path / "raw")
    msg = str(err.value)
    assert "$AIGC_DATA_KEY" in msg and "$AIGC_DATA_KEY_FILE" in msg and "\n" not in msg


def test_wrong_key_is_one_clear_error(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch):
    save_raw(dataset(), tmp_path / "raw", key)
    monkeypatch.setenv(encryption.KEY_ENV, encryption.generate_key())
    with pytest.raises(UserError, match=r"images\.npy\.enc was encrypted with another key than the one in "
                                        r"\$AIGC_DATA_KEY/\$AIGC_DATA_KEY_FILE"):
        load_raw(tmp_path / "raw")


@pytest.mark.parametrize("where", ["header", "ciphertext", "tag"])
def test_one_flipped_byte_fails_authentication(tmp_path: Path, key: bytes, where: str):
    save_raw(dataset(), tmp_path / "raw", key)
    f = tmp_path / "raw" / "metadata.csv.enc"
    blob = bytearray(f.read_bytes())
    i = {"header": len(encryption.MAGIC) + 8 + 3, "ciphertext": 40, "tag": len(blob) - 1}[where]  # nonce byte 3
    blob[i] ^= 0x01
    f.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=r"metadata\.csv\.enc failed authentication \(AES-GCM\): the file was modified"):
        load_raw(tmp_path / "raw")


def test_a_renamed_file_fails_authentication(tmp_path: Path, key: bytes):
    save_raw(dataset(), tmp_path / "raw", key)
    raw = tmp_path / "raw"
    (raw / "labels.npy.enc").write_bytes((raw / "images.npy.enc").read_bytes())  # swap one file for another
    with pytest.raises(UserError, match="labels.npy.enc failed authentication"):
        load_raw(raw)


@pytest.mark.parametrize("value, what", [("not base64!", "$AIGC_DATA_KEY is not a base64-encoded 32-byte key"),
                                         (base64.b64encode(b"short").decode(), "$AIGC_DATA_KEY is not a base64")])
def test_a_malformed_key_never_shows_its_value(value: str, what: str):
    with pytest.raises(UserError) as err:
        encryption.key_from_env({encryption.KEY_ENV: value})
    assert str(err.value).startswith(what) and value not in str(err.value)


def test_a_key_file_inside_the_repository_is_refused(tmp_path: Path):
    (tmp_path / "data.key").write_text(encryption.generate_key())
    with pytest.raises(UserError, match="lies inside the project"):
        encryption.key_from_env({encryption.KEY_FILE_ENV: str(tmp_path / "data.key")}, repo=tmp_path)
    outside = tmp_path / "keys" / "data.key"
    outside.parent.mkdir()
    outside.write_text(encryption.generate_key() + "\n")
    assert len(encryption.key_from_env({encryption.KEY_FILE_ENV: str(outside)}, repo=tmp_path / "repo")) == 32


def test_keygen_and_rekey_rotate_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    repo.mkdir()
    monkeypatch.chdir(repo)
    assert cli_main(["keygen", "--out", str(repo / "k")]) == 1  # inside the project: refused
    assert cli_main(["keygen", "--out", str(keys / "old.key")]) == 0
    assert cli_main(["keygen", "--out", str(keys / "new.key")]) == 0
    assert cli_main(["keygen", "--out", str(keys / "new.key")]) == 1  # never overwritten
    assert (keys / "old.key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(encryption.KEY_FILE_ENV, str(keys / "old.key"))
    monkeypatch.delenv(encryption.KEY_ENV, raising=False)
    save_raw(dataset(), repo / "raw", encryption.key_from_env())
    assert cli_main(["rekey", "raw", "--new-key-file", str(keys / "new.key")]) == 0
    with pytest.raises(UserError, match="another key"):
        load_raw(repo / "raw")  # the old key no longer opens it
    monkeypatch.setenv(encryption.KEY_FILE_ENV, str(keys / "new.key"))
    assert load_raw(repo / "raw").metadata["contributor_email"].iloc[0] == SECRET
    out = capsys.readouterr()
    assert "re-encrypted 3 file(s) in raw" in out.out
    assert (keys / "new.key").read_text().strip() not in out.out + out.err  # a key is never printed


def test_ingest_writes_ciphertext_and_needs_the_key_first(tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch):
    from pipeline.ingest import ingest

    summary = ingest(DataConfig(source="digits"), str(tmp_path / "raw"), PrivacyConfig(encrypt_at_rest=True))
    assert summary["encrypted"] is True and encryption.is_encrypted(tmp_path / "raw")
    images = np.load(io.BytesIO(encryption.read_file(tmp_path / "raw" / "images.npy")))
    assert images.shape == (1797, 8, 8, 1)
    monkeypatch.delenv(encryption.KEY_ENV)
    with pytest.raises(UserError, match=r"privacy.encrypt_at_rest needs the data key: set \$AIGC_DATA_KEY"):
        ingest(DataConfig(source="digits"), str(tmp_path / "raw2"), PrivacyConfig(encrypt_at_rest=True))
    assert not (tmp_path / "raw2").exists()


def test_preprocess_writes_the_splits_as_ciphertext_and_readers_decrypt_in_memory(
        tmp_path: Path, key: bytes, monkeypatch: pytest.MonkeyPatch):
    from aigc.data.preprocess import dataset_sha256, load_split, preprocess, save_processed
    from aigc.encryption import is_encrypted
    from pipeline.preprocess import preprocess as preprocess_stage

    save_raw(dataset(), tmp_path / "raw", key)
    info = preprocess_stage(0, DataConfig(), PrivacyConfig(encrypt_at_rest=True), str(tmp_path / "raw"),
                            str(tmp_path / "processed"))
    assert sorted(p.name for p in (tmp_path / "processed").iterdir()) == [
        "dataset.json", "test.npz.enc", "train.npz.enc"]
    assert is_encrypted(tmp_path / "processed")
    train = load_split(tmp_path / "processed", "train")
    assert len(train["images"]) == info["counts"]["train"] and train["images"].dtype == np.float32
    # the same arrays (and lineage hash) as the same data preprocessed in clear
    save_processed(preprocess(dataset(), DataConfig(), 0), tmp_path / "plain")
    assert not is_encrypted(tmp_path / "plain")
    assert dataset_sha256(tmp_path / "plain") == dataset_sha256(tmp_path / "processed")
    plain_bytes = (tmp_path / "plain" / "train.npz").read_bytes()
    row = np.ascontiguousarray(load_split(tmp_path / "plain", "train")["images"][0, 0, 3]).tobytes()
    assert row in plain_bytes and row not in (tmp_path / "processed" / "train.npz.enc").read_bytes()

    monkeypatch.delenv(encryption.KEY_ENV)  # a reader without the key: one line naming the variables
    with pytest.raises(UserError, match=r"privacy.encrypt_at_rest needs the data key: set \$AIGC_DATA_KEY"):
        load_split(tmp_path / "processed", "train")
    with pytest.raises(UserError, match=r"needs the data key"):  # ... and the stage fails before any work
        preprocess_stage(0, DataConfig(), PrivacyConfig(encrypt_at_rest=True), str(tmp_path / "raw"),
                         str(tmp_path / "processed2"))
    assert not (tmp_path / "processed2").exists()


def test_the_nearest_grid_withholds_the_training_images():
    import torch

    from aigc.metrics.figures import nearest_grid

    fake = torch.full((4, 1, 8, 8), -1.0)
    real = torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8)  # every pixel distinct
    shown, withheld = nearest_grid(fake, real, 2), nearest_grid(fake, real, 2, redact=True)
    assert shown.shape == withheld.shape
    values = {int(v) for v in np.unique(withheld)}
    assert len(np.unique(shown)) > 200 and len(values) <= 4, values  # fakes, padding and two greys only
