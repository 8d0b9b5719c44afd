"""Reproduce two Hessian-free results at CPU scale with the experiment runner, and report.

1. Martens (2010), §6: the CURVES deep autoencoder trained without pre-training,
   HF against Adam and SGD with momentum at equal wall-clock budgets
   (``configs/curves_autoencoder.yaml``); squared reconstruction error per case against time.
2. Martens & Sutskever (2011), §5: the addition problem for a 100-unit tanh RNN, HF with
   structural damping against Adam at several sequence lengths T
   (``configs/rnn_addition.yaml`` with ``data.length=T``); the largest T each solves
   (test ``error_rate`` <= 0.01: 99% of cases within 0.04) within the budget.

Every training run is ``python -m hessfree run CONFIG [overrides] --out DIR`` in a subprocess;
this script only chooses overrides, reads ``summary.json``/``metrics.jsonl`` and writes
``reproductions.md`` with its PNGs (``reproductions_*.png``)::

    python experiments/reproduce.py            # ~40 min on 2 CPU cores -> experiments/results/
    python experiments/reproduce.py --quick    # ~2.5 min; report next to the runs
    python experiments/reproduce.py --report-only runs/reproduce/20250101-120000

Run directories go to ``runs/reproduce/<timestamp>/`` (git-ignored) unless ``--out`` says.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import save_png, save_text  # noqa: E402

from hessfree.train.loop import EXIT_DIVERGED  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CURVES_CONFIG = REPO / "configs" / "curves_autoencoder.yaml"
ADDITION_CONFIG = REPO / "configs" / "rnn_addition.yaml"
SOLVED = 0.01  # addition: solved when at most 1% of test cases are off by more than 0.04
FLOOR = 1e-3  # addition plots: where an error rate of 0 is drawn

# Training squared error per case on the original CURVES (Sutskever et al. 2013, Table 1;
# the HF entry is Martens 2010's result). Budgets there are far larger than here.
PAPER_CURVES = {"hessianfree": 0.11, "sgd": 0.074}
PAPER_CURVES_PLAIN_SGD = 0.48

# name: (overrides of the curves config, seconds per addition run, lengths)
MODES: dict[str, dict[str, Any]] = {
    "full": {"curves": [], "addition_seconds": 210.0, "lengths": (30, 50, 80)},
    "quick": {
        "curves": [
            "data.num_train=2000",
            "data.num_test=1000",
            # the HF row's third phase starts at 2,978 cases, capped at 4,000: scaled to 2,000
            "optimizers.0.phases.2.batch_size=1000",
            "optimizers.0.phases.2.batch_max=2000",
            "budget.seconds=20",
            "eval.every_seconds=2",
        ],
        "addition_seconds": 15.0,
        "lengths": (30,),
    },
}


# ------------------------------------------------------------------------------------ running
def run(config: Path, out: Path, overrides: list[str]) -> None:
    """Train one config with the ``hessfree`` CLI; raise if it does not complete."""
    cmd = [sys.executable, "-m", "hessfree", "run", str(config), *overrides]
    cmd += ["--out", str(out), "--no-progress", "--quiet"]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, check=False)
    if done.returncode == EXIT_DIVERGED:  # a contender that blew up is a result to report
        print("  completed; an optimizer diverged (summary.json: diverged)", flush=True)
    elif done.returncode != 0:
        raise SystemExit(f"reproduce: `{' '.join(cmd[1:])}` exited with {done.returncode}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``summary.json`` and the ``metrics.jsonl`` records of a run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return summary, [json.loads(line) for line in lines if line.strip()]


def first_reaching(records: list[dict], label: str, key: str, threshold: float) -> dict | None:
    """The first evaluation of ``label`` with ``key`` <= ``threshold``, or None."""
    for r in records:
        if r["optimizer"] == label and isinstance(r.get(key), (int, float)):
            if r[key] <= threshold:
                return r
    return None


def busy_cores(seconds: float = 2.0) -> float | None:
    """Cores kept busy by other processes while this script sleeps (from /proc/stat), or None."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (busy1 - busy0) / max(1, total1 - total0)


def machine() -> dict[str, str]:
    """CPU model, usable cores, load, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from importlib.metadata import version

        hf_version = version("hessfree")
    except Exception:  # not installed: running from a checkout
        hf_version = "unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {
        "CPU": f"{cpu}, {cores} usable cores ({os.cpu_count()} logical CPUs)",
        "Software": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"hessfree {hf_version}, {platform.system()} {platform.release()}",
        "Load average at the start (1, 5, 15 min)": load,
    }


# ------------------------------------------------------------------------------------ plots
def _figure(ncols: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.86, wspace=0.28)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_curves(records: list[dict], path: Path) -> None:
    """Train and test squared error per case against training seconds, log scale."""
    fig, axes = _figure(2)
    labels = list(dict.fromkeys(r["optimizer"] for r in records))
    for ax, split in zip(axes, ("train", "test"), strict=True):
        for label in labels:
            pts = [
                (r["seconds"], r[f"{split}_squared_error"])
                for r in records
                if r["optimizer"] == label and r.get(f"{split}_squared_error") is not None
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label)
        if split == "train":
            for (name, value), dy in zip(PAPER_CURVES.items(), (2, -9), strict=True):
                ax.axhline(value, ls=":", lw=1, color="grey")
                ax.annotate(
                    f"paper's {name}: {value} (original CURVES)",
                    (0, value),
                    fontsize=7,
                    color="grey",
                    xytext=(2, dy),
                    textcoords="offset points",
                )
        ax.set_yscale("log")
        ax.set(xlabel="training wall-clock (s)", ylabel=f"{split} squared error per case")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("CURVES autoencoder (re-created data): squared reconstruction error")
    save_png(fig, path, dpi=100)


def plot_addition(runs: dict[int, list[dict]], path: Path) -> None:
    """Test error rate against training seconds, one panel per sequence length."""
    fig, axes = _figure(len(runs), width=max(4.0, 9.0 / len(runs)))
    for ax, (length, records) in zip(axes, sorted(runs.items()), strict=True):
        for label in dict.fromkeys(r["optimizer"] for r in records):
            # 0 (every test case right) cannot sit on a log axis: draw it at FLOOR
            pts = [
                (r["seconds"], max(r["test_error_rate"], FLOOR))
                for r in records
                if r["optimizer"] == label
            ]
            ax.plot(*zip(*pts, strict=True), label=label)
        ax.axhline(SOLVED, ls=":", color="grey", lw=1)
        ax.set_yscale("log")
        ax.set_ylim(FLOOR / 1.5, 1.1)
        ax.set(
            title=f"T = {length}",
            xlabel="training wall-clock (s)",
            ylabel=f"test error rate (0 drawn at {FLOOR:g})",
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Addition problem, 100-unit tanh RNN: test cases off by > 0.04")
    save_png(fig, path, dpi=100)


# ------------------------------------------------------------------------------------ report
def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _single_name(name: str) -> str:
    """An entry's optimizer name; a phased entry's (``hessianfree+hessianfree``) when every
    phase is the same optimizer, else the joined names (no paper value).

    >>> _single_name("hessianfree+hessianfree"), _single_name("adam+hessianfree")
    ('hessianfree', 'adam+hessianfree')
    """
    names = set(name.split("+"))
    return names.pop() if len(names) == 1 else name


def curves_section(base: Path, report_dir: Path, quick: bool) -> list[str]:
    run_dir = base / "curves"
    summary, records = load_run(run_dir)
    plot_curves(records, report_dir / "reproductions_curves.png")
    config = (run_dir / "config.yaml").read_text()
    rows, finals = [], {}
    for label, entry in summary["optimizers"].items():
        final = entry["final"] or {}
        best = (entry["best"] or {}).get("test_squared_error") or {}
        finals[label] = final
        rows.append(
            [
                label,
                str(final.get("step")),
                _num(final.get("epoch"), 3),
                _num(entry.get("seconds"), 4),
                _num(final.get("train_squared_error")),
                _num(final.get("test_squared_error")),
                f"{_num(best.get('value'))} @ {_num(best.get('seconds'), 3)} s",
                _num(PAPER_CURVES.get(_single_name(entry["name"]))),
            ]
        )
    ranked = sorted(finals, key=lambda k: finals[k].get("train_squared_error") or float("inf"))
    text = ", ".join(
        f"{k} {_num(finals[k].get('train_squared_error'))} "
        f"(test {_num(finals[k].get('test_squared_error'))})"
        for k in ranked
    )
    lines = [
        "## 1. Deep autoencoder without pre-training (Martens 2010, §6)",
        "",
        "CURVES autoencoder 784-400-200-100-50-25-6 (mirrored decoder, logistic units, linear "
        "6-unit code, logistic outputs with cross-entropy summed over pixels, L2 2e-5 (1e-4 in "
        "HF's third phase and the `adam-l2-1e-4` row), sparse initialisation), every optimizer "
        "from the same initial weights for the same wall-clock budget. Error: squared "
        "reconstruction error per case (sum over the 784 pixels, mean over cases: the paper's "
        "measure) on the first `eval.max_cases` training and test images.",
        "",
        *_table(
            [
                "optimizer",
                "steps",
                "epochs",
                "train s",
                "train error",
                "test error",
                "best test error @ time",
                "paper (train)",
            ],
            rows,
        ),
        "",
        "![squared error against time](reproductions_curves.png)",
        "",
        f"**Lowest final training error first:** {text}. "
        f"Martens (2010)'s HF reached {PAPER_CURVES['hessianfree']} on the original CURVES, and "
        f"Sutskever et al. (2013, Table 1) list well-tuned momentum SGD at {PAPER_CURVES['sgd']} "
        f"and plain SGD at {PAPER_CURVES_PLAIN_SGD}, with far larger budgets (HF: gradients on "
        "the whole training set, up to 250 CG iterations per step, many epochs). Here the data "
        "is a generated re-creation of CURVES (`make_curves`, not the original file) and each "
        "optimizer gets minutes on a small CPU, so these numbers compare the optimizers with each "
        "other at this budget; they are neither a reproduction of the paper's values nor a claim "
        "about where the curves end.",
    ]
    if quick:
        lines += [
            "",
            "*Quick mode: 2,000 training images and a budget of seconds (see the config).*",
        ]
    return lines + _config_block("resolved config", config)


def addition_section(base: Path, report_dir: Path) -> list[str]:
    runs = sorted((int(p.name.split("-T")[1]), p) for p in base.glob("addition-T*") if p.is_dir())
    curves: dict[int, list[dict]] = {}
    table: dict[str, dict[int, str]] = {}
    solved: dict[str, int | None] = {}
    budget = None
    for length, run_dir in runs:
        summary, records = load_run(run_dir)
        curves[length] = records
        for label, entry in summary["optimizers"].items():
            final = entry["final"] or {}
            budget = budget or entry.get("seconds")
            hit = first_reaching(records, label, "test_error_rate", SOLVED)
            cell = f"{_num(final.get('test_error_rate'), 2)} ({entry.get('steps')} steps"
            cell += f"; ≤ {SOLVED} at {hit['seconds']:.0f} s)" if hit else ")"
            table.setdefault(label, {})[length] = cell
            solved.setdefault(label, None)
            if hit is not None:
                solved[label] = max(solved[label] or 0, length)
    if not runs:
        return []
    plot_addition(curves, report_dir / "reproductions_addition.png")
    lengths = [length for length, _ in runs]
    rows = [
        [label]
        + [cells.get(t, "–") for t in lengths]
        + [f"T = {solved[label]}" if solved[label] else "none"]
        for label, cells in table.items()
    ]
    config = (runs[0][1] / "config.yaml").read_text()
    return [
        "## 2. Pathological long-term dependencies (Martens & Sutskever 2011, §5)",
        "",
        "The addition problem: a 100-unit tanh RNN reads a value channel and a marker channel "
        "for T steps and must output the sum of the two marked values at the end (first marker "
        "in the first 10% of the sequence, second in the first half). A case is an error when "
        "the prediction is off by more than 0.04; a length counts as **solved** when the test "
        f"error rate reaches ≤ {SOLVED} (99% of 1,000 test cases correct) within the budget. HF "
        "uses structural damping μ = 0.03; both optimizers get the same wall-clock budget "
        f"(about {_num(budget, 3)} s of training) at each T, from the same initial weights.",
        "",
        "Final test error rate per length (optimizer steps taken; training time when the "
        "error rate first reached the threshold):",
        "",
        *_table(["optimizer"] + [f"T = {t}" for t in lengths] + ["largest T solved"], rows),
        "",
        "![test error rate against time](reproductions_addition.png)",
        "",
        "Martens & Sutskever (2011) train with fresh sequences every step and far larger "
        "budgets, and report HF with structural damping solving the addition problem at "
        "lengths where gradient descent fails. Here the training set is a fixed 10,000 "
        "sequences and each run gets minutes on one CPU thread, so a failure below means "
        "*not within this budget*, not *impossible for the optimizer*; solved lengths are "
        "evidence, unsolved ones are not.",
    ] + _config_block(f"resolved config (T = {lengths[0]})", config)


def write_report(base: Path, report: Path, quick: bool, info: dict[str, str], argv: str) -> None:
    report.parent.mkdir(parents=True, exist_ok=True)
    head = [
        "# Reproductions: Martens (2010) and Martens & Sutskever (2011) at CPU scale",
        "",
        f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by `python experiments/reproduce.py"
        f"{' ' + argv if argv else ''}` ({'quick' if quick else 'full'} mode); run directories "
        f"under `{base.relative_to(REPO) if base.is_relative_to(REPO) else base}`.",
        "",
        *_table(["machine", ""], [[k, v] for k, v in info.items()]),
        "",
        "Budgets are wall-clock seconds of training (evaluation excluded), so the results depend "
        "on the machine and on whatever else runs on it; rerun this script to compare versions.",
        "",
    ]
    body: list[str] = []
    if (base / "curves" / "summary.json").exists():
        body += curves_section(base, report.parent, quick)
    body += addition_section(base, report.parent)
    save_text(report, "\n".join(head + body))
    print(f"report: {report}")


# ------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small data and budgets (~2.5 min)")
    p.add_argument(
        "--out",
        type=Path,
        help="parent of the run directories (default runs/reproduce/<timestamp>[-quick])",
    )
    p.add_argument(
        "--report",
        type=Path,
        help="report path (default: "
        "experiments/results/reproductions.md; with --quick, <out>/reproductions.md)",
    )
    p.add_argument("--only", choices=("curves", "addition"), help="run one of the two")
    p.add_argument("--lengths", type=int, nargs="+", help="addition sequence lengths")
    p.add_argument("--curves-seconds", type=float, help="override the curves budget")
    p.add_argument("--addition-seconds", type=float, help="budget per optimizer and length")
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="DIR",
        help="rewrite the report from the run directories in DIR, train nothing",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}{'-quick' if args.quick else ''}"
    base = (args.report_only or args.out or REPO / "runs" / "reproduce" / stamp).resolve()
    report = args.report or (
        base / "reproductions.md" if args.quick else REPO / "experiments/results/reproductions.md"
    )
    info = machine()
    samples: list[float] = []

    def other_load() -> None:  # between runs: what else keeps the CPU busy
        value = busy_cores()
        if value is not None:
            samples.append(value)

    if args.report_only is None:
        base.mkdir(parents=True, exist_ok=True)
        other_load()
        if args.only in (None, "curves"):
            overrides = list(mode["curves"])
            if args.curves_seconds is not None:
                overrides.append(f"budget.seconds={args.curves_seconds}")
            run(CURVES_CONFIG, base / "curves", overrides)
            other_load()
        if args.only in (None, "addition"):
            seconds = args.addition_seconds or mode["addition_seconds"]
            for length in args.lengths or mode["lengths"]:
                overrides = [f"data.length={length}", f"budget.seconds={seconds}"]
                run(ADDITION_CONFIG, base / f"addition-T{length}", overrides)
                other_load()
        if samples:
            info["Other processes (cores busy between runs)"] = (
                f"mean {sum(samples) / len(samples):.2f}, max {max(samples):.2f} "
                f"({len(samples)} samples of 2 s)"
            )
            if max(samples) > 0.5:
                info["Warning"] = (
                    "other processes used the CPU during the runs: wall-clock budgets bought "
                    "less training than on an idle machine, and multi-threaded runs suffer most"
                )
        save_text(base / "machine.json", json.dumps(info, indent=1))
    elif (base / "machine.json").exists():  # the machine the runs were made on
        info = json.loads((base / "machine.json").read_text())
    write_report(base, report, args.quick, info, " ".join(sys.argv[1:] if argv is None else argv))
    return 0


def _config_block(title: str, config: str) -> list[str]:
    """A collapsed markdown block holding a resolved YAML config."""
    return [
        "",
        f"<details><summary>{title}</summary>",
        "",
        "```yaml",
        config.rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
