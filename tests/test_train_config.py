"""Config loading: every kind of error is reported with its dotted path, all at once."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

from hessfree import HessianFree, HFSettings
from hessfree.train import config as config_module
from hessfree.train.config import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    parse_config,
    safe_load_yaml,
)


def minimal(**extra):
    raw = {
        "data": {"name": "digits"},
        "model": {"name": "mlp"},
        "optimizers": [{"name": "adam"}],
        "budget": {"steps": 5},
    }
    raw.update(extra)
    return raw


def problems_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


def test_config_minimal_resolves_defaults():
    cfg = parse_config(minimal())
    assert cfg.loss.name == "cross_entropy" and cfg.loss.reduction == "mean"
    assert cfg.optimizers[0].label == "adam"
    assert cfg.optimizers[0].hyperparameters == {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
    }
    assert cfg.optimizers[0].budget.steps == 5
    assert cfg.task == "classification"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_config_unknown_key_suggests_closest_and_lists_allowed():
    (msg,) = problems_of(minimal(model={"name": "mlp", "hiden_sizes": [3]}))
    assert "`model.hiden_sizes`" in msg
    assert "did you mean `hidden_sizes`?" in msg
    assert "allowed keys: name, hidden_sizes, activation, init, sparse_connections" in msg


def test_config_unknown_key_in_optimizer_entry():
    (msg,) = problems_of(minimal(optimizers=[{"name": "adam", "lrr": 0.1}]))
    assert "`optimizers.0.lrr`" in msg and "did you mean `lr`?" in msg and "betas" in msg


def test_config_unknown_name_suggests_closest():
    msgs = problems_of(minimal(data={"name": "digit"}, optimizers=[{"name": "adamw"}]))
    assert any("data.name" in m and "did you mean `digits`?" in m for m in msgs)
    assert any("optimizers.0.name" in m and "did you mean `adam`?" in m for m in msgs)


def test_config_wrong_type_names_path_value_and_allowed():
    (msg,) = problems_of(minimal(batch_size="big"))
    assert msg == "`batch_size` must be an integer, got str 'big'."
    (msg,) = problems_of(minimal(output={"plots": "yes"}))
    assert "`output.plots` must be true or false, got str 'yes'" in msg


def test_config_out_of_range_names_path_value_and_range():
    (msg,) = problems_of(minimal(eval={"every_steps": 0}))
    assert msg == "`eval.every_steps` must be an int >= 1, got 0."
    (msg,) = problems_of(minimal(data={"name": "digits", "test_fraction": 1.5}))
    assert "`data.test_fraction` must be in (0.0, 1.0), got 1.5" in msg


def test_config_bad_choice_suggests():
    (msg,) = problems_of(minimal(device="gpu"))
    assert "`device` must be one of 'cpu', 'cuda', 'auto', got 'gpu'" in msg


def test_config_reports_all_problems_at_once():
    raw = minimal(
        seed=-1,
        dtype="float16",
        budegt={},
        eval={"every_steps": "x"},
        optimizers=[{"name": "sgd", "momentum": 1.5}, {"name": "lbfgs", "history_size": 0}],
    )
    msgs = problems_of(raw)
    assert len(msgs) == 6, msgs
    text = str(ConfigError(msgs))
    assert text.startswith("Invalid config: 6 problems:")
    for path in (
        "`seed`",
        "`dtype`",
        "`budegt`",
        "`eval.every_steps`",
        "`optimizers.0.momentum`",
        "`optimizers.1.history_size`",
    ):
        assert path in text


def test_config_missing_sections_are_reported():
    msgs = problems_of({})
    assert any(m.startswith("`data` is required") for m in msgs)
    assert any(m.startswith("`model` is required") for m in msgs)
    assert any(m.startswith("`optimizers` is required") for m in msgs)


def test_config_combination_checks():
    msgs = problems_of(minimal(data={"name": "curves"}))
    assert any("no labels" in m and "autoencoder" in m for m in msgs)
    msgs = problems_of(minimal(model={"name": "rnn"}))
    assert any("needs sequence data" in m for m in msgs)
    msgs = problems_of(minimal(optimizers=[{"name": "adam"}, {"name": "adam"}]))
    assert any("label 'adam' is used by optimizers.0, optimizers.1" in m for m in msgs)
    msgs = problems_of(minimal(budget={}))
    assert any("has no budget" in m for m in msgs)
    msgs = problems_of(minimal(optimizers=[{"name": "adam", "curvature_batch_size": 4}]))
    assert any("only applies to 'hessianfree'" in m for m in msgs)
    msgs = problems_of(minimal(loss={"name": "mse"}))
    assert any("does not fit the integer labels" in m for m in msgs)


def test_config_per_optimizer_budget_and_batch_override_the_global_ones():
    cfg = parse_config(
        minimal(
            batch_size=32,
            budget={"steps": 5, "seconds": 9},
            optimizers=[
                {"name": "adam", "label": "a", "batch_size": None, "budget": {"steps": 50}},
                {"name": "sgd"},
            ],
        )
    )
    a, s = cfg.optimizers
    assert (a.batch_size, a.budget.steps, a.budget.seconds) == (None, 50, 9.0)
    assert (s.batch_size, s.budget.steps) == (32, 5)


def test_config_autoencoder_defaults_to_martens_loss():
    cfg = parse_config(
        minimal(data={"name": "curves"}, model={"name": "autoencoder", "layer_sizes": [784, 6]})
    )
    assert (cfg.loss.name, cfg.loss.reduction, cfg.task) == (
        "bce_with_logits",
        "sum_per_case",
        "reconstruction",
    )


def test_config_yaml_reads_exponent_floats_and_rejects_duplicates():
    assert safe_load_yaml("a: 1e-3\nb: -2E+2\nc: 1.5e3\nd: 7") == {
        "a": 0.001,
        "b": -200.0,
        "c": 1500.0,
        "d": 7,
    }
    with pytest.raises(Exception, match="duplicate key 'a'"):
        safe_load_yaml("a: 1\na: 2\n")


def test_config_yaml_refuses_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_config_overrides_apply_dotted_paths(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        textwrap.dedent("""\
        data: {name: digits}
        model: {name: mlp}
        optimizers: [{name: adam}, {name: sgd}]
        budget: {steps: 5}
        """)
    )
    cfg = load_config(
        path,
        [
            "optimizers.1.lr=0.5",
            "budget.seconds=30",
            "model.hidden_sizes=[8, 4]",
            "eval.max_cases=100",
        ],
    )
    assert cfg.name == "exp"
    assert cfg.optimizers[1].hyperparameters["lr"] == 0.5
    assert cfg.budget.seconds == 30.0 and cfg.eval.max_cases == 100
    assert cfg.model.hidden_sizes == (8, 4)
    with pytest.raises(ConfigError, match="`optimizers.1.lrr`; did you mean `lr`"):
        load_config(path, ["optimizers.1.lrr=0.5"])
    with pytest.raises(ConfigError, match="not an index of the 2-item list"):
        load_config(path, ["optimizers.2.lr=0.5"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["budget.steps"])


def test_config_dump_round_trips(tmp_path):
    cfg = parse_config(
        minimal(
            optimizers=[
                {"name": "adam", "label": "fast", "lr": 0.01},
                {"name": "lbfgs", "line_search_fn": "strong_wolfe"},
            ]
        )
    )
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg, header="resolved\nfor a test"))
    assert path.read_text().startswith("# resolved\n# for a test\n")
    assert load_config(path) == cfg


def test_config_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_hessianfree_keys_come_from_hfsettings():
    cfg = parse_config(
        minimal(optimizers=[{"name": "hessianfree", "cg_rtol": 0}], curvature_batch_size=64)
    )
    (hf,) = cfg.optimizers
    # Every plain HFSettings default, in HessianFree's argument order; the Python-only ones
    # (callback, process_group) are not config keys.
    expected = {k: v for k, v in HFSettings.defaults().items() if k not in HFSettings.PYTHON_ONLY}
    expected["cg_rtol"] = 0.0
    assert hf.hyperparameters == expected
    signature = [
        k for k in inspect.signature(HessianFree).parameters if k not in ("params", "unknown")
    ]
    assert list(hf.hyperparameters) == [
        k for k in signature if k not in ("callback", "process_group")
    ]
    # a YAML int where the setting is a float, even where the default is 'auto' (cg_rtol, damping)
    assert isinstance(hf.hyperparameters["cg_rtol"], float)
    cfg = parse_config(minimal(optimizers=[{"name": "hessianfree", "damping": 10}]))
    assert type(cfg.optimizers[0].hyperparameters["damping"]) is float
    assert cfg.optimizers[0].hyperparameters["damping"] == 10.0
    assert hf.curvature_batch_size == 64
    (msg,) = problems_of(minimal(optimizers=[{"name": "hessianfree", "dampng": 1.0}]))
    assert "`optimizers.0.dampng`; did you mean `damping`?" in msg and "cg_max_iter" in msg
    assert "callback" not in msg  # Python objects are not config keys


def test_config_hessianfree_setting_errors_get_dotted_paths():
    msgs = problems_of(
        minimal(
            optimizers=[
                {"name": "adam"},
                {"name": "hessianfree", "damping": -1, "cg_max_iter": 2.5, "curvature": "hess"},
            ]
        )
    )
    # The messages are HFSettings' (and so HessianFree's) own, behind each key's dotted path.
    expected = []
    for key, value in (("damping", -1), ("cg_max_iter", 2.5), ("curvature", "hess")):
        with pytest.raises((TypeError, ValueError)) as err:
            HessianFree([torch.zeros(1, requires_grad=True)], **{key: value})
        expected.append(f"`optimizers.1.{key}` = {value!r}: {err.value}")
    assert msgs == expected
    assert msgs[0] == "`optimizers.1.damping` = -1: `damping` must be in (0.0, inf), got -1.0."
    # Each key is fine alone; only together do they break a constraint between keys.
    (msg,) = problems_of(
        minimal(optimizers=[{"name": "hessianfree", "min_damping": 1.0, "damping": 0.5}])
    )
    assert msg.startswith("`optimizers.0.damping`: `damping` must be in [min_damping, max_damping]")


def test_runner_config_takes_the_new_keys():
    entry = {"name": "hessianfree", "extrapolate": False, "cg_stop_on_increase": "auto"}
    cfg = parse_config(minimal(optimizers=[entry]))
    assert cfg.optimizers[0].hyperparameters["extrapolate"] is False
    (msg,) = problems_of(minimal(optimizers=[{"name": "hessianfree", "extrapolate": "on"}]))
    assert msg == (
        "`optimizers.0.extrapolate` = 'on': `extrapolate` must be 'auto', True or False, got 'on'."
    )


def test_config_hessianfree_unavailable_is_a_config_error(monkeypatch):
    def missing():
        raise ImportError("No module named 'hessfree'")

    monkeypatch.setattr(config_module.hessianfree, "settings_class", missing)
    (msg,) = problems_of(minimal(optimizers=[{"name": "hessianfree"}]))
    assert "optimizer 'hessianfree' is unavailable" in msg


def test_config_hessianfree_real_signature_round_trips(tmp_path):
    pytest.importorskip("hessfree.optimizer")
    cfg = parse_config(minimal(optimizers=[{"name": "hessianfree", "damping": 45}]))
    assert cfg.optimizers[0].hyperparameters["damping"] == 45.0
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_load_and_open_with_a_comment(path):
    pytest.importorskip("hessfree.optimizer")  # every shipped config compares against HF
    text = path.read_text()
    assert text.startswith("# ") and "2 CPU cores" in text.split("\n\n")[0] + text
    cfg = load_config(path)
    assert cfg.name == path.stem
    # an entry of HF phases (curves_autoencoder: a batch that grows after 1,100 steps) counts
    assert any(leaf.name == "hessianfree" for o in cfg.optimizers for leaf in o.leaves)


def test_shipped_configs_are_all_there():
    names = {p.stem for p in SHIPPED}
    assert {
        "quickstart",
        "curves_autoencoder",
        "digits_mlp",
        "mnist1d_mlp",
        "mnist_autoencoder",
    } <= names


def test_config_sections_mirror_the_factories_keyword_arguments():
    import inspect

    from hessfree.train.data import DATASETS
    from hessfree.train.models import MODELS

    for name, schema in config_module.DATA_SCHEMAS.items():
        keys = {f.name for f in dataclasses.fields(schema)} - {"name"}
        assert keys == set(inspect.signature(DATASETS[name]).parameters), name
    for name, schema in config_module.MODEL_SCHEMAS.items():
        keys = {f.name for f in dataclasses.fields(schema)} - {"name", "init", "sparse_connections"}
        params = set(inspect.signature(MODELS[name]).parameters) - {"input_shape", "num_outputs"}
        assert keys == params, name


def test_config_structural_damping_needs_a_recurrent_model():
    raw = minimal(optimizers=[{"name": "hessianfree", "structural_damping": 0.03}])
    (problem,) = [p for p in problems_of(raw) if "structural_damping" in p]
    assert "optimizers.0.structural_damping" in problem and "'mlp'" in problem
