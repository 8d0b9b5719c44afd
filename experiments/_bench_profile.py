"""Where the time goes when a target is missed: ``torch.profiler`` op tables, summarised.

Splits a call's self time (host-side on CPU; CUDA kernel time on a GPU) into matrix products and
convolutions ("GEMM") and everything else, and names the largest non-GEMM ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile

GEMM_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
    "aten::cudnn_convolution",
    "aten::_convolution",
}


def profile_call(fn: Callable[[], Any], device: str, reps: int = 3) -> dict:
    """Per-call milliseconds: ``total``, ``gemm`` (and ``gemm_calls``), ``other`` and the top
    non-GEMM ops as ``[(name, ms, calls)]``."""
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
    cuda = device.startswith("cuda")
    rows = []
    for e in prof.key_averages():
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / reps / 1e3
        rows.append((e.key, t, e.count // reps))
    total = sum(t for _, t, _ in rows)
    gemm = sum(t for k, t, _ in rows if k in GEMM_OPS)
    calls = sum(c for k, _, c in rows if k in GEMM_OPS)
    others = sorted(((k, t, c) for k, t, c in rows if k not in GEMM_OPS), key=lambda r: -r[1])
    return dict(total=total, gemm=gemm, gemm_calls=calls, other=total - gemm, top=others[:4])


def describe(prof: dict) -> str:
    return ", ".join(f"{k.replace('aten::', '')} {t:.1f} ms ×{c}" for k, t, c in prof["top"])
