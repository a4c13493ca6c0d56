"""Per-trajectory statistics of token visual dependency: the paper's sparsity measurements.

Every function here is a pure measurement over ``dependency [batch, seq]`` and ``response_mask``:
inputs are detached and never modified, results are float32 (float64 for float64 input), padded
positions are never read (NaN or inf there does not leak), and nothing syncs the host with the
device. A valid token whose dependency is NaN makes its trajectory's statistics NaN. A trajectory
with no valid token has nothing to measure and gets NaN (unlike
[`trajectory_dependency`][vppo_core.trajectory_dependency], which gives it 0 for TAS); select rows
with ``response_mask.any(-1)``.

Masked order statistics use one sort per call: padding is replaced by ``+inf`` (``-inf`` for a
descending sort) so that it sorts behind every valid value, and the first ``n_i`` sorted entries of
row ``i`` are its valid values. No boolean indexing, so every shape is known without reading data.
"""

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from .._checks import _tracing, as_bool_mask, check_fraction, check_same_device, result_dtype, typechecked
from ..masking import num_kept_tokens

__all__ = ["fraction_above", "gini", "top_share", "trajectory_quantiles"]


# ----------------------------------------------------------------------------- helpers


def levels(name: str, values: float | Sequence[float]) -> tuple[tuple[float, ...], bool]:
    """A float or a non-empty sequence of finite floats as a tuple, and whether a scalar was given."""
    scalar = isinstance(values, (int, float))  # a tuple: Dynamo of torch 2.4 cannot trace `int | float`
    seq = (values,) if scalar else tuple(values)
    if not seq:
        raise ValueError(f"{name} must be a float or a non-empty sequence of floats, got {values!r}")
    out = []
    for v in seq:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (_tracing() or math.isfinite(v)):
            raise ValueError(f"every value of {name} must be a finite float, got {v!r} in {values!r}")
        out.append(float(v))
    return tuple(out), scalar


def prepare(dependency: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detached dependency in the result dtype, bool mask, valid counts ``[batch]``, NaN rows ``[batch]``."""
    check_same_device(dependency=dependency, response_mask=response_mask)
    valid = as_bool_mask(response_mask)
    dep = dependency.detach().to(result_dtype(dependency))
    n = valid.sum(-1)
    nan_row = (valid & dep.isnan()).any(-1)
    return dep, valid, n, nan_row


def _sorted_valid(dep: Tensor, valid: Tensor, *, descending: bool) -> Tensor:
    """Each row sorted with its padding behind every valid value (``±inf`` fill)."""
    fill = float("-inf") if descending else float("inf")
    return torch.sort(torch.where(valid, dep, fill), dim=-1, descending=descending).values


def _undefined(out: Tensor, n: Tensor, nan_row: Tensor) -> Tensor:
    """NaN for rows without a valid token or with a NaN among them."""
    bad = (n == 0) | nan_row
    if out.ndim == 2:
        bad = bad.unsqueeze(-1)
    return torch.where(bad, float("nan"), out)


def _squeeze(out: Tensor, scalar: bool) -> Tensor:
    return out.squeeze(-1) if scalar else out


# ----------------------------------------------------------------------------- statistics


@typechecked
def trajectory_quantiles(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    q: float | Sequence[float],
) -> Float[Tensor, " batch *q"]:
    r"""Quantiles of each trajectory's token dependency, over its valid tokens only.

    With $x_{(0)} \le \dots \le x_{(n_i-1)}$ the sorted valid dependencies of trajectory $i$, the
    quantile at level $q$ interpolates linearly between order statistics, like ``torch.quantile``'s
    default (``interpolation="linear"``):

    $$
    h = q\,(n_i - 1), \qquad Q_i(q) = x_{(\lfloor h \rfloor)}
        + (h - \lfloor h \rfloor)\,\bigl(x_{(\lceil h \rceil)} - x_{(\lfloor h \rfloor)}\bigr).
    $$

    One sort serves every level (padding sorts last as $+\infty$; no boolean indexing, no host sync).
    Rows without a valid token, and rows with a NaN at a valid token, give NaN.

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch]`` for a float ``q``, ``[batch, q]`` for a sequence of levels

    Args:
        dependency: Token visual dependency (not differentiated through).
        response_mask: Valid response tokens (bool or 0/1).
        q: A level in $[0, 1]$ or a non-empty sequence of them.

    Returns:
        Quantiles, float32 (float64 for float64 dependency).

    Raises:
        ValueError: If a level is not in $[0, 1]$ or ``q`` is empty.

    Example:
        >>> import torch
        >>> from vppo_core.analysis import trajectory_quantiles
        >>> dep = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
        >>> trajectory_quantiles(dep, mask, [0.5, 0.9])
        tensor([[1.5000, 2.7000],
                [4.0000, 4.0000]])
    """
    qs, scalar = levels("q", q)
    for v in qs:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"every level in q must be in [0, 1], got {v!r} in {q!r}")
    dep, valid, n, nan_row = prepare(dependency, response_mask)
    batch, seq = dep.shape
    if seq == 0:
        return _squeeze(dep.new_full((batch, len(qs)), float("nan")), scalar)
    x = _sorted_valid(dep, valid, descending=False)
    last = (n - 1).clamp_min(0).to(torch.float64)
    ranks = torch.stack([last * v for v in qs], dim=-1)  # float64 [batch, n_q]
    below, above = ranks.floor().long(), ranks.ceil().long()
    weight = (ranks - below).to(dep.dtype)
    lo, hi = x.gather(-1, below), x.gather(-1, above)
    # `hi == lo` keeps equal infinite neighbours (lerp would give inf - inf = NaN).
    out = torch.where(hi == lo, lo, torch.lerp(lo, hi, weight))
    return _squeeze(_undefined(out, n, nan_row), scalar)


@typechecked
def top_share(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    k: float | Sequence[float],
) -> Float[Tensor, " batch *k"]:
    r"""Share of each trajectory's total dependency carried by its top-$k$ fraction of tokens.

    The paper's sparsity measurement (VPPO, arXiv:2510.09285, Sec. 3): with
    $x_{[0]} \ge x_{[1]} \ge \dots$ trajectory $i$'s valid dependencies in descending order and
    $m = \lceil k\,n_i \rceil$ kept tokens, exactly as many as TGF keeps
    ([`num_kept_tokens`][vppo_core.num_kept_tokens]),

    $$
    \operatorname{share}_i(k) = \frac{\sum_{j < m} x_{[j]}}{\sum_{j < n_i} x_{[j]}} .
    $$

    So ``top_share(dep, mask, 0.4)`` is the share of dependency kept by
    ``token_filter_mask(dep, mask, k=0.4)``; the top 100% carry exactly 1. A trajectory whose
    dependency sums to 0 counts as uniform (the limit of equal values): its share is $m / n_i$.
    Meant for non-negative dependency (KL, k2, k3); negative values (k1) are summed as they are.
    Rows without a valid token, and rows with a NaN at a valid token, give NaN.

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch]`` for a float ``k``, ``[batch, k]`` for a sequence of fractions

    Args:
        dependency: Token visual dependency (not differentiated through).
        response_mask: Valid response tokens (bool or 0/1).
        k: A fraction in $(0, 1]$ or a non-empty sequence of them.

    Returns:
        Shares, float32 (float64 for float64 dependency).

    Raises:
        ValueError: If a fraction is not in $(0, 1]$ or ``k`` is empty.

    Example:
        >>> import torch
        >>> from vppo_core.analysis import top_share
        >>> dep = torch.tensor([[6.0, 1.0, 2.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        >>> top_share(dep, mask, [0.2, 0.4, 1.0])
        tensor([[0.4000, 0.7333, 1.0000],
                [0.3333, 0.6667, 1.0000]])
    """
    ks, scalar = levels("k", k)
    for v in ks:
        check_fraction("k", v)
    dep, valid, n, nan_row = prepare(dependency, response_mask)
    batch, seq = dep.shape
    if seq == 0:
        return _squeeze(dep.new_full((batch, len(ks)), float("nan")), scalar)
    x = _sorted_valid(dep, valid, descending=True)
    positions = torch.arange(seq, device=dep.device)
    x = torch.where(positions < n.unsqueeze(-1), x, 0.0)  # zero the padding (sorted last as -inf)
    cumulative = torch.cumsum(x, dim=-1)
    total = cumulative[:, -1:]
    kept = torch.stack([num_kept_tokens(n, v) for v in ks], dim=-1)  # [batch, n_k]
    top = cumulative.gather(-1, (kept - 1).clamp_min(0))
    uniform = kept.to(dep.dtype) / n.clamp_min(1).unsqueeze(-1).to(dep.dtype)
    out = torch.where(total == 0, uniform, top / total)
    return _squeeze(_undefined(out, n, nan_row), scalar)


@typechecked
def fraction_above(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    thresholds: float | Sequence[float],
) -> Float[Tensor, " batch *threshold"]:
    r"""Fraction of each trajectory's valid tokens whose dependency is strictly above each threshold.

    $$
    f_i(c) = \frac{\lvert\{t \in o_i : S_t > c\}\rvert}{n_i} .
    $$

    Values are compared with the thresholds in float64, as given (``float32(0.1)``, which is
    0.100000001..., is above 0.1). Rows without a valid token, and rows with a NaN at a valid
    token, give NaN (a NaN compares false, so it would otherwise vanish silently). For the fraction
    pooled over every token of a batch, sum ``fraction_above(...) * n_i`` over rows, or use
    [`DependencyAccumulator`][vppo_core.analysis.DependencyAccumulator].

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch]`` for a float threshold, ``[batch, threshold]`` for a sequence

    Args:
        dependency: Token visual dependency.
        response_mask: Valid response tokens (bool or 0/1).
        thresholds: A finite threshold or a non-empty sequence of them.

    Returns:
        Fractions in $[0, 1]$, float32 (float64 for float64 dependency).

    Raises:
        ValueError: If a threshold is not finite or ``thresholds`` is empty.

    Example:
        >>> import torch
        >>> from vppo_core.analysis import fraction_above
        >>> dep = torch.tensor([[0.0, 0.2, 0.5, 3.0], [0.3, 0.0, 7.0, 7.0]])
        >>> mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
        >>> fraction_above(dep, mask, [0.1, 1.0])
        tensor([[0.7500, 0.2500],
                [0.5000, 0.0000]])
    """
    ts, scalar = levels("thresholds", thresholds)
    dep, valid, n, nan_row = prepare(dependency, response_mask)
    wide = dep.to(torch.float64)  # compare in float64: float32(0.1) is above the threshold 0.1
    counts = torch.stack([((wide > c) & valid).sum(-1) for c in ts], dim=-1)
    out = counts.to(dep.dtype) / n.clamp_min(1).unsqueeze(-1).to(dep.dtype)
    return _squeeze(_undefined(out, n, nan_row), scalar)


@typechecked
def gini(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
) -> Float[Tensor, " batch"]:
    r"""Gini coefficient of each trajectory's token dependency: how concentrated it is on few tokens.

    With $x_{(1)} \le \dots \le x_{(n)}$ the sorted valid dependencies of a trajectory,

    $$
    G = \frac{\sum_{i=1}^{n}\sum_{j=1}^{n} \lvert x_i - x_j \rvert}{2 n^2 \bar x}
      = \frac{\sum_{i=1}^{n} (2i - n - 1)\, x_{(i)}}{n \sum_{i=1}^{n} x_{(i)}} .
    $$

    0 when every token depends equally on the image, $(n-1)/n$ when one token carries everything;
    so $G \in [0, 1)$ for non-negative dependency. A trajectory whose dependency sums to 0 gets 0
    (all equal). Computed in float64 (the weighted sum cancels), returned in the result dtype. Rows
    without a valid token, and rows with a NaN at a valid token, give NaN.

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch]``

    Args:
        dependency: Token visual dependency, non-negative (not differentiated through).
        response_mask: Valid response tokens (bool or 0/1).

    Returns:
        Gini coefficients, float32 (float64 for float64 dependency).

    Example:
        >>> import torch
        >>> from vppo_core.analysis import gini
        >>> dep = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 8.0], [0.0, 2.0, 5.0, 5.0]])
        >>> gini(dep, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]))
        tensor([0.0000, 0.7500, 0.5000])
    """
    dep, valid, n, nan_row = prepare(dependency, response_mask)
    out_dtype = dep.dtype
    batch, seq = dep.shape
    if seq == 0:
        return dep.new_full((batch,), float("nan"))
    x = _sorted_valid(dep.to(torch.float64), valid, descending=False)
    positions = torch.arange(seq, device=dep.device, dtype=torch.float64)
    n64 = n.to(torch.float64).unsqueeze(-1)
    x = torch.where(positions < n64, x, 0.0)  # zero the padding (sorted last as +inf)
    weights = 2.0 * positions + 1.0 - n64  # 2i - n - 1 with i = position + 1
    total = x.sum(-1)
    g = (weights * x).sum(-1) / (n64.squeeze(-1) * total)
    g = torch.where(total == 0, 0.0, g)
    return _undefined(g, n, nan_row).to(out_dtype)
