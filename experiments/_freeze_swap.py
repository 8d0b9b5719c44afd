"""The swap task at float32's floor, before and after the float-resolution rule (#14, freeze).

Four contenders per initialisation, stepped in alternation in one process (torch 1 thread):
``HessianFree(params)`` and the tuned λ0 = 1 row, each with the float-resolution rule
(``hessfree.damping.RESOLUTION_ULPS`` = 8, this branch) and without it (0: no step is below
the resolution and Armijo tries every rate, the code before, bitwise: the seed-0 hash equals
the old code's). Per run: final loss, the step from which the loss is bit-identical (frozen),
closure calls per frozen step (mean, and max), λ at the end, and each run's own stepping time
to the largest final loss of the four (the lowest loss all reach).

    python experiments/_freeze_swap.py [--steps N] [--seeds K] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _swap_stall  # noqa: E402
import scorecard  # noqa: E402
from _bench_common import md_table, save_text  # noqa: E402

import hessfree.damping as D  # noqa: E402
from hessfree import HessianFree  # noqa: E402

ULPS = {"old": 0.0, "new": D.RESOLUTION_ULPS}


def compare(seed: int, steps: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    runs = {}
    for setting, kw in _swap_stall.SETTINGS.items():
        for code in ULPS:
            m = copy.deepcopy(_swap_stall._model(seed))
            opt = HessianFree(m.parameters(), **kw)

            def closure(m=m, opt=opt) -> torch.Tensor:
                opt.zero_grad()
                loss = F.mse_loss(m(x), y)
                loss.backward()
                return loss

            runs[(setting, code)] = dict(m=m, opt=opt, closure=closure, t=0.0, curve=[], calls=[])
    order = list(runs.values())
    for k in range(steps):
        for r in order[:: 1 if k % 2 else -1]:
            D.RESOLUTION_ULPS = ULPS[[c for (s, c), v in runs.items() if v is r][0]]
            t0 = time.perf_counter()
            r["opt"].step(r["closure"])
            r["t"] += time.perf_counter() - t0
            r["calls"].append(r["opt"].last_step.closure_calls)
            with torch.no_grad():
                r["curve"].append((r["t"], float(F.mse_loss(r["m"](x), y))))
    D.RESOLUTION_ULPS = ULPS["new"]
    common = max(r["curve"][-1][1] for r in runs.values())
    out = {}
    for key, r in runs.items():
        final = r["curve"][-1][1]
        frozen = next(k for k in range(steps) if all(v == final for _, v in r["curve"][k:]))
        frozen_calls = r["calls"][frozen + 1 :] or [0]
        h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in r["m"].parameters()))
        out[key] = dict(
            final=final,
            frozen=frozen if frozen < steps - 1 else None,
            calls_mean=statistics.fmean(frozen_calls),
            calls_max=max(frozen_calls),
            calls_total=sum(r["calls"]),
            lam=r["opt"].damping,
            t_common=scorecard.time_to(r["curve"], common),
            t_total=r["t"],
            hash=h.hexdigest()[:16],
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=720)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = scorecard.make_swap_task(quick=False)
    load0 = open("/proc/loadavg").read().split()[:3]
    t0 = time.perf_counter()
    rows, ratios = [], {s: [] for s in _swap_stall.SETTINGS}
    for seed in range(args.seeds):
        res = compare(seed, args.steps, task.x, task.y)
        for (setting, code), r in res.items():
            rows.append(
                [
                    str(seed),
                    setting,
                    code,
                    f"{r['final']:.4g}",
                    "moving" if r["frozen"] is None else str(r["frozen"]),
                    f"{r['calls_mean']:.1f} / {r['calls_max']}",
                    str(r["calls_total"]),
                    f"{r['lam']:.3g}",
                    f"{r['t_common']:.3g} / {r['t_total']:.3g} s",
                    r["hash"],
                ]
            )
            print(rows[-1], flush=True)
        for setting in _swap_stall.SETTINGS:
            ratios[setting].append(
                res[(setting, "new")]["t_common"] / res[(setting, "old")]["t_common"]
            )
        d_new, t_new = (res[(s, "new")]["t_common"] for s in _swap_stall.SETTINGS)
        d_old, t_old = (res[(s, "old")]["t_common"] for s in _swap_stall.SETTINGS)
        print(f"seed {seed}: defaults/tuned new {d_new / t_new:.2f}, old {d_old / t_old:.2f}")
        rows.append(
            [
                "",
                "defaults / λ0 = 1",
                "new | old",
                "",
                "",
                "",
                "",
                "",
                f"{d_new / t_new:.2f} | {d_old / t_old:.2f}",
                "",
            ]
        )
    load1 = open("/proc/loadavg").read().split()[:3]
    text = "\n".join(
        [
            "# Swap at float32's floor: the float-resolution rule (old = without, new = with)",
            "",
            f"`python experiments/_freeze_swap.py --steps {args.steps} --seeds {args.seeds}` in "
            f"{time.perf_counter() - t0:.0f} s; load average {' '.join(load0)} at the start, "
            f"{' '.join(load1)} at the end; torch 1 thread, the four runs alternated per step.",
            "",
            md_table(
                [
                    "seed",
                    "setting",
                    "code",
                    "final loss",
                    "frozen from step",
                    "closure calls per frozen step (mean / max)",
                    "closure calls in all",
                    "λ at the end",
                    "time to the common loss / in all",
                    "params sha256",
                ],
                rows,
            ),
            "",
            "Time to the common loss, new / old: "
            + "; ".join(
                f"{s}: {', '.join(f'{v:.2f}' for v in vs)} (median {statistics.median(vs):.2f})"
                for s, vs in ratios.items()
            ),
            "",
        ]
    )
    print(text)
    if args.out:
        save_text(Path(args.out), text)


if __name__ == "__main__":
    main()
