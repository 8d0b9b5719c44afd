"""runner14 study: `hessfree run` metrics at 10^5 records (summary, table, plots).

``scale [ROWS]``: writes a run directory's ``metrics.jsonl`` with ``ROWS`` evaluation records
over three contenders (the fields a real run writes), then times :func:`read_metrics`,
:func:`summarize`, :func:`format_table` and :func:`plot_run` on it, 1 thread.
``plots MAIN_PLOTS_PY [ROWS]``: :func:`plot_metrics` of this checkout against another copy of
``plots.py`` (main's), interleaved in one process, 1 warm-up + 3 rounds, and whether their PNGs
are byte-equal. Usage: ``PYTHONPATH=. python3 experiments/_runner14.py scale``; each prints
the load average first.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from hessfree.train.metrics import format_table, read_metrics, summarize
from hessfree.train.plots import plot_run


def _write(run_dir: Path, rows: int) -> None:
    labels = ("hf", "adam", "sgd")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i in range(rows):
            label, step = labels[i % 3], i // 3
            loss = 1.0 / (1 + step) + 0.01 * math.sin(step)
            f.write(
                json.dumps(
                    {
                        "optimizer": label,
                        "step": step,
                        "epoch": step / 10,
                        "seconds": step * 0.01,
                        "batch_loss": None if step == 0 else loss,
                        "train_loss": loss,
                        "test_loss": loss * 1.1,
                        "train_accuracy": 1 - loss,
                        "test_accuracy": 1 - 1.1 * loss,
                    }
                )
                + "\n"
            )


def _plots(other: str, rows: int) -> None:
    """This checkout's plot_metrics against ``other`` (a plots.py), interleaved."""
    import importlib.util
    import statistics

    from hessfree.train import plots as ours

    spec = importlib.util.spec_from_file_location("_other_plots", other)
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write(root, rows)
        records = read_metrics(root / "metrics.jsonl")
        times: dict[str, list[float]] = {"main": [], "branch": []}
        for rnd in range(4):  # round 0 warms up (imports, font cache)
            for name, module in (("main", theirs), ("branch", ours)):
                out = root / name
                out.mkdir(exist_ok=True)
                t0 = time.perf_counter()
                module.plot_metrics(
                    records, out, metric="accuracy", title="big", diverged={"sgd": rows // 3 - 1}
                )
                if rnd:
                    times[name].append(time.perf_counter() - t0)
        same = all(
            (root / "main" / f).read_bytes() == (root / "branch" / f).read_bytes()
            for f in ("loss_vs_seconds.png", "loss_vs_steps.png")
        )
        ratios = [b / m for m, b in zip(times["main"], times["branch"], strict=True)]
        print(
            f"{rows} records: main {statistics.median(times['main']):.2f} s, branch "
            f"{statistics.median(times['branch']):.2f} s (medians of 3), median ratio "
            f"{statistics.median(ratios):.2f}; PNGs byte-equal: {same}"
        )


def main() -> None:
    torch.set_num_threads(1)
    print("load:", os.getloadavg())
    if sys.argv[1:2] == ["plots"]:
        _plots(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 100_000)
        return
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        _write(run_dir, rows)
        outcomes = {
            label: {
                "name": label,
                "stop_reason": "steps",
                "steps": rows // 3,
                "epochs": 1.0,
                "seconds": 1.0,
                "diverged_at_step": None,
                "checkpoint_step": rows // 3,
            }
            for label in ("hf", "adam", "sgd")
        }
        t0 = time.perf_counter()
        records = read_metrics(run_dir / "metrics.jsonl")
        t1 = time.perf_counter()
        summary = summarize(
            records,
            outcomes,
            metric="accuracy",
            higher_is_better=True,
            name="big",
            status="completed",
        )
        t2 = time.perf_counter()
        format_table(summary)
        t3 = time.perf_counter()
        (run_dir / "summary.json").write_text(json.dumps(summary))
        plot_run(run_dir)
        t4 = time.perf_counter()
        size = (run_dir / "metrics.jsonl").stat().st_size
        print(
            f"{rows} records, {size / 1e6:.1f} MB: read {t1 - t0:.2f} s, summarize "
            f"{t2 - t1:.2f} s, table {t3 - t2:.3f} s, plots {t4 - t3:.2f} s"
        )


if __name__ == "__main__":
    main()
