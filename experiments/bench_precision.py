"""Accuracy (and CPU cost) of reduced-precision curvature products against float64.

```
python experiments/bench_precision.py            # CURVES autoencoder, batch 2000, ~2 min
python experiments/bench_precision.py --quick    # batch 500, fewer rounds
```

On the CURVES autoencoder of ``bench.py`` (sparse init, BCE summed over pixels per case) at
one point, with ``ProductPolicy(precision=...)`` applied to a float32 GGN product:

* relative error :math:`\\|Gv - G_{64}v\\| / \\|G_{64}v\\|` against the same product in float64,
  median and max over random ``v``;
* relative error of the CG solution of :math:`(G + \\lambda I)x = -g` after a fixed number of
  iterations (rtol 0, no progress stop; :math:`\\lambda` = 45 as in ``bench.py``), CG's vectors
  and scalars in float32, against the float64 solve;
* time per product relative to the float32 product, interleaved in one process (median over
  rounds). On a CPU bf16 autocast is expected to be slower, not faster: it measures the
  accuracy a GPU would get, not a CPU speed-up. TF32 only exists on CUDA and is not measured.

Writes ``experiments/results/<date>-precision.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _bench_common import _cpu_model, make_problem, md_table, save_text  # noqa: E402

from hessfree import GGNProduct, ProductPolicy, accelerate, cg  # noqa: E402

DAMPING = 45.0


def _product(prob, dtype: torch.dtype) -> GGNProduct:
    model = copy.deepcopy(prob.model).to(dtype)
    out = model(prob.x.to(dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    return GGNProduct(prob.loss(out, prob.y.to(dtype)), out, params)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cg-iters", type=int, default=30)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = " ".join(open("/proc/loadavg").read().split()[:3])
    prob = make_problem("autoencoder", "cpu", 0)
    if args.quick:
        prob.x, prob.y = prob.x[:500], prob.y[:500]
    vectors, rounds = (2, 3) if args.quick else (4, 7)
    G64, G32 = _product(prob, torch.float64), _product(prob, torch.float32)
    n = G64.layout.numel
    policies = {"float32 (highest)": None, "bf16 autocast": ProductPolicy(precision="bf16")}
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(vectors)]
    exact = [G64.matvec(v) for v in vs]
    rows, errors = [], {}
    b64 = -G64.gradient
    x64 = cg(G64.damped(DAMPING), b64, max_iter=args.cg_iters, rtol=0.0, progress_tol=None).x
    for name, policy in policies.items():
        mv = accelerate(G32.matvec, vs[0].float(), policy)
        errs = [_rel(mv(v.float()), e) for v, e in zip(vs, exact, strict=True)]

        def damped(u, mv=mv):
            return mv(u).add_(u, alpha=DAMPING)

        res = cg(damped, b64.float(), max_iter=args.cg_iters, rtol=0.0, progress_tol=None)
        errors[name] = (statistics.median(errs), max(errs), _rel(res.x, x64))
    # time per product, contenders interleaved round-robin
    times: dict[str, list[float]] = {k: [] for k in policies}
    mvs = {k: accelerate(G32.matvec, vs[0].float(), pol) for k, pol in policies.items()}
    v32 = vs[0].float()
    for k in mvs:
        mvs[k](v32)  # warm-up
    for _ in range(rounds):
        for k, mv in mvs.items():
            t0 = time.perf_counter()
            mv(v32)
            times[k].append(time.perf_counter() - t0)
    base = times["float32 (highest)"]
    for name in policies:
        ratio = statistics.median(t / b for t, b in zip(times[name], base, strict=True))
        med, mx, xerr = errors[name]
        rows.append(
            [
                name,
                f"{med:.2e}",
                f"{mx:.2e}",
                f"{xerr:.2e}",
                f"{1e3 * statistics.median(times[name]):.1f}",
                f"{ratio:.2f}",
            ]
        )
    load_end = " ".join(open("/proc/loadavg").read().split()[:3])
    bf16 = errors["bf16 autocast"]
    text = "\n".join(
        [
            "# Reduced-precision curvature products: accuracy against float64",
            "",
            f"Written by `experiments/bench_precision.py{' --quick' if args.quick else ''}` on "
            f"{datetime.now().strftime('%Y-%m-%d %H:%M')}; {_cpu_model()}, "
            f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, python "
            f"{platform.python_version()}, {args.threads} torch thread(s). Load average at "
            f"start / end: {load_start} / {load_end}.",
            "",
            f"CURVES autoencoder (842,340 parameters), batch {prob.x.shape[0]}, GGN product, "
            f"{vectors} random v; CG: {args.cg_iters} iterations of (G + {DAMPING:g} I) x = -g "
            "with float32 vectors and scalars. Time: median over "
            f"{rounds} interleaved rounds; ratio = median of per-round ratios to float32.",
            "",
            md_table(
                [
                    "product precision",
                    "rel. error Gv (median)",
                    "rel. error Gv (max)",
                    "rel. error CG solution",
                    "ms per product (CPU)",
                    "time / float32",
                ],
                rows,
            ),
            "",
            "## Headline",
            "",
            f"- bf16 products: relative error of Gv {bf16[0]:.1e} (median), of the CG solution "
            f"{bf16[2]:.1e}. `ProductPolicy(precision='highest')` stays the default: bf16 is an "
            "explicit option for GPUs, where its speed is still unmeasured.",
            "- TF32 (`precision='tf32'`) only acts on CUDA: unmeasured here (no GPU).",
            "",
        ]
    )
    out = args.out or HERE / "results" / f"{datetime.now():%Y-%m-%d}-precision.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_text(out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
