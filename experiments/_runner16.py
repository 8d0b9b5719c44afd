"""runner16 study: `hessfree run` on config files and arguments no earlier round tried.

``probes``: for each case, the exit status and stderr (lines joined by ' / ') of ``hessfree run ...
--check`` (in-process, on a tiny npz config), run against the package on ``PYTHONPATH`` (this
checkout, or ``/work/main`` for main's behaviour). Usage:
``OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_runner16.py probes``; prints the
load average first. The checkpoint note, SIGHUP and plot cases need a run or a figure; they
are in ``tests/test_runner16.py``.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml


def _tiny(root: Path) -> Path:
    """A 3-step, 2-contender config on a 240-case npz file (seeded)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((240, 6)).astype(np.float32)
    np.savez(root / "tiny.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    raw = {
        "num_threads": 1,
        "data": {"name": "npz", "path": str(root / "tiny.npz")},
        "model": {"name": "mlp", "hidden_sizes": [4]},
        "loss": {"name": "cross_entropy"},
        "optimizers": [{"name": "adam", "lr": 0.01}, {"name": "sgd", "lr": 0.1}],
        "budget": {"steps": 3},
        "batch_size": 16,
        "output": {"plots": False, "dir": str(root / "runs")},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cases(root: Path, config: Path) -> dict[str, list[str]]:
    text = config.read_text()

    def file(name: str, content: str | bytes) -> str:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    (root / "afile").write_text("x")
    return {
        "file '.yaml' (name from the stem)": [file(".yaml", text)],
        "UTF-8 with a BOM": [file("bom.yaml", codecs.BOM_UTF8 + text.encode())],
        "UTF-16 with its BOM": [file("u16.yaml", text.encode("utf-16"))],
        "UTF-16 without a BOM": [file("u16n.yaml", text.encode("utf-16-le"))],
        "UTF-32 with its BOM": [file("u32.yaml", text.encode("utf-32"))],
        "a tab in the indentation": [file("tab.yaml", text.replace("  ", "\t", 1))],
        "an empty file": [file("empty.yaml", "")],
        "a YAML list": [file("list.yaml", "- a\n- b\n")],
        "two documents": [file("docs.yaml", text + "---\nseed: 3\n")],
        "!include": [file("inc.yaml", text + "x-other: !include other.yaml\n")],
        "seed: 2**64": [file("seed.yaml", text + "seed: 2**64\n")],
        "steps: 1e400": [str(config), "budget.steps=1e400"],
        "lr: -0.0": [str(config), "optimizers.0.lr=-0.0"],
        "the same label twice": [str(config), "optimizers.1.name=adam", "optimizers.1.lr=0.01"],
        "--out a file": [str(config), "--out", str(root / "afile")],
        '--out ""': [str(config), "--out", ""],
        'CONFIG ""': [""],
        "a directory as CONFIG": [str(root)],
        "two CONFIGs": [str(config), str(config)],
    }


def _probe(argv: list[str]) -> tuple[object, str]:
    from hessfree.train.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code: object = main(["run", *argv, "--check"])
        except SystemExit as exit_:
            code = exit_.code
    return code, " / ".join(line.strip() for line in err.getvalue().strip().splitlines())


def probes() -> None:
    import torch

    torch.set_num_threads(1)
    where = Path(sys.modules["hessfree"].__file__).parent
    print(f"load average {os.getloadavg()}; hessfree from {where}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = _tiny(root)
        for name, argv in _cases(root, config).items():
            code, last = _probe(argv)
            shown = last.replace(tmp, "<tmp>").replace("|", "\\|")[:400]  # a table cell
            print(f"| {name} | {code} | {shown} |")


if __name__ == "__main__":
    import hessfree  # noqa: F401 -- the package on PYTHONPATH, named in the first line

    if sys.argv[1:] != ["probes"]:
        sys.exit("usage: python3 experiments/_runner16.py probes")
    probes()
