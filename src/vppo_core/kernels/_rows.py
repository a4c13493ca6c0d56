"""Shared by the ``"compile"`` and ``"cpu"`` backends: 2-D row views of ``[batch, seq, vocab]`` inputs
and the float64 finalisation of the row maxima and sums both compute (`._compile_cores`' traced block
reductions, `._cpu`'s C kernel) into values and the row statistics the backward reads.

Plain torch (traced into a caller's ``torch.compile`` graph as part of either backend).
"""

import math

import torch
from torch import Tensor

from . import _torch

# ----------------------------------------------------------------------------- row views


def unit_vocab_stride(t: Tensor) -> Tensor:
    """``t`` if its last (vocabulary) axis has unit stride, else a contiguous copy: what the kernels read."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _rows_flatten(t: Tensor) -> bool:
    """Whether ``[B, S, V]`` views as ``[B*S, V]`` without a copy."""
    return t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def row_views(*ts: Tensor) -> list[tuple[Tensor, ...]]:
    """``[B, S, V]`` tensors -> 2-D row views covering them in order: one each if all flatten, else per batch.

    The views are detached last, which drops their ``_base``: Dynamo would otherwise guard on the
    base tensor's sizes and strides and recompile for each new layout of the caller's tensor.
    """
    if ts[0].shape[0] == 0:  # no batch: one empty view (a per-batch list would be empty)
        return [tuple(t.reshape(0, t.shape[-1]).detach() for t in ts)]
    if all(_rows_flatten(t) for t in ts):
        return [tuple(t.view(-1, t.shape[-1]).detach() for t in ts)]
    return [tuple(t[b].detach() for t in ts) for b in range(ts[0].shape[0])]


# ----------------------------------------------------------------------------- float64 finalisation


def kl_sum(a_x: Tensor, lse_x: Tensor, lse_y: Tensor) -> Tensor:
    """``a_x = sum_j p_j (x_j - y_j)``, with NaN read as ``+inf`` where both log-sum-exps are finite.

    With finite normalisers (no NaN or ``+inf`` logit, a distribution on each side), a NaN sum can
    only be ``0 * inf``: a finite ``x_j`` whose ``e^{x_j - m}`` underflowed in float32 (or whose block
    weight did) against ``y_j = -inf``. Then ``q_j = 0 < p_j`` and ``KL(p || q) = +inf``, as the
    ``"torch"`` backend and float64 give.
    """
    return torch.where(a_x.isnan() & lse_x.isfinite() & lse_y.isfinite(), math.inf, a_x)


def finish_lse(
    mx: Tensor, sx: Tensor, d: Tensor, my: Tensor, sy: Tensor, inv_t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 ``(lse_x, lse_y, sum_j p_j (x_j - y_j) / T)`` from the row maxima and sums."""
    lse_x = mx.double() * inv_t + torch.log(sx.double())
    lse_y = my.double() * inv_t + torch.log(sy.double())
    return lse_x, lse_y, kl_sum(d.double() * inv_t / sx.double(), lse_x, lse_y)


def finish_hellinger(mx: Tensor, sx: Tensor, my: Tensor, sy: Tensor, b: Tensor, inv_t: Tensor) -> tuple[Tensor, ...]:
    """float64 ``(lse_x, lse_y, lse((x + y)/2))`` from the row maxima, sums and Bhattacharyya sum ``b``."""
    lse_x = mx.double() * inv_t + torch.log(sx.double())
    lse_y = my.double() * inv_t + torch.log(sy.double())
    lse_h = 0.5 * (mx.double() + my.double()) * inv_t + torch.log(b.double())
    return lse_x, lse_y, lse_h


def finish_entropy(m: Tensor, s: Tensor, d: Tensor, inv_t: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(entropy, float64 stats ``(lse, sum_j p_j x_j / T)``) from ``M, S, D = sum e^{(x - M)/T} (x - M)``."""
    s64, mean_shift = s.double(), d.double() * inv_t / s.double()
    value = torch.log(s64) - mean_shift
    stats = torch.stack([m.double() * inv_t + torch.log(s64), m.double() * inv_t + mean_shift], -1)
    return value.clamp_min(0.0).to(acc), stats


def finish_joint(
    sums: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], inv_t: Tensor, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(values ``(KL, H(p), H(q))``, float64 stats ``(lse_x, lse_y, a_x, b_x, b_y)``) from
    ``(M_x, S_x, D, M_y, S_y, H_x, H_y)``."""
    mx, sx, d, my, sy, hx, hy = sums
    sx64, sy64 = sx.double(), sy.double()
    mx64, my64 = mx.double() * inv_t, my.double() * inv_t
    lse_x, lse_y = mx64 + torch.log(sx64), my64 + torch.log(sy64)
    a_x = kl_sum(d.double() * inv_t / sx64, lse_x, lse_y)
    mean_x, mean_y = hx.double() * inv_t / sx64, hy.double() * inv_t / sy64
    values = torch.stack([a_x - (lse_x - lse_y), torch.log(sx64) - mean_x, torch.log(sy64) - mean_y], -1)
    stats = torch.stack([lse_x, lse_y, a_x, mx64 + mean_x, my64 + mean_y], -1)
    return values.clamp_min(0.0).to(acc), stats


def finish_divergence(divergence: str, lse: tuple[Tensor, Tensor, Tensor], acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(value, float64 stats ``[rows, 4]``) of the KL from `finish_lse`'s output, or of the squared
    Hellinger distance from `finish_hellinger`'s."""
    if divergence == "hellinger":
        stats = torch.stack([*lse, torch.zeros_like(lse[2])], -1)
        return _torch.hellinger_value(stats).clamp_min(0.0).to(acc), stats
    lse_x, lse_y, a_x = lse
    value = a_x - (lse_x - lse_y)
    return value.clamp_min(0.0).to(acc), torch.stack([lse_x, lse_y, a_x, torch.zeros_like(a_x)], -1)


def finish_jsd(lse_x: Tensor, lse_y: Tensor, a_x: Tensor, a_y: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(JSD, float64 stats ``(lse_x, lse_y, a_x, a_y)``) from the lse's and the second sweep's sums
    ``a_x = sum p log(p/m)``, ``a_y = sum q log(q/m)``."""
    a_x, a_y = a_x.double(), a_y.double()
    value = 0.5 * (a_x + a_y)
    return value.clamp_min(0.0).to(acc), torch.stack([lse_x, lse_y, a_x, a_y], -1)
