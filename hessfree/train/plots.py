"""PNG plots of a run: loss (and the task metric) against training seconds and against steps.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend
switch). Each figure shows every optimizer: train on the left, test on the right, the loss on
the top row and the task metric below.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hessfree.train.checkpoint import atomic_write
from hessfree.train.metrics import read_metrics

__all__ = ["contender_style", "plot_metrics", "plot_run", "phase_switches"]

#: matplotlib's default colour cycle ("tab10"), as its "C0".."C9" name them.
_TAB10 = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_LINESTYLES = ("-", "--", "-.", ":")
#: The golden ratio's fractional part: hues k * it (mod 1) never repeat and spread evenly.
_GOLDEN = 0.6180339887498949


def contender_style(k: int) -> dict[str, Any]:
    """The colour and line style of the ``k``-th contender (from 0, in the config's order).

    The first 40 take matplotlib's 10 default colours with a solid, dashed, dash-dotted, then
    dotted line (a plain cycle gave contenders 0 and 10 the same line); from 40 on the hue is
    :math:`k\\varphi \\bmod 1` (:math:`\\varphi` the golden ratio's fractional part, whose
    multiples never repeat) with the four line styles in turn. A function of ``k`` alone, so a
    contender keeps its line in every figure, panel and resumed run; no two are the same.

    Example:
        >>> contender_style(0), contender_style(10)
        ({'color': '#1f77b4', 'linestyle': '-'}, {'color': '#1f77b4', 'linestyle': '--'})
        >>> len({str(contender_style(k)) for k in range(1000)})
        1000
    """
    if k < len(_TAB10) * len(_LINESTYLES):
        return {"color": _TAB10[k % len(_TAB10)], "linestyle": _LINESTYLES[k // len(_TAB10)]}
    import colorsys  # noqa: PLC0415

    hue = (k * _GOLDEN) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, 0.85 if k % 2 else 0.6, 0.8 if k % 3 else 0.6)
    return {"color": rgb, "linestyle": _LINESTYLES[k % len(_LINESTYLES)]}


def phase_switches(records: Sequence[Mapping[str, Any]], x_key: str) -> list[tuple[float, str]]:
    """Where an entry with ``phases`` switched optimizer: ``(x, name of the next phase)``.

    The runner logs a record at the end of every phase, so the switch is at the last record
    of a phase (``records`` are one optimizer's, in order).

    Example:
        >>> rs = [{"step": 0, "phase": 0}, {"step": 5, "phase": 0},
        ...       {"step": 6, "phase": 1, "phase_name": "hessianfree"}]
        >>> phase_switches(rs, "step")
        [(5, 'hessianfree')]
    """
    out = []
    for prev, cur in zip(records, records[1:], strict=False):
        if "phase" in cur and cur["phase"] != prev.get("phase"):
            out.append((prev[x_key], str(cur.get("phase_name", f"phase {cur['phase']}"))))
    return out


def plot_metrics(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    metric: str | None = None,
    title: str = "",
    diverged: Mapping[str, int] | None = None,
) -> list[Path]:
    """Write ``loss_vs_seconds.png`` and ``loss_vs_steps.png`` from metrics records.

    A diverged optimizer's losses end in ``null`` (not finite), which draws nothing: its line
    would just stop (after one point it is hidden under the others'). Its legend entry says
    where it diverged and a dotted vertical line marks the place; one with no finite value at
    all (diverged at its first evaluation) is listed all the same ("no finite train loss").

    Args:
        records: ``metrics.jsonl`` records.
        out_dir: Where to write the PNGs.
        metric: The task metric (``accuracy``, ...) for the second row; None: loss only.
        title: Figure title.
        diverged: The step at which each diverged optimizer stopped (``summary.json``'s
            ``diverged_at_step``), by label.

    Returns:
        list[Path]: the files written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    # Each optimizer's records once: a long run's 10^5 records were filtered again for every
    # panel of both figures (24 passes for 3 optimizers; experiments/_runner14.py).
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["optimizer"], []).append(r)
    labels = list(by_label)
    diverged = dict(diverged or {})
    rows = [("loss", "loss")] + ([(metric, metric.replace("_", " "))] if metric else [])
    written = []
    for x_key, x_label, name in (
        ("seconds", "training wall-clock (s)", "loss_vs_seconds.png"),
        ("step", "step", "loss_vs_steps.png"),
    ):
        fig = Figure(figsize=(11, 3.6 * len(rows)))
        # Fixed margins: a layout engine costs seconds per figure on a slow machine.
        fig.subplots_adjust(
            left=0.08,
            right=0.98,
            bottom=0.12 / len(rows),
            top=1 - 0.1 / len(rows),
            wspace=0.25,
            hspace=0.3,
        )
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(rows), 2, squeeze=False)
        # Where each diverged optimizer stopped, and where entries switched phase: per figure.
        stops = {
            label: [r[x_key] for r in mine if r["step"] == diverged[label]]
            for label, mine in by_label.items()
            if label in diverged
        }
        switches = {label: phase_switches(mine, x_key) for label, mine in by_label.items()}
        for row, (key, y_label) in enumerate(rows):
            for col, split in enumerate(("train", "test")):
                ax = axes[row][col]
                positive = True
                for k, label in enumerate(labels):
                    points = [(r[x_key], r.get(f"{split}_{key}")) for r in by_label[label]]
                    points = [(x, y) for x, y in points if isinstance(y, (int, float))]
                    shown = label
                    if label in diverged:
                        shown = f"{label} (diverged at step {diverged[label]})"
                    if points:
                        xs, ys = zip(*points, strict=True)
                        (line,) = ax.plot(
                            xs,
                            ys,
                            marker="." if len(xs) < 60 else None,
                            label=shown,
                            **contender_style(k),
                        )
                        at = stops.get(label)
                        if at:
                            ax.axvline(at[-1], color=line.get_color(), linestyle=":", alpha=0.8)
                        positive &= min(ys) > 0
                        # an entry with phases: a dashed vertical line where it switched
                        for x, phase in switches[label]:
                            ax.axvline(x, color=line.get_color(), linestyle="--", alpha=0.6)
                            ax.annotate(
                                f"→ {phase}",
                                (x, 1.0),
                                xycoords=("data", "axes fraction"),
                                xytext=(3, -12 - 10 * k),  # one row per optimizer
                                textcoords="offset points",
                                fontsize="x-small",
                                color=line.get_color(),
                            )
                    else:
                        # nothing finite (diverged at its first evaluation): it would vanish
                        # from the panel and its legend; listed, with its dotted stop line
                        (line,) = ax.plot(
                            [],
                            [],
                            label=f"{shown}: no finite {split} {y_label}",
                            **contender_style(k),
                        )
                        at = stops.get(label)
                        if at:
                            ax.axvline(at[-1], color=line.get_color(), linestyle=":", alpha=0.8)
                if key == "loss" and positive and records:
                    ax.set_yscale("log")
                ax.set_xlabel(x_label)
                ax.set_ylabel(f"{split} {y_label}")
                ax.grid(True, alpha=0.3)
                if labels:
                    ax.legend(fontsize="small")
        if title:
            fig.suptitle(title)
        # atomically: a run killed while plotting keeps the previous PNG, never half of one
        with warnings.catch_warnings():
            # a title (the run directory's name) in a script the font lacks, e.g. CJK: drawn
            # as boxes, and matplotlib warns once per glyph per figure on stderr
            warnings.filterwarnings("ignore", r"Glyph \d+ .* missing from font", UserWarning)
            atomic_write(out_dir / name, lambda f, fig=fig: fig.savefig(f, dpi=100, format="png"))
        written.append(out_dir / name)
    return written


def plot_run(run_dir: str | Path) -> list[Path]:
    """Plot a run directory's ``metrics.jsonl`` next to it (metric name from ``summary.json``)."""
    run_dir = Path(run_dir)
    metric, diverged = None, {}
    summary = run_dir / "summary.json"
    if summary.exists():
        content = json.loads(summary.read_text())
        metric = content.get("metric")
        diverged = {
            label: entry["diverged_at_step"]
            for label, entry in content.get("optimizers", {}).items()
            if isinstance(entry.get("diverged_at_step"), int)
        }
    return plot_metrics(
        read_metrics(run_dir / "metrics.jsonl"),
        run_dir,
        metric=metric,
        title=run_dir.name,
        diverged=diverged,
    )
