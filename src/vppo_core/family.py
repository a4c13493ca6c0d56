r"""Recipes for the rest of the perception-aware family: ToR, DVRP, PEPO, VEPO, VGPO, CGPO, CFPO and NoisyRollout.

Each recipe is a short composition of the shared blocks (signals, transforms, selection, factors and
the loss), in the two-stage style of [`vppo_core.recipes`][vppo_core.recipes]:

1. **once per rollout batch** (no gradient, rollout policy, whole batch, over ranks with
   ``process_group``): the ``*_rollout`` functions turn advantages and signals into a
   [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of (token) advantages and a token mask or
   float token weights. Every batch-wide statistic (ToR's pooled top-30%, CGPO's median/MAD, VGPO's
   group min-max) is computed here, once, and nothing is silently recomputed per micro-batch.
2. **per micro-batch** (with gradient): the loss recipes take the current and rollout
   log-probabilities and the micro-batch's slice of stage 1, and pass ``num_tokens`` /
   ``num_kept_tokens`` / ``num_sequences`` through so micro-batches and ranks add up to one global mean.

PEPO and CFPO read their signal from the update's own forward pass, so they are stage 2 only; DVRP
and CFPO add auxiliary terms built on [`sampled_perception_loss`][vppo_core.sampled_perception_loss]
(an auxiliary $k_3$ term of either sign). Every recipe names the paper, its defaults, and in a
"Paper vs code" paragraph which variant it follows and the switch for the other. The views these
methods need (no image, VP-diffusion noise, normalised-pixel noise, region fill, blinded or
counterfactual attention) are built in ``vppo_core.integrations.views``. Where a paper does not
pin the base objective, the recipe uses the family's usual DAPO base (clip-higher
$\epsilon_{low} = 0.2$, $\epsilon_{high} = 0.28$, token mean, no dual clip), as
[`recipes.pgpo`][vppo_core.recipes.pgpo] does.
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Integer, Real, Shaped
from torch import Tensor

from ._checks import as_bool_mask, check_choice, result_dtype, typechecked
from .advantages import grpo_advantages
from .distributed import ProcessGroupLike
from .factors import (
    anneal_weights,
    centred_clamp,
    group_centred_clamp,
    median_mad_factors,
    minmax_normalise,
    reduce_response,
)
from .loss import Aggregation, LossOutput, aggregate, vppo_loss
from .papo import DoubleEntropyTerm, PerceptionTerm, double_entropy_loss, sampled_perception_loss
from .recipes import RolloutBatch
from .selection import priority_weights, tail_window_mask, topq_mask
from .signals import relative_position
from .transforms import minmax_per_response, response_softmax, shift_nonnegative, soft_or, tanh_gate

__all__ = [
    "CFPOOutput",
    "DVRPOutput",
    "VEPOOutput",
    "cfpo",
    "cgpo",
    "cgpo_rewards",
    "cgpo_rollout",
    "dvrp",
    "noisyrollout_rollout",
    "pepo",
    "pepo_advantages",
    "tor",
    "tor_rollout",
    "vepo",
    "vepo_rollout",
    "vgpo",
    "vgpo_rollout",
]


def _dapo_policy(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    token_mask: Tensor | None,
    *,
    clip_low: float,
    clip_high: float,
    entropy_coef: float = 0.0,
    denominator: Literal["valid", "kept"] = "valid",
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    return vppo_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        token_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=None,
        entropy_coef=entropy_coef,
        agg="token-mean",
        denominator=denominator,
        num_tokens=num_tokens,
    )


def _expand(advantages: Tensor, like: Tensor) -> Tensor:
    adv = advantages.to(result_dtype(advantages, like))
    return adv.unsqueeze(-1).expand(like.shape) if adv.ndim == 1 else adv


# ----------------------------------------------------------------------------- ToR


@typechecked
def tor_rollout(
    advantages: Float[Tensor, " batch"],
    reasoning_scores: Float[Tensor, "batch seq"],
    perception_scores: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    q_reasoning: float = 0.3,
    q_perception: float = 0.3,
    gamma_reasoning: float = 1.0,
    gamma_perception: float = 0.5,
    exact: bool = True,
    tie_break: Literal["random", "position"] = "random",
    generator: torch.Generator | None = None,
    process_group: ProcessGroupLike = None,
) -> RolloutBatch:
    r"""ToR's per-rollout-batch step: token weights from the batch's top reasoning and perception tokens.

    ToR, token reweighting for perception and reasoning (arXiv:2603.25077; no official code). Signals
    of the rollout policy: the reasoning score is the top-$p$ entropy
    (``top_p_entropy(old_logits, top_p=0.95)``, [`top_p_entropy`][vppo_core.signals.top_p_entropy]),
    the perception score $P_t = \lvert\log\pi_{old}(y_t\mid I) - \log\pi_{old}(y_t\mid\varnothing)\rvert$
    (``log_ratio_signal(lp_img, lp_noimg, kind="abs")``,
    [`log_ratio_signal`][vppo_core.signals.log_ratio_signal], with the no-image view). Then

    $$
    R = \operatorname{top}_{30\%}(H^{(p)}),\quad P = \operatorname{top}_{30\%}(P_t)\ \text{(over the batch)},\qquad
    w_t = \begin{cases}\gamma_r & t \in R\\ \gamma_p & t \in P\setminus R\\ 0 & \text{otherwise}\end{cases}
    $$

    with [`topq_mask`][vppo_core.selection.topq_mask] (``scope="batch"``, exactly $\lceil 0.3N\rceil$
    each) and [`priority_weights`][vppo_core.selection.priority_weights]; $\gamma_r = 1$,
    $\gamma_p = 0.5$. The advantages are unchanged; the weights multiply the clipped token loss in
    [`tor`][vppo_core.family.tor].

    Paper vs code: there is no official code. This follows the re-implementation: exactly
    $\lceil 0.3N\rceil$ tokens over all response tokens of the rollout batch with a **seeded random
    tie-break** (many top-$p$ entropies are exactly 0, so a threshold would keep far more than 30%);
    ``exact=False`` gives the plain threshold rule (ties all kept), ``tie_break="position"`` a
    deterministic tie-break, and ``process_group`` pools over ranks (then every rank passes a
    generator in the same state).

    Shapes:
        - ``advantages``: ``[batch]``
        - ``reasoning_scores``, ``perception_scores``, ``response_mask``: ``[batch, seq]``

    Args:
        advantages: Per-response advantages (returned unchanged).
        reasoning_scores: Top-$p$ entropies of the rollout policy.
        perception_scores: $P_t$.
        response_mask: Valid response tokens.
        q_reasoning: Fraction in the reasoning set.
        q_perception: Fraction in the perception set.
        gamma_reasoning: $\gamma_r$.
        gamma_perception: $\gamma_p$.
        exact: Exact counts (``True``) or the threshold rule.
        tie_break: ``"random"`` (needs ``generator``) or ``"position"``.
        generator: Seeded source of the random tie-break.
        process_group: Pool the selections over the ranks of this group.

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of the advantages and float32 token weights
        (``token_mask``).

    Raises:
        ValueError: On ``tie_break="random"`` without a generator, or a bad fraction.

    Example:
        >>> import torch
        >>> h = torch.tensor([[0.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
        >>> p = torch.tensor([[0.1, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.5]])
        >>> out = tor_rollout(torch.tensor([1.0, -1.0]), h, p, torch.ones(2, 4), q_reasoning=0.25,
        ...                   q_perception=0.25, generator=torch.Generator().manual_seed(0))
        >>> out.token_mask
        tensor([[0.0000, 0.5000, 1.0000, 0.0000],
                [1.0000, 0.0000, 0.0000, 0.5000]])
    """
    common = {
        "scope": "batch",
        "exact": exact,
        "tie_break": tie_break,
        "generator": generator,
        "process_group": process_group,
    }
    reasoning = topq_mask(reasoning_scores, response_mask, q=q_reasoning, **common)
    perception = topq_mask(perception_scores, response_mask, q=q_perception, **common)
    weights = priority_weights([reasoning, perception], [gamma_reasoning, gamma_perception], response_mask)
    return RolloutBatch(advantages, weights)


@typechecked
def tor(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_weights: Float[Tensor, "batch seq"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    r"""ToR's loss: the clipped token loss times ToR's weights, averaged over all valid tokens.

    $\mathcal L = \sum_{i,t} w_t\,\ell_{i,t} / \sum_i L_i$ with $w_t$ from
    [`tor_rollout`][vppo_core.family.tor_rollout] (ToR, arXiv:2603.25077): the all-token
    denominator, the advantage unchanged. ``vppo_loss(..., token_mask=token_weights, clip_low=0.2,
    clip_high=0.28, dual_clip=None, agg="token-mean", denominator="valid")``; the DAPO clip bounds
    are the family's usual base (the paper's base objective is not pinned by FAMILY.md).
    ``num_tokens`` is ``loss_denominators(...).num_tokens``.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``token_weights``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Current policy's log-probabilities of the sampled tokens (with gradient).
        old_logprobs: The rollout policy's.
        advantages: Advantages.
        response_mask: Valid response tokens.
        token_weights: ToR's weights.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global valid-token count.

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 4, requires_grad=True)
        >>> w = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
        >>> tor(lp, torch.zeros(1, 4), torch.tensor([1.0]), torch.ones(1, 4), w).loss  # -(1 + 0.5) / 4
        tensor(-0.3750, grad_fn=<DivBackward0>)
    """
    return _dapo_policy(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        token_weights,
        clip_low=clip_low,
        clip_high=clip_high,
        num_tokens=num_tokens,
    )


# ----------------------------------------------------------------------------- DVRP


class DVRPOutput(NamedTuple):
    """What [`dvrp`][vppo_core.family.dvrp] returns: the total loss and each part."""

    loss: Tensor
    """``policy.loss + necessity.loss + robustness.loss + nll.loss``."""
    policy: LossOutput
    """The DAPO policy loss and its diagnostics."""
    necessity: PerceptionTerm
    """$-\\lambda_{nec}\\,\\operatorname{mean} k_3(\\pi_\\theta\\Vert q_{mask})$ and the detached mean."""
    robustness: PerceptionTerm
    """$+\\lambda_{rob}\\,\\operatorname{mean} k_3(\\pi_\\theta\\Vert q_{noise})$ (``loss``) and the detached mean."""
    nll: DoubleEntropyTerm
    """$\\lambda_{ent}(\\mathrm{NLL}_{mask} + \\mathrm{NLL}_{noise})$ and the detached NLLs."""


def _divergence_term(
    divergence: Tensor, response_mask: Tensor, coef: float, agg: Aggregation, num_tokens: float | Tensor | None
) -> PerceptionTerm:
    value = aggregate(divergence, response_mask, agg=agg, num_tokens=num_tokens)
    return PerceptionTerm(loss=-coef * value, kl=value.detach())


@typechecked
def dvrp(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    masked_logprobs: Float[Tensor, "batch seq"],
    noised_logprobs: Float[Tensor, "batch seq"],
    *,
    necessity_coef: float = 0.01,
    robustness_coef: float = 0.01,
    nll_coef: float = 0.05,
    masked_divergence: Float[Tensor, "batch seq"] | None = None,
    noised_divergence: Float[Tensor, "batch seq"] | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> DVRPOutput:
    r"""DVRP: the DAPO loss, pushed away from the masked view and towards the noised view, plus both views' NLL.

    DVRP, differential visual reasoning policy (arXiv:2601.06801; no official code):

    $$
    \mathcal L = \mathcal L_{DAPO} - \lambda_{nec}\operatorname{mean}_t k_3(\pi_\theta\Vert q_{mask})
      + \lambda_{rob}\operatorname{mean}_t k_3(\pi_\theta\Vert q_{noise})
      + \lambda_{ent}\big(\mathrm{NLL}_{mask} + \mathrm{NLL}_{noise}\big),
    $$

    $\lambda_{nec} = \lambda_{rob} = 0.01$, $\lambda_{ent} = 0.05$: the policy must *need* the image
    (differ from the masked view) and be *robust* to noise (agree with the noised view). $k_3$ has the
    current policy as reference ($d = \log q - \log\pi_\theta$, value clamped to $[-10, 10]$): each
    term is [`sampled_perception_loss`][vppo_core.sampled_perception_loss] (``gamma=λ_nec`` and
    ``gamma=-λ_rob``), the NLLs [`double_entropy_loss`][vppo_core.double_entropy_loss] of
    $-\log q(y_t)$; every term is a token mean over the valid tokens (``num_tokens`` passed to each).
    Views: the masked image (14-px patches blackened with $p = 0.6$, one draw per prompt:
    [`blacken_patches_pixel_values`][vppo_core.perturb.blacken_patches_pixel_values]) and a
    VP-diffusion step at the annealed $t = 500\,\sigma(10(0.5 - \text{progress}))$
    (``vppo_core.integrations.views``). The view log-probabilities are constants (scored under
    ``no_grad``), so the NLL term then carries no gradient, as in the method's description.

    Paper vs code: there is no official code. The paper sums full-distribution KLs; this follows the
    re-implementation's sampled $k_3$ by default. For the paper's variant pass the per-token KLs
    ``masked_divergence = visual_dependency(logits, masked_logits)`` and
    ``noised_divergence = visual_dependency(logits, noised_logits)`` (current logits with gradient);
    they then replace the $k_3$ estimates.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``masked_logprobs``, ``noised_logprobs``,
          ``masked_divergence``, ``noised_divergence``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Current policy's log-probabilities of the sampled tokens (with gradient).
        old_logprobs: The rollout policy's.
        advantages: GRPO/DAPO advantages.
        response_mask: Valid response tokens.
        masked_logprobs: $\log q_{mask}(y_t)$ on the masked view.
        noised_logprobs: $\log q_{noise}(y_t)$ on the noised view.
        necessity_coef: $\lambda_{nec}$.
        robustness_coef: $\lambda_{rob}$.
        nll_coef: $\lambda_{ent}$.
        masked_divergence: Per-token divergence replacing the masked $k_3$ (paper variant), or ``None``.
        noised_divergence: Per-token divergence replacing the noised $k_3$, or ``None``.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global valid-token count, passed to every term.

    Returns:
        [`DVRPOutput`][vppo_core.family.DVRPOutput].

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.9]])).requires_grad_()
        >>> out = dvrp(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2),
        ...            masked_logprobs=torch.log(torch.tensor([[0.1, 0.9]])), noised_logprobs=lp.detach())
        >>> out.necessity.kl, out.robustness.kl  # mean k3 to each view
        (tensor(0.4047), tensor(0.))
        >>> bool(out.loss == out.policy.loss + out.necessity.loss + out.robustness.loss + out.nll.loss)
        True
    """
    policy = _dapo_policy(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        None,
        clip_low=clip_low,
        clip_high=clip_high,
        num_tokens=num_tokens,
    )
    if masked_divergence is None:
        necessity = sampled_perception_loss(
            logprobs, masked_logprobs, response_mask, gamma=necessity_coef, num_tokens=num_tokens
        )
    else:
        necessity = _divergence_term(masked_divergence, response_mask, necessity_coef, "token-mean", num_tokens)
    if noised_divergence is None:
        robustness = sampled_perception_loss(
            logprobs, noised_logprobs, response_mask, gamma=-robustness_coef, num_tokens=num_tokens
        )
    else:
        robustness = _divergence_term(noised_divergence, response_mask, -robustness_coef, "token-mean", num_tokens)
    nll = double_entropy_loss(
        -masked_logprobs, -noised_logprobs, response_mask, eta1=nll_coef, eta2=nll_coef, num_tokens=num_tokens
    )
    return DVRPOutput(policy.loss + necessity.loss + robustness.loss + nll.loss, policy, necessity, robustness, nll)


# ----------------------------------------------------------------------------- PEPO


@typechecked
def pepo_advantages(
    advantages: Float[Tensor, "batch *seq"],
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
    advantages: Float[Tensor, "batch *seq"],
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


# ----------------------------------------------------------------------------- VEPO


class VEPOOutput(NamedTuple):
    """What [`vepo`][vppo_core.family.vepo] returns."""

    loss: Tensor
    """``policy.loss - entropy_coef * entropy``."""
    policy: LossOutput
    """The policy loss on the selected tokens, averaged over them."""
    entropy: Tensor
    """The token-mean entropy over all valid tokens (detached)."""


@typechecked
def vepo_rollout(
    advantages: Float[Tensor, "batch *seq"],
    jsd: Float[Tensor, "batch seq"],
    entropy: Float[Tensor, "batch seq"],
    entropy_gap: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    alpha: float = 0.7,
    q: float = 0.2,
) -> RolloutBatch:
    r"""VEPO's selection: each response's top 20% tokens by a vision-anchored, uncertainty-weighted score.

    VEPO, vision-anchored token selection (arXiv:2606.03937; official code). Full-vocabulary signals on
    the same response with the original and a noised image ($\tilde I$: Gaussian noise on the
    normalised pixel values, ``vppo_core.integrations.views``): $\mathrm{JSD}_t(P\Vert Q)$
    ([`jensen_shannon`][vppo_core.signals.jensen_shannon]), $H_t = H(P)$ and
    $\lvert\Delta H_t\rvert = \lvert H(Q) - H(P)\rvert$ ([`entropy_gap`][vppo_core.signals.entropy_gap]).

    $$
    s_t = \Big[1 - (1 - \hat\jmath_t)^{\alpha}(1 - \hat\delta_t)^{1 - \alpha}\Big]\,\hat h_t ,
    $$

    each hat a per-response min-max ([`minmax_per_response`][vppo_core.transforms.minmax_per_response]),
    the bracket a [`soft_or`][vppo_core.transforms.soft_or], $\alpha = 0.7$; keep the top
    $\lceil 0.2 L_i\rceil$ ($\ge 1$) per response ([`topq_mask`][vppo_core.selection.topq_mask],
    ``scope="response"``, ties to the lower position). Per response only: no batch statistic.

    Paper vs code: FAMILY.md records no difference in the selection; the official code's view is
    noise of std $\approx 6.93$ in normalised units (the ``sigma`` of the view builder), which this
    library takes as the default there. The signals may come from the rollout policy (here, stage 1)
    or from the update forward (then call this per micro-batch): the selection is per response, so
    both give the same kind of mask.

    Shapes:
        - ``advantages``: ``[batch]`` or ``[batch, seq]``
        - ``jsd``, ``entropy``, ``entropy_gap``, ``response_mask``: ``[batch, seq]``

    Args:
        advantages: Advantages (returned unchanged).
        jsd: $\mathrm{JSD}_t$.
        entropy: $H_t$.
        entropy_gap: $\lvert\Delta H_t\rvert$.
        response_mask: Valid response tokens.
        alpha: Soft-OR weight $\alpha$ of the JSD.
        q: Fraction kept per response.

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of the advantages and the selection mask.

    Example:
        >>> import torch
        >>> jsd, h, gap = torch.tensor([[0.0, 0.3, 0.1, 0.2, 0.0]]), torch.ones(1, 5), torch.zeros(1, 5)
        >>> h[0, 1] = 0.0  # the most image-dependent token is certain: not selected
        >>> vepo_rollout(torch.tensor([1.0]), jsd, h, gap, torch.ones(1, 5)).token_mask
        tensor([[False, False, False,  True, False]])
    """
    valid = as_bool_mask(response_mask)
    j_hat = minmax_per_response(jsd.detach(), valid)
    d_hat = minmax_per_response(entropy_gap.detach(), valid)
    h_hat = minmax_per_response(entropy.detach(), valid)
    score = soft_or([j_hat, d_hat], [alpha, 1.0 - alpha], valid) * h_hat
    return RolloutBatch(advantages, topq_mask(score, valid, q=q, scope="response"))


@typechecked
def vepo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_mask: Shaped[Tensor, "batch seq"],
    entropy: Float[Tensor, "batch seq"],
    *,
    entropy_coef: float = 1e-3,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_kept_tokens: float | Tensor | None = None,
    num_tokens: float | Tensor | None = None,
) -> VEPOOutput:
    r"""VEPO's loss: the clipped loss averaged over the selected tokens, minus a small entropy bonus over all tokens.

    $$
    \mathcal L = \frac{\sum_{t \in \text{sel}} \ell_t}{\lvert\text{sel}\rvert} - 10^{-3}\operatorname{mean}_t H_t
    $$

    (VEPO, arXiv:2606.03937): ``vppo_loss(..., token_mask, denominator="kept", clip_low=0.2,
    clip_high=0.28, dual_clip=None)`` (the family's DAPO clip bounds) and the full-vocabulary entropy
    of the update forward, ``token_entropy(logits, response_mask)`` with gradient
    ([`token_entropy`][vppo_core.token_entropy]), averaged over every valid token. With micro-batches
    pass ``num_kept_tokens = loss_denominators(masks, token_masks).num_kept_tokens`` for the policy
    term and ``num_tokens`` for the entropy term.

    Shapes:
        - all ``[batch, seq]`` except ``advantages`` (``[batch]`` or ``[batch, seq]``)

    Args:
        logprobs: Current policy's log-probabilities (with gradient).
        old_logprobs: The rollout policy's.
        advantages: Advantages.
        response_mask: Valid response tokens.
        token_mask: Selection from [`vepo_rollout`][vppo_core.family.vepo_rollout].
        entropy: Current policy's full-vocabulary entropy (with gradient).
        entropy_coef: Coefficient of the entropy bonus ($10^{-3}$).
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_kept_tokens: Global selected-token count (policy term).
        num_tokens: Global valid-token count (entropy term).

    Returns:
        [`VEPOOutput`][vppo_core.family.VEPOOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 4, requires_grad=True)
        >>> keep = torch.tensor([[False, True, False, False]])
        >>> out = vepo(lp, torch.zeros(1, 4), torch.tensor([1.0]), torch.ones(1, 4), keep, torch.ones(1, 4))
        >>> out.loss  # -1 averaged over the one selected token, minus the bonus 1e-3 * 1
        tensor(-1.0010, grad_fn=<SubBackward0>)
    """
    policy = _dapo_policy(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        token_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        denominator="kept",
        num_tokens=num_kept_tokens,
    )
    mean_entropy = aggregate(entropy, response_mask, num_tokens=num_tokens)
    return VEPOOutput(policy.loss - entropy_coef * mean_entropy, policy, mean_entropy.detach())


# ----------------------------------------------------------------------------- VGPO


@typechecked
def vgpo_rollout(
    advantages: Float[Tensor, " batch"],
    similarity: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    group_ids: Integer[Tensor, " batch"],
    *,
    window: float = 0.5,
    kappa: float = 0.2,
    beta: float = 0.3,
    variant: Literal["code", "paper"] = "code",
    process_group: ProcessGroupLike = None,
) -> RolloutBatch:
    r"""VGPO's per-rollout-batch step: token advantages from visual grounding, within and across responses.

    VGPO, visually-guided policy optimisation (arXiv:2604.09349; official code, no licence). Signal:
    $S_t = \cos(h^{last}_t, \operatorname{mean}_{v\in img} h^{last}_v)$ after the final norm
    (``visual_similarity(hidden_states, image_mask, layers="last", mode="prototype")``,
    [`visual_similarity`][vppo_core.signals.visual_similarity]). Then

    1. offset $\rho = S - m$ (code: $m = \min(0, \min_{resp} S)$,
       [`shift_nonnegative`][vppo_core.transforms.shift_nonnegative]; paper: $\rho = (S+1)/2$);
    2. gated compensation: among the last half of the response ($j \ge \lfloor(1-\gamma)L\rfloor$,
       [`tail_window_mask`][vppo_core.selection.tail_window_mask]), the top $\max(1,\lfloor\kappa n\rfloor)$
       by $\rho$ ([`topq_mask`][vppo_core.selection.topq_mask], ``rounding="floor"``) get
       $\tilde\rho = \rho\,(1 + \beta\,t/(L-1))$ ([`relative_position`][vppo_core.signals.relative_position]);
    3. intra factor $f^{intra}_t = \operatorname{clamp}(1 + \hat w_t - \operatorname{mean}_{resp}\hat w, 0.1, 2)$,
       $\hat w = \operatorname{mm}_{resp}(\tilde\rho)$ ([`centred_clamp`][vppo_core.factors.centred_clamp]);
    4. inter factor from $\phi_i = \sum_t \hat w_t$ ([`reduce_response`][vppo_core.factors.reduce_response]),
       min-maxed within the prompt group ([`minmax_normalise`][vppo_core.factors.minmax_normalise]):
       $f^{inter}_i = \operatorname{clamp}(1 + \hat s_i - \operatorname{mean}_{group}\hat s, 0.9, 2)$
       ([`group_centred_clamp`][vppo_core.factors.group_centred_clamp]);
    5. $\hat A_{i,t} = A_i\, f^{inter}_i\, f^{intra}_t$.

    $\gamma = 0.5$, $\kappa = 0.2$, $\beta = 0.3$. Step 4 is a batch-wide statistic: groups may span
    micro-batches and ranks, so it is computed here over the whole rollout batch (``process_group``
    for the global batch).

    Paper vs code: the paper offsets by $(S+1)/2$ and has no clamps; the official code offsets by
    $\min(0, \min S)$ and clamps the factors to $[0.1, 2]$ and $[0.9, 2]$. This follows the code
    (``variant="code"``); ``variant="paper"`` switches both.

    Shapes:
        - ``advantages``, ``group_ids``: ``[batch]``
        - ``similarity``, ``response_mask``: ``[batch, seq]``

    Args:
        advantages: GRPO advantages.
        similarity: $S_t$.
        response_mask: Valid response tokens.
        group_ids: Prompt group of each response.
        window: $\gamma$.
        kappa: $\kappa$.
        beta: $\beta$.
        variant: ``"code"`` or ``"paper"``.
        process_group: Group statistics over the global batch.

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of ``[batch, seq]`` token advantages and no mask.

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.5, 0.5, 0.5, 0.5]])
        >>> out = vgpo_rollout(torch.tensor([1.0, -1.0]), s, torch.ones(2, 4), torch.tensor([0, 0]))
        >>> out.advantages
        tensor([[ 1.0102,  1.1633,  2.5102,  1.3163],
                [-0.6750, -0.6750, -1.5750, -0.6750]])
    """
    check_choice("variant", variant, ("code", "paper"))
    valid = as_bool_mask(response_mask)
    s = similarity.detach()
    rho = shift_nonnegative(s, valid) if variant == "code" else torch.where(valid, (s.to(result_dtype(s)) + 1) / 2, 0)
    top = topq_mask(rho, tail_window_mask(valid, fraction=window), q=kappa, rounding="floor")
    rho = torch.where(top, rho * (1.0 + beta * relative_position(valid, dtype=rho.dtype)), rho)
    w_hat = minmax_per_response(rho, valid)
    clamp = variant == "code"
    intra = centred_clamp(w_hat, valid, low=0.1 if clamp else None, high=2.0 if clamp else None)
    rows = valid.any(-1)
    s_hat = minmax_normalise(
        reduce_response(w_hat, valid, reduce="sum"), rows, group_ids=group_ids, process_group=process_group
    )
    inter = group_centred_clamp(
        s_hat, group_ids, rows, low=0.9 if clamp else None, high=2.0 if clamp else None, process_group=process_group
    )
    adv = _expand(advantages, intra)
    return RolloutBatch(torch.where(valid, adv * inter.to(intra.dtype).unsqueeze(-1) * intra, 0.0), None)


@typechecked
def vgpo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    r"""VGPO's loss: the DAPO loss on VGPO's token advantages.

    ``vppo_loss(logprobs, old_logprobs, advantages, response_mask, clip_low=0.2, clip_high=0.28,
    dual_clip=None)`` (token mean) with the ``[batch, seq]`` advantages of
    [`vgpo_rollout`][vppo_core.family.vgpo_rollout] (VGPO, arXiv:2604.09349); the DAPO base is the
    family's usual one (not pinned by FAMILY.md).

    Shapes:
        - all ``[batch, seq]``

    Args:
        logprobs: Current policy's log-probabilities (with gradient).
        old_logprobs: The rollout policy's.
        advantages: VGPO token advantages.
        response_mask: Valid response tokens.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global valid-token count.

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 2, requires_grad=True)
        >>> vgpo(lp, torch.zeros(1, 2), torch.tensor([[0.5, 1.5]]), torch.ones(1, 2)).loss
        tensor(-1., grad_fn=<DivBackward0>)
    """
    return _dapo_policy(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        None,
        clip_low=clip_low,
        clip_high=clip_high,
        num_tokens=num_tokens,
    )


# ----------------------------------------------------------------------------- CGPO


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
    (``mask_scope="micro-batch"``, with ``micro_batch_ids`` naming each row's micro-batch; ``None``:
    the tensor passed is one micro-batch). ``mask_scope="batch"`` pools the thresholds over the whole
    rollout batch (and over ranks with ``process_group``). $\alpha$ is always batch-wide.

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
        micro_batch_ids: Micro-batch of each row (``mask_scope="micro-batch"``).
        process_group: $\alpha$ (and, with ``mask_scope="batch"``, the masks) over the global batch.

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of ``[batch, seq]`` token advantages and the
        mask $P \cup R$.

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
    [`grpo_advantages`][vppo_core.grpo_advantages].

    Shapes:
        - all ``[batch]``

    Example:
        >>> import torch
        >>> cgpo_rewards(torch.tensor([1.0, 0.0]), torch.tensor([True, False]), torch.tensor([0.8, 0.9]))
        tensor([1.4000, 0.0000])
    """
    r = rewards.to(result_dtype(rewards, grounding))
    return r + gamma * torch.where(as_bool_mask(correct, "correct"), grounding.to(r.dtype), 0.0)


# ----------------------------------------------------------------------------- CFPO


class CFPOOutput(NamedTuple):
    """What [`cfpo`][vppo_core.family.cfpo] returns."""

    loss: Tensor
    """``policy.loss + counterfactual.loss``."""
    policy: LossOutput
    """The DAPO (with its 0.03 NLL) or GRPO policy loss."""
    counterfactual: PerceptionTerm
    """$-\\gamma\\,\\operatorname{mean} k_3(\\pi_\\theta\\Vert\\pi_{cf})$ and the detached mean."""


@typechecked
def cfpo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    counterfactual_logprobs: Float[Tensor, "batch seq"],
    *,
    base: Literal["dapo", "grpo"] = "dapo",
    gamma: float | None = None,
    nll_coef: float | None = None,
    ref_logprobs: Float[Tensor, "batch seq"] | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> CFPOOutput:
    r"""CFPO: the policy loss pushed away from the counterfactual-attention policy.

    CFPO (arXiv:2606.23206, ICML 2026; official code). The counterfactual policy $\pi_{cf}$ is the same
    model with, in every decoder self-attention, the salient image values replaced by their mean
    (``counterfactual_attention`` in ``vppo_core.integrations.views``). Then

    $$
    \mathcal L = \mathcal L_{base} - \gamma\operatorname{mean}_t k_3(\pi_\theta\Vert\pi_{cf})
      \;(+\,0.03\cdot\mathrm{NLL}\ \text{for DAPO}),
    $$

    $k_3$ with the current policy as reference ([`sampled_perception_loss`][vppo_core.sampled_perception_loss],
    ``gamma``). ``base="dapo"``: $\gamma = 0.01$, DAPO clip-higher, token mean, and the sampled-token
    NLL $0.03\cdot\operatorname{mean}(-\log\pi(o_t))$ (``entropy_coef`` of
    [`vppo_loss`][vppo_core.vppo_loss]); ``base="grpo"``: $\gamma = 0.02$, symmetric clip 0.2,
    per-sequence mean, optional reference KL (``ref_logprobs``, ``kl_coef``), no NLL.

    Paper vs code: FAMILY.md records no difference between the paper and the official code beyond
    the per-base coefficients above, which ``base`` switches (``gamma`` and ``nll_coef`` override
    them). ``counterfactual_logprobs`` may be a constant (scored under ``no_grad``) or carry gradient.

    Shapes:
        - all ``[batch, seq]`` except ``advantages`` (``[batch]`` or ``[batch, seq]``)

    Args:
        logprobs: Current policy's log-probabilities (with gradient).
        old_logprobs: The rollout policy's.
        advantages: Advantages.
        response_mask: Valid response tokens.
        counterfactual_logprobs: $\log\pi_{cf}(o_t)$.
        base: ``"dapo"`` or ``"grpo"``.
        gamma: $\gamma$; ``None``: 0.01 (DAPO) / 0.02 (GRPO).
        nll_coef: NLL coefficient; ``None``: 0.03 (DAPO) / 0 (GRPO).
        ref_logprobs: Reference log-probabilities for the GRPO KL.
        kl_coef: Reference-KL coefficient (GRPO base).
        num_tokens: Global valid-token count (DAPO base).
        num_sequences: Global sequence count (GRPO base).

    Returns:
        [`CFPOOutput`][vppo_core.family.CFPOOutput].

    Raises:
        ValueError: On an unknown ``base``, or a count or KL for the other base.

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.9]])).requires_grad_()
        >>> out = cfpo(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2), torch.log(torch.tensor([[0.1, 0.9]])))
        >>> out.counterfactual.kl, out.counterfactual.loss
        (tensor(0.4047), tensor(-0.0040, grad_fn=<MulBackward0>))
    """
    check_choice("base", base, ("dapo", "grpo"))
    if base == "dapo":
        if num_sequences is not None or ref_logprobs is not None or kl_coef != 0.0:
            raise ValueError("base='dapo' takes num_tokens and no reference KL; use base='grpo' for those")
        policy = _dapo_policy(
            logprobs,
            old_logprobs,
            advantages,
            response_mask,
            None,
            clip_low=0.2,
            clip_high=0.28,
            entropy_coef=0.03 if nll_coef is None else nll_coef,
            num_tokens=num_tokens,
        )
        term = sampled_perception_loss(
            logprobs,
            counterfactual_logprobs,
            response_mask,
            gamma=0.01 if gamma is None else gamma,
            num_tokens=num_tokens,
        )
    else:
        if num_tokens is not None:
            raise ValueError("base='grpo' averages per sequence: pass num_sequences, not num_tokens")
        policy = vppo_loss(
            logprobs,
            old_logprobs,
            advantages,
            response_mask,
            clip_low=0.2,
            clip_high=0.2,
            dual_clip=None,
            ref_logprobs=ref_logprobs,
            kl_coef=kl_coef,
            entropy_coef=0.0 if nll_coef is None else nll_coef,
            agg="seq-mean-token-mean",
            num_sequences=num_sequences,
        )
        term = sampled_perception_loss(
            logprobs,
            counterfactual_logprobs,
            response_mask,
            gamma=0.02 if gamma is None else gamma,
            agg="seq-mean-token-mean",
            num_sequences=num_sequences,
        )
    return CFPOOutput(policy.loss + term.loss, policy, term)


# ----------------------------------------------------------------------------- NoisyRollout


@typechecked
def noisyrollout_rollout(
    rewards: Real[Tensor, " batch"] | Bool[Tensor, " batch"],
    group_ids: Integer[Tensor, " batch"],
    *,
    scale: Literal["std", "none"] = "std",
) -> RolloutBatch:
    r"""NoisyRollout's advantages: one GRPO group over the clean and the noisy rollouts of a prompt.

    NoisyRollout (arXiv:2504.13055, NeurIPS 2025; official code) changes only the rollouts: for each
    prompt, $n/2$ responses are sampled on the clean image and $n/2$ on one noised copy (a VP-diffusion
    step, annealed $k_t = \lfloor\alpha_0(1 - \sigma(\lambda(t - \gamma)/t_{max}))\rfloor$,
    $\alpha_0 = 500$, $\lambda = 30$, $\gamma = 40$, $t_{max} = 60$: ``noisyrollout_noise_step`` and
    ``vp_diffusion_noise_pixel_values`` in ``vppo_core.integrations.views``), and all $n$ form **one**
    group: ``grpo_advantages(rewards, group_ids)`` with the same id for both halves
    ([`grpo_advantages`][vppo_core.grpo_advantages]). The old and current log-probabilities of every
    response are then computed on the **clean** image, with no importance correction for the noisy
    half, and the loss is GRPO's ([`recipes.grpo`][vppo_core.recipes.grpo]).

    Paper vs code: FAMILY.md records no difference; the noise schedule above is the official code's.
    ``scale="none"`` gives Dr.GRPO advantages.

    Shapes:
        - ``rewards``, ``group_ids``: ``[batch]`` (clean and noisy rollouts of a prompt share an id)

    Args:
        rewards: One reward per response.
        group_ids: The prompt of each response.
        scale: ``"std"`` (GRPO) or ``"none"`` (Dr.GRPO).

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of ``[batch]`` advantages and no mask.

    Example:
        >>> import torch
        >>> rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # clean, clean, noisy, noisy of one prompt
        >>> noisyrollout_rollout(rewards, torch.tensor([0, 0, 0, 0])).advantages
        tensor([ 0.5000, -1.5000,  0.5000,  0.5000])
    """
    return RolloutBatch(grpo_advantages(rewards, group_ids, scale=scale), None)
