"""Shared pieces of ``experiments/bench.py``: settings, machine description, interleaved timing,
peak-memory probes, statistics, the benchmark problems and markdown helpers.

Timing method: every contender of a block is a zero-argument callable; each round calls every
contender once, in a freshly shuffled order, timing each call (with a device synchronisation on
an accelerator); ratios are taken per round against the reference (one gradient) timed in the
same round, then summarised by the median and the inter-quartile range over rounds. On a shared
CPU this cancels most of the drift that other processes cause.

Peak memory (CPU): the resident-set high-water mark (``VmHWM``) above the resident set before the
call, with the mark reset through ``/proc/self/clear_refs`` and glibc forced to serve every
allocation of 64 KiB or more by ``mmap`` (so freed tensors leave the resident set at once). This
runs in a separate, spawned worker process, because that malloc setting would slow the timed
code. On CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessfree.train.checkpoint import atomic_write, write_text_atomic

# ---------------------------------------------------------------------------------------------
# settings shared by every section


@dataclass
class Settings:
    """What one run of the benchmark does (see ``bench.py --help``)."""

    device: str = "cpu"
    threads: int = 1
    quick: bool = False
    seed: int = 0
    sections: tuple[str, ...] = ("products", "steps", "train", "scipy")
    # products
    rounds: int = 15
    block_seconds: float = 120.0  # most timed seconds per product block (rounds are cut to fit)
    # steps
    step_rounds: int = 6
    step_cg_max_iter: int = 50
    # time to target
    ae_budget: float = 30.0
    clf_budget: float = 10.0
    # scipy cg
    scipy_iters: int = 20
    scipy_rounds: int = 4

    @classmethod
    def make(cls, quick: bool, **kw: Any) -> Settings:
        s = cls(quick=quick, **kw)
        if quick:
            s.rounds, s.block_seconds = 2, 25.0
            s.step_rounds, s.step_cg_max_iter = 2, 10
            s.ae_budget, s.clf_budget = 4.0, 2.0
            s.scipy_iters, s.scipy_rounds = 5, 2
        return s


def save_png(fig: Any, path: Any, dpi: int) -> None:
    """``fig.savefig`` as PNG atomically: a killed run keeps the previous figure, never half."""
    atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))


def save_text(path: Any, text: str) -> None:
    """Write a report atomically (UTF-8): a killed run leaves the previous one whole."""
    write_text_atomic(path, text)


class RawLog:
    """A study script's log: each line printed as it comes and kept, so that the run (command
    line, load averages, results) can be appended to a raw-results file as one code block."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def append_to(self, path: Path, title: str) -> None:
        """Append the kept lines to ``path`` (atomically; a new file starts with ``# title``)."""
        old = path.read_text() if path.exists() else f"# {title}\n"
        save_text(path, old + "\n```\n" + "\n".join(self.lines) + "\n```\n")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(settings: Settings) -> dict[str, str]:
    """Facts a reader needs to compare reports: CPU, cores, threads, library versions."""
    import scipy

    info = {
        "host": platform.node(),
        "CPU": _cpu_model(),
        "logical CPUs (os.cpu_count)": str(os.cpu_count()),
        "CPUs usable by this process": str(len(os.sched_getaffinity(0)))
        if hasattr(os, "sched_getaffinity")
        else "?",
        "torch threads (set)": str(torch.get_num_threads()),
        "torch interop threads": str(torch.get_num_interop_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "device": settings.device,
    }
    try:
        with open("/proc/loadavg") as fh:
            info["load average at start (1/5/15 min)"] = " ".join(fh.read().split()[:3])
    except OSError:
        pass
    if settings.device.startswith("cuda"):
        info["GPU"] = torch.cuda.get_device_name()
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p['internal_api']}:{p['prefix']}={p['num_threads']}" for p in threadpool_info()]
        info["native thread pools (threadpoolctl)"] = ", ".join(pools)
    except ImportError:
        pass
    for dist in ("curvlinops-for-pytorch", "backpack-for-pytorch"):
        info[dist] = optional_version(dist) or "not installed"
    return info


def optional_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_tag(gpu: bool = False) -> str:
    """A short, file-name-safe description of the machine (or GPU) for the report's name."""
    cpu = (torch.cuda.get_device_name() if gpu else _cpu_model()).lower()
    for drop in ("(r)", "(tm)", "cpu", "processor", "@"):
        cpu = cpu.replace(drop, " ")
    words = [w for w in cpu.replace("-", " ").split() if w.isalnum() and not w.endswith("ghz")][:3]
    return "-".join([*words] if gpu else [*words, f"{os.cpu_count()}c"]) or "machine"


# ---------------------------------------------------------------------------------------------
# timing


@dataclass
class Timings:
    """Seconds per call of each contender, one entry per round (``nan`` where a call failed)."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    rounds: int = 0

    def arr(self, name: str) -> np.ndarray:
        return np.asarray(self.samples[name], dtype=float)


def interleave(
    fns: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    device: str,
    seed: int,
    warmup: int = 2,
    max_seconds: float | None = None,
    min_rounds: int = 3,
) -> Timings:
    """Time every contender once per round, in a shuffled order per round.

    Contenders that raise during warm-up are dropped (their error is kept); the number of
    rounds is cut so that the block stays within ``max_seconds`` (estimated after warm-up),
    but never below ``min_rounds``.
    """
    out = Timings()
    live = dict(fns)
    warm_t: dict[str, float] = {}
    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                warm_t[name] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - a contender may not support this model
            out.errors[name] = (
                f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            )
            del live[name]
    if max_seconds is not None and warm_t:
        per_round = sum(warm_t[n] for n in live)
        rounds = max(min_rounds, min(rounds, int(max_seconds / max(per_round, 1e-9))))
    out.samples = {n: [] for n in live}
    rng = random.Random(seed)
    order = list(live)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            gc.collect(0)
            sync(device)
            t0 = time.perf_counter()
            live[name]()
            sync(device)
            out.samples[name].append(time.perf_counter() - t0)
    out.rounds = rounds
    return out


def advance(
    run: Any,
    end: float,
    device: str,
    width: int = 120,
    after_step: Callable[[Any], None] | None = None,
) -> None:
    """Step ``run`` until its own clock reaches ``end`` (seconds of stepping, synced on CUDA).

    ``run`` has ``step()``, ``clock``, ``steps`` and ``failed``; an error raised by a step marks
    the run failed (a diverging optimizer is a result, not a crash) and ends its stepping.
    ``after_step(run)`` is called after every step, off the clock.
    """
    try:
        while run.clock < end:
            sync(device)
            t0 = time.perf_counter()
            run.step()
            sync(device)
            run.clock += time.perf_counter() - t0
            run.steps += 1
            if after_step is not None:
                after_step(run)
    except Exception as err:  # noqa: BLE001 - a diverging run is a result, not a crash
        run.failed = f"{type(err).__name__}: {str(err)[:width]}"


def quartiles(a: np.ndarray) -> tuple[float, float, float]:
    a = a[np.isfinite(a)]
    if a.size == 0:
        return (math.nan, math.nan, math.nan)
    q1, q2, q3 = np.percentile(a, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def ratio_stats(t: Timings, name: str, ref: str) -> tuple[float, float, float]:
    """Quartiles over rounds of ``t[name] / t[ref]`` measured in the same round."""
    return quartiles(t.arr(name) / t.arr(ref))


# ---------------------------------------------------------------------------------------------
# peak memory (run inside a spawned worker, see module docstring)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def prepare_memory_probe() -> str:
    """Make freed memory leave the resident set (glibc), return a description of the method."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so no dynamic growth
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        return "glibc mmap threshold 64 KiB"
    except OSError:
        return "default malloc"


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_memory(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """``(peak, retained)`` MiB above the level before ``fn()``; ``fn``'s result is kept alive
    until the peak is read (it may hold a graph a product needs)."""
    _trim()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        keep = fn()
        torch.cuda.synchronize()
        peak, now = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        del keep
        return (peak - base) / 2**20, (now - base) / 2**20
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    keep = fn()
    peak, now = _status_kib("VmHWM"), _status_kib("VmRSS")
    del keep
    _trim()
    return (peak - base) / 1024, (now - base) / 1024


def memory_worker(task: Callable[..., dict], args: tuple, queue: Any) -> None:
    """Entry point of the spawned process: set threads and malloc, run ``task(*args)``."""
    try:
        settings = args[0]
        torch.set_num_threads(settings.threads)
        prepare_memory_probe()
        queue.put(("ok", task(*args)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        import traceback

        queue.put(("error", "".join(traceback.format_exception(err))[-2000:]))


def run_in_worker(task: Callable[..., dict], *args: Any, timeout: float = 900) -> dict:
    """Run ``task(*args)`` in a spawned process; its dict result, or ``{'error': text}``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=memory_worker, args=(task, args, queue))
    proc.start()
    import queue as queue_mod

    deadline = time.monotonic() + timeout
    status, value = "error", "worker timed out"
    while time.monotonic() < deadline:
        try:
            status, value = queue.get(timeout=2.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                status, value = "error", f"worker died with exit code {proc.exitcode}"
                break
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    return value if status == "ok" else {"error": value}


# ---------------------------------------------------------------------------------------------
# problems


CURVES_SIZES = [784, 400, 200, 100, 50, 25, 6]


def curves_images(n: int, seed: int) -> Tensor:
    from hessfree.train.data import make_curves

    return make_curves(num_train=n, num_test=1, seed=seed).x_train


def bce_sum_per_case(z: Tensor, t: Tensor) -> Tensor:
    """BCE-with-logits summed over pixels, averaged over cases: as Martens (2010) and
    ``hessfree.train.objectives.make_loss('bce_with_logits', 'sum_per_case')`` write it."""
    return F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]


def teacher_labels(x: Tensor, num_classes: int = 10, seed: int = 1234) -> Tensor:
    """Labels from a fixed random teacher, a 784-100-10 tanh MLP with PyTorch's default init
    (balanced-ish classes; the curves have no generating class)."""
    gen = torch.Generator().manual_seed(seed)
    d = x[0].numel()
    w1 = torch.randn(d, 100, generator=gen) / math.sqrt(d)
    w2 = torch.randn(100, num_classes, generator=gen) / 10.0
    h = torch.tanh((x.flatten(1) - x.flatten(1).mean(0)) @ w1 * 4.0)
    return (h @ w2).argmax(1)


@dataclass
class Problem:
    """One model at one point with one batch, as the product benchmark times it."""

    key: str
    title: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]
    loss_module: nn.Module  # the same loss up to a constant factor, for curvlinops
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(loss, outputs)`` on the batch: the closure every contender starts from."""
        out = self.model(self.x)
        return self.loss(out, self.y), out

    def gradient(self) -> tuple[Tensor, ...]:
        """One gradient of the loss (forward and backward): the unit products are timed in."""
        return torch.autograd.grad(self.forward()[0], self.params)


def make_problem(key: str, device: str, seed: int) -> Problem:
    """``autoencoder`` (a), ``mlp`` (b) or ``cnn`` (c) of the product benchmark."""
    from hessfree.train.models import build_model

    torch.manual_seed(seed)
    if key == "autoencoder":
        x = curves_images(2000, seed)
        model = build_model(
            "autoencoder", input_shape=(1, 28, 28), layer_sizes=CURVES_SIZES, init="sparse"
        )
        y = x.flatten(1)
        prob = Problem(
            key,
            "CURVES autoencoder 784-400-200-100-50-25-6 (+ mirror), batch 2000",
            model,
            x,
            y,
            bce_sum_per_case,
            nn.BCEWithLogitsLoss(reduction="sum"),
            [
                "logistic units, linear code, sparse init (15 per unit); generated CURVES images; "
                "loss BCE-with-logits summed over pixels / cases (curvlinops: `reduction='sum'`, "
                "N times larger, same cost)"
            ],
        )
    elif key == "mlp":
        x = curves_images(1000, seed + 1)
        y = teacher_labels(x)
        model = build_model(
            "mlp",
            input_shape=(1, 28, 28),
            num_outputs=10,
            hidden_sizes=[1000, 500, 250],
            activation="tanh",
        )
        prob = Problem(
            key,
            "MLP 784-1000-500-250-10 (tanh), cross-entropy, batch 1000",
            model,
            x,
            y,
            F.cross_entropy,
            nn.CrossEntropyLoss(),
            [
                "inputs: generated CURVES images; labels: argmax of a fixed random 784-100-10 tanh "
                "teacher; PyTorch default init"
            ],
        )
    elif key == "cnn":
        x = curves_images(256, seed + 2)
        y = teacher_labels(x)
        model = build_model(
            "cnn",
            input_shape=(1, 28, 28),
            num_outputs=10,
            channels=[16, 32],
            hidden_size=64,
            activation="relu",
        )
        prob = Problem(
            key,
            "CNN conv16-pool-conv32-pool-fc64-10 (ReLU), cross-entropy, batch 256",
            model,
            x,
            y,
            F.cross_entropy,
            nn.CrossEntropyLoss(),
            ["3x3 convs, 2x2 max-pool; inputs: generated CURVES images, teacher labels as (b)"],
        )
    else:
        raise ValueError(f"Unknown problem {key!r}.")
    prob.model.to(device)
    prob.x, prob.y = prob.x.to(device), prob.y.to(device)
    return prob


# ---------------------------------------------------------------------------------------------
# markdown


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 2) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.{digits}f}"


def fmt_q(q: tuple[float, float, float], digits: int = 2) -> str:
    """``median [q1–q3]``."""
    return f"{fmt(q[1], digits)} [{fmt(q[0], digits)}–{fmt(q[2], digits)}]"


def fmt_ms(q: tuple[float, float, float]) -> str:
    return f"{q[1] * 1e3:.1f} (IQR {max(q[2] - q[0], 0.0) * 1e3:.1f})"


def verdict(value: float, target: float, *, at_most: bool = True) -> str:
    if not math.isfinite(value):
        return "n/a"
    ok = value <= target if at_most else value >= target
    return "met" if ok else "**missed**"
