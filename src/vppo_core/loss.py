"""Policy-gradient losses: per-token surrogates (PPO clip, GSPO, CISPO), aggregation, and the losses that compose them.

Each loss is the same three steps: a per-token surrogate, the shared masking/aggregation
([`aggregate`][vppo_core.aggregate]), and the shared optional KL and NLL terms with detached diagnostics. Only the
surrogate differs between [`vppo_loss`][vppo_core.vppo_loss], [`gspo_loss`][vppo_core.gspo_loss] and
[`cispo_loss`][vppo_core.cispo_loss].
"""

from typing import Literal

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ._aggregate import (
    AGGREGATIONS,
    Aggregation,
    Denominator,
    LossOutput,
    _finish,
    _prepare,
    aggregate,
    kl_penalty,
)
from ._checks import typechecked
from ._estimators import LOG_RATIO_CLAMP
from ._surrogates import _check_clips, cispo_surrogate, clipped_surrogate, gspo_surrogate

__all__ = [
    "AGGREGATIONS",
    "LossOutput",
    "aggregate",
    "cispo_loss",
    "cispo_surrogate",
    "clipped_surrogate",
    "gspo_loss",
    "gspo_surrogate",
    "kl_penalty",
    "vppo_loss",
]


@typechecked
def vppo_loss(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_mask: Shaped[Tensor, "batch seq"] | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    ref_logprobs: Float[Tensor, "batch seq"] | None = None,
    kl_coef: float = 0.0,
    kl_estimator: Literal["k1", "k2", "k3"] = "k3",
    entropy_coef: float = 0.0,
    agg: Aggregation = "token-mean",
    denominator: Denominator = "valid",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    norm_length: int | None = None,
) -> LossOutput:
    r"""VPPO's objective: the clipped surrogate on the filtered tokens, with an all-token denominator.

    $$
    \mathcal L = \operatorname{agg}\big(\ell_t \cdot w_t\big)
      + \beta_{KL}\,\operatorname{agg}\big(\widehat{\mathrm{KL}}_t(\pi\|\pi_{ref})\big)
      + \beta_{H}\,\operatorname{agg}\big(-\log\pi(o_t)\big),
    $$

    with $\ell_t$ from [`clipped_surrogate`][vppo_core.clipped_surrogate], $w_t$ the TGF mask (``token_mask``, e.g. from
    [`token_filter_mask`][vppo_core.token_filter_mask]; filtered tokens get exactly zero gradient) and ``agg`` from
    [`aggregate`][vppo_core.aggregate]. This is Eq. 6 of VPPO (arXiv:2510.09285) as the VPPO-RL code computes it:
    ``token-mean`` over *all* valid tokens (``denominator="valid"``), so VPPO's gradient is about
    ``k`` times GRPO's; ``denominator="kept"`` divides by the kept tokens instead, as the
    high-entropy-minority paper does. The KL and NLL terms always average over all valid tokens.
    ``entropy_coef`` is the VPPO-RL code's "entropy penalty": it adds
    ``entropy_coef * mean(-logprobs)``, a sampled-token NLL, not the full-vocabulary entropy (a
    negative coefficient makes it a bonus). The published runs use no KL term.

    With ``token_mask=None``, ``dual_clip=None`` and ``clip_high=clip_low`` this is plain PPO/GRPO.

    Padding (``response_mask`` false) never reaches the loss or the gradient, even if it holds NaN
    or ``-inf``. NaN at a kept valid token propagates to the loss; NaN at a valid token that
    ``token_mask`` filtered out shows in ``entropy_loss`` and ``approx_kl`` (and in the loss when a
    KL or NLL term is on), since those count every valid token.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``token_mask``, ``ref_logprobs``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: Per-trajectory or per-token advantages (e.g. shaped by
            [`shape_advantages`][vppo_core.shape_advantages]).
        response_mask: Valid response tokens.
        token_mask: TGF mask (bool) or token weights (float, constants: no gradient flows into
            them); ``None`` keeps every token.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$ (DAPO clip-higher).
        dual_clip: Dual-clip constant $c > 1$ or ``None``.
        ref_logprobs: Reference-policy log-probabilities for the KL term.
        kl_coef: $\beta_{KL}$; needs ``ref_logprobs`` when non-zero.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see [`kl_penalty`][vppo_core.kl_penalty]).
        entropy_coef: $\beta_H$ (VPPO-RL's published runs: 0.06).
        agg: Aggregation mode.
        denominator: ``"valid"`` (VPPO-RL) or ``"kept"``.
        num_tokens: Global token count for ``token-mean`` (data parallelism, gradient accumulation).
        num_sequences: Global sequence count for the ``seq-mean-*`` modes.
        norm_length: $T$ of ``seq-mean-token-sum-norm``: Dr.GRPO's constant (the generation
            budget); ``None`` uses the padded length of this call.

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Raises:
        ValueError: On bad clip values, ``kl_coef != 0`` without ``ref_logprobs``, or ``num_tokens``
            with ``denominator="kept"`` and a KL or NLL term (ambiguous: give the auxiliary terms
            their own [`aggregate`][vppo_core.aggregate] call).
        TypeError: On an unknown ``agg``/``denominator``/``kl_estimator``, or a shape or dtype
            that does not match the annotation (jaxtyping).

    Example:
        >>> import torch
        >>> from vppo_core import vppo_loss
        >>> lp = torch.zeros(2, 3, requires_grad=True)
        >>> out = vppo_loss(lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3),
        ...                 token_mask=torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool))
        >>> out.loss.backward()
        >>> lp.grad.ne(0)  # only kept tokens get gradient; the denominator is all 6 valid tokens
        tensor([[ True, False, False],
                [ True,  True, False]])
        >>> lp.grad[0, 0] * 6
        tensor(-1.)
        >>> out.kept_frac
        tensor(0.5000)
    """
    _check_clips(clip_low, clip_high, dual_clip)
    prep = _prepare(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, denominator, num_tokens, kl_coef, entropy_coef
    )
    token_loss = clipped_surrogate(
        prep.lp, prep.old, prep.adv, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip
    )
    with torch.no_grad():
        ratio = torch.exp((prep.lp - prep.old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        unclipped = torch.maximum(-prep.adv * ratio, -prep.adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
        clipped = -prep.adv * ratio < unclipped
        dual = (prep.adv < 0) & (unclipped > -prep.adv * dual_clip) if dual_clip is not None else None
    return _finish(
        prep,
        token_loss,
        clipped,
        dual,
        token_mask,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        agg=agg,
        denominator=denominator,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        norm_length=norm_length,
    )


@typechecked
def gspo_loss(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_mask: Shaped[Tensor, "batch seq"] | None = None,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    ref_logprobs: Float[Tensor, "batch seq"] | None = None,
    kl_coef: float = 0.0,
    kl_estimator: Literal["k1", "k2", "k3"] = "k3",
    entropy_coef: float = 0.0,
    agg: Aggregation = "seq-mean-token-mean",
    denominator: Denominator = "valid",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    norm_length: int | None = None,
) -> LossOutput:
    r"""GSPO's sequence-level clipped objective, with the masking, aggregation and terms of `vppo_loss`.

    $\ell_{i,t}$ from [`gspo_surrogate`][vppo_core.gspo_surrogate] (Zheng et al., 2025,
    arXiv:2507.18071), aggregated by default with ``seq-mean-token-mean`` as in the paper. A
    ``token_mask`` (e.g. VPPO's TGF mask) restricts which tokens carry gradient, as in
    [`vppo_loss`][vppo_core.vppo_loss]; the sequence ratio always uses every valid token.
    ``clip_frac`` counts the valid tokens of sequences whose clipped ratio binds;
    ``dual_clip_frac`` is 0.

    Shapes:
        - as [`vppo_loss`][vppo_core.vppo_loss]

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(2, 3, requires_grad=True)
        >>> out = gspo_loss(lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3))
        >>> out.loss.backward()
        >>> lp.grad  # each sequence's gradient spread evenly over its tokens, seq-mean
        tensor([[-0.1667, -0.1667, -0.1667],
                [ 0.1667,  0.1667,  0.1667]])
    """
    _check_clips(clip_low, clip_high, None)
    prep = _prepare(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, denominator, num_tokens, kl_coef, entropy_coef
    )
    token_loss = gspo_surrogate(prep.lp, prep.old, prep.adv, prep.valid, clip_low=clip_low, clip_high=clip_high)
    with torch.no_grad():
        n = prep.valid.sum(-1, keepdim=True).clamp_min(1)
        seq_ratio = torch.exp(((prep.lp - prep.old).sum(-1, keepdim=True) / n).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        clipped = (-prep.adv * seq_ratio) < (-prep.adv * seq_ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    return _finish(
        prep,
        token_loss,
        clipped,
        None,
        token_mask,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        agg=agg,
        denominator=denominator,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        norm_length=norm_length,
    )


@typechecked
def cispo_loss(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_mask: Shaped[Tensor, "batch seq"] | None = None,
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    ref_logprobs: Float[Tensor, "batch seq"] | None = None,
    kl_coef: float = 0.0,
    kl_estimator: Literal["k1", "k2", "k3"] = "k3",
    entropy_coef: float = 0.0,
    agg: Aggregation = "token-mean",
    denominator: Denominator = "valid",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    norm_length: int | None = None,
) -> LossOutput:
    r"""CISPO's clipped-weight REINFORCE, with the masking, aggregation and terms of `vppo_loss`.

    $\ell_t$ from [`cispo_surrogate`][vppo_core.cispo_surrogate] (MiniMax-M1, arXiv:2506.13585),
    token-mean by default as in the paper. ``clip_frac`` counts the valid tokens whose importance
    weight was clipped; ``dual_clip_frac`` is 0.

    Shapes:
        - as [`vppo_loss`][vppo_core.vppo_loss]

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 2, requires_grad=True)
        >>> cispo_loss(lp, torch.zeros(1, 2), torch.tensor([2.0]), torch.ones(1, 2)).loss.backward()
        >>> lp.grad
        tensor([[-1., -1.]])
    """
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1] (1 removes the lower bound), got {clip_low!r}")
    prep = _prepare(
        logprobs, old_logprobs, advantages, response_mask, ref_logprobs, denominator, num_tokens, kl_coef, entropy_coef
    )
    token_loss = cispo_surrogate(prep.lp, prep.old, prep.adv, clip_low=clip_low, clip_high=clip_high)
    with torch.no_grad():
        ratio = torch.exp((prep.lp - prep.old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        clipped = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
    return _finish(
        prep,
        token_loss,
        clipped,
        None,
        token_mask,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        agg=agg,
        denominator=denominator,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        norm_length=norm_length,
    )
