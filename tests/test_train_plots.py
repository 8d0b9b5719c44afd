"""Run plots: written atomically (a failure mid-write keeps the previous PNG)."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from hessfree.train.plots import plot_metrics

RECORDS = [
    {
        "optimizer": "adam",
        "step": s,
        "seconds": 0.1 * s,
        "train_loss": 1.0 / (s + 1),
        "test_loss": 1.2 / (s + 1),
    }
    for s in range(4)
]


def test_a_plot_interrupted_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    written = plot_metrics(RECORDS, tmp_path)
    assert {p.name for p in written} == {"loss_vs_seconds.png", "loss_vs_steps.png"}
    before = {p.name: p.read_bytes() for p in written}
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in before.values())

    def half_then_fail(self, f, **kwargs):
        f.write(b"\x89PNG half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C while matplotlib writes

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        plot_metrics(RECORDS[:2], tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries
