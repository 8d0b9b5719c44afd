"""Any config runs or is refused before any work (exit 2, one line per problem, no traceback);
damaged run directories and checkpoints are named, never resumed silently (issue 12, 2-3)."""

from __future__ import annotations

import gzip
import os
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_train_loop import tiny_npz

from hessfree.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hessfree.train.cli import main
from hessfree.train.config import ConfigError, parse_config
from hessfree.train.data import DataError, load_mnist

DIGITS = {
    "name": "d",
    "num_threads": 1,
    "data": {"name": "digits"},
    "model": {"name": "mlp", "hidden_sizes": [8]},
    "optimizers": [{"name": "hessianfree", "cg_max_iter": 5}, {"name": "adam"}],
    "budget": {"steps": 2},
}


def write_tiny(tmp_path: Path, **extra) -> Path:
    raw = {
        "name": "tiny",
        "num_threads": 1,
        "data": {"name": "npz", "path": str(tiny_npz(tmp_path / "tiny.npz"))},
        "model": {"name": "mlp", "hidden_sizes": [4]},
        "loss": {"name": "cross_entropy"},
        "optimizers": [{"name": "adam", "lr": 0.01}, {"name": "sgd", "lr": 0.1}],
        "budget": {"steps": 3},
        "batch_size": 16,
        "eval": {"every_steps": 2},
        "output": {"checkpoint_every": 2, "plots": False, "dir": str(tmp_path / "runs")},
    }
    raw.update(extra)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 2 with a message and no traceback; return the message."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hessfree: error:") and "Traceback" not in err
    return err


# -- values that used to pass validation and then crash ---------------------------------------


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("distributed.timeout_seconds=.inf", r"`distributed.timeout_seconds` must be in"),
        ("distributed.timeout_seconds=1e300", r"`distributed.timeout_seconds` must be in"),
        ("seed=1099511627776", r"`seed` must be an int in \[0, 4294967295\]"),
        ("data.seed=4294967296", r"`data.seed` must be an int in \[0, 4294967295\]"),
        ("num_threads=1e23", r"`num_threads` must be an integer, got float 1e\+23"),
        ("data.test_fraction=0.001", r"into 1795 train / 2 test, fewer than its 10 classes"),
        ("data.test_fraction=0.999", r"into 1 train / 1796 test"),
        ("model.hidden_sizes=[1e11]", r"at least 7,500,000,000,010 parameters .* memory"),
        ("name=../../escape", r"`name` = '../../escape' names the run directory"),
        ("name=a/b", r"path separators"),
        ("batch_size=5000", r"`batch_size` = 5000 exceeds the 1347 training cases"),
        ("optimizers.0.curvature_batch_size=5000", r"curvature_batch_size` = 5000 exceeds"),
        ("optimizers.0.lr=.inf", r"`lr` must be in \[0.0, inf\), got inf"),
        ("optimizers.0.weight_decay=.inf", r"`weight_decay` must be in \[0.0, inf\), got inf"),
        ("optimizers.1.eps=.inf", r"`optimizers.1.eps` must be in .*, got inf"),
        ("budget.seconds=.inf", r"`budget.seconds` must be in \(0.0, inf\), got inf"),
    ],
)
def test_values_that_would_crash_are_refused_at_check(tmp_path, capsys, override, match):
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(DIGITS))
    err = refused(["run", str(path), "--check", override], capsys)
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    # an override's problem names the override, not the file
    assert f"override {override!r}" in err and str(path) not in err


def test_optimizer_seed_and_float_counts_are_refused():
    for key, value in (("seed", 1e29), ("cg_max_iter", 1e29)):
        entry = {"name": "hessianfree", "precond": "martens", key: value}
        with pytest.raises(ConfigError, match=rf"`optimizers.0.{key}` = 1e\+29"):
            parse_config({**DIGITS, "optimizers": [entry]})
    # an exact integral float is still a count; a float beyond 2**53 is not
    assert parse_config({**DIGITS, "budget": {"steps": 1e4}}).budget.steps == 10_000
    with pytest.raises(ConfigError, match="`budget.steps` must be an integer"):
        parse_config({**DIGITS, "budget": {"steps": 1e20}})


def test_name_with_nul_in_the_file_is_refused(tmp_path, capsys):
    path = tmp_path / "n.yaml"
    path.write_text(yaml.safe_dump({**DIGITS, "name": "a\0b"}))
    assert "`name` must not contain a NUL character" in refused(
        ["run", str(path), "--check"], capsys
    )


def test_nul_in_a_path_is_refused(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**DIGITS, "output": {"dir": "a\0b"}}))
    err = refused(["run", str(path), "--quiet"], capsys)
    assert "`output.dir` must not contain a NUL character" in err


def test_output_dir_that_is_a_file_or_unwritable_is_refused(tmp_path, capsys):
    config = write_tiny(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = refused(["run", str(config), "--check", f"output.dir={blocker}"], capsys)
    assert "is a file, so the run directory" in err
    err = refused(["run", str(config), "--quiet", f"output.dir={blocker / 'sub'}"], capsys)
    assert "`output.dir`" in err
    err = refused(["run", str(config), "--quiet", "--out", str(blocker)], capsys)
    assert "exists and is a file" in err and "`--out`" in err
    assert blocker.read_text() == "x"


def test_output_dir_the_os_refuses_is_refused_before_any_work(tmp_path, capsys):
    # os.access passes these (root, pseudo file systems, over-long names); only trying tells.
    config = write_tiny(tmp_path)
    long = tmp_path / ("x" * 300)  # above every file system's NAME_MAX (255)
    err = refused(["run", str(config), "--check", f"output.dir={long}"], capsys)
    assert "`output.dir`: cannot create the run directory" in err and "too long" in err
    err = refused(["run", str(config), "--quiet", "--out", str(long / "run")], capsys)
    assert "`--out`: cannot create the run directory" in err and "too long" in err
    assert "not a run directory" in refused(["run", "--resume", str(long)], capsys)
    if Path("/proc/self").is_dir():  # Linux: nothing can be made in /proc, even by root
        err = refused(["run", str(config), "--check", "output.dir=/proc/hessfree-runs"], capsys)
        assert "cannot create the run directory '/proc/hessfree-runs/tiny-" in err
    # the check's own attempt leaves nothing behind
    deep = tmp_path / "new" / "a"
    assert main(["run", str(config), "--check", f"output.dir={deep}"]) == 0
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.npz", "tiny.yaml"]


def test_a_non_empty_out_is_refused_at_check_and_before_loading_data(tmp_path, capsys):
    # It was refused only by the run itself, after loading the data and building the model.
    config = write_tiny(tmp_path)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    err = refused(["run", str(config), "--check", "--out", str(used)], capsys)
    assert f"`--out`: the run directory '{used}' is not empty; resume it with --resume" in err
    (tmp_path / "tiny.npz").unlink()  # a run that loaded the data first would name the file
    err = refused(["run", str(config), "--quiet", "--out", str(used)], capsys)
    assert "is not empty" in err and "tiny.npz" not in err
    assert [p.name for p in used.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
def test_output_dir_in_a_read_only_directory_is_refused(tmp_path, capsys):
    config = write_tiny(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        err = refused(["run", str(config), "--check", f"output.dir={locked / 'runs'}"], capsys)
        assert "`output.dir`" in err and "writ" in err
    finally:
        locked.chmod(0o755)


def test_non_utf8_and_random_bytes_configs_are_refused(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text (byte 0xe9 at offset 9)" in refused(["run", str(path)], capsys)
    run = tmp_path / "run"
    assert main(["run", str(write_tiny(tmp_path)), "--out", str(run), "--quiet"]) == 0
    for seed in range(5):
        (run / "config.yaml").write_bytes(np.random.default_rng(seed).bytes(300))
        refused(["run", "--resume", str(run), "--quiet"], capsys)
    (run / "config.yaml").write_bytes(b"a: 2001-13-45\n")  # a bad YAML date
    refused(["run", "--resume", str(run), "--quiet"], capsys)


def test_yaml_alias_bomb_is_refused_briefly(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    err = refused(["run", str(path), "--check"], capsys)
    assert "expands to more than 100,000 values" in err and len(err) < 1000
    # a huge value in an ordinary message is cut too
    path.write_text(
        yaml.safe_dump({**DIGITS, "model": {"name": "mlp", "hidden_sizes": "x" * 10**6}})
    )
    assert len(refused(["run", str(path), "--check"], capsys)) < 1500


def test_idx_header_with_200_dimensions_is_a_data_error(tmp_path):
    header = struct.pack(">BBBB", 0, 0, 8, 200) + b"\0" * 16
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(header)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(header)
    with pytest.raises(DataError, match="claims 200 dimensions"):
        load_mnist(tmp_path)


# -- damaged run directories -------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path):
    run = tmp_path / "run"
    assert (
        main(["run", str(write_tiny(tmp_path, budget={"steps": 4})), "--out", str(run), "--quiet"])
        == 0
    )
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_truncated_metrics_on_resume_is_refused_without_traceback(finished_run, capsys):
    metrics = finished_run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:10])
    err = refused(["run", "--resume", str(finished_run), "--quiet"], capsys)
    assert "metrics.jsonl' has 10 bytes, fewer than the" in err


def test_checkpoints_replaced_by_a_file_is_refused(finished_run, capsys):
    ckpts = finished_run / "checkpoints"
    for p in ckpts.iterdir():
        p.unlink()
    ckpts.rmdir()
    ckpts.write_text("not a directory")
    assert "is a file, not the run's checkpoint directory" in refused(
        ["run", "--resume", str(finished_run), "--quiet"], capsys
    )


def test_a_flipped_bit_in_a_checkpoint_is_detected_and_nothing_is_overwritten(finished_run, capsys):
    path = finished_run / "checkpoints" / "adam.pt"
    data = bytearray(path.read_bytes())
    state = load_checkpoint(path)
    weight = state["model"]["net.0.weight"] if "net.0.weight" in state["model"] else None
    # flip one bit inside the stored weights (found by their bytes in the file)
    needle = (
        (weight if weight is not None else next(iter(state["model"].values()))).numpy().tobytes()
    )
    at = bytes(data).find(needle[:16])
    assert at > 0
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))
    before = snapshot(finished_run)
    err = refused(["run", "--resume", str(finished_run), "--quiet"], capsys)
    assert f"checkpoint '{path}' is damaged" in err and "digest" in err
    assert "Invalid config" not in err
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_truncated_or_random_checkpoint_says_damaged(finished_run, capsys, damage):
    path = finished_run / "checkpoints" / "sgd.pt"
    data = path.read_bytes()
    path.write_bytes(
        data[: len(data) // 2]
        if damage == "truncated"
        else np.random.default_rng(1).bytes(len(data))
    )
    err = refused(["run", "--resume", str(finished_run), "--quiet"], capsys)
    assert "is damaged: it cannot be read as a checkpoint" in err
    assert "Invalid config" not in err and "weights_only" not in err


def _set(state: dict, key: tuple[str, ...], value: object) -> None:
    *parents, last = key
    for part in parents:
        state = state[part]
    if value is KeyError:
        del state[last]
    else:
        state[last] = value


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (("model",), KeyError, r"missing key 'model'"),
        (("model", "net.0.weight"), torch.zeros(3, 3), r"size mismatch for net.0.weight"),
        (("optimizer", "param_groups"), KeyError, r"missing key 'param_groups'"),
        (("step",), -5, r"step = -5"),
        (("step",), "x", r"step = 'x'"),
        (("perm",), torch.zeros(3, dtype=torch.long), r"perm of shape \(3,\), not \(\d+,\)"),
        (("torch_rng",), torch.zeros(3, dtype=torch.uint8), r"RNG state"),
    ],
)
def test_a_verified_checkpoint_that_does_not_fit_the_run_is_refused(
    finished_run, capsys, key, value, match
):
    # Its digest matches (written by save_checkpoint), but its content cannot be resumed:
    # a named refusal (exit 2), not a KeyError/RuntimeError traceback.
    path = finished_run / "checkpoints" / "adam.pt"
    state = load_checkpoint(path)
    _set(state, key, value)
    save_checkpoint(path, state)
    err = refused(["run", "--resume", str(finished_run), "budget.steps=6", "--quiet"], capsys)
    assert f"checkpoint '{path}' does not fit this run" in err and re.search(match, err), err


def test_checkpoint_round_trip_and_legacy_files(tmp_path):
    import torch

    state = {"a": torch.arange(3.0), "b": [1, "x", None]}
    save_checkpoint(tmp_path / "c.pt", state)
    got = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(got["a"], state["a"]) and got["b"] == state["b"]
    torch.save(state, tmp_path / "old.pt")  # before checkpoints carried a digest
    assert load_checkpoint(tmp_path / "old.pt")["b"] == state["b"]
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(tmp_path / "x.pt")


def test_resume_removes_temporaries_of_a_killed_write(finished_run, capsys):
    stale = [
        finished_run / "checkpoints" / ".adam.pt.1234.deadbeef.tmp",
        finished_run / ".summary.json.99.0badf00d.tmp",
    ]
    for p in stale:
        p.write_bytes(b"")
    assert main(["run", "--resume", str(finished_run), "--quiet"]) == 0
    assert not any(p.exists() for p in stale)


def test_a_run_killed_while_creating_its_directory_leaves_nothing_in_the_way(
    tmp_path, capsys, monkeypatch
):
    # The directory and its checkpoints/ were made before config.yaml was written: a kill
    # between them left a directory a new run refused ("not empty; resume it") and --resume
    # refused ("not a run directory"). Simulated by an interrupt while config.yaml is written;
    # the run directory is now built under a hidden name and renamed, so nothing is left.
    import hessfree.train.rundir as rundir

    config = write_tiny(tmp_path)
    out = tmp_path / "runs" / "r"

    def killed(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "write_text_atomic", killed)
    assert main(["run", str(config), "--quiet", "--out", str(out)]) == 130  # SIGINT's code
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []
    monkeypatch.undo()
    assert main(["run", str(config), "--quiet", "--out", str(out)]) == 0
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "adam.pt").is_file()
    capsys.readouterr()
    # an existing empty directory is still a valid --out (replaced by the built one)
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    assert main(["run", str(config), "--quiet", "--out", str(empty)]) == 0
    assert (empty / "config.yaml").is_file()


def test_a_directory_left_by_an_interrupted_creation_is_explained(tmp_path, capsys):
    # As earlier versions left it: checkpoints/ (and maybe config.yaml's temporary), no
    # config.yaml. Both ways in name the directory, say nothing was trained and what to do.
    config = write_tiny(tmp_path)
    out = tmp_path / "runs" / "r"
    (out / "checkpoints").mkdir(parents=True)
    (out / ".config.yaml.4242.0badf00d.tmp").write_bytes(b"name: ti")
    explained = rf"'{re.escape(str(out))}' holds an empty checkpoints/ directory and no "
    remove = rf"before any training.*Remove it \(rm -r '{re.escape(str(out))}'\)"
    for argv in (
        ["run", str(config), "--quiet", "--out", str(out)],
        ["run", str(config), "--check", "--out", str(out)],
        ["run", "--resume", str(out), "--quiet"],
    ):
        err = refused(argv, capsys)
        assert re.search(explained, err) and re.search(remove, err.replace("\n", " ")), err
    # anything else in it: not that case, the old messages
    (out / "notes.txt").write_text("mine")
    assert "is not empty; resume it" in refused(["run", str(config), "--out", str(out)], capsys)
    assert "not a run directory" in refused(["run", "--resume", str(out)], capsys)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to SIGKILL a creation")
def test_a_directory_creation_killed_by_sigkill_is_cleaned_up_by_the_next_run(tmp_path, capsys):
    # A SIGKILL between _create_run_dir's mkdir and its rename left a hidden
    # `.<name>.partial-*` directory in output.dir that nothing read or removed. Simulated for
    # real: a forked process creates a run directory and kills itself with SIGKILL while
    # config.yaml is written. The next run there (and a --resume) removes it, and says so.
    import signal

    import hessfree.train.rundir as rundir

    config = write_tiny(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()

    def killed_creation(name: str) -> Path:
        pid = os.fork()
        if pid == 0:  # the child: killed mid-creation, no cleanup runs
            try:
                rundir.write_text_atomic = lambda path, text: os.kill(os.getpid(), signal.SIGKILL)
                rundir._create_run_dir(runs / name, "name: x\n")
            finally:
                os._exit(1)  # not reached: SIGKILL
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        (left,) = [p for p in runs.iterdir() if p.name.startswith(f".{name}.partial-")]
        assert f"-{pid}-" in left.name and (left / "checkpoints").is_dir()
        return left

    left = killed_creation("a")
    assert main(["run", str(config), "--out", str(runs / "b")]) == 0
    assert f"removed {left.name}, left by a run killed" in capsys.readouterr().out
    assert not left.exists() and sorted(p.name for p in runs.iterdir()) == ["b"]
    left = killed_creation("c")
    assert main(["run", "--resume", str(runs / "b")]) == 0
    assert f"removed {left.name}" in capsys.readouterr().out and not left.exists()


def test_only_dead_partial_directories_holding_a_creations_files_are_removed(tmp_path):
    # Never a live one: a creation by a live process of this host (ours), or a recent one
    # whose maker cannot be told (another host's, or an older version's name without a pid).
    # Untouched for PARTIAL_MAX_AGE_S, any is dead; one holding other files is only named.
    from hessfree.train.rundir import PARTIAL_MAX_AGE_S, _host_tag, remove_dead_partial_dirs

    def partial(name: str, age: float = 0.0, *extra: str) -> Path:
        path = tmp_path / name
        (path / "checkpoints").mkdir(parents=True)
        (path / "config.yaml").write_text("name: x\n")
        for f in extra:
            (path / f).write_text("mine")
        t = time.time() - age
        for p in (*path.iterdir(), path):
            os.utime(p, (t, t))
        return path

    old = PARTIAL_MAX_AGE_S + 60
    live = partial(f".r.partial-{_host_tag()}-{os.getpid()}-0badf00d")
    elsewhere = partial(".r.partial-00000000-1-0badf00d")  # another host's (the tag differs)
    unnamed = partial(".r.partial-0badf00d")
    stale = partial(".s.partial-0badf00d", old)
    stale_elsewhere = partial(".t.partial-00000000-1-0badf00d", old)
    not_ours = partial(".u.partial-0badf00d", old, "notes.txt")
    visible = partial("v.partial-0badf00d", old)  # not hidden: not a creation's name
    said = []
    assert _host_tag() != "00000000"
    removed = remove_dead_partial_dirs(tmp_path, said.append)
    assert sorted(removed) == sorted([stale, stale_elsewhere])
    assert all(p.is_dir() for p in (live, elsewhere, unnamed, not_ours, visible))
    assert any(f"left '{not_ours}'" in line and "holds other files" in line for line in said)
