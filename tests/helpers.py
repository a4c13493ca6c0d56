"""Test helpers: input-purity checks and random batches."""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def clone_all(values: Iterable[Any]) -> list[Any]:
    return [v.detach().clone() if isinstance(v, Tensor) else v for v in values]


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def assert_inputs_unchanged(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and assert that no tensor argument was modified in place (NaN-aware, bitwise)."""
    before_args, before_kwargs = clone_all(args), dict(zip(kwargs, clone_all(kwargs.values())))
    out = fn(*args, **kwargs)
    for i, (a, b) in enumerate(zip(args, before_args)):
        if isinstance(a, Tensor):
            assert torch.equal(_bits(a), _bits(b)), f"argument {i} was modified in place"
    for k, b in before_kwargs.items():
        a = kwargs[k]
        if isinstance(a, Tensor):
            assert torch.equal(_bits(a), _bits(b)), f"argument {k} was modified in place"
    return out


def random_mask(batch: int, seq: int, *, p_empty_row: float = 0.2, left_pad: bool = False) -> Tensor:
    """Right- (or left-) padded response mask with random lengths; some rows may be empty."""
    lengths = torch.randint(0, seq + 1, (batch,))
    lengths[torch.rand(batch) < p_empty_row] = 0
    if batch:
        lengths[0] = seq  # at least one full row
    pos = torch.arange(seq)
    if left_pad:
        return pos.unsqueeze(0) >= (seq - lengths).unsqueeze(1)
    return pos.unsqueeze(0) < lengths.unsqueeze(1)
