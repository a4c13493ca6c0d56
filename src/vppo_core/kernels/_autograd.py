"""Autograd layer: Functions that save tensors and delegate to a backend's forward and backward.

Each Function saves its inputs (references, not copies) and the backend's float64 row statistics
(``[batch, seq, 4]`` for a divergence, ``[batch, seq, 2]`` for the entropy), so the backward reads every
input element once and recomputes no reduction.
The ``Fused*`` Functions serve the ``"compile"`` and ``"cpu"`` backends (``impl`` names the module:
`._compile` or `._cpu`). The Triton backend is a
``torch.library.custom_op`` (opaque to ``torch.compile``); its autograd formula is registered here
with ``torch.library.register_autograd``, the same save-and-delegate shape.

First derivatives only: every backward here is `first_order`, so differentiating a gradient taken
with ``create_graph=True`` raises instead of silently dropping the second-order term.
"""

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import _compile, _cpu, _hidden, _torch

FUSED = {"compile": _compile, "cpu": _cpu}

SECOND_ORDER_ERROR = (
    "vppo_core's full-vocabulary kernels (visual_dependency, token_entropy, visual_dependency_and_entropies, "
    "visual_dependency_from_hidden and what is built on them) have first derivatives only: a gradient taken "
    "through them with create_graph=True cannot be differentiated again (no Hessian-vector product or "
    "gradient penalty through them)"
)


class _FirstOrder(torch.autograd.Function):
    """Returns the first ``n`` tensors (gradients) unchanged; differentiating them w.r.t. any of the
    tensors (the inputs they were computed from) raises `SECOND_ORDER_ERROR`."""

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:
        raise RuntimeError(SECOND_ORDER_ERROR)


def first_order(backward: Callable[..., Any]) -> Callable[..., Any]:
    """A backward that computes without building a graph and whose gradients cannot be differentiated.

    ``torch.autograd.function.once_differentiable`` raises on a second differentiation only when the
    upstream gradients require grad, and its error node hangs off fresh leaves, so a second backward
    w.r.t. the logits never reaches it: the second-order term is silently dropped. Here, under
    ``create_graph=True`` (grad mode on inside the backward), the gradients go through `_FirstOrder`
    with the saved inputs and the upstream gradients that require grad as its inputs, so any second
    differentiation reaches its backward and raises.
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return out
        sources = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, Tensor) and t.requires_grad]
        outs = out if isinstance(out, tuple) else (out,)
        live = [i for i, o in enumerate(outs) if isinstance(o, Tensor)]
        if not sources or not live:
            return out
        guarded = _FirstOrder.apply(len(live), *(outs[i] for i in live), *sources)
        result = list(outs)
        for i, g in zip(live, guarded if isinstance(guarded, tuple) else (guarded,)):
            result[i] = g
        return tuple(result) if isinstance(out, tuple) else result[0]

    return wrapper


def _backward_fn(impl: str, fallback: bool, name: str) -> Callable[..., Any]:
    """The function ``name`` (``"backward"``, ...) of the ``impl`` backend; with ``fallback`` (``"compile"``
    chosen by ``backend="auto"``) one that runs `._torch`'s instead once compiling fails, as the forward
    does (`._compile.or_eager`: one warning, then eager for the rest of the process). ``"cpu"``'s
    backward is its C kernel."""
    if fallback and impl == "compile":
        return functools.partial(_compile.or_eager, getattr(_compile, name), getattr(_torch, name))
    return getattr(FUSED[impl], name)


class TorchDivergence(torch.autograd.Function):
    """Row-wise divergence with the chunked eager kernels (the fallback, and float64 for gradcheck)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, temperature: float, divergence: str) -> Tensor:
        value, stats = _torch.forward(x, y, temperature, divergence)
        ctx.save_for_backward(x, y, stats)
        ctx.temperature, ctx.divergence = temperature, divergence
        return value

    @staticmethod
    @first_order
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, y, stats = ctx.saved_tensors
        gx, gy = _torch.backward(grad, x, y, stats, ctx.temperature, ctx.divergence)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None, None)


class FusedDivergence(torch.autograd.Function):
    """Row-wise divergence with the ``impl`` backend (``"compile"``: traced into a caller's compiled graph)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, y: Tensor, temperature: float, divergence: str, impl: str, fallback: bool = False
    ) -> Tensor:
        value, stats = FUSED[impl].forward(x, y, temperature, divergence)
        ctx.save_for_backward(x, y, stats)
        ctx.temperature, ctx.divergence, ctx.impl, ctx.fallback = temperature, divergence, impl, fallback
        return value

    @staticmethod
    @first_order
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        x, y, stats = ctx.saved_tensors
        run = _backward_fn(ctx.impl, ctx.fallback, "backward")
        needs = {"needs": tuple(ctx.needs_input_grad[:2])} if ctx.impl == "cpu" else {}  # C: only those
        gx, gy = run(grad, x, y, stats, ctx.temperature, ctx.divergence, **needs)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, *[None] * 4)


class TorchEntropy(torch.autograd.Function):
    """Row-wise entropy with the chunked eager kernels (the fallback, and float64 for gradcheck)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, temperature: float) -> Tensor:
        value, stats = _torch.entropy_forward(x, temperature)
        ctx.save_for_backward(x, stats)
        ctx.temperature = temperature
        return value

    @staticmethod
    @first_order
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, stats = ctx.saved_tensors
        return _torch.entropy_backward(grad, x, stats, ctx.temperature), None


class FusedEntropy(torch.autograd.Function):
    """Row-wise entropy with the ``impl`` backend (``"compile"`` or ``"cpu"``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, temperature: float, impl: str, fallback: bool = False) -> Tensor:
        value, stats = FUSED[impl].entropy_forward(x, temperature)
        ctx.save_for_backward(x, stats)
        ctx.temperature, ctx.impl, ctx.fallback = temperature, impl, fallback
        return value

    @staticmethod
    @first_order
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, stats = ctx.saved_tensors
        run = _backward_fn(ctx.impl, ctx.fallback, "entropy_backward")
        return run(grad, x, stats, ctx.temperature), None, None, None


class TorchJoint(torch.autograd.Function):
    """KL and both entropies, ``[batch, seq, 3]``, with the chunked eager kernels."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, temperature: float) -> Tensor:
        values, stats = _torch.joint_forward(x, y, temperature)
        ctx.save_for_backward(x, y, stats)
        ctx.temperature = temperature
        return values

    @staticmethod
    @first_order
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, y, stats = ctx.saved_tensors
        gx, gy = _torch.joint_backward(grad, x, y, stats, ctx.temperature)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None)


class FusedJoint(torch.autograd.Function):
    """KL and both entropies, ``[batch, seq, 3]``, with the ``impl`` backend (``"compile"`` or ``"cpu"``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, temperature: float, impl: str, fallback: bool = False) -> Tensor:
        values, stats = FUSED[impl].joint_forward(x, y, temperature)
        ctx.save_for_backward(x, y, stats)
        ctx.temperature, ctx.impl, ctx.fallback = temperature, impl, fallback
        return values

    @staticmethod
    @first_order
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        x, y, stats = ctx.saved_tensors
        needs = {"needs": tuple(ctx.needs_input_grad[:2])} if ctx.impl == "cpu" else {}  # C: only those
        gx, gy = _backward_fn(ctx.impl, ctx.fallback, "joint_backward")(grad, x, y, stats, ctx.temperature, **needs)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None, None, None)


def _triton_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, y, inv_t, divergence = inputs
    ctx.save_for_backward(x, y, output[1])
    ctx.inv_t, ctx.divergence = inv_t, divergence
    ctx.mark_non_differentiable(output[1])


@first_order
def _triton_backward(ctx: Any, grad: Tensor, _grad_stats: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
    x, y, stats = ctx.saved_tensors
    gx, gy = triton_ops().divergence_bwd(x, y, stats, grad, ctx.inv_t, ctx.divergence)
    return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None, None)


def _triton_entropy_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, inv_t = inputs
    ctx.save_for_backward(x, output[1])
    ctx.inv_t = inv_t
    ctx.mark_non_differentiable(output[1])


@first_order
def _triton_entropy_backward(ctx: Any, grad: Tensor, _grad_stats: Tensor) -> tuple[Tensor, None]:
    x, stats = ctx.saved_tensors
    return triton_ops().entropy_bwd(x, stats, grad, ctx.inv_t), None


def _triton_joint_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, y, inv_t = inputs
    ctx.save_for_backward(x, y, output[1])
    ctx.inv_t = inv_t
    ctx.mark_non_differentiable(output[1])


@first_order
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
    @first_order
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
