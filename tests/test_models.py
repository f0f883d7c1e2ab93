"""Both families size themselves from the data; the generator rebuilds from its file alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aigc.errors import UserError
from aigc.models import NetConfig, build_discriminator, build_generator, generator_payload, load_generator, sample


@pytest.mark.parametrize("family", ["dcgan", "mlp"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_shapes(family: str, shape: tuple[int, int, int]):
    cfg = NetConfig(family, 16, *shape)
    G, D = build_generator(cfg), build_discriminator(cfg)
    fake = G(torch.randn(5, 16))
    assert fake.shape == (5, *shape)
    assert fake.min() >= -1 and fake.max() <= 1
    assert D(fake).shape == (5,)


def test_dcgan_needs_a_multiple_of_four():
    with pytest.raises(UserError, match="multiples of 4.*the data is 30x30; set data.image_size to 28 or 32"):
        build_generator(NetConfig("dcgan", 16, 1, 30, 30))


def test_generator_rebuilds_from_its_file_alone(tmp_path: Path):
    cfg = NetConfig("dcgan", 8, 1, 8, 8)
    G = build_generator(cfg)
    torch.save(generator_payload(G, cfg), tmp_path / "g.pt")
    expected = sample(G, cfg.z_dim, 6, seed=3)
    # A fresh interpreter with nothing but the file (no params.yaml, no dataset.json).
    code = ("import sys, torch; from aigc.models import load_generator, sample; "
            "G, cfg = load_generator(sys.argv[1]); torch.save(sample(G, cfg.z_dim, 6, seed=3), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.pt"), str(tmp_path / "x.pt")], check=True,
                   cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "x.pt"), expected)
    G2, cfg2 = load_generator(tmp_path / "g.pt")
    assert cfg2 == cfg and not G2.training


def test_bad_generator_files(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        load_generator(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable generator file"):
        load_generator(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not an aigc generator file"):
        load_generator(tmp_path / "other.pt")


@pytest.mark.parametrize("n", ["0", "100000"])
def test_generate_with_an_impossible_count(tmp_path: Path, capsys, n: str):
    from aigc.cli import main as cli

    cfg = NetConfig("mlp", 8, 1, 8, 8)
    torch.save(generator_payload(build_generator(cfg), cfg), tmp_path / "g.pt")
    assert cli(["generate", "--model", str(tmp_path / "g.pt"), "-n", n, "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: n = {n}: ask for 1 to ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("n", [0, 1025, 5000])
def test_served_model_states_the_bound_it_enforces(tmp_path: Path, n: int):
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModelContext

    from pipeline.serving import MAX_SERVED_IMAGES, GeneratorModel

    cfg = NetConfig("mlp", 8, 1, 8, 8)
    torch.save(generator_payload(build_generator(cfg), cfg), tmp_path / "g.pt")
    model = GeneratorModel()
    model.load_context(PythonModelContext(artifacts={"generator": str(tmp_path / "g.pt")}, model_config={}))
    # n = 0 once said "1 to 10000" though the server refuses more than 1,024 per request
    with pytest.raises(MlflowException) as exc:
        model.predict(None, pd.DataFrame({"n": [n], "seed": [0]}))
    assert exc.value.message == f"n = {n}: ask for 1 to {MAX_SERVED_IMAGES} images"
    assert MAX_SERVED_IMAGES == 1024
    assert model.predict(None, pd.DataFrame({"n": [MAX_SERVED_IMAGES], "seed": [0]})).shape == (1024, 8, 8, 1)
