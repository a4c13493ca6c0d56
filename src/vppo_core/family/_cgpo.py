"""The CGPO recipes (see `vppo_core.family`)."""

from typing import Literal

import torch
from jaxtyping import Bool, Float, Integer, Real, Shaped
from torch import Tensor

from .._checks import as_bool_mask, check_choice, check_number, result_dtype, typechecked
from ..distributed import ProcessGroupLike
from ..factors import (
    median_mad_factors,
    reduce_response,
)
from ..loss import LossOutput
from ..recipes import RolloutBatch
from ..selection import topq_mask
from ._common import _dapo_policy, _expand, _nan_rows, _poison_rows

__all__ = ["cgpo", "cgpo_rewards", "cgpo_rollout"]


@typechecked
def cgpo_rollout(
    advantages: Float[Tensor, " batch"],
    dependency: Float[Tensor, "batch seq"],
    entropy: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    region_mask: Shaped[Tensor, "batch seq"] | None = None,
    *,
    q: float = 0.3,
    lam: float = 0.1,
    mask_scope: Literal["micro-batch", "batch"] = "micro-batch",
    micro_batch_ids: Integer[Tensor, " batch"] | None = None,
    process_group: ProcessGroupLike = None,
) -> RolloutBatch:
    r"""CGPO's per-rollout-batch step: robust response factors on perception tokens, reasoning tokens kept as is.

    CGPO, counterfactual grounding (ACM MM 2026, DOI 10.1145/3767308.3835969; official code =
    AP-RLVR). View: every ``<region>`` box named in the response filled with its mean colour
    (``vppo_core.integrations.views``); signal $S_t = k_3$ at the sampled token with the rollout
    policy as reference (``log_ratio_signal(lp_img, lp_view, kind="k3")``,
    [`log_ratio_signal`][vppo_core.signals.log_ratio_signal]); $H_t$ the entropy. Then

    $$
    \alpha_i = 1 + \lambda\tanh\Big(\frac{\bar S_i - \operatorname{median}_B\bar S}
      {\operatorname{MAD}_B\bar S + 10^{-8}}\Big),
    \qquad
    \hat A_t = \begin{cases}\alpha_i A_i & t \in P = \operatorname{top}_{30\%}(S)\cup\text{region tags}\\
    A_i & t \in R\setminus P,\ R = \operatorname{top}_{30\%}(H)\\ 0 & \text{otherwise}\end{cases}
    $$

    $\lambda = 0.1$; $\alpha$ from [`median_mad_factors`][vppo_core.factors.median_mad_factors] over the
    whole rollout batch (over ranks with ``process_group``); the masks from
    [`topq_mask`][vppo_core.selection.topq_mask] (threshold rule, ``exact=False``), the region-tag
    tokens from [`span_mask`][vppo_core.selection.span_mask]. The extra grounding reward is
    [`cgpo_rewards`][vppo_core.family.cgpo_rewards].

    Paper vs code: the official code takes the two top-30% thresholds per micro-batch; this follows it
    (``mask_scope="micro-batch"``, with ``micro_batch_ids`` naming each row's micro-batch).
    ``mask_scope="batch"`` pools the thresholds over the whole rollout batch (and over ranks with
    ``process_group``). $\alpha$ is always batch-wide, so call this once on the whole rollout batch
    and pass ``micro_batch_ids`` to get the code's per-micro-batch thresholds: without them the
    tensor passed is **one** micro-batch, which on a single process is the same as
    ``mask_scope="batch"`` (the micro-batch scope never communicates). ``micro_batch_ids`` with
    ``mask_scope="batch"`` is an error rather than silently ignored.

    A NaN entropy or dependency at a valid token is not hidden by the (bool) selections: that
    response's token advantages are NaN (a NaN dependency also makes $\alpha$ NaN for the whole
    batch, through the median). NaN at padding is never read.

    Shapes:
        - ``advantages``, ``micro_batch_ids``: ``[batch]``
        - ``dependency``, ``entropy``, ``response_mask``, ``region_mask``: ``[batch, seq]``

    Args:
        advantages: GRPO/DAPO advantages.
        dependency: $S_t$.
        entropy: $H_t$.
        response_mask: Valid response tokens.
        region_mask: Region-tag tokens of the responses, or ``None``.
        q: Fraction of each top set.
        lam: $\lambda$.
        mask_scope: ``"micro-batch"`` (code) or ``"batch"``.
        micro_batch_ids: Micro-batch of each row (``mask_scope="micro-batch"`` only); ``None``: one
            micro-batch.
        process_group: $\alpha$ (and, with ``mask_scope="batch"``, the masks) over the global batch.

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of ``[batch, seq]`` token advantages and the
        mask $P \cup R$.

    Raises:
        ValueError: On ``micro_batch_ids`` with ``mask_scope="batch"``, ``q`` outside $(0, 1]$ or
            ``lam`` outside $[0, 1)$.
        TypeError: On an unknown ``mask_scope``, or a shape or dtype that does not match the
            annotation (jaxtyping).

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.0, 2.0, 0.1], [0.3, 0.0, 0.0]])
        >>> h = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
        >>> out = cgpo_rollout(torch.tensor([1.0, 1.0]), s, h, torch.ones(2, 3), q=0.2)
        >>> out.advantages
        tensor([[1.0000, 1.0762, 0.0000],
                [0.9238, 0.0000, 1.0000]])
    """
    check_choice("mask_scope", mask_scope, ("micro-batch", "batch"))
    if mask_scope == "batch" and micro_batch_ids is not None:
        raise ValueError(
            "micro_batch_ids only applies to mask_scope='micro-batch', got mask_scope='batch' with "
            "micro_batch_ids; pass one or the other"
        )
    valid = as_bool_mask(response_mask)
    dep = dependency.detach()
    alpha = median_mad_factors(reduce_response(dep, valid), valid.any(-1), lam=lam, process_group=process_group)
    scope = {"scope": mask_scope, "exact": False}
    if mask_scope == "micro-batch":
        scope["micro_batch_ids"] = micro_batch_ids
    else:
        scope["process_group"] = process_group
    reasoning = topq_mask(entropy, valid, q=q, **scope)
    perception = topq_mask(dep, valid, q=q, **scope)
    if region_mask is not None:
        perception = perception | (as_bool_mask(region_mask, "region_mask") & valid)
    adv = _expand(advantages, alpha.unsqueeze(-1).expand(valid.shape))
    token_adv = torch.where(perception, alpha.to(adv.dtype).unsqueeze(-1) * adv, torch.where(reasoning, adv, 0.0))
    token_adv = _poison_rows(token_adv, _nan_rows(valid, dependency, entropy), valid)
    return RolloutBatch(token_adv, perception | reasoning)


@typechecked
def cgpo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_mask: Shaped[Tensor, "batch seq"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    r"""CGPO's loss: the DAPO loss on CGPO's token advantages, all-token denominator.

    ``vppo_loss(..., token_mask, clip_low=0.2, clip_high=0.28, dual_clip=None,
    denominator="valid")`` with the outputs of [`cgpo_rollout`][vppo_core.family.cgpo_rollout]
    (CGPO, ACM MM 2026). Tokens outside $P \cup R$ have advantage 0, so they contribute 0 either
    way; the mask only makes ``kept_frac`` report $|P \cup R| / N$.

    Shapes:
        - all ``[batch, seq]``

    Args:
        logprobs: Current policy's log-probabilities (with gradient).
        old_logprobs: The rollout policy's.
        advantages: CGPO token advantages.
        response_mask: Valid response tokens.
        token_mask: $P \cup R$.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global valid-token count.

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 2, requires_grad=True)
        >>> out = cgpo(lp, torch.zeros(1, 2), torch.tensor([[1.1, 0.0]]), torch.ones(1, 2), torch.tensor([[1, 0]]))
        >>> out.loss, out.kept_frac
        (tensor(-0.5500, grad_fn=<DivBackward0>), tensor(0.5000))
    """
    return _dapo_policy(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        as_bool_mask(token_mask, "token_mask"),
        clip_low=clip_low,
        clip_high=clip_high,
        num_tokens=num_tokens,
    )


@typechecked
def cgpo_rewards(
    rewards: Real[Tensor, " batch"] | Bool[Tensor, " batch"],
    correct: Shaped[Tensor, " batch"],
    grounding: Float[Tensor, " batch"],
    *,
    gamma: float = 0.5,
) -> Float[Tensor, " batch"]:
    r"""CGPO's reward with the grounding bonus: $R_i + \gamma\,\mathbb 1[\text{correct}_i]\,R^{gc}_i$.

    $R^{gc}$ is the F1-weighted overlap of the response's boxes with the policy's re-detection
    (computed outside the tensor path); $\gamma = 0.5$ (CGPO, ACM MM 2026). Add it before
    [`grpo_advantages`][vppo_core.grpo_advantages]. The grounding of an incorrect response is never
    read (the bonus is 0 there, whatever it holds: it need not be computed, and may be NaN, as
    padding may); a NaN grounding of a correct response gives a NaN reward.

    Shapes:
        - all ``[batch]``

    Args:
        rewards: Task rewards $R_i$.
        correct: Whether each response is correct (bool or 0/1).
        grounding: $R^{gc}_i$.
        gamma: $\gamma$, finite and $\ge 0$ (a bonus).

    Returns:
        float32 (float64 for float64 input) rewards.

    Raises:
        ValueError: If ``gamma`` is negative or not finite.

    Example:
        >>> import torch
        >>> cgpo_rewards(torch.tensor([1.0, 0.0]), torch.tensor([True, False]), torch.tensor([0.8, 0.9]))
        tensor([1.4000, 0.0000])
    """
    check_number("gamma", gamma, low=0.0)
    r = rewards.to(result_dtype(rewards, grounding))
    return r + gamma * torch.where(as_bool_mask(correct, "correct"), grounding.to(r.dtype), 0.0)
