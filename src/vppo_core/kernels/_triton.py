"""Triton backend: launchers of the kernels in `._triton_kernels` and their ``torch.library.custom_op``
wrappers (so the kernels run inside a caller's ``torch.compile``).

Launch geometry: the forward kernels run one program per row (``BLOCK`` entries at a time along the
vocabulary, 4096 on a GPU and 256 under the CPU interpreter, whose cost grows with the block); the
backward kernels one program per (row, block of at most 2048). Rows come from the batch and sequence
strides (no copy); a vocabulary axis that is not contiguous is copied first.
"""

import contextlib
from typing import Any

import torch
import triton
from torch import Tensor

from ._rows import unit_vocab_stride
from ._triton_kernels import (
    _DIV,
    DIV_HELLINGER,
    DIV_JSD,
    DIV_KL,
    _bwd_kernel,
    _entropy_bwd_kernel,
    _entropy_fwd_kernel,
    _fwd_kernel,
    _joint_bwd_kernel,
    _joint_fwd_kernel,
)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_inv_t(inv_t: float) -> float:
    """``1/T`` as the kernels compute with it: rounded to float32.

    Triton passes a Python ``float`` argument as float32 on the GPU, while its CPU interpreter keeps
    it float64. Rounding here makes the interpreter compute what a GPU computes, and lets a pass
    paired with the kernels (the logit-free JSD's second sweep, which meets the kernels' ``lse``)
    use the same value; a float64 ``1/T`` there against the kernels' float32 one put an error of
    ``|x|/T * 2^-24`` into every exponent (1.6e-5 in the JSD at logits near 1000).
    """
    return torch.tensor(inv_t, dtype=torch.float32).item()


def _device(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """The CUDA device of ``t`` made current for a launch: Triton launches on the current device
    (and its stream), not on the tensors' (logits on ``cuda:1`` with device 0 current would fail)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _block(vocab: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(vocab)))


def _fwd_block(vocab: int) -> int:
    # Small blocks under the CPU interpreter: its cost grows with the block, not the loop count.
    return _block(vocab, 256 if _interpreting() else 4096)


def _bwd_block(vocab: int) -> int:
    return _block(vocab, 256 if _interpreting() else 2048)


def _launch(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], inv_t: float, **constexprs: int) -> None:
    """``kernel[grid](*args, 1/T, **constexprs)`` on the device of ``args[0]``, with the kernels' float32
    ``1/T`` (`kernel_inv_t`) and 8 warps: the one place every launcher goes through."""
    with _device(args[0]):
        kernel[grid](*args, kernel_inv_t(inv_t), num_warps=8, **constexprs)


def _pair_forward(
    kernel: Any, x: Tensor, y: Tensor, inv_t: float, values: tuple[int, ...], n_stats: int, **constexprs: int
) -> tuple[Tensor, Tensor]:
    """Launch a two-input forward ``kernel``, one program per row: (float32 values ``[batch, seq, *values]``,
    float64 stats ``[batch, seq, n_stats]``)."""
    x, y = unit_vocab_stride(x), unit_vocab_stride(y)
    batch, seq, vocab = x.shape
    out = torch.empty((batch, seq, *values), dtype=torch.float32, device=x.device)
    stats = torch.empty((batch, seq, n_stats), dtype=torch.float64, device=x.device)
    if batch * seq == 0:
        return out, stats
    strides = (x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    _launch(
        kernel, (batch * seq,), (x, y, out, stats, seq, vocab, *strides), inv_t, BLOCK=_fwd_block(vocab), **constexprs
    )
    return out, stats


def _pair_backward(
    kernel: Any, x: Tensor, y: Tensor, stats: Tensor, grad: Tensor, inv_t: float, **constexprs: int
) -> tuple[Tensor, Tensor]:
    """Launch a two-input backward ``kernel``, one program per (row, block): the gradients w.r.t. ``x``
    and ``y`` (contiguous, in their dtypes)."""
    x, y = unit_vocab_stride(x), unit_vocab_stride(y)
    batch, seq, vocab = x.shape
    gx = torch.empty((batch, seq, vocab), dtype=x.dtype, device=x.device)
    gy = torch.empty((batch, seq, vocab), dtype=y.dtype, device=y.device)
    if batch * seq == 0 or vocab == 0:
        return gx, gy
    block = _bwd_block(vocab)
    args = (
        x,
        y,
        stats.contiguous(),
        grad.contiguous(),
        gx,
        gy,
        seq,
        vocab,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
    )
    _launch(kernel, (batch * seq, triton.cdiv(vocab, block)), args, inv_t, BLOCK=block, **constexprs)
    return gx, gy


def launch_forward(x: Tensor, y: Tensor, inv_t: float, divergence: int) -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (float32 value ``[batch, seq]``, float64 stats ``[batch, seq, 4]``)."""
    return _pair_forward(_fwd_kernel, x, y, inv_t, (), 4, DIV=divergence)


def launch_backward(
    x: Tensor, y: Tensor, stats: Tensor, grad: Tensor, inv_t: float, divergence: int
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``x`` and ``y`` (contiguous, in their dtypes)."""
    return _pair_backward(_bwd_kernel, x, y, stats, grad, inv_t, DIV=divergence)


def launch_joint_forward(x: Tensor, y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (float32 (KL, H(p), H(q)) ``[batch, seq, 3]``, float64 stats ``[batch, seq, 5]``)."""
    return _pair_forward(_joint_fwd_kernel, x, y, inv_t, (3,), 5)


def launch_joint_backward(x: Tensor, y: Tensor, stats: Tensor, grad: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``x`` and ``y`` of ``sum(grad * (KL, H(p), H(q)))`` (contiguous, in their dtypes)."""
    return _pair_backward(_joint_bwd_kernel, x, y, stats, grad, inv_t)


def launch_entropy_forward(x: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (float32 entropy ``[batch, seq]``, float64 stats ``[batch, seq, 2]``)."""
    x = unit_vocab_stride(x)
    batch, seq, vocab = x.shape
    out = torch.empty((batch, seq), dtype=torch.float32, device=x.device)
    stats = torch.empty((batch, seq, 2), dtype=torch.float64, device=x.device)
    if batch * seq == 0:
        return out, stats
    args = (x, out, stats, seq, vocab, x.stride(0), x.stride(1))
    _launch(_entropy_fwd_kernel, (batch * seq,), args, inv_t, BLOCK=_fwd_block(vocab))
    return out, stats


def launch_entropy_backward(x: Tensor, stats: Tensor, grad: Tensor, inv_t: float) -> Tensor:
    """Gradient w.r.t. ``x`` (contiguous, in its dtype)."""
    x = unit_vocab_stride(x)
    batch, seq, vocab = x.shape
    gx = torch.empty((batch, seq, vocab), dtype=x.dtype, device=x.device)
    if batch * seq == 0 or vocab == 0:
        return gx
    block = _bwd_block(vocab)
    args = (x, stats.contiguous(), grad.contiguous(), gx, seq, vocab, x.stride(0), x.stride(1))
    _launch(_entropy_bwd_kernel, (batch * seq, triton.cdiv(vocab, block)), args, inv_t, BLOCK=block)
    return gx


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("vppo_core::divergence_fwd", mutates_args=())
def divergence_fwd(x: Tensor, y: Tensor, inv_t: float, divergence: int) -> tuple[Tensor, Tensor]:
    """Opaque to ``torch.compile``: the launcher above on ``[batch, seq, vocab]`` inputs."""
    return launch_forward(x, y, inv_t, divergence)


@divergence_fwd.register_fake
def _(x: Tensor, y: Tensor, inv_t: float, divergence: int) -> tuple[Tensor, Tensor]:
    batch, seq, _ = x.shape
    return x.new_empty((batch, seq), dtype=torch.float32), x.new_empty((batch, seq, 4), dtype=torch.float64)


@torch.library.custom_op("vppo_core::divergence_bwd", mutates_args=())
def divergence_bwd(
    x: Tensor, y: Tensor, stats: Tensor, grad: Tensor, inv_t: float, divergence: int
) -> tuple[Tensor, Tensor]:
    return launch_backward(x, y, stats, grad, inv_t, divergence)


@divergence_bwd.register_fake
def _(x: Tensor, y: Tensor, stats: Tensor, grad: Tensor, inv_t: float, divergence: int) -> tuple[Tensor, Tensor]:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(y.shape, dtype=y.dtype, device=y.device)


@torch.library.custom_op("vppo_core::entropy_fwd", mutates_args=())
def entropy_fwd(x: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """Opaque to ``torch.compile``: the entropy launcher on ``[batch, seq, vocab]`` logits."""
    return launch_entropy_forward(x, inv_t)


@entropy_fwd.register_fake
def _(x: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    batch, seq, _ = x.shape
    return x.new_empty((batch, seq), dtype=torch.float32), x.new_empty((batch, seq, 2), dtype=torch.float64)


@torch.library.custom_op("vppo_core::entropy_bwd", mutates_args=())
def entropy_bwd(x: Tensor, stats: Tensor, grad: Tensor, inv_t: float) -> Tensor:
    return launch_entropy_backward(x, stats, grad, inv_t)


@entropy_bwd.register_fake
def _(x: Tensor, stats: Tensor, grad: Tensor, inv_t: float) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("vppo_core::joint_fwd", mutates_args=())
def joint_fwd(x: Tensor, y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """Opaque to ``torch.compile``: KL and both entropies of ``[batch, seq, vocab]`` logits."""
    return launch_joint_forward(x, y, inv_t)


@joint_fwd.register_fake
def _(x: Tensor, y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    batch, seq, _ = x.shape
    return x.new_empty((batch, seq, 3), dtype=torch.float32), x.new_empty((batch, seq, 5), dtype=torch.float64)


@torch.library.custom_op("vppo_core::joint_bwd", mutates_args=())
def joint_bwd(x: Tensor, y: Tensor, stats: Tensor, grad: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    return launch_joint_backward(x, y, stats, grad, inv_t)


@joint_bwd.register_fake
def _(x: Tensor, y: Tensor, stats: Tensor, grad: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(y.shape, dtype=y.dtype, device=y.device)


def div_code(divergence: str) -> int:
    return _DIV[divergence]


# the ops and the divergence codes their ``divergence`` argument takes
__all__ = [
    "DIV_HELLINGER",
    "DIV_JSD",
    "DIV_KL",
    "div_code",
    "divergence_bwd",
    "divergence_fwd",
    "entropy_bwd",
    "entropy_fwd",
    "joint_bwd",
    "joint_fwd",
]
