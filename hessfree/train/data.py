"""Datasets for the experiment runner, all offline: generated, bundled or user-supplied files.

Every loader returns a :class:`Dataset` of torch tensors on the CPU: inputs in their natural
per-case shape (images ``(N, C, H, W)``, sequences ``(N, T, channels)``, vectors ``(N, D)``)
and targets as integer labels ``(N,)``, real values ``(N, K)`` or ``None`` (unlabelled data,
for autoencoders). Every loader checks what it returns (:func:`check_dataset`): finite inputs,
matching case counts, one per-case shape, labels in range; a violation is a :class:`DataError`.

=================  ==============================================================  ==========
name               source                                                          targets
=================  ==============================================================  ==========
``curves``         generated re-creation of CURVES (:func:`make_curves`)            none
``digits``         ``sklearn.datasets.load_digits``, 8x8, scaled to [0, 1]          10 classes
``breast_cancer``  ``sklearn.datasets.load_breast_cancer``, standardised            2 classes
``mnist1d``        ``mnist1d.data.make_dataset`` (generated, never downloaded)      10 classes
``mnist``          the user's ``mnist.pkl.gz`` or IDX files (:func:`load_mnist`)    10 classes
``npz``            the user's ``.npz`` (:func:`load_npz`)                           any
``addition``       the addition problem, generated (:func:`make_addition`)          real
=================  ==============================================================  ==========

Example:
    >>> ds = load_dataset("curves", num_train=4, num_test=2, seed=0)
    >>> ds.x_train.shape, ds.y_train, float(ds.x_train.min()) >= 0.0
    (torch.Size([4, 1, 28, 28]), None, True)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import math
import pickle
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "DataError",
    "DATASETS",
    "load_dataset",
    "check_dataset",
    "make_curves",
    "load_digits",
    "load_breast_cancer",
    "make_mnist1d",
    "load_mnist",
    "load_npz",
    "make_addition",
]


class DataError(ValueError):
    """A dataset is missing, corrupt or inconsistent (shapes, NaN/Inf, labels out of range)."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split of CPU tensors.

    Attributes:
        name: The loader's name (``curves``, ``digits``, ...).
        x_train: Training inputs, ``(N, *input_shape)``, floating point.
        y_train: Training targets: labels ``(N,)`` int64, values ``(N, K)`` floating, or None.
        x_test: Test inputs, ``(M, *input_shape)``.
        y_test: Test targets, like ``y_train``.
        num_classes: Number of classes for integer labels, else None.
        description: One line saying where the data came from.
    """

    name: str
    x_train: Tensor
    y_train: Tensor | None
    x_test: Tensor
    y_test: Tensor | None
    num_classes: int | None
    description: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input case."""
        return tuple(self.x_train.shape[1:])

    @property
    def target_kind(self) -> str | None:
        """``'labels'`` (integer classes), ``'values'`` (real targets) or None (no targets)."""
        if self.y_train is None:
            return None
        return "values" if self.y_train.is_floating_point() else "labels"

    def sha256(self) -> str:
        """SHA-256 of the arrays' dtypes, shapes and bytes (CPU tensors): what a checkpoint
        records, so that a resumed run refuses data that changed since it started (a file
        edited in place, a generator changed by an upgrade) instead of training on it."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            if t is None:
                h.update(b"none;")
                continue
            h.update(f"{t.dtype}{tuple(t.shape)};".encode())
            h.update(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
        return h.hexdigest()

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Dataset:
        """Move tensors to ``device``; cast inputs and real-valued targets to ``dtype``."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Dataset(
            self.name,
            move(self.x_train),
            move(self.y_train),
            move(self.x_test),
            move(self.y_test),
            self.num_classes,
            self.description,
        )


def check_dataset(ds: Dataset) -> Dataset:
    """Check shapes, finiteness and label range; return ``ds`` unchanged.

    Raises:
        DataError: Naming the array and what is wrong with it.
    """
    splits = (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test))
    # Both splits' sizes first: an empty test set leaves the labels' count unknown to a loader
    # that infers it from both, which must not be reported as the train labels' fault.
    for split, x, _ in splits:
        if x.dim() < 2 or x.shape[0] == 0:
            raise DataError(
                f"{ds.name} {split} inputs must have shape (cases, ...) with at least one case, "
                f"got {tuple(x.shape)}."
            )
    for split, x, y in splits:
        where = f"{ds.name} {split}"
        if not x.is_floating_point():
            raise DataError(f"{where} inputs must be floating point, got {x.dtype}.")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(f"{where} inputs contain {bad} non-finite values (NaN or Inf).")
        if (y is None) != (ds.y_train is None):
            raise DataError(f"{ds.name}: train and test must both have targets or both have none.")
        if y is None:
            continue
        if y.shape[0] != x.shape[0]:
            raise DataError(f"{where}: {x.shape[0]} inputs but {y.shape[0]} targets.")
        if y.is_floating_point():
            if not bool(torch.isfinite(y).all()):
                raise DataError(f"{where} targets contain non-finite values (NaN or Inf).")
            if y.dim() == 1:
                raise DataError(
                    f"{where} real-valued targets must have shape (cases, outputs), "
                    f"got {tuple(y.shape)}; reshape to (-1, 1)."
                )
        else:
            if y.dim() != 1:
                raise DataError(
                    f"{where} integer labels must have shape (cases,), got {tuple(y.shape)}."
                )
            if ds.num_classes is None:
                raise DataError(f"{where}: integer labels need `num_classes`.")
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= ds.num_classes:
                raise DataError(
                    f"{where} labels must be in [0, {ds.num_classes - 1}], "
                    f"got values in [{lo}, {hi}]."
                )
    if ds.x_test.shape[1:] != ds.x_train.shape[1:]:
        raise DataError(
            f"{ds.name}: train inputs have per-case shape {tuple(ds.x_train.shape[1:])}, "
            f"test inputs {tuple(ds.x_test.shape[1:])}."
        )
    if ds.y_train is not None and ds.y_test is not None:
        if (
            ds.y_train.dtype.is_floating_point != ds.y_test.dtype.is_floating_point
            or ds.y_train.shape[1:] != ds.y_test.shape[1:]
        ):
            raise DataError(f"{ds.name}: train and test targets differ in kind or per-case shape.")
    return ds


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Seeded, stratified train/test split (scikit-learn's ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


# ---------------------------------------------------------------------------------------------
# CURVES (generated).


def _render_curves(points: Tensor, image_size: int, thickness: float, samples: int) -> Tensor:
    r"""Render smooth curves through three points each, anti-aliased, into ``(n, S, S)``.

    The curve is the quadratic :math:`c(t) = \sum_k P_k L_k(t)` interpolating
    :math:`P_0, P_1, P_2` at :math:`t = 0, t_1, 1` with chord-length :math:`t_1`. Its
    image is a line integral of a Gaussian of std :math:`\sigma` = ``thickness``,
    :math:`I(u) = \min(1, \sum_m w_m \, e^{-\|u - c_m\|^2 / 2\sigma^2} / (\sqrt{2\pi}\sigma))`
    over samples :math:`c_m` with arc-length weights :math:`w_m`; for a straight stroke this
    is :math:`e^{-d^2/2\sigma^2}` at distance :math:`d`. Each sample is splatted onto the
    pixels within 3 of it (beyond that its weight is under :math:`e^{-4.5/\sigma^2}`).
    """
    n = points.shape[0]
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    d01 = (p1 - p0).norm(dim=1)
    d12 = (p2 - p1).norm(dim=1)
    # Chord-length parameter of the middle point, kept away from 0 and 1 so the interpolant
    # does not swing far outside the three points (our choice).
    t1 = (d01 / (d01 + d12).clamp_min(1e-6)).clamp(0.25, 0.75)[:, None]
    t = torch.linspace(0.0, 1.0, samples)[None, :]
    l0 = (t - t1) * (t - 1.0) / t1
    l1 = t * (t - 1.0) / (t1 * (t1 - 1.0))
    l2 = t * (t - t1) / (1.0 - t1)
    c = l0[..., None] * p0[:, None] + l1[..., None] * p1[:, None] + l2[..., None] * p2[:, None]
    # Trapezoid arc-length weight of each sample, with the Gaussian's cross-section norm.
    seg = (c[:, 1:] - c[:, :-1]).norm(dim=2)
    w = torch.zeros(c.shape[:2])
    w[:, 1:] += 0.5 * seg
    w[:, :-1] += 0.5 * seg
    w /= math.sqrt(2 * math.pi) * thickness
    # The Gaussian is separable: per sample, a 7-pixel profile along x times one along y.
    offsets = torch.arange(-3.0, 4.0)
    ix = c[..., 0:1].round() + offsets  # (n, M, 7)
    iy = c[..., 1:2].round() + offsets
    gx = torch.exp(-((ix - c[..., 0:1]) ** 2) / (2 * thickness**2)) * (
        (ix >= 0) & (ix < image_size)
    )
    gy = torch.exp(-((iy - c[..., 1:2]) ** 2) / (2 * thickness**2)) * (
        (iy >= 0) & (iy < image_size)
    )
    values = (gy * w[..., None])[..., :, None] * gx[..., None, :]  # (n, M, 7, 7)
    ix, iy = ix.clamp(0, image_size - 1).long(), iy.clamp(0, image_size - 1).long()
    index = (
        torch.arange(n)[:, None, None, None] * image_size + iy[..., :, None]
    ) * image_size + ix[..., None, :]
    out = torch.zeros(n * image_size * image_size)
    out.index_add_(0, index.reshape(-1), values.reshape(-1))
    return out.view(n, image_size, image_size).clamp_(0.0, 1.0)


def make_curves(
    num_train: int = 20_000,
    num_test: int = 10_000,
    *,
    image_size: int = 28,
    thickness: float = 0.7,
    seed: int = 0,
) -> Dataset:
    """Generate a re-creation of the CURVES set: smooth curves through three random points.

    This is **not** the original CURVES file of Hinton & Salakhutdinov (2006) used by Martens
    (2010); it follows its description (28x28 images of a curve through three random points,
    pixel intensities in [0, 1]) with our rendering: a quadratic through the points, drawn as
    an anti-aliased stroke (:func:`_render_curves`). Numbers on it are comparable between
    optimizers, not with the papers' tables.

    Args:
        num_train: Training images.
        num_test: Test images.
        image_size: Side of the square image in pixels.
        thickness: Stroke profile: std of a Gaussian in pixels.
        seed: Seed of the generator; equal seeds give identical images.

    Returns:
        Dataset: inputs ``(N, 1, image_size, image_size)`` in [0, 1], no targets.
    """
    n = num_train + num_test
    gen = torch.Generator().manual_seed(seed)
    # Points stay two pixels inside the frame.
    margin = 2.0
    points = margin + (image_size - 1 - 2 * margin) * torch.rand(n, 3, 2, generator=gen)
    # Samples about a pixel apart on long curves: a sum of Gaussians of std sigma spaced h
    # apart ripples by about 2 exp(-2 pi^2 sigma^2 / h^2), under 1e-3 for sigma = 0.7, h = 1.
    samples = 2 * image_size + 8
    images = torch.empty(n, image_size, image_size)
    for start in range(0, n, 1024):
        stop = min(n, start + 1024)
        images[start:stop] = _render_curves(points[start:stop], image_size, thickness, samples)
    images = images.unsqueeze(1)
    return check_dataset(
        Dataset(
            "curves",
            images[:num_train],
            None,
            images[num_train:],
            None,
            None,
            f"CURVES re-creation: {num_train}+{num_test} generated "
            f"{image_size}x{image_size} images "
            f"(seed {seed}); not the original file",
        )
    )


# ---------------------------------------------------------------------------------------------
# scikit-learn's bundled sets.


@functools.cache
def _sklearn_bundle(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A scikit-learn bundled set's (data, target), read once per process (read-only arrays)."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    data, target = bunch.data, bunch.target.astype(np.int64)
    data.setflags(write=False)
    target.setflags(write=False)
    return data, target


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digit images, scaled to [0, 1], seeded stratified split.

    Returns:
        Dataset: inputs ``(N, 1, 8, 8)``, labels in 0..9.
    """
    data, target = _sklearn_bundle("digits")
    x = (data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = _split(x, target, test_fraction, seed)
    return check_dataset(
        Dataset(
            "digits",
            torch.from_numpy(x_tr),
            torch.from_numpy(y_tr),
            torch.from_numpy(x_te),
            torch.from_numpy(y_te),
            10,
            f"scikit-learn digits, test fraction {test_fraction} (seed {seed})",
        )
    )


def load_breast_cancer(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 569-case Wisconsin breast-cancer set, standardised, seeded stratified split.

    Features are standardised with the training split's mean and std (the test split reuses
    them, so no test information leaks into training).

    Returns:
        Dataset: inputs ``(N, 30)``, labels in {0, 1}.
    """
    x_tr, x_te, y_tr, y_te = _split(*_sklearn_bundle("breast_cancer"), test_fraction, seed)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0
    x_tr, x_te = ((x_tr - mean) / std).astype(np.float32), ((x_te - mean) / std).astype(np.float32)
    return check_dataset(
        Dataset(
            "breast_cancer",
            torch.from_numpy(x_tr),
            torch.from_numpy(y_tr),
            torch.from_numpy(x_te),
            torch.from_numpy(y_te),
            2,
            f"scikit-learn breast cancer, test fraction {test_fraction} (seed {seed})",
        )
    )


# ---------------------------------------------------------------------------------------------
# MNIST-1D (generated by the mnist1d package).


def make_mnist1d(*, num_samples: int = 5000, train_split: float = 0.8, seed: int = 42) -> Dataset:
    """Generate MNIST-1D with the ``mnist1d`` package's ``make_dataset(get_dataset_args())``.

    Only ``make_dataset`` is used: ``get_dataset`` would try to download the published
    pickle and write files into the working directory. ``make_dataset`` is pure computation
    but reseeds NumPy's and Python's global generators, which are restored afterwards. With
    the package defaults (5000 cases, split 0.8, seed 42) it regenerates the standard set.

    Returns:
        Dataset: inputs ``(N, 40)`` standardised by the package, labels in 0..9.

    Raises:
        DataError: The ``mnist1d`` package is not installed.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise DataError(
            f"dataset 'mnist1d' needs the mnist1d package (pip install mnist1d): {err}"
        ) from None
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    # make_dataset seeds and draws from NumPy's legacy global generator: save and restore it.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return check_dataset(
        Dataset(
            "mnist1d",
            torch.from_numpy(np.asarray(raw["x"], dtype=np.float32)),
            torch.from_numpy(np.asarray(raw["y"], dtype=np.int64)),
            torch.from_numpy(np.asarray(raw["x_test"], dtype=np.float32)),
            torch.from_numpy(np.asarray(raw["y_test"], dtype=np.int64)),
            10,
            f"MNIST-1D generated by mnist1d.make_dataset ({num_samples} cases, seed {seed})",
        )
    )


# ---------------------------------------------------------------------------------------------
# MNIST from the user's files.

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_MNIST_HELP = (
    "Provide MNIST yourself (nothing is downloaded): set `data.path` to either the classic "
    "mnist.pkl.gz (a pickled ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) with "
    "50,000/10,000/10,000 cases of 784 floats in [0, 1]) or a directory holding the four IDX "
    "files " + ", ".join(f"{v}[.gz]" for v in _IDX_FILES.values()) + "."
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers only; any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only NumPy arrays are allowed"
        )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = data[3]
    if not 1 <= ndim <= 4 or len(data) < 4 + 4 * ndim:
        raise DataError(
            f"{path}: the IDX header claims {ndim} dimensions (MNIST files have 1 or 3) in a "
            f"file of {len(data)} bytes; the file is corrupt or not an MNIST IDX file."
        )
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(
            f"{path}: header says shape {dims} ({math.prod(dims)} bytes), "
            f"file holds {body.size}; the file is truncated or corrupt."
        )
    return body.reshape(dims)


def load_mnist(path: str | Path, *, include_validation: bool = True) -> Dataset:
    """Load MNIST from ``mnist.pkl.gz`` or a directory of IDX files; nothing is downloaded.

    Args:
        path: The classic ``mnist.pkl.gz`` (50k train / 10k validation / 10k test), or a
            directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
        include_validation: For ``mnist.pkl.gz``: train on train + validation (60,000 cases,
            as Martens 2010 did); otherwise train on the 50,000 only.

    Returns:
        Dataset: inputs ``(N, 1, 28, 28)`` in [0, 1], labels in 0..9.

    Raises:
        DataError: The file is missing (the message says what to provide) or malformed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"MNIST not found at '{path}'. {_MNIST_HELP}")
    if path.is_dir():
        files = {
            key: next((p for p in (path / stem, path / f"{stem}.gz") if p.exists()), None)
            for key, stem in _IDX_FILES.items()
        }
        missing = [f"{_IDX_FILES[key]}[.gz]" for key, p in files.items() if p is None]
        if missing:
            raise DataError(f"MNIST directory '{path}' lacks {', '.join(missing)}. {_MNIST_HELP}")
        arrays = {key: _read_idx(p) for key, p in files.items()}
        x_train = arrays["x_train"].astype(np.float32) / 255.0
        x_test = arrays["x_test"].astype(np.float32) / 255.0
        y_train, y_test = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
        source = f"MNIST IDX files in '{path}'"
    else:
        try:
            with gzip.open(path, "rb") as f:
                splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
            raise DataError(f"cannot read '{path}' as mnist.pkl.gz: {err}. {_MNIST_HELP}") from None
        if include_validation:
            x_train, y_train = (
                np.concatenate([x_train, x_valid]),
                np.concatenate([y_train, y_valid]),
            )
        x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
        y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
        source = f"MNIST from '{path}'" + (" (train + validation)" if include_validation else "")
    for name, x in (("train", x_train), ("test", x_test)):
        if x.ndim < 2 or math.prod(x.shape[1:]) != 784:
            raise DataError(f"MNIST {name} images must have 784 pixels each, got shape {x.shape}.")
    x_train, x_test = x_train.reshape(-1, 1, 28, 28), x_test.reshape(-1, 1, 28, 28)
    return check_dataset(
        Dataset(
            "mnist",
            torch.from_numpy(x_train),
            torch.from_numpy(y_train),
            torch.from_numpy(x_test),
            torch.from_numpy(y_test),
            10,
            source,
        )
    )


# ---------------------------------------------------------------------------------------------
# The user's .npz.


def load_npz(
    path: str | Path,
    *,
    train_inputs: str = "x_train",
    train_targets: str | None = "y_train",
    test_inputs: str = "x_test",
    test_targets: str | None = "y_test",
    num_classes: int | None = None,
) -> Dataset:
    """Load named arrays from a ``.npz`` file (no pickled objects).

    Integer targets are class labels ``(N,)`` (``num_classes`` defaults to the largest label
    plus one); floating targets are real values, ``(N,)`` becoming ``(N, 1)``.

    Raises:
        DataError: The file is missing or unreadable, an array is missing, or the arrays are
            inconsistent (see :func:`check_dataset`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"npz file not found: '{path}'.")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            wanted = [
                n for n in (train_inputs, train_targets, test_inputs, test_targets) if n is not None
            ]
            missing = [n for n in wanted if n not in names]
            if missing:
                raise DataError(
                    f"'{path}' has no array named {', '.join(map(repr, missing))}; it holds "
                    f"{', '.join(map(repr, names)) or 'no arrays'}. Set the names in `data`."
                )
            arrays = {n: f[n] for n in wanted}
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read '{path}' as .npz: {err}.") from None

    def inputs(name: str) -> Tensor:
        a = arrays[name]
        if a.dtype.kind not in "fiub":
            raise DataError(f"'{path}': inputs {name!r} must be numeric, got dtype {a.dtype}.")
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def targets(name: str | None) -> Tensor | None:
        if name is None:
            return None
        a = arrays[name]
        if a.dtype.kind in "iub":
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        if a.dtype.kind == "f":
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            return t[:, None] if t.dim() == 1 else t
        raise DataError(f"'{path}': targets {name!r} must be numeric, got dtype {a.dtype}.")

    y_train, y_test = targets(train_targets), targets(test_targets)
    if (
        y_train is not None
        and not y_train.is_floating_point()
        and num_classes is None
        and y_train.numel()
    ):
        if y_train.dim() == 1 and y_test is not None and y_test.dim() == 1 and y_test.numel():
            num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    return check_dataset(
        Dataset(
            "npz",
            inputs(train_inputs),
            y_train,
            inputs(test_inputs),
            y_test,
            num_classes,
            f"arrays from '{path}'",
        )
    )


# ---------------------------------------------------------------------------------------------
# The addition problem (generated).


def make_addition(
    *, length: int = 100, num_train: int = 10_000, num_test: int = 1000, seed: int = 0
) -> Dataset:
    """Generate the addition problem (Hochreiter & Schmidhuber 1997; Martens & Sutskever 2011).

    Each case is a sequence of ``length`` steps with two input channels: a value drawn
    uniformly from [0, 1] and a marker that is 1 at exactly two steps, the first among the
    first 10% of the steps, the second among the first half (distinct from the first). The
    target, read at the last step, is the sum of the two marked values. Martens & Sutskever
    count a case as an error when the prediction is off by more than 0.04. The paper draws
    fresh sequences every step; here the training set is fixed.

    Returns:
        Dataset: inputs ``(N, length, 2)``, targets ``(N, 1)`` in [0, 2].
    """
    gen = torch.Generator().manual_seed(seed)
    n = num_train + num_test
    values = torch.rand(n, length, generator=gen)
    first = torch.randint(0, max(1, length // 10), (n,), generator=gen)
    half = max(2, length // 2)
    # Second marker uniform over the first half without the first one's position.
    second = torch.randint(0, half - 1, (n,), generator=gen)
    second = second + (second >= first).long()
    rows = torch.arange(n)
    marker = torch.zeros(n, length)
    marker[rows, first] = 1.0
    marker[rows, second] = 1.0
    x = torch.stack([values, marker], dim=2)
    y = (values[rows, first] + values[rows, second])[:, None]
    return check_dataset(
        Dataset(
            "addition",
            x[:num_train],
            y[:num_train],
            x[num_train:],
            y[num_train:],
            None,
            f"addition problem, T={length}, {num_train}+{num_test} sequences (seed {seed})",
        )
    )


# ---------------------------------------------------------------------------------------------
# Registry.

#: Loader of each dataset name; its keyword arguments are the config's ``data`` keys.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "curves": make_curves,
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
    "mnist1d": make_mnist1d,
    "mnist": load_mnist,
    "npz": load_npz,
    "addition": make_addition,
}


def load_dataset(name: str, **options: Any) -> Dataset:
    """Load or generate a dataset by name.

    Args:
        name: One of :data:`DATASETS` (``curves``, ``digits``, ``breast_cancer``, ``mnist1d``,
            ``mnist``, ``npz``, ``addition``).
        **options: Keyword arguments of that loader (e.g. ``num_train``, ``seed``, ``path``);
            ``seed=None`` is dropped so the loader's default applies.

    Returns:
        Dataset: checked CPU tensors.

    Raises:
        ValueError: Unknown name or option.
        DataError: Missing, corrupt or inconsistent data.

    Example:
        >>> load_dataset("addition", length=10, num_train=3, num_test=2).x_train.shape
        torch.Size([3, 10, 2])
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}; expected one of {', '.join(map(repr, DATASETS))}."
        )
    loader = DATASETS[name]
    options = {k: v for k, v in options.items() if not (k == "seed" and v is None)}
    allowed = [p for p in inspect.signature(loader).parameters]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} for dataset {name!r}; "
            f"expected some of {', '.join(map(repr, allowed))}."
        )
    return loader(**options)
