"""The runner's ``precond: kfac``: config validation (exit 2 on bad values) and the built optimizer.

The preconditioner's mathematics is checked against dense oracles in ``test_kfac.py``; here the
oracle is :class:`hessfree.KFACPreconditioner` itself, built directly with the same options.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hessfree import HessianFree, KFACPreconditioner
from hessfree.train.checkpoint import load_checkpoint
from hessfree.train.cli import main
from hessfree.train.config import ConfigError, dump_config, parse_config
from hessfree.train.loop import Runner, RunStatus
from hessfree.train.optimizers import build_optimizer
from tests.test_train_loop import tiny_config

OPTIONS = ("refresh", "decay", "num_probes", "relative_damping", "max_dense", "rank")


def _config(precond, **entry):
    return {
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "optimizers": [{"name": "hessianfree", "precond": precond, **entry}],
        "budget": {"steps": 3},
    }


def _problems(precond) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(precond))
    return info.value.problems


def test_kfac_options_default_to_the_preconditioners():
    direct = KFACPreconditioner(torch.nn.Linear(2, 2))
    expected = {"name": "kfac"} | {k: getattr(direct, k) for k in OPTIONS}
    cfg = parse_config(_config("kfac"))
    assert cfg.optimizers[0].hyperparameters["precond"] == expected
    cfg = parse_config(_config({"name": "kfac", "rank": 16, "refresh": 2, "num_probes": None}))
    got = cfg.optimizers[0].hyperparameters["precond"]
    assert got == expected | {"rank": 16, "refresh": 2, "num_probes": None}
    # the resolved config (as saved in a run directory) loads back to the same config
    assert parse_config(__import__("yaml").safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "`optimizers.0.precond.rank` = 0: `rank` must be an int >= 1, got 0."),
        ({"decay": 1.0}, "`optimizers.0.precond.decay` = 1.0: `decay` must be in [0.0, 1.0)"),
        ({"rank": 2.5}, "`optimizers.0.precond.rank` = 2.5: must be an integer."),
        ({"decay": "x"}, "`optimizers.0.precond.decay` = 'x': must be a number."),
        ({"refresh": None}, "`optimizers.0.precond.refresh` = None: must be a number, not null."),
        ({"relative_damping": True}, "`optimizers.0.precond.relative_damping` = True: must be"),
        ({"rnak": 3}, "Unknown key `optimizers.0.precond.rnak`; did you mean `rank`?"),
    ],
)
def test_kfac_bad_options_name_the_key_the_value_and_what_is_allowed(options, message):
    (problem,) = _problems({"name": "kfac", **options})
    assert problem.startswith(message), problem


def test_kfac_on_the_recurrent_model_is_refused_at_check():
    cfg = {
        "data": {"name": "addition", "length": 10},
        "model": {"name": "rnn", "hidden_size": 8},
        "optimizers": [{"name": "hessianfree", "precond": {"name": "kfac"}}],
        "budget": {"steps": 1},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    (problem,) = info.value.problems
    assert problem.startswith("`optimizers.0.precond` = kfac cannot precondition `model.name`")


def test_other_precond_values_keep_hfsettings_messages():
    (problem,) = _problems("kfca")
    assert problem.startswith("`optimizers.0.precond` = 'kfca': Unknown `precond` 'kfca'")


def test_cli_bad_kfac_option_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "data: {name: digits}\nmodel: {name: mlp}\n"
        "optimizers: [{name: hessianfree, precond: {name: kfac, rank: 0}}]\nbudget: {steps: 1}\n"
    )
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "`optimizers.0.precond.rank` = 0" in err


def test_build_optimizer_makes_the_kfac_preconditioner_and_releases_its_hooks():
    cfg = parse_config(_config({"name": "kfac", "rank": 4, "relative_damping": 0.1}))
    spec = cfg.optimizers[0].leaves[0]
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = build_optimizer(spec, model.parameters(), model)
    assert isinstance(opt, HessianFree) and isinstance(opt.precond, KFACPreconditioner)
    assert opt.precond.layers == [model[0], model[2]]
    assert (opt.precond.rank, opt.precond.relative_damping) == (4, 0.1)
    assert model[0]._forward_hooks
    # the model's next optimizer (a later phase or entry) removes the stale hooks
    opt2 = build_optimizer(spec, model.parameters(), model)
    assert len(model[0]._forward_hooks) == 1 and opt2.precond is not opt.precond
    build_optimizer(parse_config(_config(None)).optimizers[0].leaves[0], model.parameters(), model)
    assert not model[0]._forward_hooks
    with pytest.raises(ValueError, match="needs the model"):
        build_optimizer(spec, model.parameters())
    with pytest.raises(ValueError, match="has none; use precond: martens, nystrom or null"):
        conv = torch.nn.Conv1d(1, 1, 1)
        build_optimizer(spec, conv.parameters(), conv)


def test_runner_trains_with_kfac(tmp_path):
    entry = {"name": "hessianfree", "precond": {"name": "kfac", "rank": 4}, "cg_max_iter": 5}
    cfg = tiny_config(tmp_path, optimizers=[entry, {"name": "adam", "lr": 0.01}])
    result = Runner(cfg, tmp_path / "run", progress=False, verbose=False).run()
    assert result.status is RunStatus.COMPLETED and result.exit_code == 0


@pytest.mark.parametrize("kfac", [{"refresh": 2, "rank": 4}, {"max_dense": 4, "refresh": 1}])
def test_interrupted_kfac_run_resumes_bit_identical(tmp_path, kfac):
    # The factors are running averages (and truncated spectra refine the previous ones), so a
    # resume that restarted them took another trajectory: they travel in the checkpoint.
    from tests.test_train_loop import final_params, quiet, read_metrics, without_timing

    entry = {"name": "hessianfree", "cg_max_iter": 5, "precond": {"name": "kfac", **kfac}}
    cfg = tiny_config(tmp_path, optimizers=[entry], budget={"steps": 6})
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, checkpoint_every=1))
    quiet(cfg, tmp_path / "full").run()
    runner = quiet(cfg, tmp_path / "part")
    runner.on_step = lambda ev: runner.request_stop() if ev.step == 3 else None
    assert runner.run().status is RunStatus.INTERRUPTED
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "hessianfree.pt")
    assert ckpt["optimizer"]["precond"]["type"] == "KFACPreconditioner"
    assert ckpt["optimizer"]["precond"]["state"]["factors"] is not None
    assert Runner(cfg, tmp_path / "part", resume=True, progress=False, verbose=False).run()
    full, part = (
        final_params(tmp_path / "full", "hessianfree"),
        final_params(tmp_path / "part", "hessianfree"),
    )
    assert all(torch.equal(full[k], part[k]) for k in full)
    assert without_timing(read_metrics(tmp_path / "part" / "metrics.jsonl")) == without_timing(
        read_metrics(tmp_path / "full" / "metrics.jsonl")
    )


def test_a_checkpoint_without_the_preconditioner_state_resumes_with_a_warning(tmp_path):
    # Written by a version that did not save K-FAC's factors: resumable, but not identically.
    from hessfree.train.checkpoint import save_checkpoint
    from tests.test_train_loop import quiet

    entry = {"name": "hessianfree", "cg_max_iter": 3, "precond": {"name": "kfac"}}
    cfg = tiny_config(tmp_path, optimizers=[entry], budget={"steps": 4})
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, checkpoint_every=1))
    runner = quiet(cfg, tmp_path / "run")
    runner.on_step = lambda ev: runner.request_stop() if ev.step == 2 else None
    assert runner.run().status is RunStatus.INTERRUPTED
    path = tmp_path / "run" / "checkpoints" / "hessianfree.pt"
    old = load_checkpoint(path)
    del old["optimizer"]["precond"]
    save_checkpoint(path, old)
    with pytest.warns(RuntimeWarning, match="holds no preconditioner state .* restarts"):
        result = quiet(cfg, tmp_path / "run", resume=True).run()
    assert result.status is RunStatus.COMPLETED
