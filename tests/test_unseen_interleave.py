"""experiments/_unseen.py's race helper: ``own_rng`` gives each contender its own generator."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

pytest.importorskip("hessfree.optimizer")
import _unseen  # noqa: E402

from hessfree import HessianFree  # noqa: E402


def _dropout_runs(n_runs: int = 2) -> tuple[list[_unseen.Run], list[list[list[torch.Tensor]]]]:
    """Runs of one rule (HF, no arguments) on copies of one Dropout MLP and one batch; each
    run's parameters after each of its steps."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))
    init = {k: v.clone() for k, v in net.state_dict().items()}
    runs, history = [], []
    for i in range(n_runs):
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))
        m.load_state_dict(init)
        opt = HessianFree(m.parameters(), cg_max_iter=3)
        seen: list[list[torch.Tensor]] = []

        def step(m=m, opt=opt, seen=seen) -> None:
            def closure():
                out = m(x)
                return F.mse_loss(out, y), out

            opt.step(closure)
            seen.append([p.detach().clone() for p in m.parameters()])

        def evaluate(m=m) -> float:
            with torch.no_grad():
                return float(F.mse_loss(m(x), y))  # train mode: draws masks too

        runs.append(_unseen.Run(f"hf{i}", step, evaluate, opt))
        history.append(seen)
    return runs, history


def test_interleave_own_rng_gives_runs_of_one_rule_the_same_masks():
    """Oracle: two runs of one rule from the same weights are the same computation, so with
    their own generators (``own_rng``) each step's parameters agree bitwise, whatever order the
    clock interleaves them in; sharing the global generator (the default) they differ from the
    first step (the second run draws the masks after the first run's), and the global stream is
    left where the shared runs' draws took it, not where ``own_rng`` found it."""
    with torch.random.fork_rng(devices=[]):  # leave the global stream to later tests
        runs, history = _dropout_runs()
        before = torch.get_rng_state()
        _unseen.interleave(runs, budget=0.05, eval_every=0.02, own_rng=7)
        assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
        (a, b), k = history, min(len(history[0]), len(history[1]))
        assert k >= 1 and not any(r.failed for r in runs)
        for pa, pb in zip(a[:k], b[:k], strict=True):
            assert all(torch.equal(p, q) for p, q in zip(pa, pb, strict=True))
        runs, history = _dropout_runs()
        before = torch.get_rng_state()
        _unseen.interleave(runs, budget=0.05, eval_every=0.02)
        assert not torch.equal(torch.get_rng_state(), before)
        first = zip(history[0][0], history[1][0], strict=True)
        assert not all(torch.equal(p, q) for p, q in first)
