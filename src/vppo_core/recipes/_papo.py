"""The PAPO recipes: a DAPO policy loss plus the Implicit Perception Loss and the Double Entropy Loss.

``papo`` follows the official code (sampled-token estimates); ``papo_exact`` the paper's equations
(full-vocabulary KL and entropies, from one kernel).
"""

from typing import NamedTuple

from jaxtyping import Float, Shaped
from torch import Tensor

from .._checks import typechecked
from .._joint import visual_dependency_and_entropies
from ..loss import LossOutput
from ..papo import (
    DoubleEntropyTerm,
    PerceptionTerm,
    _check_coef,
    _perception_term,
    double_entropy_loss,
    sampled_perception_loss,
)
from ._policy import dapo


class PAPOOutput(NamedTuple):
    """What [`papo`][vppo_core.recipes.papo] and [`papo_exact`][vppo_core.recipes.papo_exact] return."""

    loss: Tensor
    """The scalar to ``backward()``: ``policy.loss + perception.loss + entropy.loss``."""
    policy: LossOutput
    """The DAPO policy loss and its diagnostics."""
    perception: PerceptionTerm
    """The Implicit Perception Loss term and the detached $\\mathrm{KL}_{prcp}$."""
    entropy: DoubleEntropyTerm
    """The Double Entropy Loss term and the detached entropies."""


@typechecked
def papo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    masked_logprobs: Float[Tensor, "batch seq"],
    *,
    gamma: float = 0.01,
    eta1: float = 0.03,
    eta2: float = 0.03,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> PAPOOutput:
    r"""PAPO_D: the DAPO loss, minus $\gamma$ times the perception KL, plus the Double Entropy Loss.

    PAPO (Wang et al., 2025, arXiv:2507.06448), the DAPO variant PAPO_D of its Table 3, as its
    official code computes it (every term a token mean over the valid tokens, ``num_tokens`` passed
    to each):

    - ``dapo(logprobs, old_logprobs, advantages, response_mask)`` ([`dapo`][vppo_core.recipes.dapo]);
    - ``sampled_perception_loss(logprobs, masked_logprobs, response_mask, gamma=0.01)``: the clamped
      $k_3$ of the sampled tokens ([`sampled_perception_loss`][vppo_core.sampled_perception_loss]);
    - ``double_entropy_loss(-logprobs, -masked_logprobs, response_mask, eta1=0.03, eta2=0.03)``: the
      entropies estimated by the sampled-token NLL, as in the paper's implementation
      ([`double_entropy_loss`][vppo_core.double_entropy_loss]).

    ``masked_logprobs`` are $\log\pi(o_t\mid I_{mask})$ of the sampled tokens with the masked image
    (14-px patches blackened with probability 0.6). The official code computes them once per rollout
    batch with the rollout policy under ``no_grad``, so the $\eta_2$ term then has no gradient; pass
    them with gradient (an extra masked forward pass per micro-batch) to make it act.

    Where this differs from the paper: the paper writes the exact KL and entropies over the full
    vocabulary; [`papo_exact`][vppo_core.recipes.papo_exact] computes them. PAPO_G is the GRPO variant:
    $\gamma = 0.02$ (Qwen2.5-VL; 0.01 for Qwen3-VL-2B), a reference KL with $\beta = 0.01$,
    $\epsilon_{high} = 0.3$, and double entropy only for the 7B model ($\eta = 0.05$); compose it
    from [`vppo_loss`][vppo_core.vppo_loss] and the two terms. EasyR1, the code base PAPO (like
    VPPO-RL) builds on, also applies a dual clip ($c = 3$) by default; pass ``dual_clip=3.0`` to
    [`vppo_loss`][vppo_core.vppo_loss] in your own composition for it.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``masked_logprobs``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: Advantages, ``[batch]`` or ``[batch, seq]``.
        response_mask: Valid response tokens.
        masked_logprobs: The sampled tokens' log-probabilities with the masked image.
        gamma: $\gamma$ of the perception KL (maximised).
        eta1: $\eta_1$, entropy penalty with the real image.
        eta2: $\eta_2$, entropy penalty with the masked image.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global valid-token count, passed to every term.

    Returns:
        [`PAPOOutput`][vppo_core.recipes.PAPOOutput]: the total loss and each part's outputs.

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.9]])).requires_grad_()
        >>> masked = torch.log(torch.tensor([[0.1, 0.9]]))
        >>> out = papo(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2), masked)
        >>> out.perception.kl  # (0.2 - log 0.2 - 1 + 0) / 2
        tensor(0.4047)
        >>> bool(out.loss == out.policy.loss + out.perception.loss + out.entropy.loss)
        True
    """
    policy = dapo(
        logprobs, old_logprobs, advantages, response_mask, clip_low=clip_low, clip_high=clip_high, num_tokens=num_tokens
    )
    perception = sampled_perception_loss(logprobs, masked_logprobs, response_mask, gamma=gamma, num_tokens=num_tokens)
    entropy = double_entropy_loss(
        -logprobs, -masked_logprobs, response_mask, eta1=eta1, eta2=eta2, num_tokens=num_tokens
    )
    return PAPOOutput(policy.loss + perception.loss + entropy.loss, policy, perception, entropy)


@typechecked
def papo_exact(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    logits_img: Float[Tensor, "batch seq vocab"],
    logits_masked: Float[Tensor, "batch seq vocab"],
    *,
    gamma: float = 0.01,
    eta1: float = 0.03,
    eta2: float = 0.03,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    temperature: float = 1.0,
    num_tokens: float | Tensor | None = None,
) -> PAPOOutput:
    r"""PAPO_D as the paper writes it: DAPO, minus $\gamma$ times the full-vocabulary KL, plus both entropies.

    PAPO (Wang et al., 2025, arXiv:2507.06448, Eq. 2 and Sec. 3.3) over the full vocabulary:

    $$
    \mathcal L = \mathcal L_{DAPO}
      - \gamma\,\overline{\mathrm{KL}\big(\pi_\theta(\cdot\mid I)\,\Vert\,\pi_\theta(\cdot\mid I_{mask})\big)}
      + \eta_1\,\overline{H\big(\pi_\theta(\cdot\mid I)\big)}
      + \eta_2\,\overline{H\big(\pi_\theta(\cdot\mid I_{mask})\big)},
    $$

    each bar a token mean over the valid tokens (``num_tokens`` passed to every term). The KL and
    both entropies come from one call of
    [`visual_dependency_and_entropies`][vppo_core.visual_dependency_and_entropies] (one kernel, each
    logit tensor read once, each gradient written once); the policy term is
    [`dapo`][vppo_core.recipes.dapo] and the entropy term
    [`double_entropy_loss`][vppo_core.double_entropy_loss]. It equals
    ``dapo(...) + perception_loss(logits_img, logits_masked, ...) +
    double_entropy_loss(token_entropy(logits_img), token_entropy(logits_masked), ...)``.

    ``logits_img`` are the current policy's logits at the response positions (the same forward pass
    that gives ``logprobs``); ``logits_masked`` those with the masked image. With ``logits_masked``
    from a pass under ``no_grad`` the masked distribution is a fixed target (only the real-image
    branch moves, and the $\eta_2$ term has no gradient); with gradient, both branches move, as the
    paper's objective says. The official code's sampled-token form is
    [`papo`][vppo_core.recipes.papo].

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``
        - ``logits_img``, ``logits_masked``: ``[batch, seq, vocab]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: Advantages, ``[batch]`` or ``[batch, seq]``.
        response_mask: Valid response tokens.
        logits_img: Current policy's logits with the real image.
        logits_masked: The same with the masked image (same dtype).
        gamma: $\gamma$ of the perception KL (maximised).
        eta1: $\eta_1$, entropy penalty with the real image.
        eta2: $\eta_2$, entropy penalty with the masked image.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        temperature: $T$ of both softmaxes.
        num_tokens: Global valid-token count, passed to every term.

    Returns:
        [`PAPOOutput`][vppo_core.recipes.PAPOOutput]: the total loss and each part's outputs.

    Raises:
        ValueError: On a non-finite coefficient, ``temperature <= 0``, or mismatched logits.

    Example:
        >>> import torch
        >>> logits = torch.randn(1, 3, 11, requires_grad=True)
        >>> lp = torch.log_softmax(logits, -1)[..., 0]
        >>> out = papo_exact(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 3), logits, torch.randn(1, 3, 11))
        >>> bool(out.loss == out.policy.loss + out.perception.loss + out.entropy.loss)
        True
        >>> out.loss.backward()
    """
    _check_coef("gamma", gamma)
    policy = dapo(
        logprobs, old_logprobs, advantages, response_mask, clip_low=clip_low, clip_high=clip_high, num_tokens=num_tokens
    )
    terms = visual_dependency_and_entropies(logits_img, logits_masked, response_mask, temperature=temperature)
    perception = _perception_term(terms.dependency, response_mask, gamma, num_tokens=num_tokens)
    entropy = double_entropy_loss(
        terms.entropy_img, terms.entropy_noimg, response_mask, eta1=eta1, eta2=eta2, num_tokens=num_tokens
    )
    return PAPOOutput(policy.loss + perception.loss + entropy.loss, policy, perception, entropy)
