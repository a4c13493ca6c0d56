"""Chunked eager PyTorch kernels over the vocabulary: the CPU fallback and the oracle's neighbour.

Inputs are ``[batch, seq, vocab]`` (any strides). Rows are processed ``chunk_rows`` at a time, so the
float32 temporaries (the upcast logits, ``p``, ``x - y``) exist for one chunk only and never for the
whole input; nothing is copied when a slice such as ``logits[:, -R - 1 : -1]`` is passed.

Every backend returns the value per row and a few float64 statistics per row that the backward needs
(so it reads the inputs once more and never recomputes a reduction). Divergences of two inputs keep
four, with ``x = logits_img / T``, ``y = logits_noimg / T``, ``p = softmax(x)``, ``q = softmax(y)``::

    stats = (lse_x, lse_y, a_x, a_y)
    kl:        a_x = sum_j p_j (x_j - y_j),                         KL  = a_x - (lse_x - lse_y)
    jsd:       a_x = sum_j p_j log(p_j / m_j), a_y = the same for q, JSD = (a_x + a_y) / 2,  m = (p + q) / 2
               (log(p/m) is formed as log(2p / (p + q)), so JSD(p, p) is exactly 0)
    hellinger: a_x = lse((x + y) / 2), a_y = 0,    H^2 = 1 - BC = -expm1(log BC),
               log BC = lse((x + y) / 2) - (lse_x + lse_y) / 2     (BC = sum_j sqrt(p_j q_j))

The entropy of one input keeps two, ``(lse_x, a = sum_j p_j x_j)``, and ``H = lse_x - a``; it is
computed shifted by the row maximum ``M``, ``H = lse(x - M) - sum_j p_j (x_j - M)``, so that no
rounding proportional to ``|x|`` enters. Hellinger's ``lse((x + y)/2)`` is formed the same way, as
``(M_x + M_y)/2 + log sum_j sqrt(e^{x_j - M_x} e^{y_j - M_y})``.

The statistics are float64 (``max + log(sum)`` of a log-sum-exp is added in float64): they are tiny,
and the logit-free path merges them across vocabulary tiles with ``e^{lse_tile - lse}``, whose
relative error would otherwise be ``eps_32 * |lse|`` (about 2e-6 for logits of size 20).

Gradients (``g`` the upstream gradient of the row)::

    kl:        dx_j = g p_j ((x_j - y_j) - a_x) / T          dy_j = g (q_j - p_j) / T
    jsd:       dx_j = g p_j (log(p_j / m_j) - a_x) / (2T)    dy_j = g q_j (log(q_j / m_j) - a_y) / (2T)
    hellinger: dx_j = g (BC p_j - sqrt(p_j q_j)) / (2T)      dy_j = g (BC q_j - sqrt(p_j q_j)) / (2T)
    entropy:   dx_j = -g p_j (x_j - a) / T

(Hellinger: ``d log BC / dx_j = (r_j - p_j) / 2`` with ``r = softmax((x + y) / 2) = sqrt(p q) / BC``.)
Entries with ``p_j = 0`` (``x_j = -inf``) contribute nothing, even where ``y_j = -inf`` too. Rows whose
upstream gradient is exactly zero (masked rows) get exactly zero gradient, whatever they hold.
"""

import math

import torch
from torch import Tensor

from ._chunks import compute_dtype, default_chunk_rows, flatten_if_free, row_chunks

DIVERGENCES = ("kl", "jsd", "hellinger")  # reverse_kl is kl with the arguments swapped (done by the caller)


def _resolve_vml_dispatch() -> None:
    """One single-threaded call of each MKL VML function these kernels use, at import.

    oneMKL picks a VML kernel lazily, on the first call; when that first call comes from several
    intra-op threads at once, one thread's share can run a low-accuracy kernel (pytorch/pytorch#188792).
    Measured on torch 2.13 with 2 threads: in about one process in six, the first ``torch.exp`` of a
    ``[8, 301]`` float32 tensor had a relative error of 3e-5 on the second thread's half. A 1-element
    call first resolves the dispatch; later calls are unaffected.
    """
    for dtype in (torch.float32, torch.float64):
        one = torch.ones(1, dtype=dtype)
        torch.exp(one), torch.expm1(one), torch.log(one), torch.sqrt(one)


_resolve_vml_dispatch()


def _p_weighted(p: Tensor, v: Tensor) -> Tensor:
    # p_j v_j with 0 where p_j = 0 (there v may be -inf - -inf = nan), except v_j = +inf: a finite x_j
    # whose p_j underflowed in float32 against y_j = -inf still makes KL(p || q) infinite, as in float64.
    # A NaN p_j (a +inf or NaN logit) stays NaN: it must not be dropped as if it were 0.
    return torch.where(p == 0, torch.where(v == math.inf, math.inf, 0.0), p * v)


def _probs(x: Tensor, lse: Tensor, inv_t: float | Tensor) -> Tensor:
    """``exp(x/T - lse)`` of raw (unscaled) logits ``x`` in the compute dtype, ``lse`` float64 and scaled.

    Shifted before it is scaled, as the forward passes are: with ``k = lse * T`` rounded to ``x``'s
    dtype, ``x - k`` is exact for the largest entries (Sterbenz) and the float64 remainder
    ``lse - k / T`` is small, so ``p`` keeps the dtype's relative accuracy however large ``|x|/T`` is.
    ``exp(x / T - float32(lse))`` instead carries an absolute error of ``eps * |lse|`` in the
    exponent (1e-3 at ``|x|/T`` = 1e4), and an ``x / T`` rounded apart from the ``lse`` can even give
    ``p > 1``. An infinite or NaN ``lse`` is used as is (no remainder).
    """
    return torch.exp(_centred(x, lse, inv_t))


def _lse_gap(lse_x: Tensor, lse_y: Tensor) -> Tensor:
    """``lse_x - lse_y`` (float64), 0 where either is not finite: the KL's centre for `_centred`."""
    return torch.where(torch.isfinite(lse_x) & torch.isfinite(lse_y), lse_x - lse_y, 0.0)


def _split(centre: Tensor, inv_t: float | Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(k, rest)`` with ``centre = k/T + rest``: ``k = centre * T`` rounded to ``dtype`` and the float64
    remainder (0 where ``centre`` is not finite)."""
    k = (centre / inv_t).to(dtype)
    return k, torch.where(torch.isfinite(centre), centre - k.to(centre.dtype) * inv_t, 0.0)


def _centred(x: Tensor, centre: Tensor, inv_t: float | Tensor) -> Tensor:
    """``x/T - centre`` of raw values ``x`` in the compute dtype and a float64 ``centre`` in scaled units,
    formed as `_probs` forms its exponent: ``(x - k)/T - (centre - k/T)`` with ``k = centre * T`` in
    ``x``'s dtype, exact where ``x`` is near ``k``."""
    k, rest = _split(centre, inv_t, x.dtype)
    return (x - k) * inv_t - rest.to(x.dtype)


def _log_ratio(dx: Tensor, dy: Tensor, r_x: Tensor, r_y: Tensor, inv_t: float | Tensor) -> Tensor:
    """``log(p_j/q_j) = (x_j - y_j)/T - (lse_x - lse_y)`` as ``(dx_j - dy_j)/T - (r_x - r_y)``, from each lse
    split as `_probs` splits it (``dx = x - k_x``, float64 remainder ``r_x``; the same for ``y``):
    ``dx_j`` and ``dy_j`` are exact near each row's top, so neither an offset between the two inputs
    (``x_j - y_j`` would round to ``eps |x_j - y_j|``) nor a large ``|x|/T`` enters."""
    return (dx - dy) * inv_t - (r_x - r_y).to(dx.dtype)


def _log_ratios(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(log(p/m), log(q/m))`` with ``m = (p + q)/2``, as ``log(2p / (p + q))``: exactly 0 where
    ``p == q`` and finite for subnormal ``p`` (where ``(p + q)/2`` could round to 0)."""
    s = p + q
    return torch.log(2.0 * p / s), torch.log(2.0 * q / s)


def _finite_max(x: Tensor) -> Tensor:
    """Row maximum, replaced by 0 where it is not finite (all -inf: log 0 = -inf; +inf or NaN: reaches the sum)."""
    m = x.amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, 0.0)


def _softmax64(x: Tensor, inv_t: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(lse, p, M)`` of raw logits ``x`` at temperature ``1 / inv_t``: float64 ``lse = M/T + log s``
    (``[..., 1]``, added in float64, see the module notes) and ``p = e / s``, with ``e = exp((x - M)/T)``
    shifted before it is scaled (no rounding proportional to ``|x|/T``, as in `_probs`); ``M`` is the
    row maximum it shifted by (`_finite_max`)."""
    m = _finite_max(x)
    e = torch.exp((x - m) * inv_t)
    s = e.sum(-1, keepdim=True)
    return m.double() * inv_t + s.double().log(), e / s, m


def hellinger_value(stats: Tensor) -> Tensor:
    """``H^2 = -expm1(log BC)`` from float64 ``[..., 4]`` statistics (``+0`` for identical inputs, never ``-0``)."""
    return 0.0 - torch.expm1(stats[..., 2] - 0.5 * (stats[..., 0] + stats[..., 1]))


def _hellinger_stats(xc: Tensor, yc: Tensor, inv_t: float) -> Tensor:
    """float64 ``(lse_x, lse_y, lse((x + y)/2), 0)`` of one chunk of rows.

    With ``e_x = exp((x - m_x)/T)`` and ``e_y = exp((y - m_y)/T)`` (shifted before scaling, so no
    rounding proportional to ``|x|/T``): ``lse((x + y)/2) = (m_x + m_y)/(2T) + log sum sqrt(e_x e_y)``.
    """
    dtype = compute_dtype(xc)
    x, y = xc.to(dtype), yc.to(dtype)
    mx, my = _finite_max(x), _finite_max(y)
    ex, ey = torch.exp((x - mx) * inv_t), torch.exp((y - my) * inv_t)
    mx, my = mx.squeeze(-1).double() * inv_t, my.squeeze(-1).double() * inv_t
    lse_x = mx + ex.sum(-1).double().log()
    lse_y = my + ey.sum(-1).double().log()
    lse_h = 0.5 * (mx + my) + torch.sqrt(ex * ey).sum(-1).double().log()
    return torch.stack([lse_x, lse_y, lse_h, torch.zeros_like(lse_h)], -1)


def _chunk_stats(xc: Tensor, yc: Tensor, inv_t: float, divergence: str) -> tuple[Tensor, Tensor]:
    """One chunk of rows -> (value, float64 stats[..., 4])."""
    if divergence == "hellinger":
        stats = _hellinger_stats(xc, yc, inv_t)
        return hellinger_value(stats), stats
    dtype = compute_dtype(xc)
    x, y = xc.to(dtype), yc.to(dtype)
    lse_x, p, mx = _softmax64(x, inv_t)
    lse_y, q, my = _softmax64(y, inv_t)
    if divergence == "kl":
        # KL = sum_j p_j (log p_j - log q_j), with log p_j - log q_j = (x_j - y_j)/T - (lse_x - lse_y)
        # formed as ((x_j - m_x) - (y_j - m_y))/T minus a float64 centre: no cancellation of a_x against
        # lse_x - lse_y, and no rounding of x_j - y_j proportional to an offset between the inputs
        shift = _lse_gap(lse_x, lse_y)
        centre = shift - (mx.double() - my.double()) * inv_t
        value = _p_weighted(p, _centred((x - mx) - (y - my), centre, inv_t)).sum(-1).double()
        a_x = value + shift.squeeze(-1)
        value = value - (lse_x - lse_y - shift).squeeze(-1)  # +-inf or NaN where a normaliser is not finite
        a_y = torch.zeros_like(a_x)
        # no distribution p (every x_j = -inf): NaN, as the compiled and Triton kernels give (0/0), not +inf
        value = torch.where(lse_x.squeeze(-1) == -math.inf, math.nan, value)
    else:
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
    x, y = xc.to(dtype), yc.to(dtype)
    lse_x, lse_y, a_x, a_y = (s.unsqueeze(-1) for s in stats.unbind(-1))
    g = grad.to(dtype).unsqueeze(-1) * inv_t
    live = g != 0
    # p and q as `_probs` forms them, keeping x - k_x and y - k_y for the KL's log-ratio
    (k_x, r_x), (k_y, r_y) = _split(lse_x, inv_t, dtype), _split(lse_y, inv_t, dtype)
    dx, dy = x - k_x, y - k_y
    p, q = torch.exp(dx * inv_t - r_x.to(dtype)), torch.exp(dy * inv_t - r_y.to(dtype))
    if divergence == "kl":
        # (x_j - y_j)/T - a_x as log(p_j/q_j) - KL (`_log_ratio`, the KL in float64), so neither an offset
        # of x and y (common or between them) nor a small T cancels the digits away
        kl = a_x - (lse_x - lse_y)
        gx = g * (_p_weighted(p, _log_ratio(dx, dy, r_x, r_y, inv_t)) - p * kl.to(dtype))
        gy = g * (q - p)
    elif divergence == "jsd":
        rp, rq = _log_ratios(p, q)
        gx = 0.5 * g * (_p_weighted(p, rp) - p * a_x.to(dtype))
        gy = 0.5 * g * (_p_weighted(q, rq) - q * a_y.to(dtype))
    else:
        bc = torch.exp(stats[..., 2] - 0.5 * (stats[..., 0] + stats[..., 1])).to(dtype).unsqueeze(-1)
        root = torch.sqrt(p * q)  # sqrt(p_j q_j) = BC r_j
        gx = 0.5 * g * (bc * p - root)
        gy = 0.5 * g * (bc * q - root)
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


# ----------------------------------------------------------------------------- entropy of one input


def _entropy_chunk(xc: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """One chunk of rows -> (entropy, float64 stats ``[..., 2] = (lse, sum_j p_j x_j)``).

    Shifted by the row maximum ``M`` (``H`` is shift-invariant): with ``e = exp((x - M)/T)``,
    ``s = sum e`` and ``d = sum e (x - M)/T``, ``H = log s - d / s``. A row of only ``-inf`` has no
    distribution (``s = 0``) and gives NaN, as does a NaN or ``+inf`` anywhere in the row.
    """
    dtype = compute_dtype(xc)
    x = xc.to(dtype)
    m = _finite_max(x)
    shifted = (x - m) * inv_t  # shifted before scaling: no rounding proportional to |x|/T
    e = torch.exp(shifted)
    s = e.sum(-1).double()
    d = torch.where(x > -math.inf, e * shifted, 0.0).sum(-1).double()
    m = m.squeeze(-1).double() * inv_t
    value = torch.log(s) - d / s
    return value, torch.stack([m + torch.log(s), m + d / s], -1)


def entropy_forward(x: Tensor, temperature: float, chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-row entropy of ``[batch, seq, vocab]`` logits -> (``[batch, seq]``, float64 stats ``[batch, seq, 2]``).

    float32 result (float64 for float64 inputs), clamped at 0 against rounding (NaN stays NaN).
    """
    out = torch.empty(x.shape[:-1], dtype=compute_dtype(x), device=x.device)
    stats = torch.empty((*x.shape[:-1], 2), dtype=torch.float64, device=x.device)
    xf = flatten_if_free(x)
    of, sf = out.view(xf.shape[:-1]), stats.view(*xf.shape[:-1], 2)
    chunk_rows = chunk_rows or default_chunk_rows(x.shape[-1])
    for b, rows in row_chunks(xf.shape, chunk_rows):
        of[b, rows], sf[b, rows] = _entropy_chunk(xf[b, rows], 1.0 / temperature)
    return out.clamp_min(0.0), stats  # a one-hot row can round to -1e-8


def entropy_chunk_grad(xc: Tensor, stats: Tensor, grad: Tensor, inv_t: float) -> Tensor:
    """``d(sum grad * H)/dx`` for one chunk of rows (any leading shape), in the compute dtype."""
    dtype = compute_dtype(xc)
    lse, a = (s.unsqueeze(-1) for s in stats.unbind(-1))
    g = grad.to(dtype).unsqueeze(-1) * inv_t
    p = _probs(xc.to(dtype), lse, inv_t)
    return torch.where((g != 0) & (p > 0), -g * p * _centred(xc.to(dtype), a, inv_t), 0.0)


def entropy_backward(
    grad: Tensor, x: Tensor, stats: Tensor, temperature: float, chunk_rows: int | None = None
) -> Tensor:
    """Gradient of ``sum(grad * H)`` w.r.t. ``[batch, seq, vocab]`` logits, in their dtype."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    xf = flatten_if_free(x)
    gf, sf, of = grad.reshape(xf.shape[:-1]), stats.reshape(*xf.shape[:-1], 2), grad_x.view(xf.shape)
    chunk_rows = chunk_rows or default_chunk_rows(x.shape[-1])
    for b, rows in row_chunks(xf.shape, chunk_rows):
        of[b, rows] = entropy_chunk_grad(xf[b, rows], sf[b, rows], gf[b, rows], 1.0 / temperature)
    return grad_x


# ----------------------------------------------------------------------------- second sweep of the JSD


def jsd_partial(xc: Tensor, yc: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """``(sum_j p_j log(p_j/m_j), sum_j q_j log(q_j/m_j))`` over a vocabulary slice, given the full-row lse's.

    The logit-free path sums these over vocabulary chunks after a first sweep has found the lse's.
    """
    dtype = compute_dtype(xc)
    p = _probs(xc.to(dtype), lse_x.unsqueeze(-1), inv_t)
    q = _probs(yc.to(dtype), lse_y.unsqueeze(-1), inv_t)
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


# ----------------------------------------------------------------------------- KL and both entropies at once
#
# One call, three values per row: KL(p || q), H(p), H(q) (PAPO's perception KL and its double entropy,
# VEPO's entropies of both views). Float64 statistics ``(lse_x, lse_y, a_x, b_x, b_y)``: the KL's
# four-statistic layout without ``a_y``, plus ``b = sum_j p_j x_j`` of each input (the entropy's second
# statistic), so the backward is the sum of the KL and entropy gradients in one pass over each input.


def joint_forward(x: Tensor, y: Tensor, temperature: float, chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` logits -> (values ``[batch, seq, 3]`` = (KL, H(p), H(q)), stats ``[batch, seq, 5]``)."""
    values = torch.empty((*x.shape[:-1], 3), dtype=compute_dtype(x), device=x.device)
    stats = torch.empty((*x.shape[:-1], 5), dtype=torch.float64, device=x.device)
    inv_t = 1.0 / temperature
    for b, rows in row_chunks(x.shape, chunk_rows or default_chunk_rows(x.shape[-1])):
        xc, yc = x[b, rows], y[b, rows]
        kl, kl_stats = _chunk_stats(xc, yc, inv_t, "kl")
        hx, hx_stats = _entropy_chunk(xc, inv_t)
        hy, hy_stats = _entropy_chunk(yc, inv_t)
        values[b, rows] = torch.stack([kl, hx, hy], -1).to(values.dtype)
        stats[b, rows] = torch.cat([kl_stats[..., :3], hx_stats[..., 1:], hy_stats[..., 1:]], -1)
    return values.clamp_min(0.0), stats


def joint_chunk_grads(xc: Tensor, yc: Tensor, stats: Tensor, grad: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad[..., 0] KL + grad[..., 1] H(p) + grad[..., 2] H(q))`` for one chunk of rows."""
    kl_stats = torch.cat([stats[..., :3], torch.zeros_like(stats[..., :1])], -1)
    gx, gy = chunk_grads(xc, yc, kl_stats, grad[..., 0], inv_t, "kl")
    gx = gx + entropy_chunk_grad(xc, stats[..., 0::3], grad[..., 1], inv_t)  # (lse_x, b_x)
    gy = gy + entropy_chunk_grad(yc, stats[..., 1::3], grad[..., 2], inv_t)  # (lse_y, b_y)
    return gx, gy


def joint_backward(
    grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, temperature: float, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``x`` and ``y`` of ``sum(grad * (KL, H(p), H(q)))``, ``grad`` ``[batch, seq, 3]``."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    for b, rows in row_chunks(x.shape, chunk_rows or default_chunk_rows(x.shape[-1])):
        grad_x[b, rows], grad_y[b, rows] = joint_chunk_grads(
            x[b, rows], y[b, rows], stats[b, rows], grad[b, rows], 1.0 / temperature
        )
    return grad_x, grad_y
