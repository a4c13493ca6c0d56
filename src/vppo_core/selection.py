r"""Token selection: top-$q$ masks with a scope and an exact count, windows, tag spans, and priority weights.

One vocabulary across the family:

- ``scope`` is where a top-$q$ fraction is counted: ``"response"`` (each row on its own, as VPPO's
  TGF and VEPO), ``"micro-batch"`` (all rows of the tensor you pass, or of each ``micro_batch_ids``
  segment, with no communication: CGPO's official code), or ``"batch"`` (all rows, and all ranks of
  ``process_group``: ToR over the rollout batch).
- ``exact=True`` keeps exactly $\lceil qN\rceil$ tokens (at least one when $N \ge 1$;
  ``rounding="floor"`` gives $\max(1, \lfloor qN\rfloor)$, VGPO's rule), ties broken by position
  (``tie_break="position"``: lower rank, then lower row, then lower position first) or at random
  with an explicit ``torch.Generator`` (``tie_break="random"``: one permutation of the valid tokens,
  whatever the padding; it reads their count on the host). ``exact=False`` is the threshold
  rule: every token at or above the count-th largest value is kept (ties all kept).
- NaN scores rank above every number and are kept first (so a NaN reaches the loss instead of being
  silently dropped, as in [`topk_token_mask`][vppo_core.topk_token_mask]); padding is never kept.

Scores are always detached: a mask carries no gradient. Batch statistics are computed here once for
the tensor you pass; call these in the per-rollout-batch stage on the whole batch (with
``process_group`` for the global batch) and slice the result per micro-batch, never silently per
micro-batch.
"""

from typing import Literal

import torch
from jaxtyping import Bool, Float, Integer, Shaped
from torch import Tensor

from ._checks import as_bool_mask, check_choice, check_fraction, check_same_device, result_dtype, typechecked
from ._segments import dense_ids, segment_sum
from ._windows import _GUARD, priority_weights, span_mask, tail_window_mask
from .distributed import ProcessGroupLike, all_gather_rows, resolve_group

__all__ = ["kept_count", "priority_weights", "span_mask", "tail_window_mask", "topq_mask", "topq_threshold"]

Scope = Literal["response", "micro-batch", "batch"]
SCOPES: tuple[str, ...] = ("response", "micro-batch", "batch")
Rounding = Literal["ceil", "floor"]


def kept_count(n_valid: Tensor, q: float, rounding: Rounding = "ceil") -> Tensor:
    r"""How many of ``n_valid`` tokens a top-$q$ selection keeps: $\lceil qn\rceil$ or $\lfloor qn\rfloor$, at least 1.

    Never more than $n$, and 0 only when $n = 0$. ``rounding="ceil"`` equals
    [`num_kept_tokens`][vppo_core.num_kept_tokens]; ``"floor"`` is VGPO's $\max(1, \lfloor\kappa n\rfloor)$.

    Raises:
        ValueError: If ``q`` is not in $(0, 1]$ or ``rounding`` is unknown.

    Example:
        >>> import torch
        >>> kept_count(torch.tensor([0, 1, 5, 10]), 0.3), kept_count(torch.tensor([0, 1, 5, 10]), 0.3, "floor")
        (tensor([0, 1, 2, 3]), tensor([0, 1, 1, 3]))
    """
    check_fraction("q", q)
    check_choice("rounding", rounding, ("ceil", "floor"))
    n = n_valid.to(torch.float64)
    raw = torch.ceil(n * q - _GUARD) if rounding == "ceil" else torch.floor(n * q + _GUARD)
    return torch.minimum(raw.clamp_min(1.0), n).to(torch.int64)


def _check(
    q: float,
    scope: str,
    rounding: str,
    tie_break: str,
    generator: object,
    process_group: object,
    micro_batch_ids: object = None,
) -> None:
    check_fraction("q", q)
    check_choice("scope", scope, SCOPES)
    check_choice("rounding", rounding, ("ceil", "floor"))
    check_choice("tie_break", tie_break, ("position", "random"))
    if tie_break == "random" and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"tie_break='random' needs an explicit torch.Generator (generator=...), got {type(generator).__name__}"
        )
    if process_group is not None and scope != "batch":
        raise ValueError(f"process_group pools over ranks and applies to scope='batch' only, got scope={scope!r}")
    if micro_batch_ids is not None and scope != "micro-batch":
        raise ValueError(f"micro_batch_ids applies to scope='micro-batch' only, got scope={scope!r}")


class _Pooled:
    """Flattened scores of the (global) selection, their segment ids, and this rank's slice."""

    def __init__(
        self,
        scores: Tensor,
        response_mask: Tensor,
        scope: str,
        micro_batch_ids: Tensor | None,
        process_group: ProcessGroupLike,
    ) -> None:
        check_same_device(scores=scores, response_mask=response_mask, micro_batch_ids=micro_batch_ids)
        batch, seq = scores.shape
        self.shape = scores.shape
        values = scores.detach().to(result_dtype(scores)).reshape(-1)
        valid = as_bool_mask(response_mask).reshape(-1)
        rows = torch.arange(batch, device=scores.device).repeat_interleave(seq)
        if scope == "response":
            seg = rows
        elif scope == "micro-batch" and micro_batch_ids is not None:
            seg = dense_ids(micro_batch_ids)[rows]
        else:
            seg = torch.zeros_like(rows)
        self.offset = 0
        group = resolve_group(process_group)
        if group is not None:
            gathered, offset = all_gather_rows(torch.stack([values, valid.to(values.dtype)], dim=-1), group)
            values, valid = gathered[:, 0], gathered[:, 1] != 0
            seg = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
            self.offset = offset
        self.values, self.valid, self.seg = values, valid, seg

    def local(self, flat: Tensor) -> Tensor:
        n = self.shape[0] * self.shape[1]
        return flat[self.offset : self.offset + n].reshape(self.shape)


def _sorted(pooled: _Pooled, tie_break: str, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Order of the flat entries by (segment, valid first, score descending, tie key); segment starts and counts.

    Successive stable sorts, least significant key first. The tie key is the flat position (lower
    rank, row, position first) or, for ``"random"``, ``randperm(N)[j]`` for the ``j``-th of the ``N``
    valid tokens in flat order: drawn over the valid tokens only, so that it does not depend on how
    far the rows are padded (each rank pads to its own length). Reading ``N`` is one host sync.
    """
    values, valid, seg = pooled.values, pooled.valid, pooled.seg
    n = values.shape[0]
    if tie_break == "random":
        assert generator is not None
        n_valid = int(valid.sum())
        perm = torch.randperm(n_valid, generator=generator, device=generator.device).to(values.device)
        key = torch.full((n,), n_valid, dtype=torch.long, device=values.device).masked_scatter(valid, perm)
        order = torch.argsort(key, stable=True)
    else:
        order = torch.arange(n, device=values.device)
    order = order[torch.argsort(values[order], descending=True, stable=True)]
    order = order[torch.argsort((~valid[order]).to(torch.uint8), stable=True)]
    order = order[torch.argsort(seg[order], stable=True)]
    size = segment_sum(torch.ones_like(seg), seg)
    start = torch.cumsum(size, 0) - size
    n_valid = segment_sum(valid.long(), seg)
    return order, start, n_valid


@typechecked
def topq_mask(
    scores: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    q: float,
    scope: Scope = "response",
    exact: bool = True,
    rounding: Rounding = "ceil",
    tie_break: Literal["position", "random"] = "position",
    generator: torch.Generator | None = None,
    micro_batch_ids: Integer[Tensor, " batch"] | None = None,
    process_group: ProcessGroupLike = None,
) -> Bool[Tensor, "batch seq"]:
    r"""Keep the top fraction $q$ of the valid tokens by score, counted per response, micro-batch or batch.

    Within each scope unit $u$ (a response, a micro-batch, or the global batch) with $N_u$ valid
    tokens, ``exact=True`` keeps exactly $n_u = \lceil q N_u\rceil$ tokens (``rounding="floor"``:
    $\max(1, \lfloor qN_u\rfloor)$; always $\ge 1$ when $N_u \ge 1$); ``exact=False`` keeps every
    valid token with $s_t \ge \tau_u$, $\tau_u$ the $n_u$-th largest valid score (ties all kept, so at
    least $n_u$ tokens). See the module notes for the scopes, tie-breaking and NaN.

    This one block serves VPPO's TGF and VEPO (``scope="response"``; equal to
    [`topk_token_mask`][vppo_core.topk_token_mask] with position ties), the high-entropy minority
    (``scope="batch"``; equal to [`high_entropy_mask`][vppo_core.high_entropy_mask]), ToR
    (arXiv:2603.25077: top 30% over the rollout batch, exactly $\lceil 0.3N\rceil$, seeded random
    tie-break), CGPO (top 30% per micro-batch, ``exact=False``) and VGPO's gated compensation
    (``rounding="floor"`` inside a window, with [`tail_window_mask`][vppo_core.selection.tail_window_mask]).

    Shapes:
        - ``scores``, ``response_mask``: ``[batch, seq]``
        - ``micro_batch_ids``: ``[batch]``
        - returns: ``[batch, seq]`` bool

    Args:
        scores: Per-token score, higher kept first; detached.
        response_mask: Valid tokens (bool or 0/1); only these can be kept.
        q: Fraction kept, in $(0, 1]$.
        scope: ``"response"``, ``"micro-batch"`` or ``"batch"``.
        exact: Exact count (``True``) or threshold rule (``False``).
        rounding: ``"ceil"`` or ``"floor"`` (both at least 1).
        tie_break: ``"position"`` or ``"random"`` (needs ``generator``; only matters with ``exact``).
        generator: Source of the random tie-break: one ``randperm`` of the valid tokens (in rank,
            row, position order), so padding does not change it. With ``process_group`` every rank
            must pass a generator in the same state (the permutation is drawn over the global batch).
        micro_batch_ids: With ``scope="micro-batch"``: rows with equal ids form one micro-batch
            (``None``: the whole tensor is one).
        process_group: With ``scope="batch"``: pool over every rank of this group (``"world"`` for
            the default group); each rank gets its own rows of the mask one process would compute on
            the concatenated batch. ``None``: no communication.

    Returns:
        Bool mask, a subset of ``response_mask``.

    Raises:
        ValueError: On ``q`` outside $(0, 1]$, ``tie_break="random"`` without a generator, or
            ``process_group`` with a scope other than ``"batch"``.
        TypeError: On an unknown ``scope``/``rounding``/``tie_break``, or a shape or dtype that
            does not match the annotation (jaxtyping).

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.0, 0.0, 0.0, 0.9], [0.0, 0.5, 0.0, 0.0]])
        >>> topq_mask(s, torch.ones(2, 4), q=0.25, scope="batch")  # exactly ceil(0.25 * 8) = 2
        tensor([[False, False, False,  True],
                [False,  True, False, False]])
        >>> topq_mask(s, torch.ones(2, 4), q=0.5, scope="batch", exact=False)  # the 4th largest is 0: ties kept
        tensor([[True, True, True, True],
                [True, True, True, True]])
        >>> g = torch.Generator().manual_seed(0)
        >>> int(topq_mask(s, torch.ones(2, 4), q=0.5, scope="batch", tie_break="random", generator=g).sum())
        4
    """
    _check(q, scope, rounding, tie_break, generator, process_group, micro_batch_ids)
    pooled = _Pooled(scores, response_mask, scope, micro_batch_ids, process_group)
    order, start, n_valid = _sorted(pooled, tie_break if exact else "position", generator)
    n_keep = kept_count(n_valid, q, rounding)
    seg_sorted = pooled.seg[order]
    rank = torch.arange(order.shape[0], device=order.device) - start[seg_sorted]
    if exact:
        keep_sorted = pooled.valid[order] & (rank < n_keep[seg_sorted])
        keep = torch.zeros_like(pooled.valid).scatter(0, order, keep_sorted)
    else:
        threshold = _thresholds(pooled, order, start, n_keep)[pooled.seg]
        keep = pooled.valid & ((pooled.values >= threshold) | pooled.values.isnan())
    return pooled.local(keep)


def _thresholds(pooled: _Pooled, order: Tensor, start: Tensor, n_keep: Tensor) -> Tensor:
    """The n_keep-th largest valid value of each segment (``+inf`` for a segment without valid tokens)."""
    if order.numel() == 0:
        return pooled.values.new_full(start.shape, float("inf"))
    pos = (start + n_keep - 1).clamp(0, order.shape[0] - 1)
    kth = pooled.values[order[pos]]
    return torch.where(n_keep > 0, kth, float("inf"))


@typechecked
def topq_threshold(
    scores: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    q: float,
    scope: Scope = "batch",
    rounding: Rounding = "ceil",
    micro_batch_ids: Integer[Tensor, " batch"] | None = None,
    process_group: ProcessGroupLike = None,
) -> Float[Tensor, " batch"]:
    r"""The threshold of the top-$q$ rule for each row: the $n_u$-th largest valid score of its scope unit.

    The statistic behind ``topq_mask(..., exact=False)``: compute it once on the whole rollout batch
    (over ranks with ``process_group``), slice it like the batch, and apply it to any micro-batch
    with ``response_mask & ((scores >= threshold[:, None]) | scores.isnan())``. A row whose unit has
    no valid token gets $+\infty$. NaN scores rank first, as in
    [`topq_mask`][vppo_core.selection.topq_mask], so the threshold itself can be NaN (when the
    $n_u$-th largest score is); the ``| scores.isnan()`` keeps them, as ``topq_mask`` does. Detached.

    Shapes:
        - ``scores``, ``response_mask``: ``[batch, seq]``
        - ``micro_batch_ids``: ``[batch]``
        - returns: ``[batch]``

    Args:
        scores: Per-token score.
        response_mask: Valid tokens.
        q: Fraction above the threshold, in $(0, 1]$.
        scope: ``"response"``, ``"micro-batch"`` or ``"batch"``.
        rounding: ``"ceil"`` or ``"floor"``.
        micro_batch_ids: Micro-batch of each row, with ``scope="micro-batch"``.
        process_group: Pool over ranks, with ``scope="batch"``.

    Returns:
        One threshold per row, float32 (float64 for float64 scores).

    Raises:
        ValueError: As [`topq_mask`][vppo_core.selection.topq_mask].

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.5, 2.0, 0.1], [1.0, 0.3, 0.2]])
        >>> topq_threshold(s, torch.ones(2, 3), q=0.3)  # ceil(0.3 * 6) = 2nd largest
        tensor([1., 1.])
    """
    _check(q, scope, rounding, "position", None, process_group, micro_batch_ids)
    pooled = _Pooled(scores, response_mask, scope, micro_batch_ids, process_group)
    order, start, n_valid = _sorted(pooled, "position", None)
    per_segment = _thresholds(pooled, order, start, kept_count(n_valid, q, rounding))
    if scores.shape[1]:
        return pooled.local(per_segment[pooled.seg])[:, 0]
    if scope == "batch" and per_segment.numel():  # no local column, but the other ranks' tokens set it
        return per_segment[0].expand(scores.shape[0]).clone()
    return pooled.values.new_full((scores.shape[0],), float("inf"))
