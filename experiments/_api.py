"""What a ``torch.optim`` user gets from HessianFree, LBFGS and SGD in the same situations (api).

Each probe builds a fresh small float64 model (seeded), puts the optimizer where a training
loop would (copies, checkpoints, schedulers, attribute access, bad input) and records "ok" or
the exception's type and the start of its message. No timing; deterministic; one thread.
Prints a markdown table (experiments/results/2026-12-02-api.md holds one run's).

    OPENBLAS_NUM_THREADS=1 python experiments/_api.py
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import hessfree

torch.set_num_threads(1)
GEN = torch.Generator().manual_seed(0)
X = torch.randn(24, 4, generator=GEN, dtype=torch.float64)
Y = torch.randn(24, 2, generator=GEN, dtype=torch.float64)
OPTIMIZERS = {
    "HessianFree": lambda ps: hessfree.HessianFree(ps),
    "LBFGS": lambda ps: torch.optim.LBFGS(ps),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1),
}


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def closure_for(model: nn.Module, opt: torch.optim.Optimizer) -> Callable:
    dtype = next(model.parameters()).dtype

    def closure():  # LBFGS style: every optimizer takes it
        opt.zero_grad()
        loss = F.mse_loss(model(X.to(dtype)), Y.to(dtype))
        loss.backward()
        return loss

    return closure


def trained(make: Callable, steps: int = 2, dtype: torch.dtype = torch.float64):
    model = mlp(dtype)
    opt = make(model.parameters())
    for _ in range(steps):
        opt.step(closure_for(model, opt))
    return model, opt


def copied(make: Callable, how: str) -> str:
    model, opt = trained(make)
    pair = {"model": model, "opt": opt}
    twin = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    twin["opt"].step(closure_for(twin["model"], twin["opt"]))
    return "ok"


def cross_dtype(make: Callable, saved: torch.dtype, loaded: torch.dtype) -> str:
    model, opt = trained(make, dtype=saved)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = mlp(loaded)
    other.load_state_dict(model.state_dict())
    opt2 = make(other.parameters())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    opt2.step(closure_for(other, opt2))
    return "ok"


def other_layout(make: Callable, build: Callable) -> str:
    _, opt = trained(make)
    make(build(list(mlp().parameters()))).load_state_dict(opt.state_dict())
    return "ok"


def freeze_first(make: Callable) -> str:
    model, opt = trained(make)
    model[0].weight.requires_grad_(False)
    opt.step(closure_for(model, opt))
    keys = [k for k, s in opt.state_dict()["state"].items() if s]
    return f"ok, state under params {keys}"


def lr_after_scheduler(make: Callable) -> str:
    model = mlp()
    opt = make(model.parameters())
    torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5).step()
    return f"opt.lr = {getattr(opt, 'lr', 'n/a')}, group lr = {opt.param_groups[0]['lr']}"


def assign_setting(make: Callable) -> str:
    opt = make(mlp().parameters())
    opt.cg_max_iter = 3
    return f"accepted; group value {opt.param_groups[0].get('cg_max_iter', 'n/a')!r}"


def one_cycle(make: Callable) -> str:
    torch.optim.lr_scheduler.OneCycleLR(make(mlp().parameters()), max_lr=1.0, total_steps=5)
    return "ok"


def step_without_closure(make: Callable) -> str:
    model = mlp()
    opt = make(model.parameters())
    F.mse_loss(model(X), Y).backward()
    opt.step()
    return "ok"


def bad_params(make: Callable, params: Callable) -> str:
    make(params())
    return "ok"


def shared_between_groups() -> list[dict]:
    w = torch.zeros(2, requires_grad=True)
    return [{"params": [w]}, {"params": [w]}]


PROBES: dict[str, Callable[[Callable], str]] = {
    "deepcopy mid-training, step the copy": lambda m: copied(m, "deepcopy"),
    "pickle mid-training, step the copy": lambda m: copied(m, "pickle"),
    "state_dict float64 -> float32 (weights_only)": lambda m: cross_dtype(
        m, torch.float64, torch.float32
    ),
    "state_dict float32 -> float64 (weights_only)": lambda m: cross_dtype(
        m, torch.float32, torch.float64
    ),
    "state_dict into 3 of 4 params": lambda m: other_layout(m, lambda ps: ps[:3]),
    "state_dict into 2 groups (saved 1)": lambda m: other_layout(
        m, lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}]
    ),
    "freeze the first param mid-training": freeze_first,
    "opt.lr after StepLR halved it": lr_after_scheduler,
    "opt.cg_max_iter = 3": assign_setting,
    "OneCycleLR (cycle_momentum=True)": one_cycle,
    "step() without closure": step_without_closure,
    "params = []": lambda m: bad_params(m, list),
    "params = [non-leaf]": lambda m: bad_params(
        m, lambda: [torch.zeros(2, requires_grad=True) * 2]
    ),
    "one tensor in two groups": lambda m: bad_params(m, shared_between_groups),
}


def run(probe: Callable, make: Callable) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return probe(make)
    except Exception as err:  # the table records what the user gets
        text = " ".join(str(err).split())
        return f"{type(err).__name__}: {text[:110]}{'...' if len(text) > 110 else ''}"


def main() -> None:
    print(f"hessfree from {hessfree.__file__}, torch {torch.__version__}\n")
    print("| situation | " + " | ".join(OPTIMIZERS) + " |")
    print("|---|" + "---|" * len(OPTIMIZERS))
    for name, probe in PROBES.items():
        cells = [run(probe, make).replace("|", "\\|") for make in OPTIMIZERS.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
