"""Data-parallel runner: per-step time and the share spent in collectives, 1 vs 2 processes.

```
python experiments/bench_distributed.py            # full: CURVES autoencoder, ~5-10 min on 2 cores
python experiments/bench_distributed.py --quick    # smoke run: fewer steps and CG iterations
```

Each configuration runs the real runner (``hessfree.train.loop.Runner``) in N worker processes
launched as ``torchrun`` would (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``),
gloo over loopback, one torch thread per process. Every worker wraps
``torch.distributed.all_reduce``, ``all_gather`` and ``broadcast`` (the calls HessianFree's
averaging and the runner's per-step agreement make) with a clock and reads it in the runner's
``on_step`` callback; the step time is the wall time between two callbacks on rank 0 (the step,
the agreement and the batch slicing; evaluation and checkpoints are off between the first and
the last step). Reported per optimizer and process count: median step time, median time in
collectives per step on rank 0 and as the minimum over the ranks (the rank that arrives last at
a collective waits least, so the minimum is closest to the cost of the transfer itself; the
rest is waiting for a slower rank), and those as shares of the step.

Problem: the CURVES autoencoder 784-400-200-100-50-25-6 (+ mirror, 842,340 parameters), sparse
init, BCE summed over pixels, generated images (``hessfree.train.data.make_curves``); gradient
batch 1000 split across the ranks; HF with the shipped config's settings (curvature batch a
quarter of the gradient batch, martens preconditioner) and, as a second row, the whole gradient
batch as curvature batch; each sharded across the ranks (every product averaged with one
``all_reduce``) and, with 2 processes, replicated (``curvature_batch: replicated``: every rank
computes the products on the whole curvature batch, no collective per product). Target:
collectives <= 10 % of an HF step with 2 processes.

Writes ``experiments/results/distributed.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = [784, 400, 200, 100, 50, 25, 6]


# ---------------------------------------------------------------------------------------------
# the worker: one rank of one configuration


def _install_clock() -> dict[str, float]:
    """Wrap the collectives the runner and HessianFree call; return the running totals."""
    import torch.distributed as dist

    clock = {"seconds": 0.0, "calls": 0, "bytes": 0}
    for name in ("all_reduce", "all_gather", "broadcast"):
        original = getattr(dist, name)

        def timed(*args, _original=original, **kwargs):
            tensor = args[0] if args else kwargs.get("tensor")
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                clock["seconds"] += time.perf_counter() - start
                clock["calls"] += 1
                if hasattr(tensor, "numel"):
                    clock["bytes"] += tensor.numel() * tensor.element_size()

        setattr(dist, name, timed)
    return clock


def _config(args: argparse.Namespace, curvature: int, replicated: bool = False) -> dict:
    return {
        "name": "bench-distributed",
        "seed": 0,
        "device": "cpu",
        "dtype": "float32",
        "num_threads": 1,
        "data": {"name": "curves", "num_train": args.num_train, "num_test": 100},
        "model": {"name": "autoencoder", "layer_sizes": LAYERS, "init": "sparse"},
        "loss": {"name": "bce_with_logits", "reduction": "sum_per_case"},
        "optimizers": [
            {
                "name": "hessianfree",
                "damping": 45.0,
                "weight_decay": 2.0e-5,
                "cg_max_iter": args.cg_max_iter,
                "precond": "martens",
                "curvature_batch_size": curvature,
                "curvature_batch": "replicated" if replicated else "sharded",
                "budget": {"steps": args.warmup + args.hf_steps},
            },
        ]
        + (
            [{"name": "adam", "lr": 1.0e-3, "budget": {"steps": args.warmup + args.adam_steps}}]
            if args.adam_steps > 0
            else []
        ),
        "batch_size": args.batch,
        "eval": {"every_steps": None, "max_cases": 100},
        "output": {"checkpoint_every": None, "plots": False},
        "distributed": {"timeout_seconds": 600},
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    clock = _install_clock()
    from hessfree.train.config import parse_config
    from hessfree.train.loop import Runner

    records: list[dict] = []

    def on_step(ev) -> None:
        records.append(
            {
                "label": ev.label,
                "step": ev.step,
                "wall": time.perf_counter(),
                "collective_seconds": clock["seconds"],
                "collective_calls": clock["calls"],
                "collective_bytes": clock["bytes"],
            }
        )

    cfg = parse_config(_config(args, args.curvature, args.replicated))
    run_dir = Path(args.out_dir) / "run"
    Runner(cfg, run_dir, progress=False, verbose=False, on_step=on_step).run()
    rank = int(os.environ.get("RANK", "0"))
    (Path(args.out_dir) / f"rank{rank}.json").write_text(json.dumps(records))


# ---------------------------------------------------------------------------------------------
# the parent: launch, collect, report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    args: argparse.Namespace,
    world: int,
    curvature: int,
    adam_steps: int,
    out_dir: Path,
    replicated: bool = False,
) -> list[list]:
    port = str(_free_port())
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--out-dir",
        str(out_dir),
        "--curvature",
        str(curvature),
        "--batch",
        str(args.batch),
        "--num-train",
        str(args.num_train),
        "--cg-max-iter",
        str(args.cg_max_iter),
        "--hf-steps",
        str(args.hf_steps),
        "--adam-steps",
        str(adam_steps),
        "--warmup",
        str(args.warmup),
    ] + (["--replicated"] if replicated else [])
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(
                WORLD_SIZE=str(world),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({p.returncode}):\n{err}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def _per_step(records: list[dict], label: str, warmup: int) -> list[dict]:
    """Deltas between consecutive callbacks of one optimizer, the warm-up steps dropped."""
    rows = [r for r in records if r["label"] == label]
    out = []
    for prev, cur in zip(rows, rows[1:], strict=False):
        if cur["step"] <= warmup:
            continue
        out.append(
            {
                "step": cur["wall"] - prev["wall"],
                "coll": cur["collective_seconds"] - prev["collective_seconds"],
                "calls": cur["collective_calls"] - prev["collective_calls"],
                "bytes": cur["collective_bytes"] - prev["collective_bytes"],
            }
        )
    return out


def summarize(ranks: list[list[dict]], label: str, warmup: int) -> dict:
    steps = [_per_step(r, label, warmup) for r in ranks]
    n = min(len(s) for s in steps)
    step_time = [steps[0][i]["step"] for i in range(n)]
    coll0 = [steps[0][i]["coll"] for i in range(n)]
    coll_min = [min(s[i]["coll"] for s in steps) for i in range(n)]
    return {
        "steps": n,
        "step": statistics.median(step_time),
        "coll0": statistics.median(coll0),
        "coll_min": statistics.median(coll_min),
        "share0": statistics.median(c / t for c, t in zip(coll0, step_time, strict=True)),
        "share_min": statistics.median(c / t for c, t in zip(coll_min, step_time, strict=True)),
        "calls": statistics.median(steps[0][i]["calls"] for i in range(n)),
        "mbytes": statistics.median(steps[0][i]["bytes"] for i in range(n)) / 1e6,
    }


def _cpu_model() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_common import _cpu_model as cpu_model  # one definition for every report

    return cpu_model()


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def _busy() -> str:
    """Other benchmark or training processes on this machine (they distort the timings)."""
    try:
        out = subprocess.run(
            ["pgrep", "-af", "experiments/bench.py|experiments/reproduce.py|hessfree run"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return "?"
    return "; ".join(line.split(" ", 1)[1][:80] for line in out.splitlines()) or "none"


def _ms(x: float) -> str:
    return f"{1e3 * x:.0f}" if x >= 0.1 else f"{1e3 * x:.1f}"


def report(args: argparse.Namespace, results: dict, info: dict) -> str:
    lines = [
        "# Data-parallel runner: step time and collectives, 1 vs 2 processes",
        "",
        f"Written by `experiments/bench_distributed.py{' --quick' if args.quick else ''}` on "
        f"{info['date']}. **Two processes on one {os.cpu_count()}-core machine over loopback** "
        "(gloo, one torch thread each): the collectives copy through memory, not a network, and "
        "the two ranks share the machine with everything else on it; on separate hosts the "
        "transfer costs more and the compute contends less.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in info["machine"].items()]
    lines += [
        "",
        "## Settings",
        "",
        f"CURVES autoencoder {'-'.join(map(str, LAYERS))} + mirror (842,340 parameters, float32, "
        f"sparse init), generated images (`make_curves`, {args.num_train} train), BCE summed over "
        f"pixels per case. Gradient batch {args.batch} (each of N ranks takes {args.batch}/N); "
        f"HF: damping 45, weight_decay 2e-5, `precond: martens`, cg_max_iter {args.cg_max_iter}; "
        f"Adam lr 1e-3. {args.warmup} warm-up step(s) dropped, then {args.hf_steps} HF and "
        f"{args.adam_steps} Adam steps timed; medians over steps.",
        "",
        "Columns: *step* = wall time between two `on_step` callbacks on rank 0; *in collectives "
        "(rank 0)* = time inside `all_reduce`/`all_gather`/`broadcast` on rank 0, which includes "
        "waiting for the other rank; *(min over ranks)* = the smaller of the ranks' times, closest "
        "to the cost of the transfers themselves; *calls*, *MB* = collectives and bytes per step "
        "on rank 0.",
        "",
        "| optimizer | curvature batch | processes | step (ms) | in collectives, rank 0 (ms) "
        "| share | min over ranks (ms) | share | calls | MB | speed-up vs 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, curvature, world), s in results.items():
        one = results.get((label, str(curvature).split(" ")[0], 1))
        speed = f"{one['step'] / s['step']:.2f}x" if one else "-"
        lines.append(
            f"| {label} | {curvature if label == 'hessianfree' else '-'} | {world} | "
            f"{_ms(s['step'])} | {_ms(s['coll0'])} | {100 * s['share0']:.1f} % | "
            f"{_ms(s['coll_min'])} | {100 * s['share_min']:.1f} % | {s['calls']:.0f} | "
            f"{s['mbytes']:.1f} | {speed} |"
        )

    def verdict(replicated: bool) -> str:
        rows = [
            s
            for (label, c, w), s in results.items()
            if label == "hessianfree" and w == 2 and ("replicated" in str(c)) == replicated
        ]
        if not rows:
            return "no rows"
        worst = max(s["share0"] for s in rows)
        worst_min = max(s["share_min"] for s in rows)
        word = (
            "met"
            if worst <= 0.10
            else ("met on the transfer itself" if worst_min <= 0.10 else "missed")
        )
        return (
            f"**{word}** (largest median share over these rows: {100 * worst:.1f} % on rank 0 "
            f"including waiting, {100 * worst_min:.1f} % as the minimum over ranks)"
        )

    lines += [
        "",
        "## Headline",
        "",
        "- Target: collectives <= 10 % of an HF step with 2 processes. Sharded curvature batch: "
        f"{verdict(False)}. Replicated curvature batch: {verdict(True)}.",
        f"- Load average at start / end: {info['load_start']} / {info['load_end']}; other "
        f"benchmark or training processes at start: {info['busy']}.",
    ]
    if args.quick:
        lines.append("- `--quick`: few steps and CG iterations; a smoke run, not a measurement.")
    if args.note:
        lines.append(f"- Note: {args.note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/distributed.md")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--cg-max-iter", type=int, default=100)
    parser.add_argument("--hf-steps", type=int, default=5)
    parser.add_argument("--adam-steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--note", default="", help="a line to add to the report's headline")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--curvature", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--replicated", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.cg_max_iter, args.hf_steps, args.adam_steps = 10, 2, 5

    import torch

    info = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_start": _loadavg(),
        "busy": _busy(),
        "machine": {
            "CPU": _cpu_model(),
            "logical CPUs": str(os.cpu_count()),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "backend": "gloo over 127.0.0.1 (one process per rank, 1 torch thread each)",
        },
    }
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for curvature in (args.batch // 4, args.batch):
            # replicated only with 2 processes: in one process it is the sharded run
            for world, replicated in ((1, False), (2, False), (2, True)):
                tag = f"{curvature}{' replicated' if replicated else ''}"
                out_dir = Path(tmp) / f"c{curvature}-w{world}{'-rep' if replicated else ''}"
                out_dir.mkdir()
                start = time.perf_counter()
                # Adam once: it has no curvature batch
                with_adam = curvature == args.batch // 4 and not replicated
                ranks = _launch(
                    args,
                    world,
                    curvature,
                    args.adam_steps if with_adam else 0,
                    out_dir,
                    replicated,
                )
                took = time.perf_counter() - start
                print(f"curvature {tag}, {world} process(es): {took:.0f} s", flush=True)
                labels = ["hessianfree"] + (["adam"] if with_adam else [])
                for label in labels:
                    key = (label, tag if label == "hessianfree" else str(curvature), world)
                    results[key] = summarize(ranks, label, args.warmup)
    info["load_end"] = _loadavg()
    order = sorted(
        results, key=lambda k: (k[0] != "hessianfree", int(k[1].split(" ")[0]), k[1], k[2])
    )
    text = report(args, {k: results[k] for k in order}, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from _bench_common import save_text

    save_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
