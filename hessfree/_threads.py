"""Pin numpy's and SciPy's BLAS threads around SciPy solves on torch-backed operators.

Inside SciPy's iterative solvers numpy's OpenBLAS threads (the vector updates)
and torch's OpenMP threads (the products) take turns on the same cores, and OpenBLAS threads
spin-wait after each call, taking cores torch needs: SciPy's ``cg`` on such operators has been
measured 1.5–1.75x slower than with numpy's BLAS pinned to one thread (the size of the effect
depends on the core count and the BLAS build; on a loaded 2-core machine we could not separate
it from noise). Wrap the solve in :func:`limit_blas_threads`, which needs the optional
``threadpoolctl`` and limits numpy's and SciPy's BLAS only, never torch's::

    with limit_blas_threads(1):
        x, info = scipy.sparse.linalg.cg(G.damped(lam), b)
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np  # noqa: F401 - the doctest's namespace
import torch

from ._checks import check_int


@contextlib.contextmanager
def limit_blas_threads(num_threads: int = 1) -> Iterator[None]:
    """Limit numpy's and SciPy's BLAS to ``num_threads`` threads inside the block.

    SciPy's iterative solvers do their vector updates with numpy's BLAS while the products
    run on torch's threads; pinning numpy's BLAS stops the two pools from fighting over the
    cores (see the module docstring). torch's own BLAS and OpenMP pools are left alone.

    Args:
        num_threads: The BLAS thread count inside the block.

    Raises:
        ValueError: If ``num_threads < 1``.

    Warns:
        UserWarning: If ``threadpoolctl`` is not installed; the block then runs unlimited.

    Example:
        >>> with limit_blas_threads(1):
        ...     float(np.ones(3) @ np.ones(3))
        3.0
    """
    num_threads = check_int("num_threads", num_threads, low=1)
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        warnings.warn(
            "threadpoolctl is not installed, so BLAS threads are not limited; install it with "
            "`pip install threadpoolctl`.",
            stacklevel=3,
        )
        yield
        return
    controller = ThreadpoolController()
    torch_dir = os.path.dirname(torch.__file__)
    paths = [
        lib.filepath
        for lib in controller.lib_controllers
        if lib.user_api == "blas" and not os.path.abspath(lib.filepath).startswith(torch_dir)
    ]
    if not paths:
        yield
        return
    with controller.select(filepath=paths).limit(limits=num_threads):
        yield
