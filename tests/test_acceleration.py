"""ProductPolicy: validation, the eager fall-backs a CPU can exercise, and bf16 accuracy."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfree.acceleration as acceleration
from hessfree import GGNProduct, HessianFree, ProductPolicy, accelerate, cg


def _ggn(dtype: torch.dtype) -> GGNProduct:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Sigmoid(), nn.Linear(40, 10)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 20, generator=gen).to(dtype)
    y = torch.randn(64, 10, generator=gen).to(dtype)
    out = model(x)
    return GGNProduct(F.mse_loss(out, y), out, list(model.parameters()))


def test_policy_validation():
    with pytest.raises(ValueError, match="Unknown `precision` 'fp8'"):
        ProductPolicy(precision="fp8")
    with pytest.raises(TypeError, match="`cuda_graph` must be a bool"):
        ProductPolicy(cuda_graph=1)
    with pytest.raises(ValueError, match="`warmup`"):
        ProductPolicy(warmup=0)
    with pytest.raises(ValueError, match="Unknown `products` key"):
        ProductPolicy.of({"graph": True})
    with pytest.raises(TypeError, match="`products` must be None, a ProductPolicy"):
        HessianFree([torch.zeros(2, requires_grad=True)], products="bf16")
    assert ProductPolicy.of({"precision": "bf16"}) == ProductPolicy(precision="bf16")


def test_default_policy_leaves_the_product_alone():
    def matvec(v):
        return 2 * v

    assert accelerate(matvec, torch.zeros(3)) is matvec
    assert accelerate(matvec, torch.zeros(3), ProductPolicy(precision="tf32")) is not matvec


def test_cuda_graph_on_cpu_falls_back_to_the_eager_product():
    G = _ggn(torch.float64)
    v = torch.randn(G.layout.numel, dtype=torch.float64)
    mv = accelerate(G.matvec, v, ProductPolicy(cuda_graph=True))
    assert "CUDA device" in mv.fallback_reason
    torch.testing.assert_close(mv(v), G.matvec(v), rtol=0, atol=0)
    assert mv.mode == "eager"


def test_failed_capture_warns_once_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(acceleration, "_on_cuda", lambda like: True)

    def capture(matvec, like, warmup):  # what a product that syncs raises under capture
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(acceleration, "_capture", capture)
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    mv = accelerate(lambda v: A @ v, torch.zeros(2), ProductPolicy(cuda_graph=True))
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        out = mv(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0]))
    out = mv(torch.tensor([0.0, 1.0]))  # no second warning, no second capture
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0]))
    assert mv.mode == "eager" and "not permitted" in mv.fallback_reason


def test_replay_copies_in_and_out_and_sends_other_shapes_to_the_eager_product():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    static_in, static_out = torch.zeros(2), torch.zeros(2)

    def replay():  # stands in for CUDAGraph.replay: recorded kernels read in, write out
        torch.matmul(A, static_in, out=static_out)

    eager = []

    def matvec(v):
        eager.append(v)
        return v * 0

    replayed = acceleration._Replayed(matvec, static_in, static_out, replay)
    first = replayed(torch.tensor([1.0, 0.0]))
    second = replayed(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(first, torch.tensor([2.0, 1.0]))  # not overwritten by the replay
    torch.testing.assert_close(second, torch.tensor([1.0, 3.0]))
    replayed(torch.zeros(3))
    replayed(torch.zeros(2, dtype=torch.float64))
    assert [tuple(v.shape) for v in eager] == [(3,), (2,)]


def test_bf16_products_engage_and_stay_accurate():
    G64, G32 = _ggn(torch.float64), _ggn(torch.float32)
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(G64.layout.numel, dtype=torch.float64, generator=gen)
    exact = G64.matvec(v)
    mv = accelerate(G32.matvec, v.float(), ProductPolicy(precision="bf16"))
    out = mv(v.float())
    assert out.dtype == torch.float32
    err = float((out.double() - exact).norm() / exact.norm())
    err32 = float((G32.matvec(v.float()).double() - exact).norm() / exact.norm())
    # bf16 keeps 8 mantissa bits: far above float32's error, well below 2 %
    assert err32 < 1e-5 < err < 2e-2
    # CG on the bf16 product stays in float32 and lands near the float64 solution
    b = -G64.gradient
    damped64 = G64.damped(1e-2)

    def damped_bf16(u):
        return mv(u).add_(u, alpha=1e-2)

    x64 = cg(damped64, b, max_iter=30, rtol=0.0, progress_tol=None).x
    x16 = cg(damped_bf16, b.float(), max_iter=30, rtol=0.0, progress_tol=None).x
    assert x16.dtype == torch.float32
    assert float((x16.double() - x64).norm() / x64.norm()) < 5e-2


def _hf_steps(products, steps: int) -> tuple[list[torch.Tensor], HessianFree]:
    """``steps`` HF steps of a small float64 classifier; its parameters and the optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,))
    opt = HessianFree(model.parameters(), damping=0.5, cg_max_iter=10, products=products)
    for _ in range(steps):
        opt.step(lambda: (F.cross_entropy(out := model(x), y), out))
    return [p.detach() for p in model.parameters()], opt


def test_hf_step_with_cuda_graph_requested_on_cpu_equals_the_default_step():
    eager, graphed = _hf_steps(None, 2)[0], _hf_steps({"cuda_graph": True}, 2)[0]
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _cuda_ggn(seed: int = 0) -> tuple[nn.Module, GGNProduct]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 40), nn.Sigmoid(), nn.Linear(40, 10)).cuda()
    x, y = torch.randn(64, 20, device="cuda"), torch.randn(64, 10, device="cuda")
    out = model(x)
    return model, GGNProduct(F.mse_loss(out, y), out, list(model.parameters()))


@pytest.mark.cuda
def test_cuda_graph_replay_matches_the_eager_product_on_cuda():
    """A product whose graph was built on a side stream is captured there and replays the
    eager product's values; built on the default stream it cannot be (autograd launches its
    backward ops onto that stream): the capture fails, the product runs eagerly, and CUDA's
    random generator still works (a failed capture left it marked as capturing: every later
    ``torch.randn`` on the device raised, H200, torch 2.11)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _, G = _cuda_ggn()
        mv = accelerate(G.matvec, G.gradient, ProductPolicy(cuda_graph=True))
        vs = [torch.randn(G.layout.numel, device="cuda") for _ in range(3)]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fall-back here
            outs = [mv(v) for v in vs]
        assert mv.mode == "cuda_graph" and mv.fallback_reason is None
        for v, o in zip(vs, outs, strict=True):
            torch.testing.assert_close(o, G.matvec(v), rtol=1e-5, atol=1e-6)
    torch.cuda.current_stream().wait_stream(side)

    _, G = _cuda_ggn(1)  # on the default stream
    mv = accelerate(G.matvec, G.gradient, ProductPolicy(cuda_graph=True))
    v = torch.randn(G.layout.numel, device="cuda")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        out = mv(v)
    assert mv.mode == "eager"
    torch.testing.assert_close(out, G.matvec(v), rtol=1e-5, atol=1e-6)
    torch.randn(3, device="cuda")  # raised "Offset increment outside graph capture" before


@pytest.mark.cuda
def test_a_product_that_syncs_falls_back_and_leaves_the_generator_usable():
    A = torch.randn(5, 5, device="cuda")

    def syncing(v):
        return A @ v * float(v.sum() != 0)  # a host read: not allowed under capture

    mv = accelerate(syncing, torch.ones(5, device="cuda"), ProductPolicy(cuda_graph=True))
    v = torch.randn(5, device="cuda")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        torch.testing.assert_close(mv(v), A @ v)
    torch.randn(3, device="cuda")
    good = accelerate(lambda u: A @ u, v, ProductPolicy(cuda_graph=True))  # a later capture
    torch.testing.assert_close(good(v), A @ v)
    assert good.mode == "cuda_graph"


@pytest.mark.cuda
def test_hf_steps_with_cuda_graph_capture_and_equal_the_eager_steps_on_cuda():
    """``HessianFree.step`` evaluates its closures on the capture stream, so its products are
    captured (no fall-back warning) and the steps are the eager steps."""

    def run(products):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4)).cuda().double()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(128, 12, generator=gen, dtype=torch.float64).cuda()
        y = torch.randint(0, 4, (128,), generator=gen).cuda()
        opt = HessianFree(model.parameters(), cg_max_iter=20, products=products)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(3):
                opt.step(lambda: (F.cross_entropy(out := model(x), y), out))
        torch.randn(3, device="cuda")
        return [p.detach() for p in model.parameters()], opt.last_step.cg_iters

    (eager, it_e), (graphed, it_g) = run(None), run({"cuda_graph": True})
    assert it_e == it_g > 1
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("matvec", "like", "match"),
    [
        (3, torch.zeros(2), r"`matvec` must be callable \(v -> C v\), got int"),
        (lambda v: v, 3, r"`like` must be a torch.Tensor, got int"),
        (lambda v: v, [0.0, 0.0], r"`like` must be a torch.Tensor, got list"),
    ],
)
def test_accelerate_names_a_bad_argument_even_with_the_default_policy(matvec, like, match):
    with pytest.raises(TypeError, match=match):
        accelerate(matvec, like)


def test_hf_stops_trying_to_capture_after_a_failed_capture(monkeypatch):
    """A product that failed to capture fails again every step (the same closure builds the
    same graph): the optimizer captures once, then runs its products eagerly, with one
    warning, and the steps equal the default policy's."""
    monkeypatch.setattr(acceleration, "_on_cuda", lambda like: True)
    calls = []

    def capture(matvec, like, warmup):
        calls.append(warmup)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(acceleration, "_capture", capture)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        graphed, opt = _hf_steps({"cuda_graph": True}, 4)
    assert calls == [2]  # one capture, in the first step
    assert len([w for w in caught if "could not be captured" in str(w.message)]) == 1
    assert "not permitted" in opt._capture_failure
    for a, b in zip(_hf_steps(None, 4)[0], graphed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
