"""unseen10: the warm start's zero-gradient mask in a step of a CURVES-size autoencoder.

A 784-400-200-100-50-25-6 sigmoid autoencoder, mirrored (842,340 parameters, 24 tensors), on
random images, fresh batches of 250, a ``(loss, outputs)`` closure, defaults: the masked decay
(``optimizer._decay_reached``) against the plain ``x0.mul_(decay)``, interleaved step by step
from the same weights (CPU medians of steps 6-25; the parameters must end bitwise equal).

    OPENBLAS_NUM_THREADS=1 python experiments/_unseen10_stepcost.py
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import hessfree.optimizer as hfo
from hessfree import HessianFree

torch.set_num_threads(1)
DIMS = [784, 400, 200, 100, 50, 25, 6]


def _autoencoder() -> nn.Sequential:
    layers: list[nn.Module] = []
    for dims in (DIMS, DIMS[::-1]):
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.Sigmoid()]
        layers.pop()  # linear code layer, logits out
    return nn.Sequential(*layers)


def _plain(x0, g, layout, decay) -> None:
    x0.mul_(decay)


def main() -> None:
    torch.manual_seed(0)
    model = _autoencoder()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params} parameters, {len(list(model.parameters()))} tensors")
    X = torch.rand(2000, 784)
    masked = hfo._decay_reached
    ms = {"plain": copy.deepcopy(model), "masked": copy.deepcopy(model)}
    opts = {k: HessianFree(m.parameters()) for k, m in ms.items()}
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in ms}
    print("load at start", os.getloadavg())
    for step in range(25):
        xb = X[torch.randperm(2000, generator=gen)[:250]]
        for k, m in ms.items():
            hfo._decay_reached = masked if k == "masked" else _plain

            def closure(m=m, xb=xb):
                out = m(xb)
                return F.binary_cross_entropy_with_logits(out, xb), out

            c0 = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opts[k].step(closure)
            if step >= 5:
                times[k].append((time.process_time() - c0) * 1e3)
    hfo._decay_reached = masked
    med = {k: statistics.median(v) for k, v in times.items()}
    same = all(
        torch.equal(a, b)
        for a, b in zip(ms["plain"].parameters(), ms["masked"].parameters(), strict=True)
    )
    print(
        f"CPU per step: plain {med['plain']:.1f} ms, masked {med['masked']:.1f} ms, "
        f"ratio {med['masked'] / med['plain']:.4f}; same parameters: {same}"
    )
    print("load at end", os.getloadavg())


if __name__ == "__main__":
    main()
