"""Chunked eager PyTorch divergences over the vocabulary: the CPU fallback and the oracle's neighbour.

Inputs are ``[batch, seq, vocab]`` (any strides). Rows are processed ``chunk_rows`` at a time, so the
float32 temporaries (the upcast logits, ``p``, ``x - y``) exist for one chunk only and never for the
whole input; nothing is copied when a slice such as ``logits[:, -R - 1 : -1]`` is passed.

Every backend returns the value per row and four float64 statistics per row that the backward needs
(so it reads the inputs once more and never recomputes a reduction)::

    stats = (lse_x, lse_y, a_x, a_y)      with x = logits_img / T, y = logits_noimg / T
    kl:   a_x = sum_j p_j (x_j - y_j),                         KL  = a_x - (lse_x - lse_y)
    jsd:  a_x = sum_j p_j log(p_j / m_j), a_y = the same for q, JSD = (a_x + a_y) / 2,  m = (p + q) / 2
          (log(p/m) is formed as log(2p / (p + q)), so JSD(p, p) is exactly 0)

The statistics are float64 (``max + log(sum)`` of a log-sum-exp is added in float64): they are tiny,
and the logit-free path merges them across vocabulary tiles with ``e^{lse_tile - lse}``, whose
relative error would otherwise be ``eps_32 * |lse|`` (about 2e-6 for logits of size 20).

Gradients (``g`` the upstream gradient of the row)::

    kl:   dx_j = g p_j ((x_j - y_j) - a_x) / T          dy_j = g (q_j - p_j) / T
    jsd:  dx_j = g p_j (log(p_j / m_j) - a_x) / (2T)    dy_j = g q_j (log(q_j / m_j) - a_y) / (2T)

Entries with ``p_j = 0`` (``x_j = -inf``) contribute nothing, even where ``y_j = -inf`` too. Rows whose
upstream gradient is exactly zero (masked rows) get exactly zero gradient, whatever they hold.
"""

import torch
from torch import Tensor

from ._chunks import compute_dtype, default_chunk_rows, flatten_if_free, row_chunks

DIVERGENCES = ("kl", "jsd")  # reverse_kl is kl with the arguments swapped (done by the caller)


def _p_weighted(p: Tensor, v: Tensor) -> Tensor:
    # p_j v_j with 0 where p_j = 0 (there v may be -inf - -inf = nan); a NaN in a row still reaches
    # the result through the log-sum-exps.
    return torch.where(p > 0, p * v, 0.0)


def _log_ratios(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(log(p/m), log(q/m))`` with ``m = (p + q)/2``, as ``log(2p / (p + q))``: exactly 0 where
    ``p == q`` and finite for subnormal ``p`` (where ``(p + q)/2`` could round to 0)."""
    s = p + q
    return torch.log(2.0 * p / s), torch.log(2.0 * q / s)


def _lse64(x: Tensor) -> Tensor:
    """``logsumexp`` over the last axis, ``max + log(sum)`` added in float64 (see the module notes)."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # all -inf: log 0 = -inf; +inf or NaN: reaches the sum
    return m.double() + torch.exp(x - m).sum(-1, keepdim=True).double().log()


def _chunk_stats(xc: Tensor, yc: Tensor, inv_t: float, divergence: str) -> tuple[Tensor, Tensor]:
    """One chunk of rows -> (value, float64 stats[..., 4])."""
    dtype = compute_dtype(xc)
    x = xc.to(dtype) * inv_t
    y = yc.to(dtype) * inv_t
    lse_x, lse_y = _lse64(x), _lse64(y)
    p = torch.exp(x - lse_x.to(dtype))
    if divergence == "kl":
        a_x = _p_weighted(p, x - y).sum(-1).double()
        a_y = torch.zeros_like(a_x)
        value = a_x - (lse_x - lse_y).squeeze(-1)
    else:
        q = torch.exp(y - lse_y.to(dtype))
        rp, rq = _log_ratios(p, q)
        a_x = _p_weighted(p, rp).sum(-1).double()
        a_y = _p_weighted(q, rq).sum(-1).double()
        value = 0.5 * (a_x + a_y)
    return value, torch.stack([lse_x.squeeze(-1), lse_y.squeeze(-1), a_x, a_y], -1)


def forward(
    x: Tensor, y: Tensor, temperature: float, divergence: str = "kl", chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row divergence of ``[batch, seq, vocab]`` logits -> (``[batch, seq]``, stats ``[batch, seq, 4]``).

    float32 result (float64 for float64 inputs), clamped at 0 against rounding (NaN stays NaN);
    float64 statistics.
    """
    out = torch.empty(x.shape[:-1], dtype=compute_dtype(x), device=x.device)
    stats = torch.empty((*x.shape[:-1], 4), dtype=torch.float64, device=x.device)
    xf, yf = flatten_if_free(x), flatten_if_free(y)
    of, sf = out.view(1, -1), stats.view(1, -1, 4)
    if xf.shape[0] != 1 or yf.shape[0] != 1:  # one of the two could not be flattened
        xf, yf, of, sf = x, y, out, stats
    chunk_rows = chunk_rows or default_chunk_rows(x.shape[-1])
    for b, rows in row_chunks(xf.shape, chunk_rows):
        of[b, rows], sf[b, rows] = _chunk_stats(xf[b, rows], yf[b, rows], 1.0 / temperature, divergence)
    return out.clamp_min(0.0), stats


def chunk_grads(
    xc: Tensor, yc: Tensor, stats: Tensor, grad: Tensor, inv_t: float, divergence: str
) -> tuple[Tensor, Tensor]:
    """Gradients of one chunk of rows (any leading shape) in the compute dtype."""
    dtype = compute_dtype(xc)
    x = xc.to(dtype) * inv_t
    y = yc.to(dtype) * inv_t
    lse_x, lse_y, a_x, a_y = (s.to(dtype).unsqueeze(-1) for s in stats.unbind(-1))
    g = grad.to(dtype).unsqueeze(-1) * inv_t
    live = g != 0
    p, q = torch.exp(x - lse_x), torch.exp(y - lse_y)
    if divergence == "kl":
        gx = g * (_p_weighted(p, x - y) - p * a_x)
        gy = g * (q - p)
    else:
        rp, rq = _log_ratios(p, q)
        gx = 0.5 * g * (_p_weighted(p, rp) - p * a_x)
        gy = 0.5 * g * (_p_weighted(q, rq) - q * a_y)
    return torch.where(live & (p > 0), gx, 0.0), torch.where(live, gy, 0.0)


def backward(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    stats: Tensor,
    temperature: float,
    divergence: str = "kl",
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * D)`` w.r.t. the logits ``x`` and ``y``, in their dtypes."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    chunk_rows = chunk_rows or default_chunk_rows(x.shape[-1])
    for b, rows in row_chunks(x.shape, chunk_rows):
        grad_x[b, rows], grad_y[b, rows] = chunk_grads(
            x[b, rows], y[b, rows], stats[b, rows], grad[b, rows], 1.0 / temperature, divergence
        )
    return grad_x, grad_y


def jsd_partial(xc: Tensor, yc: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """``(sum_j p_j log(p_j/m_j), sum_j q_j log(q_j/m_j))`` over a vocabulary slice, given the full-row lse's.

    The logit-free path sums these over vocabulary chunks after a first sweep has found the lse's.
    """
    dtype = compute_dtype(xc)
    p = torch.exp(xc.to(dtype) * inv_t - lse_x.to(dtype).unsqueeze(-1))
    q = torch.exp(yc.to(dtype) * inv_t - lse_y.to(dtype).unsqueeze(-1))
    rp, rq = _log_ratios(p, q)
    return _p_weighted(p, rp).sum(-1), _p_weighted(q, rq).sum(-1)


def jsd_partial_chunked(
    x: Tensor, y: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: float, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """`jsd_partial` of ``[rows, vocab]`` logits, ``chunk_rows`` rows at a time (bounded temporaries)."""
    chunk_rows = chunk_rows or default_chunk_rows(x.shape[-1])
    parts = [
        jsd_partial(
            x[r : r + chunk_rows], y[r : r + chunk_rows], lse_x[r : r + chunk_rows], lse_y[r : r + chunk_rows], inv_t
        )
        for r in range(0, x.shape[0], chunk_rows)
    ]
    if not parts:
        empty = lse_x.new_zeros(0)
        return empty, empty
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
