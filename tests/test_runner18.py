"""runner18: `hessfree run` against what users do to it next (experiments/README.md, runner18).

An L-BFGS step that no budget could end (``max_iter`` at 2**63 - 1) and the signals during it,
...
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from test_train_robust import refused, write_tiny

from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.cli import main
from hessfree.train.parallel import Group
from hessfree.train.stepping import _lbfgs_step

REPO = Path(__file__).resolve().parents[1]
_INT64_MAX = 2**63 - 1


# -- an L-BFGS step ended at an evaluation ---------------------------------------------------


class _MeanSquare:
    def loss(self, outputs, targets):
        return ((outputs - targets) ** 2).mean()


def _lbfgs(max_iter: int, line_search_fn: str | None):
    """A float64 MLP on fixed data and an L-BFGS with tolerances that never stop it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        max_iter=max_iter,
        max_eval=_INT64_MAX,  # not max_iter's 5/4: the cut and the reference share it
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=4,
        line_search_fn=line_search_fn,
    )
    return model, optimizer, (x, y)


def _step(max_iter: int, line_search_fn: str | None = None, cut_at: int | None = None):
    """One runner L-BFGS step; ``cut_at``: cut() says True from its ``cut_at``-th question."""
    model, optimizer, batch = _lbfgs(max_iter, line_search_fn)
    asked = []

    def cut() -> bool:
        asked.append(1)
        return len(asked) >= cut_at

    loss = _lbfgs_step(
        optimizer, model, _MeanSquare(), Group(), batch, None if cut_at is None else cut
    )
    params = [p.detach().clone() for p in model.parameters()]
    return loss, params, optimizer.state[optimizer._params[0]]


_HISTORY = ("d", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")


def _same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("k", [1, 2, 7])
def test_runner18_lbfgs_cut_is_the_step_of_that_many_iterations(k):
    """Fails on main (``_lbfgs_step`` takes no cut). A step of ``max_iter`` 2**63 - 1 ended at
    the evaluation of iteration ``k`` leaves bitwise the weights and L-BFGS state of a step
    with ``max_iter: k`` (torch's own step as the oracle), but ``func_evals``, which counts the
    skipped evaluation; its loss is the first evaluation's, as the uncut step's."""
    loss, params, state = _step(_INT64_MAX, cut_at=k)
    want_loss, want_params, want = _step(k)
    assert loss == want_loss
    assert all(torch.equal(p, q) for p, q in zip(params, want_params, strict=True))
    for key in (*_HISTORY, "t", "n_iter"):
        assert _same(state[key], want[key]), key
    assert state["n_iter"] == k and state["func_evals"] == want["func_evals"] + 1


@pytest.mark.parametrize("cut_at", [1, 2, 6, 15])
def test_runner18_lbfgs_cut_in_a_line_search_accepts_its_trial_point(cut_at):
    """Fails on main. With ``line_search_fn: strong_wolfe`` every evaluation is a trial point
    of iteration ``k``'s line search: the cut ends the step there, the history and direction
    those of a step with ``max_iter: k`` (oracle: torch's), the weights the step with ``max_iter:
    k - 1`` plus the trial step ``t d`` (L-BFGS's own update, as torch applies it)."""
    _, params, state = _step(_INT64_MAX, "strong_wolfe", cut_at=cut_at)
    k = state["n_iter"]
    _, _, want = _step(k, "strong_wolfe")
    for key in _HISTORY:
        assert _same(state[key], want[key]), key
    if k > 1:
        before = _step(k - 1, "strong_wolfe")[1]
    else:
        model, _, _ = _lbfgs(1, None)
        before = [p.detach().clone() for p in model.parameters()]
    offset = 0
    for p, x in zip(params, before, strict=True):
        d = state["d"][offset : offset + x.numel()].view_as(x)
        assert torch.equal(p, x.add(d, alpha=state["t"]))
        offset += x.numel()
    assert all(math.isfinite(float(p.abs().max())) for p in params)


def test_runner18_lbfgs_uncut_step_is_bitwise_unchanged():
    """A cut that never says True changes nothing: every runner L-BFGS step now asks one, so
    this is the default path (oracle: the step without a cut). Fails on main only because
    ``_lbfgs_step`` takes no ``cut`` there; ``experiments/_runner18.py lbfgs`` compares whole
    runs of main and branch bitwise."""
    loss, params, state = _step(9, cut_at=10**9)
    want_loss, want_params, want = _step(9)
    assert loss == want_loss
    assert all(torch.equal(p, q) for p, q in zip(params, want_params, strict=True))
    for key in (*_HISTORY, "t", "n_iter", "func_evals"):
        assert _same(state[key], want[key]), key


def _endless_lbfgs(tmp_path: Path, **extra) -> Path:
    """A config whose L-BFGS step would never end: 2**63 - 1 iterations, zero tolerances."""
    lbfgs = {
        "name": "lbfgs",
        "max_iter": _INT64_MAX,
        "tolerance_grad": 0.0,
        "tolerance_change": 0.0,
        "history_size": 5,
    }
    return write_tiny(tmp_path, optimizers=[lbfgs], batch_size=None, **extra)


@pytest.mark.timeout(60)
def test_runner18_endless_lbfgs_is_checked_and_bounded_by_seconds(tmp_path, capsys):
    """Fails on main (hangs: pytest-timeout ends it). ``--check`` took a probe L-BFGS step
    with the config's ``max_iter``, which never ended; the run's one step would outlast any
    budget. Now the check answers, ``budget.seconds`` ends the step at an evaluation (exit 0,
    stopped by seconds, finite weights), and a resume under a larger budget takes the
    checkpointed state on (more steps, ended by the budget)."""
    config = _endless_lbfgs(tmp_path, budget={"seconds": 0.3})
    assert main(["run", str(config), "--check"]) == 0
    run = tmp_path / "run"
    assert main(["run", str(config), "--quiet", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())["optimizers"]["lbfgs"]
    # 1 step unless L-BFGS stalls on its own in float32 (gtd >= 0 ends its step): by seconds
    assert summary["stop_reason"] == "seconds" and summary["steps"] >= 1
    ckpt = load_checkpoint(run / "checkpoints" / "lbfgs.pt")
    assert ckpt["finished"] and ckpt["step"] == summary["steps"]
    state = ckpt["optimizer"]["state"][0]
    assert state["n_iter"] >= 1 and len(state["old_dirs"]) <= 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    more = f"budget.seconds={summary['seconds'] + 0.3!r}"  # whatever the first step took
    assert main(["run", "--resume", str(run), "--quiet", more]) == 0
    resumed = load_checkpoint(run / "checkpoints" / "lbfgs.pt")
    assert resumed["finished"] and resumed["step"] > ckpt["step"]
    assert resumed["optimizer"]["state"][0]["n_iter"] > state["n_iter"]
    capsys.readouterr()


@pytest.mark.timeout(60)
def test_runner18_second_signal_ends_an_lbfgs_step_and_checkpoints(tmp_path, monkeypatch, capsys):
    """Fails on main (the second SIGINT abandoned the step: no checkpoint after step 0, exit
    130 from the abandon path). The first SIGINT during an L-BFGS step lets it finish, as for
    any step (an ordinary step's resume stays bitwise); the second ends it at its next
    evaluation: exit 130, a checkpoint after step 1 whose L-BFGS state is that of 8 iterations
    (the signals came during evaluations 5 and 8: iterations 4 and 7), and the lines say what
    each signal does. A third signal would abandon."""
    import hessfree.train.loop as loop  # noqa: PLC0415

    calls = []
    step = loop.take_step

    class Signalling:
        def __init__(self, objective):
            self.objective = objective

        def loss(self, outputs, targets):
            calls.append(1)
            if len(calls) in (5, 8):
                os.kill(os.getpid(), signal.SIGINT)
            return self.objective.loss(outputs, targets)

    def take_step(spec, optimizer, model, objective, *args, **kwargs):
        return step(spec, optimizer, model, Signalling(objective), *args, **kwargs)

    monkeypatch.setattr(loop, "take_step", take_step)
    config = _endless_lbfgs(tmp_path, budget={"steps": 3})
    run = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT)
    assert main(["run", str(config), "--out", str(run)]) == 130
    assert signal.getsignal(signal.SIGINT) == handlers
    err = capsys.readouterr().err
    assert "signal again to end this L-BFGS step at its next evaluation and checkpoint" in err
    assert "SIGINT again: ending this L-BFGS step at its next evaluation, then" in err
    assert "Traceback" not in err
    ckpt = load_checkpoint(run / "checkpoints" / "lbfgs.pt")
    assert ckpt["step"] == 1 and not ckpt["finished"]
    assert ckpt["optimizer"]["state"][0]["n_iter"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"


# -- plots: a line per contender -------------------------------------------------------------


def test_runner18_every_contender_has_its_own_line_in_every_panel(tmp_path, monkeypatch):
    """Fails on main (matplotlib's 10-colour cycle and one line style: contenders 0 and 10,
    1 and 11, ... drew the same line). 45 contenders (past the 40 the default colours and four
    line styles give): read back from the Line2D objects of each of the 8 panels (2 figures x
    train/test x loss/accuracy), no two contenders share a colour (as RGBA) and line style,
    and each contender's is the same in every panel."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes  # noqa: PLC0415
    from matplotlib.colors import to_rgba  # noqa: PLC0415

    from hessfree.train.plots import plot_metrics  # noqa: PLC0415

    labels = [f"c{k}" for k in range(45)]
    records = [
        {
            "optimizer": label,
            "step": step,
            "seconds": 0.1 * step,
            "train_loss": 1.0 / (1 + k + step),
            "test_loss": 1.1 / (1 + k + step),
            "train_accuracy": 0.5,
            "test_accuracy": 0.5,
        }
        for k, label in enumerate(labels)
        for step in (0, 5)
    ]
    panels = []
    real = matplotlib.axes.Axes.legend

    def spy(self, *args, **kwargs):
        lines = [line for line in self.get_lines() if not line.get_label().startswith("_")]
        panels.append(
            {ln.get_label(): (to_rgba(ln.get_color()), ln.get_linestyle()) for ln in lines}
        )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", spy)
    plot_metrics(records, tmp_path, metric="accuracy")
    assert len(panels) == 8
    first = panels[0]
    assert list(first) == labels
    assert len(set(first.values())) == len(labels)  # distinct colour and line style
    assert first["c0"] != first["c10"]
    assert all(panel == first for panel in panels)


# -- names Windows reserves: the rest of the list ------------------------------------------


def _python_reserved_names() -> frozenset[str]:
    """Python's own list: ``ntpath._reserved_names`` (3.13+) or pathlib's flavour (to 3.12)."""
    import ntpath  # noqa: PLC0415
    import pathlib  # noqa: PLC0415

    names = getattr(ntpath, "_reserved_names", None)
    if names is None:
        names = getattr(getattr(pathlib, "_WindowsFlavour", None), "reserved_names", None)
    if names is None:  # pragma: no cover - another Python's internals
        pytest.skip("this Python keeps its list of Windows' reserved names elsewhere")
    return frozenset(names)


def test_runner18_windows_reserved_has_python_list_and_com0_lpt0():
    """Fails on main (the superscript forms, CONIN$ and CONOUT$, COM0 and LPT0 were missing).
    Oracle: Python's own list (30 names, ``COM¹``... included), each as a file name in two
    cases with an extension; plus COM0 and LPT0, which Microsoft's naming page lists and
    Python does not; near misses stay allowed."""
    from hessfree.train.config.schema import windows_reserved  # noqa: PLC0415

    python = _python_reserved_names()
    assert len(python) == 30 and "COM\u00b9" in python
    for name in sorted(python | {"COM0", "LPT0"}):
        for spelled in (f"{name}.pt", f"{name.lower()}.v2.pt", f"{name} .x"):
            assert windows_reserved(spelled), spelled
    for near in ("COM10", "LPT\u2074", "COM\u2070", "CONIN", "CONOUT", "CON$", "COM-1"):
        assert not windows_reserved(f"{near}.pt"), near


@pytest.mark.parametrize(
    ("override", "word"),
    [
        ("optimizers.0.label=COM0", "'COM0'"),
        ("optimizers.1.label=lpt0.b", "'LPT0'"),
        ("name=COM\u00b9.v2", "'COM\u00b9'"),
        ("name=lpt\u00b3.x", "'lpt\u00b3'"),
        ("name=conout$.x", "'conout$'"),
    ],
)
def test_runner18_com0_and_superscript_names_are_refused(tmp_path, capsys, override, word):
    """Fails on main (``--check`` 0). Exit 2 at the check naming the key, the reserved word
    and a name that works."""
    key = override.partition("=")[0]
    err = refused(["run", str(write_tiny(tmp_path)), "--check", override], capsys)
    assert f"`{key}` = " in err and word in err
    assert "Windows reserve" in err and "-1" in err


# -- the summary table tells where each optimizer stopped -----------------------------------


def test_runner18_summary_table_shows_the_stop_and_marks_earlier_losses(tmp_path, capsys):
    """Fails on main (the table's steps were the last evaluation's: 4 for a run stopped and
    checkpointed at step 5). Oracles: ``summary.json``'s counts (the loop's) and the last
    record of ``metrics.jsonl``; a completed run's table carries no mark."""
    from hessfree.train.config import load_config  # noqa: PLC0415
    from hessfree.train.loop import Runner  # noqa: PLC0415

    config = write_tiny(tmp_path, budget={"steps": 9}, eval={"every_steps": 4})
    run = tmp_path / "run"

    def stop(event):
        if event.label == "adam" and event.step == 5:
            runner.request_stop()

    runner = Runner(load_config(config), run, progress=False, on_step=stop)
    assert runner.run().exit_code == 130
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())["optimizers"]["adam"]
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["steps"] == 5 and last["step"] == 4
    row = next(line.split() for line in out.splitlines() if line.startswith("adam "))
    assert row[1:3] == ["interrupted", "5"]
    assert row[5] == f"{last['train_loss']:.4g}*" and row[6] == f"{last['test_loss']:.4g}*"
    assert "* the last evaluation's, before the stop: adam's at step 4." in out

    assert main(["run", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("optimizer ") :]
    assert "*" not in table
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:] if line.strip()}
    assert rows["adam"][1:3] == ["steps", "9"] and rows["sgd"][1:3] == ["steps", "9"]


# -- fuzzing the config schema ----------------------------------------------------------------


@pytest.mark.parametrize("betas", ["[]", "[0.9]", "[0.9, 0.99, 0.999]"])
def test_runner18_adam_betas_of_another_length_are_refused(tmp_path, capsys, betas):
    """Fails on main (``[]``: IndexError out of the constructor probe, a traceback, exit 1;
    found by the fuzz below). Exit 2 naming the key, the count and the value."""
    err = refused(
        ["run", str(write_tiny(tmp_path)), "--check", f"optimizers.0.betas={betas}"], capsys
    )
    assert "`optimizers.0.betas` must be a list of 2 values, got" in err


def _fuzz(tmp_path: Path, max_examples: int) -> None:
    pytest.importorskip("hypothesis")  # a test dependency (pyproject's `test` extra)
    from _config_fuzz import cases, key_paths, outcome  # noqa: PLC0415
    from hypothesis import HealthCheck, given, settings  # noqa: PLC0415

    paths = key_paths(tmp_path)
    seen: dict[str, int] = {}

    @settings(
        max_examples=max_examples,
        derandomize=True,  # the same examples every run: a test that cannot fail by chance
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(paths))
    def check(case):
        seen["n"] = seen.get("n", 0) + 1
        kind, why = outcome(tmp_path, case, seen["n"])
        assert kind != "DEFECT", f"{case!r}: {why}"

    check()


def test_runner18_fuzzed_configs_run_or_are_refused(tmp_path):
    """Guard (passes on main with these examples). 1 to 3 values of a 4-contender config
    replaced (its 131 keys as ``--check`` resolves them and 3 unknown ones; every YAML type,
    2**63, NaN, NUL, Unicode, nested containers): the CLI runs a one-step budget (exit 0 or
    4) or exits 2 with a ``hessfree: error:`` message, never a traceback. 30 derandomized
    examples; ``slow``: 1,000 (``experiments/_runner18.py fuzz`` sweeps at random)."""
    _fuzz(tmp_path, 30)


@pytest.mark.slow
def test_runner18_fuzzed_configs_run_or_are_refused_many(tmp_path):
    """As above, 1,000 examples (~30 s; 54 ran, 946 were refused)."""
    _fuzz(tmp_path, 1000)


# -- an HF call of max_iter HF steps ended between two of them -------------------------------


def _hf_call(max_iter: int, cut_after: int | None = None):
    """One runner HF step (a ``step()`` call of up to ``max_iter`` HF steps) on a float64 MLP;
    the callback ends the call after HF step ``cut_after`` as the runner's does."""
    from hessfree import HessianFree  # noqa: PLC0415
    from hessfree.train.stepping import StepCut, _hessianfree_step  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    seen = []

    def callback(info):
        seen.append(info.loss)
        if cut_after is not None and len(seen) == cut_after:
            raise StepCut(seen[0])

    optimizer = HessianFree(
        model.parameters(),
        max_iter=max_iter,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        callback=callback,
    )
    loss = _hessianfree_step(optimizer, model, _MeanSquare(), (x, y), None)
    state = optimizer.state_dict()
    return loss, [p.detach().clone() for p in model.parameters()], state, len(seen)


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b or (a != a and b != b)  # NaN


@pytest.mark.parametrize("k", [1, 3])
def test_runner18_hf_call_cut_after_k_steps_is_the_call_of_k(k):
    """Fails on main (no ``StepCut``). An HF ``step()`` call of ``max_iter`` 2**63 - 1 ended
    by the callback after HF step ``k`` leaves bitwise the weights and ``state_dict`` of a call
    with ``max_iter: k`` (the optimizer's own loop as the oracle), and returns its first loss."""
    loss, params, state, calls = _hf_call(_INT64_MAX, cut_after=k)
    want_loss, want_params, want, want_calls = _hf_call(k)
    assert calls == want_calls == k and loss == want_loss
    assert all(torch.equal(p, q) for p, q in zip(params, want_params, strict=True))
    assert state["param_groups"][0].pop("max_iter") == _INT64_MAX  # the one difference
    assert want["param_groups"][0].pop("max_iter") == k
    assert _same_state(state, want)


@pytest.mark.timeout(60)
def test_runner18_endless_hf_call_is_bounded_by_seconds_and_resumes(tmp_path, capsys):
    """Fails on main (hangs: SIGTERM from `timeout` waited for the call for ever). HF with
    ``max_iter`` 2**63 - 1 and zero tolerances: ``budget.seconds`` ends its call between two
    HF steps, the run exits 0 stopped by seconds, and a resume under a larger budget goes on
    from the checkpointed state."""
    hf = {"name": "hessianfree", "max_iter": _INT64_MAX, "tolerance_grad": 0.0}
    config = write_tiny(
        tmp_path, optimizers=[hf | {"tolerance_change": 0.0}], budget={"seconds": 0.3}
    )
    run = tmp_path / "run"
    assert main(["run", str(config), "--quiet", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())["optimizers"]["hessianfree"]
    # 1 runner step unless an HF step converges by float resolution (which ends a call)
    assert summary["stop_reason"] == "seconds" and summary["steps"] >= 1
    ckpt = load_checkpoint(run / "checkpoints" / "hessianfree.pt")
    hf_steps = ckpt["optimizer"]["state"][0]["step"]  # HF steps the calls took
    assert ckpt["finished"] and ckpt["step"] == summary["steps"] and hf_steps >= ckpt["step"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    more = f"budget.seconds={summary['seconds'] + 0.3!r}"
    assert main(["run", "--resume", str(run), "--quiet", more]) == 0
    resumed = load_checkpoint(run / "checkpoints" / "hessianfree.pt")
    assert resumed["step"] > ckpt["step"] and resumed["optimizer"]["state"][0]["step"] > hf_steps
    capsys.readouterr()


# -- standard streams closed -----------------------------------------------------------------


def _closed(*fds: int):
    def close() -> None:
        for fd in fds:
            os.close(fd)

    return close


@pytest.mark.parametrize("fds", [(1,), (0, 1, 2)], ids=["stdout", "all"])
def test_runner18_a_run_with_closed_standard_streams_runs(tmp_path, fds):
    """Fails on main for a closed stdout (``hessfree run c.yaml >&-``: AttributeError from
    ``sys.stdout.isatty()``, a traceback, exit 1, no run). Now the run completes (exit 0, its
    summary and metrics whole), and a refused config still exits 2."""
    import subprocess  # noqa: PLC0415

    config = write_tiny(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hessfree", "run", str(config), "--out", str(run)]
    stderr = subprocess.DEVNULL if 2 in fds else subprocess.PIPE
    done = subprocess.run(
        cmd, env=env, stderr=stderr, preexec_fn=_closed(*fds), timeout=600, check=False
    )  # a bound for a hang only: the two runs took 33-37 s together under a load of 5-9
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and set(summary["optimizers"]) == {"adam", "sgd"}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["optimizer"] in ("adam", "sgd") for line in lines)
    bad = subprocess.run(
        [*cmd[:-2], "--check", "seed=-5"],
        env=env,
        preexec_fn=_closed(*fds),
        timeout=600,
        stderr=stderr,
        check=False,
    )
    assert bad.returncode == 2


# -- a run written by an older hessfree --------------------------------------------------------


def test_runner18_resume_of_a_run_an_older_version_wrote_names_the_new_keys(tmp_path, capsys):
    """Fails on main ("written for a different config; resume with the run's own config.yaml",
    although it was). A run as a hessfree of 2026-11-30 (bdc8dd2~1) left it: its config.yaml
    without keys HF gained since (``damping_metric``, ``replay_rng``), its checkpoints stamped
    with that file's digests (SHA-256 of it as written, computed here as that version did;
    the message checked by hand on a run of that commit). Now exit 2 naming the new keys with
    their defaults and the way on; nothing changed. A run of this version still resumes."""
    import yaml  # noqa: PLC0415

    from hessfree.train.checkpoint import save_checkpoint  # noqa: PLC0415

    def digests(plain):  # config_digest and training_digest of a plain config, by hand
        dump = {"sort_keys": False, "default_flow_style": None, "width": 100}
        plain = {k: v for k, v in plain.items() if k != "distributed"}
        whole = hashlib.sha256(yaml.safe_dump(plain, **dump).encode()).hexdigest()
        plain = {k: v for k, v in plain.items() if k != "budget"}
        plain["optimizers"] = [
            {k: v for k, v in e.items() if k != "budget"} for e in plain["optimizers"]
        ]
        return whole, hashlib.sha256(yaml.safe_dump(plain, **dump).encode()).hexdigest()

    config = write_tiny(tmp_path, optimizers=[{"name": "adam"}, {"name": "hessianfree"}])
    run = tmp_path / "run"
    assert main(["run", str(config), "--quiet", "--out", str(run)]) == 0
    plain = yaml.safe_load((run / "config.yaml").read_text())
    for key in ("damping_metric", "replay_rng"):
        del plain["optimizers"][1][key]
    (run / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    whole, training = digests(plain)
    for label in ("adam", "hessianfree"):
        path = run / "checkpoints" / f"{label}.pt"
        ckpt = load_checkpoint(path)
        ckpt.update(config_sha256=whole, training_sha256=training)
        save_checkpoint(path, ckpt)
    before = {
        p.name: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"
    }
    err = refused(["run", "--resume", str(run), "--quiet", "budget.steps=5"], capsys)
    assert "as the hessfree that wrote it" in err
    assert "optimizers.1.damping_metric ('identity'), optimizers.1.replay_rng (True)" in err
    assert "resume it with the hessfree version that wrote it, or start a new run" in err
    assert {
        p.name: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"
    } == before

    other = tmp_path / "other"  # written by this version: resumes under a larger budget
    assert main(["run", str(config), "--quiet", "--out", str(other)]) == 0
    assert main(["run", "--resume", str(other), "--quiet", "budget.steps=5"]) == 0


# -- data-parallel: the ranks end an endless step together ------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_runner18_two_ranks_end_endless_lbfgs_and_hf_steps_together(tmp_path):
    """Fails on main (hangs). Two gloo ranks, L-BFGS and HF with ``max_iter`` 2**63 - 1 and
    zero tolerances, ``budget.seconds: 0.5`` each: every cut is agreed (one ``all_reduce`` per
    question), so neither rank waits in a collective the other left; both exit 0, rank 0's
    summary says each stopped by seconds, and its checkpoints hold finite weights."""
    from test_train_distributed import finish, launch, write_config  # noqa: PLC0415

    endless = {"max_iter": _INT64_MAX, "tolerance_grad": 0.0, "tolerance_change": 0.0}
    config = write_config(
        tmp_path,
        optimizers=[
            {"name": "lbfgs", "history_size": 5} | endless,
            {"name": "hessianfree", "cg_max_iter": 10, "precond": None} | endless,
        ],
        budget={"seconds": 0.5},
        batch_size=None,
    )
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]
    for code, err in finish(launch(config, ranks, "--out", "run"), timeout=240):
        assert code == 0, err
    summary = json.loads((ranks[0] / "run" / "summary.json").read_text())["optimizers"]
    assert {e["stop_reason"] for e in summary.values()} == {"seconds"}
    for label in ("lbfgs", "hessianfree"):
        ckpt = load_checkpoint(ranks[0] / "run" / "checkpoints" / f"{label}.pt")
        assert ckpt["finished"] and ckpt["world_size"] == 2
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (ranks[1] / "run").exists()  # rank 1 writes nothing


# -- a config that is no YAML config -------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "npy", "python", "png-name"])
def test_runner18_a_file_that_is_no_yaml_config_is_refused(tmp_path, capsys, kind):
    """Guard (passes on main). A binary file, a NumPy array, a Python module and a PNG given
    as the config: exit 2 with a worded message naming the file, never a traceback."""
    import numpy as np  # noqa: PLC0415

    path = tmp_path / {"npy": "a.npy", "python": "m.py", "png-name": "loss.png"}.get(kind, "b.yaml")
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 2)
    elif kind == "npy":
        np.save(path, np.zeros(3))
    elif kind == "python":
        path.write_text((REPO / "hessfree" / "__main__.py").read_text())
    else:  # a plot of a run, PNG bytes
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    err = refused(["run", str(path), "--check"], capsys)
    assert f"Invalid config in {path}" in err
