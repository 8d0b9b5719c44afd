"""unseen11: the SciPy operators and ``hessfree run`` on cases nobody had tried.

Runs on whatever ``hessfree`` is on ``PYTHONPATH`` (so one script gives main's and the
branch's answers). Subcommands:

* ``checks``: each case against its oracle (dense float64 matrices from
  ``torch.autograd.functional``, ``numpy.linalg``) or the error it raises; one table row each.
* ``runner``: the runner's cases through the CLI's ``main`` in this process (tiny configs).
* ``cost``: the per-product cost of the stale-graph check (versions only, main's rule, against
  versions + tensor identity + dtype, this branch's), interleaved in one process, 1 thread.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_unseen11.py checks|runner|cost
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy.sparse.linalg as sla  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402
from torch.autograd.functional import hessian, jacobian  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.nn.utils import parameters_to_vector, vector_to_parameters  # noqa: E402

import hessfree as hf  # noqa: E402

torch.set_num_threads(1)


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=g).to(dtype), torch.randn(6, 2, generator=g).to(dtype)


def _dense(model, x, y):
    named = {k: v.detach().double() for k, v in model.named_parameters()}
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    theta = torch.cat([p.reshape(-1) for p in named.values()])
    m64 = copy.deepcopy(model).double()

    def f(t):
        parts = [c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True)]
        return functional_call(m64, dict(zip(named, parts, strict=True)), (x.double(),))

    J = jacobian(lambda t: f(t).reshape(-1), theta).numpy()
    H = hessian(lambda t: F.mse_loss(f(t), y.double()), theta).numpy()
    return J, H


def _square_mean(o, t):
    return ((o - t) ** 2).mean()


def _row(name, fn):
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - the table records what each case raises
        out = f"{type(err).__name__}: {' '.join(str(err).split())[:150]}"
    print(f"| {name} | {out} |", flush=True)


def checks() -> None:
    print("| case | result (max abs error against the oracle, or what it raised) |")
    print("|---|---|")
    model, (x, y) = _mlp(), _data()
    J, H = (
        hf.JacobianLinearOperator(model, x),
        hf.HessianLinearOperator(model, nn.MSELoss(), (x, y)),
    )
    Jd, Hd = _dense(model, x, y)
    eye = np.eye(26)
    u = np.random.default_rng(0).standard_normal(12)
    ref = np.linalg.lstsq(Jd, u, rcond=None)[0]
    tol = dict(atol=1e-14, btol=1e-14)
    _row("lsqr on J vs numpy lstsq", lambda: f"{np.abs(sla.lsqr(J, u, **tol)[0] - ref).max():.1e}")
    _row(
        "lsmr on J vs numpy lstsq (SciPy's default maxiter = min(m, n) = 12)",
        lambda: f"{np.abs(sla.lsmr(J, u, **tol)[0] - ref).max():.1e}",
    )
    _row(
        "lsmr on J vs numpy lstsq, maxiter=500",
        lambda: f"{np.abs(sla.lsmr(J, u, maxiter=500, **tol)[0] - ref).max():.1e}",
    )
    sv = np.linalg.svd(Jd, compute_uv=False)[:3]

    def svds(solver):
        s = sla.svds(J, k=3, return_singular_vectors=False, solver=solver, random_state=0)
        return f"{np.abs(np.sort(s)[::-1] - sv).max():.1e}"

    _row("svds(J) arpack vs numpy svd", lambda: svds("arpack"))
    _row("svds(J) lobpcg vs numpy svd", lambda: svds("lobpcg"))
    ev = np.linalg.eigvalsh(Hd)

    def shift_invert():
        t = time.process_time()
        w = sla.eigsh(H, k=2, sigma=0.05, return_eigenvectors=False, v0=np.ones(26))
        near = np.sort(ev[np.argsort(np.abs(ev - 0.05))[:2]])
        return f"{np.abs(np.sort(w) - near).max():.1e} ({time.process_time() - t:.1f} s CPU)"

    _row("eigsh(H, sigma=0.05) vs eigvalsh", shift_invert)
    _row(
        "H.matmat(Fortran-ordered I)",
        lambda: f"{np.abs(H.matmat(np.asfortranarray(eye)) - Hd).max():.1e}",
    )
    _row("H.matmat(float32 I), float64 model", lambda: H.matmat(eye.astype(np.float32)).dtype)
    _row(
        "H @ int64 ones", lambda: f"{np.abs(H @ np.ones(26, dtype=np.int64) - Hd.sum(1)).max():.1e}"
    )
    _row("H.matmat((26, 0))", lambda: H.matmat(np.zeros((26, 0))).shape)
    _row("J.rmatmat((12, 0))", lambda: J.rmatmat(np.zeros((12, 0))).shape)
    _row("H @ complex", lambda: H @ (np.ones(26) + 1j))
    m32 = _mlp(torch.float32)
    H32 = hf.HessianLinearOperator(m32, nn.MSELoss(), (x.float(), y.float()))
    _row("float32 model: matmat(float64 I) dtype", lambda: H32.matmat(eye).dtype)
    _row(
        "params listed twice",
        lambda: hf.HessianLinearOperator(model, nn.MSELoss(), (x, y), params=[model[0].weight] * 2),
    )
    other = nn.Parameter(torch.randn(3, dtype=torch.float64))
    _row(
        "params not in the model (only)",
        lambda: hf.HessianLinearOperator(model, nn.MSELoss(), (x, y), params=[other]),
    )
    _row(
        "params as names",
        lambda: hf.HessianLinearOperator(model, nn.MSELoss(), (x, y), params=["0.weight"]),
    )
    _row(
        "params as named_parameters()",
        lambda: hf.HessianLinearOperator(
            model, nn.MSELoss(), (x, y), params=model.named_parameters()
        ),
    )
    _row(
        "loss reduction='none'",
        lambda: hf.GGNLinearOperator(model, nn.MSELoss(reduction="none"), (x, y)),
    )
    _row(
        "plain callable loss vs dense",
        lambda: (
            f"{np.abs(hf.HessianLinearOperator(model, _square_mean, (x, y)) @ eye - Hd).max():.1e}"
        ),
    )
    _row("pickle.dumps(H)", lambda: len(pickle.dumps(H)))
    _row("copy.deepcopy(J)", lambda: copy.deepcopy(J))
    _row("copy.copy(H) @ I vs dense", lambda: f"{np.abs(copy.copy(H) @ eye - Hd).max():.1e}")

    def threads():
        errors, worst = [], [0.0]

        def work(i):
            try:
                for _ in range(50):
                    worst[0] = max(worst[0], np.abs(H @ eye[:, i] - Hd[:, i]).max())
            except Exception as err:  # noqa: BLE001
                errors.append(repr(err))

        ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return f"errors {errors[:1]}, max error {worst[0]:.1e}"

    _row("one H from 4 threads x 50 products", threads)
    G = hf.GGNLinearOperator(model, nn.MSELoss(), (x, y))
    Gd = Jd.T @ Jd * (2 / 12)
    sd = np.sqrt(2 * (np.sum(Gd**2) - np.sum(np.diag(Gd) ** 2)) / 200)

    def hutch():
        est = hf.spectral.hutchinson_trace(G, num_probes=200, seed=0)
        err = abs(est.estimate - np.trace(Gd)) / sd
        return f"error {err:.2f} sd; std_error/sd {est.std_error / sd:.2f}"

    _row("hutchinson_trace(G, 200) vs trace(J^T J/6)", hutch)
    # the parameters swapped or converted after construction
    for how in ("vector_to_parameters", "model.double()"):
        m = _mlp(torch.float32 if how == "model.double()" else torch.float64)
        xs, ys = x.to(m[0].weight.dtype), y.to(m[0].weight.dtype)
        ops = {
            "cached H": hf.HessianLinearOperator(m, nn.MSELoss(), (xs, ys)),
            "uncached H": hf.HessianLinearOperator(m, nn.MSELoss(), (xs, ys), cache_graph=False),
            "J": hf.JacobianLinearOperator(m, xs),
        }
        if how == "model.double()":
            m.double()
        else:
            vector_to_parameters(2 * parameters_to_vector(m.parameters()), m.parameters())
        Jn, Hn = _dense(m, x, y)
        for name, op in ops.items():
            oracle = Jn if name == "J" else Hn

            def diff(op=op, oracle=oracle):
                out = op @ eye
                gap = np.abs(out - oracle).max()
                return f"returned {out.dtype}; max abs diff from the new point's dense {gap:.2e}"

            _row(f"{how}, then {name} @ I", diff)


def runner() -> None:
    from hessfree.train.cli import main

    print("| case | exit | stderr (first 200 characters) | notes |")
    print("|---|---|---|---|")
    root = Path(tempfile.mkdtemp(prefix="unseen11-"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(root / "d.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])

    def config(name, **extra):
        raw = {
            "name": name,
            "num_threads": 1,
            "data": {"name": "npz", "path": str(root / "d.npz")},
            "model": {"name": "mlp", "hidden_sizes": [4]},
            "loss": {"name": "cross_entropy"},
            "optimizers": [{"name": "hessianfree", "cg_max_iter": 3}, {"name": "adam"}],
            "budget": {"steps": 4},
            "eval": {"every_steps": 2},
            "output": {"checkpoint_every": 2, "plots": True},
        }
        raw.update(extra)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    def case(name, argv, notes=lambda: ""):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except BaseException as exc:  # noqa: BLE001 - main's traceback, as the CLI shows it
                code, _ = f"1 ({type(exc).__name__})", err.write(f"Traceback: {exc}")
        text = " ".join(err.getvalue().split())[:200]
        print(f"| {name} | {code} | {text} | {notes()} |", flush=True)

    out = root / "one unit, batch 1, ü 日本"
    case(
        "1 hidden unit, batch 1, steps and seconds, out dir with space and unicode",
        [
            "run",
            config(
                "u",
                model={"name": "mlp", "hidden_sizes": [1]},
                batch_size=1,
                budget={"steps": 3, "seconds": 30},
            ),
            "--out",
            str(out),
            "--quiet",
        ],
        lambda: sorted(p.name for p in out.iterdir()),
    )
    case("resume a finished run", ["run", "--resume", str(out), "--quiet"])
    single = root / "single"
    case(
        "a single evaluation per optimizer (plots)",
        [
            "run",
            config("s", budget={"steps": 1}, eval={"every_steps": 100}),
            "--out",
            str(single),
            "--quiet",
        ],
        lambda: sorted(p.name for p in single.glob("*.png")),
    )
    nan = root / "nan"

    def nan_notes():
        rs = [json.loads(line) for line in (nan / "metrics.jsonl").read_text().splitlines()]
        s = json.loads((nan / "summary.json").read_text())["optimizers"]["sgd"]
        bad = [
            (r["step"], r["train_loss"], r["train_accuracy"]) for r in rs if r["train_loss"] is None
        ]
        best = s["best"]["test_accuracy"]["step"]
        return (
            f"stop {s['stop_reason']}; records with null loss (step, loss, accuracy): {bad}; "
            f"best test accuracy at step {best}"
        )

    case(
        "SGD lr 1e37 diverges (NaN loss)",
        [
            "run",
            config(
                "n",
                optimizers=[{"name": "sgd", "lr": 1e37}],
                model={"name": "mlp", "hidden_sizes": [8], "activation": "tanh"},
                budget={"steps": 20},
                eval={"every_steps": 1},
            ),
            "--out",
            str(nan),
            "--quiet",
        ],
        nan_notes,
    )
    saved = {
        k: v for k, v in sys.modules.items() if k == "matplotlib" or k.startswith("matplotlib.")
    }
    for k in saved:
        sys.modules[k] = None
    sys.modules["matplotlib"] = None
    nomp = root / "nomp"
    try:
        case(
            "matplotlib not importable",
            ["run", config("m"), "--out", str(nomp), "--quiet"],
            lambda: sorted(p.name for p in nomp.iterdir()),
        )
    finally:
        del sys.modules["matplotlib"]
        sys.modules.update(saved)
    try:
        import fcntl
    except ImportError:
        return
    with open(out / ".lock", "a+") as f:  # another process holding the run directory
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = "lock taken by the probe"
        except BlockingIOError:
            held = "lock busy"
        case(
            "--resume while another process holds the run directory",
            ["run", "--resume", str(out), "--quiet"],
            lambda: held,
        )


def cost() -> None:
    """Per-product time with main's check (versions) and this branch's (versions, tensors,
    dtype), interleaved; the smallest cached product (32 parameters) and a 1,058-parameter one."""
    from hessfree import _checks

    new_check = _checks.ParamVersions.check

    def old_check(self, fix):  # main's rule: version counters only
        changed = [
            i
            for i, (p, v) in enumerate(zip(self.params, self.versions, strict=True))
            if p._version != v
        ]
        if changed:
            raise RuntimeError(fix)

    print(f"load average at start: {os.getloadavg()}")
    print(
        "| model | params | main's check: median us/product (CPU, wall) | this branch's "
        "| ratio CPU, wall |"
    )
    print("|---|---|---|---|---|")
    for widths in ((3, 4, 2), (16, 32, 16, 2)):
        torch.manual_seed(0)
        layers = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(a, b), nn.Tanh()]
        model = nn.Sequential(*layers[:-1]).double()
        x = torch.randn(8, widths[0], dtype=torch.float64)
        y = torch.randn(8, widths[-1], dtype=torch.float64)
        H = hf.HessianLinearOperator(model, nn.MSELoss(), (x, y))
        v = np.ones(H.shape[0])
        times = {"old": ([], []), "new": ([], [])}
        for _ in range(200):  # warm-up
            H @ v
        for _ in range(31):
            for name, fn in (("old", old_check), ("new", new_check)):
                _checks.ParamVersions.check = fn
                c, w = time.process_time(), time.perf_counter()
                for _ in range(200):
                    H @ v
                times[name][0].append((time.process_time() - c) / 200 * 1e6)
                times[name][1].append((time.perf_counter() - w) / 200 * 1e6)
        _checks.ParamVersions.check = new_check
        o = [statistics.median(t) for t in times["old"]]
        n = [statistics.median(t) for t in times["new"]]
        print(
            f"| {widths} | {H.shape[0]} | {o[0]:.1f}, {o[1]:.1f} | {n[0]:.1f}, {n[1]:.1f} "
            f"| {n[0] / o[0]:.3f}, {n[1] / o[1]:.3f} |"
        )
    print()
    print("| check alone | params | main's: median us/call (CPU) | this branch's | difference |")
    print("|---|---|---|---|---|")
    for n in (4, 32):
        ps = [torch.zeros(3, requires_grad=True) for _ in range(n)]
        pv = _checks.ParamVersions(ps)
        res = {"old": [], "new": []}
        for _ in range(31):
            for name, fn in (("old", old_check), ("new", new_check)):
                c = time.process_time()
                for _ in range(2000):
                    fn(pv, "")
                res[name].append((time.process_time() - c) / 2000 * 1e6)
        o, m = statistics.median(res["old"]), statistics.median(res["new"])
        print(f"| ParamVersions.check | {n} | {o:.2f} | {m:.2f} | +{m - o:.2f} us |")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    {"checks": checks, "runner": runner, "cost": cost}[
        sys.argv[1] if len(sys.argv) > 1 else "checks"
    ]()
