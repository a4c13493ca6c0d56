r"""Factor maps: response reductions, scoped normalisers (min-max, median/MAD + tanh), centred clamps, schedules.

The response-level half of the family's pipeline: a token signal is reduced to one number per
response ([`reduce_response`][vppo_core.factors.reduce_response]), normalised over a scope (the batch,
or each prompt group), and mapped to a multiplicative advantage factor around 1. The scoped
normalisers are **batch-wide statistics**: call them once per rollout batch on the whole batch (with
``process_group`` for the global batch over ranks, where groups may straddle ranks), then slice the
factors per micro-batch. Inputs are detached: factors carry no gradient.

The piecewise-threshold weights with mass normalisation (PGPO) are
[`pgpo_weights`][vppo_core.pgpo_weights]; VPPO's min-max factors are
[`advantage_factors`][vppo_core.advantage_factors].
"""

from typing import Literal

import torch
import torch.distributed as dist
from jaxtyping import Float, Integer, Shaped
from torch import Tensor

from ._checks import (
    as_bool_mask,
    check_choice,
    check_positive,
    check_same_device,
    result_dtype,
    typechecked,
    valid_rows,
)
from ._robust import MedianMAD, median_mad, median_mad_factors
from ._segments import broadcast, dense_ids, segment_amax, segment_amin, segment_sum
from .distributed import ProcessGroupLike, all_gather_rows, all_reduce_min_max, resolve_group
from .transforms import MINMAX_EPS, response_mean

__all__ = [
    "MedianMAD",
    "anneal_weights",
    "centred_clamp",
    "group_centred_clamp",
    "median_mad",
    "median_mad_factors",
    "minmax_normalise",
    "reduce_response",
]


def _check_bounds(low: float | None, high: float | None) -> None:
    if low is not None and high is not None and not low <= high:
        raise ValueError(f"low must be <= high, got low={low!r} and high={high!r}")


def _clamp(x: Tensor, low: float | None, high: float | None) -> Tensor:
    return x if low is None and high is None else x.clamp(low, high)


@typechecked
def reduce_response(
    x: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    reduce: Literal["mean", "sum", "max"] = "mean",
) -> Float[Tensor, " batch"]:
    r"""One number per response from a token signal: the mean, sum or maximum over its valid tokens.

    CGPO (ACM MM 2026) scales advantages by the mean $\bar S_i$; VGPO (arXiv:2604.09349) compares
    responses by the sum $\phi_i = \sum_t \hat w_t$. An empty response gives 0. Padding is never read.
    Differentiable.

    Shapes:
        - ``x``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch]``

    Args:
        x: Token signal.
        response_mask: Valid response tokens.
        reduce: ``"mean"``, ``"sum"`` or ``"max"``.

    Returns:
        float32 (float64 for float64 input).

    Example:
        >>> import torch
        >>> x, m = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [0, 0, 0]])
        >>> reduce_response(x, m), reduce_response(x, m, reduce="sum"), reduce_response(x, m, reduce="max")
        (tensor([2., 0.]), tensor([4., 0.]), tensor([3., 0.]))
    """
    check_choice("reduce", reduce, ("mean", "sum", "max"))
    check_same_device(x=x, response_mask=response_mask)
    valid = as_bool_mask(response_mask)
    x = torch.where(valid, x.to(result_dtype(x)), 0.0)
    if reduce == "mean":
        return response_mean(x, valid).squeeze(-1)
    if reduce == "sum":
        return x.sum(-1)
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[0])
    top = torch.where(valid, x, float("-inf")).amax(-1)
    return torch.where(valid.any(-1), top, 0.0)


@typechecked
def minmax_normalise(
    values: Float[Tensor, " batch"],
    valid: Shaped[Tensor, " batch"] | None = None,
    *,
    group_ids: Integer[Tensor, " batch"] | None = None,
    eps: float = MINMAX_EPS,
    process_group: ProcessGroupLike = None,
) -> Float[Tensor, " batch"]:
    r"""Min-max normalise one value per response over the batch, or within each prompt group.

    $$\hat s_i = \frac{s_i - \min_{u(i)} s}{\max_{u(i)} s - \min_{u(i)} s + \epsilon},$$

    $u(i)$ the valid responses of the batch (``group_ids=None``) or of $i$'s group. VGPO
    (arXiv:2604.09349) min-maxes its response scores $\phi_i$ within each prompt group. A unit whose
    values are all equal maps to 0; invalid responses get 0 and are never read. Detached.

    Shapes:
        - ``values``, ``valid``, ``group_ids``: ``[batch]``
        - returns: ``[batch]``

    Args:
        values: One value per response.
        valid: Responses that count (e.g. ``response_mask.any(-1)``); ``None``: all.
        group_ids: Normalise within each group of equal ids instead of over the batch.
        eps: Added to the range, $> 0$.
        process_group: Statistics over the global batch of this process group (``"world"``: the
            default group). Without ``group_ids`` the min and max are all-reduced; with them every
            rank's rows are gathered, so groups split across ranks are handled (group ids must be
            globally consistent). ``None``: this process's batch only.

    Returns:
        float32 (float64 for float64 input), in $[0, 1]$ (the maximum is exactly 1 in float32 once
        the range exceeds about 0.3).

    Raises:
        ValueError: If ``eps <= 0``, or ``process_group`` is given without ``torch.distributed``.

    Example:
        >>> import torch
        >>> minmax_normalise(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_ids=torch.tensor([0, 0, 1, 1]))
        tensor([0., 1., 0., 0.])
    """
    check_positive("eps", eps)
    check_same_device(values=values, group_ids=group_ids)
    ok = valid_rows(values, valid)
    group = resolve_group(process_group)
    v = values.detach().to(result_dtype(values))
    if group is not None and group_ids is not None:
        rows, offset = all_gather_rows(torch.stack([v, ok.to(v.dtype)], -1), group)
        ids, _ = all_gather_rows(group_ids.long(), group)
        out = _minmax(rows[:, 0], rows[:, 1] > 0, dense_ids(ids), eps, None)
        return out[offset : offset + v.shape[0]]
    seg = dense_ids(group_ids) if group_ids is not None else None
    return _minmax(v, ok, seg, eps, group)


def _minmax(v: Tensor, ok: Tensor, seg: Tensor | None, eps: float, group: "dist.ProcessGroup | None") -> Tensor:
    n = v.shape[0]
    lo = segment_amin(torch.where(ok, v, float("inf")), seg)
    hi = segment_amax(torch.where(ok, v, float("-inf")), seg)
    lo, hi = all_reduce_min_max(lo, hi, group)  # NaN on any rank stays NaN, as in one process
    lo_b, hi_b = broadcast(lo, seg, n), broadcast(hi, seg, n)
    return torch.where(ok, (v - lo_b) / (hi_b - lo_b + eps), 0.0)


@typechecked
def centred_clamp(
    x: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    low: float | None = None,
    high: float | None = None,
) -> Float[Tensor, "batch seq"]:
    r"""Token factors centred on 1 within each response: $\operatorname{clamp}(1 + x_t - \bar x_i, \ell, h)$.

    VGPO's intra-response factor (arXiv:2604.09349): $\operatorname{clamp}(1 + \hat w_t -
    \operatorname{mean}_{resp}\hat w, 0.1, 2)$ in its official code; the paper has no clamp
    (``low=high=None``). Without clamping the factors average to exactly 1 over each response.
    Padding is 0. Differentiable.

    Shapes:
        - ``x``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        x: Token signal (e.g. normalised to $[0, 1]$).
        response_mask: Valid response tokens.
        low: Lower clamp, or ``None``.
        high: Upper clamp, or ``None``.

    Returns:
        float32 (float64 for float64 input).

    Raises:
        ValueError: If ``low > high``.

    Example:
        >>> import torch
        >>> centred_clamp(torch.tensor([[0.0, 0.5, 1.0]]), torch.ones(1, 3), low=0.8, high=2.0)
        tensor([[0.8000, 1.0000, 1.5000]])
    """
    _check_bounds(low, high)
    check_same_device(x=x, response_mask=response_mask)
    valid = as_bool_mask(response_mask)
    x = torch.where(valid, x.to(result_dtype(x)), 0.0)
    return torch.where(valid, _clamp(1.0 + x - response_mean(x, valid), low, high), 0.0)


@typechecked
def group_centred_clamp(
    values: Float[Tensor, " batch"],
    group_ids: Integer[Tensor, " batch"],
    valid: Shaped[Tensor, " batch"] | None = None,
    *,
    low: float | None = None,
    high: float | None = None,
    process_group: ProcessGroupLike = None,
) -> Float[Tensor, " batch"]:
    r"""Response factors centred on 1 within each group: $\operatorname{clamp}(1 + s_i - \bar s_{g(i)}, \ell, h)$.

    VGPO's inter-response factor (arXiv:2604.09349): $\operatorname{clamp}(1 + \hat s_i -
    \operatorname{mean}_{group}\hat s, 0.9, 2)$ in its official code (no clamp in the paper). The mean
    is over the group's valid responses; invalid responses get 1. A batch-wide statistic: with
    ``process_group`` every rank's rows are gathered, so groups split across ranks are handled.
    Detached.

    Shapes:
        - ``values``, ``group_ids``, ``valid``: ``[batch]``
        - returns: ``[batch]``

    Args:
        values: One value per response.
        group_ids: Prompt group of each response.
        valid: Responses that count; ``None``: all.
        low: Lower clamp, or ``None``.
        high: Upper clamp, or ``None``.
        process_group: Group means over the global batch (``"world"``: the default group).

    Returns:
        float32 (float64 for float64 input).

    Raises:
        ValueError: If ``low > high``.

    Example:
        >>> import torch
        >>> group_centred_clamp(torch.tensor([0.0, 1.0, 0.2, 0.2]), torch.tensor([0, 0, 1, 1]), low=0.9, high=2.0)
        tensor([0.9000, 1.5000, 1.0000, 1.0000])
    """
    _check_bounds(low, high)
    check_same_device(values=values, group_ids=group_ids)
    ok = valid_rows(values, valid)
    v = values.detach().to(result_dtype(values))
    ids, offset = group_ids.long(), 0
    group = resolve_group(process_group)
    if group is not None:
        rows, offset = all_gather_rows(torch.stack([v, ok.to(v.dtype)], -1), group)
        ids, _ = all_gather_rows(ids, group)
        v, ok = rows[:, 0], rows[:, 1] > 0
    seg = dense_ids(ids)
    v0 = torch.where(ok, v, 0.0)
    mean = segment_sum(v0, seg) / segment_sum(ok.to(v.dtype), seg).clamp_min(1)
    out = torch.where(ok, _clamp(1.0 + v0 - mean[seg], low, high), 1.0)
    return out[offset : offset + values.shape[0]]


@typechecked
def anneal_weights(
    weights: Float[Tensor, "*shape"],
    progress: float | Float[Tensor, ""],
    response_mask: Shaped[Tensor, "*shape"] | None = None,
) -> Float[Tensor, "*shape"]:
    r"""Blend weights with 1 on a schedule: $1 + p\,(w - 1) = (1 - p) + p\,w$.

    PEPO (arXiv:2603.22847) shapes its advantages as $\hat A_t = A_i((1 - \lambda) + \lambda w_t)$ with
    $\lambda = \text{step}/\text{max\_steps}$ rising from 0 to 1, so training starts as plain GRPO.
    ``p = 0`` gives all ones, ``p = 1`` the weights. Differentiable in ``weights``.

    Shapes:
        - ``weights``, ``response_mask``: any shape, equal
        - returns: the shape of ``weights``

    Args:
        weights: Token (or response) weights.
        progress: $p \in [0, 1]$, a number or a 0-d tensor (no host sync).
        response_mask: Positions that count (others are 0); ``None`` keeps all.

    Returns:
        float32 (float64 for float64 input).

    Raises:
        ValueError: If a number ``progress`` is outside $[0, 1]$.

    Example:
        >>> import torch
        >>> anneal_weights(torch.tensor([0.0, 1.0, 3.0]), 0.25)
        tensor([0.7500, 1.0000, 1.5000])
    """
    if isinstance(progress, (int, float)) and not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (e.g. step / max_steps), got {progress!r}")
    w = weights.to(result_dtype(weights))
    out = 1.0 + progress * (w - 1.0)
    if response_mask is None:
        return out
    check_same_device(weights=weights, response_mask=response_mask)
    return torch.where(as_bool_mask(response_mask), out, 0.0)
