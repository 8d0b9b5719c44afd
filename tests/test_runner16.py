"""runner16: `hessfree run` under inputs and events nobody had tried (experiments/README.md,
runner16).

A config file named `.yaml`, the source a refusal names, config files in UTF-16 / UTF-32 /
with tabs / empty, a checkpoint this torch cannot read, SIGHUP (a closed terminal). Each test
of a fix fails on main 7f8abd2 (see the commits).
"""

from __future__ import annotations

import codecs
import fractions
import io
import json
import os
import pty
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from test_train_robust import refused, write_tiny

from hessfree.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hessfree.train.cli import main


def _nameless(tmp_path, filename: str, **extra):
    """The tiny config without `name`, saved as ``filename``: the run is named after it."""
    raw = yaml.safe_load(write_tiny(tmp_path, **extra).read_text())
    del raw["name"]
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("filename", "name"), [(".yaml", "yaml"), (".tuned.yaml", "tuned")])
def test_runner16_a_dotted_config_file_names_a_visible_run_directory(
    tmp_path, capsys, filename, name
):
    """main: `name: .yaml` and a run directory `.yaml-<time>` that `ls` does not show."""
    config = _nameless(tmp_path, filename, budget={"steps": 1})
    assert main(["run", str(config), "--check"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == name
    assert main(["run", str(config), "--quiet"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith(f"{name}-") and (run / "summary.json").is_file()


def test_runner16_a_name_the_config_sets_is_kept_as_written(tmp_path, capsys):
    """Guard: only the default taken from the file's stem loses its dots."""
    config = write_tiny(tmp_path, name=".hidden-on-purpose")
    assert main(["run", str(config), "--check"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == ".hidden-on-purpose"


def test_runner16_the_run_and_check_name_the_config_file_alike(tmp_path, capsys):
    """main: the run said "Invalid config in tiny:" (the config's name), `--check` "in
    .../tiny.yaml" for the same `--out` refusal."""
    config = write_tiny(tmp_path)
    (tmp_path / "afile").write_text("x")
    argv = ["run", str(config), "--out", str(tmp_path / "afile"), "--quiet"]
    checked = refused([*argv, "--check"], capsys)
    ran = refused(argv, capsys)
    assert ran == checked
    assert f"Invalid config in {config}: `--out`" in ran


def test_runner16_a_utf16_config_with_its_byte_order_mark_runs_as_utf8(tmp_path, capsys):
    """main: "the file is not UTF-8 text (byte 0xff at offset 0)". YAML 1.1 §5.2 and PyYAML
    read UTF-16 behind a byte-order mark; the resolved config is the UTF-8 file's."""
    config = write_tiny(tmp_path)
    assert main(["run", str(config), "--check"]) == 0
    expected = capsys.readouterr().out
    for codec in ("utf-16", "utf-16-be"):
        bom = codecs.BOM_UTF16_BE if codec.endswith("be") else b""
        wide = tmp_path / "tiny.yaml"
        wide.write_bytes(bom + config.read_text().encode(codec))
        assert main(["run", str(wide), "--check"]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == expected
        config.write_text(expected)  # back to UTF-8 for the next round


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (codecs.BOM_UTF32_LE + "seed: 1\n".encode("utf-32-le"), "a UTF-32 byte-order mark"),
        ("seed: 1\n".encode("utf-16-le"), "NUL bytes, as in UTF-16 or UTF-32 text without"),
        (b"data:\n\tname: digits\n", "line 2 has a tab there: YAML indents with spaces only"),
        (b"", "the file holds no YAML document (it is empty, or only comments)"),
        (b"# only a comment\n", "the file holds no YAML document"),
    ],
    ids=["utf32", "utf16-no-bom", "tab", "empty", "comment"],
)
def test_runner16_unreadable_config_files_say_why(tmp_path, capsys, content, match):
    """main: UTF-32 and UTF-16 without a mark said only "not UTF-8 text (byte 0xff ...)", a
    tab "found character that cannot start any token", an empty file listed three missing
    sections."""
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert match in refused(["run", str(path), "--check"], capsys)


def test_runner16_an_empty_config_completed_by_overrides_still_runs(tmp_path, capsys):
    """Guard: the empty-file refusal leaves a config given wholly as overrides alone."""
    raw = yaml.safe_load(write_tiny(tmp_path).read_text())
    (tmp_path / "empty.yaml").write_text("")
    overrides = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in raw.items()
    ]
    assert main(["run", str(tmp_path / "empty.yaml"), *overrides, "--check"]) == 0


_MAGIC = b"hessfree checkpoint "  # how the note opens (the archive comment's first bytes)


def _with_comment(archive: bytes, comment: bytes) -> bytes:
    """A zip archive with ``comment``: written by hand from the zip format's end record (its
    last 2 bytes are the comment's length), independently of the code under test."""
    assert archive[-22:-18] == b"PK\x05\x06" and archive[-2:] == b"\0\0"
    return archive[:-2] + len(comment).to_bytes(2, "little") + comment


def _foreign_checkpoint(path, torch_version: str) -> None:
    """A file this torch cannot unpickle (a type ``weights_only`` refuses, as a newer torch's
    would be), noted as written by ``torch_version``."""
    buffer = io.BytesIO()
    torch.save({"sha256": "0" * 64, "payload": fractions.Fraction(1, 3)}, buffer)
    note = {"torch": torch_version, "hessfree": "9.9.9", "format": 2, "sha256": "0" * 64}
    path.write_bytes(_with_comment(buffer.getvalue(), _MAGIC + json.dumps(note).encode()))


def test_runner16_a_checkpoint_another_torch_wrote_names_that_torch(tmp_path, capsys):
    """main: "cannot be read as a checkpoint (truncated or overwritten)" for a file a newer
    torch wrote; the versions are now noted in the zip's comment, outside the pickle."""
    config = write_tiny(tmp_path, budget={"steps": 2})
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet", "budget.steps=1"]) == 0
    _foreign_checkpoint(run / "checkpoints" / "adam.pt", "99.1.0")
    err = refused(["run", "--resume", str(run), "--quiet"], capsys)
    assert (
        f"checkpoint '{run / 'checkpoints' / 'adam.pt'}' was written by torch 99.1.0, "
        f"hessfree 9.9.9, and this torch {torch.__version__} cannot read it" in err
    )
    assert "pip install torch==99.1.0" in err and "truncated" not in err
    # the same file noted as this torch's is damaged, as before
    _foreign_checkpoint(tmp_path / "same.pt", str(torch.__version__))
    with pytest.raises(CheckpointError, match=r"damaged: it cannot be read as a checkpoint \("):
        load_checkpoint(tmp_path / "same.pt")


def test_runner16_the_checkpoint_note_is_written_and_verified(tmp_path):
    """The note (read with zipfile) holds this torch's version, the state's format and the
    payload's digest; torch reads the noted archive; a note moved onto another payload is
    refused. main: no note (zipfile reads an empty comment)."""
    state = {"format": 1, "w": torch.arange(6.0)}
    save_checkpoint(tmp_path / "a.pt", state)
    save_checkpoint(tmp_path / "b.pt", {"format": 1, "w": torch.zeros(6)})
    comment = zipfile.ZipFile(tmp_path / "a.pt").comment
    assert comment.startswith(_MAGIC)
    note = json.loads(comment[len(_MAGIC) :])
    assert (note["torch"], note["format"]) == (str(torch.__version__), 1)
    outer = torch.load(tmp_path / "a.pt", weights_only=True)  # torch skips the comment
    assert note["sha256"] == outer["sha256"]
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["w"], state["w"])
    b = (tmp_path / "b.pt").read_bytes()
    own = len(zipfile.ZipFile(tmp_path / "b.pt").comment)
    plain = b[:-own][:-2] + b"\0\0"  # b.pt without its note: the archive torch.save wrote
    (tmp_path / "b.pt").write_bytes(_with_comment(plain, comment))
    with pytest.raises(CheckpointError, match="zip comment belong to another content"):
        load_checkpoint(tmp_path / "b.pt")


def _wait_for(predicate, what: str, proc: subprocess.Popen, limit: float = 600.0) -> None:
    """Poll ``predicate`` (a file the child writes) until true; fail, naming ``what``, if the
    child ends first or ``limit`` seconds pass (a hang, not a timing assumption)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {limit} s"
        time.sleep(0.02)


@pytest.mark.parametrize("terminal", ["pty", "pipe"])
def test_runner16_sighup_checkpoints_and_ends_past_a_closed_terminal(tmp_path, terminal):
    """main: SIGHUP (a closed terminal, or `| tee` closed with it) killed the run at once
    (returncode -1), losing up to `checkpoint_every` steps. Now as SIGTERM: it finishes the
    step, checkpoints, writes the summary and exits 129, though every line it prints after
    the signal goes to a terminal that hung up (EIO) or a pipe nobody reads (EPIPE); the
    run then resumes. Synchronised on metrics.jsonl (written inside the signal handlers'
    scope), never on a sleep."""
    config = write_tiny(
        tmp_path,
        budget={"steps": 10**6},
        eval={"every_steps": 1},
        output={"checkpoint_every": 10**6, "plots": False, "progress": "always"},
    )
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, "-m", "hessfree", "run", str(config), "--out", str(run)]
    if terminal == "pty":
        parent, child = pty.openpty()
        streams = {"stdout": child, "stderr": child}
    else:
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(argv, env=env, start_new_session=True, **streams)
    try:
        if terminal == "pty":
            os.close(child)
        metrics = run / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_bytes().count(b"\n") >= 3,
                  "third metrics line", proc)  # fmt: skip
        if terminal == "pty":
            os.close(parent)  # the terminal's window closes: the child's writes now fail
        else:
            proc.stdout.close()
            proc.stderr.close()
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=600) == 128 + signal.SIGHUP  # a bound for a hang only
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    steps = load_checkpoint(run / "checkpoints" / "adam.pt")["step"]
    # the checkpoint the signal wrote (checkpoint_every never came): the third line is step
    # 2's evaluation, and the signal may land before step 3 starts
    assert steps >= 2
    assert main(["run", "--resume", str(run), "--quiet", f"budget.steps={steps + 1}"]) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_runner16_a_contender_without_a_finite_loss_stays_in_the_plot_legend(tmp_path, monkeypatch):
    """main: an optimizer that diverged at its first evaluation (every loss null) vanished
    from every panel and legend; one with a single point is drawn (a marker)."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from hessfree.train.plots import plot_metrics

    records = [
        {"optimizer": "adam", "step": 0, "seconds": 0.0, "train_loss": 1.0, "test_loss": 1.1},
        {"optimizer": "adam", "step": 5, "seconds": 0.5, "train_loss": 0.5, "test_loss": 0.6},
        {"optimizer": "sgd", "step": 0, "seconds": 0.0, "train_loss": None, "test_loss": None},
        {"optimizer": "hf", "step": 0, "seconds": 0.0, "train_loss": 0.9, "test_loss": 0.9},
    ]
    legends = []
    real = matplotlib.axes.Axes.legend

    def spy(self, *args, **kwargs):
        legend = real(self, *args, **kwargs)
        legends.append([text.get_text() for text in legend.get_texts()])
        return legend

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", spy)
    written = plot_metrics(records, tmp_path, diverged={"sgd": 0})
    assert len(written) == 2 and len(legends) == 4  # 2 figures x (train, test)
    for entries, split in zip(legends, ["train", "test"] * 2, strict=True):
        assert entries == ["adam", f"sgd (diverged at step 0): no finite {split} loss", "hf"]


def test_runner16_a_directory_or_several_configs_say_a_run_takes_one(tmp_path, capsys):
    """main: "cannot read the config file: Is a directory." and "expected one CONFIG.yaml"
    without the way to run several (one run per command: a shell loop)."""
    config = write_tiny(tmp_path)
    err = refused(["run", str(tmp_path), "--check"], capsys)
    assert f"Is a directory; give one config file such as '{config}'" in err
    assert f'for c in {tmp_path}/*.yaml; do hessfree run "$c"; done' in err
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(config), str(config), "--check"])
    assert exit_.value.code == 2
    assert 'to run several, for c in ...; do hessfree run "$c"; done' in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["CONFIG", "--out", ""], ["--resume", ""], ["CONFIG", "--out", " "], [""]],
    ids=["out", "resume", "out-blank", "config"],
)
def test_runner16_an_empty_path_argument_is_a_usage_error(tmp_path, capsys, monkeypatch, argv):
    """main: `--out ""` (an unset `$RUN`) was the working directory ("'.' is not empty;
    resume it with --resume ."), `--resume ""` resumed the run in it, `run ""` read '.'."""
    config = write_tiny(tmp_path)
    monkeypatch.chdir(tmp_path)  # not empty: holds tiny.yaml
    with pytest.raises(SystemExit) as exit_:
        main(["run", *[str(config) if a == "CONFIG" else a for a in argv], "--check"])
    assert exit_.value.code == 2
    assert "(an unset shell variable?)" in capsys.readouterr().err
