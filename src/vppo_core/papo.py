r"""PAPO's auxiliary terms: the Implicit Perception Loss (exact and sampled) and the Double Entropy Loss.

PAPO (Wang et al., 2025, "Perception-Aware Policy Optimization for Multimodal Reasoning",
arXiv:2507.06448) adds to a GRPO or DAPO objective, per response token,

$$
+\gamma\,\mathrm{KL}\big(\pi_\theta(\cdot\mid I)\,\|\,\pi_\theta(\cdot\mid I_{mask})\big)
-\eta_1 H\big(\pi_\theta(\cdot\mid I)\big) - \eta_2 H\big(\pi_\theta(\cdot\mid I_{mask})\big)
$$

to the maximised objective, i.e. $-\gamma\,\mathrm{KL} + \eta_1 H + \eta_2 H_{mask}$ to the loss. Each
term here is a pure function returning the loss term (with gradient) and its detached value; add the
terms to the policy loss yourself, or use [`recipes.papo`][vppo_core.recipes.papo]. Every term is
averaged over valid response tokens only, with [`aggregate`][vppo_core.aggregate] (TRL's PAPO trainer
averages over padding too; this does not).
"""

from typing import NamedTuple

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ._checks import as_bool_mask, check_number, check_same_device, result_dtype, typechecked
from .dependency import visual_dependency
from .loss import Aggregation, aggregate, kl_penalty

__all__ = ["DoubleEntropyTerm", "PerceptionTerm", "double_entropy_loss", "perception_loss", "sampled_perception_loss"]


class PerceptionTerm(NamedTuple):
    """What [`perception_loss`][vppo_core.perception_loss] and its sampled form return (0-d tensors)."""

    loss: Tensor
    r"""$-\gamma\cdot\operatorname{agg}(\mathrm{KL}_t)$: add it to the policy loss (carries gradient)."""
    kl: Tensor
    r"""$\operatorname{agg}(\mathrm{KL}_t)$, PAPO's $\mathrm{KL}_{prcp}$ (detached, for logging)."""


class DoubleEntropyTerm(NamedTuple):
    """What [`double_entropy_loss`][vppo_core.double_entropy_loss] returns (0-d tensors)."""

    loss: Tensor
    r"""$\eta_1\operatorname{agg}(H_t) + \eta_2\operatorname{agg}(H^{mask}_t)$: add it to the policy loss."""
    entropy: Tensor
    r"""$\operatorname{agg}(H_t)$ (detached)."""
    masked_entropy: Tensor
    r"""$\operatorname{agg}(H^{mask}_t)$ (detached)."""


def _check_coef(name: str, value: float) -> None:
    check_number(name, value)  # skipped while torch.compile traces (the value may be symbolic)


@typechecked
def perception_loss(
    logits_img: Float[Tensor, "batch seq vocab"],
    logits_masked: Float[Tensor, "batch seq vocab"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    gamma: float = 0.01,
    temperature: float = 1.0,
    agg: Aggregation = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    norm_length: int | None = None,
) -> PerceptionTerm:
    r"""PAPO's Implicit Perception Loss, exact: $-\gamma\,\operatorname{agg}_t \mathrm{KL}(\pi_I\,\|\,\pi_{I_{mask}})$.

    The per-token KL over the full vocabulary is [`visual_dependency`][vppo_core.visual_dependency]
    (chunked, float32, differentiable) of the current policy's logits with the real image and with
    the masked image (PAPO: 14-pixel patches blackened with probability 0.6); it is averaged over
    the valid tokens with [`aggregate`][vppo_core.aggregate] and **maximised** ($\gamma > 0$).
    This is the term as the paper writes it (arXiv:2507.06448, Eq. 2); the official code estimates
    it on the sampled tokens instead: see [`sampled_perception_loss`][vppo_core.sampled_perception_loss].

    Gradient: with respect to ``logits_img`` it is
    $-\gamma\, p_j\big((x_j - y_j) - \sum_i p_i (x_i - y_i)\big)/T$ per counted token (divided by
    the aggregation's count). ``logits_masked`` may carry gradient (a masked forward pass with
    gradient: the KL is then pushed up through both branches, the paper's objective) or be detached
    (a pass under ``no_grad``: the masked distribution is a fixed target and only the real-image
    branch moves, the official code's default). Padding gets exactly zero gradient in both.

    Shapes:
        - ``logits_img``, ``logits_masked``: ``[batch, seq, vocab]``
        - ``response_mask``: ``[batch, seq]``
        - returns: 0-d tensors

    Args:
        logits_img: Current policy's logits on the sampled responses with the real image.
        logits_masked: The same with the masked image (same dtype).
        response_mask: Valid response tokens.
        gamma: $\gamma$ (PAPO_D: 0.01; PAPO_G with Qwen2.5-VL: 0.02). A negative value minimises the KL.
        temperature: Temperature $T$ of both softmaxes.
        agg: Aggregation mode of [`aggregate`][vppo_core.aggregate] (PAPO's code: token-mean).
        num_tokens: Global token count for ``token-mean`` (ranks, gradient accumulation).
        num_sequences: Global sequence count for the ``seq-mean-*`` modes.
        norm_length: $T$ of ``seq-mean-token-sum-norm``: Dr.GRPO's constant (the generation
            budget); ``None`` uses the padded length of this call.

    Returns:
        [`PerceptionTerm`][vppo_core.PerceptionTerm].

    Raises:
        ValueError: On a non-finite ``gamma``, ``temperature <= 0``, different dtypes, or an
            aggregation error (see [`aggregate`][vppo_core.aggregate]).

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 11, requires_grad=True)
        >>> term = perception_loss(x, x.detach() + torch.randn(2, 3, 11), torch.ones(2, 3), gamma=0.02)
        >>> bool(term.loss == -0.02 * term.kl), term.kl.requires_grad
        (True, False)
        >>> term.loss.backward()  # pushes the real-image distribution away from the masked one
    """
    _check_coef("gamma", gamma)
    kl = visual_dependency(logits_img, logits_masked, response_mask, temperature=temperature)
    counts = {"num_tokens": num_tokens, "num_sequences": num_sequences, "norm_length": norm_length}
    return _perception_term(kl, response_mask, gamma, agg=agg, **counts)


def _perception_term(
    kl: Tensor,
    response_mask: Tensor,
    gamma: float,
    *,
    agg: str = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    norm_length: int | None = None,
) -> PerceptionTerm:
    """``-gamma`` times the aggregated per-token KL, and the detached aggregate."""
    counts = {"num_tokens": num_tokens, "num_sequences": num_sequences, "norm_length": norm_length}
    value = aggregate(kl, response_mask, agg=agg, **counts)
    return PerceptionTerm(loss=-gamma * value, kl=value.detach())


@typechecked
def sampled_perception_loss(
    logprobs: Float[Tensor, "batch seq"],
    masked_logprobs: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    gamma: float = 0.01,
    agg: Aggregation = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    norm_length: int | None = None,
) -> PerceptionTerm:
    r"""PAPO's Implicit Perception Loss as its official code computes it: a clamped $k_3$ on the sampled tokens.

    With $d_t = \operatorname{clamp}(\log\pi(o_t\mid I_{mask}) - \log\pi(o_t\mid I), -20, 20)$,

    $$
    \widehat{\mathrm{KL}}_t = \operatorname{clamp}\big(e^{d_t} - d_t - 1,\ -10,\ 10\big),
    \qquad \text{loss} = -\gamma\,\operatorname{agg}_t \widehat{\mathrm{KL}}_t ,
    $$

    i.e. [`kl_penalty`][vppo_core.kl_penalty] with the masked-image log-probabilities as reference
    (EasyR1/verl's ``low_var_kl``, the estimator of PAPO's paper and code). For tokens sampled from
    $\pi(\cdot\mid I)$ its expectation is the exact $\mathrm{KL}(\pi(\cdot\mid I)\,\|\,\pi(\cdot\mid
    I_{mask}))$ of [`perception_loss`][vppo_core.perception_loss] (before clamping). Its gradient is
    not that KL's: $\partial \widehat{\mathrm{KL}}_t / \partial \log\pi(o_t\mid I) = 1 - e^{d_t}$, whose
    expectation is the gradient of the *reverse* KL $\mathrm{KL}(\pi(\cdot\mid I_{mask})\,\|\,\pi(\cdot\mid I))$.

    In the official code ``masked_logprobs`` come from a pass with the rollout (old) policy under
    ``no_grad``, once per rollout batch, and only ``logprobs`` carries gradient (its
    ``RECOMPUTE_AUG_LOG_PROBS`` switch recomputes them with gradient instead; both work here).
    Padding is replaced before any arithmetic, so NaN or ``-inf`` there reaches neither the value nor
    the gradient.

    Shapes:
        - ``logprobs``, ``masked_logprobs``, ``response_mask``: ``[batch, seq]``
        - returns: 0-d tensors

    Args:
        logprobs: $\log\pi_\theta(o_t\mid I)$ of the sampled tokens (current policy, with gradient).
        masked_logprobs: $\log\pi(o_t\mid I_{mask})$ of the same tokens.
        response_mask: Valid response tokens.
        gamma: $\gamma$ (PAPO_D: 0.01; PAPO_G with Qwen2.5-VL: 0.02).
        agg: Aggregation mode (PAPO's code: token-mean).
        num_tokens: Global token count for ``token-mean``.
        num_sequences: Global sequence count for the ``seq-mean-*`` modes.
        norm_length: $T$ of ``seq-mean-token-sum-norm``: Dr.GRPO's constant (the generation
            budget); ``None`` uses the padded length of this call.

    Returns:
        [`PerceptionTerm`][vppo_core.PerceptionTerm].

    Raises:
        ValueError: On a non-finite ``gamma`` or an aggregation error.

    Example:
        >>> import torch
        >>> lp = torch.tensor([[-0.1, -2.0, -1.0]], requires_grad=True)
        >>> masked = torch.tensor([[-0.1, -4.0, 5.0]])  # the last token is padding
        >>> term = sampled_perception_loss(lp, masked, torch.tensor([[1, 1, 0]]), gamma=1.0)
        >>> term.kl  # (0 + e^-2 + 2 - 1) / 2
        tensor(0.5677)
    """
    _check_coef("gamma", gamma)
    check_same_device(logprobs=logprobs, masked_logprobs=masked_logprobs, response_mask=response_mask)
    valid = as_bool_mask(response_mask)
    dtype = result_dtype(logprobs, masked_logprobs)
    lp = torch.where(valid, logprobs.to(dtype), 0.0)
    masked = torch.where(valid, masked_logprobs.to(dtype), 0.0)
    kl = kl_penalty(lp, masked, estimator="k3")
    counts = {"num_tokens": num_tokens, "num_sequences": num_sequences, "norm_length": norm_length}
    value = aggregate(kl, valid, agg=agg, **counts)
    return PerceptionTerm(loss=-gamma * value, kl=value.detach())


@typechecked
def double_entropy_loss(
    entropy: Float[Tensor, "batch seq"],
    masked_entropy: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    eta1: float = 0.03,
    eta2: float = 0.03,
    agg: Aggregation = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    norm_length: int | None = None,
) -> DoubleEntropyTerm:
    r"""PAPO's Double Entropy Loss: $\eta_1\operatorname{agg}_t H_t + \eta_2\operatorname{agg}_t H^{mask}_t$.

    PAPO (arXiv:2507.06448) found that maximising the perception KL alone can be "hacked" by making
    the masked-image distribution (and then the real one) high-entropy; penalising both entropies
    prevents the collapse, and the paper calls it indispensable without a reference KL (PAPO_D).
    This function takes per-token entropies from either estimator:

    - the full-vocabulary entropy, as the paper's equation writes it:
      ``token_entropy(logits_img)`` and ``token_entropy(logits_masked)``
      ([`token_entropy`][vppo_core.token_entropy]);
    - the sampled-token estimate the paper's implementation uses, $H_t \approx -\log\pi(o_t)$:
      ``-logprobs`` and ``-masked_logprobs``. (Its gradient is the NLL's, not the entropy's; and with
      masked log-probabilities computed under ``no_grad``, as in the official code's default, the
      $\eta_2$ term has no gradient at all.)

    Both terms are averaged over the valid tokens with [`aggregate`][vppo_core.aggregate]; padding
    is never read, even if it holds NaN, and receives exactly zero gradient.

    Shapes:
        - ``entropy``, ``masked_entropy``, ``response_mask``: ``[batch, seq]``
        - returns: 0-d tensors

    Args:
        entropy: Per-token entropy (or its estimate) of $\pi_\theta(\cdot\mid I)$.
        masked_entropy: The same for $\pi_\theta(\cdot\mid I_{mask})$.
        response_mask: Valid response tokens.
        eta1: $\eta_1$ (PAPO_D: 0.03; PAPO_G-7B: 0.05).
        eta2: $\eta_2$ (the same values).
        agg: Aggregation mode (PAPO's code: token-mean).
        num_tokens: Global token count for ``token-mean``.
        num_sequences: Global sequence count for the ``seq-mean-*`` modes.
        norm_length: $T$ of ``seq-mean-token-sum-norm``: Dr.GRPO's constant (the generation
            budget); ``None`` uses the padded length of this call.

    Returns:
        [`DoubleEntropyTerm`][vppo_core.DoubleEntropyTerm].

    Raises:
        ValueError: On a non-finite coefficient or an aggregation error.

    Example:
        >>> import torch
        >>> h = torch.tensor([[1.0, 3.0, float("nan")]])
        >>> h_mask = torch.tensor([[2.0, 2.0, 0.0]])
        >>> double_entropy_loss(h, h_mask, torch.tensor([[1, 1, 0]]), eta1=0.1, eta2=0.01)
        DoubleEntropyTerm(loss=tensor(0.2200), entropy=tensor(2.), masked_entropy=tensor(2.))
    """
    _check_coef("eta1", eta1)
    _check_coef("eta2", eta2)
    check_same_device(entropy=entropy, masked_entropy=masked_entropy, response_mask=response_mask)
    counts = {"agg": agg, "num_tokens": num_tokens, "num_sequences": num_sequences, "norm_length": norm_length}
    h = aggregate(entropy, response_mask, **counts)
    h_mask = aggregate(masked_entropy, response_mask, **counts)
    return DoubleEntropyTerm(loss=eta1 * h + eta2 * h_mask, entropy=h.detach(), masked_entropy=h_mask.detach())
