"""Shared pieces of the family recipes: the DAPO-style base loss and advantage broadcasting."""

from typing import Literal

from torch import Tensor

from .._checks import result_dtype
from ..loss import LossOutput, vppo_loss


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
