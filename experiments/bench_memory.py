"""Peak memory of HF steps against a gradient (SGD) step, the way ``bench.py`` measures it.

    python experiments/bench_memory.py             # 3 HF steps, full settings (≤ 50 CG iterations)
    python experiments/bench_memory.py --steps 5 --cg-max-iter 250

CURVES autoencoder, batch 2,000, in a spawned worker (``_bench_common.peak_memory``: the
resident-set high-water mark above the level before the step, glibc serving every allocation of
64 KiB or more by ``mmap``). Besides the whole steps it prints the high-water mark reached before
and at the end of CG within each step, and the pieces of ``_bench_steps.memory_task``.
Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this tree's hessfree, also in the spawned worker

import torch  # noqa: E402
from _bench_common import (  # noqa: E402
    Settings,
    _status_kib,
    _trim,
    make_problem,
    peak_memory,
    run_in_worker,
)


def task(settings: Settings, steps: int) -> dict:
    from _bench_steps import _optimizers, memory_task

    import hessfree.optimizer as hf_optimizer

    marks: list[tuple[str, float]] = []
    base = [0]
    real_cg = hf_optimizer.cg

    def cg(*args, **kwargs):  # records the high-water mark before and after CG
        marks.append(("before CG", (_status_kib("VmHWM") - base[0]) / 1024))
        result = real_cg(*args, **kwargs)
        marks.append(
            (f"end of CG ({result.num_iter} it.)", (_status_kib("VmHWM") - base[0]) / 1024)
        )
        return result

    hf_optimizer.cg = cg  # before _optimizers, whose timer wraps whatever cg is then
    try:
        prob = make_problem("autoencoder", settings.device, settings.seed)
        opts, _, _ = _optimizers(prob, settings)
        opts["sgd"]()  # warm: momentum buffers exist, as in training
        sgd = peak_memory(opts["sgd"], settings.device)[0]
        hf = []
        for _ in range(steps):
            marks.clear()
            _trim()
            base[0] = _status_kib("VmRSS")
            hf.append((peak_memory(opts["hf"], settings.device)[0], list(marks)))
    finally:
        hf_optimizer.cg = real_cg
    return {"sgd": sgd, "hf": hf, "parts": memory_task(settings)["parts"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cg-max-iter", type=int, default=Settings.step_cg_max_iter)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    settings = Settings.make(False, threads=args.threads)
    settings.step_cg_max_iter = args.cg_max_iter
    res = run_in_worker(task, settings, args.steps)
    if "error" in res:
        raise SystemExit(res["error"])
    sgd = res["sgd"]
    print(f"torch {torch.__version__}, SGD step peak {sgd:.1f} MiB\n")
    print("| HF step | peak MiB | / SGD step | high-water marks within the step (MiB) |")
    print("|---|---|---|---|")
    for k, (peak, marks) in enumerate(res["hf"], start=1):
        where = ", ".join(f"{name} {value:.1f}" for name, value in marks)
        print(f"| {k} | {peak:.1f} | {peak / sgd:.2f} | {where} |")
    print("\n| piece (bench memory_task) | peak MiB | kept MiB | peak / SGD step |")
    print("|---|---|---|---|")
    for name, (peak, kept) in res["parts"].items():
        print(f"| {name} | {peak:.1f} | {kept:.1f} | {peak / sgd:.2f} |")


if __name__ == "__main__":
    main()
