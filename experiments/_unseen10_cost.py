"""unseen10: what turning attention's fast path off costs per closure call (interleaved).

Compares entering and leaving ``twice_differentiable_attention`` of the library on
``PYTHONPATH`` with the same context from another copy of ``hessfree/_graph_ops.py`` (pass its
path, e.g. main's, extracted with ``git show main:hessfree/_graph_ops.py > /tmp/old.py``).

    OPENBLAS_NUM_THREADS=1 python experiments/_unseen10_cost.py /tmp/old.py
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time

import torch

from hessfree._graph_ops import twice_differentiable_attention as new

torch.set_num_threads(1)


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_graph_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.twice_differentiable_attention


def _per_call(ctx, n: int = 2000) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        with ctx():
            pass
    return (time.perf_counter() - w0) / n * 1e6, (time.process_time() - c0) / n * 1e6


def _encoder_forward() -> None:
    """An eval-mode encoder's no_grad forward (a trial loss) with and without the fast path:
    float32, batch 64, 20 positions (a quarter padded), d_model 64, 2 layers."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(64, 20, 64)
    mask = torch.arange(20)[None, :] >= torch.randint(10, 21, (64,))[:, None]
    times = {True: [], False: []}
    with torch.no_grad():
        for rep in range(33):
            for fast in (True, False):
                torch.backends.mha.set_fastpath_enabled(fast)
                c0 = time.process_time()
                for _ in range(10):
                    enc(x, src_key_padding_mask=mask)
                if rep >= 3:  # warm-up
                    times[fast].append((time.process_time() - c0) / 10 * 1e3)
    torch.backends.mha.set_fastpath_enabled(True)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"encoder no_grad forward, CPU median: fast path {on:.2f} ms, off {off:.2f} ms, "
        f"ratio {off / on:.2f}"
    )


def _reached_cost() -> None:
    """The warm start's decay with the zero-gradient mask (``optimizer._decay_reached``) per
    step against the plain decay (``x0.mul_(0.95)``): CPU medians, interleaved."""
    from hessfree._flat import ParamLayout
    from hessfree.optimizer import _decay_reached

    for count, numel in ((6, 10_000), (100, 1_000_000)):
        layout = ParamLayout([torch.zeros(numel // count) for _ in range(count)])
        g, x0 = torch.randn(layout.numel), torch.ones(layout.numel)
        times = {"plain": [], "masked": []}
        for _ in range(50):
            for kind in times:
                c0 = time.process_time()
                for _ in range(20):
                    if kind == "plain":
                        x0.mul_(0.95)
                    else:
                        _decay_reached(x0, g, layout, 0.95)
                times[kind].append((time.process_time() - c0) / 20 * 1e6)
                x0.fill_(1.0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"warm-start decay, {count} tensors, {layout.numel} entries: plain "
            f"{med['plain']:.1f} us, masked {med['masked']:.1f} us"
        )


if __name__ == "__main__":
    old = _load(sys.argv[1])
    load0 = os.getloadavg()
    for ctx in (old, new):  # warm up
        _per_call(ctx, 200)
    runs = {"old": [], "new": []}
    for _ in range(15):
        for name, ctx in (("old", old), ("new", new)):
            runs[name].append(_per_call(ctx))
    print(f"load {load0} -> {os.getloadavg()}")
    for name, r in runs.items():
        wall = statistics.median(w for w, _ in r)
        cpu = statistics.median(c for _, c in r)
        print(f"{name}: median wall {wall:.2f} us, CPU {cpu:.2f} us per enter/exit (15 x 2000)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        _encoder_forward()
    _reached_cost()
    print(f"load at end {os.getloadavg()}")
