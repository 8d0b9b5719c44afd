"""Models of the HF literature: deep autoencoders, MLPs, a small CNN and a tanh RNN.

Every model returns raw outputs (logits or linear values); the loss applies the output
nonlinearity (softmax, logistic), so Gauss-Newton products can use the loss's closed-form
Hessian. No model has dropout or batch norm: the quadratic model of HF must not change between
CG iterations.

Example:
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> ae = build_model("autoencoder", input_shape=(1, 28, 28), layer_sizes=[784, 400, 6],
    ...                  init="sparse")
    >>> ae(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 784])
    >>> int((ae.encoder[0].weight != 0).sum(dim=1).max())  # 15 incoming connections per unit
    15
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._graph_ops import cat_last
from ._tanh_recurrence import tanh_recurrence

__all__ = [
    "Autoencoder",
    "MLP",
    "ConvNet",
    "TanhRNN",
    "MODELS",
    "build_model",
    "sparse_init_",
    "make_activation",
]

_ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (``sigmoid`` is the paper's "logistic").

    Raises:
        ValueError: Unknown name.
    """
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}; expected one of {', '.join(map(repr, _ACTIVATIONS))}."
        )
    return _ACTIVATIONS[name]()


class Autoencoder(nn.Module):
    """Deep autoencoder of Hinton & Salakhutdinov (2006) as trained by Martens (2010, §6).

    The encoder maps ``layer_sizes[0] -> ... -> layer_sizes[-1]`` with logistic hidden units and
    a linear code layer; the decoder mirrors it back to ``layer_sizes[0]`` with logistic hidden
    units and returns the output *logits* (train with BCE-with-logits, summed over pixels and
    averaged over cases, as Martens did; ``sigmoid(logits)`` is the reconstruction).

    Args:
        layer_sizes: Encoder widths from the input to the code, e.g. CURVES
            ``[784, 400, 200, 100, 50, 25, 6]``, MNIST ``[784, 1000, 500, 250, 30]``.
        activation: Hidden nonlinearity (``sigmoid`` in the paper).
    """

    def __init__(self, layer_sizes: Sequence[int], activation: str = "sigmoid") -> None:
        super().__init__()
        sizes = [int(s) for s in layer_sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(
                "`layer_sizes` must list at least an input and a code size, all >= 1, "
                f"got {list(layer_sizes)!r}."
            )
        self.layer_sizes = tuple(sizes)
        self.encoder = _stack(sizes, activation, last_linear=True)
        self.decoder = _stack(sizes[::-1], activation, last_linear=True)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction logits ``(N, layer_sizes[0])`` of the flattened input."""
        return self.decoder(self.encoder(x.flatten(1)))

    def encode(self, x: Tensor) -> Tensor:
        """The linear code ``(N, layer_sizes[-1])``."""
        return self.encoder(x.flatten(1))


def _stack(sizes: Sequence[int], act: str, *, last_linear: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if not (last_linear and i == len(sizes) - 2):
            layers.append(make_activation(act))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Fully connected network on the flattened input, returning raw outputs.

    Args:
        input_size: Features per case (after flattening).
        hidden_sizes: Widths of the hidden layers (may be empty: a linear model).
        num_outputs: Classes (logits) or regression outputs.
        activation: Hidden nonlinearity.
    """

    def __init__(
        self,
        input_size: int,
        hidden_sizes: Sequence[int],
        num_outputs: int,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        self.net = _stack([input_size, *hidden_sizes, num_outputs], activation, last_linear=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class ConvNet(nn.Module):
    """Small CNN: blocks of 3x3 conv (same padding), activation and 2x2 max-pool, then an MLP head.

    Args:
        input_shape: ``(channels, height, width)`` of one image.
        num_outputs: Classes.
        channels: Output channels of each block; pooling is skipped once a side is below 2.
        hidden_size: Width of the fully connected hidden layer.
        activation: Nonlinearity.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        channels: Sequence[int] = (16, 32),
        hidden_size: int = 64,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                "ConvNet needs image inputs (channels, height, width), "
                f"got per-case shape {tuple(input_shape)}."
            )
        c, h, w = (int(s) for s in input_shape)
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), make_activation(activation)]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*layers)
        self.head = _stack([c * h * w, hidden_size, num_outputs], activation, last_linear=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class TanhRNN(nn.Module):
    r"""Elman RNN with tanh units, read out (linearly) at the last step.

    :math:`h_t = \tanh(W_x x_t + W_h h_{t-1} + b)`, :math:`h_0 = 0`, output
    :math:`W_o h_T + b_o`. Written as an explicit loop of differentiable ops (not ``nn.RNN``)
    so double backward and forward-mode AD work on every device (cuDNN's RNN supports neither).
    Where a graph is built the loop is one autograd node (:mod:`._tanh_recurrence`) with BPTT
    and its derivatives written out: the same values, gradients and curvature products up to
    the order of float sums, without the engine's ~5 nodes per step in every backward pass (a
    Gauss-Newton product 0.77-0.92x, measured in ``experiments/_rnnprod.py``).

    Args:
        input_size: Channels per step.
        hidden_size: Hidden units (100 in Martens & Sutskever 2011).
        num_outputs: Outputs at the last step.
        spectral_radius: Rescale :math:`W_h` to this spectral radius (largest
            :math:`|\text{eigenvalue}|`) after initialisation; ``None`` keeps it as drawn.
            :func:`build_model` rescales again after a sparse initialisation.

    Example:
        >>> rnn = TanhRNN(2, 8, 1, spectral_radius=1.2)
        >>> w = rnn.recurrent.weight.detach().double()
        >>> round(float(torch.linalg.eigvals(w).abs().max()), 6)
        1.2
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_outputs: int,
        spectral_radius: float | None = None,
    ) -> None:
        super().__init__()
        if spectral_radius is not None and not spectral_radius > 0:
            raise ValueError(f"`spectral_radius` must be > 0 or None, got {spectral_radius!r}.")
        self.spectral_radius = spectral_radius
        self.input = nn.Linear(input_size, hidden_size)
        self.recurrent = nn.Linear(hidden_size, hidden_size, bias=False)
        self.readout = nn.Linear(hidden_size, num_outputs)
        self.rescale_recurrent_()

    @torch.no_grad()
    def rescale_recurrent_(self) -> TanhRNN:
        """Scale :math:`W_h` in place to :attr:`spectral_radius` (nothing when it is None).

        The radius of the recurrent map decides whether the hidden state forgets its past
        (below 1) or keeps it; Martens & Sutskever (2011) start their RNNs near 1.2.

        Raises:
            ValueError: If :math:`W_h` has spectral radius 0 (e.g. all zeros): no scale fits.
        """
        if self.spectral_radius is None:
            return self
        w = self.recurrent.weight
        radius = float(torch.linalg.eigvals(w.detach().double().cpu()).abs().max())
        if not radius > 0:
            raise ValueError(
                f"The hidden-to-hidden weights have spectral radius {radius!r}; cannot rescale "
                f"them to `spectral_radius` = {self.spectral_radius!r}."
            )
        w.mul_(self.spectral_radius / radius)
        return self

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, input_size)
        # the same ops as forward_with_hidden's outputs, without its copy of every state
        # (an (N, T, hidden_size) concatenation, ~1/7 of a forward at T = 50) where no graph
        # is built
        return self.readout(self._unroll(x)[0])

    def forward_with_hidden(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs and the hidden states of every step, ``(N, T, hidden_size)``; the latter
        for HF's structural damping (Martens & Sutskever 2011, §3.3)."""
        h, states = self._unroll(x, keep=True)
        return self.readout(h), states

    def _unroll(self, x: Tensor, keep: bool = False) -> tuple[Tensor, Tensor | None]:
        """The last hidden state, and every step's ``(N, T, hidden_size)`` when ``keep`` or
        when a graph is built (else None)."""
        u = self.input(x)  # every step's input projection in one product
        w = self.recurrent.weight
        if torch.is_grad_enabled() and (u.requires_grad or w.requires_grad):
            # one autograd node for the loop, its backward and the backward's derivative
            # written out (_tanh_recurrence): gradients and curvature products skip the
            # engine's ~5 nodes per step; values bit for bit those of the loop below
            states, last = tanh_recurrence(u, w)
            return last, states
        # unbind: per-step views whose backward does not zero-fill a tensor the size of all
        # steps (u[:, t] would: O(T^2))
        us = u.unbind(1)
        h = torch.tanh(us[0])
        hs = [h]
        for ut in us[1:]:
            h = torch.tanh(ut + self.recurrent(h))
            hs.append(h)
        # torch.stack's backward would cost O(T^2) in every curvature product (_graph_ops)
        return h, cat_last(hs).unflatten(-1, (len(hs), h.shape[-1])) if keep else None


@torch.no_grad()
def sparse_init_(
    model: nn.Module,
    num_connections: int = 15,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Martens' sparse initialisation, in place: each unit gets ``num_connections`` nonzero
    incoming weights drawn from N(0, std²), the rest 0; biases 0.

    Applies to every ``nn.Linear`` and ``nn.Conv*`` (a conv unit's incoming connections are its
    ``in_channels x kernel`` weights). A unit with fewer inputs keeps all of them.

    Args:
        model: The module whose layers to initialise.
        num_connections: Nonzero incoming weights per unit (15 in the paper).
        std: Standard deviation of the nonzero weights (1 in the paper).
        generator: Random source; the global one when None.

    Returns:
        nn.Module: ``model``.

    References:
        Martens (2010), Deep learning via Hessian-free optimization, ICML, §5.
    """
    if num_connections < 1:
        raise ValueError(f"`num_connections` must be >= 1, got {num_connections!r}.")
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        weight = module.weight
        flat = weight.view(weight.shape[0], -1)
        fan_in = flat.shape[1]
        k = min(num_connections, fan_in)
        # k distinct inputs per unit: the k smallest of i.i.d. uniform scores.
        scores = torch.rand(flat.shape, generator=generator, device=weight.device)
        chosen = scores.topk(k, dim=1, largest=False).indices
        values = std * torch.randn(
            flat.shape[0], k, generator=generator, device=weight.device, dtype=weight.dtype
        )
        flat.zero_().scatter_(1, chosen, values)
        if module.bias is not None:
            module.bias.zero_()
    return model


def _num_features(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def _build_autoencoder(input_shape, num_outputs, *, layer_sizes, activation="sigmoid"):
    if int(layer_sizes[0]) != _num_features(input_shape):
        raise ValueError(
            f"`layer_sizes[0]` = {layer_sizes[0]} must equal the input size "
            f"{_num_features(input_shape)} (per-case shape {tuple(input_shape)})."
        )
    return Autoencoder(layer_sizes, activation)


def _build_mlp(input_shape, num_outputs, *, hidden_sizes=(100,), activation="tanh"):
    return MLP(_num_features(input_shape), hidden_sizes, num_outputs, activation)


def _build_cnn(input_shape, num_outputs, *, channels=(16, 32), hidden_size=64, activation="relu"):
    return ConvNet(input_shape, num_outputs, channels, hidden_size, activation)


def _build_rnn(input_shape, num_outputs, *, hidden_size=100, spectral_radius=None):
    if len(input_shape) != 2:
        raise ValueError(
            "TanhRNN needs sequence inputs (steps, channels), "
            f"got per-case shape {tuple(input_shape)}."
        )
    return TanhRNN(int(input_shape[1]), hidden_size, num_outputs, spectral_radius)


#: Builder of each model name; its keyword arguments (and ``init``) are the ``model`` keys.
MODELS = {
    "autoencoder": _build_autoencoder,
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "rnn": _build_rnn,
}


def build_model(
    name: str,
    *,
    input_shape: Sequence[int],
    num_outputs: int | None = None,
    init: str = "default",
    sparse_connections: int = 15,
    **options: Any,
) -> nn.Module:
    """Build a model by name for inputs of a given per-case shape.

    Args:
        name: ``autoencoder`` (options: ``layer_sizes``, ``activation``), ``mlp``
            (``hidden_sizes``, ``activation``), ``cnn`` (``channels``, ``hidden_size``,
            ``activation``) or ``rnn`` (``hidden_size``, ``spectral_radius``).
        input_shape: Shape of one input case, e.g. ``(1, 28, 28)``, ``(64,)``, ``(T, 2)``.
        num_outputs: Classes or regression outputs (ignored by the autoencoder).
        init: ``default`` (PyTorch's) or ``sparse`` (:func:`sparse_init_`, global RNG).
        sparse_connections: Incoming connections per unit for ``init="sparse"``.
        **options: The model's own keyword arguments.

    Returns:
        nn.Module: float32 on the CPU, initialised from the global RNG (seed it first).

    Raises:
        ValueError: Unknown name, init or option, or options that do not fit ``input_shape``.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; expected one of {', '.join(map(repr, MODELS))}.")
    if init not in ("default", "sparse"):
        raise ValueError(f"Unknown `init` {init!r}; expected 'default' or 'sparse'.")
    if name != "autoencoder" and (num_outputs is None or num_outputs < 1):
        raise ValueError(f"Model {name!r} needs `num_outputs` >= 1, got {num_outputs!r}.")
    try:
        model = MODELS[name](tuple(input_shape), num_outputs, **options)
    except TypeError as err:
        raise ValueError(f"Bad options for model {name!r}: {err}.") from None
    if init == "sparse":
        sparse_init_(model, sparse_connections)
        if isinstance(model, TanhRNN):
            model.rescale_recurrent_()  # the radius applies to the weights as initialised
    return model
