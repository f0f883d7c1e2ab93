"""Resolution blocks: 32x32 and 64x64 (grey or RGB) build for dcgan, conditional dcgan and vae, and
28x28 / 8x8 nets are exactly the ones main built before the blocks existed.

The ``Ref*`` classes are main's (commit 3440f1d) aigc/models/dcgan.py, conditional.py and vae.py,
copied verbatim but for names, so this test keeps its meaning after the change is merged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aigc.errors import UserError
from aigc.models import (NetConfig, apply_spectral_norm, build_discriminator, build_encoder, build_generator,
                         init_weights)
from aigc.models import dcgan
from aigc.models.conditional import ConditionalBatchNorm


# --- main's nets (the reference) ----------------------------------------------------------------

def _same(k):
    return k // 2


def _up2(c_in, c_out, k, bias):
    pad = (k - 1) // 2
    return nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=pad, output_padding=2 - k + 2 * pad, bias=bias)


class RefGenerator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg.image_shape
        widths, k = tuple(cfg.g_widths), cfg.kernel
        self.base = (h // 4, w // 4)
        self.width0 = widths[0]
        self.project = nn.Sequential(
            nn.Linear(cfg.z_dim, widths[0] * self.base[0] * self.base[1], bias=False),
            nn.BatchNorm1d(widths[0] * self.base[0] * self.base[1]),
            nn.LeakyReLU(0.2, inplace=True),
        )
        layers = []
        outs = (*widths[1:], c)
        for i, (c_in, c_out) in enumerate(zip(widths, outs)):
            last = i == len(outs) - 1
            if i < len(outs) - 2:
                layers.append(nn.ConvTranspose2d(c_in, c_out, k, stride=1, padding=_same(k), bias=False))
            else:
                layers.append(_up2(c_in, c_out, k, bias=last))
            layers += [nn.Tanh()] if last else [nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.project(z).view(-1, self.width0, *self.base))


class RefDiscriminator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg.image_shape
        k = cfg.kernel
        layers = []
        for c_in, c_out in zip((c, *cfg.d_widths[:-1]), cfg.d_widths):
            layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=(k - 1) // 2), nn.LeakyReLU(0.2, inplace=True)]
            if cfg.d_dropout > 0:
                layers.append(nn.Dropout(cfg.d_dropout))
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n = self.features(torch.zeros(1, c, h, w)).numel()
        self.head = nn.Linear(n, 1)

    def forward(self, x):
        return self.head(self.features(x).flatten(1)).squeeze(1)


class RefConditionalGenerator(nn.Module):
    conditional = True

    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg.image_shape
        widths, k = tuple(cfg.g_widths), cfg.kernel
        self.base = (h // 4, w // 4)
        self.width0 = widths[0]
        self.num_classes = cfg.num_classes
        self.class_share = torch.tensor(cfg.class_share, dtype=torch.float64)
        width = widths[0] * self.base[0] * self.base[1]
        self.project = nn.Linear(cfg.z_dim, width, bias=False)
        self.bn0 = ConditionalBatchNorm(width, cfg.num_classes, 1)
        self.ups = nn.ModuleList()
        self.bns = nn.ModuleList()
        outs = (*widths[1:], c)
        for i, (c_in, c_out) in enumerate(zip(widths, outs)):
            if i < len(outs) - 2:
                self.ups.append(nn.ConvTranspose2d(c_in, c_out, k, stride=1, padding=_same(k), bias=False))
            else:
                self.ups.append(_up2(c_in, c_out, k, bias=i == len(outs) - 1))
            if i < len(outs) - 1:
                self.bns.append(ConditionalBatchNorm(c_out, cfg.num_classes, 2))
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, z, y):
        x = self.act(self.bn0(self.project(z), y)).view(-1, self.width0, *self.base)
        for up, bn in zip(self.ups[:-1], self.bns):
            x = self.act(bn(up(x), y))
        return torch.tanh(self.ups[-1](x))


class RefProjectionDiscriminator(nn.Module):
    conditional = True

    def __init__(self, cfg):
        super().__init__()
        base = RefDiscriminator(cfg)
        self.features = base.features
        self.head = base.head
        self.embed = nn.Embedding(cfg.num_classes, self.head.in_features)
        nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, x, y):
        phi = self.features(x).flatten(1)
        return self.head(phi).squeeze(1) + (self.embed(y) * phi).sum(1)


class RefEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg.image_shape
        self.num_classes = cfg.num_classes if cfg.conditional else 0
        self.conv = nn.Sequential(
            nn.Conv2d(c, 32, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(64 * (h // 4) * (w // 4) + self.num_classes, 256),
                                nn.LeakyReLU(0.2, inplace=True))
        self.mu = nn.Linear(256, cfg.z_dim)
        self.logvar = nn.Linear(256, cfg.z_dim)

    def forward(self, x, y=None):
        h = self.conv(x)
        if self.num_classes:
            h = torch.cat([h, F.one_hot(y, self.num_classes).to(h.dtype)], 1)
        h = self.fc(h)
        return self.mu(h), self.logvar(h)


class RefDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, h, w = cfg.image_shape
        self.conditional = bool(cfg.conditional)
        self.num_classes = cfg.num_classes if cfg.conditional else 0
        self.class_share = torch.tensor(cfg.class_share, dtype=torch.float64)
        self.base = (h // 4, w // 4)
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_dim + self.num_classes, 256), nn.ReLU(inplace=True),
            nn.Linear(256, 64 * self.base[0] * self.base[1]), nn.ReLU(inplace=True),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),
        )

    def forward(self, z, y=None):
        if self.num_classes:
            z = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)
        return torch.tanh(self.deconv(self.fc(z).view(-1, 64, *self.base)) / 2)


def _ref_generator(cfg):  # main's build_generator
    if cfg.family == "vae":
        return RefDecoder(cfg)
    G = (RefConditionalGenerator if cfg.conditional else RefGenerator)(cfg)
    G.apply(init_weights)
    return G


def _ref_discriminator(cfg):  # main's build_discriminator
    D = (RefProjectionDiscriminator if cfg.conditional else RefDiscriminator)(cfg)
    D.apply(init_weights)
    return apply_spectral_norm(D) if cfg.spectral_norm else D


# --- unchanged at 28x28 and 8x8 -----------------------------------------------------------------

PARAMS = dict(g_widths=(64, 32), d_widths=(32, 64), kernel=4, d_dropout=0.0, spectral_norm=True)  # params.yaml's
WIDTHS = [  # params.yaml's, NetConfig's defaults (the source documents' 5x5 net), and those the tests use
    PARAMS,
    dict(),
    dict(g_widths=(16, 8), d_widths=(8,), kernel=4),
    dict(g_widths=(16, 8), d_widths=(8, 16), kernel=4, spectral_norm=True),
    dict(g_widths=(32, 16), d_widths=(16, 32), kernel=4),
    dict(g_widths=(32, 16, 8), d_widths=(8, 16, 32), kernel=3, d_dropout=0.3),
]
CLASSES = dict(conditional=True, classes=(0, 1, 2), class_share=(0.5, 0.25, 0.25))


def _same_net(ref: nn.Module, new: nn.Module, *inputs: torch.Tensor) -> None:
    # the same modules, in the same order, with the same arguments (the class names aside)
    assert repr(new).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    a, b = ref.state_dict(), new.state_dict()
    assert list(b) == list(a)
    for key in a:
        assert b[key].shape == a[key].shape and torch.equal(b[key], a[key]), key
    for mode in (True, False):  # train (batch statistics) and eval (running statistics)
        ref.train(mode), new.train(mode)
        with torch.no_grad():
            torch.manual_seed(3)  # D's dropout draws its mask
            out_ref = ref(*inputs)
            torch.manual_seed(3)
            out_new = new(*inputs)
            for a_, b_ in zip(out_new if isinstance(out_new, tuple) else (out_new,),
                              out_ref if isinstance(out_ref, tuple) else (out_ref,), strict=True):
                assert torch.equal(a_, b_)


@pytest.mark.parametrize("side", [28, 8])
@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: "-".join(map(str, w.get("g_widths", ("default",)))) +
                         f"_k{w.get('kernel', 5)}_d{len(w.get('d_widths', (0, 0, 0)))}")
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_dcgan_nets_at_28_and_8_are_mains(side: int, widths: dict, conditional: bool):
    cfg = NetConfig("dcgan", 16, 1, side, side, **widths, **(CLASSES if conditional else {}))
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    x = torch.rand(6, 1, side, side, generator=torch.Generator().manual_seed(2)) * 2 - 1
    y = (torch.tensor([0, 1, 2, 0, 1, 2]),) if conditional else ()
    for ref_build, build, inputs in ((_ref_generator, build_generator, (z, *y)),
                                     (_ref_discriminator, build_discriminator, (x, *y))):
        torch.manual_seed(7)
        ref = ref_build(cfg)
        torch.manual_seed(7)
        new = build(cfg)
        _same_net(ref, new, *inputs)


@pytest.mark.parametrize("side", [28, 8])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_vae_nets_at_28_and_8_are_mains(side: int, conditional: bool):
    cfg = NetConfig("vae", 16, 1, side, side, **(CLASSES if conditional else {}))
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    x = torch.rand(6, 1, side, side, generator=torch.Generator().manual_seed(2)) * 2 - 1
    y = (torch.tensor([0, 1, 2, 0, 1, 2]),) if conditional else ()
    torch.manual_seed(7)  # the trainer builds the decoder, then the encoder, from one seed
    ref_dec, ref_enc = _ref_generator(cfg), RefEncoder(cfg)
    torch.manual_seed(7)
    dec, enc = build_generator(cfg), build_encoder(cfg)
    _same_net(ref_dec, dec, z, *y)
    _same_net(ref_enc, enc, x, *y)


# --- 32x32 and 64x64 ----------------------------------------------------------------------------

@pytest.mark.parametrize("side, k, base", [(4, 2, 1), (8, 2, 2), (12, 2, 3), (16, 2, 4), (28, 2, 7), (32, 3, 4),
                                           (36, 2, 9), (48, 3, 6), (56, 3, 7), (64, 4, 4), (96, 4, 6), (128, 5, 4)])
def test_blocks_halve_to_the_smallest_whole_base_of_at_least_4(side: int, k: int, base: int):
    assert dcgan.blocks(side, side, "dcgan") == k and side // 2 ** k == base


def test_blocks_of_a_non_square_image_fit_both_sides():
    assert dcgan.blocks(32, 64, "dcgan") == 3  # 4x8: G doubles both sides together
    assert dcgan.generator_plan(NetConfig("dcgan", 8, 3, 32, 64, **PARAMS)).base == (4, 8)


@pytest.mark.parametrize("family", ["dcgan", "vae"])
@pytest.mark.parametrize("h, w, sizes", [(30, 30, "28 or 32"), (48, 50, "48 or 52"), (2, 2, "4")])
def test_a_size_that_does_not_fit_names_the_sizes_that_do(family: str, h: int, w: int, sizes: str):
    with pytest.raises(UserError) as err:
        build_generator(NetConfig(family, 8, 3, h, w))
    assert str(err.value) == (f"the {family} family builds for sides that are multiples of 4 (4, 8, 12, ..., 28, 32, "
                              f"..., 64, ...); the data is {h}x{w}; set data.image_size to {sizes}, or use "
                              "model.family: mlp")


@pytest.mark.parametrize("side, g_chans, d_chans", [
    (32, [64, 64, 32], [32, 64, 64]),  # z -> 64 x 4x4 -> 8 -> 16 -> 32
    (64, [64, 64, 64, 32], [32, 64, 64, 64]),  # z -> 64 x 4x4 -> 8 -> 16 -> 32 -> 64
])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_dcgan_at_32_and_64_starts_at_4x4_and_halves_back(side, g_chans, d_chans, channels, conditional):
    cfg = NetConfig("dcgan", 16, channels, side, side, **PARAMS, **(CLASSES if conditional else {}))
    G, D = build_generator(cfg), build_discriminator(cfg)
    convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert G.base == (4, 4) and [m.in_channels for m in convs] == g_chans and convs[-1].out_channels == channels
    assert all(m.stride == (2, 2) for m in convs)
    assert [m.out_channels for m in D.modules() if isinstance(m, nn.Conv2d)] == d_chans
    assert D.head.in_features == d_chans[-1] * 4 * 4  # D halves back to G's base
    y = (torch.tensor([0, 1, 2, 0]),) if conditional else ()
    fake = G(torch.randn(4, 16), *y)
    assert fake.shape == (4, channels, side, side) and fake.abs().max() <= 1
    assert D(fake, *y).shape == (4,)


@pytest.mark.parametrize("side, enc_chans", [(32, [32, 64, 64]), (64, [32, 64, 64, 64])])
@pytest.mark.parametrize("channels", [1, 3])
def test_vae_at_32_and_64_halves_to_4x4(side, enc_chans, channels):
    cfg = NetConfig("vae", 16, channels, side, side)
    enc, dec = build_encoder(cfg), build_generator(cfg)
    assert [m.out_channels for m in enc.modules() if isinstance(m, nn.Conv2d)] == enc_chans
    assert enc.fc[0].in_features == 64 * 4 * 4 and dec.base == (4, 4)
    assert [m.in_channels for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)] == enc_chans[::-1]
    x = torch.rand(3, channels, side, side) * 2 - 1
    mu, logvar = enc(x)
    assert mu.shape == logvar.shape == (3, 16)
    assert dec.logits(mu).shape == (3, channels, side, side) and dec(mu).abs().max() <= 1


@pytest.mark.parametrize("side", [28, 32, 64])
@pytest.mark.parametrize("kernel", [3, 4])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cond"])
def test_nearest_upsample_doubles_with_a_size_keeping_convolution(side: int, kernel: int, conditional: bool):
    """model.upsample: nearest -- every doubling layer of G is nearest-neighbour upsampling and a
    stride-1 convolution (odd or even kernel), no transposed convolution is left, and G still draws
    the data's shape; D is the one transposed G would meet."""
    cfg = NetConfig(family="dcgan", z_dim=16, channels=3, height=side, width=side, g_widths=(32, 16),
                    d_widths=(16, 32), kernel=kernel, upsample="nearest", conditional=conditional,
                    classes=(0, 1, 2) if conditional else (), class_share=(1 / 3,) * 3 if conditional else ())
    G = build_generator(cfg)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in G.modules())
    ups = [m for m in G.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == dcgan.blocks(side, side, "dcgan") and all(u.mode == "nearest" for u in ups)
    z = torch.randn(2, 16)
    x = G(z, torch.tensor([0, 2])) if conditional else G(z)
    assert x.shape == (2, 3, side, side) and x.abs().max() <= 1
    transposed = build_discriminator(NetConfig(**{**cfg.to_dict(), "upsample": "transposed"}))
    assert [p.shape for p in build_discriminator(cfg).parameters()] == [p.shape for p in transposed.parameters()]
