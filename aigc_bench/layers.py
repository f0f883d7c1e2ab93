"""Per layer: how close each of the train stage's convolutions comes to the machine's fp32 matmul
peak, and what the equivalent formulations of its up-sampling and thin layers cost instead.

    python -m aigc_bench.layers [--rounds 3] [--reps 30] [--isa avx2]

Writes reports/benchmarks/layers[_<isa>].{json,md}. For every Conv2d, ConvTranspose2d and
Linear of params.yaml's G and D (on the default data's shape, at the stage's batch) it times
the layer's forward and forward+backward (weight and input gradients) in isolation and divides
the FLOPs PyTorch counts for them (``torch.utils.flop_counter``, backward included) by the time:
the fraction of the peak a layer reaches is the ceiling of a step made of it. Beside them, the
levers issue 15 names for the layers that fall short, each timed the same way, interleaved with
the layer it would replace:

* a stride-2 ``ConvTranspose2d(k=4, padding=1)`` (G's up-sampling) as an **exact** sub-pixel
  convolution (a 2x2 convolution to 4x the channels, each output phase cropped and interleaved;
  ``subpixel_from_transposed`` maps the weights, the test checks the outputs agree), as a 3x3
  convolution + ``PixelShuffle`` (a superset of it) and as nearest up-sampling + 3x3 convolution
  (the "upsample+conv" of the checkerboard paper: a different function, 2.25x the FLOPs);
* a thin layer (a Conv2d from <= 3 channels, D's first; a ConvTranspose2d to <= 3 channels, G's
  last), whose oneDNN kernels are the least efficient, as an **exact** im2col form: ``unfold`` +
  one matmul, or one matmul + ``fold``.

Speed only, and no recipe change: the exact forms compute the same function; the others would
need a time-to-quality run before any default could move to them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from aigc import machine
from aigc_bench import isa

OUT = Path(__file__).resolve().parents[1] / "reports" / "benchmarks"


def subpixel_from_transposed(convt):
    """An exact sub-pixel equivalent of ``convt`` (a stride-2 ConvTranspose2d, kernel 4, padding 1):
    a 2x2 convolution over the input padded by one to 4*C_out channels, whose four output phases
    (a, b) are the windows [a:a+H, b:b+W], interleaved into the 2H x 2W output."""
    import torch
    from torch import nn

    if not (isinstance(convt, nn.ConvTranspose2d) and convt.kernel_size == (4, 4) and convt.stride == (2, 2)
            and convt.padding == (1, 1) and convt.output_padding == (0, 0) and convt.groups == 1
            and convt.dilation == (1, 1)):
        raise ValueError(f"not a stride-2, kernel-4, padding-1 ConvTranspose2d: {convt}")

    class SubPixel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            ci, co = convt.in_channels, convt.out_channels
            self.co = co
            self.conv = nn.Conv2d(ci, 4 * co, 2, padding=1, bias=False)
            # output row 2i+a of the transposed conv reads input rows i-1, i (a=0) or i, i+1 (a=1):
            # tap dy of phase a is kernel row TAP[a][dy] (the same for columns)
            tap = ((3, 1), (2, 0))
            w = convt.weight.detach()  # (C_in, C_out, 4, 4)
            k = torch.empty(2, 2, co, ci, 2, 2)
            for a in range(2):
                for b in range(2):
                    for dy in range(2):
                        for dx in range(2):
                            k[a, b, :, :, dy, dx] = w[:, :, tap[a][dy], tap[b][dx]].t()
            with torch.no_grad():
                self.conv.weight.copy_(k.reshape(4 * co, ci, 2, 2))
            self.bias = None if convt.bias is None else nn.Parameter(convt.bias.detach().clone())

        def forward(self, x):
            n, _, h, w = x.shape
            y = self.conv(x).view(n, 2, 2, self.co, h + 1, w + 1)
            rows = [torch.stack([y[:, a, b, :, a:a + h, b:b + w] for b in range(2)], -1) for a in range(2)]
            out = torch.stack(rows, 3).reshape(n, self.co, 2 * h, 2 * w)  # (n, co, h, 2, w, 2) -> interleaved
            return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    return SubPixel()


def im2col_from(layer):
    """An exact im2col form of a Conv2d (``unfold`` + one matmul) or of a ConvTranspose2d (one
    matmul + ``fold``), with ``layer``'s weights; groups and dilation 1."""
    from torch import nn

    if layer.groups != 1 or layer.dilation != (1, 1):
        raise ValueError(f"grouped or dilated: {layer}")
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    w = layer.weight.detach()
    transposed = isinstance(layer, nn.ConvTranspose2d)
    if transposed and layer.output_padding != (0, 0):
        raise ValueError(f"output_padding: {layer}")

    class Im2col(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel_size, self.stride, self.padding = k, s, p
            self.weight = nn.Parameter(w.clone())
            self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

        def forward(self, x):
            return _im2col_forward(self, x, transposed)

    return Im2col()


def nearest_upconv(convt):
    """Nearest up-sampling by the stride + a 3x3 convolution to the same channels: the
    "upsample+conv" alternative to a transposed convolution (not the same function)."""
    from torch import nn

    return nn.Sequential(nn.Upsample(scale_factor=convt.stride, mode="nearest"),
                         nn.Conv2d(convt.in_channels, convt.out_channels, 3, padding=1, bias=convt.bias is not None))


def pixelshuffle_conv(convt):
    """A 3x3 convolution to stride^2 x the channels + PixelShuffle (ESPCN's sub-pixel layer), a
    superset of the transposed convolution it replaces."""
    from torch import nn

    r = convt.stride[0]
    return nn.Sequential(nn.Conv2d(convt.in_channels, convt.out_channels * r * r, 3, padding=1,
                                   bias=convt.bias is not None), nn.PixelShuffle(r))


def is_thin(layer) -> bool:
    """A ConvTranspose2d to <= 3 channels or a Conv2d from <= 3 (spectral norm's ParametrizedConv2d
    too), ungrouped and undilated: the layers oneDNN runs least efficiently, with an im2col form."""
    from torch import nn

    if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) or layer.groups != 1 or layer.dilation != (1, 1):
        return False
    if isinstance(layer, nn.ConvTranspose2d):
        return layer.out_channels <= 3 and layer.output_padding == (0, 0)
    return layer.in_channels <= 3


@contextmanager
def thin_layers_as_im2col():
    """Inside: every thin ConvTranspose2d (to <= 3 channels) and Conv2d (from <= 3 channels), in
    any model, runs its exact im2col form (``im2col_from``'s arithmetic on the layer's own live
    weight, so spectral norm and the optimiser see the same parameters). For timing the step with
    the lever in place; the models themselves are not changed."""
    from torch import nn

    conv_t, conv = nn.ConvTranspose2d.forward, nn.Conv2d.forward

    def conv_t_forward(self, x, output_size=None):
        return _im2col_forward(self, x, True) if is_thin(self) and output_size is None else conv_t(self, x, output_size)

    def conv_forward(self, x):
        return _im2col_forward(self, x, False) if is_thin(self) else conv(self, x)

    nn.ConvTranspose2d.forward, nn.Conv2d.forward = conv_t_forward, conv_forward
    try:
        yield
    finally:
        nn.ConvTranspose2d.forward, nn.Conv2d.forward = conv_t, conv


def _im2col_forward(layer, x, transposed: bool):
    """``layer(x)`` as unfold + matmul (Conv2d) or matmul + fold (ConvTranspose2d)."""
    import torch
    from torch.nn import functional as F

    k, s, p = layer.kernel_size, layer.stride, layer.padding
    w = layer.weight  # (C_out, C_in, kh, kw); transposed: (C_in, C_out, kh, kw)
    n, c, h, wd = x.shape
    if transposed:
        cols = torch.matmul(w.reshape(c, -1).t(), x.reshape(n, c, h * wd))
        y = F.fold(cols, ((h - 1) * s[0] - 2 * p[0] + k[0], (wd - 1) * s[1] - 2 * p[1] + k[1]), k, padding=p, stride=s)
    else:
        y = torch.matmul(w.reshape(w.shape[0], -1), F.unfold(x, k, padding=p, stride=s)).view(
            n, -1, (h + 2 * p[0] - k[0]) // s[0] + 1, (wd + 2 * p[1] - k[1]) // s[1] + 1)
    return y if layer.bias is None else y + layer.bias.view(1, -1, 1, 1)


def plain_copy(m):
    """The layer alone (same shapes and hyper-parameters, no spectral-norm parametrisation)."""
    from torch import nn

    if isinstance(m, nn.ConvTranspose2d):
        return nn.ConvTranspose2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                  m.output_padding, bias=m.bias is not None)
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
    return nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)


def layer_inputs(net, batch: int) -> list[tuple[str, Any, tuple[int, ...]]]:
    """(name, module, input shape) of every Conv2d, ConvTranspose2d and Linear of G and D, in
    the order they run, at ``batch`` images (one forward pass with hooks)."""
    import torch
    from torch import nn

    from aigc.models import build_discriminator, build_generator
    from aigc_bench.train_speed import step_labels

    G, D = build_generator(net), build_discriminator(net)
    seen: list[tuple[str, Any, tuple[int, ...]]] = []
    hooks = []
    for who, model in (("G", G), ("D", D)):
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, key=f"{who}.{name}": seen.append((key, mod, tuple(inp[0].shape)))))
    y = step_labels(batch, net)
    args = () if y is None else (y,)
    with torch.no_grad():
        D(G(torch.randn(batch, net.z_dim), *args), *args)
    for h in hooks:
        h.remove()
    return seen


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _time(fn, reps: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def variants(m) -> dict[str, tuple[Any, bool]]:
    """name -> (module, exact) for ``m`` and the alternatives that apply to it."""
    from torch import nn

    out: dict[str, tuple[Any, bool]] = {"as is": (plain_copy(m), True)}
    if isinstance(m, nn.ConvTranspose2d) and m.stride == (2, 2):
        if m.kernel_size == (4, 4) and m.padding == (1, 1) and m.output_padding == (0, 0):
            out["sub-pixel 2x2 conv (exact)"] = (subpixel_from_transposed(out["as is"][0]), True)
        out["3x3 conv + PixelShuffle"] = (pixelshuffle_conv(m), False)
        out["nearest up-sampling + 3x3 conv"] = (nearest_upconv(m), False)
    if is_thin(m):
        out["im2col: " + ("matmul + fold" if isinstance(m, nn.ConvTranspose2d) else "unfold + matmul") + " (exact)"] = \
            (im2col_from(out["as is"][0]), True)
    return out


def measure(net, batch: int, rounds: int, reps: int, threads: int) -> list[dict[str, Any]]:
    """Every layer's variants: FLOPs (forward; forward+backward), and median ms of both."""
    import torch

    torch.set_num_threads(threads)
    rows = []
    for name, m, shape in layer_inputs(net, batch):
        x = torch.randn(shape)
        xg = x.clone().requires_grad_(True)
        cands = variants(m)
        # how often the step runs the layer (forward+backward at this batch): G's once; D's twice, its
        # D-step pass over reals and fakes (2x the batch, weight gradients) and its G-step pass (input gradients)
        uses = 2 if name.startswith("D.") else 1
        fwd_flops = _flops(lambda: cands["as is"][0](x))
        both_flops = _flops(lambda: cands["as is"][0](xg).sum().backward())
        timings: dict[str, dict[str, list[float]]] = {v: {"fwd": [], "fwd_bwd": []} for v in cands}
        for r in range(rounds):
            for v in list(cands) if r % 2 == 0 else list(cands)[::-1]:
                mod = cands[v][0]
                with torch.no_grad():
                    timings[v]["fwd"].append(_time(lambda: mod(x), reps))
                timings[v]["fwd_bwd"].append(_time(lambda: mod(xg).sum().backward(), reps))
        base = statistics.median(timings["as is"]["fwd_bwd"])
        for v, (mod, exact) in cands.items():
            f_ms = statistics.median(timings[v]["fwd"]) * 1e3
            fb_ms = statistics.median(timings[v]["fwd_bwd"]) * 1e3
            v_fwd = fwd_flops if v == "as is" else _flops(lambda: mod(x))
            v_both = both_flops if v == "as is" else _flops(lambda: mod(xg).sum().backward())
            rows.append({"layer": name, "kind": _kind(m), "variant": v, "exact": exact, "uses_per_step": uses,
                         "input": list(shape), "params": f"{_describe(m)}",
                         "gflop_fwd": round(v_fwd / 1e9, 4), "gflop_fwd_bwd": round(v_both / 1e9, 4),
                         "ms_fwd": round(f_ms, 3), "ms_fwd_bwd": round(fb_ms, 3),
                         "gflops_fwd": round(v_fwd / f_ms / 1e6, 1), "gflops_fwd_bwd": round(v_both / fb_ms / 1e6, 1),
                         "time_vs_as_is": round(fb_ms / (base * 1e3), 3)})
    return rows


def _kind(m) -> str:
    from torch import nn

    kind = next(k for k in (nn.ConvTranspose2d, nn.Conv2d, nn.Linear) if isinstance(m, k)).__name__
    return kind + (", spectral norm" if hasattr(m, "parametrizations") else "")


def _describe(m) -> str:
    from torch import nn

    if isinstance(m, nn.Linear):
        return f"{m.in_features}->{m.out_features}"
    return f"{m.in_channels}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]} p{m.padding[0]}"


def render(report: dict[str, Any], argv_line: str) -> str:
    peak = report["peak_gflops"]
    rows = report["layers"]
    base = [r for r in rows if r["variant"] == "as is"]
    levers = [r for r in rows if r["variant"] != "as is"]
    fb_total = sum(r["ms_fwd_bwd"] * r["uses_per_step"] for r in base)
    flop_total = sum(r["gflop_fwd_bwd"] * r["uses_per_step"] for r in base)
    suffix = report["suffix"]
    lines = [f"# Per layer: the step's convolutions against the matmul peak{' (' + suffix[1:] + ' kernels, ISA capped)' if suffix else ''}",
             "", f"`{argv_line}`: every Conv2d, ConvTranspose2d and Linear of params.yaml's G and D "
             f"({report['architecture']}) alone, at batch {report['batch']} on the default data's shape, {report['threads']} "
             f"threads, NCHW, {report['reps']} calls per timing, {report['rounds']} interleaved rounds, medians. FLOPs are "
             "PyTorch's count (`torch.utils.flop_counter`; forward+backward = weight and input gradients). "
             "Spectral norm's power iteration is left out (the layer alone). "
             f"fp32 matmul peak {peak:.0f} GFLOP/s in the same run; load average {report['load_average_before'][0]:.2f} "
             f"before, {report['load_average_after'][0]:.2f} after.", "",
             f"Machine: {report['machine_line']}.", "",
             "| layer | shape | input | GFLOP fwd+bwd | ms fwd | ms fwd+bwd | GFLOP/s fwd+bwd | of peak |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['layer']} ({r['kind']}) | {r['params']} | {'x'.join(map(str, r['input']))} | {r['gflop_fwd_bwd']:.3f} "
              f"| {r['ms_fwd']:.2f} | {r['ms_fwd_bwd']:.2f} | {r['gflops_fwd_bwd']:.0f} | {r['gflops_fwd_bwd'] / peak:.2f} |"
              for r in base]
    lines += ["", f"The layers as a step uses them (G's once, D's twice: its D-step pass over reals and fakes, "
              f"its G-step pass), forward+backward: {flop_total:.2f} GFLOP in {fb_total:.1f} ms = "
              f"**{flop_total / fb_total * 1e3:.0f} GFLOP/s, {flop_total / fb_total * 1e3 / peak:.2f} of the peak**: "
              "a step made only of these layers, with no other work at all, would reach about that and no more. The "
              f"train stage's step in the same run: {report['step_images_per_s']:.0f} img/s, "
              f"{report['step_fraction_of_peak']:.2f} of the peak (aigc_bench.train_speed's measure).", "",
              "## Levers: the same layer written another way", "",
              "Interleaved with the layer as is, same input and batch. *exact*: the same function (weights mapped, "
              "outputs checked by tests/test_bench_step.py); otherwise a different layer with the same input and "
              "output shapes.", "",
              "| layer | formulation | exact | GFLOP fwd+bwd | ms fwd+bwd | time vs as is |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in levers:
        lines.append(f"| {r['layer']} ({r['params']}) | {r['variant']} | {'yes' if r['exact'] else 'no'} | "
                     f"{r['gflop_fwd_bwd']:.3f} | {r['ms_fwd_bwd']:.2f} | {r['time_vs_as_is']:.2f}x |")
    modes = report["step_modes"]
    base_step = modes["as is"]["median_images_per_s"]
    lines += ["", f"The whole step ({report['steps']} steps per run, {report['rounds']} interleaved rounds, medians):", "",
              "| step | img/s | vs as is | all runs |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {v['median_images_per_s']:.0f} | {v['median_images_per_s'] / base_step:.2f}x | "
              f"{', '.join(f'{x:.0f}' for x in v['all'])} |" for m, v in modes.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m aigc_bench.layers", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=30, help="calls per timing (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed run of the whole step (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT, help="report folder (default: reports/benchmarks)")
    isa.add_isa_argument(ap)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.reps < 1 or args.steps < 3:
        sys.exit(f"error: --rounds {args.rounds} --reps {args.reps} --steps {args.steps}: rounds and reps must be "
                 "at least 1, steps at least 3")
    isa.under_cap(args.isa, "aigc_bench.layers")  # before torch is imported: the cap is read when it loads

    import torch

    from aigc.runtime import usable_cores
    from aigc_bench.train_speed import matmul_peak, mnist_like, project_step, stage_config, step_flops

    load0 = os.getloadavg()
    threads = usable_cores()
    net, cfg = stage_config()
    rows = measure(net, cfg.batch_size, args.rounds, args.reps, threads)
    # The step itself, as is and with the thin layers in their exact im2col form, interleaved: a
    # lever faster alone is only a lever if the step is faster with it.
    images = mnist_like(cfg.batch_size * args.steps)
    from aigc.config import load_params

    rt = load_params("params.yaml").runtime
    layout = rt.channels_last if rt.channels_last != "auto" else False
    step: dict[str, list[float]] = {"as is": [], "thin layers as im2col": []}
    peaks = []
    for r in range(args.rounds):
        for mode in list(step) if r % 2 == 0 else list(step)[::-1]:
            with thin_layers_as_im2col() if mode != "as is" else nullcontext():
                step[mode].append(project_step(images, net, cfg, args.steps, threads=threads, channels_last=layout))
        peaks.append(matmul_peak(threads))
        print(f"  round {r + 1}/{args.rounds}: step " + ", ".join(f"{m} {v[-1]:.0f}" for m, v in step.items())
              + " img/s", file=sys.stderr)
    peak = statistics.median(peaks)
    step_img_s = statistics.median(step["as is"])
    step_gflops = step_flops(images, net, cfg) / cfg.batch_size * step_img_s / 1e9
    torch.set_num_threads(threads)
    env = machine.describe()
    report = {"machine": env, "machine_line": machine.one_line(env), "suffix": machine.report_suffix(),
              "threads": threads, "batch": cfg.batch_size, "rounds": args.rounds, "reps": args.reps,
              "architecture": f"{net.family}{' conditional' if net.conditional else ''} G {list(net.g_widths)} "
                              f"D {list(net.d_widths)} k{net.kernel}",
              "peak_gflops": round(peak, 1), "step_images_per_s": round(step_img_s, 1), "steps": args.steps,
              "step_modes": {m: {"median_images_per_s": round(statistics.median(v), 1), "all": [round(x, 1) for x in v]}
                             for m, v in step.items()},
              "step_fraction_of_peak": round(step_gflops / peak, 3),
              "load_average_before": load0, "load_average_after": os.getloadavg(), "layers": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"layers{report['suffix']}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report, "python -m aigc_bench.layers" + (f" --isa {args.isa}" if args.isa else "")
                  + f" --rounds {args.rounds} --reps {args.reps} --steps {args.steps}")
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
