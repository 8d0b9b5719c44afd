"""HFSettings: one validated record of HessianFree's hyperparameters (hessfree/_settings.py)."""

from __future__ import annotations

import dataclasses
import inspect
import io

import pytest
import torch

from hessfree import HessianFree, HFSettings, ProductPolicy


def test_settings_defaults_are_the_optimizers_signature_defaults():
    sig = inspect.signature(HessianFree.__init__).parameters
    # (**unknown only turns a wrong keyword into an error that names the right ones)
    names = [n for n in sig if n not in ("self", "params", "unknown")]
    assert tuple(names) == HFSettings.keys()
    assert {n: sig[n].default for n in names} == HFSettings.defaults()


def test_settings_normalise_numbers_and_products():
    s = HFSettings(lr=1, damping=3, cg_decay=1, products={"precision": "highest"})
    assert isinstance(s.lr, float) and isinstance(s.damping, float) and s.initial_damping == 3.0
    assert isinstance(s.cg_decay, float)
    assert s.products == ProductPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -1.0}, ValueError, r"`lr` must be in \[0.0, inf\), got -1.0"),
        ({"damping": "big"}, ValueError, r"Unknown `damping` 'big'; expected one of 'auto'"),
        ({"damping_increase": 0.5}, ValueError, "did you swap it with `damping_decrease`"),
        ({"damping_increase": "1.5"}, TypeError, r"`damping_increase` must be a real number"),
        ({"cg_min_iter": 300}, ValueError, r"`cg_min_iter` must be an int in \[0, 250\]"),
        ({"backtrack": 1}, TypeError, r"`backtrack` must be a bool, got int 1"),
        ({"precond": "jacobi"}, ValueError, r"Unknown `precond` 'jacobi'"),
        ({"damping": 1e-12}, ValueError, r"`damping` must be in \[min_damping, max_damping\]"),
        ({"structural_damping": 0.1, "curvature": "hessian"}, ValueError, "Gauss-Newton"),
        ({"cg_max_itr": 5}, TypeError, r"Unknown HessianFree setting `cg_max_itr` = 5"),
    ],
)
def test_settings_from_kwargs_names_the_key_the_value_and_what_is_allowed(kwargs, error, match):
    with pytest.raises(error, match=match):
        HFSettings.from_kwargs(**kwargs)


@pytest.mark.parametrize(
    "key",
    [
        "lr",
        "weight_decay",
        "structural_damping",
        "min_damping",
        "tolerance_grad",
        "tolerance_change",
        "cg_rtol",
        "cg_progress_tol",
    ],
)
def test_settings_refuse_an_infinite_value_with_no_upper_bound(key):
    # the message says `[0.0, inf)`, so inf itself must be refused (it used to pass and turn
    # the parameters or the objective into inf/NaN at the first step)
    with pytest.raises(ValueError, match=rf"`{key}` must be in [\[(]0.0, inf\), got inf\."):
        HFSettings(**{key: float("inf")})


def test_settings_allow_an_unbounded_max_damping():
    assert HFSettings(max_damping=float("inf")).max_damping == float("inf")


def test_settings_problems_reports_each_key_then_the_constraints_between_keys():
    assert HFSettings.problems({"cg_max_iter": 50, "damping": 1.0}) == []
    found = HFSettings.problems({"cg_max_iter": 0, "armijo_c": 1.5, "seed": 1})
    assert [k for k, _ in found] == ["cg_max_iter", "armijo_c"]
    # each value alone is fine, together they clash: the message's first named key
    found = HFSettings.problems({"cg_max_iter": 5, "cg_min_iter": 10})
    assert found == [("cg_min_iter", "`cg_min_iter` must be an int in [0, 5], got 10.")]


def test_state_dict_carries_every_plain_setting_and_loading_adopts_them():
    w = torch.ones(2, requires_grad=True)
    opt = HessianFree([w], cg_max_iter=17, damping=2.0, line_search=None, seed=5)
    sd = opt.state_dict()
    for key in HFSettings.GROUP_KEYS:
        assert key in sd["param_groups"][0]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = HessianFree([torch.ones(2, requires_grad=True)])
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.settings.cg_max_iter == 17 and other.cg_max_iter == 17
    assert other.settings.line_search is None and other.settings.initial_damping == 2.0
    # a checkpoint from before the settings were stored in the groups keeps this optimizer's
    for group in sd["param_groups"]:
        for key in HFSettings.GROUP_KEYS:
            if key not in ("lr", "weight_decay"):
                del group[key]
    other = HessianFree([torch.ones(2, requires_grad=True)], cg_max_iter=9)
    other.load_state_dict(sd)
    assert other.settings.cg_max_iter == 9 and other.param_groups[0]["cg_max_iter"] == 9


def test_edited_group_settings_are_validated_and_used():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = HessianFree([x], damping=1e-3)
    opt.param_groups[0]["cg_max_iter"] = 2
    opt.step(
        lambda: 0.5 * (x * torch.arange(1.0, 4.0, dtype=torch.float64)).square().sum() - x.sum()
    )
    assert opt.settings.cg_max_iter == 2 and opt.last_step.cg_iters <= 2
    opt.param_groups[0]["armijo_c"] = 3.0
    with pytest.raises(ValueError, match=r"`armijo_c` must be in \(0.0, 1.0\), got 3.0"):
        opt.step(lambda: x.square().sum())


def test_a_group_cannot_set_a_setting_shared_by_all_groups():
    a, b = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match=r"`param_groups\[1\]\['cg_max_iter'\]` is 5"):
        HessianFree([{"params": [a]}, {"params": [b], "cg_max_iter": 5}])
    opt = HessianFree([{"params": [a]}, {"params": [b], "lr": 0.5}])
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]


def test_min_damping_above_max_damping_names_both_keys():
    # (an explicit cap: under max_damping='auto' the cap is at least min_damping, "unseen14")
    problems = HFSettings.problems({"min_damping": 1e10, "max_damping": 1e10})
    assert problems and problems[0][0] == "min_damping"
    assert "`min_damping` is 10000000000.0; `max_damping` must exceed it" in problems[0][1]
