"""Segment (group) reductions over a batch, vectorised and without host syncs.

``group_ids`` may hold any integers. `dense_ids` maps them to ``0 .. n_groups - 1`` by a
stable sort (no ``torch.unique``, whose output size would need a device sync); buffers are sized by
the batch, an upper bound on the number of groups, so every shape is known without reading data.
"""

import torch
from torch import Tensor


def dense_ids(group_ids: Tensor) -> Tensor:
    """Map arbitrary integer ids ``[n]`` to dense ids in ``[0, n)``, equal ids to equal dense ids."""
    n = group_ids.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=group_ids.device)
    order = torch.argsort(group_ids, stable=True)
    sorted_ids = group_ids[order]
    is_new = torch.cat([sorted_ids.new_zeros(1, dtype=torch.bool), sorted_ids[1:] != sorted_ids[:-1]])
    dense_sorted = torch.cumsum(is_new, dim=0)
    return torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)


# ``seg=None`` means one segment holding the whole batch: plain reductions to shape ``[1]``. (Besides
# being cheaper, this sidesteps an Inductor CPU codegen failure on scatters with a constant index.)


def segment_sum(values: Tensor, seg: Tensor | None) -> Tensor:
    """Per-segment sums, ``[n]`` (``[1]`` for ``seg=None``)."""
    if seg is None:
        return values.sum(0, keepdim=True)
    return values.new_zeros(values.shape).index_add(0, seg, values)


def segment_amin(values: Tensor, seg: Tensor | None) -> Tensor:
    """Per-segment minimum (``+inf`` for empty segments); NaN propagates."""
    if seg is None:
        return values.amin(0, keepdim=True) if values.numel() else values.new_full((1,), float("inf"))
    out = values.new_full(values.shape, float("inf"))
    return out.scatter_reduce(0, seg, values, reduce="amin", include_self=True)


def segment_amax(values: Tensor, seg: Tensor | None) -> Tensor:
    """Per-segment maximum (``-inf`` for empty segments); NaN propagates."""
    if seg is None:
        return values.amax(0, keepdim=True) if values.numel() else values.new_full((1,), float("-inf"))
    out = values.new_full(values.shape, float("-inf"))
    return out.scatter_reduce(0, seg, values, reduce="amax", include_self=True)


def broadcast(stat: Tensor, seg: Tensor | None, n: int) -> Tensor:
    """Per-segment statistic back to one value per batch element."""
    return stat.expand(n) if seg is None else stat[seg]
