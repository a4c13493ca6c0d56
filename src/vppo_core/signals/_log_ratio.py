"""The sampled log-ratio family: k1, k2, k3, |log r| and the positive part."""

from typing import Literal

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from .._checks import check_choice, check_same_device, result_dtype, typechecked
from .._estimators import LOG_RATIO_CLAMP
from ._common import _masked

LogRatioKind = Literal["k1", "k2", "k3", "abs", "positive"]


@typechecked
def log_ratio_signal(
    logprobs: Float[Tensor, "*batch"],
    view_logprobs: Float[Tensor, "*batch"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    kind: LogRatioKind = "k3",
    k3_range: tuple[float, float] = (0.0, 10.0),
) -> Float[Tensor, "*batch"]:
    r"""Per-token signals from the sampled token's log-probability under the original input and a view.

    With $\delta_t = \log q(o_t) - \log p(o_t)$ and $d_t = \operatorname{clamp}(\delta_t, -20, 20)$ (the
    reference code's clamp of the estimators), $p$ the policy on the original input and $q$ on the
    view (no image, masked, noised, counterfactual):

    | ``kind`` | value | |
    |---|---|---|
    | ``"k1"`` | $-d_t$ | unbiased for $\mathrm{KL}(p\Vert q)$, signed |
    | ``"k2"`` | $d_t^2/2$ | |
    | ``"k3"`` | $\operatorname{clamp}(e^{d_t} - d_t - 1, \text{k3\_range})$ | VPPO code, CGPO ($S_t$) |
    | ``"abs"`` | $\lvert \delta_t\rvert$, not clamped | ToR's perception score $P_t$ (arXiv:2603.25077) |
    | ``"positive"`` | $\max(-d_t, 0)$ | the log-probability the token loses on the view |

    ``k3_range`` is $[0, 10]$ for a rollout-policy reference (a signal) and $[-10, 10]$ for the
    current policy (a loss term, as [`kl_penalty`][vppo_core.kl_penalty]). Only the two log-probability
    tensors are needed, not the logits. Differentiable; detach before it feeds a mask or a weight.

    Shapes:
        - ``logprobs``, ``view_logprobs``, ``response_mask``: ``[batch, seq]`` (any shape, all equal)
        - returns: the same shape

    Args:
        logprobs: $\log p(o_t)$ of the sampled tokens on the original input.
        view_logprobs: $\log q(o_t)$ of the same tokens on the view.
        response_mask: Positions that count (others are exactly 0); ``None``: all.
        kind: One of the rows above.
        k3_range: Clamp of ``"k3"``.

    Returns:
        float32 (float64 for float64 input).

    Raises:
        ValueError: On a ``k3_range`` with ``low > high``.
        TypeError: On an unknown ``kind``, or a shape or dtype that does not match the annotation
            (jaxtyping).

    Example:
        >>> import torch
        >>> lp, lq = torch.tensor([[-0.1, -2.0, -1.0]]), torch.tensor([[-0.1, -4.0, -0.5]])
        >>> log_ratio_signal(lp, lq, kind="abs"), log_ratio_signal(lp, lq, kind="positive")
        (tensor([[0.0000, 2.0000, 0.5000]]), tensor([[0., 2., 0.]]))
    """
    check_choice("kind", kind, ("k1", "k2", "k3", "abs", "positive"))
    if not k3_range[0] <= k3_range[1]:
        raise ValueError(f"k3_range must be (low, high) with low <= high, got {k3_range!r}")
    check_same_device(logprobs=logprobs, view_logprobs=view_logprobs, response_mask=response_mask)
    dtype = result_dtype(logprobs, view_logprobs)
    delta = view_logprobs.to(dtype) - logprobs.to(dtype)
    d = delta.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "abs":  # a ranking score: a clamp would tie every token beyond 20 nats
        out = delta.abs()
    elif kind == "k1":
        out = 0.0 - d  # not -d: no negative zeros
    elif kind == "k2":
        out = 0.5 * d.square()
    elif kind == "k3":
        out = (torch.expm1(d) - d).clamp(*k3_range)
    else:
        out = (0.0 - d).clamp_min(0.0)
    return _masked(out, response_mask)
