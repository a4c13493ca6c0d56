"""Per-token surrogates: the PPO clip (with clip-higher and dual clip), GSPO's sequence-level ratio and
CISPO's clipped-weight REINFORCE."""

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ._aggregate import _broadcast_advantages
from ._checks import as_bool_mask, result_dtype, typechecked
from ._estimators import LOG_RATIO_CLAMP


def _check_clips(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {dual_clip!r}")


@typechecked
def clipped_surrogate(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch *seq"],
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
def gspo_surrogate(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch *seq"],
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
    advantages: Float[Tensor, " batch *seq"],
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
