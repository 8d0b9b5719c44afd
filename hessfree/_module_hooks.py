"""HessianFree's global module hooks, kept out of ``torch.compile``'s tracing.

The optimizer watches every module a closure call runs (BatchNorm and Dropout in train mode,
forwards that write buffers, K-FAC's ``nn.Linear`` calls) through torch's global hooks
(``torch.nn.modules.module.register_module_forward_pre_hook`` and its siblings). Inside a
model compiled with ``torch.compile(..., backend="eager")`` dynamo traced those hooks as the
model's own code: torch warned that it "does not know how to trace the builtin
``_thread.get_ident``" (the hooks' thread check), recompiled the hooks' frame for each module
type and each step's new closures (11 recompiles in 12 steps of a 4-5-3 MLP) until it hit its
recompile limit, and warned at every call of the compiled model that "there are global hooks"
(37 times in those 12 steps), all pointing into hessfree; the numbers were right
(experiments/README.md, "unseen19", "compile19").

Here each kind of hook is one dispatcher, registered with torch while at least one block of
ours is inside :meth:`GlobalHook.installed` (counted under a lock, as
:class:`hessfree._autograd_hooks.AutogradHook`), that calls the blocks' hooks in the order
they were installed. The dispatcher is the same function at every step, and once dynamo is
loaded (``torch.optim.Optimizer`` loads it) it is wrapped once in ``torch.compiler.disable``:
dynamo then runs it as ordinary Python instead of tracing it, so a compiled model's graph
breaks at each module while a closure call runs, as a hook that works by side effects needs.
``import hessfree`` still does not import dynamo (~0.9 s). While the only global module hooks
are ours, the block also silences torch's "global hooks" warning: it is about hooks firing
for the ``OptimizedModule`` wrapper as well, which ours ignore (it has no buffers of its own,
is no BatchNorm, Dropout or layer; K-FAC notes it on purpose, ``_LinearPass``).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["BUFFER_REGISTRATION", "FORWARD", "FORWARD_PRE", "GlobalHook"]

# OptimizedModule.__call__'s warning (torch 2.x) whenever any global module hook is registered
_GLOBAL_HOOKS_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"
# torch's registries of the global hooks that OptimizedModule's warning looks at
_WARNED_FOR = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)
_local = threading.local()
_dispatchers: set[int] = set()  # ids of the dispatchers registered with torch now


class GlobalHook:
    """One torch global module hook (``torch.nn.modules.module.<register>``), shared by the
    blocks inside :meth:`installed`, whose hooks it calls in order; a hook must return
    ``None`` (ours only watch)."""

    def __init__(self, register: str) -> None:
        self.register = register
        self._lock = threading.Lock()
        self._hooks: list[Callable[..., None]] = []
        self._handle: Any = None
        self._eager: Callable[..., None] | None = None

    def _dispatch(self, *args: Any) -> None:
        for hook in tuple(self._hooks):
            hook(*args)

    def _dispatcher(self) -> Callable[..., None]:
        if "torch._dynamo" not in sys.modules:
            # nothing can be compiled yet; torch.compiler.disable would import dynamo
            return self._dispatch
        if self._eager is None:
            self._eager = torch.compiler.disable(self._dispatch)
        return self._eager

    @contextlib.contextmanager
    def installed(self, hook: Callable[..., None]) -> Iterator[None]:
        """Call ``hook`` from torch's global hook of this kind inside the block."""
        with self._lock:
            if not self._hooks:
                dispatcher = self._dispatcher()
                register = getattr(torch.nn.modules.module, self.register)
                self._handle = (register(dispatcher), dispatcher)
                _dispatchers.add(id(dispatcher))
            self._hooks.append(hook)
        try:
            with _compiled_wrapper_warning_silenced():
                yield
        finally:
            with self._lock:
                # by identity: two blocks may install equal bound methods
                del self._hooks[next(i for i, h in enumerate(self._hooks) if h is hook)]
                if not self._hooks:
                    handle, dispatcher = self._handle
                    handle.remove()
                    _dispatchers.discard(id(dispatcher))
                    self._handle = None


FORWARD_PRE = GlobalHook("register_module_forward_pre_hook")
FORWARD = GlobalHook("register_module_forward_hook")
BUFFER_REGISTRATION = GlobalHook("register_module_buffer_registration_hook")


def _only_ours() -> bool:
    """Whether every global module hook torch's ``OptimizedModule`` warns about is one of our
    dispatchers (``False`` where torch keeps them elsewhere than this torch version does)."""
    module = torch.nn.modules.module
    for name in _WARNED_FOR:
        registry = getattr(module, name, None)
        if registry is None:
            return False
        if any(id(h) not in _dispatchers for h in registry.values()):
            return False
    return True


@contextlib.contextmanager
def _compiled_wrapper_warning_silenced() -> Iterator[None]:
    """Silence ``OptimizedModule``'s "global hooks" warning in this thread's outermost block,
    where dynamo is loaded (no compiled module exists before) and the global hooks are ours
    only (a user's own global hook keeps torch's warning)."""
    depth = getattr(_local, "depth", 0)
    silence = depth == 0 and "torch._dynamo" in sys.modules and _only_ours()
    _local.depth = depth + 1
    try:
        if not silence:
            yield
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_GLOBAL_HOOKS_WARNING)
            yield
    finally:
        _local.depth = depth
