"""The PEPO recipes (see `vppo_core.family`)."""

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from .._checks import as_bool_mask, typechecked
from ..factors import (
    anneal_weights,
)
from ..loss import LossOutput
from ..transforms import minmax_per_response, response_softmax, tanh_gate
from ._common import _dapo_policy, _expand

__all__ = ["pepo", "pepo_advantages"]


@typechecked
def pepo_advantages(
    advantages: Float[Tensor, " batch *seq"],
    similarity: Float[Tensor, "batch seq"],
    entropy: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    progress: float | Float[Tensor, ""],
    alpha: float = 0.05,
    temperature: float = 1.8,
    detach: bool = True,
) -> Float[Tensor, "batch seq"]:
    r"""PEPO's token advantages: perception-exploration weights, blended in on a schedule.

    PEPO (arXiv:2603.22847; official code on ms-swift), from the signals of the update forward itself
    (no extra pass): $VS_t$ the mean cosine of $h_t$ to the image tokens over all returned layers
    (``visual_similarity(hidden_states, image_mask, layers="all", mode="pairwise")``,
    [`visual_similarity`][vppo_core.signals.visual_similarity]) and $H_t$ the full-vocabulary entropy
    ([`token_entropy`][vppo_core.token_entropy]). With $\hat v = \operatorname{mm}_{resp}(VS)$ and
    $\hat h = \operatorname{mm}_{resp}(H)$,

    $$
    g_t = 1 + \alpha\tanh\big((\hat v_t + \hat h_t) - \operatorname{mean}_{resp}(\hat v + \hat h)\big),\quad
    w_t = L_i\operatorname{softmax}_{resp}\big(VS_t\,g_t / T_g\big),\quad
    \hat A_t = A_i\big((1 - \lambda) + \lambda w_t\big),
    $$

    $\alpha = 0.05$, $T_g = 1.8$ (the released script), $\lambda = \text{step}/\text{max\_steps}$
    (``progress``); the softmax is on the raw cosines. Blocks:
    [`minmax_per_response`][vppo_core.transforms.minmax_per_response],
    [`tanh_gate`][vppo_core.transforms.tanh_gate],
    [`response_softmax`][vppo_core.transforms.response_softmax],
    [`anneal_weights`][vppo_core.factors.anneal_weights]. Everything is per response: no batch statistic.

    Paper vs code: the official code leaves the weights attached to the graph (the gradient flows
    through $VS$ and $H$ into the hidden states); the re-implementation detaches them. This follows
    the re-implementation (``detach=True``, the library's rule that what feeds a weight is detached);
    ``detach=False`` is the official code's behaviour.

    Shapes:
        - ``advantages``: ``[batch]`` or ``[batch, seq]``
        - ``similarity``, ``entropy``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        advantages: GRPO advantages.
        similarity: $VS_t$.
        entropy: $H_t$.
        response_mask: Valid response tokens.
        progress: $\lambda = \text{step}/\text{max\_steps} \in [0, 1]$.
        alpha: Gate amplitude $\alpha$.
        temperature: $T_g$.
        detach: Detach the signals (re-implementation) or not (official code).

    Returns:
        Token advantages, 0 at padding.

    Example:
        >>> import torch
        >>> vs, h = torch.tensor([[0.1, 0.5, 0.9]]), torch.tensor([[2.0, 0.1, 1.0]])
        >>> pepo_advantages(torch.tensor([1.0]), vs, h, torch.ones(1, 3), progress=0.0)  # starts as GRPO
        tensor([[1., 1., 1.]])
        >>> pepo_advantages(torch.tensor([1.0]), vs, h, torch.ones(1, 3), progress=1.0).sum()  # mean weight 1
        tensor(3.)
    """
    valid = as_bool_mask(response_mask)
    vs = similarity.detach() if detach else similarity
    h = entropy.detach() if detach else entropy
    v_hat = minmax_per_response(vs, valid)
    h_hat = minmax_per_response(h, valid)
    gate = tanh_gate(v_hat + h_hat, valid, alpha=alpha)
    weights = response_softmax(vs.to(gate.dtype) * gate, valid, temperature=temperature)
    adv = _expand(advantages, weights)
    return torch.where(valid, adv * anneal_weights(weights, progress), 0.0)


@typechecked
def pepo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    similarity: Float[Tensor, "batch seq"],
    entropy: Float[Tensor, "batch seq"],
    *,
    progress: float | Float[Tensor, ""],
    alpha: float = 0.05,
    temperature: float = 1.8,
    detach: bool = True,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    r"""PEPO's loss (per micro-batch): the DAPO loss on [`pepo_advantages`][vppo_core.family.pepo_advantages].

    PEPO (arXiv:2603.22847) reads its signals from the update forward, so there is no rollout stage:
    ``vppo_loss(logprobs, old_logprobs, pepo_advantages(...), response_mask, clip_low=0.2,
    clip_high=0.28, dual_clip=None)``, token mean over all valid tokens (the family's DAPO base; the
    paper's base objective is not pinned by FAMILY.md). See
    [`pepo_advantages`][vppo_core.family.pepo_advantages] for the weights, the defaults and the
    ``detach`` switch (official code: ``detach=False``).

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``similarity``, ``entropy``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Current policy's log-probabilities (with gradient).
        old_logprobs: The rollout policy's.
        advantages: GRPO advantages.
        response_mask: Valid response tokens.
        similarity: $VS_t$ from the update forward.
        entropy: $H_t$ from the update forward.
        progress: $\lambda = \text{step}/\text{max\_steps}$.
        alpha: $\alpha$.
        temperature: $T_g$.
        detach: See [`pepo_advantages`][vppo_core.family.pepo_advantages].
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global valid-token count.

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 3, requires_grad=True)
        >>> vs, h = torch.tensor([[0.1, 0.5, 0.9]]), torch.tensor([[2.0, 0.1, 1.0]])
        >>> pepo(lp, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3), vs, h, progress=1.0).loss
        tensor(-1., grad_fn=<DivBackward0>)
    """
    token_adv = pepo_advantages(
        advantages,
        similarity,
        entropy,
        response_mask,
        progress=progress,
        alpha=alpha,
        temperature=temperature,
        detach=detach,
    )
    return _dapo_policy(
        logprobs,
        old_logprobs,
        token_adv,
        response_mask,
        None,
        clip_low=clip_low,
        clip_high=clip_high,
        num_tokens=num_tokens,
    )
