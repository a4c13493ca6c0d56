"""Argument checks and masking shared by the signals."""

import torch
from torch import Tensor

from .._checks import as_bool_mask


def _check_logits(name: str, logits: Tensor) -> None:
    if not 2 <= logits.ndim <= 3:
        raise ValueError(
            f"{name} must be [batch, seq, vocab] or [tokens, vocab], got {logits.ndim} dimensions "
            f"(shape {tuple(logits.shape)})"
        )


def _masked(values: Tensor, response_mask: Tensor | None) -> Tensor:
    return values if response_mask is None else torch.where(as_bool_mask(response_mask), values, 0.0)
