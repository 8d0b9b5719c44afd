"""Curvature products against one gradient, two versions of hessfree in one interleaved run.

    python experiments/_prodcost.py --old /path/to/old/checkout --new /path/to/new/checkout
    python experiments/_prodcost.py ... --tasks poisson,reaction,mlp,cnn --procs 8 --rounds 20
    python experiments/_prodcost.py ... --turns --procs 4 --rounds 100   # workers take turns
    python experiments/_prodcost.py --lean --tasks poisson,mlp --rounds 40  # this checkout only

Why: pinn.py's report put the Gauss-Newton product at 0.98-1.00x a gradient on 2026-11-30 and
1.24-1.27x on 2026-12-01 (experiments/README.md, "prodcost"). Reports taken on different days
differ in load and in everything else; this script puts both versions side by side. The driver
starts one worker process per (version, task), alternating the versions (ABBA order) over
``--procs`` repetitions, one process at a time. Each worker imports hessfree from its checkout
(``--root``; the experiments' problem code is this checkout's, so both versions see the same
problems), then times the contenders ``--rounds`` times in pinn.py's way (a fixed order:
gradient first; the ratio is taken per round against that round's gradient), or in bench.py's
way (``--order shuffled``: a shuffled order per round, ``gc.collect(0)`` before each call).

With ``--turns`` each repetition instead starts one live worker per version and task, and the
two take turns round by round (ABBA): a burst of load falls on both versions alike. With
``--lean`` the GN product and its set-up on the lean R-op graph are timed against the same on a
plain ``create_graph`` graph, in one process.

The summary gives, per version and contender, the median over all rounds of time / gradient,
and the version ratio new / old of those medians; also a hash of each product vector on a fixed
``v``, so a bitwise change in the products between the versions shows. Load averages at the
start and end are printed. Ratios are the result; the absolute medians are context only.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PINN_TASKS = ("poisson", "reaction")
BENCH_TASKS = ("mlp", "cnn", "autoencoder")


def _hash(t) -> str:
    return hashlib.sha1(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:12]


def _pinn_fns(task: str) -> tuple[dict, dict, Any]:
    """pinn.py's product_cost contenders (without the forward-mode row) on its full problems.

    Returns the contenders, hashes of the parameters and products, and the vector ``v``.
    """
    import copy

    import pinn
    import torch

    from hessfree import GGNProduct

    prob = pinn.poisson(24, 32) if task == "poisson" else pinn.reaction(48, 32, 32)
    torch.manual_seed(0)  # pinn.py's default --seed
    net = prob.make_net()
    net.load_state_dict(copy.deepcopy(net.state_dict()))
    params = list(net.parameters())
    closure = prob.closure_for(net)
    loss, blocks = closure()
    G = GGNProduct(loss, blocks, params)
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(0), dtype=pinn.DTYPE)

    def gradient() -> None:
        loss, _ = closure()
        torch.autograd.grad(loss, params)

    def setup() -> GGNProduct:
        loss, blocks = closure()
        return GGNProduct(loss, blocks, params)

    fns = {
        "gradient": gradient,
        "ggn": lambda: G.matvec(v),
        "jvp": lambda: G.jacobian.jvp(v),
        "ggn.setup": setup,
    }
    jv = G.jacobian.jvp(v)
    jv = torch.cat([t.reshape(-1) for t in (jv if isinstance(jv, tuple) else (jv,))])
    hashes = {
        "params": _hash(torch.cat([p.reshape(-1) for p in params])),
        "ggn": _hash(G.matvec(v)),
        "jvp": _hash(jv),
    }
    return fns, hashes, v


def _bench_fns(task: str) -> tuple[dict, dict, Any]:
    """bench.py's product-section contenders (ours) on its problems; as :func:`_pinn_fns`."""
    import torch
    from _bench_common import make_problem

    from hessfree import GGNProduct, HessianProduct, ParamLayout

    prob = make_problem(task, "cpu", 0)
    params = prob.params
    layout = ParamLayout(params)
    v = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0))

    fwd, grad = prob.forward, prob.gradient

    G = GGNProduct(*fwd(), params)
    H = HessianProduct(fwd()[0], params)
    fns = {
        "gradient": grad,
        "ggn": lambda: G.matvec(v),
        "hvp": lambda: H.matvec(v),
        "jvp": lambda: G.jacobian.jvp(v),
        "ggn.setup": lambda: GGNProduct(*fwd(), params),
    }
    hashes = {
        "params": _hash(torch.cat([p.reshape(-1) for p in params])),
        "ggn": _hash(G.matvec(v)),
        "hvp": _hash(H.matvec(v)),
        "jvp": _hash(G.jacobian.jvp(v)),
    }
    return fns, hashes, v


def worker(args: argparse.Namespace) -> None:
    root = str(Path(args.root).resolve())
    sys.path.insert(0, root)
    sys.path.insert(1, str(HERE))
    import torch

    import hessfree

    if not hessfree.__file__.startswith(root):
        raise SystemExit(f"hessfree imported from {hessfree.__file__!r}, not from {root!r}.")
    torch.set_num_threads(args.threads)
    fns, hashes, _ = (_pinn_fns if args.task in PINN_TASKS else _bench_fns)(args.task)
    if args.serve:
        _serve(fns, hashes, args.warmup)
        return
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(args.rounds):
        if args.order == "shuffled":
            rng.shuffle(order)
        for k in order:
            if args.order == "shuffled":
                gc.collect(0)
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "hashes": hashes}))


def lean_ab(args: argparse.Namespace) -> None:
    """This checkout's GN product on the lean R-op graph against one on a plain graph.

    The only change to the product's graph between the versions compared here is the lean R-op
    set-up (``_rop_setup``: saved-tensor hooks that drop the cotangents the R-op never reads);
    both graphs are built in this process and timed in turns (shuffled order per round).
    """
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(1, str(HERE))
    import torch

    import hessfree.curvature as C

    torch.set_num_threads(args.threads)
    print(f"load at start: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"{args.rounds} rounds, {args.threads} thread(s), shuffled; medians (x gradient)\n")
    print("| task | product lean | plain | lean/plain | set-up lean | plain | lean/plain | |")
    print("|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        fns, _, v = (_pinn_fns if task in PINN_TASKS else _bench_fns)(task)
        G_lean = fns["ggn.setup"]()
        setup = C._rop_setup
        C._rop_setup = lambda outs, params, us: C._grad(outs, params, us, create_graph=True)
        try:
            G_full = fns["ggn.setup"]()
        finally:
            C._rop_setup = setup
        if not torch.equal(G_lean.matvec(v), G_full.matvec(v)):
            raise SystemExit(f"{task}: lean and plain products differ")

        def plain_setup(setup=fns["ggn.setup"]):
            saved = C._rop_setup
            C._rop_setup = lambda outs, params, us: C._grad(outs, params, us, create_graph=True)
            try:
                return setup()
            finally:
                C._rop_setup = saved

        calls = {
            "gradient": fns["gradient"],
            "lean": lambda G=G_lean, v=v: G.matvec(v),
            "plain": lambda G=G_full, v=v: G.matvec(v),
            "lean.setup": fns["ggn.setup"],
            "plain.setup": plain_setup,
        }
        times = {k: [] for k in calls}
        order = list(calls)
        rng = random.Random(0)
        for fn in calls.values():
            fn()
        for _ in range(args.rounds):
            rng.shuffle(order)
            for k in order:
                gc.collect(0)
                t0 = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t0)
        g = times["gradient"]
        per = {
            k: statistics.median(a / b for a, b in zip(t, g, strict=True)) for k, t in times.items()
        }

        def rel(a: str, b: str, times: dict = times) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        print(
            f"| {task} | {per['lean']:.3f} | {per['plain']:.3f} | {rel('lean', 'plain'):.3f} | "
            f"{per['lean.setup']:.3f} | {per['plain.setup']:.3f} | "
            f"{rel('lean.setup', 'plain.setup'):.3f} | bitwise equal |",
            flush=True,
        )
    print(f"load at end: {' '.join(open('/proc/loadavg').read().split()[:3])}")


def _serve(fns: dict, hashes: dict, warmup: int) -> None:
    """Take turns: one round (every contender once, in order) per line read from stdin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    print(json.dumps({"hashes": hashes}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        times = {}
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k] = time.perf_counter() - t0
        print(json.dumps(times), flush=True)


def _turns(
    args: argparse.Namespace, versions: dict, task: str, env: dict, rows: dict, hashes: dict
) -> None:
    """One live worker per version; they take turns round by round (ABBA)."""
    procs = {}
    for ver, root in versions.items():
        cmd = [sys.executable, __file__, "worker", "--root", root, "--task", task, "--serve"]
        cmd += ["--threads", str(args.threads), "--warmup", str(args.warmup)]
        procs[ver] = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    for ver, p in procs.items():
        hashes[task][ver] = json.loads(p.stdout.readline())["hashes"]
    for i in range(args.rounds):
        pair = ["old", "new"] if i % 2 == 0 else ["new", "old"]
        for ver in pair:
            p = procs[ver]
            p.stdin.write("round\n")
            p.stdin.flush()
            times = json.loads(p.stdout.readline())
            for k, t in times.items():
                r = rows[task][ver].setdefault(k, {"ms": [], "ratio": []})
                r["ms"].append(t * 1e3)
                r["ratio"].append(t / times["gradient"])
    for p in procs.values():
        p.stdin.close()
        p.wait()


def driver(args: argparse.Namespace) -> None:
    versions = {"old": args.old, "new": args.new}
    tasks = args.tasks.split(",")
    unknown = set(tasks) - set(PINN_TASKS + BENCH_TASKS)
    if unknown:
        raise SystemExit(
            f"Unknown task(s) {sorted(unknown)}; expected some of {PINN_TASKS + BENCH_TASKS}."
        )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)  # the worker puts its --root first itself
    load0 = open("/proc/loadavg").read().split()[:3]
    print(f"load at start: {' '.join(load0)}", flush=True)
    rows: dict = {t: {v: {} for v in versions} for t in tasks}
    hashes: dict = {t: {} for t in tasks}
    for rep in range(args.procs):
        pair = ["old", "new"] if rep % 2 == 0 else ["new", "old"]  # ABBA
        if args.turns:
            for task in tasks:
                _turns(args, versions, task, env, rows, hashes)
            print(f"repetition {rep + 1}/{args.procs} done", flush=True)
            continue
        for task in tasks:
            for ver in pair:
                cmd = [sys.executable, __file__, "worker", "--root", versions[ver], "--task", task]
                cmd += ["--rounds", str(args.rounds), "--threads", str(args.threads)]
                cmd += ["--order", args.order, "--warmup", str(args.warmup)]
                res = json.loads(
                    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
                    .stdout.strip()
                    .splitlines()[-1]
                )
                hashes[task][ver] = res["hashes"]
                ref = res["times"]["gradient"]
                for k, ts in res["times"].items():
                    r = rows[task][ver].setdefault(k, {"ms": [], "ratio": []})
                    r["ms"] += [t * 1e3 for t in ts]
                    r["ratio"] += [t / g for t, g in zip(ts, ref, strict=True)]
        print(f"repetition {rep + 1}/{args.procs} done", flush=True)
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"load at end: {' '.join(load1)}")
    print(
        f"\n{args.procs} processes per version and task, {args.rounds} rounds each, "
        f"{args.threads} thread(s), order {args.order}\n"
    )
    print("| task | contender | old ms | new ms | old × grad | new × grad | new/old (× grad) |")
    print("|---|---|---|---|---|---|---|")
    for task in tasks:
        for k in rows[task]["old"]:
            o, n = rows[task]["old"][k], rows[task]["new"][k]
            mo, mn = statistics.median(o["ratio"]), statistics.median(n["ratio"])
            print(
                f"| {task} | {k} | {statistics.median(o['ms']):.2f} | "
                f"{statistics.median(n['ms']):.2f} | {mo:.3f} | {mn:.3f} | {mn / mo:.3f} |"
            )
    print()
    for task in tasks:
        same = {k: hashes[task]["old"].get(k) == h for k, h in hashes[task]["new"].items()}
        print(f"{task}: hashes equal old/new: {same}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "hashes": hashes, "load": [load0, load1]})
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode")
    w = sub.add_parser("worker")
    w.add_argument("--root", required=True)
    w.add_argument("--task", required=True)
    w.add_argument("--serve", action="store_true", help="one round per 'round' line on stdin")
    for p in (ap, w):
        p.add_argument("--rounds", type=int, default=20)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--order", choices=("fixed", "shuffled"), default="fixed")
        p.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--old", help="checkout of the old version (e.g. a detached worktree)")
    ap.add_argument("--new", default=str(HERE.parent))
    ap.add_argument("--tasks", default="poisson,reaction")
    ap.add_argument("--procs", type=int, default=6)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--lean",
        action="store_true",
        help="this checkout only: the GN product on the lean R-op graph against a plain graph",
    )
    ap.add_argument(
        "--turns",
        action="store_true",
        help="per repetition one live worker per version, taking turns round by round",
    )
    args = ap.parse_args()
    if args.mode == "worker":
        worker(args)
    elif args.lean:
        lean_ab(args)
    elif not args.old or not (Path(args.old) / "hessfree").is_dir():
        raise SystemExit(
            f"`--old` must be a checkout holding hessfree/, got {args.old!r}; e.g. "
            "`git worktree add --detach /tmp/old e11e817` and `--old /tmp/old`."
        )
    else:
        driver(args)


if __name__ == "__main__":
    main()
