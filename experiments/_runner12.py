"""runner12: what the runner's divergence guard costs per step (``cost``), and the CLI probes of
the runner12 audit (``probes``). Usage::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_runner12.py cost
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python3 experiments/_runner12.py probes

``cost``: an Adam step (the cheapest step the runner takes, so the largest relative overhead)
on the quickstart MLP (64-64-10, batch 64) and on the CURVES autoencoder's layer sizes
(784-400-200-100-50-25-6 and back, batch 250), with and without what the guard adds to a step:
a copy of the model's state before it and a finiteness check of every floating entry after it
(``hessfree.train.loop._LastFinite``). Contenders interleaved in one process, one thread,
20 warm-up rounds, medians of 300 (small) / 60 (large) rounds; ``uptime``'s load printed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch


def _mlp(sizes: list[int]) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _time_case(model: torch.nn.Module, batch: int, classes: int | None, rounds: int) -> tuple:
    """Median step time without and with the guard, and the median per-round ratio."""
    from hessfree.train.loop import _LastFinite

    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, model[0].in_features)
    t = torch.randint(0, classes, (batch,)) if classes else x
    before = _LastFinite(model)

    def plain() -> None:
        opt.zero_grad()
        out = model(x)
        loss = (
            torch.nn.functional.cross_entropy(out, t)
            if classes
            else torch.nn.functional.mse_loss(out, t)
        )
        loss.backward()
        opt.step()

    def guarded() -> None:
        before.keep()
        plain()
        assert before.now_finite()

    times: dict[str, list[float]] = {"plain": [], "guarded": []}
    for r in range(rounds + 20):
        order = [("plain", plain), ("guarded", guarded)]
        for key, fn in order if r % 2 else order[::-1]:
            start = time.perf_counter()
            fn()
            if r >= 20:
                times[key].append(time.perf_counter() - start)
    ratios = [g / p for g, p in zip(times["guarded"], times["plain"], strict=True)]
    return (
        statistics.median(times["plain"]),
        statistics.median(times["guarded"]),
        statistics.median(ratios),
    )


def cost() -> None:
    torch.set_num_threads(1)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    enc = [784, 400, 200, 100, 50, 25, 6]
    cases = {
        "quickstart MLP 64-64-10, batch 64": (_mlp([64, 64, 10]), 64, 10, 300),
        "CURVES autoencoder sizes, batch 250": (_mlp(enc + enc[-2::-1]), 250, None, 60),
    }
    print("| model | params | step (ms) | step + guard (ms) | ratio (median of per-round) |")
    print("|---|---|---|---|---|")
    for name, (model, batch, classes, rounds) in cases.items():
        plain, guarded, ratio = _time_case(model, batch, classes, rounds)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params:,} | {1e3 * plain:.3f} | {1e3 * guarded:.3f} | {ratio:.3f} |")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


def probes() -> None:
    """Each case through the real CLI (``python -m hessfree run``): exit status, first line."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="runner12-"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    np.savez(tmp / "d.npz", x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    base = {
        "name": "p",
        "num_threads": 1,
        "data": {"name": "npz", "path": str(tmp / "d.npz")},
        "loss": {"name": "cross_entropy"},
        "model": {"name": "mlp", "hidden_sizes": [4]},
        "optimizers": [{"name": "adam"}, {"name": "sgd", "lr": 0.1}],
        "budget": {"steps": 2},
        "batch_size": 16,
        "output": {"plots": False, "dir": str(tmp / "runs")},
    }
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    merged = yaml.safe_dump({k: v for k, v in base.items() if k != "optimizers"}) + (
        "optimizers:\n  - &a {name: adam, lr: 0.01}\n  - {<<: *a, name: sgd, lr: 0.1}\n"
    )
    (tmp / "merge.yaml").write_text(merged)
    cases = {
        "label '../x'": ["base.yaml", "optimizers.0.label=../x", "--check"],
        "label no (YAML 1.1 bool)": ["base.yaml", "optimizers.0.label=no", "--check"],
        "name 'a/b'": ["base.yaml", "name=a/b", "--check"],
        "lr 1e400": ["base.yaml", "optimizers.0.lr=1e400", "--check"],
        "budget.steps 1e400": ["base.yaml", "budget.steps=1e400", "--check"],
        "lr -.inf": ["base.yaml", "optimizers.0.lr=-.inf", "--check"],
        "merge key, own key overrides": ["merge.yaml", "--check"],
        "two configs": ["base.yaml", "merge.yaml"],
    }
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    print("| case | exit | first line of stderr |")
    print("|---|---|---|")
    for name, argv in cases.items():
        done = subprocess.run(
            [sys.executable, "-m", "hessfree", "run", *argv, "--quiet"],
            cwd=tmp,
            capture_output=True,
            text=True,
            env=env,
        )
        first = (done.stderr.strip().splitlines() or [""])[0][:320].replace("|", "\\|")
        print(f"| {name} | {done.returncode} | {first} |")


if __name__ == "__main__":
    {"cost": cost, "probes": probes}[sys.argv[1]]()
