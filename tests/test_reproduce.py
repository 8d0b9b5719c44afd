"""Smoke run of ``experiments/reproduce.py``: both experiments with a tiny budget, one report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_quick_writes_report_and_plots(tmp_path):
    report = tmp_path / "report" / "reproductions.md"
    cmd = [
        sys.executable,
        str(REPO / "experiments" / "reproduce.py"),
        "--quick",
        "--curves-seconds=1",
        "--addition-seconds=1",
        "--lengths",
        "8",
        "--out",
        str(tmp_path / "runs"),
        "--report",
        str(report),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = report.read_text()
    for needle in (
        "## 1. Deep autoencoder",
        "## 2. Pathological",
        "| hessianfree |",
        "| adam |",
        "| sgd-momentum |",
        "torch ",
        "T = 8",
        "largest T solved",
    ):
        assert needle in text, needle
    for png in ("reproductions_curves.png", "reproductions_addition.png"):
        assert (report.parent / png).stat().st_size > 1000, png
    for run in ("curves", "addition-T8"):
        assert (tmp_path / "runs" / run / "summary.json").exists(), run
