"""The relative λ floor under structural damping: a release checked on fresh batches.

Issue #14, section "sfloor" of ``experiments/README.md``. ``relative_min_damping='auto'`` holds
λ on 0.01 × s₀ for a whole addition run (every step draws a new batch, so the objective is
never seen deterministic and the floor never lifts). Section "floor" tried releasing it on ρ
alone (its ``C``: after 3 consecutive steps on the floor with ρ > ¾, re-armed by ρ < ¼): it
tied or won every addition seed, but on CURVES, where λ sits on the floor with ρ ≈ 1 because
each step fits its small batch, it released 6 times in 100 steps and cost 1.08× train error.

``E`` adds what separates the two without an extra evaluation: every step's starting loss is
on a batch the previous steps did not see, so over a window of k steps the *fresh* reduction
f_{n-k}(θ_{n-k}) − f_n(θ_n) (each term a new batch at its own weights; the sum telescopes, so
only two batch means' noise enters) estimates the reduction of the expected loss, while
Σ (loss − loss_after) over the window is what the steps achieved on the batches they fitted.
The ratio ``fresh`` of the two is ≈ 1 where steps generalise and ≪ 1 where they fit the batch.
``E`` releases as ``C`` does, but only while ``fresh ≥ theta`` as well, and re-arms the floor
when ρ < ¼ or ``fresh < theta``. ``S`` applies the floor to the identity part of λ's metric
only (the structural coefficient λμ/N follows the unfloored λ), ``U`` to the structural part
only (λ unfloored). Runs that need more than ``BUDGET`` s are checkpointed and resumed by the
next process with the same arguments (the row then ends in ``resume``).
Nothing in the library changes (subclasses of the optimizer).

Usage::

    python experiments/_sfloor.py 50 70 0,1 D,E       # length, step cap, seeds, names
    python experiments/_sfloor.py curves 100 D,C,E    # quick CURVES, steps, names
    python experiments/_sfloor.py fresh 50 70 3 C     # fresh ratios along one run (T 0: CURVES)
    python experiments/_sfloor.py scale 50 0,1,2        # s₀'s parts at the first step
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _floor_scale as fs  # noqa: E402
import scorecard as sc  # noqa: E402
from _addition50 import _opt, task_for  # noqa: E402
from _floor_scale import RhoRelease  # noqa: E402

from hessfree import HessianFree  # noqa: E402
from hessfree.optimizer import _examples, _structural_weight  # noqa: E402


def fresh_ratio(log: list, k: int) -> float:
    """Fresh-batch reduction over the last ``k`` complete steps / their in-batch reduction.

    ``log[-1].loss`` is the newest step's starting loss (its batch unseen before); the window
    is steps ``-k-1 … -2``, whose in-batch reductions are ``loss − loss_after``."""
    if len(log) < k + 1:
        return math.nan
    window = log[-k - 1 : -1]
    seen = sum(s.loss - s.loss_after for s in window)
    fresh = log[-k - 1].loss - log[-1].loss
    return fresh / seen if seen > 0 else math.nan


class FreshRelease(RhoRelease):
    """``C`` whose release also needs the fresh-batch ratio ≥ ``theta`` (re-armed below it)."""

    theta = 0.5

    def step(self, *args, **kwargs):
        out = HessianFree.step(self, *args, **kwargs)
        self.log.append(self.last_step)
        info, st = self.last_step, self._global_state()
        rho = info.rho if info.rho is not None else math.nan
        fresh = fresh_ratio(self.log, self.k)
        self.fresh.append(fresh)
        on_floor = info.damping <= info.damping_floor * (1 + 1e-9) and info.damping_floor > 0
        if st.get("floor_off"):
            if not rho >= 0.25 or not fresh >= self.theta:  # NaN too
                st["floor_off"], st["good"] = False, 0
        else:
            st["good"] = st.get("good", 0) + 1 if on_floor and rho > 0.75 else 0
            if st["good"] >= self.k and fresh >= self.theta:
                st["floor_off"] = True  # the next step's _track_unfloored releases λ
        return out

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fresh: list[float] = []


class StructuralUnfloored(fs.Recorded):
    """The floor on the identity part of λ's metric only: the structural term's coefficient
    λμ/N follows the unfloored λ (``state['damping_unfloored']``) while the floor is on."""

    def _curvature_product(self, evaluation, params, run):
        curvature, product = super()._curvature_product(evaluation, params, run)
        shadow = run.state.get("damping_unfloored")
        if run.structural_damping > 0 and shadow is not None and shadow < run.damping:
            product.weight = _structural_weight(shadow, run.structural_damping, product.hidden)
        return curvature, product


class IdentityUnfloored(fs.Recorded):
    """The converse of ``S``: λ unfloored (``relative_min_damping=0``), the structural term's
    coefficient λμ/N raised to the floor 0.01 s₀ on stochastic steps (s₀ as ``'auto'``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "relative_min_damping": 0.0})

    def _curvature_product(self, evaluation, params, run):
        curvature, product = super()._curvature_product(evaluation, params, run)
        floor = 0.01 * run.state.get("damping_scale", 0.0)
        stochastic = run.state.get("deterministic") is False
        if run.structural_damping > 0 and stochastic and run.damping < floor:
            product.weight = _structural_weight(floor, run.structural_damping, product.hidden)
        return curvature, product


fs.CLASSES.update({"E": FreshRelease, "S": StructuralUnfloored, "U": IdentityUnfloored})


def fresh_trace(length: int, cap: int, seed: int, name: str) -> None:
    """One run's fresh ratios (k = 3) at every step, with λ, floor and ρ."""
    if length == 0:
        task = sc.make_curves_task(quick=True)
        regime = dict(batch=250, curvature_batch=62, kw={})
    else:
        task, regime = task_for(length, 1e9, seed), None
        regime = task.hf_default_regime
    sc.HessianFree = fs.CLASSES[name]
    r = sc.hf_run(task, name, "HF", regime)
    sc.HessianFree = HessianFree
    opt = _opt(r)
    rows = []
    while len(opt.log) < cap:
        r.step()
        s = opt.log[-1]
        on = s.damping <= s.damping_floor * (1 + 1e-9) and s.damping_floor > 0
        rows.append(
            f"{len(opt.log)}:{fresh_ratio(opt.log, 3):.2f}/{s.rho:.2f}/{'F' if on else '-'}"
        )
    print(f"{length} {seed} {name} step:fresh/rho/onfloor", " ".join(rows), flush=True)


#: wall seconds of stepping per process: a run that needs more is checkpointed and resumed
#: by the next process (``CKPT``), so no process outlasts ~90 s on 2 shared cores
BUDGET = float(os.environ.get("SFLOOR_BUDGET", "85"))
CKPT = Path("/tmp/sfloor-ckpt")


def _cells(r: sc.Run) -> dict:
    """The step closure's variables (the batch sampler and step counters of ``hf_run``)."""
    return dict(zip(r.step.__code__.co_freevars, r.step.__closure__ or [], strict=True))


def _save(path: Path, r: sc.Run, opt: fs.Recorded, sha5: str) -> None:
    cells = _cells(r)
    batches = cells["batches"].cell_contents
    torch.save(
        dict(
            model=r.model.state_dict(),
            opt=opt.state_dict(),
            log=opt.log,
            sha5=sha5,
            batches={k: v for k, v in vars(batches).items() if k != "gen"},
            gen=batches.gen.get_state(),
            counters={k: list(cells[k].cell_contents) for k in ("steps", "full_steps")},
        ),
        path,
    )


def _load(path: Path, r: sc.Run, opt: fs.Recorded) -> str:
    ck = torch.load(path, weights_only=False)
    cells = _cells(r)
    r.model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    opt.log[:] = ck["log"]
    batches = cells["batches"].cell_contents
    vars(batches).update(ck["batches"])
    batches.gen.set_state(ck["gen"])
    for k, v in ck["counters"].items():
        cells[k].cell_contents[:] = v
    return ck["sha5"]


def one(length: int, cap: int, seed: int, name: str) -> str:
    """``_floor_scale.one`` in processes of at most ``BUDGET`` s of stepping: ``cap`` steps,
    solved, or a checkpoint (the row then ends in ``resume``: run the same command again)."""
    task = task_for(length, 1e9, seed)
    sc.HessianFree = fs.CLASSES[name]
    r = sc.hf_run(task, name, "HF", task.hf_default_regime)
    sc.HessianFree = HessianFree
    opt = _opt(r)
    CKPT.mkdir(exist_ok=True)
    path = CKPT / f"{length}-{seed}-{name}.pt"
    sha5 = _load(path, r, opt) if path.exists() else "-"
    solved, err = None, task.error(r.model)
    t0, start = time.perf_counter(), len(opt.log)
    while len(opt.log) < cap and solved is None and time.perf_counter() - t0 < BUDGET:
        r.step()
        err = task.error(r.model)
        if len(opt.log) == 5:
            flat = torch.cat([p.detach().reshape(-1) for p in r.model.parameters()])
            sha5 = hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:10]
        if err <= fs.SOLVED:
            solved = len(opt.log)
    done = solved is not None or len(opt.log) >= cap
    if done:
        path.unlink(missing_ok=True)
    else:
        _save(path, r, opt, sha5)
    log = opt.log
    on = sum(s.damping <= s.damping_floor * (1 + 1e-9) and s.damping_floor > 0 for s in log)
    lam = " ".join(f"{log[i].damping:.2g}" for i in (0, 1, 2, 5, 10, 20, 40, 60) if i < len(log))
    return (
        f"| {length} | {seed} | {name} | {solved if solved else '–'} | {err:.3f} | "
        f"{len(log)} | {lam} | {log[-1].damping_floor:.2g} | {on}/{len(log)} | {sha5} | "
        f"{(time.perf_counter() - t0) / max(len(log) - start, 1):.2f} |{'' if done else ' resume'}"
    )


class ScaleParts(fs.Recorded):
    """Keeps the parts of the first step's scale: gᵀCg, gᵀg, μ‖J_h g‖²/N."""

    def _calibrate_damping(self, curvature, product, g, g_norm, run) -> None:
        with torch.enable_grad():
            gCg = float(g @ curvature(g))
            energy = float(product.hidden_energy(g.unsqueeze(0))[0] / _examples(product.hidden))
        self.parts = (gCg, g_norm**2, run.structural_damping * energy)
        super()._calibrate_damping(curvature, product, g, g_norm, run)


def scale_parts(length: int, seeds: list[int]) -> None:
    print("| T | seed | gᵀCg | gᵀg | μ‖J_h g‖²/N | structural share | s₀ | gᵀCg/gᵀg |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        task = task_for(length, 1e9, seed)
        sc.HessianFree = ScaleParts
        r = sc.hf_run(task, "D", "HF", task.hf_default_regime)
        sc.HessianFree = HessianFree
        r.step()
        gCg, gg, sh = _opt(r).parts
        print(
            f"| {length} | {seed} | {gCg:.3g} | {gg:.3g} | {sh:.3g} | {sh / (gg + sh):.3f} | "
            f"{gCg / (gg + sh):.3g} | {gCg / gg:.3g} |",
            flush=True,
        )


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1] == "scale":
        scale_parts(int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")])
        return
    if sys.argv[1] == "fresh":
        print(f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
        fresh_trace(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        print(f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
        return
    fs.one = one  # the wall budget
    fs.main()


if __name__ == "__main__":
    main()
