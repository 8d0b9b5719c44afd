"""Data-parallel HF over gloo on loopback: equals the single-process full-batch run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hessfree import GGNLinearOperator, HessianFree
from hessfree.distributed import Averager

WORKER = Path(__file__).with_name("_dist_worker.py")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _launch(tmp_path: Path, world: int, steps: int, *extra: str) -> list[subprocess.Popen]:
    init = tmp_path / f"init-{world}"
    out = tmp_path / f"params-{world}.pt"
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(r),
                str(world),
                str(init),
                str(out),
                str(steps),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def _wait_all(procs: list) -> None:
    """Wait for every process; kill any still running when one fails or hangs, so that a
    failure never leaves workers behind."""
    try:
        for p in procs:
            _, err = p.communicate(timeout=600)  # a hang bound: 12 s a test under load 5
            assert p.returncode == 0, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _run_against_single(tmp_path: Path, steps: int, *extra: str) -> tuple[dict, dict]:
    """Two ranks and a single process on the same task; their saved results (:func:`_wait_all`)."""
    _wait_all(_launch(tmp_path, 2, steps, *extra) + _launch(tmp_path, 1, steps, *extra))
    dp = torch.load(tmp_path / "params-2.pt", weights_only=True)
    single = torch.load(tmp_path / "params-1.pt", weights_only=True)
    return dp, single


def test_two_gloo_ranks_equal_single_process_full_batch(tmp_path):
    dp, single = _run_against_single(tmp_path, 4)
    for a, b in zip(dp["final"], single["final"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    moved = max(
        float((a - b).abs().max()) for a, b in zip(single["final"], single["init"], strict=True)
    )
    assert moved > 1e-2, "the reference run did not train; the comparison would be vacuous"


def test_a_crashed_rank_makes_the_survivor_exit_nonzero_within_timeout(tmp_path):
    procs = _launch(tmp_path, 2, 3, "crash")
    codes = []
    try:
        for p in procs:
            try:
                # a hang detector, not a timing: generous, since on a loaded machine starting
                # two processes that import torch is slow
                p.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                pytest.fail("a rank hung after its peer crashed")
            codes.append(p.returncode)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert codes[1] == 3
    assert codes[0] == 1  # a Python error after the peer vanished, not an abort in teardown


def test_scipy_operators_sum_over_ranks(tmp_path):
    """Shards of 32 examples on two ranks (one ragged split into 10 + 22 on each) equal the
    operator over all 64 examples in one process, also for a Fisher of a class-weighted mean
    with ignored targets, whose batches and ranks hold unequal shares of the loss; the
    Monte-Carlo Fisher equals its per-rank draws weighted by each rank's share."""
    dp, single = _run_against_single(tmp_path, 0, "operator")
    keys = ("ggn", "grad", "fisher", "fgrad", "fisher_weighted", "fisher_cached", "mc_fisher")
    for key in keys:
        torch.testing.assert_close(dp[key], single[key], rtol=1e-10, atol=1e-12)


def test_ranks_weighted_by_shard_size_equal_the_union(tmp_path):
    """Shards of 1 and 63 examples: with `process_group=Averager(weight=shard size)` two
    ranks take the single process's steps on all 64 examples; with the plain mean over the
    ranks (the lone example counts 63 times as much as each other) they do not. A weight of
    exactly 1 once passed for 'unweighted' on its rank, which then skipped the collective
    that sums the weights: the ranks' collectives went out of step."""
    dp, single = _run_against_single(tmp_path, 3, "weighted")
    for a, b in zip(dp["final"], single["final"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    apart = max(
        float((a - b).abs().max()) for a, b in zip(dp["unweighted"], single["final"], strict=True)
    )
    assert apart > 1e-3, "the unweighted run matched too: the test could not fail"
    # a weight on rank 0 only: refused on the first step on both ranks (before: the ranks'
    # collectives went out of step and gloo timed out after 60 s waiting for a recv)
    assert "Some of the 2 ranks gave the Averager a `weight`" in dp["mixed"]
    assert "this rank: weight=1.0" in dp["mixed"] and not dp["moved"]
    # settings that differ across the ranks: refused at the first step, naming them (before:
    # one rank ran another CG budget, its collectives out of step: a hang until the timeout)
    assert "settings differ across the 2 ranks" in dp["settings"]
    assert "`cg_max_iter`: rank 0 20, rank 1 21" in dp["settings"]
    # ranks resumed from different parameters: refused at the first step after the load
    # (before: only state step 0 was checked; the ranks trained on mixed averages)
    assert "Parameters differ across the 2 ranks" in dp["resumed"]
    assert "load the same one on every rank" in dp["resumed"]
    # a float32 rank beside a float64 one: the parameters' dtype named, rank by rank
    assert (
        "rank 0 '75 entries of torch.float64', rank 1 '75 entries of torch.float32'"
        in (dp["resumed"])
    )


def test_auto_floor_falls_with_the_global_batch_on_every_rank(tmp_path):
    """The default λ floor ('auto', 1 % of the curvature scale × (b₀ / b)^1.5 on a larger
    batch b, × b₀ / b on a smaller one) on batches of 32,
    32, 48, 40, 64 and 24 cases split unevenly (5/27, 20/12, 10/38, ...): both ranks count
    the batch over the ranks, so they keep the same floor as one process on the whole batch
    and take its steps. With each rank's own count the floors differ by rank (rank 0's
    cases go 5 → 20 → 10 while rank 1's go 27 → 12 → 38)."""
    _wait_all(_launch(tmp_path, 2, 6, "growing") + _launch(tmp_path, 1, 6, "growing"))
    single = torch.load(tmp_path / "params-1.pt.0", weights_only=True)
    ranks = [torch.load(tmp_path / f"params-2.pt.{r}", weights_only=True) for r in (0, 1)]
    # from step 1 (the objective is seen stochastic) b₀ = 32 and b is the whole batch
    assert single["cases"][1:] == [(32, b) for b in (32, 48, 40, 64, 24)]
    floors = np.array(single["floors"][1:])
    ratios = [(32 / b) ** (1.5 if b > 32 else 1.0) for b in (32, 48, 40, 64, 24)]
    np.testing.assert_allclose(floors / ratios, floors[0], rtol=1e-12)
    for dp in ranks:
        assert dp["cases"] == single["cases"]
        np.testing.assert_allclose(dp["floors"], single["floors"], rtol=1e-9)
        for a, b in zip(dp["final"], single["final"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_ranks_training_separate_models_are_refused_then_train_in_their_own_groups(tmp_path):
    """Each rank its own model: in the default group the first step refuses (the parameters
    differ across the ranks; nothing averaged) and says how to opt out; in one-rank groups
    from `new_subgroups(group_size=1)` rank 0 then trains exactly as a process of its own
    on the same shard."""
    dp, alone = _run_against_single(tmp_path, 3, "separate")  # alone: rank 0's shard
    assert "Parameters differ across the 2 ranks" in dp["message"]
    assert "new_subgroups(group_size=1)" in dp["message"]
    # a group rank 1 is not in: refused there (torch skipped the collectives with a warning
    # and reported a world size of -1: every average came back negated, an ascent step)
    outside = (tmp_path / "params-2.pt.outside").read_text()
    assert "global rank 1) is not a member of the given `process_group`" in outside
    for a, b in zip(dp["final"], alone["final"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_averager_weight_is_validated():
    for bad in (0, -2.0, float("nan"), float("inf"), True, "3", np.bool_(True), np.int64(0)):
        with pytest.raises(ValueError, match="finite number > 0"):
            Averager(weight=bad)
    for bad in (torch.tensor(True), torch.tensor(1j), torch.tensor([2.0, 3.0])):
        with pytest.raises(ValueError, match="finite number > 0"):
            Averager(weight=bad)
    # a shard size as numpy or torch computes it (len of an index array, mask.sum())
    for good, value in ((np.int64(63), 63.0), (np.float32(2.5), 2.5), (torch.tensor(7), 7.0)):
        averager = Averager(weight=good)
        assert averager.weighted and averager.weight == value
        assert type(averager.weight) is float
    with pytest.raises(TypeError, match="pass its process group"):
        Averager(Averager())


def test_averager_is_identity_without_process_group():
    a = Averager()
    t = torch.tensor([1.0, 2.0])
    assert a.mean(t) is t and a.mean_scalar(2.5, t) == 2.5
    a.check_same(t)  # nothing to compare against
    with pytest.raises(ValueError, match="not initialised"):
        Averager(group=object())


def test_live_optimizer_and_operator_do_not_keep_a_destroyed_group_alive(tmp_path):
    """An optimizer or operator kept to the end of a script must not keep the destroyed default
    group alive: its teardown would then run at interpreter exit, after the peers have gone
    (where gloo can abort). One in-process rank; the group is destroyed before the test ends."""
    import weakref

    # torch's first optimizer imports torch._dynamo, and that import, made while a group is
    # alive, keeps the group to the end of the process (torch's own reference): import it first
    import torch._dynamo  # noqa: F401

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        world = weakref.ref(dist.group.WORLD)
        avg = Averager()
        assert avg.active and avg.world_size == 1 and avg.rank == 0
        assert float(avg.sum(torch.tensor([2.5]))) == 2.5  # the default group, looked up
        model = torch.nn.Linear(3, 2).double()
        x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        op = GGNLinearOperator(model, torch.nn.MSELoss(), (x, y))
        opt = HessianFree(model.parameters(), cg_max_iter=3)
        opt.step(lambda: (torch.nn.functional.mse_loss(out := model(x), y), out))
    finally:
        dist.destroy_process_group()
    assert world() is None, "a live Averager, operator or optimizer still holds the group"
    assert op.shape == (8, 8) and opt.last_step is not None  # both still alive here


def test_ddp_model_with_lbfgs_closure_gets_a_message_and_keeps_its_parameters(tmp_path):
    """DistributedDataParallel cannot reduce a gradient that carries its graph, which an
    LBFGS-style closure's backward() builds for Hessian products: torch said only that 'a leaf
    Variable ... is used in an in-place operation'. The message names DDP and the two ways
    out, the parameters are untouched, and the `(loss, outputs)` closure trains the same DDP
    model. One in-process rank."""
    import torch._dynamo  # noqa: F401  (see the test above: keeps no group alive)
    import torch.nn.functional as F

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(1)
        net = torch.nn.Sequential(
            torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).double()
        model = torch.nn.parallel.DistributedDataParallel(net)
        x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
        opt = HessianFree(model.parameters(), cg_max_iter=5)
        before = [p.detach().clone() for p in net.parameters()]

        def lbfgs_style():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        with pytest.raises(RuntimeError, match="DistributedDataParallel"):
            opt.step(lbfgs_style)
        for p, p0 in zip(net.parameters(), before, strict=True):
            assert torch.equal(p, p0)

        model = torch.nn.parallel.DistributedDataParallel(net)  # the failed one is spent
        opt = HessianFree(model.parameters(), cg_max_iter=5)
        with torch.no_grad():
            loss0 = float(F.cross_entropy(net(x), y))
        for _ in range(3):
            opt.step(lambda: (F.cross_entropy(out := model(x), y), out))
        with torch.no_grad():
            assert float(F.cross_entropy(net(x), y)) < 0.9 * loss0
    finally:
        dist.destroy_process_group()


def test_replicated_curvature_batch_reduces_no_products(tmp_path):
    """Every rank computes the products on the same 40 examples: the step equals the one
    process run and each step's all_reduces are the loss, the gradient, replay_rng's
    agreement on whether any rank drew random numbers, and one per trial loss (every closure
    call but the first two, the gradient and curvature closures), none per CG product."""
    dp, single = _run_against_single(tmp_path, 3, "replicated")
    for a, b in zip(dp["final"], single["final"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for i, (reduces, closure_calls, matvecs) in enumerate(dp["steps"]):
        assert matvecs > 2
        # first step: also the parameters' and the curvature losses' agreement (2 + 2)
        assert reduces == 3 + (closure_calls - 2) + (4 if i == 0 else 0)


def test_a_closure_drawing_on_one_rank_only_keeps_the_ranks_in_step(tmp_path):
    """replay_rng (the default) evaluates f(θ0) once more on a step whose closure drew random
    numbers, and that evaluation is averaged over the ranks: rank 0's closure draws (adding
    0 × torch.rand to its loss), rank 1's does not. Both ranks must make the evaluation, or
    their collectives go out of step (a hang or a wrong sum); the run equals the single
    process's, whose closure draws."""
    dp, single = _run_against_single(tmp_path, 4, "somedraw")
    for a, b in zip(dp["final"], single["final"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    moved = max(
        float((a - b).abs().max()) for a, b in zip(single["final"], single["init"], strict=True)
    )
    assert moved > 1e-2, "the reference run did not train; the comparison would be vacuous"
    # the single process drew: every step made the extra evaluation (4 calls: the model's,
    # f(θ0; m2), at least one trial), as did both ranks
    assert all(calls >= 3 for _, calls, _ in single["steps"])


@pytest.mark.slow  # two processes that import torch: ~20 s on a loaded 2-core machine
def test_mc_fisher_labels_are_drawn_per_rank_from_seed_step_and_rank(tmp_path):
    """curvature='fisher_mc' on sharded batches: every rank drew its labels from the optimizer's
    generator, the same numbers on every shard (labels correlated across ranks). Each step's
    labels now come from a generator seeded by (seed, step, rank): the recorded states differ
    between the ranks and equal that seed's, and the ranks stay in step."""
    from hessfree._rng import _batch_seed

    _wait_all(_launch(tmp_path, 2, 3, "mcfisher"))
    runs = [torch.load(tmp_path / f"params-2.pt.{r}", weights_only=True) for r in range(2)]
    assert [len(run["states"]) for run in runs] == [3, 3]
    for step in range(3):
        a, b = (run["states"][step] for run in runs)
        assert not torch.equal(a, b)
        for rank, state in enumerate((a, b)):
            want = torch.Generator().manual_seed(_batch_seed(3, step, rank)).get_state()
            assert torch.equal(state, want), (step, rank)
    for x, y in zip(runs[0]["final"], runs[1]["final"], strict=True):
        assert torch.equal(x, y)


def test_curvature_batch_option_is_validated():
    with pytest.raises(ValueError, match="Unknown `curvature_batch` 'shared'"):
        HessianFree([torch.zeros(2, requires_grad=True)], curvature_batch="shared")
