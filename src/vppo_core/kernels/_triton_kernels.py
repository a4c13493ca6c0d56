"""Triton kernels of the Triton backend: a single-pass online forward kernel per row and a blocked
backward kernel per quantity; `._triton` launches them and wraps them as ``torch.library`` custom ops.

Forward (one program per row). The row is read once, ``BLOCK`` entries at a time; the kernel keeps,
in float32, the running maxima and sums of the online log-sum-exp

    m_x, s_x = sum e^{x - m_x}, d = sum e^{x - m_x} (x - y), m_y, s_y = sum e^{y - m_y}

rescaling them by ``e^{m_old - m_new}`` when a block raises a maximum, and writes the divergence and
the row statistics ``(lse_x, lse_y, a_x, a_y)`` (see `._torch`). For the Jensen-Shannon divergence
a second loop over the row (from L2) sums ``p log(p/m)`` and ``q log(q/m)`` once the lse's are known.

The squared Hellinger distance (``DIV == 2``) keeps ``b = sum sqrt(e^{x - m_x} e^{y - m_y})`` in
place of ``d`` (the Bhattacharyya sum at the shift ``(m_x + m_y)/2``, rescaled by
``e^{((m_x,old - m_x) + (m_y,old - m_y))/2}``) and writes ``1 - b / sqrt(s_x s_y)``. The entropy of one
input has its own kernel with ``m, s = sum e^{x - m}, d = sum e^{x - m} (x - m)`` (``d`` moves to a new
maximum ``m'`` as ``e^{m - m'} (d + (m - m') s)``) and writes ``log s - d / s``. The KL with both
entropies (``_joint_fwd_kernel``) keeps the KL's sums and each input's entropy sum in one loop.

Backward (one program per (row, block)): reads the blocks once and writes the gradients from the
saved row statistics, so no reduction is recomputed.

Layout: ``[batch, seq, vocab]`` with any batch and seq strides and a unit vocabulary stride; offsets
are int64 (``rows * vocab`` may exceed 2^31). bf16/fp16/fp32 inputs are upcast right after loading
(which also keeps the CPU interpreter, ``TRITON_INTERPRET=1``, exact: it mis-computes bf16 arithmetic).
"""

import triton
import triton.language as tl

DIV_KL, DIV_JSD, DIV_HELLINGER = 0, 1, 2
_DIV = {"kl": DIV_KL, "jsd": DIV_JSD, "hellinger": DIV_HELLINGER}


@triton.jit
def _split(c64, inv_t):
    """A float64 row constant in scaled units as ``k / T + rest``, ``k`` float32 in logit units: then
    ``(x - k) / T - rest`` is ``x / T - c`` without rounding proportional to ``|x| / T`` (``_torch._centred``)."""
    k = (c64 / inv_t).to(tl.float32)
    rest = tl.where(tl.abs(c64) < float("inf"), c64 - k.to(tl.float64) * inv_t, 0.0).to(tl.float32)
    return k, rest


@triton.jit
def _probs(x, y, lse_x, lse_y, inv_t):
    """``p = e^{x/T - lse_x}`` and ``q``, from raw logits and float64 lse's, shifted before they are scaled."""
    k_x, r_x = _split(lse_x, inv_t)
    k_y, r_y = _split(lse_y, inv_t)
    return tl.exp((x - k_x) * inv_t - r_x), tl.exp((y - k_y) * inv_t - r_y)


@triton.jit
def _log_ratio(x, y, lse_x, lse_y, inv_t):
    """``log(p/q) = (x - y)/T - (lse_x - lse_y)`` as ``((x - k_x) - (y - k_y))/T - (r_x - r_y)``, each lse
    split as `_probs` splits it (``_torch._log_ratio``): no rounding of ``x - y`` proportional to an offset
    between the inputs, none proportional to ``|x|/T``."""
    k_x, r_x = _split(lse_x, inv_t)
    k_y, r_y = _split(lse_y, inv_t)
    return ((x - k_x) - (y - k_y)) * inv_t - (r_x - r_y)


@triton.jit
def _finite_or_zero(m):
    return tl.where(m == -float("inf"), 0.0, m)


@triton.jit
def _kl_d_step(d, s_x_old, old_x, old_y, use_x, use_y, alpha_x, ex, x, y):
    """The KL's running ``d = sum e^{(x - use_x)/T} ((x - use_x) - (y - use_y))``, kept centred at the
    current shifts: ``x - y`` would round to ``eps |x - y|``, a large error where the inputs are offset
    from each other. Moving the old sum to the new shifts adds the change of ``use_x - use_y`` times
    the old ``s_x`` (nothing while it is 0); the final ``use_x - use_y`` is added back in float64."""
    frame = (old_x - use_x) - (old_y - use_y)
    d = (d + tl.where(s_x_old > 0, frame * s_x_old, 0.0)) * alpha_x
    return d + tl.sum(tl.where(x > -float("inf"), ex * ((x - use_x) - (y - use_y)), 0.0), 0)


@triton.jit
def _kl_sum(a_x, lse_x, lse_y):
    """NaN ``a_x`` read as ``+inf`` where both log-sum-exps are finite (``_rows.kl_sum``): ``0 * inf`` from
    a finite ``x_j`` whose ``e^{x_j - m}`` underflowed against ``y_j = -inf``, where the KL is infinite."""
    finite = (tl.abs(lse_x) < float("inf")) & (tl.abs(lse_y) < float("inf"))
    return tl.where((a_x != a_x) & finite, float("inf"), a_x)


@triton.jit
def _fwd_kernel(
    X,
    Y,
    OUT,
    STATS,
    SEQ,
    VOCAB,
    stride_xb,
    stride_xs,
    stride_yb,
    stride_ys,
    inv_t,
    DIV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // SEQ
    s = row - b * SEQ
    x_row = X + b * stride_xb + s * stride_xs
    y_row = Y + b * stride_yb + s * stride_ys
    cols = tl.arange(0, BLOCK)

    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), 0)
    m_x = zero - float("inf")
    m_y = zero - float("inf")
    s_x = zero
    s_y = zero
    # Maxima of the raw logits; every exponent is shifted before it is scaled, e^{(x - m) / T}, so no
    # rounding proportional to |x| / T enters (as in the other backends).
    # KL/JSD: d = sum e^{(x - m_x)/T} ((x - m_x) - (y - m_y)) (_kl_d_step);
    # Hellinger: d = sum sqrt(e^{(x - m_x)/T} e^{(y - m_y)/T})
    d = zero
    for start in range(0, VOCAB, BLOCK):
        offs = start + cols
        live = offs < VOCAB
        x = tl.load(x_row + offs, mask=live, other=-float("inf")).to(tl.float32)
        y = tl.load(y_row + offs, mask=live, other=-float("inf")).to(tl.float32)
        new_x = tl.maximum(m_x, tl.max(x, 0))
        new_y = tl.maximum(m_y, tl.max(y, 0))
        use_x = _finite_or_zero(new_x)  # all -inf so far: keep exp() finite
        use_y = _finite_or_zero(new_y)
        alpha_x = tl.exp((m_x - use_x) * inv_t)
        ex = tl.exp((x - use_x) * inv_t)
        ey = tl.exp((y - use_y) * inv_t)
        if DIV == 2:  # the shift of the Bhattacharyya sum is (m_x + m_y) / 2
            # sqrt_rn (IEEE, not the fast approximation): sqrt(e * e) == e, so H^2(p, p) is exactly 0
            d = d * tl.exp(0.5 * ((m_x - use_x) + (m_y - use_y)) * inv_t) + tl.sum(tl.sqrt_rn(ex * ey), 0)
        else:
            d = _kl_d_step(d, s_x, _finite_or_zero(m_x), _finite_or_zero(m_y), use_x, use_y, alpha_x, ex, x, y)
        s_x = s_x * alpha_x + tl.sum(ex, 0)
        s_y = s_y * tl.exp((m_y - use_y) * inv_t) + tl.sum(ey, 0)
        m_x = new_x
        m_y = new_y
    # Statistics in float64 (see _torch): max / T + log(sum) is added after the cast.
    lse_x = m_x.to(tl.float64) * inv_t + tl.log(s_x).to(tl.float64)
    lse_y = m_y.to(tl.float64) * inv_t + tl.log(s_y).to(tl.float64)
    # d is centred at the final shifts (_kl_d_step): add them back in float64
    shift = _finite_or_zero(m_x).to(tl.float64) - _finite_or_zero(m_y).to(tl.float64)
    a_x = ((d / s_x).to(tl.float64) + shift) * inv_t
    a_y = zero.to(tl.float64)
    if DIV == 2:  # squared Hellinger: a_x holds lse((x + y) / 2); 1 - BC with BC = d / sqrt(s_x s_y)
        a_x = 0.5 * (m_x.to(tl.float64) + m_y.to(tl.float64)) * inv_t + tl.log(d).to(tl.float64)
        value = 1.0 - d.to(tl.float64) / tl.sqrt(s_x.to(tl.float64) * s_y.to(tl.float64))
    elif DIV == 1:  # Jensen-Shannon: a second sweep once the normalisers are known
        a_x = zero
        a_y = zero
        k_x, r_x = _split(lse_x, inv_t)  # p = e^{(x - k)/T - rest}: shifted before it is scaled
        k_y, r_y = _split(lse_y, inv_t)
        for start in range(0, VOCAB, BLOCK):
            offs = start + cols
            live = offs < VOCAB
            x = tl.load(x_row + offs, mask=live, other=-float("inf")).to(tl.float32)
            y = tl.load(y_row + offs, mask=live, other=-float("inf")).to(tl.float32)
            p = tl.exp((x - k_x) * inv_t - r_x)
            q = tl.exp((y - k_y) * inv_t - r_y)
            # log(p/m) = log(2p / (p + q)): exactly 0 where p == q, with a correctly rounded division
            # (div_rn; "/" compiles to an approximate one on the GPU, where 2p / 2p can miss 1)
            pq = p + q
            a_x += tl.sum(tl.where(p > 0, p * tl.log(tl.div_rn(2.0 * p, pq)), 0.0), 0)
            a_y += tl.sum(tl.where(q > 0, q * tl.log(tl.div_rn(2.0 * q, pq)), 0.0), 0)
        a_x = a_x.to(tl.float64)
        a_y = a_y.to(tl.float64)
        value = 0.5 * (a_x + a_y)
    else:
        a_x = _kl_sum(a_x, lse_x, lse_y)
        value = a_x - (lse_x - lse_y)
    value = value.to(tl.float32)
    tl.store(OUT + row, tl.where(value < 0.0, 0.0, value))  # clamp at 0 against rounding; NaN stays NaN
    tl.store(STATS + row * 4 + 0, lse_x)
    tl.store(STATS + row * 4 + 1, lse_y)
    tl.store(STATS + row * 4 + 2, a_x)
    tl.store(STATS + row * 4 + 3, a_y)


@triton.jit
def _bwd_kernel(
    X,
    Y,
    STATS,
    GRAD,
    GX,
    GY,
    SEQ,
    VOCAB,
    stride_xb,
    stride_xs,
    stride_yb,
    stride_ys,
    inv_t,
    DIV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < VOCAB
    b = row // SEQ
    s = row - b * SEQ
    g = tl.load(GRAD + row).to(tl.float32) * inv_t
    lse_x = tl.load(STATS + row * 4 + 0)  # float64 row statistics
    lse_y = tl.load(STATS + row * 4 + 1)
    a_x = tl.load(STATS + row * 4 + 2)
    a_y = tl.load(STATS + row * 4 + 3)
    x = tl.load(X + b * stride_xb + s * stride_xs + offs, mask=live, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_yb + s * stride_ys + offs, mask=live, other=0.0).to(tl.float32)
    p, q = _probs(x, y, lse_x, lse_y, inv_t)
    if DIV == 2:  # squared Hellinger: log BC = lse_h - (lse_x + lse_y) / 2, formed in float64
        log_bc = tl.load(STATS + row * 4 + 2) - 0.5 * (tl.load(STATS + row * 4 + 0) + tl.load(STATS + row * 4 + 1))
        bc = tl.exp(log_bc.to(tl.float32))
        root = tl.sqrt_rn(p * q)
        gx = 0.5 * g * (bc * p - root)
        gy = 0.5 * g * (bc * q - root)
    elif DIV == 1:
        pq = p + q
        gx = 0.5 * g * (tl.where(p > 0, p * tl.log(tl.div_rn(2.0 * p, pq)), 0.0) - p * a_x.to(tl.float32))
        gy = 0.5 * g * (tl.where(q > 0, q * tl.log(tl.div_rn(2.0 * q, pq)), 0.0) - q * a_y.to(tl.float32))
    else:
        # (x - y)/T - a_x as log(p/q) - KL, with the KL from float64 (see _torch.chunk_grads)
        log_ratio = _log_ratio(x, y, lse_x, lse_y, inv_t)
        gx = g * (tl.where(p > 0, p * log_ratio, 0.0) - p * (a_x - (lse_x - lse_y)).to(tl.float32))
        gy = g * (q - p)
    gx = tl.where(p > 0, gx, 0.0)
    gx = tl.where(g != 0, gx, 0.0)  # masked rows: exactly zero, whatever they hold
    gy = tl.where(g != 0, gy, 0.0)
    out = row * VOCAB + offs
    tl.store(GX + out, gx.to(GX.dtype.element_ty), mask=live)
    tl.store(GY + out, gy.to(GY.dtype.element_ty), mask=live)


@triton.jit
def _entropy_step(m, s, h, x, inv_t):
    """One block of a row's online entropy sums of raw logits ``x``: the maximum ``m``,
    ``s = sum e^{(x - m)/T}`` and ``h = sum e^{(x - m)/T} (x - m)/T`` (shifted before scaled). Returns the
    new ``(m, s, h)``, the block's ``e^{(x - use)/T}`` and ``alpha = e^{(m_old - use)/T}``, which rescales
    any other sum kept at the same shift (``use``: the new maximum, 0 while it is -inf so that exp()
    stays finite)."""
    new = tl.maximum(m, tl.max(x, 0))
    use = _finite_or_zero(new)
    alpha = tl.exp((m - use) * inv_t)
    t = (x - use) * inv_t
    e = tl.exp(t)
    # move h to the new shift: + (m - use)/T s; nothing while s = 0 (m = -inf)
    h = alpha * (h + tl.where(s > 0, (m - use) * inv_t * s, 0.0))
    h += tl.sum(tl.where(x > -float("inf"), e * t, 0.0), 0)
    s = s * alpha + tl.sum(e, 0)
    return new, s, h, e, alpha


@triton.jit
def _entropy_fwd_kernel(X, OUT, STATS, SEQ, VOCAB, stride_xb, stride_xs, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // SEQ
    s = row - b * SEQ
    x_row = X + b * stride_xb + s * stride_xs
    cols = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), 0)
    m = zero - float("inf")
    total = zero  # sum e^{x - m}
    d = zero  # sum e^{(x - m)/T} (x - m)/T
    for start in range(0, VOCAB, BLOCK):
        offs = start + cols
        x = tl.load(x_row + offs, mask=offs < VOCAB, other=-float("inf")).to(tl.float32)
        m, total, d, _, _ = _entropy_step(m, total, d, x, inv_t)
    mean_shift = d / total
    value = tl.log(total) - mean_shift  # no distribution (total = 0): NaN
    tl.store(OUT + row, tl.where(value < 0.0, 0.0, value))  # clamp at 0 against rounding; NaN stays NaN
    tl.store(STATS + row * 2 + 0, m.to(tl.float64) * inv_t + tl.log(total).to(tl.float64))
    tl.store(STATS + row * 2 + 1, m.to(tl.float64) * inv_t + mean_shift.to(tl.float64))


@triton.jit
def _entropy_bwd_kernel(X, STATS, GRAD, GX, SEQ, VOCAB, stride_xb, stride_xs, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < VOCAB
    b = row // SEQ
    s = row - b * SEQ
    g = tl.load(GRAD + row).to(tl.float32) * inv_t
    k, r = _split(tl.load(STATS + row * 2 + 0), inv_t)  # lse
    k_a, r_a = _split(tl.load(STATS + row * 2 + 1), inv_t)  # a = sum p x / T
    x = tl.load(X + b * stride_xb + s * stride_xs + offs, mask=live, other=0.0).to(tl.float32)
    p = tl.exp((x - k) * inv_t - r)
    gx = tl.where(p > 0, -g * p * ((x - k_a) * inv_t - r_a), 0.0)
    gx = tl.where(g != 0, gx, 0.0)  # masked rows: exactly zero, whatever they hold
    tl.store(GX + row * VOCAB + offs, gx.to(GX.dtype.element_ty), mask=live)


@triton.jit
def _joint_fwd_kernel(
    X,
    Y,
    OUT,
    STATS,
    SEQ,
    VOCAB,
    stride_xb,
    stride_xs,
    stride_yb,
    stride_ys,
    inv_t,
    BLOCK: tl.constexpr,
):
    """KL(p || q), H(p), H(q) of one row: the KL's online sums plus each input's entropy sum ``h``."""
    row = tl.program_id(0).to(tl.int64)
    b = row // SEQ
    s = row - b * SEQ
    x_row = X + b * stride_xb + s * stride_xs
    y_row = Y + b * stride_yb + s * stride_ys
    cols = tl.arange(0, BLOCK)

    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), 0)
    m_x = zero - float("inf")
    m_y = zero - float("inf")
    s_x = zero
    s_y = zero
    d = zero  # sum e^{(x - m_x)/T} ((x - m_x) - (y - m_y)) (_kl_d_step)
    h_x = zero  # sum e^{(x - m_x)/T} (x - m_x)/T
    h_y = zero  # sum e^{(y - m_y)/T} (y - m_y)/T
    for start in range(0, VOCAB, BLOCK):
        offs = start + cols
        live = offs < VOCAB
        x = tl.load(x_row + offs, mask=live, other=-float("inf")).to(tl.float32)
        y = tl.load(y_row + offs, mask=live, other=-float("inf")).to(tl.float32)
        old_x, old_y, s_x_old = _finite_or_zero(m_x), _finite_or_zero(m_y), s_x
        m_x, s_x, h_x, ex, alpha_x = _entropy_step(m_x, s_x, h_x, x, inv_t)
        m_y, s_y, h_y, _, _ = _entropy_step(m_y, s_y, h_y, y, inv_t)
        d = _kl_d_step(d, s_x_old, old_x, old_y, _finite_or_zero(m_x), _finite_or_zero(m_y), alpha_x, ex, x, y)
    log_sx = tl.log(s_x).to(tl.float64)
    log_sy = tl.log(s_y).to(tl.float64)
    lse_x = m_x.to(tl.float64) * inv_t + log_sx
    lse_y = m_y.to(tl.float64) * inv_t + log_sy
    shift = _finite_or_zero(m_x).to(tl.float64) - _finite_or_zero(m_y).to(tl.float64)
    a_x = _kl_sum(((d / s_x).to(tl.float64) + shift) * inv_t, lse_x, lse_y)
    mean_x = (h_x / s_x).to(tl.float64)
    mean_y = (h_y / s_y).to(tl.float64)
    kl = (a_x - (lse_x - lse_y)).to(tl.float32)
    ent_x = (log_sx - mean_x).to(tl.float32)  # no distribution (s = 0): NaN
    ent_y = (log_sy - mean_y).to(tl.float32)
    tl.store(OUT + row * 3 + 0, tl.where(kl < 0.0, 0.0, kl))  # clamp at 0 against rounding; NaN stays NaN
    tl.store(OUT + row * 3 + 1, tl.where(ent_x < 0.0, 0.0, ent_x))
    tl.store(OUT + row * 3 + 2, tl.where(ent_y < 0.0, 0.0, ent_y))
    tl.store(STATS + row * 5 + 0, lse_x)
    tl.store(STATS + row * 5 + 1, lse_y)
    tl.store(STATS + row * 5 + 2, a_x)
    tl.store(STATS + row * 5 + 3, m_x.to(tl.float64) * inv_t + mean_x)
    tl.store(STATS + row * 5 + 4, m_y.to(tl.float64) * inv_t + mean_y)


@triton.jit
def _joint_bwd_kernel(
    X,
    Y,
    STATS,
    GRAD,
    GX,
    GY,
    SEQ,
    VOCAB,
    stride_xb,
    stride_xs,
    stride_yb,
    stride_ys,
    inv_t,
    BLOCK: tl.constexpr,
):
    """Gradients of ``g_kl KL + g_p H(p) + g_q H(q)``; each term is exactly 0 where its upstream is 0."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < VOCAB
    b = row // SEQ
    s = row - b * SEQ
    g_kl = tl.load(GRAD + row * 3 + 0).to(tl.float32) * inv_t
    g_p = tl.load(GRAD + row * 3 + 1).to(tl.float32) * inv_t
    g_q = tl.load(GRAD + row * 3 + 2).to(tl.float32) * inv_t
    lse_x = tl.load(STATS + row * 5 + 0)  # float64 row statistics
    lse_y = tl.load(STATS + row * 5 + 1)
    a_x = tl.load(STATS + row * 5 + 2)
    k_bx, r_bx = _split(tl.load(STATS + row * 5 + 3), inv_t)
    k_by, r_by = _split(tl.load(STATS + row * 5 + 4), inv_t)
    x = tl.load(X + b * stride_xb + s * stride_xs + offs, mask=live, other=0.0).to(tl.float32)
    y = tl.load(Y + b * stride_yb + s * stride_ys + offs, mask=live, other=0.0).to(tl.float32)
    p, q = _probs(x, y, lse_x, lse_y, inv_t)
    kl = (a_x - (lse_x - lse_y)).to(tl.float32)  # log(p/q) - KL: both O(1), the KL from float64
    log_ratio = _log_ratio(x, y, lse_x, lse_y, inv_t)
    kl_x = tl.where(g_kl != 0, g_kl * (tl.where(p > 0, p * log_ratio, 0.0) - p * kl), 0.0)
    kl_y = tl.where(g_kl != 0, g_kl * (q - p), 0.0)
    h_x = tl.where(g_p != 0, tl.where(p > 0, -g_p * p * ((x - k_bx) * inv_t - r_bx), 0.0), 0.0)
    h_y = tl.where(g_q != 0, tl.where(q > 0, -g_q * q * ((y - k_by) * inv_t - r_by), 0.0), 0.0)
    gx = tl.where(p > 0, kl_x, 0.0) + h_x
    gy = kl_y + h_y
    out = row * VOCAB + offs
    tl.store(GX + out, gx.to(GX.dtype.element_ty), mask=live)
    tl.store(GY + out, gy.to(GY.dtype.element_ty), mask=live)
