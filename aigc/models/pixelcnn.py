"""The autoregressive family: a gated PixelCNN (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders", arXiv:1606.05328).

    p(x | y) = prod_k p(x_k | x_<k, y)

over the sub-pixels in raster order and, within a pixel, R -> G -> B; each factor a softmax over
the 256 intensity levels. The layout follows EugenHotaj/pytorch-generative
(``pytorch_generative/models/autoregressive/gated_pixel_cnn.py``): masked ``k x k`` convolutions
done as unmasked ``(k//2+1) x k`` (vertical) and ``1 x (k//2+1)`` (horizontal) convolutions with
one-sided padding, a 7x7 first layer with the centre masked, 3x3 after it, skips summed into a
ReLU/1x1 head. Unlike that file it masks the colour channels too, as PixelCNN does (PixelRNN,
arXiv:1601.06759, section 3.4): the hidden features are split into C groups; group g may see the
current pixel's channels < g in the first layer (mask A) and groups <= g after it (mask B), and
channel c's logits come from groups <= c, so R is predicted from the context only, G also from R,
B from R and G.

* The vertical stack sees only rows strictly above (the input is shifted down a row once, every
  convolution after it pads the top only), so it has no blind spot and no channel masks; it feeds
  the horizontal stack through a 1x1 ``link`` at the same row.
* The horizontal stack sees the current row left of the pixel and, through the channel masks, the
  pixel's earlier channels; its layers after the first are residual, and each gives a skip.
* Gated activations ``tanh(a) * sigmoid(b)`` in both stacks; a conditional net adds a learned
  per-class bias to each gated layer's pre-activations (the paper's ``V^T h`` with one-hot ``h``).

``logits(x, y)`` scores images (training, likelihood); ``forward(z, y)`` *samples*: ``z``
(N, C*H*W) standard normals, one per sub-pixel in sampling order, each turned into a categorical
draw by the inverse CDF of ``Phi(z)`` -- so samples are a function of (weights, z, y), and the
rest of the pipeline calls ``G(z)`` / ``G(z, y)`` like any generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from aigc.errors import UserError

LEVELS = 256  # intensities per channel: the softmax's size
FIRST_KERNEL = 7  # the first (mask A) layer: a wide view of the context from the start
KERNEL = 3  # the gated layers after it


def groups_of(features: int, channels: int) -> torch.Tensor:
    """The colour group (0..channels-1) of each of ``features`` hidden features, in equal blocks."""
    return torch.arange(features) * channels // features


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> levels 0..255 (int64): round((x + 1) * 127.5)."""
    return torch.round((x.float() + 1) * 127.5).clamp(0, LEVELS - 1).long()


def _channel_mask(out_groups: torch.Tensor, in_groups: torch.Tensor, strict: bool) -> torch.Tensor:
    """(out, in) 0/1: output group g sees input group j when j < g (mask A) or j <= g (mask B)."""
    allowed = in_groups[None, :] < out_groups[:, None] if strict else in_groups[None, :] <= out_groups[:, None]
    return allowed.float()


class MaskedConv2d(nn.Conv2d):
    """A convolution whose weight is multiplied by a fixed 0/1 mask (not saved: it follows from the shape)."""

    def __init__(self, mask: torch.Tensor, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", mask.expand_as(self.weight).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


def gate(a: torch.Tensor) -> torch.Tensor:
    """tanh(first half) * sigmoid(second half), over channels."""
    t, s = a.chunk(2, dim=1)
    return torch.tanh(t) * torch.sigmoid(s)


class GatedLayer(nn.Module):
    """One layer of both stacks. ``first``: the input is the image (mask A, no residual)."""

    def __init__(self, c_in: int, width: int, channels: int, kernel: int, first: bool, num_classes: int) -> None:
        super().__init__()
        self.k, self.first = kernel, first
        g_hidden = groups_of(width, channels)
        g_in = torch.arange(c_in) if first else g_hidden
        g_out2 = g_hidden.repeat(2)  # the gate's two halves: feature i of each belongs to group g(i)
        self.v_conv = nn.Conv2d(c_in, 2 * width, (kernel // 2 + 1, kernel))  # rows above (input already shifted)
        self.link = nn.Conv2d(2 * width, 2 * width, 1)  # vertical -> horizontal: context above, no mask
        # The horizontal 1 x (k//2+1) kernel: columns left of the pixel see every channel, the pixel's
        # own column only the allowed groups.
        h_mask = torch.ones(2 * width, c_in, 1, kernel // 2 + 1)
        h_mask[:, :, 0, -1] = _channel_mask(g_out2, g_in, strict=first)
        self.h_conv = MaskedConv2d(h_mask, c_in, 2 * width, (1, kernel // 2 + 1))
        b_mask = _channel_mask(g_hidden, g_hidden, strict=False)[:, :, None, None]
        self.h_res = None if first else MaskedConv2d(b_mask, width, width, 1)
        self.skip = MaskedConv2d(b_mask, width, width, 1)
        self.v_class = nn.Embedding(num_classes, 2 * width) if num_classes else None
        self.h_class = nn.Embedding(num_classes, 2 * width) if num_classes else None

    def vertical(self, v: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the next vertical input, the link term for the horizontal stack), both at the rows of ``v``."""
        p = self.k // 2
        a = self.v_conv(F.pad(v, (p, p, p, 0)))  # (N, 2F, H, W): rows r-p..r of an input that sees < r
        if self.v_class is not None:
            a = a + self.v_class(y)[:, :, None, None]
        return gate(a), self.link(a)

    def horizontal(self, h: torch.Tensor, link: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        """(the next horizontal input, the skip), at the rows and columns of ``h``."""
        a = self.h_conv(F.pad(h, (self.k // 2, 0, 0, 0))) + link  # (N, 2F, H, W): columns c-k//2..c
        if self.h_class is not None:
            a = a + self.h_class(y)[:, :, None, None]
        out = gate(a)
        skip = self.skip(out)
        return (out if self.h_res is None else h + self.h_res(out)), skip


class PixelCNN(nn.Module):
    """``logits(x[, y])`` -> (N, 256, C, H, W); ``forward(z[, y])`` -> samples (N, C, H, W) in [-1, 1]."""

    def __init__(self, cfg) -> None:
        super().__init__()
        c, h, w = cfg.image_shape
        layers, width = cfg.pixel_layers, cfg.pixel_width
        if layers < 1 or width < c:
            raise UserError(f"the pixelcnn family needs pixel_layers >= 1 and pixel_width >= channels ({c}); got "
                            f"{layers} and {width} (set pixelcnn.layers and pixelcnn.width)")
        if cfg.z_dim != c * h * w:
            raise UserError(f"a pixelcnn draws one z per sub-pixel: z_dim must be C*H*W = {c * h * w}, got {cfg.z_dim}")
        self.channels, self.height, self.width = c, h, w
        self.conditional = bool(cfg.conditional)
        self.num_classes = cfg.num_classes if cfg.conditional else 0
        self.class_share = torch.tensor(cfg.class_share, dtype=torch.float64)  # for sampling without labels
        self.layers = nn.ModuleList(
            [GatedLayer(c, width, c, FIRST_KERNEL, True, self.num_classes)]
            + [GatedLayer(width, width, c, KERNEL, False, self.num_classes) for _ in range(layers - 1)])
        g_hidden = groups_of(width, c)
        g_logits = torch.arange(c).repeat_interleave(LEVELS)  # output o: channel o // 256's logits
        self.head = nn.Sequential(
            nn.ReLU(), MaskedConv2d(_channel_mask(g_hidden, g_hidden, False)[:, :, None, None], width, width, 1),
            nn.ReLU(), MaskedConv2d(_channel_mask(g_logits, g_hidden, False)[:, :, None, None], width, c * LEVELS, 1),
        )

    def _links(self, inp: torch.Tensor, y: torch.Tensor | None) -> list[torch.Tensor]:
        """The vertical stack over the rows of ``inp``: each layer's link term (row r: rows < r only)."""
        v = F.pad(inp, (0, 0, 1, 0))[:, :, :-1]  # shift down one row: row r sees rows < r
        links = []
        for layer in self.layers:
            v, link = layer.vertical(v, y)
            links.append(link)
        return links

    def _head(self, inp: torch.Tensor, links: list[torch.Tensor], y: torch.Tensor | None) -> torch.Tensor:
        """The horizontal stack and the head over ``inp``'s rows and columns -> (N, 256, C, h, w) logits."""
        h, skips = inp, 0
        for layer, link in zip(self.layers, links):
            h, skip = layer.horizontal(h, link, y)
            skips = skips + skip
        out = self.head(skips)  # (N, C*256, h, w)
        n, _, rows, cols = out.shape
        return out.view(n, self.channels, LEVELS, rows, cols).transpose(1, 2)

    def logits(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 256, C, H, W) logits of every sub-pixel given those before it; ``x`` in [-1, 1]."""
        inp = quantise(x).to(x.dtype if x.is_floating_point() else torch.float32) / 127.5 - 1
        return self._head(inp, self._links(inp, y), y)

    def nll(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(x[, y]) per image (N,), nats, over the 256 levels of each sub-pixel."""
        return F.cross_entropy(self.logits(x, y).float(), quantise(x), reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, cached: bool = True) -> torch.Tensor:
        """Samples (N, C, H, W) in [-1, 1]: sub-pixel k (raster order, then R -> G -> B) is the level
        where the softmax's CDF first reaches Phi(z[:, k]).

        ``cached`` (the default) computes every layer's output once per pixel, from the outputs it
        kept of the pixels before (Ramachandran et al. 2017, "Fast Generation for Convolutional
        Autoregressive Models", arXiv:1704.06001): the vertical stack one row at a time, from each
        layer's last rows; the horizontal stack one pixel at a time, from each layer's last columns
        of the current row; the head on that pixel alone. ``cached=False`` recomputes the whole
        image for every sub-pixel: the slow, obvious check.
        """
        n = len(z)
        c, h, w = self.channels, self.height, self.width
        u = torch.special.ndtr(z.double()).view(n, h, w, c)  # the uniform behind each categorical draw
        if cached:
            with _one_thread(z.device):
                return _CachedSampler(self, y, n, z.device).sample(u).to(z.dtype)
        img = torch.zeros(n, c, h, w, device=z.device, dtype=z.dtype)
        for r in range(h):
            for col in range(w):
                for ch in range(c):
                    img[:, ch, r, col] = _draw(self.logits(img, y)[:, :, ch, r, col], u[:, r, col, ch])
        return img


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, one thread while the cached sampler runs: its ~80 small operations per sub-pixel
    are too small to split, and on a busy machine every split op waits for a descheduled thread
    (measured on this shared 2-core Xeon, batch 500: 12-14 samples/s on 2 threads against 49-80 on
    one; the same reason as KID's in aigc/metrics/fid.py)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The level (on the [-1, 1] scale) where the softmax's CDF of ``logits`` (N, 256) first reaches ``u`` (N,)."""
    cdf = torch.softmax(logits.double(), dim=1).cumsum(1)
    return (cdf < u[:, None]).sum(1).clamp(max=LEVELS - 1).to(logits.dtype) / 127.5 - 1


class _CachedSampler:
    """A PixelCNN's sampler that computes each layer's output at each pixel once (``PixelCNN.forward``).

    The horizontal convolutions, the skips, the residuals and the head are 1-pixel-wide, so at one
    pixel they are matrix products of a flattened window of a layer's input (its last ``k//2 + 1``
    columns, kept in a buffer of the current row) with the masked weight, flattened to match.
    """

    def __init__(self, G: PixelCNN, y: torch.Tensor | None, n: int, device: torch.device) -> None:
        self.G, self.n, self.device = G, n, device
        self.dtype = G.head[-1].weight.dtype
        self.v_bias, self.h_bias, self.h_weight, self.out_weight, self.out_bias = [], [], [], [], []
        for i, layer in enumerate(G.layers):
            # The class bias of each stack, per image (N, 2F) (0 when unconditional).
            self.v_bias.append(layer.v_class(y) if layer.v_class is not None else 0)
            hb = layer.h_conv.bias + (layer.h_class(y) if layer.h_class is not None else 0)
            self.h_bias.append(hb.expand(n, -1))
            # (2F, C_in, 1, k//2+1) -> (2F, (k//2+1) * C_in), matching a window laid out (N, columns, C_in).
            wh = (layer.h_conv.weight * layer.h_conv.mask)[:, :, 0].permute(0, 2, 1)
            self.h_weight.append(wh.reshape(len(wh), -1).T.contiguous())
            # The skip and (but in the first and the last layer) the residual: one product.
            last = i == len(G.layers) - 1
            parts = [layer.skip] + ([] if layer.h_res is None or last else [layer.h_res])
            self.out_weight.append(torch.cat([(m.weight * m.mask)[:, :, 0, 0] for m in parts]).T.contiguous())
            self.out_bias.append(torch.cat([m.bias for m in parts]))
        h1, h2 = G.head[1], G.head[3]
        self.head1 = ((h1.weight * h1.mask)[:, :, 0, 0].T.contiguous(), h1.bias)
        w2 = (h2.weight * h2.mask)[:, :, 0, 0].view(G.channels, LEVELS, -1)
        self.head2 = [(w2[ch].T.contiguous(), h2.bias.view(G.channels, LEVELS)[ch]) for ch in range(G.channels)]

    def sample(self, u: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) from the uniforms ``u`` (N, H, W, C)."""
        G, n = self.G, self.n
        c, w, width = G.channels, G.width, G.layers[0].skip.weight.shape[0]
        zeros = dict(device=self.device, dtype=self.dtype)
        img = torch.zeros(n, c, G.height, w, **zeros)
        # The vertical stack's input rows above the current one, per layer: zeros above the image,
        # like the full pass's top padding.
        v_rows = [torch.zeros(n, c if i == 0 else width, layer.k // 2, w, **zeros) for i, layer in enumerate(G.layers)]
        # The horizontal stack's inputs along the current row, per layer (N, k//2 + W, C_in): the
        # first k//2 columns stay 0, the left padding.
        h_cols = [torch.zeros(n, layer.k // 2 + w, c if i == 0 else width, **zeros) for i, layer in enumerate(G.layers)]
        for r in range(G.height):
            links = self._vertical(img[:, :, r - 1:r] if r else torch.zeros(n, c, 1, w, **zeros), v_rows)
            for col in range(w):
                for ch in range(c):
                    skips = self._horizontal(col, links, h_cols)
                    hid = F.relu(torch.addmm(self.head1[1], F.relu(skips), self.head1[0]))
                    level = _draw(torch.addmm(self.head2[ch][1], hid, self.head2[ch][0]), u[:, r, col, ch])
                    img[:, ch, r, col] = level
                    h_cols[0][:, G.layers[0].k // 2 + col, ch] = level
        return img

    def _vertical(self, above: torch.Tensor, v_rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """The vertical stack at the next row (``above``: the image row above it (N, C, 1, W)); each
        layer's link term for that row, (N, W, 2F) with the horizontal bias added."""
        v, links = above, []
        for i, layer in enumerate(self.G.layers):
            p = layer.k // 2
            window = torch.cat([v_rows[i], v], dim=2)  # (N, C_in, p + 1, W): rows r-p..r of the layer's input
            v_rows[i] = window[:, :, 1:]
            a = layer.v_conv(F.pad(window, (p, p, 0, 0)))  # (N, 2F, 1, W)
            if layer.v_class is not None:
                a = a + self.v_bias[i][:, :, None, None]
            v = gate(a)
            links.append(layer.link(a)[:, :, 0].transpose(1, 2) + self.h_bias[i][:, None, :])
        return links

    def _horizontal(self, col: int, links: list[torch.Tensor], h_cols: list[torch.Tensor]) -> torch.Tensor:
        """The horizontal stack at column ``col`` of the current row -> the summed skips (N, F)."""
        skips = 0
        for i, layer in enumerate(self.G.layers):
            p = layer.k // 2
            window = h_cols[i][:, col:col + p + 1].flatten(1)  # (N, (p + 1) * C_in): columns col-p..col
            out = gate(torch.addmm(links[i][:, col], window, self.h_weight[i]))
            sr = torch.addmm(self.out_bias[i], out, self.out_weight[i])
            width = out.shape[1]
            skips = skips + sr[:, :width]
            if i + 1 < len(h_cols):  # the next layer's input at this column
                h_cols[i + 1][:, self.G.layers[i + 1].k // 2 + col] = out if layer.h_res is None else \
                    h_cols[i][:, p + col] + sr[:, width:]
        return skips
