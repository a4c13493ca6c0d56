"""Chunked eager PyTorch KL over the vocabulary: the CPU fallback and the oracle's neighbour.

Inputs are ``[batch, seq, vocab]`` (any strides). Rows are processed ``chunk_rows`` at a time, so the
float32 temporaries (the upcast logits, ``p``, ``x - y``) exist for one chunk only and never for the
whole input; nothing is copied when a slice such as ``logits[:, -R - 1 : -1]`` is passed.

For one row, with ``x = logits_img / T`` and ``y = logits_noimg / T``::

    KL(p || q) = sum_j p_j (x_j - y_j) - (lse(x) - lse(y))
    dKL/dx_j   = p_j ((x_j - y_j) - sum_i p_i (x_i - y_i)) / T
    dKL/dy_j   = (q_j - p_j) / T

Entries with ``p_j = 0`` (``x_j = -inf``) contribute nothing, even where ``y_j = -inf`` too.
"""

from collections.abc import Iterator

import torch
from torch import Tensor

# Float32 bytes of one upcast chunk buffer; ~6 such buffers are live at once.
CHUNK_BYTES = 32 * 2**20


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flatten_if_free(t: Tensor) -> Tensor:
    """``[B, S, V]`` -> ``[1, B*S, V]`` when that is a view (longer chunks, fewer Python steps)."""
    try:
        return t.view(1, -1, t.shape[-1])
    except RuntimeError:
        return t


def _chunks(shape: torch.Size, chunk_rows: int) -> Iterator[tuple[int, slice]]:
    batch, seq = shape[0], shape[1]
    for b in range(batch):
        for s in range(0, seq, chunk_rows):
            yield b, slice(s, s + chunk_rows)


def _row_stats(x: Tensor, y: Tensor, inv_t: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Upcast and scale one chunk; return (x, y, p, lse_x, lse_y)."""
    dtype = compute_dtype(x)
    x = x.to(dtype) * inv_t
    y = y.to(dtype) * inv_t
    lse_x = torch.logsumexp(x, dim=-1, keepdim=True)
    lse_y = torch.logsumexp(y, dim=-1, keepdim=True)
    return x, y, torch.exp(x - lse_x), lse_x, lse_y


def _p_weighted_diff(p: Tensor, x: Tensor, y: Tensor) -> Tensor:
    # p_j (x_j - y_j), with 0 where p_j = 0 (there x - y may be -inf - -inf = nan).
    # A NaN anywhere in a row still reaches the result through lse(x) or lse(y).
    return torch.where(p > 0, p * (x - y), 0.0)


def kl_forward(x: Tensor, y: Tensor, temperature: float, chunk_rows: int | None = None) -> Tensor:
    """Per-row KL(softmax(x/T) || softmax(y/T)) of ``[batch, seq, vocab]`` logits -> ``[batch, seq]``.

    float32 result (float64 for float64 inputs), clamped at 0 against rounding (NaN stays NaN).
    """
    out = torch.empty(x.shape[:-1], dtype=compute_dtype(x), device=x.device)
    xf, yf, of = _flatten_if_free(x), _flatten_if_free(y), out.view(-1).unsqueeze(0)
    if xf.ndim != 3 or xf.shape[0] != 1 or yf.shape[0] != 1:  # one of the two could not be flattened
        xf, yf, of = x, y, out
    chunk_rows = chunk_rows or default_chunk_rows(x.shape[-1])
    inv_t = 1.0 / temperature
    for b, rows in _chunks(xf.shape, chunk_rows):
        xc, yc, p, lse_x, lse_y = _row_stats(xf[b, rows], yf[b, rows], inv_t)
        of[b, rows] = _p_weighted_diff(p, xc, yc).sum(-1) - (lse_x - lse_y).squeeze(-1)
    return out.clamp_min(0.0)


def kl_backward(
    grad: Tensor, x: Tensor, y: Tensor, temperature: float, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * KL)`` w.r.t. the logits ``x`` and ``y``, in their dtypes.

    Rows whose upstream gradient is exactly zero (masked rows) get exactly zero gradient, whatever
    their logits hold.
    """
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    chunk_rows = chunk_rows or default_chunk_rows(x.shape[-1])
    inv_t = 1.0 / temperature
    for b, rows in _chunks(x.shape, chunk_rows):
        xc, yc, p, _, lse_y = _row_stats(x[b, rows], y[b, rows], inv_t)
        q = torch.exp(yc - lse_y)
        g = grad[b, rows].to(xc.dtype).unsqueeze(-1) * inv_t
        pd = _p_weighted_diff(p, xc, yc)
        live = g != 0
        grad_x[b, rows] = torch.where(live & (p > 0), g * (pd - p * pd.sum(-1, keepdim=True)), 0.0)
        grad_y[b, rows] = torch.where(live, g * (q - p), 0.0)
    return grad_x, grad_y
