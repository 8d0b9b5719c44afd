"""Throwaway: does structural damping via record_hidden change HF's outcome on addition, T = 30?

nn.RNN(2, 100, tanh) + Linear read out at the last step, closures built with
hessfree.record_hidden; HF as configs/rnn_addition.yaml (damping 0.1, Martens' rule, cg <= 25,
cg_rtol 1e-10, no stop-on-increase, 1,000-case batches, 100-case curvature batches). Arms
mu = 0.03 and mu = 0 start from the same weights and see the same batches; their steps are
interleaved (one step of each in turn) so machine load hits both alike. Usage:

    python3 experiments/_sd_addition.py --seeds 0 1 --max-steps 250
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import hessfree
from hessfree.train.data import make_addition


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.ModuleDict({"rnn": nn.RNN(2, 100, batch_first=True), "head": nn.Linear(100, 1)})
    with torch.no_grad():  # spectral radius 1.0, as the config
        w = model["rnn"].weight_hh_l0
        w.mul_(1.0 / float(torch.linalg.eigvals(w.double()).abs().max()))
    return model


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model["head"](model["rnn"](x)[0][:, -1])


def test_error(model: nn.Module, data) -> float:
    with torch.no_grad():
        return float(((forward(model, data.x_test) - data.y_test).abs() > 0.04).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-steps", type=int, default=250)
    ap.add_argument("--length", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = make_addition(length=args.length, num_train=10_000, num_test=1000, seed=0)
    print(f"load before {os.getloadavg()}")
    for seed in args.seeds:
        base = build(seed)
        arms = {}
        for mu in (0.03, 0.0):
            model = copy.deepcopy(base)
            opt = hessfree.HessianFree(
                model.parameters(),
                structural_damping=mu,
                damping=0.1,
                cg_max_iter=25,
                cg_stop_on_increase=False,
                damping_rule="martens",
                cg_rtol=1e-10,
            )
            arms[mu] = dict(model=model, opt=opt, time=0.0, solved=None, steps=0, err=1.0)
        gen = torch.Generator().manual_seed(1000 + seed)
        for step in range(1, args.max_steps + 1):
            idx = torch.randperm(data.x_train.shape[0], generator=gen)[:1000]
            xb, yb = data.x_train[idx], data.y_train[idx]
            xc, yc = xb[:100], yb[:100]
            for mu, arm in arms.items():
                if arm["solved"] is not None:
                    continue
                model, opt = arm["model"], arm["opt"]

                def closure(x=xb, y=yb, model=model, mu=mu):
                    if mu == 0:
                        out = forward(model, x)
                        return F.mse_loss(out, y), out
                    with hessfree.record_hidden(model["rnn"]) as rec:
                        out = forward(model, x)
                    return F.mse_loss(out, y), out, rec.hidden

                def curvature(x=xc, y=yc, closure=closure):
                    return closure(x, y)

                t0 = time.perf_counter()
                opt.step(closure, curvature)
                arm["time"] += time.perf_counter() - t0
                arm["steps"] = step
                if step % args.eval_every == 0:
                    arm["err"] = test_error(model, data)
                    if arm["err"] <= 0.01:
                        arm["solved"] = (step, arm["time"])
            if all(a["solved"] is not None for a in arms.values()):
                break
        for mu, arm in arms.items():
            print(
                f"seed {seed} mu {mu}: steps {arm['steps']}, train time {arm['time']:.1f} s, "
                f"{arm['time'] / arm['steps']:.3f} s/step, test error {arm['err']:.3f}, "
                f"solved at {arm['solved']}, damping {arm['opt'].damping:.3g}"
            )
        a, b = arms[0.03], arms[0.0]
        print(
            f"seed {seed}: s/step ratio mu=0.03 / mu=0: "
            f"{(a['time'] / a['steps']) / (b['time'] / b['steps']):.2f}"
        )
        print(f"load now {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
