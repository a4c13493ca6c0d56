"""Policy-gradient losses: per-token surrogates (PPO clip, GSPO, CISPO), aggregation, and the losses that compose them.

Each loss is the same three steps: a per-token surrogate, the shared masking/aggregation
([`aggregate`][vppo_core.aggregate]), and the shared optional KL and NLL terms with detached diagnostics. Only the
surrogate differs between [`vppo_loss`][vppo_core.vppo_loss], [`gspo_loss`][vppo_core.gspo_loss] and
[`cispo_loss`][vppo_core.cispo_loss].
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ._checks import as_bool_mask, check_choice, check_same_device, result_dtype, typechecked
from ._estimators import ESTIMATORS, LOG_RATIO_CLAMP, sampled_kl

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

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
Denominator = Literal["valid", "kept"]


class LossOutput(NamedTuple):
    """What [`vppo_loss`][vppo_core.vppo_loss] returns: the loss and detached diagnostics, all 0-d tensors.

    Diagnostics are means over this call's valid tokens (not over ``num_tokens``); reduce them
    across ranks yourself if you log global values. No field syncs the host.
    """

    loss: Tensor
    """The scalar to ``backward()``: policy-gradient term + ``kl_coef``·KL + ``entropy_coef``·NLL."""
    pg_loss: Tensor
    """The aggregated clipped surrogate (detached)."""
    kl_loss: Tensor
    """The aggregated KL-to-reference estimate (detached; 0 without ``ref_logprobs``)."""
    entropy_loss: Tensor
    """The aggregated sampled-token NLL $-\\log\\pi(o_t)$ (detached), whatever ``entropy_coef`` is."""
    clip_frac: Tensor
    """Fraction of valid tokens where the clipped ratio, not the ratio, sets the surrogate."""
    dual_clip_frac: Tensor
    """Fraction of valid tokens where the dual clip ($-c\\hat A$ for $\\hat A < 0$) sets it."""
    approx_kl: Tensor
    """Mean of $\\log\\pi_{old} - \\log\\pi$ over valid tokens (the reference code's ``ppo_kl``)."""
    kept_frac: Tensor
    """Kept valid tokens (``token_mask``) over valid tokens; 1 without a ``token_mask``."""


def _check_clips(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {dual_clip!r}")


def _broadcast_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    if advantages.ndim == 1:
        return advantages.unsqueeze(-1).expand(shape)
    if advantages.shape != shape:
        raise ValueError(f"advantages must be [batch] or [batch, seq] = {tuple(shape)}, got {tuple(advantages.shape)}")
    return advantages


@typechecked
def clipped_surrogate(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
) -> Float[Tensor, "batch seq"]:
    r"""Per-token PPO clipped surrogate loss with clip-higher and dual-clip.

    With $r_t = \exp(\operatorname{clamp}(\log\pi_t - \log\pi_{old,t}, -20, 20))$,

    $$
    \ell_t = \max\!\big(-\hat A_t r_t,\ -\hat A_t \operatorname{clip}(r_t, 1-\epsilon_{low}, 1+\epsilon_{high})\big),
    \qquad \ell_t \leftarrow \min(\ell_t, -c\,\hat A_t) \text{ if } \hat A_t < 0 .
    $$

    PPO (Schulman et al., 2017), asymmetric "clip-higher" bounds from DAPO (Yu et al., 2025,
    arXiv:2503.14476), dual-clip from Ye et al. (2020, arXiv:1912.09729). Defaults are VPPO-RL's
    ($\epsilon_{low}=0.2$, $\epsilon_{high}=0.28$, $c=3$). The log-ratio is clamped before ``exp``
    so a stale token cannot overflow. Nothing is masked here: see [`aggregate`][vppo_core.aggregate].

    Shapes:
        - ``logprobs``, ``old_logprobs``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` (one per trajectory) or ``[batch, seq]`` (per token)
        - returns: ``[batch, seq]``

    Args:
        logprobs: Log-probabilities of the sampled tokens under the current policy.
        old_logprobs: The same under the policy that sampled them.
        advantages: Advantage estimates.
        clip_low: $\epsilon_{low} \in [0, 1)$.
        clip_high: $\epsilon_{high} \ge 0$.
        dual_clip: $c > 1$, or ``None`` to disable the dual clip.

    Returns:
        Per-token loss, float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[1.5, 0.5]]))
        >>> clipped_surrogate(lp, torch.zeros(1, 2), torch.tensor([1.0]))  # ratio 1.5 -> clipped to 1.28
        tensor([[-1.2800, -0.5000]])
    """
    _check_clips(clip_low, clip_high, dual_clip)
    dtype = result_dtype(logprobs, old_logprobs, advantages)
    adv = _broadcast_advantages(advantages.to(dtype), logprobs.shape)
    log_ratio = (logprobs.to(dtype) - old_logprobs.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


@typechecked
def kl_penalty(
    logprobs: Float[Tensor, "batch seq"],
    ref_logprobs: Float[Tensor, "batch seq"],
    *,
    estimator: Literal["k1", "k2", "k3"] = "k3",
) -> Float[Tensor, "batch seq"]:
    r"""Per-token estimate of $\mathrm{KL}(\pi\,\|\,\pi_{ref})$ from the sampled tokens.

    With $d = \operatorname{clamp}(\log\pi_{ref} - \log\pi, -20, 20)$: $k_1 = -d$,
    $k_2 = d^2/2$, $k_3 = \operatorname{clamp}(e^d - d - 1, -10, 10)$ (Schulman, "Approximating KL
    divergence", 2020; the clamps follow verl's ``low_var_kl``). Differentiable in ``logprobs``.

    Shapes:
        - ``logprobs``, ``ref_logprobs``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Example:
        >>> import torch
        >>> kl_penalty(torch.tensor([[-1.0]]), torch.tensor([[-1.0]]))
        tensor([[0.]])
    """
    check_choice("estimator", estimator, ESTIMATORS)
    dtype = result_dtype(logprobs, ref_logprobs)
    return sampled_kl(logprobs.to(dtype), ref_logprobs.to(dtype), estimator, k3_range=(-10.0, 10.0))


def _positive_or_one(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.ones_like(x))


@typechecked
def aggregate(
    values: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_mask: Shaped[Tensor, "batch seq"] | None = None,
    *,
    agg: Aggregation = "token-mean",
    denominator: Denominator = "valid",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
) -> Float[Tensor, ""]:
    r"""Reduce a per-token loss to a scalar, counting only valid (and kept) tokens.

    With $v_{bt}$ the values, $m_{bt}$ the response mask, $w_{bt}$ the token mask (1 if ``None``;
    bool or float weights), contributions $c_{bt} = m_{bt} w_{bt} v_{bt}$ and denominator weights
    $d_{bt} = m_{bt}$ (``denominator="valid"``, the all-token denominator of VPPO-RL) or
    $m_{bt} w_{bt}$ (``"kept"``, as in the high-entropy-minority paper, arXiv:2506.01939):

    | ``agg`` | value |
    |---|---|
    | ``token-mean`` | $\sum_{bt} c_{bt} / N$, $N = \sum_{bt} d_{bt}$ or ``num_tokens`` |
    | ``seq-mean-token-mean`` | $\frac1B \sum_b \sum_t c_{bt} / \sum_t d_{bt}$ |
    | ``seq-mean-token-sum`` | $\frac1B \sum_b \sum_t c_{bt}$ |
    | ``seq-mean-token-sum-norm`` | $\frac1B \sum_b \sum_t c_{bt} / T$ (Dr.GRPO; $T$ = padded length) |

    where $B$ is the number of sequences with at least one valid token, or ``num_sequences``.
    ``num_tokens`` / ``num_sequences`` let you pass global counts (over ranks and gradient-accumulation
    micro-batches) so that each micro-batch's loss is its share of one global mean. Differences from
    verl's ``agg_loss``: empty sequences are left out of $B$ (verl gives NaN for them in
    ``seq-mean-token-mean``), and ``seq-mean-token-sum-norm`` is a mean over sequences (verl's is the
    batch sum over $T$, i.e. $B$ times larger).

    Masked-out tokens contribute exactly 0 and receive exactly zero gradient, even where ``values``
    is NaN or infinite there (``torch.where``, not multiplication, for bool masks). An empty
    denominator counts as 1, so an all-padding batch gives loss 0.

    Shapes:
        - ``values``, ``response_mask``, ``token_mask``: ``[batch, seq]``
        - returns: ``[]``

    Args:
        values: Per-token loss.
        response_mask: Valid response tokens (bool or 0/1).
        token_mask: Kept tokens (bool) or per-token weights (float); ``None`` keeps all.
        agg: Aggregation mode (the four verl/VPPO-RL modes).
        denominator: ``"valid"`` or ``"kept"`` (see above).
        num_tokens: Global token count for ``token-mean`` (a number or a 0-d tensor).
        num_sequences: Global sequence count for the ``seq-mean-*`` modes.

    Returns:
        0-d tensor in ``values``' dtype.

    Raises:
        ValueError: On an unknown ``agg``/``denominator``, a count for the wrong mode, or a
            non-positive count given as a number.

    Example:
        >>> import torch
        >>> v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> m = torch.tensor([[1, 1, 1], [1, 0, 0]])
        >>> aggregate(v, m), aggregate(v, m, agg="seq-mean-token-mean")
        (tensor(2.5000), tensor(3.))
    """
    check_choice("agg", agg, AGGREGATIONS)
    check_choice("denominator", denominator, ("valid", "kept"))
    if num_tokens is not None and agg != "token-mean":
        raise ValueError(f"num_tokens applies to agg='token-mean' only, got agg={agg!r}; use num_sequences")
    if num_sequences is not None and agg == "token-mean":
        raise ValueError("num_sequences applies to the seq-mean-* modes only, got agg='token-mean'")
    for name, count in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
        if isinstance(count, (int, float)) and not count > 0:
            raise ValueError(f"{name} must be > 0, got {count!r}")
    check_same_device(values=values, response_mask=response_mask, token_mask=token_mask)

    valid = as_bool_mask(response_mask)
    zero = values.new_zeros(())
    if token_mask is None:
        contrib = torch.where(valid, values, zero)
        weight = valid.to(values.dtype)
    elif token_mask.dtype == torch.bool:
        keep = valid & token_mask
        contrib = torch.where(keep, values, zero)
        weight = (keep if denominator == "kept" else valid).to(values.dtype)
    else:
        w = token_mask.to(values.dtype)
        contrib = torch.where(valid, w * values, zero)
        weight = torch.where(valid, w, zero) if denominator == "kept" else valid.to(values.dtype)

    if agg == "token-mean":
        denom = _positive_or_one(weight.sum()) if num_tokens is None else num_tokens
        return contrib.sum() / denom

    seq_sum = contrib.sum(-1)
    if agg == "seq-mean-token-mean":
        seq_sum = seq_sum / _positive_or_one(weight.sum(-1))
    elif agg == "seq-mean-token-sum-norm":
        seq_sum = seq_sum / values.shape[-1]
    n_seq = valid.any(-1).sum().to(values.dtype).clamp_min(1) if num_sequences is None else num_sequences
    return seq_sum.sum() / n_seq


class _Prepared(NamedTuple):
    valid: Tensor
    lp: Tensor
    old: Tensor
    adv: Tensor


def _prepare(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None,
    denominator: str,
    num_tokens: float | Tensor | None,
    kl_coef: float,
    entropy_coef: float,
) -> _Prepared:
    """Checks shared by the policy losses; upcasts and replaces padding by constants.

    Padding is replaced *before* any arithmetic, so NaN/-inf there can reach neither the loss nor
    (through a 0 * nan product) the gradient.
    """
    check_same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, response_mask=response_mask)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef!r} needs ref_logprobs; pass them or set kl_coef=0")
    if num_tokens is not None and denominator == "kept" and (kl_coef != 0.0 or entropy_coef != 0.0):
        raise ValueError(
            "num_tokens with denominator='kept' is ambiguous for the KL/NLL terms, which count all "
            "valid tokens; set kl_coef=entropy_coef=0 and aggregate those terms yourself with aggregate()"
        )
    valid = as_bool_mask(response_mask)
    dtype = result_dtype(logprobs, old_logprobs, advantages, ref_logprobs)
    lp = torch.where(valid, logprobs.to(dtype), 0.0)
    old = torch.where(valid, old_logprobs.to(dtype), 0.0)
    adv = torch.where(valid, _broadcast_advantages(advantages.to(dtype), lp.shape), 0.0)
    return _Prepared(valid, lp, old, adv)


def _finish(
    prep: _Prepared,
    token_loss: Tensor,
    clipped: Tensor,
    dual_clipped: Tensor | None,
    token_mask: Tensor | None,
    *,
    ref_logprobs: Tensor | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    agg: str,
    denominator: str,
    num_tokens: float | Tensor | None,
    num_sequences: float | Tensor | None,
) -> LossOutput:
    """Aggregation, the auxiliary KL and NLL terms and the diagnostics, shared by the policy losses."""
    valid, lp, old = prep.valid, prep.lp, prep.old
    counts = {"num_tokens": num_tokens, "num_sequences": num_sequences}
    pg = aggregate(token_loss, valid, token_mask, agg=agg, denominator=denominator, **counts)
    aux_counts = counts if denominator == "valid" else {"num_sequences": num_sequences}
    nll = aggregate(-lp, valid, agg=agg, **aux_counts)
    loss = pg + entropy_coef * nll if entropy_coef != 0.0 else pg
    if ref_logprobs is not None:
        ref = torch.where(valid, ref_logprobs.to(lp.dtype), 0.0)
        kl = aggregate(kl_penalty(lp, ref, estimator=kl_estimator), valid, agg=agg, **aux_counts)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    else:
        kl = lp.new_zeros(())

    with torch.no_grad():
        n_valid = valid.sum().clamp_min(1).to(lp.dtype)

        def frac(flags: Tensor | None) -> Tensor:
            return lp.new_zeros(()) if flags is None else (flags & valid).sum().to(lp.dtype) / n_valid

        kept = valid if token_mask is None else valid & as_bool_mask(token_mask, "token_mask")
        return LossOutput(
            loss=loss,
            pg_loss=pg.detach(),
            kl_loss=kl.detach(),
            entropy_loss=nll.detach(),
            clip_frac=frac(clipped),
            dual_clip_frac=frac(dual_clipped),
            approx_kl=torch.where(valid, old - lp, 0.0).sum() / n_valid,
            kept_frac=frac(kept),
        )


@typechecked
def vppo_loss(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
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
        token_mask: TGF mask (bool) or token weights (float); ``None`` keeps every token.
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

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Raises:
        ValueError: On bad clip values, an unknown mode, ``kl_coef != 0`` without ``ref_logprobs``,
            or ``num_tokens`` with ``denominator="kept"`` and a KL or NLL term (ambiguous: give the
            auxiliary terms their own [`aggregate`][vppo_core.aggregate] call).

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
    )


# ----------------------------------------------------------------------------- GSPO and CISPO


@typechecked
def gspo_surrogate(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> Float[Tensor, "batch seq"]:
    r"""Per-token form of GSPO's sequence-level clipped surrogate (GSPO-token).

    GSPO (Zheng et al., 2025, arXiv:2507.18071) replaces the token ratio by the length-normalised
    sequence ratio $s_i = \exp\big(\frac{1}{|o_i|}\sum_t (\log\pi_t - \log\pi_{old,t})\big)$ and clips it
    per sequence. Its token form keeps the value $s_i$ at every token while routing the gradient
    through the token's own log-probability:

    $$
    s_{i,t} = \operatorname{sg}(s_i)\,\frac{\pi_t}{\operatorname{sg}(\pi_t)}, \qquad
    \ell_{i,t} = \max\!\big(-\hat A_{i,t}\, s_{i,t},\ -\hat A_{i,t}\operatorname{clip}(s_{i,t}, 1-\epsilon_{low},
    1+\epsilon_{high})\big).
    $$

    Averaged with ``agg="seq-mean-token-mean"`` this is exactly GSPO's objective and gradient when
    the advantage is constant along a sequence (and GSPO-token otherwise). The sequence log-ratio is
    clamped to $\pm 20$. Defaults are the paper's clip range ($3\cdot10^{-4}$, $4\cdot10^{-4}$).

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``
        - returns: ``[batch, seq]`` (0 at padded tokens)

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[2.0, 0.5, 9.0]]))  # sequence ratio exp(mean log) = 1 over 2 tokens
        >>> gspo_surrogate(lp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 1, 0]]))
        tensor([[-1., -1.,  0.]])
    """
    _check_clips(clip_low, clip_high, None)
    valid = as_bool_mask(response_mask)
    dtype = result_dtype(logprobs, old_logprobs, advantages)
    lp = torch.where(valid, logprobs.to(dtype), 0.0)
    old = torch.where(valid, old_logprobs.to(dtype), 0.0)
    adv = torch.where(valid, _broadcast_advantages(advantages.to(dtype), lp.shape), 0.0)
    n = valid.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    seq_log_ratio = ((lp - old).sum(-1, keepdim=True) / n).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(seq_log_ratio.detach() + lp - lp.detach())
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    return torch.where(valid, loss, 0.0)


@typechecked
def cispo_surrogate(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    *,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
) -> Float[Tensor, "batch seq"]:
    r"""Per-token CISPO loss: REINFORCE weighted by the clipped, detached importance ratio.

    CISPO (MiniMax-M1, arXiv:2506.13585) clips the importance-sampling weight instead of the update,
    so no token loses its gradient:

    $$
    \ell_t = -\operatorname{sg}\big(\operatorname{clip}(r_t, 1-\epsilon_{low}, 1+\epsilon_{high})\big)\,\hat
    A_t\,\log\pi_t,
    \qquad r_t = \exp(\operatorname{clamp}(\log\pi_t - \log\pi_{old,t}, -20, 20)).
    $$

    MiniMax-M1 imposes no lower bound (``clip_low=1.0``, the default) and tunes only the upper one;
    ``clip_high=0.28`` follows DAPO's clip-higher as a starting point.

    Shapes:
        - ``logprobs``, ``old_logprobs``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``
        - returns: ``[batch, seq]``

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[2.0, 1.0]]))
        >>> cispo_surrogate(lp, torch.zeros(1, 2), torch.tensor([1.0]))  # weight min(2, 1.28) on -log 2
        tensor([[-0.8872, -0.0000]])
    """
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1] (1 removes the lower bound), got {clip_low!r}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    dtype = result_dtype(logprobs, old_logprobs, advantages)
    lp, old = logprobs.to(dtype), old_logprobs.to(dtype)
    adv = _broadcast_advantages(advantages.to(dtype), lp.shape)
    ratio = torch.exp((lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).detach()
    return -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv * lp


@typechecked
def gspo_loss(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
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
    )


@typechecked
def cispo_loss(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
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
    )
