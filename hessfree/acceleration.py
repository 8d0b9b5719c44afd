r"""How curvature products run: CUDA-graph replay and reduced-precision arithmetic.

A curvature product :math:`v \mapsto Cv` at a fixed point :math:`\theta` launches the same
kernels on same-shaped tensors in every CG iteration. On a GPU with small or medium batches
the launches, not the arithmetic, bound it; a CUDA graph records them once and replays them
with one launch. Reduced precision (TF32 or bf16 matrix products) trades accuracy of
:math:`Cv` for speed. Both are options of :class:`ProductPolicy`, off by default, and apply
only to the products: CG's vectors (:math:`x, r, p`) and scalars (:math:`\alpha, \beta,
\phi`) stay in the dtype of :math:`b` (float32 or float64), and a product's output is cast
back to that dtype.

Fall-backs: a CUDA graph needs the product on a CUDA device, static shapes, no host
synchronisation inside it, and, for a product that differentiates an autograd graph, that graph
built on a side stream (autograd runs backward ops on their forward's stream; the capture runs
on that stream, :func:`capture_stream`). :func:`accelerate` captures on the first call; where
capture is impossible (CPU tensors, a product that reads a value back or otherwise fails to
capture) it warns once and runs the product eagerly, and a vector of another shape, dtype or
device than the captured one is multiplied eagerly too. A failed capture leaves CUDA's random
generator usable (:func:`_release_generators`).

Measured accuracy of bf16 products (CPU, ``experiments/bench_precision.py``): see
``experiments/results/``; on a GPU (capture, TF32): ``experiments/gpu_check.py``.

References:
    NVIDIA, CUDA C++ Programming Guide, "CUDA Graphs".
    PyTorch documentation, ``torch.cuda.graphs`` and "Automatic Mixed Precision".
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_choice, check_int, closest_name
from ._types import MatVec

__all__ = ["PRECISIONS", "ProductPolicy", "accelerate", "capture_stream"]

#: ``'highest'``: the products' dtype as is; ``'tf32'``: TF32 matrix products on CUDA (no
#: effect on a CPU); ``'bf16'``: products under ``torch.autocast`` with bfloat16.
PRECISIONS = ("highest", "tf32", "bf16")


@dataclass(frozen=True)
class ProductPolicy:
    """How :class:`hessfree.HessianFree` runs its curvature products.

    Args:
        cuda_graph: Capture the product in a CUDA graph on the first call of each step and
            replay it in every later CG iteration (CUDA only; falls back to eager products
            elsewhere, with a warning).
        precision: One of :data:`PRECISIONS`. CG's iterates and scalars keep ``b``'s dtype.
        warmup: Eager calls before capture (lazy initialisation must not be captured), >= 1.

    Raises:
        ValueError: For an unknown ``precision`` or ``warmup < 1``.
        TypeError: If ``cuda_graph`` is not a bool.

    Example:
        >>> ProductPolicy(precision="bf16")
        ProductPolicy(cuda_graph=False, precision='bf16', warmup=2)
    """

    cuda_graph: bool = False
    precision: str = "highest"
    warmup: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.cuda_graph, bool):
            raise TypeError(
                f"`cuda_graph` must be a bool, got {type(self.cuda_graph).__name__} "
                f"{self.cuda_graph!r}."
            )
        check_choice("precision", self.precision, PRECISIONS)
        check_int("warmup", self.warmup, low=1)

    @classmethod
    def of(cls, value: ProductPolicy | Mapping | None) -> ProductPolicy:
        """A policy from ``None`` (the defaults), a mapping of its fields (YAML) or itself."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            fields = ("cuda_graph", "precision", "warmup")
            unknown = sorted((k for k in value if k not in fields), key=repr)
            if unknown:
                # the did-you-mean HessianFree's own keywords get ("leftovers19")
                close = {k: closest_name(k, fields) for k in unknown if isinstance(k, str)}
                hints = [f"`{c}` for {k!r}" for k, c in close.items() if c is not None]
                hint = f" Did you mean {', '.join(hints)}?" if hints else ""
                raise ValueError(
                    f"Unknown `products` key(s) {unknown}; expected 'cuda_graph', 'precision', "
                    f"'warmup'.{hint}"
                )
            return cls(**value)
        raise TypeError(
            "`products` must be None, a ProductPolicy or a mapping of its fields, got "
            f"{type(value).__name__}."
        )

    @property
    def is_default(self) -> bool:
        return not self.cuda_graph and self.precision == "highest"


@contextlib.contextmanager
def _precision(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed ops in ``precision`` (see :data:`PRECISIONS`)."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            yield
    elif precision == "tf32" and device.type == "cuda":
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (
                matmul,
                cudnn,
            )
    else:
        yield


class _Replayed:
    """A product captured once: copy ``v`` in, replay, copy the result out.

    ``replay`` re-runs the recorded kernels, reading ``static_in`` and writing ``static_out``;
    vectors unlike ``static_in`` go to the eager ``matvec``.
    """

    def __init__(
        self, matvec: MatVec, static_in: Tensor, static_out: Tensor, replay: Callable[[], None]
    ) -> None:
        self.matvec, self.static_in, self.static_out, self.replay = (
            matvec,
            static_in,
            static_out,
            replay,
        )

    def __call__(self, v: Tensor) -> Tensor:
        s = self.static_in
        if v.shape != s.shape or v.dtype != s.dtype or v.device != s.device:
            return self.matvec(v)  # dynamic shape: the graph cannot serve it
        s.copy_(v)
        self.replay()
        return self.static_out.clone()  # the next replay overwrites static_out


def _capture(matvec: MatVec, like: Tensor, warmup: int) -> _Replayed:
    """Record ``matvec`` in a CUDA graph, on the current stream unless that is the default one.

    Autograd runs each backward op on the stream its forward op ran on, so a product that
    differentiates a graph built on stream ``S`` launches onto ``S`` wherever it is called:
    captured on another stream, those launches invalidate the capture (every capture of a
    Gauss-Newton product built on the default stream failed so on an H200, torch 2.11). So
    the capture runs on the current stream when it is a side stream (:meth:`HessianFree.step`
    runs a step with ``cuda_graph=True`` on one, :func:`capture_stream`), else on a fresh side
    stream (enough for a product that differentiates nothing). ``capture_begin`` and
    ``capture_end`` are called directly: ``torch.cuda.graph`` would also run a full garbage
    collection and empty the allocator's cache at every capture, once per HF step.
    """
    dev = like.device
    static_in = like.detach().clone()
    current = torch.cuda.current_stream(dev)
    stream = current if current != torch.cuda.default_stream(dev) else torch.cuda.Stream(dev)
    stream.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # lazy initialisation (cuBLAS workspaces) stays out of it
            matvec(static_in)
        try:
            graph.capture_begin()
            try:
                static_out = matvec(static_in)
            finally:
                graph.capture_end()
        except BaseException:
            del graph
            _release_generators(dev)
            raise
    current.wait_stream(stream)
    return _Replayed(matvec, static_in, static_out, graph.replay)


def _release_generators(device: torch.device) -> None:
    """Put the device's default CUDA generator back out of capture after a failed capture.

    ``capture_begin`` marks the generator as capturing and only a capture that ends cleanly
    unmarks it: after a failure every later random draw on the device raised "Offset
    increment outside graph capture encountered unexpectedly" (H200, torch 2.11: a failed
    capture in one test broke ``torch.randn`` in the next). A capture of nothing that ends
    cleanly unmarks it.
    """
    try:
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The CUDA Graph is empty": it is
            graph.capture_begin()
            graph.capture_end()
    except Exception:  # noqa: BLE001, S110 - best effort; the original error is re-raised
        pass


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def capture_stream(policy: ProductPolicy, device: torch.device) -> Iterator[None]:
    """Run the enclosed code on a side stream when ``policy`` captures products on ``device``.

    A product captured in a CUDA graph must differentiate an autograd graph built on the
    capture stream (:func:`_capture`): :meth:`HessianFree.step` evaluates its closures and
    runs CG inside this. The side stream waits for the current one first and the current
    one for it at the end, so the step is ordered with the caller's work as before. On the
    CPU, without ``cuda_graph``, or already on a side stream: nothing changes.
    """
    if not (policy.cuda_graph and device.type == "cuda" and torch.cuda.is_available()):
        yield
        return
    current = torch.cuda.current_stream(device)
    if current != torch.cuda.default_stream(device):
        yield
        return
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        current.wait_stream(side)


def _on_cuda(like: Tensor) -> bool:
    return like.device.type == "cuda" and torch.cuda.is_available()


class Accelerated:
    """``v -> C v`` run as a :class:`ProductPolicy` says; see :func:`accelerate`.

    Attributes:
        mode: ``'eager'`` or ``'cuda_graph'`` (after the first call).
        fallback_reason: Why a requested CUDA graph is not used, or ``None``.
        capture_failed: Whether a capture was tried and failed (not merely impossible, as on
            a CPU).
    """

    def __init__(self, matvec: MatVec, like: Tensor, policy: ProductPolicy) -> None:
        self._matvec, self._policy = matvec, policy
        self._device, self._dtype = like.device, like.dtype
        self._replayed: _Replayed | None = None
        self.mode = "eager"
        self.fallback_reason: str | None = None
        self.capture_failed = False
        if policy.cuda_graph and not _on_cuda(like):
            self.fallback_reason = (
                f"CUDA graphs need a CUDA device; the product is on {like.device}"
            )

    def _eager(self, v: Tensor) -> Tensor:
        with _precision(self._policy.precision, self._device):
            out = self._matvec(v)
        return out if out.dtype == self._dtype else out.to(self._dtype)

    def __call__(self, v: Tensor) -> Tensor:
        if self._replayed is not None:
            return self._replayed(v)
        if self._policy.cuda_graph and self.fallback_reason is None:
            try:
                self._replayed = _capture(self._eager, v, self._policy.warmup)
                self.mode = "cuda_graph"
                return self._replayed(v)
            except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly
                self.capture_failed = True
                self.fallback_reason = f"capture failed: {type(err).__name__}: {err}"
                warnings.warn(
                    f"hessfree: the curvature product could not be captured in a CUDA graph "
                    f"({self.fallback_reason}); running it eagerly. A product that "
                    "differentiates an autograd graph is captured only on the stream the graph "
                    "was built on: build it under `with torch.cuda.stream(s):` with a side "
                    "stream `s` (HessianFree.step does so itself).",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._eager(v)


def accelerate(matvec: MatVec, like: Tensor, policy: ProductPolicy | None = None) -> MatVec:
    r"""Wrap ``matvec`` to run as ``policy`` says; ``matvec`` itself for the default policy.

    Args:
        matvec: :math:`v \mapsto Cv` on flat vectors like ``like``; must not modify ``v``.
        like: A vector of the shape, dtype and device the products will see (not modified).
        policy: A :class:`ProductPolicy`; ``None`` means the defaults (no change).

    Raises:
        TypeError: If ``matvec`` is not callable or ``like`` not a tensor.

    Returns:
        A callable with ``matvec``'s contract whose outputs have ``like``'s dtype; an
        :class:`Accelerated` unless the policy is the default.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> mv = accelerate(lambda v: A @ v, torch.zeros(2), ProductPolicy(cuda_graph=True))
        >>> mv.fallback_reason
        'CUDA graphs need a CUDA device; the product is on cpu'
        >>> mv(torch.tensor([1.0, 0.0]))
        tensor([2., 1.])
    """
    if not callable(matvec):
        raise TypeError(f"`matvec` must be callable (v -> C v), got {type(matvec).__name__}.")
    if not isinstance(like, Tensor):
        raise TypeError(f"`like` must be a torch.Tensor, got {type(like).__name__}.")
    policy = ProductPolicy.of(policy)
    if policy.is_default:
        return matvec
    return Accelerated(matvec, like, policy)
