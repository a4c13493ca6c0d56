"""The traced cores of the ``torch.compile`` backend (`._compile`): plain torch, no checks.

Forward. Each row is cut into blocks of ``BLOCK`` vocabulary entries (a view, no copy) plus a tail.
Per block the kernel computes, in float32, the block maxima and three sums

    m_x = max x,  s_x = sum 2^{c (x - m_x)},  d = sum 2^{c (x - m_x)} (x - y),  m_y,  s_y = sum 2^{c (y - m_y)}

with ``c = log2(e) / T``; a small combine step then rescales the block sums to the row maxima (the
log-sum-exp merge ``s = sum_b s_b 2^{c (m_b - M)}``). Inductor turns the per-block reductions into one
C++ loop nest whose outer loop runs over (row, block) and whose inner loops re-read a block from L1,
so each input byte is read from memory once; the block statistics are ``5 / BLOCK`` of the input.
``exp2`` instead of ``exp`` is deliberate: Inductor stores a reused ``exp`` result to memory on CPU
(a full float32 copy of the input), while it recomputes ``exp2`` inside the loop.

The other row quantities use the same blocks and merge. Hellinger keeps ``m_x, s_x, m_y, s_y`` and
``b = sum sqrt(2^{c (x - m_x)} 2^{c (y - m_y)})`` (the Bhattacharyya sum at the shift
``(m_x + m_y)/2``, a square root instead of a third exponential), rescaled by
``2^{c ((m_x,b - M_x) + (m_y,b - M_y))/2}``. The entropy of one input keeps ``m, s`` and
``d = sum 2^{c (x - m)} (x - m)``, merged as ``D = sum_b w_b (d_b + (m_b - M) s_b)``.

Backward. One pointwise pass per element, from the row statistics the forward saved
(``lse_x, lse_y, a_x, a_y``, see `._torch`): reads the inputs, writes the gradients.

Inside a caller's own ``torch.compile`` these functions are traced into the caller's graph; otherwise
`._compile` compiles one copy per (kind, dtype, quantity).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _rows, _torch
from ._chunks import compute_dtype

BLOCK = 4096
# Note on log2(e): the traced code writes it as a literal, never as a module-level float: under a
# caller's torch.compile(dynamic=True) Dynamo makes such a global a graph input, caches its SymFloat
# per frame with the proxy of the subgraph that first read it, and a second autograd.Function (or a
# retried backward trace) reading it fails ("lift_tracked_freevar_to_input should not be called on
# root SubgraphTracer"). A literal is a constant to Dynamo.
_NEG_INF = -math.inf


def _finite_or_zero(m: Tensor) -> Tensor:
    return torch.where(m == _NEG_INF, 0.0, m)  # all -inf so far: keep exp2() finite (it gives 0)


def _blocks(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[rows, vocab > BLOCK]`` -> views ``[rows, nb, BLOCK]`` and the tail ``[rows, 1..BLOCK]`` (no copy).

    ``nb >= 1`` full blocks plus a tail of 1 to ``BLOCK`` entries, so no part is ever empty (an empty
    part would change the traced graph).
    """
    nb = (x.shape[-1] - 1) // BLOCK
    return x[:, : nb * BLOCK].unflatten(-1, (nb, BLOCK)), x[:, nb * BLOCK :]


Stats = tuple[Tensor, ...]


def _block_pass(
    block_stats: Callable[..., Stats], inputs: tuple[Tensor, ...], inv_t: Tensor
) -> tuple[Tensor, torch.dtype, Stats, Stats | None]:
    """``block_stats`` of ``[rows, vocab]`` inputs in the accumulation dtype: over whole rows when
    ``vocab <= BLOCK`` (no tail: ``None``), else over the full blocks and over the tail (`_blocks`).

    Returns ``c = log2(e) / T``, the dtype, and the main and tail statistics.
    """
    acc = compute_dtype(inputs[0])
    c = (inv_t * 1.4426950408889634).to(acc)  # log2(e) as a literal (see the note at the top)
    if inputs[0].shape[-1] <= BLOCK:
        return c, acc, block_stats(*(t.to(acc) for t in inputs), c), None
    parts = [_blocks(t) for t in inputs]
    main = block_stats(*(b.to(acc) for b, _ in parts), c)
    tail = block_stats(*(t.to(acc) for _, t in parts), c)
    return c, acc, main, tail


def _rescaled(main: Tensor, tail: Tensor, w: Tensor, w_tail: Tensor) -> Tensor:
    """A block sum moved to the row maximum: ``sum_b main_b w_b + tail w_tail``."""
    return (main * w).sum(-1) + tail * w_tail


def _block_stats(x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Raw maxima and base-2 sums over the last axis of float32 blocks ``[..., n]``.

    ``d`` is centred, ``sum e_j ((x_j - m_x) - (y_j - m_y))`` (in logit units): ``x_j - y_j`` would
    round to ``eps |x_j - y_j|``, a large error where the two inputs are offset from each other, while
    ``x_j - m_x`` is exact near the block's top. `_centred_d` adds ``(m_x - m_y) s_x`` back in float64.

    The difference is of the unscaled logits: ``(x - m_x) c - (y - m_y) c`` let the C++ compiler
    contract one product into an FMA (the FMA flag is on for this kernel) and not the other, so
    identical inputs gave ``d`` of a few ulps instead of exactly 0, depending on which loop (vector or
    tail) a row's entries fell in.
    """
    mx = x.amax(-1, keepdim=True)
    my = y.amax(-1, keepdim=True)
    dx = x - _finite_or_zero(mx)
    dy = y - _finite_or_zero(my)
    ex = torch.exp2(dx * c)
    ey = torch.exp2(dy * c)
    d = torch.where(x > _NEG_INF, ex * (dx - dy), 0.0).sum(-1)
    return mx.squeeze(-1), ex.sum(-1), d, my.squeeze(-1), ey.sum(-1)


def _centred_d(d: Tensor, s: Tensor, mx: Tensor, my: Tensor) -> Tensor:
    """float64 ``sum e_j (x_j - y_j)`` of one block from its centred ``d`` (`_block_stats`) and ``s_x``."""
    shift = _finite_or_zero(mx).double() - _finite_or_zero(my).double()
    return d.double() + shift * s.double()


def _merge(m_b: Tensor, m_t: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row maximum of block maxima ``[rows, nb]`` and tail maxima ``[rows]``, the blocks' shifts to it
    (0 for an all ``-inf`` block, whose sums are 0) and their weights ``2^{c shift}``."""
    m = torch.maximum(m_b.amax(-1), m_t)
    shift = torch.where(m_b > _NEG_INF, m_b - m.unsqueeze(-1), 0.0)
    shift_t = torch.where(m_t > _NEG_INF, m_t - m, 0.0)
    return m, shift, shift_t, torch.exp2(shift * c), torch.exp2(shift_t * c)


def _lse_stats(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float64 ``(lse_x, lse_y, sum_j p_j (x_j - y_j))`` of ``[rows, vocab]`` logits times ``inv_t`` (float64).

    ``vocab > BLOCK``: full blocks plus a tail (`_blocks`); ``vocab <= BLOCK``: one block per row.
    """
    c, _, main, tail = _block_pass(_block_stats, (x, y), inv_t)
    return _rows.finish_lse(*_kl_merge(main, tail, c), inv_t)


def _kl_merge(main: Stats, tail: Stats | None, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row ``(M_x, S_x, D, M_y, S_y)`` from `_block_stats`' block sums: ``S_x`` and ``D`` in float64 with
    the same weights, so that ``D / S_x`` keeps the blocks' shifts ``m_x - m_y`` exactly."""
    if tail is None:
        mx, sx, d, my, sy = main
        return mx, sx.double(), _centred_d(d, sx, mx, my), my, sy.double()
    mx, _, _, wx, wx_tail = _merge(main[0], tail[0], c)
    my, _, _, wy, wy_tail = _merge(main[3], tail[3], c)
    wx, wx_tail = wx.double(), wx_tail.double()
    sx = _rescaled(main[1].double(), tail[1].double(), wx, wx_tail)
    d_main = _centred_d(main[2], main[1], main[0], main[3])
    d = _rescaled(d_main, _centred_d(tail[2], tail[1], tail[0], tail[3]), wx, wx_tail)
    sy = _rescaled(main[4].double(), tail[4].double(), wy.double(), wy_tail.double())  # as S_x: KL(p, p) = 0
    return mx, sx, d, my, sy


def _hellinger_block_stats(x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Maxima, base-2 sums and ``b = sum sqrt(e_x e_y)`` (the Bhattacharyya sum at shift ``(m_x + m_y)/2``)."""
    mx = x.amax(-1, keepdim=True)
    my = y.amax(-1, keepdim=True)
    ex = torch.exp2((x - _finite_or_zero(mx)) * c)
    ey = torch.exp2((y - _finite_or_zero(my)) * c)
    return mx.squeeze(-1), ex.sum(-1), my.squeeze(-1), ey.sum(-1), torch.sqrt(ex * ey).sum(-1)


def _hellinger_stats(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float64 ``(lse_x, lse_y, lse((x + y)/2))`` of ``[rows, vocab]`` logits times ``inv_t``.

    ``sqrt(e^{x - m_x} e^{y - m_y}) = e^{(x + y)/2 - (m_x + m_y)/2}``: a square root instead of a
    third exponential, with the shift ``(m_x + m_y)/2`` (at least the maximum of ``(x + y)/2``).
    """
    c, _, main, tail = _block_pass(_hellinger_block_stats, (x, y), inv_t)
    if tail is None:
        mx, sx, my, sy, b = main
    else:
        mx, dx, dx_tail, wx, wx_tail = _merge(main[0], tail[0], c)
        my, dy, dy_tail, wy, wy_tail = _merge(main[2], tail[2], c)
        sx = _rescaled(main[1], tail[1], wx, wx_tail)
        sy = _rescaled(main[3], tail[3], wy, wy_tail)
        # the shift of b moves by the mean of the two maxima's moves (exactly dx for identical inputs)
        b = _rescaled(main[4], tail[4], torch.exp2(0.5 * (dx + dy) * c), torch.exp2(0.5 * (dx_tail + dy_tail) * c))
    return _rows.finish_hellinger(mx, sx, my, sy, b, inv_t)


def _entropy_block_stats(x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Maximum ``m``, ``s = sum 2^{c (x - m)}`` and ``d = sum 2^{c (x - m)} (x - m)`` over the last axis."""
    m = x.amax(-1, keepdim=True)
    shifted = x - _finite_or_zero(m)
    e = torch.exp2(shifted * c)
    d = torch.where(x > _NEG_INF, e * shifted, 0.0).sum(-1)
    return m.squeeze(-1), e.sum(-1), d


def entropy_forward_core(x: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    """``[rows, vocab]`` -> (entropy ``[rows]``, float64 stats ``[rows, 2] = (lse, sum_j p_j x_j / T)``).

    With the row maximum ``M``, ``S = sum e^{(x - M)/T}`` and ``D = sum e^{(x - M)/T} (x - M)``:
    ``H = log S - D / (S T)``. Blocks are merged to the row maximum with
    ``D = sum_b w_b (d_b + (m_b - M) s_b)``, ``w_b = e^{(m_b - M)/T}``.
    """
    c, acc, main, tail = _block_pass(_entropy_block_stats, (x,), inv_t)
    if tail is None:
        m, s, d = main
    else:
        m, shift, shift_tail, w, w_tail = _merge(main[0], tail[0], c)
        s = _rescaled(main[1], tail[1], w, w_tail)
        d = _rescaled(main[2] + shift * main[1], tail[2] + shift_tail * tail[1], w, w_tail)
    return _rows.finish_entropy(m, s, d, inv_t, acc)


def _joint_block_stats(x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, ...]:
    """`_block_stats` plus each input's ``h = sum 2^{c (x - m)} (x - m)`` (the entropies' sums)."""
    mx = x.amax(-1, keepdim=True)
    my = y.amax(-1, keepdim=True)
    sx_ = x - _finite_or_zero(mx)
    sy_ = y - _finite_or_zero(my)
    ex = torch.exp2(sx_ * c)
    ey = torch.exp2(sy_ * c)
    live_x = x > _NEG_INF
    d = torch.where(live_x, ex * (sx_ - sy_), 0.0).sum(-1)  # centred, as in `_block_stats`
    hx = torch.where(live_x, ex * sx_, 0.0).sum(-1)
    hy = torch.where(y > _NEG_INF, ey * sy_, 0.0).sum(-1)
    return mx.squeeze(-1), ex.sum(-1), d, my.squeeze(-1), ey.sum(-1), hx, hy


def joint_forward_core(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    """``[rows, vocab]`` -> (values ``[rows, 3]`` = (KL, H(p), H(q)), float64 stats ``[rows, 5]``).

    One read of each input: the KL's block sums and each entropy's ``h`` (merged as in
    `entropy_forward_core`); the stats are ``(lse_x, lse_y, a_x, b_x, b_y)`` (see `._torch`).
    """
    c, acc, main, tail = _block_pass(_joint_block_stats, (x, y), inv_t)
    mx, sx, d, my, sy = _kl_merge(main[:5], None if tail is None else tail[:5], c)
    if tail is None:
        hx, hy = main[5], main[6]
    else:
        _, shx, shx_t, wx, wx_t = _merge(main[0], tail[0], c)
        _, shy, shy_t, wy, wy_t = _merge(main[3], tail[3], c)
        hx = _rescaled(main[5] + shx * main[1], tail[5] + shx_t * tail[1], wx, wx_t)
        hy = _rescaled(main[6] + shy * main[4], tail[6] + shy_t * tail[4], wy, wy_t)
    return _rows.finish_joint((mx, sx, d, my, sy, hx, hy), inv_t, acc)


def joint_backward_core(grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    """Pointwise gradients of ``sum(grad * (KL, H(p), H(q)))`` for ``[rows, vocab]`` logits, in their dtype."""
    acc = compute_dtype(x)
    gx, gy = _torch.joint_chunk_grads(x, y, stats, grad, inv_t.to(acc))
    return gx.to(x.dtype), gy.to(y.dtype)


# ----------------------------------------------------------------------------- Jensen-Shannon terms
#
# The JSD's second sweep and its backward need p_j and q_j themselves, each read several times. Formed
# with ``exp`` (as `._torch` forms them), Inductor stores both to memory on CPU and then the two
# log-ratios as well (it realizes any reused pointwise result that calls exp or log): four float32
# copies of the input. With ``exp2`` and each logarithm read once, it keeps the sweep in one loop.


def _probs2(x: Tensor, lse: Tensor, inv_t: Tensor) -> Tensor:
    """``exp(x/T - lse)`` of raw logits ``x`` (compute dtype) and a float64 ``lse``, split as
    `._torch._probs` splits it (exact near the row's top) but in base 2: ``2^{(x - k) c - rest log2 e}``."""
    k, rest = _torch._split(lse.unsqueeze(-1), inv_t, x.dtype)
    log2e = 1.4426950408889634  # a literal (see the note on log2(e) at the top)
    return torch.exp2((x - k) * (inv_t * log2e).to(x.dtype) - (rest * log2e).to(x.dtype))


def _jsd_terms(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(p_j log(2 p_j/(p_j + q_j)), q_j log(2 q_j/(p_j + q_j)))``, 0 where the weight is 0 (as
    `._torch._log_ratios` and `._torch._p_weighted`; the ratio is at most 2, so never ``+inf``)."""
    s = p + q
    return (
        torch.where(p == 0, 0.0, p * torch.log(2.0 * p / s)),
        torch.where(q == 0, 0.0, q * torch.log(2.0 * q / s)),
    )


def jsd_partial_core(x: Tensor, y: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    """`._torch.jsd_partial` of ``[rows, vocab]`` logits (float64 ``inv_t``), in one loop per row."""
    acc = compute_dtype(x)
    t_x, t_y = _jsd_terms(_probs2(x.to(acc), lse_x, inv_t), _probs2(y.to(acc), lse_y, inv_t))
    return t_x.sum(-1), t_y.sum(-1)


def _jsd_grads(x: Tensor, y: Tensor, stats: Tensor, grad: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    """The JSD case of `._torch.chunk_grads` for ``[rows, vocab]`` logits in the compute dtype."""
    p, q = _probs2(x, stats[:, 0], inv_t), _probs2(y, stats[:, 1], inv_t)
    t_x, t_y = _jsd_terms(p, q)
    g = grad.unsqueeze(-1) * inv_t.to(x.dtype)
    gx = 0.5 * g * (t_x - p * stats[:, 2:3].to(x.dtype))
    gy = 0.5 * g * (t_y - q * stats[:, 3:4].to(x.dtype))
    live = g != 0
    return torch.where(live & (p > 0), gx, 0.0), torch.where(live, gy, 0.0)


def forward_core(x: Tensor, y: Tensor, inv_t: Tensor, divergence: str = "kl") -> tuple[Tensor, Tensor]:
    """``[rows, vocab]`` -> (value ``[rows]``, stats ``[rows, 4]``); see `._torch` for the stats."""
    acc = compute_dtype(x)
    if divergence == "hellinger":
        return _rows.finish_divergence(divergence, _hellinger_stats(x, y, inv_t), acc)
    lse = _lse_stats(x, y, inv_t)
    if divergence == "kl":
        return _rows.finish_divergence(divergence, lse, acc)
    a_x, a_y = jsd_partial_core(x, y, lse[0], lse[1], inv_t)
    return _rows.finish_jsd(lse[0], lse[1], a_x, a_y, acc)


def backward_core(
    grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor, divergence: str = "kl"
) -> tuple[Tensor, Tensor]:
    """Pointwise gradients of ``[rows, vocab]`` logits, in the inputs' dtype."""
    acc = compute_dtype(x)
    if divergence == "jsd":
        gx, gy = _jsd_grads(x.to(acc), y.to(acc), stats, grad.to(acc), inv_t)
    else:
        gx, gy = _torch.chunk_grads(x, y, stats, grad, inv_t.to(acc), divergence)
    return gx.to(x.dtype), gy.to(y.dtype)


def entropy_backward_core(grad: Tensor, x: Tensor, stats: Tensor, inv_t: Tensor) -> Tensor:
    """Pointwise entropy gradient of ``[rows, vocab]`` logits, in their dtype."""
    acc = compute_dtype(x)
    return _torch.entropy_chunk_grad(x, stats, grad, inv_t.to(acc)).to(x.dtype)
