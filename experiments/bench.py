"""Benchmark hessfree against what users would pick instead, and write a dated report.

    python experiments/bench.py            # full run (< 20 min on 2 CPU cores)
    python experiments/bench.py --quick    # smoke run (< 3 min)
    python experiments/bench.py --device cuda --threads 4

Sections (``--sections``; all by default):

1. ``products``: Hessian/GGN/Fisher/Jacobian products against one gradient, torch.func,
   torch.autograd.functional, curvlinops and BackPACK, on the CURVES autoencoder, an MLP and a CNN.
2. ``steps``: one HF step broken down; CG per iteration and CG overhead; Adam/SGD/L-BFGS steps;
   peak memory of an HF step.
3. ``train``: training loss against time for HF, Adam, SGD-momentum and L-BFGS.
4. ``scipy``: SciPy ``cg`` on a GGN LinearOperator (numpy BLAS pinned and not) vs ``hessfree.cg``.

Writes ``experiments/results/<YYYY-MM-DD>-<machine>.md`` and PNG plots with the same stem.
Method and caveats: ``experiments/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def _pin_numpy_blas() -> None:
    """numpy's BLAS gets one thread everywhere except where section 4 raises it on purpose."""
    import numpy  # noqa: F401 - load every BLAS before limiting it
    import scipy.linalg  # noqa: F401
    import scipy.sparse.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="few repetitions and small budgets (< 3 min)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable ratios on a shared CPU; section 4 uses "
        "all CPUs on purpose)",
    )
    p.add_argument(
        "--sections",
        default="products,steps,train,scipy",
        help="comma-separated subset of products,steps,train,scipy",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"), help="directory of the report")
    p.add_argument(
        "--tag", default=None, help="machine part of the report's name (default: from the CPU)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False.")
    torch.set_num_threads(args.threads)
    _pin_numpy_blas()
    warnings.filterwarnings(
        "ignore", message="Attempted to insert a get_attr Node"
    )  # torch.func.linearize

    import _bench_products
    import _bench_scipy
    import _bench_steps
    import _bench_train
    from _bench_common import Settings, machine_info, machine_tag, md_table, save_text

    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - {"products", "steps", "train", "scipy"}
    if unknown:
        raise SystemExit(
            f"Unknown section(s) {sorted(unknown)}; expected products, steps, train, scipy."
        )
    settings = Settings.make(
        args.quick, device=args.device, threads=args.threads, seed=args.seed, sections=sections
    )
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    info = machine_info(settings)
    day = datetime.date.today().isoformat()
    tag = args.tag or machine_tag(gpu=not args.device.startswith("cpu"))
    stem = f"{day}-{tag}" + ("-quick" if args.quick else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def png(name: str) -> str:
        return f"{stem}-{name}.png"

    results, headline = {}, []
    if "products" in sections:
        results["products"] = _bench_products.run(settings, log)
        _bench_products.plot(results["products"], str(out_dir / png("products")))
        headline += _bench_products.headline_rows(results["products"])
    if "steps" in sections:
        results["steps"] = _bench_steps.run(settings, log)
        headline += _bench_steps.headline_rows(results["steps"])
    if "train" in sections:
        results["train"] = _bench_train.run(settings, log)
        _bench_train.plot(results["train"], lambda k: str(out_dir / png(f"train-{k}")))
        headline += _bench_train.headline_rows(results["train"])
    if "scipy" in sections:
        results["scipy"] = _bench_scipy.run(settings, log)

    elapsed = time.perf_counter() - started
    cmd = "python experiments/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# hessfree benchmark, {day}, {tag}{' (quick)' if args.quick else ''}\n",
        f"Command: `{cmd.strip()}` — {elapsed / 60:.1f} min. Ratios are the result; absolute "
        f"times are "
        "context only (shared machine). Medians over interleaved rounds, [quartiles]. Method: "
        "`experiments/README.md`.\n",
        "## Machine\n",
        md_table(["", ""], [[k, v] for k, v in info.items()]),
        "",
        "numpy's BLAS is pinned to 1 thread (threadpoolctl) except in the unpinned variant of "
        "§4.\n",
    ]
    if headline:
        lines += [
            "## Headline: targets\n",
            md_table(
                ["problem", "quantity", "target", "measured: median [quartiles]", "verdict"],
                headline,
            ),
            "",
        ]
    if "products" in results:
        lines.append(_bench_products.report(results["products"]))
        lines.append(f"![products]({png('products')})\n")
    if "steps" in results:
        lines.append(_bench_steps.report(results["steps"]))
    if "train" in results:
        lines.append(_bench_train.report(results["train"], lambda k: png(f"train-{k}")))
    if "scipy" in results:
        lines.append(_bench_scipy.report(results["scipy"]))
    path = out_dir / f"{stem}.md"
    save_text(path, "\n".join(lines))
    log(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
