"""leftovers19: small defects earlier rounds noticed and left (experiments/README.md,
leftovers19). Each test says whether it fails on main 9dd67be or is a guard."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from test_train_robust import refused, write_tiny
from torch import nn

import hessfree

# --------------------------------------------------------------------------------------------
# 1. state_dict -> load_state_dict -> state_dict keeps each entry's dtype and value
# --------------------------------------------------------------------------------------------


def _entries(value: object, path: str = "") -> list[tuple[str, object]]:
    """Every leaf of a state entry with its path (tuples, lists and dicts walked)."""
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _entries(v, f"{path}.{k}")]
    if isinstance(value, list | tuple):
        return [e for i, v in enumerate(value) for e in _entries(v, f"{path}[{i}]")]
    return [(path, value)]


def _assert_same_state(before: dict, after: dict) -> None:
    """Oracle: the dict saved before the load, entry by entry: the same keys, leaf types,
    tensor dtypes and values (``torch.equal``), other values ``==``."""
    assert before.keys() == after.keys()
    for key in before:
        a, b = _entries(before[key], key), _entries(after[key], key)
        assert [p for p, _ in a] == [p for p, _ in b], key
        for (path, x), (_, y) in zip(a, b, strict=True):
            assert type(x) is type(y), (path, type(x), type(y))
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype, (path, x.dtype, y.dtype)
                assert torch.equal(x, y), path
            else:
                assert x == y or (x != x and y != y), path  # NaN == NaN here


def _reloaded(opt: hessfree.HessianFree, params, **kw) -> hessfree.HessianFree:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = hessfree.HessianFree(params, **kw)
    fresh.load_state_dict(torch.load(buffer))
    return fresh


@pytest.mark.parametrize(
    ("kw", "dtype"),
    [
        ({}, torch.float32),
        ({"curvature": "fisher_mc"}, torch.float32),
        ({"curvature": "fisher_mc"}, torch.float64),
        ({"curvature": "ggn", "damping_metric": "marquardt"}, torch.float32),
    ],
)
def test_leftovers19_state_round_trip_keeps_every_entrys_dtype(one_thread, kw, dtype):
    """``rng_state`` (uint8) came back as the parameters' float dtype after load_state_dict
    (torch's loader casts each state tensor to it) until the next step (fails on main). Every
    entry of the state (counters, flags, floats, lists, the warm start, Marquardt's diagonal)
    must round-trip save -> load -> save with its type, dtype and value; and the reloaded
    optimizer's next steps are bitwise the uninterrupted one's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    x, y = torch.randn(16, 3, dtype=dtype), torch.randn(16, 2, dtype=dtype)

    def closure():
        out = net(x)
        return F.mse_loss(out, y), out

    opt = hessfree.HessianFree(net.parameters(), **kw)
    for _ in range(3):
        opt.step(closure)
    saved = opt.state_dict()
    assert saved["state"][0]["rng_state"].dtype == torch.uint8
    fresh = _reloaded(opt, net.parameters(), **kw)
    _assert_same_state(saved["state"][0], fresh.state_dict()["state"][0])
    start = copy.deepcopy(net.state_dict())
    for _ in range(2):
        opt.step(closure)
    ahead = [p.detach().clone() for p in net.parameters()]
    net.load_state_dict(start)
    for _ in range(2):
        fresh.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(ahead, net.parameters(), strict=True))


def test_leftovers19_float64_loss_probe_survives_a_reload_under_float32_params(one_thread):
    """The local phase keeps H_l u of the outputs (``phase_probe``, a tuple holding a tensor)
    in the state. With float32 parameters and float64 outputs (``model(x).double()``) the
    loader rounded it to float32 (fails on main); it must come back float64 and bitwise."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))  # noqa: E731
    teacher, model = make(), make()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = torch.softmax(6 * teacher(x), 1).double()

    def closure():
        out = model(x).double()
        return F.cross_entropy(out, y), out

    opt = hessfree.HessianFree(model.parameters())
    for _ in range(40):
        opt.step(closure)
        if "phase_probe" in opt._global_state():
            break
    saved = opt.state_dict()
    probe = saved["state"][0]["phase_probe"]
    assert probe[1].dtype == torch.float64  # the outputs' dtype
    fresh = _reloaded(opt, model.parameters())
    reloaded = fresh.state_dict()["state"][0]["phase_probe"][1]
    assert reloaded.dtype == torch.float64 and torch.equal(reloaded, probe[1])
    _assert_same_state(saved["state"][0], fresh.state_dict()["state"][0])


# --------------------------------------------------------------------------------------------
# 2. did-you-mean for a misspelt `products` key
# --------------------------------------------------------------------------------------------


def test_leftovers19_products_key_typo_gets_a_did_you_mean():
    """``products={'cuda_graf': True}`` was refused without the suggestion HessianFree's own
    keywords get (fails on main). Oracle: difflib's closest name."""
    net = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"Did you mean `cuda_graph` for 'cuda_graf'\?") as err:
        hessfree.HessianFree(net.parameters(), products={"cuda_graf": True})
    assert "'cuda_graph', 'precision', 'warmup'" in str(err.value)
    with pytest.raises(ValueError) as err:  # no close name: no suggestion
        hessfree.HessianFree(net.parameters(), products={"zzz": 1})
    assert "Did you mean" not in str(err.value)


def test_leftovers19_products_with_a_non_string_key_is_refused_in_words():
    """``products={3: 1, 'zzz': 1}``: sorting the unknown keys raised TypeError "'<' not
    supported between instances of 'str' and 'int'" from inside (fails on main)."""
    with pytest.raises(ValueError, match=r"Unknown `products` key\(s\) \['zzz', 3\]"):
        hessfree.HessianFree(nn.Linear(2, 1).parameters(), products={3: 1, "zzz": 1})


def test_leftovers19_yaml_products_typo_gets_the_suggestion(tmp_path, capsys):
    """The runner passes the same refusal through (fails on main: no suggestion)."""
    config = write_tiny(
        tmp_path, optimizers=[{"name": "hessianfree", "products": {"cuda_graf": True}}]
    )
    err = refused(["run", str(config), "--check"], capsys)
    assert "Did you mean `cuda_graph`" in err
