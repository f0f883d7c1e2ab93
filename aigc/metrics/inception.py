"""The FID Inception network (TensorFlow's 2015-12-05 InceptionV3 as ported by pytorch-fid), for
``evaluate.features: inception`` when the user has its weights.

Why it is defined here and not imported: pytorch-fid, torch-fidelity and clean-fid all build the
network from torchvision, and torchvision cannot be installed beside this project's torch
(docs/development.md, "The stack": torch==2.13.0 only, never torchvision). The layout below is
torchvision's ``Inception3`` (``num_classes=1008, aux_logits=False``) with pytorch-fid's FID patches: the 35x35, 17x17 and first
8x8 blocks average-pool without counting the zero padding (TensorFlow's pooling), the last 8x8
block max-pools. Module names follow theirs, so the state dict of pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` loads key for key. Nothing downloads: the user points
``evaluate.inception_weights`` at a local copy of that file.

Input: [-1, 1] images (N, C, H, W), grey (C = 1) repeated to 3 channels, resized bilinearly to
299x299 (``align_corners=False``) as pytorch-fid does; pytorch-fid maps [0, 1] to [-1, 1] after the
resize, which is the same since both steps are linear. Output: the 2048-d pool3 features (FID's)
and the 1008 logits of ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aigc.errors import UserError

FEATURES = 2048  # pool3
LOGITS = 1008  # the TensorFlow graph's classes (1000 ImageNet classes + 8 unused)
SIZE = 299
WEIGHTS_HINT = ("point evaluate.inception_weights at pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                "(a state dict of the FID InceptionV3), or set evaluate.features: classifier")


class Conv(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's eps 1e-3), ReLU: keys ``conv.*``, ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: torch.Tensor, convs: Sequence[nn.Module]) -> torch.Tensor:
    for c in convs:
        x = c(x)
    return x


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3, stride 1 average that ignores the zero padding (the FID patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 64 + 64 + 96 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1 = Conv(c_in, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          _chain(x, (self.branch5x5_1, self.branch5x5_2)),
                          _chain(x, (self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)),
                          self.branch_pool(_avg_pool_tf(x))], 1)


class BlockB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3 s2 | 1x1-3x3-3x3 s2 | max pool s2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x),
                          _chain(x, (self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1) -> 4 x 192 channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1 = Conv(c_in, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(c_in, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x),
                          _chain(x, (self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)),
                          _chain(x, (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                     self.branch7x7dbl_4, self.branch7x7dbl_5)),
                          self.branch_pool(_avg_pool_tf(x))], 1)


class BlockD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = Conv(c_in, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(c_in, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_chain(x, (self.branch3x3_1, self.branch3x3_2)),
                          _chain(x, (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                                     self.branch7x7x3_4)),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs -> 320 + 768 + 768 + 192 = 2048 channels. ``max_pool``:
    the FID network's last block max-pools its pool branch (the first one averages)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1 = Conv(c_in, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(c_in, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3: ``features`` gives pool3 (N, 2048), ``forward`` the 1008 logits."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, LOGITS)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (N, 1 or 3, H, W) -> (N, 3, 299, 299), bilinear as pytorch-fid."""
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise UserError(f"the Inception features take grey or RGB images, not {x.shape[1]} channels; "
                            "set evaluate.features: classifier")
        return F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def load_inception(path: str | Path | None) -> FIDInceptionV3:
    """The FID Inception network from a local state-dict file, in eval mode; a UserError (one line
    naming the file and what to do) when it is missing, unreadable or not that network's weights.
    ``num_batches_tracked`` counters (unused in eval mode) may be present or not."""
    if path is None:
        raise UserError(f"evaluate.features is inception but evaluate.inception_weights is not set; {WEIGHTS_HINT}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluate.inception_weights = {path}: file not found; {WEIGHTS_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"evaluate.inception_weights = {path}: not a readable PyTorch file "
                        f"({type(exc).__name__}); {WEIGHTS_HINT}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = FIDInceptionV3()
    want = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"evaluate.inception_weights = {path}: not a state dict of tensors; {WEIGHTS_HINT}")
    have = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or extra or wrong:
        what = "; ".join(f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                         (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", wrong)) if keys)
        raise UserError(f"evaluate.inception_weights = {path}: not the FID InceptionV3's weights ({what}); "
                        f"{WEIGHTS_HINT}")
    model.load_state_dict(state, strict=False)  # every weight checked above; only the counters may differ
    return model.eval()


class InceptionEvaluator(nn.Module):
    """The evaluator interface (``features``, ``embed_batch``, ``forward``, ``cfg``) with Inception's
    pool3 as the features (FID, KID, precision/recall/density/coverage, DCR) and the classifier's
    logits (IS, modes, class_kl): Inception's ImageNet classes say nothing about which digit an
    image is, so the class-based scores keep the data's own classifier."""

    def __init__(self, classifier: nn.Module, inception: FIDInceptionV3):
        super().__init__()
        self.classifier = classifier
        self.inception = inception
        self.cfg = replace(classifier.cfg, features=FEATURES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inception.features(x)

    def embed_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inception.features(x), self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)
