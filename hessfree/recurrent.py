r"""Record a recurrent net's hidden states for structural damping, without threading them by hand.

Notation (Martens & Sutskever 2011, §3.3): :math:`h(\theta)` the hidden-state trajectory, every
hidden unit at every time step (and every layer and direction) of every example, as a function
of the parameters :math:`\theta`; :math:`J_h = \partial h/\partial\theta`. Structural damping
adds :math:`\lambda\mu\,J_h^\top J_h/N` to CG's matrix (:math:`N` examples), a Gauss-Newton
penalty :math:`\tfrac{\lambda\mu}{2N}\|h(\theta+p) - h(\theta)\|^2` on changes of the
trajectory. :class:`hessfree.HessianFree` takes :math:`h` as the third value of the closure's
``(loss, outputs, hidden)``; this module collects it from the forward pass:

.. code-block:: python

    opt = HessianFree(model.parameters(), structural_damping=0.03)

    def closure():
        with record_hidden(model) as rec:  # finds model's nn.RNN/GRU/LSTM(Cell) layers
            outputs = model(x)
        return loss_fn(outputs, y), outputs, rec.hidden

What is recorded, per layer type (the tensors are the graph's own, so their Jacobian is
:math:`J_h`; the order of the entries does not matter, :math:`J_h^\top J_h` is invariant to it):

* ``nn.RNN``/``nn.GRU``/``nn.LSTM``: the output sequence of **every** layer (both directions
  when bidirectional), i.e. every step's :math:`h_t`. torch's multi-layer modules expose only
  the last layer's sequence, so while recording a module with ``num_layers > 1`` runs one layer
  at a time with its own parameters (the same ops; inter-layer dropout is drawn separately, so
  in training mode with ``dropout > 0`` the dropout masks differ from an unrecorded call's).
  The final states ``h_n`` repeat the sequence's last step and are not recorded twice.
  ``PackedSequence`` inputs are supported: the sequence is padded with zeros, which do not
  depend on :math:`\theta` and add nothing to :math:`J_h`.
* **LSTM: h only, not c.** :math:`h_t = o_t \odot \tanh(c_t)` (projected when ``proj_size``)
  is the state the rest of the network sees, and it depends on :math:`c_t`, so damping its
  changes restrains the cell too; torch exposes only the final :math:`c_T`, not its sequence.
  (Martens & Sutskever's nets were tanh RNNs, where :math:`h` is the whole state.)
* ``nn.RNNCell``/``nn.GRUCell``/``nn.LSTMCell`` in a user loop: each call's new :math:`h`.
* A hand-written step (raw ops, e.g. ``torch.tanh(W @ x + U @ h)``): wrap the new state in
  :func:`mark_hidden`, which returns it unchanged and records it when a recorder is active.

Examples sit along dimension 0 of :attr:`HiddenRecorder.hidden` (``batch_first`` or not;
an unbatched call counts as one example), which is how the optimizer finds :math:`N`.

Recording is per thread: a recorder sees only the forward passes of the thread that entered it,
so two threads may run (and record) the same module at once. Modules are patched only inside
the ``with`` block and restored on exit, also when the block raises. A copy made inside the
block (``copy.deepcopy``, ``torch.save`` of the module) is not patched: it runs its own
parameters and records nothing; ``state_dict()`` holds tensors only and is unaffected.

Curvature products differentiate the RNN twice; cuDNN's RNN kernels cannot, so on CUDA the
recorded layers run with cuDNN disabled while gradients are enabled (torch's native kernels;
``torch.backends.cudnn.enabled`` is process-wide, so other threads' convolutions skip cuDNN
for as long as a recorded call runs).

References:
    Martens & Sutskever (2011), Learning recurrent neural networks with Hessian-free
    optimization, ICML, §3.3 (structural damping).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ._graph_ops import cat_last

__all__ = ["HiddenRecorder", "record_hidden", "mark_hidden"]

_LAYERS = (nn.RNNBase, nn.RNNCellBase)
_ALLOWED = "nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell"
_BASES = (nn.LSTM, nn.GRU, nn.RNN)  # LSTM first: the most specific forward signature

_local = threading.local()  # .stack: the recorders active on this thread, innermost last
_lock = threading.Lock()  # guards _patches
_patches: dict[int, _Patch] = {}  # id(module) -> its patch, while any thread records it


def _active() -> list[HiddenRecorder]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def mark_hidden(h: Tensor, batch_dim: int = 0) -> Tensor:
    """Record ``h`` as a hidden state in this thread's active recorders; return ``h`` unchanged.

    For recurrent steps written with raw ops, where no ``nn`` recurrent layer produces the state.
    Outside a :func:`record_hidden` block it only returns ``h``, so a model can always call it.

    Args:
        h: A new hidden state (any shape), computed from the parameters.
        batch_dim: The dimension of ``h`` that indexes the examples.

    Returns:
        Tensor: ``h`` itself.

    Raises:
        TypeError: If ``h`` is not a tensor or ``batch_dim`` not an int.
        ValueError: If ``batch_dim`` is not a dimension of ``h``.

    Example:
        >>> W = torch.ones(2, 2, requires_grad=True)
        >>> with record_hidden() as rec:
        ...     h = torch.zeros(3, 2)
        ...     for t in range(4):
        ...         h = mark_hidden(torch.tanh(h @ W + 1))
        >>> tuple(rec.hidden.shape)  # 3 examples, 4 steps x 2 units
        (3, 8)
    """
    if not isinstance(h, Tensor):
        raise TypeError(f"`h` must be a tensor, got {type(h).__name__}.")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise TypeError(f"`batch_dim` must be an int, got {type(batch_dim).__name__}.")
    if not -h.dim() <= batch_dim < max(h.dim(), 1) or h.dim() == 0:
        raise ValueError(
            f"`batch_dim` must index a dimension of `h` (shape {tuple(h.shape)}), got "
            f"{batch_dim!r}."
        )
    for rec in _active():
        rec._add("mark_hidden", h, batch_dim)
    return h


class HiddenRecorder:
    """Collects hidden states while active; returned by :func:`record_hidden` (see there)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self._layers = layers  # qualified name -> recurrent layer to patch
        self._state = threading.local()  # .records, .runs, .entered: per thread

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> HiddenRecorder:
        s = self._state
        if getattr(s, "entered", False):
            raise RuntimeError("This recorder is already active in this thread; nest a new one.")
        s.records, s.runs, s.joined = [], dict.fromkeys(self._layers, 0), None
        _install(self._layers.values())
        s.entered = True
        _active().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            stack = _active()
            if self in stack:
                stack.remove(self)
        finally:
            self._state.entered = False
            _uninstall(self._layers.values())

    # ------------------------------------------------------------------ results
    @property
    def hidden(self) -> Tensor:
        r"""Every recorded hidden state, ``(N, K)``: examples along dim 0, the rest flattened
        and joined in the order recorded.

        Raises:
            RuntimeError: If the recorder was never entered in this thread, if nothing was
                recorded, or if one of its layers ran no forward pass inside the block.
            ValueError: If the records disagree on the number of examples :math:`N`.
        """
        s = self._state
        if not hasattr(s, "records"):
            raise RuntimeError(
                "No forward pass recorded: use the recorder as `with record_hidden(...) as rec:` "
                "around the model's forward pass, then read `rec.hidden`."
            )
        idle = [f"{name!r} ({type(m).__name__})" for name, m in self._layers.items()]
        idle = [d for d, n in zip(idle, s.runs.values(), strict=True) if n == 0]
        if idle:
            raise RuntimeError(
                f"No forward pass of {', '.join(idle)} was recorded inside the `with` block; "
                "run the model inside it (in the same thread), or pass record_hidden only the "
                "layers that run."
            )
        if not s.records:
            raise RuntimeError(
                "No hidden states were recorded: record_hidden() without modules records only "
                "states wrapped in hessfree.mark_hidden(h) inside the `with` block."
            )
        sizes = {(name, t.shape[0]) for name, t in s.records}
        if len({n for _, n in sizes}) > 1:
            raise ValueError(
                "The recorded hidden states disagree on the number of examples (dim 0 after "
                f"moving the batch dimension there): {sorted(sizes)}; give mark_hidden the right "
                "`batch_dim`."
            )
        if s.joined is None:  # one tensor per entry: rec.hidden is rec.hidden
            flats = [t for _, t in s.records]
            s.joined = cat_last(flats)
        return s.joined

    def _add(self, name: str, h: Tensor, batch_dim: int | None) -> None:
        """Store ``h`` as ``(N, -1)``; ``batch_dim=None`` means unbatched (one example)."""
        h = h.unsqueeze(0) if batch_dim is None else h.movedim(batch_dim, 0)
        self._state.records.append((name, h.reshape(h.shape[0], -1)))
        self._state.joined = None
        if name in self._state.runs:
            self._state.runs[name] += 1


def record_hidden(*modules: nn.Module) -> HiddenRecorder:
    r"""Record the hidden states a forward pass produces, for HF's structural damping.

    Use as ``with record_hidden(model) as rec: outputs = model(x)`` and return
    ``(loss, outputs, rec.hidden)`` from the closure of a ``HessianFree`` (its default
    ``structural_damping='auto'`` is then μ = 0.03; or pass ``structural_damping=mu``). Each
    module given is searched for torch's recurrent layers (itself included); what each records
    is in the module docstring (every layer's, every direction's and every step's :math:`h`;
    LSTM: :math:`h`, not :math:`c`).
    With no modules, only states wrapped in :func:`mark_hidden` are recorded (they are recorded
    in any case). The recorder may be built once and entered on every closure call; each entry
    starts empty.

    Args:
        *modules: Modules containing the recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``,
            ``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell`` or subclasses).

    Returns:
        HiddenRecorder: A context manager; after the block, :attr:`HiddenRecorder.hidden` is
        the ``(N, K)`` tensor of hidden states (examples along dim 0).

    Raises:
        TypeError: If an argument is not an ``nn.Module``.
        ValueError: If a module contains no recurrent layer, or is a multi-layer subclass that
            overrides ``forward`` (its layers cannot be run one at a time).

    Example:
        >>> from hessfree import HessianFree
        >>> _ = torch.manual_seed(0)
        >>> rnn, head = torch.nn.GRU(2, 4, num_layers=2), torch.nn.Linear(4, 1)
        >>> x, y = torch.randn(5, 3, 2), torch.randn(3, 1)  # (T, N, input), batch_first=False
        >>> opt = HessianFree([*rnn.parameters(), *head.parameters()], structural_damping=0.03)
        >>> def closure():
        ...     with record_hidden(rnn) as rec:
        ...         out = head(rnn(x)[0][-1])
        ...     return torch.nn.functional.mse_loss(out, y), out, rec.hidden
        >>> tuple(closure()[2].shape)  # 3 examples x (2 layers x 5 steps x 4 units)
        (3, 40)
        >>> before = float(closure()[0].detach())
        >>> _ = opt.step(closure)
        >>> float(closure()[0].detach()) < before
        True

    References:
        Martens & Sutskever (2011), Learning recurrent neural networks with Hessian-free
        optimization, ICML, §3.3.
    """
    layers: dict[str, nn.Module] = {}
    for k, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"record_hidden takes nn.Module arguments, got {type(module).__name__} at "
                f"position {k}."
            )
        prefix = f"{k}." if len(modules) > 1 else ""
        found = {
            prefix + (name or type(m).__name__): m
            for name, m in module.named_modules()
            if isinstance(m, _LAYERS)
        }
        if not found:
            raise ValueError(
                f"record_hidden's argument {k} ({type(module).__name__}) contains no recurrent "
                f"layer; allowed: {_ALLOWED} (or subclasses). For a hand-written step, wrap each "
                "new state in hessfree.mark_hidden(h) and use record_hidden() without modules."
            )
        for name, m in found.items():
            if any(m is seen for seen in layers.values()):
                continue
            if isinstance(m, nn.RNNBase) and m.num_layers > 1 and _base_of(m) is None:
                raise ValueError(
                    f"{name!r} ({type(m).__name__}) has num_layers={m.num_layers} and overrides "
                    "forward, so its layers' states cannot be recorded one at a time; stack "
                    "single-layer modules instead, or mark the states with mark_hidden."
                )
            layers[name] = m
    return HiddenRecorder(layers)


# ---------------------------------------------------------------------------- module patches
class _Patch:
    """A module's ``forward`` replaced by :func:`_dispatch`, reference-counted over recorders."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.count = module, 0
        self.shadowed = module.__dict__.get("forward")  # an instance-level forward to restore
        self.original: Callable[..., Any] = module.forward

    def install(self) -> None:
        self.module.forward = _PatchedForward(self)

    def uninstall(self) -> None:
        if self.shadowed is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.shadowed


class _PatchedForward:
    """The ``forward`` a recorded module has while patched; copies of the module get none.

    ``copy.deepcopy`` and pickling (``torch.save(model)``) copy a module's ``__dict__``, so
    a copy made inside a ``with record_hidden(...)`` block would carry this object, which runs
    the *original* module (its parameters, not the copy's) and stays patched forever. Both
    instead give the copy its own unpatched forward: the class's, or the instance-level one
    the patch shadows.
    """

    __slots__ = ("patch",)

    def __init__(self, patch: _Patch) -> None:
        self.patch = patch

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _dispatch(self.patch, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Callable[..., Any]:
        # the module's copy is in memo already (deepcopy registers an object before its state)
        module = memo.get(id(self.patch.module))
        shadowed = copy.deepcopy(self.patch.shadowed, memo)
        if module is None:  # the forward copied on its own: the unpatched one
            return self.patch.original if shadowed is None else shadowed
        return _unpatched_forward(module, shadowed)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpatched_forward, (self.patch.module, self.patch.shadowed))


def _unpatched_forward(module: nn.Module, shadowed: Callable[..., Any] | None) -> Any:
    """A copied module's forward: the instance-level one it had, else its class's, bound."""
    return shadowed if shadowed is not None else type(module).forward.__get__(module)


def _install(layers: Iterator[nn.Module]) -> None:
    with _lock:
        for m in layers:
            patch = _patches.get(id(m))
            if patch is None:
                patch = _patches[id(m)] = _Patch(m)
                patch.install()
            patch.count += 1


def _uninstall(layers: Iterator[nn.Module]) -> None:
    with _lock:
        for m in layers:
            patch = _patches.get(id(m))
            if patch is None:
                continue
            patch.count -= 1
            if patch.count == 0:
                del _patches[id(m)]
                patch.uninstall()


def _dispatch(patch: _Patch, *args: Any, **kwargs: Any) -> Any:
    module = patch.module
    names = [(rec, name) for rec in _active() for name, m in rec._layers.items() if m is module]
    if not names:  # another thread's recorder, or an outer call: behave as unpatched
        return patch.original(*args, **kwargs)
    input, hx = _bind(*args, **kwargs)
    cuda = input.is_cuda if isinstance(input, Tensor) else input.data.is_cuda
    with _without_cudnn() if cuda and torch.is_grad_enabled() else contextlib.nullcontext():
        if isinstance(module, nn.RNNCellBase):
            h_new = patch.original(input, hx)
            h = h_new[0] if isinstance(h_new, tuple) else h_new
            batched = input.dim() == 2
            for rec, name in names:
                rec._add(name, h, 0 if batched else None)
            return h_new
        if module.num_layers == 1:
            result = patch.original(input, hx)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(
                    f"{type(module).__name__}.forward returned {type(result).__name__}; a "
                    "recorded recurrent layer must return (output, h_n) as nn.RNN/GRU/LSTM do."
                )
            out, h_n = result
            sequences = [out]
        else:
            out, h_n, sequences = _layer_by_layer(module, input, hx)
    for seq in sequences:
        if isinstance(seq, PackedSequence):
            seq, dim = pad_packed_sequence(seq, batch_first=True)[0], 0
        elif seq.dim() == 3:
            dim = 0 if module.batch_first else 1
        else:
            dim = None
        for rec, name in names:
            rec._add(name, seq, dim)
    return out, h_n


def _bind(input: Any = None, hx: Any = None) -> tuple[Any, Any]:
    if not isinstance(input, (Tensor, PackedSequence)):
        raise TypeError(
            f"A recorded recurrent layer's input must be a tensor or PackedSequence, got "
            f"{type(input).__name__}."
        )
    return input, hx


_cudnn = {"users": 0, "saved": True}  # guarded by _lock


class _without_cudnn:
    """cuDNN off while any thread runs a recorded layer (only ``enabled``; other flags kept)."""

    def __enter__(self) -> None:
        with _lock:
            if _cudnn["users"] == 0:
                _cudnn["saved"] = torch.backends.cudnn.enabled
                torch.backends.cudnn.enabled = False
            _cudnn["users"] += 1

    def __exit__(self, *exc: object) -> None:
        with _lock:
            _cudnn["users"] -= 1
            if _cudnn["users"] == 0:
                torch.backends.cudnn.enabled = _cudnn["saved"]


def _base_of(module: nn.RNNBase) -> type | None:
    """The torch class whose unmodified ``forward`` the module uses, else None."""
    for base in _BASES:
        if isinstance(module, base):
            return base if type(module).forward is base.forward else None
    return None


def _layer_by_layer(module: nn.RNNBase, input: Any, hx: Any) -> tuple[Any, Any, list[Any]]:
    """``module(input, hx)`` one layer at a time; also returns every layer's output sequence.

    Each layer runs as a single-layer twin of the module (on the meta device, so it holds no
    memory) called with this layer's parameters: torch's own code handles ``batch_first``,
    unbatched and packed inputs and default initial states, exactly as in the fused call.
    """
    base = _base_of(module)
    D = 2 if module.bidirectional else 1
    width = (getattr(module, "proj_size", 0) or module.hidden_size) * D
    weight = next(iter(module.parameters()))
    kw: dict[str, Any] = dict(
        hidden_size=module.hidden_size,
        num_layers=1,
        bias=module.bias,
        batch_first=module.batch_first,
        bidirectional=module.bidirectional,
        device="meta",
        dtype=weight.dtype,
    )
    if base is nn.RNN:
        kw["nonlinearity"] = module.nonlinearity
    if base is nn.LSTM:
        kw["proj_size"] = module.proj_size
    sequences, finals, x = [], [], input
    for layer in range(module.num_layers):
        twin = base(input_size=module.input_size if layer == 0 else width, **kw)
        twin.train(module.training)
        params = {
            n: getattr(module, n.replace("_l0", f"_l{layer}")) for n, _ in twin.named_parameters()
        }
        h0 = None if hx is None else _slice(hx, layer * D, (layer + 1) * D)
        out, h_n = functional_call(twin, params, (x, h0))
        sequences.append(out)
        finals.append(h_n)
        x = out
        if module.dropout > 0 and module.training and layer < module.num_layers - 1:
            x = (
                out._replace(data=F.dropout(out.data, module.dropout))
                if isinstance(out, PackedSequence)
                else F.dropout(out, module.dropout)
            )
    if isinstance(finals[0], tuple):
        h_n = tuple(torch.cat(parts) for parts in zip(*finals, strict=True))
    else:
        h_n = torch.cat(finals)
    return sequences[-1], h_n, sequences


def _slice(hx: Any, start: int, stop: int) -> Any:
    if isinstance(hx, tuple):
        return tuple(t[start:stop] for t in hx)
    return hx[start:stop]
