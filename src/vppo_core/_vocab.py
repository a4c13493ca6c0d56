"""Chunked full-vocabulary signals not (yet) in the fused kernels: squared Hellinger distance and top-p entropy.

Written like ``entropy.py`` and ``kernels/_torch.py``: rows are processed ``chunk_rows`` at a time, in
float32 (float64 for float64 input), so no float32 copy of the whole ``[batch, seq, vocab]`` input is
ever alive; the Hellinger ``autograd.Function`` saves the logits (no copy) and recomputes each chunk in
its backward. The chunk maths lives in small functions (``_hellinger_chunk``, ``_hellinger_grad_chunk``,
``_top_p_entropy_chunk``) so that a fused kernel can replace them.

For one row, with ``x = logits_p / T``, ``y = logits_q / T`` and ``m = (x + y) / 2``::

    log BC    = lse(m) - (lse(x) + lse(y)) / 2          (Bhattacharyya coefficient BC = sum_j sqrt(p_j q_j))
    H^2       = 1 - BC = -expm1(log BC)
    dH^2/dx_j = BC (p_j - r_j) / (2 T),   dH^2/dy_j = BC (q_j - r_j) / (2 T),   r = softmax(m)

Entries that are ``-inf`` in either input have ``sqrt(p_j q_j) = 0`` and contribute nothing.
"""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .kernels._chunks import compute_dtype, default_chunk_rows, flatten_if_free, flatten_pair, row_chunks

# ----------------------------------------------------------------------------- Hellinger


def _hellinger_chunk(x: Tensor, y: Tensor, inv_t: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Upcast and scale one chunk; return ``(H^2, x, y, lse terms)`` with ``lse = (lse_x, lse_y, lse_m)``."""
    dtype = compute_dtype(x)
    x = x.to(dtype) * inv_t
    y = y.to(dtype) * inv_t
    lse_x = torch.logsumexp(x, -1, keepdim=True)
    lse_y = torch.logsumexp(y, -1, keepdim=True)
    lse_m = torch.logsumexp(0.5 * (x + y), -1, keepdim=True)
    log_bc = lse_m - 0.5 * (lse_x + lse_y)
    h2 = -torch.expm1(log_bc.squeeze(-1))
    return h2, x, y, torch.cat([lse_x, lse_y, lse_m], -1)


def _hellinger_grad_chunk(grad: Tensor, x: Tensor, y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * H^2)`` for one chunk, in the inputs' dtypes; zero where ``grad`` is zero."""
    h2, xc, yc, lse = _hellinger_chunk(x, y, inv_t)
    lse_x, lse_y, lse_m = lse.unbind(-1)
    bc = (1.0 - h2).unsqueeze(-1)
    p = torch.exp(xc - lse_x.unsqueeze(-1))
    q = torch.exp(yc - lse_y.unsqueeze(-1))
    r = torch.exp(0.5 * (xc + yc) - lse_m.unsqueeze(-1))
    up = grad.to(xc.dtype).unsqueeze(-1)
    live = up != 0  # before multiplying by BC, which is NaN in a masked row holding NaN
    g = up * (0.5 * inv_t) * bc
    gx = torch.where(live & (p > 0), g * (p - r), 0.0)
    gy = torch.where(live & (q > 0), g * (q - r), 0.0)
    return gx.to(x.dtype), gy.to(y.dtype)


def hellinger_forward(x: Tensor, y: Tensor, temperature: float, rows: int | None = None) -> Tensor:
    """Per-row squared Hellinger distance of ``[batch, seq, vocab]`` logits -> ``[batch, seq]``, in ``[0, 1]``."""
    out = torch.empty(x.shape[:-1], dtype=compute_dtype(x), device=x.device)
    xr, yr = flatten_pair(x, y)
    o = out.view(xr.shape[:-1])
    rows = rows or default_chunk_rows(x.shape[-1])
    for b, sl in row_chunks(xr.shape, rows):
        o[b, sl] = _hellinger_chunk(xr[b, sl], yr[b, sl], 1.0 / temperature)[0]
    return out.clamp(0.0, 1.0) + 0.0  # rounding (and -0 from -expm1(0)); NaN stays NaN


def hellinger_backward(
    grad: Tensor, x: Tensor, y: Tensor, temperature: float, rows: int | None = None
) -> tuple[Tensor, Tensor]:
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    xr, yr = flatten_pair(x, y)
    gr, gxr, gyr = grad.reshape(xr.shape[:-1]), grad_x.view(xr.shape), grad_y.view(yr.shape)
    rows = rows or default_chunk_rows(x.shape[-1])
    for b, sl in row_chunks(xr.shape, rows):
        gxr[b, sl], gyr[b, sl] = _hellinger_grad_chunk(gr[b, sl], xr[b, sl], yr[b, sl], 1.0 / temperature)
    return grad_x, grad_y


class SquaredHellinger(torch.autograd.Function):
    """Chunked squared Hellinger distance; saves the logits and recomputes each chunk in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, y)
        ctx.temperature = temperature
        return hellinger_forward(x, y, temperature)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        gx, gy = hellinger_backward(grad, x, y, ctx.temperature)
        return (gx if ctx.needs_input_grad[0] else None, gy if ctx.needs_input_grad[1] else None, None)


# ----------------------------------------------------------------------------- top-p entropy


def _top_p_entropy_chunk(x: Tensor, inv_t: float, top_p: float) -> Tensor:
    """Entropy of the renormalised nucleus of each row of one chunk.

    The nucleus is the smallest set of most probable tokens whose mass reaches ``top_p``: sorted by
    probability, token ``j`` is kept while the mass before it is ``< top_p`` (the first token always).
    With ``s`` the kept mass, ``H = log s - sum_kept p_j log p_j / s``.
    """
    z = x.to(compute_dtype(x)) * inv_t
    logp = torch.log_softmax(z, dim=-1)
    sorted_logp = torch.sort(logp, dim=-1, descending=True).values
    p = sorted_logp.exp()
    before = torch.cumsum(p, -1) - p
    keep = (before < top_p) & (sorted_logp != float("-inf"))
    keep[..., 0] = True
    mass = torch.where(keep, p, 0.0).sum(-1)
    plogp = torch.where(keep & (p > 0), p * sorted_logp, 0.0).sum(-1)
    return torch.log(mass) - plogp / mass


def top_p_entropy_forward(x: Tensor, temperature: float, top_p: float, rows: int | None = None) -> Tensor:
    """Per-row top-``p`` entropy of ``[batch, seq, vocab]`` logits -> ``[batch, seq]`` (no gradient)."""
    out = torch.empty(x.shape[:-1], dtype=compute_dtype(x), device=x.device)
    xr = flatten_if_free(x)
    o = out.view(xr.shape[:-1])
    rows = rows or max(1, default_chunk_rows(x.shape[-1]) // 2)  # the sort keeps a second buffer alive
    with torch.no_grad():
        for b, sl in row_chunks(xr.shape, rows):
            o[b, sl] = _top_p_entropy_chunk(xr[b, sl], 1.0 / temperature, top_p)
    return out.clamp_min(0.0)
