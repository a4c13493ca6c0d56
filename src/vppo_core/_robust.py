r"""Robust batch statistics: the median and the median absolute deviation, and CGPO's tanh factors.

Public through `vppo_core.factors` (see [`median_mad`][vppo_core.factors.median_mad] and
[`median_mad_factors`][vppo_core.factors.median_mad_factors]).
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ._checks import check_positive, result_dtype, typechecked, valid_rows
from .distributed import ProcessGroupLike, all_gather_rows, resolve_group

__all__ = ["MedianMAD", "median_mad", "median_mad_factors"]


class MedianMAD(NamedTuple):
    """The median and the median absolute deviation of a batch of values (0-d tensors)."""

    median: Tensor
    """$\\operatorname{median}_B s$ (mean of the two middle values for an even count)."""
    mad: Tensor
    """$\\operatorname{median}_B |s - \\operatorname{median}_B s|$."""


def _median(sorted_values: Tensor, n: Tensor) -> Tensor:
    """Median of the first ``n`` entries of an ascending tensor (mean of the two middles); 0 if ``n = 0``."""
    if sorted_values.numel() == 0:
        return sorted_values.new_zeros(())
    last = (n - 1).clamp_min(0)
    lo, hi = sorted_values.gather(0, (last // 2).reshape(1)), sorted_values.gather(0, ((last + 1) // 2).reshape(1))
    return torch.where(n > 0, (lo + hi).squeeze(0) / 2, 0.0)


@typechecked
def median_mad(
    values: Float[Tensor, " batch"],
    valid: Shaped[Tensor, " batch"] | None = None,
    *,
    process_group: ProcessGroupLike = None,
) -> MedianMAD:
    r"""Median and median absolute deviation of the valid values of the (global) batch.

    $\operatorname{median}_B s$ and $\operatorname{MAD}_B s = \operatorname{median}_B |s - \operatorname{median}_B s|$,
    each the textbook median (the mean of the two middle values for an even count). The robust scale
    of CGPO's response factors (ACM MM 2026). With no valid value both are 0. A NaN among the valid
    values (of any rank) makes both statistics NaN, so it reaches every factor built on them instead
    of being sorted out of sight; invalid entries are never read, NaN or not. Detached.

    Shapes:
        - ``values``, ``valid``: ``[batch]``
        - returns: two 0-d tensors

    Args:
        values: One value per response.
        valid: Responses that count; ``None``: all.
        process_group: Gather the valid values of every rank of this group (``"world"``: default
            group); ``None``: this process's batch only.

    Returns:
        [`MedianMAD`][vppo_core.factors.MedianMAD], float32 (float64 for float64 input).

    Example:
        >>> import torch
        >>> median_mad(torch.tensor([1.0, 2.0, 4.0, 10.0]))
        MedianMAD(median=tensor(3.), mad=tensor(1.5000))
        >>> median_mad(torch.tensor([1.0, 2.0, float("nan")]), torch.tensor([1, 1, 0]))  # padding is not read
        MedianMAD(median=tensor(1.5000), mad=tensor(0.5000))
        >>> median_mad(torch.tensor([1.0, 2.0, float("nan")])).median  # a valid NaN is not hidden
        tensor(nan)
    """
    ok = valid_rows(values, valid)
    v = values.detach().to(result_dtype(values))
    group = resolve_group(process_group)
    if group is not None:
        rows, _ = all_gather_rows(torch.stack([v, ok.to(v.dtype)], -1), group)
        v, ok = rows[:, 0], rows[:, 1] > 0
    n = ok.sum()
    v = torch.where(ok, v, 0.0)  # padding is never read, even if it holds NaN
    has_nan = v.isnan().any()
    med = _median(torch.sort(torch.where(ok, v, float("inf"))).values, n)
    mad = _median(torch.sort(torch.where(ok, (v - med).abs(), float("inf"))).values, n)
    return MedianMAD(torch.where(has_nan, float("nan"), med), torch.where(has_nan, float("nan"), mad))


@typechecked
def median_mad_factors(
    values: Float[Tensor, " batch"],
    valid: Shaped[Tensor, " batch"] | None = None,
    *,
    lam: float = 0.1,
    eps: float = 1e-8,
    process_group: ProcessGroupLike = None,
) -> Float[Tensor, " batch"]:
    r"""Robust response factors around 1 from the batch median and MAD, squashed by tanh.

    $$
    \alpha_i = 1 + \lambda\tanh\Big(\frac{s_i - \operatorname{median}_B s}{\operatorname{MAD}_B s + \epsilon}\Big).
    $$

    CGPO (ACM MM 2026, DOI 10.1145/3767308.3835969) scales the advantages of its perception tokens
    by $\alpha_i$ computed from each response's mean counterfactual $k_3$, $s_i = \bar S_i$, over the
    rollout batch, $\lambda = 0.1$: factors lie in $[1 - \lambda, 1 + \lambda]$, so the advantage's sign
    is kept. The statistics come from [`median_mad`][vppo_core.factors.median_mad] over the valid
    responses of the (global) batch; invalid responses get 1. Detached.

    Shapes:
        - ``values``, ``valid``: ``[batch]``
        - returns: ``[batch]``

    Args:
        values: One value per response (e.g. [`reduce_response`][vppo_core.factors.reduce_response]).
        valid: Responses that count; ``None``: all.
        lam: $\lambda \in [0, 1)$.
        eps: Added to the MAD, $> 0$.
        process_group: Statistics over the global batch (see [`median_mad`][vppo_core.factors.median_mad]).

    Returns:
        float32 (float64 for float64 input).

    Raises:
        ValueError: If ``lam`` is outside $[0, 1)$ or ``eps <= 0``.

    Example:
        >>> import torch
        >>> median_mad_factors(torch.tensor([1.0, 2.0, 4.0, 10.0]))
        tensor([0.9130, 0.9417, 1.0583, 1.1000])
    """
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lam must be in [0, 1) so that every factor stays positive, got {lam!r}")
    check_positive("eps", eps)
    ok = valid_rows(values, valid)
    stats = median_mad(values, ok, process_group=process_group)
    v = values.detach().to(stats.median.dtype)
    return torch.where(ok, 1.0 + lam * torch.tanh((v - stats.median) / (stats.mad + eps)), 1.0)
