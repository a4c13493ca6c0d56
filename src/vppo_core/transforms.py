r"""Per-response transforms of token signals: min-max, offset, soft-OR fusion, tanh gate, response softmax.

The perception-aware methods turn a raw token signal (a divergence, an entropy, a cosine) into a
weight in a few standard steps. The ones that need a per-response statistic live here, all with the
same conventions: ``response_mask`` marks the valid tokens of each row (a row is one response),
statistics are taken over those tokens only, padded positions are never read into a statistic and
come back as exactly 0, and results are float32 (float64 for float64 input). Nothing here syncs the
host or detaches: detach the signal yourself when it feeds a mask or a weight (the recipes in
[`vppo_core.family`][vppo_core.family] do).

Elementwise maps without a statistic (``torch.log1p``, ``torch.clamp``, an affine offset such as
VGPO's paper form $(S+1)/2$) are plain torch and need no block.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ._checks import as_bool_mask, check_positive, check_same_device, result_dtype, typechecked

__all__ = ["MINMAX_EPS", "minmax_per_response", "response_softmax", "shift_nonnegative", "soft_or", "tanh_gate"]

MINMAX_EPS = 1e-8
"""Added to every min-max range (the family's ``mm_resp`` convention): a constant response maps to 0."""


# ----------------------------------------------------------------------------- private helpers (shared)


def _prepare(x: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Upcast to the result dtype with padding replaced by 0 before any arithmetic (NaN there never leaks)."""
    check_same_device(x=x, response_mask=response_mask)
    valid = as_bool_mask(response_mask)
    return torch.where(valid, x.to(result_dtype(x)), 0.0), valid


def response_count(valid: Tensor) -> Tensor:
    """Valid tokens per row, ``[batch, 1]``, at least 1 (so an empty row divides by 1)."""
    return valid.sum(-1, keepdim=True).clamp_min(1)


def response_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over each row's valid entries, ``[batch, 1]`` (0 for an empty row); ``x`` is 0 at padding."""
    return torch.where(valid, x, 0.0).sum(-1, keepdim=True) / response_count(valid).to(x.dtype)


def response_min(x: Tensor, valid: Tensor) -> Tensor:
    """Minimum over each row's valid entries, ``[batch, 1]`` (``+inf`` for an empty row)."""
    return torch.where(valid, x, float("inf")).amin(-1, keepdim=True)


def response_max(x: Tensor, valid: Tensor) -> Tensor:
    """Maximum over each row's valid entries, ``[batch, 1]`` (``-inf`` for an empty row)."""
    return torch.where(valid, x, float("-inf")).amax(-1, keepdim=True)


def minmax_rows(x: Tensor, valid: Tensor, eps: float = MINMAX_EPS) -> Tensor:
    """``(x - min) / (max - min + eps)`` per row over valid entries; 0 at padding (no checks)."""
    if x.shape[-1] == 0:
        return x
    lo = response_min(x, valid)
    out = (x - lo) / (response_max(x, valid) - lo + eps)
    return torch.where(valid, out, 0.0)


# ----------------------------------------------------------------------------- public functions


@typechecked
def minmax_per_response(
    x: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    eps: float = MINMAX_EPS,
) -> Float[Tensor, "batch seq"]:
    r"""Per-response min-max normalisation to $[0, 1]$ (the family's $\operatorname{mm}_{resp}$).

    For response $i$, over its valid tokens,

    $$
    \hat x_t = \frac{x_t - \min_{t' \in i} x_{t'}}{\max_{t' \in i} x_{t'} - \min_{t' \in i} x_{t'} + \epsilon},
    \qquad \epsilon = 10^{-8}.
    $$

    Used on every signal of PEPO (arXiv:2603.22847), VEPO (arXiv:2606.03937), VGPO
    (arXiv:2604.09349) and PGPO (arXiv:2604.01840, inside [`pgpo_weights`][vppo_core.pgpo_weights]).
    The maximum maps to $1/(1 + \epsilon/\text{range})$: exactly 1 in float32 once the range exceeds
    about 0.3, just below 1 in float64. A constant response (including a single token) maps to 0
    everywhere. Padding is 0 and never read;
    NaN at a valid token makes its response NaN. Differentiable (the min and max route the gradient
    to their arg-extremes); detach the input when the result feeds a weight.

    Shapes:
        - ``x``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        x: Token signal.
        response_mask: Valid response tokens (bool or 0/1).
        eps: Added to the range, $> 0$.

    Returns:
        Normalised signal, float32 (float64 for float64 input), 0 at padding.

    Raises:
        ValueError: If ``eps <= 0`` or the tensors are on different devices.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 3.0, 2.0, 9.0], [5.0, 5.0, 0.0, 0.0]])
        >>> minmax_per_response(x, torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
        tensor([[0.0000, 1.0000, 0.5000, 0.0000],
                [0.0000, 0.0000, 0.0000, 0.0000]])
    """
    check_positive("eps", eps)
    x, valid = _prepare(x, response_mask)
    return minmax_rows(x, valid, eps)


@typechecked
def shift_nonnegative(
    x: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
) -> Float[Tensor, "batch seq"]:
    r"""Offset a signal so that each response's smallest value is at least 0: $x - \min(0, \min_{t\in i} x_t)$.

    VGPO's official code (arXiv:2604.09349) turns its cosine signal $S_t \in [-1, 1]$ into a
    non-negative score this way ($\rho = S - m$, $m = \min(0, \min S)$); the paper writes the affine map
    $(S + 1)/2$ instead, which is plain arithmetic. A response whose values are all $\ge 0$ is unchanged.
    The minimum is taken per response (the FAMILY notes do not pin its scope).

    Shapes:
        - ``x``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        x: Token signal.
        response_mask: Valid response tokens.

    Returns:
        The shifted signal, float32 (float64 for float64 input), 0 at padding.

    Example:
        >>> import torch
        >>> shift_nonnegative(torch.tensor([[-0.5, 0.25, 1.0], [0.1, 0.2, 0.3]]), torch.ones(2, 3))
        tensor([[0.0000, 0.7500, 1.5000],
                [0.1000, 0.2000, 0.3000]])
    """
    x, valid = _prepare(x, response_mask)
    if x.shape[-1] == 0:
        return x
    low = response_min(x, valid).clamp_max(0.0)
    return torch.where(valid, x - low, 0.0)


@typechecked
def soft_or(
    signals: Sequence[Float[Tensor, "batch seq"]],
    weights: Sequence[float],
    response_mask: Shaped[Tensor, "batch seq"] | None = None,
) -> Float[Tensor, "batch seq"]:
    r"""Soft-OR fusion of signals in $[0, 1]$: $1 - \prod_i (1 - x_i)^{w_i}$.

    High when any signal is high (a weighted geometric "noisy-OR"). VEPO (arXiv:2606.03937) fuses
    its normalised JSD $\hat\jmath$ and entropy shift $\hat\delta$ with weights $(\alpha, 1 - \alpha)$,
    $\alpha = 0.7$. With one signal and weight 1 it is the identity. $0^0 = 1$, so a signal with
    weight 0 is ignored even where it equals 1.

    Shapes:
        - each of ``signals``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        signals: Signals in $[0, 1]$ (e.g. from [`minmax_per_response`][vppo_core.transforms.minmax_per_response]).
        weights: One exponent $w_i \ge 0$ per signal.
        response_mask: Positions that count (others are 0); ``None`` keeps all.

    Returns:
        The fused signal in $[0, 1]$, float32 (float64 if any input is float64).

    Raises:
        ValueError: If there are no signals, the counts differ, or a weight is negative or not finite.

    Example:
        >>> import torch
        >>> j, d = torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[0.0, 0.0, 0.5]])
        >>> soft_or([j, d], [0.7, 0.3])
        tensor([[0.0000, 1.0000, 0.5000]])
    """
    if len(signals) == 0 or len(signals) != len(weights):
        raise ValueError(
            f"soft_or needs one weight per signal and at least one signal, got {len(signals)} signals "
            f"and {len(weights)} weights"
        )
    for i, w in enumerate(weights):
        if not (w >= 0 and w != float("inf")):
            raise ValueError(f"weights[{i}] must be a finite number >= 0, got {w!r}")
    dtype = result_dtype(*signals)
    keep = None
    if response_mask is not None:
        check_same_device(signal=signals[0], response_mask=response_mask)
        keep = as_bool_mask(response_mask)
    survival = torch.ones(signals[0].shape, dtype=dtype, device=signals[0].device)
    for x, w in zip(signals, weights):
        x = x.to(dtype) if keep is None else torch.where(keep, x.to(dtype), 0.0)  # padding never read
        survival = survival * torch.pow(1.0 - x, w)
    return 1.0 - survival  # exactly 0 at padding, where every signal was set to 0


@typechecked
def tanh_gate(
    x: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    alpha: float,
) -> Float[Tensor, "batch seq"]:
    r"""A gate around 1 from a signal's deviation from its response mean: $1 + \alpha \tanh(x_t - \bar x_i)$.

    PEPO (arXiv:2603.22847) gates its visual-similarity weights with
    $g_t = 1 + \alpha\tanh\big((\hat v_t + \hat h_t) - \operatorname{mean}_{resp}(\hat v + \hat h)\big)$,
    $\alpha = 0.05$, so tokens both image-grounded and uncertain get slightly more weight. The gate
    lies in $[1 - |\alpha|, 1 + |\alpha|]$ (the ends are reached where $\tanh$ rounds to $\pm 1$).
    Differentiable.

    Shapes:
        - ``x``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        x: Token signal.
        response_mask: Valid response tokens; the mean is over them.
        alpha: Gate amplitude (PEPO: 0.05).

    Returns:
        The gate, float32 (float64 for float64 input), 0 at padding.

    Raises:
        ValueError: If ``alpha`` is not finite.

    Example:
        >>> import torch
        >>> tanh_gate(torch.tensor([[0.0, 1.0, 2.0]]), torch.ones(1, 3), alpha=0.5)
        tensor([[0.6192, 1.0000, 1.3808]])
    """
    if not abs(alpha) < float("inf"):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    x, valid = _prepare(x, response_mask)
    gate = 1.0 + alpha * torch.tanh(x - response_mean(x, valid))
    return torch.where(valid, gate, 0.0)


@typechecked
def response_softmax(
    x: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    temperature: float = 1.0,
) -> Float[Tensor, "batch seq"]:
    r"""Softmax over each response's valid tokens, scaled by its length so the weights average to 1.

    $$
    w_t = L_i\,\frac{\exp(x_t / T)}{\sum_{t' \in i} \exp(x_{t'} / T)} ,
    \qquad \frac1{L_i}\sum_{t \in i} w_t = 1 .
    $$

    PEPO (arXiv:2603.22847) weights tokens by $L_i\operatorname{softmax}_{resp}(VS_t\, g_t / T_g)$
    ($T_g = 1.8$ in its released script). A constant response gets weight 1 everywhere; an empty row
    is all 0. Differentiable (PEPO's official code lets the gradient flow through these weights).

    Shapes:
        - ``x``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        x: Token logits.
        response_mask: Valid response tokens.
        temperature: $T > 0$.

    Returns:
        Weights $\ge 0$ with mean 1 over each non-empty response, float32 (float64 for float64), 0 at padding.

    Raises:
        ValueError: If ``temperature <= 0``.

    Example:
        >>> import torch
        >>> w = response_softmax(torch.tensor([[0.0, 0.0, 1.0, 5.0]]), torch.tensor([[1, 1, 1, 0]]))
        >>> w, w.sum()
        (tensor([[0.6358, 0.6358, 1.7284, 0.0000]]), tensor(3.))
    """
    check_positive("temperature", temperature)
    x, valid = _prepare(x, response_mask)
    z = torch.where(valid, x / temperature, float("-inf"))
    # An empty row is all -inf: softmax gives NaN there, replaced below by 0.
    probs = torch.softmax(z, dim=-1)
    length = valid.sum(-1, keepdim=True).to(x.dtype)
    return torch.where(valid, length * probs, 0.0)
