"""Argument checks and masking shared by the signals."""

import torch
from torch import Tensor

from .._checks import as_bool_mask, check_positive, check_same_device


def _check_logits(name: str, logits: Tensor) -> None:
    if not 2 <= logits.ndim <= 3:
        raise ValueError(
            f"{name} must be [batch, seq, vocab] or [tokens, vocab], got {logits.ndim} dimensions "
            f"(shape {tuple(logits.shape)})"
        )


def _check_view_pair(logits_p: Tensor, logits_q: Tensor, response_mask: Tensor | None, temperature: float) -> None:
    """Argument checks of the two-view divergences, in their own argument names."""
    check_positive("temperature", temperature)
    _check_logits("logits_p", logits_p)
    if logits_p.dtype != logits_q.dtype:
        raise ValueError(f"logits_p and logits_q must have the same dtype, got {logits_p.dtype} and {logits_q.dtype}")
    check_same_device(logits_p=logits_p, logits_q=logits_q, response_mask=response_mask)


def _masked(values: Tensor, response_mask: Tensor | None) -> Tensor:
    return values if response_mask is None else torch.where(as_bool_mask(response_mask), values, 0.0)
