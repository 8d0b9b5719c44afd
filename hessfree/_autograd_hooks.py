"""Thread-local hooks on ``torch.autograd.grad`` and ``torch.autograd.backward``.

The optimizer parses a closure by running it with one of these functions hooked: it records
whether the closure calls ``torch.autograd.grad`` itself, and makes an LBFGS-style
``loss.backward()`` build its graph (``create_graph=True``) for Hessian products.
``Tensor.backward`` looks ``torch.autograd.backward`` up on the module at every call, so the
hook has to replace the module attribute. A plain swap would also change what every other
thread's calls do while the closure runs; here the replacement is installed while at least
one thread is inside :meth:`AutogradHook.active` (counted under a lock), and it forwards the
calls of every other thread untouched.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["AutogradHook"]


class AutogradHook:
    """``torch.autograd.<name>`` changed by ``hooked`` for the threads inside :meth:`active`.

    ``hooked(original, *args, **kwargs)`` runs in place of ``original(*args, **kwargs)`` for
    those threads; every call it sees is recorded in the list :meth:`active` yields.
    """

    def __init__(self, name: str, hooked: Callable[..., Any]) -> None:
        self.name = name
        self.hooked = hooked
        self._lock = threading.Lock()
        self._users = 0
        self._original: Callable[..., Any] | None = None
        self._local = threading.local()

    def _dispatch(self, *args: Any, **kwargs: Any) -> Any:
        called = getattr(self._local, "called", None)
        original = self._original
        assert original is not None  # installed only while a thread is inside active()
        if called is None:
            return original(*args, **kwargs)
        called.append(True)
        return self.hooked(original, *args, **kwargs)

    @contextlib.contextmanager
    def active(self) -> Iterator[list[bool]]:
        """Hook this thread's calls inside the block; restore the function after the last user."""
        with self._lock:
            if self._users == 0:
                self._original = getattr(torch.autograd, self.name)
                setattr(torch.autograd, self.name, self._dispatch)
            self._users += 1
        outer = getattr(self._local, "called", None)
        called: list[bool] = []
        self._local.called = called
        try:
            yield called
        finally:
            self._local.called = outer
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    setattr(torch.autograd, self.name, self._original)
                    self._original = None
