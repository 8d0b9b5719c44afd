"""unseen10: K-FAC ('auto') on a weight tied through a functional transpose (study, not landed).

A tied sigmoid autoencoder on digits (64-32-8, decoder ``F.linear(h, W.t())``) trains its
encoder weights with K-FAC factors that see only the encoder's use (``precond='auto'`` detects
a tied weight another *module* holds, not a functional use). ``auto-tiedetect`` leaves the
tied layers out (K-FAC then covers nothing: ``'auto'`` turns it off); ``none`` is
``precond=None``. ``(loss, outputs)`` closures, full batch (1,797) and fresh batches of 250
(Adam at 64), interleaved by CPU time, same initial weights; 1 thread.

    OPENBLAS_NUM_THREADS=1 python experiments/_unseen10_tied.py [budget_seconds]
"""

from __future__ import annotations

import copy
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import hessfree.preconditioning as pc
from hessfree import HessianFree

torch.set_num_threads(1)
X = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)


class TiedAE(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (64, 32, 8)) -> None:
        super().__init__()
        self.enc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.dbias = nn.ParameterList(nn.Parameter(torch.zeros(a)) for a in dims[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.enc):
            h = layer(h)
            h = torch.sigmoid(h) if i < len(self.enc) - 1 else h
        for i in reversed(range(len(self.enc))):
            h = F.linear(h, self.enc[i].weight.t(), self.dbias[i])
            if i > 0:
                h = torch.sigmoid(h)
        return h


ORIGINAL = pc._LinearPass.layers


def without_tied(self, *, skip_shared=False):
    out = ORIGINAL(self, skip_shared=skip_shared)
    return [m for m in out if not getattr(m.weight, "_tied", False)] if skip_shared else out


def loss_fn(o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(o, x)


def main(budget: float) -> None:
    print("| batch | seed | auto | auto-tiedetect | none | Adam 1e-2 | Adam 1e-3 | load |")
    print("|---|---|---|---|---|---|---|---|")
    names = ["auto", "auto-tiedetect", "none", "adam1e-2", "adam1e-3"]
    for mb in (False, True):
        for seed in (0, 1):
            torch.manual_seed(seed)
            m0 = TiedAE()
            ms = {k: copy.deepcopy(m0) for k in names}
            for k in names:
                for layer in ms[k].enc:
                    layer.weight._tied = True
            opts = {
                "auto": HessianFree(ms["auto"].parameters()),
                "auto-tiedetect": HessianFree(ms["auto-tiedetect"].parameters()),
                "none": HessianFree(ms["none"].parameters(), precond=None),
                "adam1e-2": torch.optim.Adam(ms["adam1e-2"].parameters(), 1e-2),
                "adam1e-3": torch.optim.Adam(ms["adam1e-3"].parameters(), 1e-3),
            }
            gens = {k: torch.Generator().manual_seed(100 + seed) for k in names}
            spent = dict.fromkeys(names, 0.0)
            load0 = os.getloadavg()[0]
            while min(spent.values()) < budget:
                for k in names:
                    if spent[k] >= budget:
                        continue
                    m, o = ms[k], opts[k]
                    adam = k.startswith("adam")
                    bs = (64 if adam else 250) if mb else len(X)
                    idx = torch.randperm(len(X), generator=gens[k])[:bs]
                    xb = X[idx]
                    pc._LinearPass.layers = without_tied if k == "auto-tiedetect" else ORIGINAL
                    t0 = time.process_time()
                    if adam:
                        o.zero_grad()
                        loss_fn(m(xb), xb).backward()
                        o.step()
                    else:

                        def closure(m=m, xb=xb):
                            out = m(xb)
                            return loss_fn(out, xb), out

                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            o.step(closure)
                    spent[k] += time.process_time() - t0
            pc._LinearPass.layers = ORIGINAL
            with torch.no_grad():
                res = {k: float(loss_fn(ms[k](X), X)) for k in names}
            row = " | ".join(f"{res[k]:.5f}" for k in names)
            print(
                f"| {250 if mb else len(X)} | {seed} | {row} | "
                f"{load0:.1f}-{os.getloadavg()[0]:.1f} |"
            )


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)
