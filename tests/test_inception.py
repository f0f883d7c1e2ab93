"""evaluate.features: inception -- the FID InceptionV3 defined in aigc/metrics/inception.py, loaded
from a weights file in pytorch-fid's state-dict format that the test writes (random weights: no
download, nothing real to compare), a few 28x28 digits embedded to 2048-d pool3 features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aigc.config import EvaluateConfig, load_params
from aigc.errors import ConfigError, UserError
from aigc.metrics import embed
from aigc.metrics.evaluator import Evaluator, EvaluatorNet, weights_sha256
from aigc.metrics.inception import FIDInceptionV3, InceptionEvaluator, load_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FIDInceptionV3]:
    """A state dict of the FID network with seeded random weights and batch-norm statistics."""
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_state_dict_has_pytorch_fids_names_and_shapes():
    state = FIDInceptionV3().state_dict()
    # Spot checks against pytorch-fid's fid_inception_v3() (torchvision Inception3, 1008 classes, no aux).
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Conv2d_4a_3x3.bn.running_var"].shape == (192,)
    assert state["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7a.branch7x7x3_4.conv.weight"].shape == (192, 192, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    assert not any(k.startswith("AuxLogits") for k in state)
    assert sum(t.numel() for k, t in state.items() if not k.startswith("fc.") and "running" not in k
               and "num_batches" not in k) == 23_834_568 - 2_049_000  # torchvision inception_v3(aux_logits=False) less its 1000-class fc


def test_weights_load_through_the_config_and_embed_28x28_digits(weights):
    path, net = weights
    cfg = EvaluateConfig(features="inception", inception_weights=str(path))
    inception = load_inception(cfg.inception_weights)
    assert weights_sha256(inception) == weights_sha256(net)
    classifier = Evaluator(EvaluatorNet(channels=1, height=28, width=28, classes=tuple(range(10)))).eval()
    ev = InceptionEvaluator(classifier, inception)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    e = embed(ev, x, batch_size=2)
    assert e.features.shape == (3, 2048) and e.logits.shape == (3, 10)
    assert ev.cfg.features == 2048 and ev.cfg.num_classes == 10
    with torch.no_grad():
        assert torch.allclose(e.features, net.features(x.repeat(1, 3, 1, 1)), atol=1e-4)  # grey = RGB repeated
        assert torch.allclose(e.logits, classifier(x), atol=1e-5)  # class scores stay the classifier's
        assert inception(x[:1]).shape == (1, 1008)
    assert e.features.std(0).mean() > 0  # the images are told apart
    assert weights_sha256(ev) != weights_sha256(classifier)  # the lineage and cache key see the features


def test_features_default_to_auto_and_inception_needs_weights(tmp_path: Path):
    assert EvaluateConfig().features == "auto"  # the classifier on labelled data, else self-supervised
    params = tmp_path / "params.yaml"
    params.write_text(Path("params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ConfigError, match="inception_weights is not set"):
        load_params(params, {"evaluate.features": "inception"})
    with pytest.raises(ConfigError, match="evaluate.features"):
        load_params(params, {"evaluate.features": "vgg"})


def test_a_missing_or_wrong_weights_file_is_one_clear_error(weights, tmp_path: Path):
    path, net = weights
    with pytest.raises(UserError, match=r"inception_weights = .*nope.pth: file not found; point .*pt_inception"):
        load_inception(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("not torch")
    with pytest.raises(UserError, match=r"text.pth: not a readable PyTorch file"):
        load_inception(tmp_path / "text.pth")
    state = net.state_dict()
    torch.save({k: v for k, v in state.items() if k != "Mixed_6b.branch1x1.conv.weight"}, tmp_path / "short.pth")
    with pytest.raises(UserError, match=r"not the FID InceptionV3's weights \(missing keys 1 .*Mixed_6b"):
        load_inception(tmp_path / "short.pth")
    # torchvision's ImageNet InceptionV3: 1000 classes and an auxiliary head -- not FID's network.
    imagenet = dict(state) | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
                              "AuxLogits.fc.weight": torch.zeros(1000, 768)}
    torch.save(imagenet, tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match=r"unexpected keys 1 \(e.g. AuxLogits.fc.weight\); wrong shapes 2"):
        load_inception(tmp_path / "imagenet.pth")
    for bad in ("short.pth", "imagenet.pth", "nope.pth"):
        try:
            load_inception(tmp_path / bad)
        except UserError as exc:
            assert "\n" not in str(exc)
