"""Autograd layer: Functions that save tensors and delegate to a backend's forward and backward.

Each Function saves its inputs (references, not copies) and the backend's float64 row statistics
(``[batch, seq, 4]`` for a divergence, ``[batch, seq, 2]`` for the entropy), so the backward reads every
input element once and recomputes no reduction.
The ``Fused*`` Functions serve the ``"compile"`` and ``"cpu"`` backends (``impl`` names the module:
`._compile` or `._cpu`, which share the backward). The Triton backend is a
``torch.library.custom_op`` (opaque to ``torch.compile``); its autograd formula is registered here
with ``torch.library.register_autograd``, the same save-and-delegate shape.
"""

from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _compile, _cpu, _hidden, _torch

FUSED = {"compile": _compile, "cpu": _cpu}


class TorchDivergence(torch.autograd.Function):
    """Row-wise divergence with the chunked eager kernels (the fallback, and float64 for gradcheck)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, temperature: float, divergence: str) -> Tensor:
        value, stats = _torch.forward(x, y, temperature, divergence)
        ctx.save_for_backward(x, y, stats)
        ctx.temperature, ctx.divergence = temperature, divergence
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, y, stats = ctx.saved_tensors
        gx, gy = _torch.backward(grad, x, y, stats, ctx.temperature, ctx.divergence)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None, None)


class FusedDivergence(torch.autograd.Function):
    """Row-wise divergence with the ``impl`` backend (``"compile"``: traced into a caller's compiled graph)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, temperature: float, divergence: str, impl: str) -> Tensor:
        value, stats = FUSED[impl].forward(x, y, temperature, divergence)
        ctx.save_for_backward(x, y, stats)
        ctx.temperature, ctx.divergence, ctx.impl = temperature, divergence, impl
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        x, y, stats = ctx.saved_tensors
        gx, gy = FUSED[ctx.impl].backward(grad, x, y, stats, ctx.temperature, ctx.divergence)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None, None, None)


class TorchEntropy(torch.autograd.Function):
    """Row-wise entropy with the chunked eager kernels (the fallback, and float64 for gradcheck)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, temperature: float) -> Tensor:
        value, stats = _torch.entropy_forward(x, temperature)
        ctx.save_for_backward(x, stats)
        ctx.temperature = temperature
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, stats = ctx.saved_tensors
        return _torch.entropy_backward(grad, x, stats, ctx.temperature), None


class FusedEntropy(torch.autograd.Function):
    """Row-wise entropy with the ``impl`` backend (``"compile"`` or ``"cpu"``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, temperature: float, impl: str) -> Tensor:
        value, stats = FUSED[impl].entropy_forward(x, temperature)
        ctx.save_for_backward(x, stats)
        ctx.temperature, ctx.impl = temperature, impl
        return value

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        x, stats = ctx.saved_tensors
        return FUSED[ctx.impl].entropy_backward(grad, x, stats, ctx.temperature), None, None


class TorchJoint(torch.autograd.Function):
    """KL and both entropies, ``[batch, seq, 3]``, with the chunked eager kernels."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, temperature: float) -> Tensor:
        values, stats = _torch.joint_forward(x, y, temperature)
        ctx.save_for_backward(x, y, stats)
        ctx.temperature = temperature
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, y, stats = ctx.saved_tensors
        gx, gy = _torch.joint_backward(grad, x, y, stats, ctx.temperature)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None)


class FusedJoint(torch.autograd.Function):
    """KL and both entropies, ``[batch, seq, 3]``, with the ``impl`` backend (``"compile"`` or ``"cpu"``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, temperature: float, impl: str) -> Tensor:
        values, stats = FUSED[impl].joint_forward(x, y, temperature)
        ctx.save_for_backward(x, y, stats)
        ctx.temperature, ctx.impl = temperature, impl
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, y, stats = ctx.saved_tensors
        gx, gy = FUSED[ctx.impl].joint_backward(grad, x, y, stats, ctx.temperature)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None, None)


def _triton_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, y, inv_t, divergence = inputs
    ctx.save_for_backward(x, y, output[1])
    ctx.inv_t, ctx.divergence = inv_t, divergence
    ctx.mark_non_differentiable(output[1])


def _triton_backward(ctx: Any, grad: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
    x, y, stats = ctx.saved_tensors
    gx, gy = triton_ops().divergence_bwd(x, y, stats, grad, ctx.inv_t, ctx.divergence)
    return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None, None)


def _triton_entropy_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, inv_t = inputs
    ctx.save_for_backward(x, output[1])
    ctx.inv_t = inv_t
    ctx.mark_non_differentiable(output[1])


def _triton_entropy_backward(ctx: Any, grad: Tensor, _grad_stats: Tensor) -> tuple[Tensor, None]:
    x, stats = ctx.saved_tensors
    return triton_ops().entropy_bwd(x, stats, grad, ctx.inv_t), None


def _triton_joint_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, y, inv_t = inputs
    ctx.save_for_backward(x, y, output[1])
    ctx.inv_t = inv_t
    ctx.mark_non_differentiable(output[1])


def _triton_joint_backward(ctx: Any, grad: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    x, y, stats = ctx.saved_tensors
    gx, gy = triton_ops().joint_bwd(x, y, stats, grad, ctx.inv_t)
    return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None)


_TRITON: list[ModuleType] = []


def triton_ops() -> ModuleType:
    """Import the Triton module (only when asked for: importing it reads ``TRITON_INTERPRET``) and
    register the autograd formula of its forward op, once per process.

    `vppo_core.kernels` calls this at import on machines where Triton can run, so that a
    caller's ``torch.compile`` never has to trace the import.
    """
    if not _TRITON:
        from . import _triton

        torch.library.register_autograd(
            "vppo_core::divergence_fwd", _triton_backward, setup_context=_triton_setup_context
        )
        torch.library.register_autograd(
            "vppo_core::entropy_fwd", _triton_entropy_backward, setup_context=_triton_entropy_setup_context
        )
        torch.library.register_autograd(
            "vppo_core::joint_fwd", _triton_joint_backward, setup_context=_triton_joint_setup_context
        )
        _TRITON.append(_triton)
    return _TRITON[0]


def triton_divergence(x: Tensor, y: Tensor, temperature: float, divergence: str) -> Tensor:
    ops = triton_ops()
    value, _ = ops.divergence_fwd(x, y, 1.0 / temperature, ops.div_code(divergence))
    return value


def triton_joint(x: Tensor, y: Tensor, temperature: float) -> Tensor:
    values, _ = triton_ops().joint_fwd(x, y, 1.0 / temperature)
    return values


def triton_entropy(x: Tensor, temperature: float) -> Tensor:
    value, _ = triton_ops().entropy_fwd(x, 1.0 / temperature)
    return value


class HiddenDivergence(torch.autograd.Function):
    """Logit-free divergence from hidden states; saves the hidden states, the weight and the row stats."""

    @staticmethod
    def forward(
        ctx: Any,
        hx: Tensor,
        hy: Tensor,
        weight: Tensor,
        temperature: float,
        divergence: str,
        ops: tuple[Any, Any, Any],
        token_chunk: int,
        vocab_chunk: int,
    ) -> Tensor:
        row_forward, row_backward, jsd_partial = ops
        value, stats = _hidden.forward(
            hx, hy, weight, temperature, divergence, row_forward, jsd_partial, token_chunk, vocab_chunk
        )
        ctx.save_for_backward(hx, hy, weight, stats)
        ctx.args = (temperature, divergence, row_backward, token_chunk, vocab_chunk)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hx, hy, weight, stats = ctx.saved_tensors
        temperature, divergence, row_backward, token_chunk, vocab_chunk = ctx.args
        dhx, dhy, dw = _hidden.backward(
            grad,
            hx,
            hy,
            weight,
            stats,
            temperature,
            divergence,
            row_backward,
            token_chunk,
            vocab_chunk,
            tuple(ctx.needs_input_grad[:3]),
        )
        return dhx, dhy, dw, None, None, None, None, None
