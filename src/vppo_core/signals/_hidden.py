"""Signals from hidden states and positions: visual similarity and relative position."""

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from .._checks import as_bool_mask, check_choice, check_positive, check_same_device, result_dtype, typechecked
from ._common import _masked


def _layers(hidden_states: Tensor | Sequence[Tensor], layers: str | Sequence[int]) -> list[Tensor]:
    states = [hidden_states] if isinstance(hidden_states, Tensor) else list(hidden_states)
    if not states:
        raise ValueError("hidden_states must hold at least one [batch, seq, hidden] tensor, got an empty sequence")
    if isinstance(layers, str):
        check_choice("layers", layers, ("all", "last"))
        return states if layers == "all" else states[-1:]
    picked = []
    for i in layers:
        if not -len(states) <= i < len(states):
            raise ValueError(f"layers holds index {i}, but hidden_states has {len(states)} layers")
        picked.append(states[i])
    if not picked:
        raise ValueError("layers must select at least one layer, got an empty sequence")
    return picked


@typechecked
def visual_similarity(
    hidden_states: Float[Tensor, "batch seq hidden"] | Sequence[Float[Tensor, "batch seq hidden"]],
    image_mask: Shaped[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"] | None = None,
    *,
    layers: Literal["all", "last"] | Sequence[int] = "all",
    mode: Literal["pairwise", "prototype"] = "pairwise",
    align: Literal["predicting", "token"] = "predicting",
    eps: float = 1e-8,
) -> Float[Tensor, "batch seq"]:
    r"""Cosine similarity of each position's hidden state to the image tokens' hidden states, averaged over layers.

    With $h^\ell_t$ the hidden state of layer $\ell$ at position $t$, $\mathcal V$ the image-token
    positions of the row and $\mathcal L$ the chosen layers,

    $$
    \texttt{pairwise:}\ VS_t = \frac{1}{|\mathcal L|}\sum_{\ell}\frac{1}{|\mathcal V|}\sum_{v \in \mathcal V}
    \cos(h^\ell_t, h^\ell_v),
    \qquad
    \texttt{prototype:}\ S_t = \frac{1}{|\mathcal L|}\sum_{\ell}
      \cos\Big(h^\ell_t, \frac{1}{|\mathcal V|}\sum_{v} h^\ell_v\Big).
    $$

    PEPO (arXiv:2603.22847) uses ``mode="pairwise", layers="all"`` (every returned layer, embeddings
    included) on the update forward; VGPO (arXiv:2604.09349) ``mode="prototype", layers="last"`` (the
    last returned state, after the final norm). The pairwise mean is computed as
    $\hat h_t\cdot\frac1{|\mathcal V|}\sum_v \hat h_v$ with unit vectors $\hat h$, so the cost is
    $O(\text{seq}\cdot\text{hidden})$ per layer, not quadratic. ``hidden_states`` is what a
    ``transformers`` model returns with ``output_hidden_states=True`` (a tuple of
    ``[batch, seq, hidden]``, embeddings first, the last after the final norm), or one tensor.

    Alignment: ``align="predicting"`` (default) gives position $t$ the similarity of the hidden state
    at $t-1$, the one whose logits predict ``input_ids[t]``, so the result lines up with log-probabilities,
    entropies and response masks in the convention of ``vppo_core.integrations.transformers`` (entry
    ``[b, t]`` about token ``input_ids[b, t]``; position 0 gets 0). ``align="token"`` uses the hidden
    state at $t$ itself. Which one PEPO's and VGPO's code read is not pinned down by their
    descriptions.

    Norms are clamped at ``eps``. A row without image tokens gets 0. Computed in float32 (float64 for
    float64), one layer at a time (``[batch, seq, hidden]``, never ``vocab``); differentiable (PEPO's
    official code lets the gradient flow through its weights; detach for the re-implementation).

    Shapes:
        - ``hidden_states``: ``[batch, seq, hidden]`` or a sequence of them (layers)
        - ``image_mask``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        hidden_states: Hidden states of one forward pass.
        image_mask: Image-token positions (``inputs["mm_token_type_ids"] == 1``, or
            ``input_ids == model.config.image_token_id``).
        response_mask: Positions that count (others are 0); ``None``: all.
        layers: ``"all"``, ``"last"``, or indices into ``hidden_states``.
        mode: ``"pairwise"`` (mean of cosines) or ``"prototype"`` (cosine to the mean).
        align: ``"predicting"`` or ``"token"`` (see above).
        eps: Smallest norm, $> 0$.

    Returns:
        Similarities in $[-1, 1]$, float32 (float64 for float64 input).

    Raises:
        ValueError: On an empty or out-of-range layer selection, or ``eps <= 0``.
        TypeError: On an unknown ``layers``/``mode``/``align`` option, or a shape or dtype that does
            not match the annotation (jaxtyping).

    Example:
        >>> import torch
        >>> h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
        >>> img = torch.tensor([[True, True, False, False]])
        >>> visual_similarity(h, img, align="token")  # pairwise mean of cosines to (1, 0) and (0, 1)
        tensor([[ 0.5000,  0.5000,  0.7071, -0.5000]])
        >>> visual_similarity(h, img, mode="prototype", align="token")  # cosine to the mean (0.5, 0.5)
        tensor([[ 0.7071,  0.7071,  1.0000, -0.7071]])
    """
    check_choice("mode", mode, ("pairwise", "prototype"))
    check_choice("align", align, ("predicting", "token"))
    check_positive("eps", eps)
    states = _layers(hidden_states, layers)
    check_same_device(hidden_states=states[0], image_mask=image_mask, response_mask=response_mask)
    img = as_bool_mask(image_mask, "image_mask")
    n_img = img.sum(-1, keepdim=True)
    dtype = result_dtype(*states)
    read = _positions_read(img, response_mask, align)
    total = None
    for h in states:
        if h.shape[:2] != img.shape:
            raise ValueError(
                f"every hidden state must be [batch, seq, hidden] with [batch, seq] = {tuple(img.shape)}, "
                f"got {tuple(h.shape)}"
            )
        # states nobody reads (padding) set to 0 first: a NaN there would reach every gradient through
        # the image mean's backward (0 * NaN), while the value stayed finite
        h = h.to(dtype) if read is None else torch.where(read.unsqueeze(-1), h.to(dtype), 0.0)
        unit = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(eps)
        source = unit if mode == "pairwise" else h
        mean_img = torch.where(img.unsqueeze(-1), source, 0.0).sum(1, keepdim=True) / n_img.clamp_min(1).unsqueeze(-1)
        if mode == "prototype":
            mean_img = mean_img / torch.linalg.vector_norm(mean_img, dim=-1, keepdim=True).clamp_min(eps)
        sim = (unit * mean_img).sum(-1)
        total = sim if total is None else total + sim
    assert total is not None
    sim = torch.where(n_img > 0, total / len(states), 0.0)
    if align == "predicting":
        sim = torch.cat([sim.new_zeros(sim.shape[0], min(1, sim.shape[1])), sim[:, :-1]], dim=1)
    return _masked(sim, response_mask)


def _positions_read(img: Tensor, response_mask: Tensor | None, align: str) -> Tensor | None:
    """Positions whose hidden state `visual_similarity` reads: the image tokens and the states the
    counted positions take their similarity from (``t - 1`` for ``align="predicting"``); ``None``: all."""
    if response_mask is None:
        return None
    counted = as_bool_mask(response_mask)
    if align == "predicting":
        counted = torch.cat([counted[:, 1:], counted.new_zeros(counted.shape[0], min(1, counted.shape[1]))], 1)
    return img | counted


@typechecked
def relative_position(
    response_mask: Shaped[Tensor, "batch seq"], *, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "batch seq"]:
    r"""Each valid token's relative position in its response, $j/(L_i - 1) \in [0, 1]$.

    $j = 0, \dots, L_i - 1$ counts the response's valid tokens in order (left or right padding
    alike); a one-token response gives 0, padding 0. VGPO (arXiv:2604.09349) boosts late tokens by
    $1 + \beta\, t/(L-1)$.

    Shapes:
        - ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        response_mask: Valid response tokens.
        dtype: Result dtype (float32, or float64 to compose with float64 signals).

    Returns:
        Relative positions in ``dtype``.

    Example:
        >>> import torch
        >>> relative_position(torch.tensor([[0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]))
        tensor([[0.0000, 0.0000, 0.2500, 0.5000, 0.7500, 1.0000],
                [0.0000, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000]])
    """
    valid = as_bool_mask(response_mask)
    index = (valid.long().cumsum(-1) - 1).to(dtype)
    span = (valid.sum(-1, keepdim=True) - 1).clamp_min(1).to(dtype)
    return torch.where(valid, index / span, 0.0)
