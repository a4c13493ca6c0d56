"""``torch.autograd.Function`` wrappers: they save the inputs and delegate to a backend's kernels."""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _torch


class TorchKL(torch.autograd.Function):
    """Row-wise KL with the chunked eager kernels; the backward recomputes chunk by chunk."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, y)
        ctx.temperature = temperature
        return _torch.kl_forward(x, y, temperature)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        grad_x, grad_y = _torch.kl_backward(grad, x, y, ctx.temperature)
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_y if ctx.needs_input_grad[1] else None,
            None,
        )
