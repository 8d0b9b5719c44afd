"""record_hidden / mark_hidden: the recorded states give structural damping's exact product.

Oracles: the recurrences written out by hand (torch's documented RNN/GRU/LSTM equations, no
nn module) differentiated densely in float64 by ``torch.autograd.functional.jacobian``; the
hand-threaded closure of the runner's TanhRNN for whole HF steps.
"""

from __future__ import annotations

import copy
import io
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from hessfree import HessianFree, StructurallyDampedGGN, mark_hidden, record_hidden
from hessfree import recurrent as rec_mod
from hessfree.train.models import TanhRNN

EXACT = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class RecurrentCase:
    name: str
    kind: type
    kwargs: dict = field(default_factory=dict)
    seed: int = 0

    def build(self) -> tuple[nn.Module, nn.Linear, torch.Tensor, torch.Tensor]:
        torch.manual_seed(self.seed)
        m = self.kind(2, 3, **self.kwargs).double()
        D = 2 if m.bidirectional else 1
        head = nn.Linear(D * (self.kwargs.get("proj_size", 0) or 3), 1).double()
        N, T = 3, 4
        shape = (N, T, 2) if m.batch_first else (T, N, 2)
        x = torch.randn(shape, dtype=torch.float64)
        return m, head, x, torch.randn(N, 1, dtype=torch.float64)


RCASES = [
    RecurrentCase("rnn_tanh", nn.RNN, dict(batch_first=True)),
    RecurrentCase("rnn_relu_2layer", nn.RNN, dict(num_layers=2, nonlinearity="relu"), seed=1),
    RecurrentCase("gru_2layer_bidir", nn.GRU, dict(num_layers=2, bidirectional=True)),
    RecurrentCase("lstm_bidir_bf", nn.LSTM, dict(bidirectional=True, batch_first=True)),
    RecurrentCase("lstm_2layer_proj", nn.LSTM, dict(num_layers=2, proj_size=2), seed=2),
]


def _cell(m: nn.RNNBase, p: dict, sfx: str, x, h, c):
    """One step of torch's documented recurrences, from the parameter dict ``p``."""
    gi = x @ p["weight_ih" + sfx].T + (p["bias_ih" + sfx] if m.bias else 0)
    gh = h @ p["weight_hh" + sfx].T + (p["bias_hh" + sfx] if m.bias else 0)
    if isinstance(m, nn.LSTM):
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if m.proj_size:
            h = h @ p["weight_hr" + sfx].T
        return h, c
    if isinstance(m, nn.GRU):
        ir, iz, in_ = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, c
    return (torch.tanh if m.nonlinearity == "tanh" else torch.relu)(gi + gh), c


def _manual(m: nn.RNNBase, p: dict, x):
    """Every layer's output sequence ``(N, T, D*H_out)``, computed by hand (x is (N, T, in))."""
    N, T, _ = x.shape
    h_out = m.proj_size if isinstance(m, nn.LSTM) and m.proj_size else m.hidden_size
    seqs, inp = [], x
    for layer in range(m.num_layers):
        dirs = []
        for sfx, steps in (("", range(T)), ("_reverse", range(T - 1, -1, -1))):
            if sfx and not m.bidirectional:
                continue
            h, c = x.new_zeros(N, h_out), x.new_zeros(N, m.hidden_size)
            out = [None] * T
            for t in steps:
                h, c = _cell(m, p, f"_l{layer}{sfx}", inp[:, t], h, c)
                out[t] = h
            dirs.append(torch.stack(out, 1))
        inp = torch.cat(dirs, -1)
        seqs.append(inp)
    return seqs


def _flat_fns(m, head, x):
    """``theta -> outputs`` and ``theta -> hidden`` (flat), by hand; ``theta`` in param order."""
    named = [*m.named_parameters(), *(("head." + n, q) for n, q in head.named_parameters())]
    sizes, shapes = [q.numel() for _, q in named], [q.shape for _, q in named]
    xb = x if m.batch_first else x.transpose(0, 1)

    def split(theta):
        parts = [c.view(s) for c, s in zip(theta.split(sizes), shapes, strict=True)]
        return dict(zip([n for n, _ in named], parts, strict=True))

    def outputs(theta):
        p = split(theta)
        last = _manual(m, p, xb)[-1][:, -1]
        return last @ p["head.weight"].T + p["head.bias"]

    def hidden(theta):
        return torch.cat([s.reshape(-1) for s in _manual(m, split(theta), xb)])

    theta = torch.cat([q.detach().reshape(-1) for _, q in named])
    return outputs, hidden, theta


def _recorded_closure(m, head, x, y):
    with record_hidden(m) as rec:
        seq, _ = m(x)
    last = seq[:, -1] if m.batch_first else seq[-1]
    out = head(last)
    return F.mse_loss(out, y), out, rec.hidden


# ------------------------------------------------------------------------------ products
@pytest.mark.parametrize("rcase", RCASES, ids=[c.name for c in RCASES])
def test_recorded_structural_product_matches_dense_jacobians(rcase):
    m, head, x, y = rcase.build()
    params = [*m.parameters(), *head.parameters()]
    loss, out, hidden = _recorded_closure(m, head, x, y)
    out_fn, hid_fn, theta = _flat_fns(m, head, x)
    # the hand-written recurrences are the module's (guards the oracle itself)
    torch.testing.assert_close(out, out_fn(theta), **EXACT)
    N = y.shape[0]
    assert hidden.shape[0] == N and hidden.numel() == hid_fn(theta).numel()
    Jo = torch.autograd.functional.jacobian(out_fn, theta).reshape(-1, theta.numel())
    Jh = torch.autograd.functional.jacobian(hid_fn, theta)
    w = 0.7
    expected = Jo.T @ Jo * (2 / out.numel()) + w * Jh.T @ Jh  # MSE: H_l = 2/M I
    P = StructurallyDampedGGN(loss, out, hidden, params, weight=w)
    V = torch.randn(3, theta.numel(), dtype=torch.float64)
    for v in V:
        torch.testing.assert_close(P(v), expected @ v, **EXACT)
    torch.testing.assert_close(P.matmat(V), V @ expected.T, **EXACT)
    torch.testing.assert_close(P.hidden_energy(V), ((V @ Jh.T) ** 2).sum(1), **EXACT)


def _first_step(rcase, with_hidden: bool, **kwargs) -> torch.Tensor:
    """θ1 − θ0 of a first HF step from ``rcase``'s weights: CG solved to 1e-13 and the step
    taken whole (no backtracking, line search or extrapolation), so it is −B⁻¹g."""
    m, head, x, y = rcase.build()
    params = [*m.parameters(), *head.parameters()]
    theta0 = torch.cat([q.detach().reshape(-1) for q in params])
    opt = HessianFree(
        params,
        damping=0.5,
        cg_rtol=1e-13,
        cg_max_iter=500,
        backtrack=False,
        line_search=None,
        extrapolate=False,
        **kwargs,
    )
    opt.step(lambda: _recorded_closure(m, head, x, y)[: 3 if with_hidden else 2])
    return torch.cat([q.detach().reshape(-1) for q in params]) - theta0


def test_structural_damping_auto_is_003_with_hidden_states_and_off_without():
    rcase = RCASES[0]
    m, head, x, y = rcase.build()
    params = [*m.parameters(), *head.parameters()]
    loss, out, _ = _recorded_closure(m, head, x, y)
    g = torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(loss, params)])
    out_fn, hid_fn, theta = _flat_fns(m, head, x)
    Jo = torch.autograd.functional.jacobian(out_fn, theta).reshape(-1, theta.numel())
    Jh = torch.autograd.functional.jacobian(hid_fn, theta)
    lam, N = 0.5, y.shape[0]
    G = Jo.T @ Jo * (2 / out.numel())  # MSE: H_l = 2/M I
    eye = torch.eye(theta.numel(), dtype=torch.float64)

    def newton(mu: float) -> torch.Tensor:  # (G + λI + λμ/N J_hᵀJ_h) p = −g, densely
        return torch.linalg.solve(G + lam * eye + lam * mu / N * Jh.T @ Jh, -g)

    solved = dict(rtol=1e-8, atol=1e-10)  # CG to a relative residual of 1e-13
    auto = _first_step(rcase, with_hidden=True)
    torch.testing.assert_close(auto, newton(0.03), **solved)
    assert torch.equal(auto, _first_step(rcase, with_hidden=True, structural_damping=0.03))
    assert not torch.allclose(newton(0.03), newton(0.0), rtol=1e-4)  # the term matters here
    # no hidden states: no structural term, as with structural_damping=0
    # (precond=None: 'auto' builds K-FAC for a closure without hidden states, not with them)
    plain = _first_step(rcase, with_hidden=False, precond=None)
    torch.testing.assert_close(plain, newton(0.0), **solved)
    assert torch.equal(plain, _first_step(rcase, with_hidden=True, structural_damping=0.0))
    # nor where the term is not defined (Hessian curvature): no error, the Hessian's step
    hess = _first_step(rcase, with_hidden=True, curvature="hessian")
    assert torch.equal(hess, _first_step(rcase, with_hidden=False, curvature="hessian"))


def test_auto_cg_rtol_is_zero_where_structural_damping_is_in_effect():
    # cg_rtol='auto' follows the forcing sequence (η₀ = ½) unless the structural term is on:
    # then CG runs with η = 0, step for step as with an explicit cg_rtol=0
    rcase = RCASES[0]
    runs = {}
    for name, with_hidden, kwargs in [
        ("auto", True, {}),
        ("explicit", True, dict(structural_damping=0.03, cg_rtol=0.0)),
        ("no hidden", False, {}),
    ]:
        m, head, x, y = rcase.build()
        params = [*m.parameters(), *head.parameters()]
        opt = HessianFree(params, cg_max_iter=30, **kwargs)
        returned = 3 if with_hidden else 2
        etas = []
        for _ in range(3):
            opt.step(lambda: _recorded_closure(m, head, x, y)[:returned])  # noqa: B023
            etas.append(opt.last_step.cg_rtol)
        runs[name] = (torch.cat([q.detach().reshape(-1) for q in params]), etas)
    assert runs["auto"][1] == [0.0, 0.0, 0.0]
    assert torch.equal(runs["auto"][0], runs["explicit"][0])
    assert runs["no hidden"][1][0] == 0.5 and all(e > 0 for e in runs["no hidden"][1])


def test_structural_damping_refuses_bad_values():
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"`structural_damping` must be 'auto' or a number >= 0, "):
        HessianFree(params, structural_damping="on")
    with pytest.raises(ValueError, match=r"structural_damping.*-0\.1"):
        HessianFree(params, structural_damping=-0.1)
    with pytest.raises(TypeError, match="structural_damping"):
        HessianFree(params, structural_damping=[0.03])
    with pytest.raises(ValueError, match=r"`structural_damping` > 0 needs Gauss-Newton"):
        HessianFree(params, structural_damping=0.03, curvature="hessian")
    HessianFree(params, structural_damping="auto", curvature="hessian")  # off there, no error


def test_cell_loop_and_mark_hidden_record_every_step():
    torch.manual_seed(3)
    cell, U = nn.LSTMCell(2, 3).double(), torch.randn(3, 3, dtype=torch.float64)
    U.requires_grad_(True)
    x = torch.randn(5, 4, 2, dtype=torch.float64)  # (T, N, in)
    with record_hidden(cell) as rec:
        h = c = torch.zeros(4, 3, dtype=torch.float64)
        hs, gs = [], []
        for t in range(5):
            h, c = cell(x[t], (h, c))
            hs.append(h)
            gs.append(mark_hidden(torch.tanh(h @ U)))  # a raw-op state, examples on dim 0
    # LSTM cells: h only (c is not recorded); in call order: each step's h, then its mark
    want = torch.cat([s for pair in zip(hs, gs, strict=True) for s in pair], 1)
    got = rec.hidden
    assert got.shape == (4, 30)
    torch.testing.assert_close(got, want, **EXACT)
    # the recorded tensor's Jacobian is the states' own: compare J^T u and its double backward
    u = torch.randn_like(got)
    params = [*cell.parameters(), U]
    g = torch.autograd.grad((got * u).sum(), params, create_graph=True, retain_graph=True)
    g_ref = torch.autograd.grad((want * u).sum(), params, create_graph=True, retain_graph=True)
    torch.testing.assert_close(g, g_ref, **EXACT)
    v = [torch.randn_like(p) for p in params]
    gg = torch.autograd.grad(
        sum((a * b).sum() for a, b in zip(g, v, strict=True)), params, retain_graph=True
    )
    gg_ref = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g_ref, v, strict=True)), params)
    torch.testing.assert_close(gg, gg_ref, **EXACT)


def test_unbatched_and_packed_inputs_count_examples():
    torch.manual_seed(5)
    m = nn.GRU(2, 3, num_layers=2).double()
    x = torch.randn(4, 2, dtype=torch.float64)  # unbatched (T, in): one example
    with record_hidden(m) as rec:
        out, h_n = m(x)
    assert rec.hidden.shape == (1, 2 * 4 * 3)
    torch.testing.assert_close((out, h_n), m(x), **EXACT)

    xs = torch.randn(3, 5, 2, dtype=torch.float64)
    lengths = torch.tensor([2, 5, 3])
    packed = pack_padded_sequence(xs, lengths, batch_first=True, enforce_sorted=False)
    with record_hidden(m) as rec:
        out, h_n = m(packed)
    ref_out, ref_hn = m(packed)
    torch.testing.assert_close(out.data, ref_out.data, **EXACT)
    torch.testing.assert_close(h_n, ref_hn, **EXACT)
    hidden = rec.hidden.view(3, 2, 5, 3)  # (N, layer, T, H): padded steps are zeros
    top = pad_packed_sequence(ref_out, batch_first=True)[0]
    torch.testing.assert_close(hidden[:, 1], top, **EXACT)
    for i, n in enumerate(lengths.tolist()):
        assert hidden[i, :, n:].abs().sum() == 0 and hidden[i, :, :n].abs().min() > 0


@pytest.mark.parametrize("rcase", RCASES, ids=[c.name for c in RCASES])
def test_recorded_forward_equals_plain_forward(rcase):
    m, _, x, _ = rcase.build()
    D = 2 if m.bidirectional else 1
    hx = torch.randn(D * m.num_layers, 3, m.proj_size or 3, dtype=torch.float64)
    if rcase.kind is nn.LSTM:
        hx = (hx, torch.randn(D * m.num_layers, 3, 3, dtype=torch.float64))
    with record_hidden(m):
        got = m(x, hx)
    torch.testing.assert_close(got, m(x, hx), **EXACT)


# ------------------------------------------------------------------------------ HF steps
class _MarkedTanhRNN(TanhRNN):
    """The runner's TanhRNN with its states marked instead of returned."""

    def forward(self, x):
        us = self.input(x).unbind(1)
        h = mark_hidden(torch.tanh(us[0]))
        for u in us[1:]:
            h = mark_hidden(torch.tanh(u + self.recurrent(h)))
        return self.readout(h)


def test_hf_steps_via_recorder_equal_the_hand_threaded_tanh_rnn():
    torch.manual_seed(6)
    ref = TanhRNN(2, 5, 1, spectral_radius=1.1).double()
    marked = _MarkedTanhRNN(2, 5, 1).double()
    marked.load_state_dict(ref.state_dict())
    rnn, head = nn.RNN(2, 5, batch_first=True).double(), nn.Linear(5, 1).double()
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(ref.input.weight)
        rnn.bias_ih_l0.copy_(ref.input.bias)
        rnn.weight_hh_l0.copy_(ref.recurrent.weight)
        rnn.bias_hh_l0.zero_()
        head.load_state_dict(ref.readout.state_dict())
    rnn.bias_hh_l0.requires_grad_(False)  # TanhRNN has one bias
    x = torch.rand(16, 8, 2, dtype=torch.float64)
    y = x[:, :, :1].sum(1) / 8

    def threaded():
        out, h = ref.forward_with_hidden(x)
        return F.mse_loss(out, y), out, h

    def via_module():
        with record_hidden(rnn) as rec:
            seq, _ = rnn(x)
        out = head(seq[:, -1])
        return F.mse_loss(out, y), out, rec.hidden

    def via_marks():
        with record_hidden() as rec:
            out = marked(x)
        return F.mse_loss(out, y), out, rec.hidden

    groups = {
        "threaded": (threaded, list(ref.parameters())),
        "module": (
            via_module,
            [rnn.weight_ih_l0, rnn.bias_ih_l0, rnn.weight_hh_l0, *head.parameters()],
        ),
        "marks": (via_marks, list(marked.parameters())),
    }
    # the objective check pinned on (off by default under structural damping): it ends CG
    # early here, which keeps the routes' roundoff below the tolerance below
    opts = {
        k: HessianFree(
            ps, structural_damping=0.3, damping=1.0, cg_max_iter=20, cg_stop_on_increase=True
        )
        for k, (_, ps) in groups.items()
    }
    start = [p.detach().clone() for p in groups["threaded"][1]]
    for _ in range(3):
        for k, (closure, _) in groups.items():
            opts[k].step(closure)
        want = groups["threaded"][1]
        # float64; products differ only in summation order, which CG's 20 iterations amplify
        for k in ("module", "marks"):
            for p, q in zip(groups[k][1], want, strict=True):
                torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
            assert opts[k].last_step.status == opts["threaded"].last_step.status
    # the structural term mattered: mu = 0 from the same start takes other steps
    plain = TanhRNN(2, 5, 1).double()
    with torch.no_grad():
        for p, s in zip(plain.parameters(), start, strict=True):
            p.copy_(s)
    opt0 = HessianFree(list(plain.parameters()), damping=1.0, cg_max_iter=20)

    def closure0():
        out = plain(x)
        return F.mse_loss(out, y), out

    for _ in range(3):
        opt0.step(closure0)
    gap = max(
        float((p - q).detach().abs().max()) for p, q in zip(plain.parameters(), want, strict=True)
    )
    assert gap > 1e-4


# ------------------------------------------------------------------------------ hygiene
def test_patches_are_removed_on_exit_and_on_error():
    m = nn.LSTM(2, 3)
    custom = nn.GRU(2, 3)
    sentinel = custom.forward
    custom.forward = sentinel  # an instance-level forward someone else installed
    with record_hidden(m, custom):
        assert "forward" in m.__dict__
    assert "forward" not in m.__dict__ and custom.forward is sentinel and not rec_mod._patches
    with pytest.raises(ZeroDivisionError), record_hidden(m, custom):
        m(torch.randn(4, 1, 2))
        raise ZeroDivisionError
    assert "forward" not in m.__dict__ and custom.forward is sentinel and not rec_mod._patches
    assert rec_mod._active() == []


class _TwoRNNs(nn.Module):  # at module level, so torch.save can pickle it
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 3, batch_first=True)
        self.lstm = nn.LSTM(3, 2, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.gru(x)[0])[0]


def test_copies_made_while_recording_are_plain_modules():
    # deepcopy / torch.save copy the instance __dict__, patch included: the copy ran the
    # ORIGINAL module's parameters and stayed patched. Oracle: a fresh module, same weights.
    torch.manual_seed(0)
    model = _TwoRNNs()
    custom = nn.RNN(2, 3)
    custom.forward = custom.forward  # an instance-level forward of the user's own
    x = torch.randn(4, 5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with record_hidden(model) as rec, record_hidden(custom) as rec_custom:
        model(x)
        custom(x)
        twin, custom_twin = copy.deepcopy(model), copy.deepcopy(custom)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        inside = model.state_dict()
        twin(x)  # not one of the recorder's layers: records nothing
    assert rec.hidden.shape == (4, 5 * 3 + 2 * 5 * 2)
    assert rec_custom.hidden.shape == (5, 4 * 3)
    assert inside.keys() == before.keys()
    assert all(torch.equal(inside[k], v) for k, v in before.items())
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5)
    for copied in (twin, loaded):
        fresh = _TwoRNNs()
        fresh.load_state_dict(copied.state_dict())
        assert torch.equal(copied(x), fresh(x))
        assert not any(
            isinstance(m.__dict__.get("forward"), rec_mod._PatchedForward) for m in copied.modules()
        )
        with record_hidden(copied) as own:  # and its own recorder sees it
            copied(x)
        assert own.hidden.shape == rec.hidden.shape
    assert not torch.equal(twin(x), model(x))
    assert custom_twin.forward.__self__ is custom_twin  # the user's forward, on the copy
    assert "forward" not in model.gru.__dict__ and not rec_mod._patches


def test_nesting_reuse_and_other_threads():
    m = nn.RNN(2, 3)
    x = torch.randn(4, 2, 2)
    outer_rec = record_hidden(m)
    with outer_rec as outer:
        with record_hidden(m) as inner:
            m(x)
        assert "forward" in m.__dict__  # still patched for the outer recorder
        m(x)
        # a forward pass in another thread is neither recorded nor disturbed
        seen = {}
        t = threading.Thread(target=lambda: seen.setdefault("out", m(x)[0]))
        t.start()
        t.join()
        with pytest.raises(RuntimeError, match="already active"):
            outer_rec.__enter__()
    assert inner.hidden.shape == (2, 12) and outer.hidden.shape == (2, 24)
    assert outer.hidden is outer.hidden
    torch.testing.assert_close(seen["out"], m(x)[0])
    with outer_rec:  # re-entering starts empty
        m(x)
    assert outer_rec.hidden.shape == (2, 12)


def test_bad_inputs_are_refused_with_clear_errors():
    with pytest.raises(TypeError, match="nn.Module arguments, got str at position 0"):
        record_hidden("rnn")
    with pytest.raises(ValueError, match=r"argument 0 \(Linear\) contains no recurrent layer"):
        record_hidden(nn.Linear(2, 2))

    class Custom(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x, hx)

    with pytest.raises(ValueError, match="num_layers=2 and overrides forward"):
        record_hidden(Custom(2, 3, num_layers=2))
    m, other = nn.GRU(2, 3), nn.GRU(2, 3)
    with pytest.raises(RuntimeError, match="use the recorder as `with record_hidden"):
        _ = record_hidden(m).hidden
    with record_hidden(nn.Sequential(m, other)) as rec:
        m(torch.randn(3, 2, 2))
    with pytest.raises(RuntimeError, match=r"No forward pass of '1' \(GRU\) was recorded"):
        _ = rec.hidden
    with record_hidden() as rec:
        pass
    with pytest.raises(RuntimeError, match="mark_hidden"):
        _ = rec.hidden
    with record_hidden(m) as rec:
        m(torch.randn(3, 2, 2))  # 2 examples
        mark_hidden(torch.randn(5, 3))  # 5
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        _ = rec.hidden
    with pytest.raises(ValueError, match="`batch_dim` must index a dimension"):
        mark_hidden(torch.zeros(2, 3), batch_dim=2)
    with pytest.raises(TypeError, match="`h` must be a tensor"):
        mark_hidden([1.0])
    with record_hidden(m), pytest.raises(TypeError, match="input must be a tensor or Packed"):
        m([1.0])

    class OnlyOutput(nn.GRU):
        def forward(self, x, hx=None):
            return super().forward(x, hx)[0]

    odd = OnlyOutput(2, 3)
    with record_hidden(odd), pytest.raises(TypeError, match=r"must return \(output, h_n\)"):
        odd(torch.randn(3, 2, 2))
    # the optimizer's own contract still names the closure's return
    opt = HessianFree(list(m.parameters()), structural_damping=0.1)
    with pytest.raises(RuntimeError, match=r"No forward pass of 'GRU'"):

        def closure():
            with record_hidden(m) as rec:
                pass
            out = torch.ones(1, requires_grad=True)
            return out.sum(), out, rec.hidden

        opt.step(closure)


@pytest.mark.cuda
def test_recorded_lstm_on_cuda_runs_without_cudnn_and_matches_cpu():
    rcase = RECASE_CUDA
    m, head, x, y = rcase.build()
    params = [*m.parameters(), *head.parameters()]
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    want = StructurallyDampedGGN(*_recorded_closure(m, head, x, y), params, weight=0.7)(v)
    m, head = m.cuda(), head.cuda()
    params = [*m.parameters(), *head.parameters()]
    assert torch.backends.cudnn.enabled
    got = StructurallyDampedGGN(
        *_recorded_closure(m, head, x.cuda(), y.cuda()), params, weight=0.7
    )(v.cuda())
    assert torch.backends.cudnn.enabled  # restored
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-11)


RECASE_CUDA = RecurrentCase("lstm_2layer_bidir", nn.LSTM, dict(num_layers=2, bidirectional=True))


# ------------------------------------------------------------------------------ CG budget
def _linear_sd_problem():
    """A linear model with hidden states: G = 2/M AᵀA (cond 1e4) and J_h = B exactly, so the
    damped system is dense and known; CG needs ~100 iterations on it."""
    g = torch.Generator().manual_seed(0)
    M, n = 80, 40
    U, _ = torch.linalg.qr(torch.randn(M, n, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    A = U * torch.logspace(0, -2, n, dtype=torch.float64) @ V.T * M**0.5
    B = torch.randn(2 * M, n, dtype=torch.float64, generator=g)
    y = torch.randn(M, 1, dtype=torch.float64, generator=g)

    def step(hidden: bool = True, **kwargs) -> tuple[torch.Tensor, object]:
        theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        opt = HessianFree([theta], **kwargs)

        def closure():
            out = (A @ theta).unsqueeze(1)
            got = (F.mse_loss(out, y), out, (B @ theta).reshape(M, 2))
            return got if hidden else got[:2]

        opt.step(closure)
        return theta.detach(), opt.last_step

    return A, B, y, step


def test_auto_cg_budget_is_25_iterations_of_dense_cg_where_structural_damping_is_on():
    A, B, y, step = _linear_sd_problem()
    M, n = A.shape
    lam, mu = 1e-4, 0.03
    # the whole step is CG's last iterate; the progress stop pinned off so the cap is the stop
    plain = dict(damping=lam, cg_progress_tol=1e-12, backtrack=False, line_search=None)
    theta, info = step(**plain)
    assert (info.cg_iters, info.cg_reason) == (25, "max_iter")
    _, uncapped = step(**plain, cg_max_iter=250)  # an explicit number is kept
    assert uncapped.cg_iters > 25
    # oracle: 25 iterations of textbook CG from 0 on (G + λI + λμ/N BᵀB) p = −g in numpy
    th0 = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    g = torch.autograd.grad(F.mse_loss((A @ th0).unsqueeze(1), y), th0)[0].numpy()
    K = 2 / M * A.T @ A + lam * torch.eye(n, dtype=torch.float64) + lam * mu / M * B.T @ B
    K = K.numpy()
    x, r = np.zeros(n), -g
    p = r.copy()
    for _ in range(25):
        Kp = K @ p
        alpha = (r @ r) / (p @ Kp)
        x, r_new = x + alpha * p, r - alpha * Kp
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    # two CG codes part by roundoff growing with the condition number (~5e-5 here); the
    # neighbouring iterates 24 and 26 differ from the 25th by > 4 %
    err = np.abs(theta.numpy() - x).max() / np.abs(x).max()
    assert err < 1e-3


def test_structurally_damped_steps_skip_the_objective_check_and_others_keep_it():
    _, _, _, step = _linear_sd_problem()
    # the objective check evaluates the closure at stored iterates: calls beyond the first
    # (and backtracking's) show it; cg_rtol=0 so CG runs long enough to reach them
    kw = dict(damping=1e-4, cg_rtol=0.0, line_search=None, extrapolate=False)
    _, sd = step(**kw)
    _, sd_checked = step(**kw, cg_stop_on_increase=True)
    _, no_hidden = step(hidden=False, **kw)
    assert sd_checked.closure_calls > sd.closure_calls
    assert no_hidden.closure_calls > sd.closure_calls
    # without hidden states the defaults are bitwise cg_max_iter=250 with the check on
    theta, _ = step(hidden=False, **kw)
    assert torch.equal(theta, step(hidden=False, **kw, cg_max_iter=250)[0])


def test_cg_max_iter_refuses_bad_values():
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"Unknown `cg_max_iter` 'many'; expected one of 'auto'"):
        HessianFree(params, cg_max_iter="many")
    with pytest.raises(ValueError, match=r"`cg_max_iter` must be an int >= 1, got 0"):
        HessianFree(params, cg_max_iter=0)
    with pytest.raises(ValueError, match=r"`cg_min_iter`.*300"):
        HessianFree(params, cg_min_iter=300)  # 'auto' allows at most 250


@pytest.mark.parametrize("mu", ["auto", 0.03])
@pytest.mark.parametrize("separate_curvature", [True, False])
def test_a_closure_may_skip_hidden_states_under_no_grad(mu, separate_curvature):
    # the documented contract: hidden states are read only from graph-building calls, so a
    # closure that leaves them out of its no_grad evaluations takes the same steps bit for bit
    def run(skip):
        torch.manual_seed(2)
        m = TanhRNN(2, 6, 1, spectral_radius=1.1).double()
        x, y = torch.randn(40, 7, 2, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
        opt = HessianFree(m.parameters(), structural_damping=mu)
        skipped = []

        def evaluate(xb, yb):
            if skip and not torch.is_grad_enabled():
                skipped.append(1)
                out = m(xb)
                return F.mse_loss(out, yb), out
            out, h = m.forward_with_hidden(xb)
            return F.mse_loss(out, yb), out, h

        curvature = (lambda: evaluate(x[:10], y[:10])) if separate_curvature else None
        for _ in range(3):
            opt.step(lambda: evaluate(x, y), curvature)
        return torch.cat([p.detach().flatten() for p in m.parameters()]), len(skipped)

    (ref, _), (got, skipped) = run(False), run(True)
    assert skipped > 0 and torch.equal(got, ref)
