"""Shared machinery of the policy losses: aggregation, the KL penalty and the output type.

Also the checks every loss runs before its surrogate and the auxiliary terms and diagnostics after it.
"""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ._checks import as_bool_mask, check_choice, check_same_device, result_dtype, typechecked
from ._estimators import ESTIMATORS, sampled_kl

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


def _broadcast_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    if advantages.ndim == 1:
        return advantages.unsqueeze(-1).expand(shape)
    if advantages.shape != shape:
        raise ValueError(f"advantages must be [batch] or [batch, seq] = {tuple(shape)}, got {tuple(advantages.shape)}")
    return advantages


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
    norm_length: int | None = None,
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
    | ``seq-mean-token-sum-norm`` | $\frac1B \sum_b \sum_t c_{bt} / T$ (Dr.GRPO; $T$ = ``norm_length``) |

    where $B$ is the number of sequences with at least one valid token, or ``num_sequences``, and
    $T$ is ``norm_length``, or the padded length of ``values`` when it is ``None``.
    ``num_tokens`` / ``num_sequences`` let you pass global counts (over ranks and gradient-accumulation
    micro-batches) so that each micro-batch's loss is its share of one global mean. Dr.GRPO divides by
    a constant, the generation budget: pass it as ``norm_length`` when micro-batches are padded to
    different lengths, or each one is divided by its own padded length. Differences from
    verl's ``agg_loss``: empty sequences are left out of $B$ (verl gives NaN for them in
    ``seq-mean-token-mean``), and ``seq-mean-token-sum-norm`` is a mean over sequences (verl's is the
    batch sum over $T$, i.e. $B$ times larger).

    Masked-out tokens contribute exactly 0 and receive exactly zero gradient, even where ``values``
    or a float weight is NaN or infinite there (``torch.where``, not multiplication). Float weights
    are constants (detached, as the reference code detaches its token mask). bf16/fp16 ``values``
    are aggregated and returned in float32. An empty denominator counts as 1, so an all-padding
    batch gives loss 0.

    Shapes:
        - ``values``, ``response_mask``, ``token_mask``: ``[batch, seq]``
        - returns: ``[]``

    Args:
        values: Per-token loss.
        response_mask: Valid response tokens (bool or 0/1).
        token_mask: Kept tokens (bool) or per-token weights (float, constants: no gradient flows
            into them); ``None`` keeps all.
        agg: Aggregation mode (the four verl/VPPO-RL modes).
        denominator: ``"valid"`` or ``"kept"`` (see above).
        num_tokens: Global token count for ``token-mean`` (a number or a 0-d tensor).
        num_sequences: Global sequence count for the ``seq-mean-*`` modes.
        norm_length: $T$ of ``seq-mean-token-sum-norm``: Dr.GRPO's constant (the generation
            budget); ``None`` uses the padded length of this call.

    Returns:
        0-d tensor, float32 (float64 for float64 ``values``).

    Raises:
        ValueError: On a count for the wrong mode, a non-positive count given as a number, or a
            ``norm_length`` below 1.
        TypeError: On an unknown ``agg``/``denominator``, a ``norm_length`` that is not an ``int``,
            or a shape or dtype that does not match the annotation (jaxtyping).

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
    if norm_length is not None:
        if agg != "seq-mean-token-sum-norm":
            raise ValueError(f"norm_length applies to agg='seq-mean-token-sum-norm' only, got agg={agg!r}")
        if isinstance(norm_length, bool) or not isinstance(norm_length, int) or norm_length < 1:
            raise ValueError(f"norm_length must be a positive integer, got {norm_length!r}")
    for name, count in (("num_tokens", num_tokens), ("num_sequences", num_sequences)):
        if isinstance(count, (int, float)) and not count > 0:
            raise ValueError(f"{name} must be > 0, got {count!r}")
    check_same_device(values=values, response_mask=response_mask, token_mask=token_mask)

    values = values.to(result_dtype(values))
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
        # constant weights (detached, as the reference code detaches its token mask), 0 outside the
        # response before the product: a NaN weight there would reach the gradient as 0 * NaN
        w = torch.where(valid, token_mask.detach().to(values.dtype), zero)
        contrib = torch.where(valid, w * values, zero)
        weight = w if denominator == "kept" else valid.to(values.dtype)

    if agg == "token-mean":
        denom = _positive_or_one(weight.sum()) if num_tokens is None else num_tokens
        return contrib.sum() / denom

    seq_sum = contrib.sum(-1)
    if agg == "seq-mean-token-mean":
        seq_sum = seq_sum / _positive_or_one(weight.sum(-1))
    elif agg == "seq-mean-token-sum-norm":
        seq_sum = seq_sum / (values.shape[-1] if norm_length is None else norm_length)
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
    norm_length: int | None = None,
) -> LossOutput:
    """Aggregation, the auxiliary KL and NLL terms and the diagnostics, shared by the policy losses."""
    valid, lp, old = prep.valid, prep.lp, prep.old
    counts = {"num_tokens": num_tokens, "num_sequences": num_sequences, "norm_length": norm_length}
    pg = aggregate(token_loss, valid, token_mask, agg=agg, denominator=denominator, **counts)
    aux_counts = counts if denominator == "valid" else {"num_sequences": num_sequences, "norm_length": norm_length}
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

        def frac(flags):  # unannotated: Dynamo of torch 2.4 cannot build a `Tensor | None` in a trace
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
