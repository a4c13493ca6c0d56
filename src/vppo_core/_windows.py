r"""Windows, tag spans and priority weights (re-exported by `vppo_core.selection`).

`tail_window_mask` keeps the last fraction of each response, `span_mask` the tokens between tag ids,
and `priority_weights` turns a list of masks into per-token weights (the first mask holding a token
gives its weight). Masks carry
no gradient; padding is never kept.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Integer, Shaped
from torch import Tensor

from ._checks import as_bool_mask, check_fraction, check_number, check_same_device, typechecked

__all__ = ["priority_weights", "span_mask", "tail_window_mask"]

# ceil(q * n) / floor(q * n) are computed in float64 with this guard, so decimal fractions behave as
# written (0.7 * 10 keeps 7, and 0.3 * 10 = 2.9999999999999996 floors to 3); `selection` uses it too.
_GUARD = 1e-9


@typechecked
def tail_window_mask(
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    fraction: float = 0.5,
) -> Bool[Tensor, "batch seq"]:
    r"""The last ``fraction`` of each response: valid tokens with index $j \ge \lfloor (1 - \gamma) L_i\rfloor$.

    $j = 0, \dots, L_i - 1$ counts response $i$'s valid tokens in order (left or right padding alike).
    VGPO (arXiv:2604.09349) restricts its gated compensation to this window, $\gamma = 0.5$.
    ``fraction=1`` keeps every valid token; a non-empty response always keeps at least its last token.

    Shapes:
        - ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]`` bool

    Args:
        response_mask: Valid response tokens.
        fraction: $\gamma \in (0, 1]$.

    Returns:
        Bool mask, a subset of ``response_mask``.

    Raises:
        ValueError: If ``fraction`` is not in $(0, 1]$.

    Example:
        >>> import torch
        >>> tail_window_mask(torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]), fraction=0.5)
        tensor([[False, False,  True,  True,  True, False],
                [False, False, False,  True,  True,  True]])
    """
    check_fraction("fraction", fraction)
    valid = as_bool_mask(response_mask)
    index = valid.long().cumsum(-1) - 1
    length = valid.sum(-1, keepdim=True).to(torch.float64)
    start = torch.floor(length * (1.0 - fraction) + _GUARD)
    return valid & (index >= start)


@typechecked
def span_mask(
    input_ids: Integer[Tensor, "batch seq"],
    open_ids: int | Sequence[int],
    close_ids: int | Sequence[int],
    response_mask: Shaped[Tensor, "batch seq"] | None = None,
    *,
    include_tags: bool = True,
) -> Bool[Tensor, "batch seq"]:
    r"""Tokens inside tag spans, e.g. ``<region> ... </region>``: from each opening tag to its closing one.

    The tags are read as brackets with a stack: an opening tag pushes, a closing tag pops, and a
    closing tag met with an empty stack (a stray one) is ignored. With $e_s = +1$ at an opening tag,
    $-1$ at a closing tag and 0 elsewhere, $c_t = \sum_{s \le t} e_s$, the open depth after $t$ is
    $d_t = c_t - \min(0, \min_{s \le t} c_s)$, and token $t$ is inside when it is an opening tag or
    $d_{t-1} > 0$ ($d_{-1} = 0$; so a closing tag that ends a span is inside, a stray one is not).
    For well-formed spans that is exactly the tokens from each opening tag to its matching closing
    tag (a nested span ends with its outer one); an unclosed span runs to the end of the row. The
    whole row is read (tags in the prompt part count too); ``response_mask`` only restricts the
    result. CGPO uses the region-tag tokens of a response as perception tokens. Pass single-token tag
    ids (add the tags to the tokenizer as special tokens if they would otherwise split).

    Shapes:
        - ``input_ids``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]`` bool

    Args:
        input_ids: Token ids.
        open_ids: Id(s) of the opening tag.
        close_ids: Id(s) of the closing tag.
        response_mask: Restrict the result to these positions; ``None`` keeps all.
        include_tags: Whether the tag tokens themselves are in the span.

    Returns:
        Bool mask of the spans.

    Raises:
        ValueError: If an id is both an opening and a closing tag.

    Example:
        >>> import torch
        >>> ids = torch.tensor([[5, 1, 7, 8, 2, 9, 1, 4]])  # 1 opens, 2 closes
        >>> span_mask(ids, 1, 2).int()
        tensor([[0, 1, 1, 1, 1, 0, 1, 1]], dtype=torch.int32)
        >>> span_mask(ids, 1, 2, include_tags=False).int()
        tensor([[0, 0, 1, 1, 0, 0, 0, 1]], dtype=torch.int32)
        >>> span_mask(torch.tensor([[2, 1, 7, 2, 9]]), 1, 2).int()  # the stray closing tag is ignored
        tensor([[0, 1, 1, 1, 0]], dtype=torch.int32)
    """
    open_list = [open_ids] if isinstance(open_ids, int) else list(open_ids)
    close_list = [close_ids] if isinstance(close_ids, int) else list(close_ids)
    both = set(open_list) & set(close_list)
    if both:
        raise ValueError(f"open_ids and close_ids must be disjoint, got {sorted(both)} in both")
    if response_mask is not None:
        check_same_device(input_ids=input_ids, response_mask=response_mask)
    if input_ids.shape[-1] == 0:
        return torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    opens = torch.isin(input_ids, torch.tensor(open_list, dtype=input_ids.dtype, device=input_ids.device))
    closes = torch.isin(input_ids, torch.tensor(close_list, dtype=input_ids.dtype, device=input_ids.device))
    count = opens.long().cumsum(-1) - closes.long().cumsum(-1)  # c_t
    depth = count - torch.cummin(count, dim=-1).values.clamp_max(0)  # d_t: a stray close never goes below 0
    depth_before = torch.nn.functional.pad(depth[..., :-1], (1, 0))  # d_{t-1}, with d_{-1} = 0
    inside = opens | (depth_before > 0)
    if not include_tags:
        inside = inside & ~opens & ~closes
    if response_mask is not None:
        inside = inside & as_bool_mask(response_mask)
    return inside


@typechecked
def priority_weights(
    masks: Sequence[Shaped[Tensor, "batch seq"]],
    weights: Sequence[float],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    default: float = 0.0,
) -> Float[Tensor, "batch seq"]:
    r"""Token weights from prioritised masks: each valid token gets the weight of the first mask holding it.

    $$
    w_t = \begin{cases} \gamma_1 & t \in M_1 \\ \gamma_2 & t \in M_2 \setminus M_1 \\ \ \vdots \\
    \gamma_{default} & \text{otherwise} \end{cases}
    $$

    ToR (arXiv:2603.25077) weights the reasoning set with $\gamma_r = 1$ and the remaining
    perception set with $\gamma_p = 0.5$, everything else 0. Padding is 0. Pass the result as
    ``token_mask`` (float weights) to [`vppo_loss`][vppo_core.vppo_loss].

    Shapes:
        - each of ``masks``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]`` float32

    Args:
        masks: Bool (or 0/1) masks, highest priority first.
        weights: One finite weight per mask.
        response_mask: Valid tokens.
        default: Weight of valid tokens in no mask.

    Returns:
        Float32 weights.

    Raises:
        ValueError: If the counts differ or a weight is not finite.

    Example:
        >>> import torch
        >>> reasoning = torch.tensor([[1, 0, 0, 1]])
        >>> perception = torch.tensor([[1, 1, 0, 0]])
        >>> priority_weights([reasoning, perception], [1.0, 0.5], torch.tensor([[1, 1, 1, 0]]))
        tensor([[1.0000, 0.5000, 0.0000, 0.0000]])
    """
    if len(masks) != len(weights):
        raise ValueError(
            f"priority_weights needs one weight per mask, got {len(masks)} masks and {len(weights)} weights"
        )
    for i, w in enumerate([*weights, default]):
        check_number(f"weights[{i}]" if i < len(weights) else "default", w)
    valid = as_bool_mask(response_mask)
    out = torch.full(valid.shape, default, dtype=torch.float32, device=valid.device)
    for mask, w in zip(reversed(masks), reversed(weights)):  # lowest priority first, overwritten by higher ones
        check_same_device(mask=mask, response_mask=response_mask)
        out = torch.where(as_bool_mask(mask, "masks"), w, out)
    return torch.where(valid, out, 0.0)
