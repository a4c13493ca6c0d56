"""The PAPO recipe: a DAPO policy loss plus the Implicit Perception Loss and the Double Entropy Loss."""

from typing import NamedTuple

from jaxtyping import Float, Shaped
from torch import Tensor

from .._checks import typechecked
from ..loss import LossOutput
from ..papo import DoubleEntropyTerm, PerceptionTerm, double_entropy_loss, sampled_perception_loss
from ._policy import dapo


class PAPOOutput(NamedTuple):
    """What [`papo`][vppo_core.recipes.papo] returns: the total loss and each part's outputs."""

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

    Where this differs from the paper: the paper writes the exact KL and entropies (use
    [`perception_loss`][vppo_core.perception_loss] and [`token_entropy`][vppo_core.token_entropy]
    with [`double_entropy_loss`][vppo_core.double_entropy_loss]). PAPO_G is the GRPO variant:
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
