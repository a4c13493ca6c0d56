"""Across the trajectories of one prompt: how much their mean visual dependency differs.

The paper's second finding (VPPO, arXiv:2510.09285, Sec. 3), which TAS exploits; the per-trajectory
sparsity statistics are in `._stats`, whose conventions (detached inputs, padding never read, no
host sync) hold here too.
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Integer, Shaped
from torch import Tensor

from .._checks import check_number, check_same_device, typechecked
from .._segments import dense_ids, segment_amax, segment_amin, segment_sum
from ._stats import prepare

__all__ = ["GroupSpread", "group_spread"]


class GroupSpread(NamedTuple):
    """Within-group spread of trajectory dependency: the result of [`group_spread`][vppo_core.analysis.group_spread].

    Slot ``g`` holds the ``g``-th smallest distinct group id; slots past the number of groups are
    unused and have ``size == 0``.
    """

    group_ids: Tensor
    """``[group]``: the group id of each slot (0 in unused slots)."""
    size: Tensor
    """``[group]`` int64: trajectories with at least one valid token in the slot's group."""
    mean: Tensor
    """``[group]``: mean of the group's trajectory dependencies (NaN if ``size == 0``)."""
    std: Tensor
    """``[group]``: their unbiased standard deviation (NaN if ``size < 2``)."""
    ratio: Tensor
    """``[group]``: ``(max + eps) / (min + eps)`` of them (NaN if ``size < 2``)."""


@typechecked
def group_spread(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    group_ids: Integer[Tensor, " batch"] | None = None,
    *,
    eps: float = 1e-6,
) -> GroupSpread:
    r"""How much the trajectories of one prompt (a GRPO group) differ in their mean dependency.

    The paper's second finding (VPPO, arXiv:2510.09285, Sec. 3): trajectories differ a lot in their
    mean dependency $\bar S_i$ (from [`trajectory_dependency`][vppo_core.trajectory_dependency]),
    which is what TAS exploits. Over the valid trajectories of group $g$ (those with at least one
    valid token),

    $$
    \operatorname{ratio}_g = \frac{\max_{i \in g} \bar S_i + \epsilon}{\min_{i \in g} \bar S_i + \epsilon},
    \qquad
    \operatorname{std}_g = \sqrt{\tfrac{1}{|g| - 1} \textstyle\sum_{i \in g} (\bar S_i - \operatorname{mean}_g)^2} .
    $$

    ``eps`` keeps the ratio finite when a trajectory's mean dependency is 0 (and makes it exactly 1
    for a group of equal means); it is meant for non-negative dependency. Groups with fewer than two
    valid trajectories have no spread: NaN ``std`` and ``ratio``. Vectorised over groups with
    segment reductions (no ``torch.unique``, no host sync): results come in ``batch`` slots, an
    upper bound on the number of groups. A NaN at a valid token makes its group's statistics NaN.

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - ``group_ids``: ``[batch]``
        - returns: fields of ``[group]`` with ``group = batch``, or ``group = 1`` without ``group_ids``

    Args:
        dependency: Token visual dependency (not differentiated through).
        response_mask: Valid response tokens (bool or 0/1).
        group_ids: Any integers; trajectories with equal ids form a group (need not be contiguous).
            ``None``: the whole batch is one group.
        eps: Added to the maximum and the minimum, $\ge 0$.

    Returns:
        A [`GroupSpread`][vppo_core.analysis.GroupSpread]; float fields are float32 (float64 for
        float64 dependency).

    Raises:
        ValueError: If ``eps`` is negative or not finite.

    Example:
        >>> import torch
        >>> from vppo_core.analysis import group_spread
        >>> dep = torch.tensor([[0.1, 0.3], [0.8, 0.8], [0.5, 0.5], [0.5, 0.9]])
        >>> spread = group_spread(dep, torch.ones(4, 2), torch.tensor([7, 7, 3, 3]))
        >>> spread.group_ids, spread.size
        (tensor([3, 7, 0, 0]), tensor([2, 2, 0, 0]))
        >>> spread.ratio
        tensor([1.4000, 4.0000,    nan,    nan])
    """
    check_number("eps", eps, low=0.0)
    check_same_device(dependency=dependency, response_mask=response_mask, group_ids=group_ids)
    dep, valid, n, _ = prepare(dependency, response_mask)
    # The mean over valid tokens, padding never read (NaN at a valid token gives NaN).
    score = torch.where(valid, dep, 0.0).sum(-1) / n.clamp_min(1).to(dep.dtype)
    row_ok = n > 0
    if group_ids is None:
        seg, slot_ids = None, torch.zeros(1, dtype=torch.long, device=dep.device)
    else:
        seg = dense_ids(group_ids)
        slot_ids = torch.zeros_like(seg).scatter(0, seg, group_ids.long())
    size = segment_sum(row_ok.long(), seg)
    size_f = size.to(dep.dtype)
    mean = segment_sum(torch.where(row_ok, score, 0.0), seg) / size_f
    centred = score - (mean if seg is None else mean[seg])
    var = segment_sum(torch.where(row_ok, centred.square(), 0.0), seg) / (size_f - 1)
    lo = segment_amin(torch.where(row_ok, score, float("inf")), seg)
    hi = segment_amax(torch.where(row_ok, score, float("-inf")), seg)
    spread = size >= 2
    nan = float("nan")
    return GroupSpread(
        group_ids=slot_ids,
        size=size,
        mean=torch.where(size > 0, mean, nan),
        std=torch.where(spread, var.sqrt(), nan),
        ratio=torch.where(spread, (hi + eps) / (lo + eps), nan),
    )
