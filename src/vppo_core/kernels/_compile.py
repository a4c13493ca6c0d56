"""``torch.compile`` backend: a blocked single-read forward and a one-pass pointwise backward.

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

Compilation. One ``torch.compile`` function per (kind, dtype, quantity), ``dynamic=True``, so a new number of
tokens or a new vocabulary size does not recompile; the process keeps them for its lifetime and
Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) serves later processes. Inside a caller's own
``torch.compile`` the plain functions below are traced into the caller's graph instead.
"""

import functools
import math
import shutil
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _rows, _torch

BLOCK = 4096
LOG2E = 1.4426950408889634
_NEG_INF = -math.inf

# ----------------------------------------------------------------------------- traced cores (no checks)


def _finite_or_zero(m: Tensor) -> Tensor:
    return torch.where(m == _NEG_INF, 0.0, m)  # all -inf so far: keep exp2() finite (it gives 0)


def _blocks(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[rows, vocab > BLOCK]`` -> views ``[rows, nb, BLOCK]`` and the tail ``[rows, 1..BLOCK]`` (no copy).

    ``nb >= 1`` full blocks plus a tail of 1 to ``BLOCK`` entries, so no part is ever empty (an empty
    part would change the traced graph).
    """
    nb = (x.shape[-1] - 1) // BLOCK
    return x[:, : nb * BLOCK].unflatten(-1, (nb, BLOCK)), x[:, nb * BLOCK :]


def _block_stats(x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Raw maxima and base-2 sums over the last axis of float32 blocks ``[..., n]``."""
    mx = x.amax(-1, keepdim=True)
    my = y.amax(-1, keepdim=True)
    ex = torch.exp2((x - _finite_or_zero(mx)) * c)
    ey = torch.exp2((y - _finite_or_zero(my)) * c)
    d = torch.where(x > _NEG_INF, ex * (x - y), 0.0).sum(-1)
    return mx.squeeze(-1), ex.sum(-1), d, my.squeeze(-1), ey.sum(-1)


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
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = (inv_t * LOG2E).to(acc)
    if x.shape[-1] <= BLOCK:
        mx, sx, d, my, sy = _block_stats(x.to(acc), y.to(acc), c)
    else:
        (xb, xt), (yb, yt) = _blocks(x), _blocks(y)
        main = _block_stats(xb.to(acc), yb.to(acc), c)
        tail = _block_stats(xt.to(acc), yt.to(acc), c)
        mx, _, _, wx, wx_tail = _merge(main[0], tail[0], c)
        my, _, _, wy, wy_tail = _merge(main[3], tail[3], c)
        sx = (main[1] * wx).sum(-1) + tail[1] * wx_tail
        d = (main[2] * wx).sum(-1) + tail[2] * wx_tail
        sy = (main[4] * wy).sum(-1) + tail[4] * wy_tail
    return _rows.finish_lse(mx, sx, d, my, sy, inv_t)


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
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = (inv_t * LOG2E).to(acc)
    if x.shape[-1] <= BLOCK:
        mx, sx, my, sy, b = _hellinger_block_stats(x.to(acc), y.to(acc), c)
    else:
        (xb, xt), (yb, yt) = _blocks(x), _blocks(y)
        main = _hellinger_block_stats(xb.to(acc), yb.to(acc), c)
        tail = _hellinger_block_stats(xt.to(acc), yt.to(acc), c)
        mx, dx, dx_tail, wx, wx_tail = _merge(main[0], tail[0], c)
        my, dy, dy_tail, wy, wy_tail = _merge(main[2], tail[2], c)
        sx = (main[1] * wx).sum(-1) + tail[1] * wx_tail
        sy = (main[3] * wy).sum(-1) + tail[3] * wy_tail
        # the shift of b moves by the mean of the two maxima's moves (exactly dx for identical inputs)
        b = (main[4] * torch.exp2(0.5 * (dx + dy) * c)).sum(-1) + tail[4] * torch.exp2(0.5 * (dx_tail + dy_tail) * c)
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
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = (inv_t * LOG2E).to(acc)
    if x.shape[-1] <= BLOCK:
        m, s, d = _entropy_block_stats(x.to(acc), c)
    else:
        xb, xt = _blocks(x)
        main = _entropy_block_stats(xb.to(acc), c)
        tail = _entropy_block_stats(xt.to(acc), c)
        m, shift, shift_tail, w, w_tail = _merge(main[0], tail[0], c)
        s = (main[1] * w).sum(-1) + tail[1] * w_tail
        d = ((main[2] + shift * main[1]) * w).sum(-1) + (tail[2] + shift_tail * tail[1]) * w_tail
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
    d = torch.where(live_x, ex * (x - y), 0.0).sum(-1)
    hx = torch.where(live_x, ex * sx_, 0.0).sum(-1)
    hy = torch.where(y > _NEG_INF, ey * sy_, 0.0).sum(-1)
    return mx.squeeze(-1), ex.sum(-1), d, my.squeeze(-1), ey.sum(-1), hx, hy


def joint_forward_core(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    """``[rows, vocab]`` -> (values ``[rows, 3]`` = (KL, H(p), H(q)), float64 stats ``[rows, 5]``).

    One read of each input: the KL's block sums and each entropy's ``h`` (merged as in
    `entropy_forward_core`); the stats are ``(lse_x, lse_y, a_x, b_x, b_y)`` (see `._torch`).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = (inv_t * LOG2E).to(acc)
    if x.shape[-1] <= BLOCK:
        mx, sx, d, my, sy, hx, hy = _joint_block_stats(x.to(acc), y.to(acc), c)
    else:
        (xb, xt), (yb, yt) = _blocks(x), _blocks(y)
        main = _joint_block_stats(xb.to(acc), yb.to(acc), c)
        tail = _joint_block_stats(xt.to(acc), yt.to(acc), c)
        mx, shx, shx_t, wx, wx_t = _merge(main[0], tail[0], c)
        my, shy, shy_t, wy, wy_t = _merge(main[3], tail[3], c)
        sx = (main[1] * wx).sum(-1) + tail[1] * wx_t
        d = (main[2] * wx).sum(-1) + tail[2] * wx_t
        sy = (main[4] * wy).sum(-1) + tail[4] * wy_t
        hx = ((main[5] + shx * main[1]) * wx).sum(-1) + (tail[5] + shx_t * tail[1]) * wx_t
        hy = ((main[6] + shy * main[4]) * wy).sum(-1) + (tail[6] + shy_t * tail[4]) * wy_t
    return _rows.finish_joint((mx, sx, d, my, sy, hx, hy), inv_t, acc)


def joint_backward_core(grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    """Pointwise gradients of ``sum(grad * (KL, H(p), H(q)))`` for ``[rows, vocab]`` logits, in their dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx, gy = _torch.joint_chunk_grads(x, y, stats, grad, inv_t.to(acc))
    return gx.to(x.dtype), gy.to(y.dtype)


def forward_core(x: Tensor, y: Tensor, inv_t: Tensor, divergence: str = "kl") -> tuple[Tensor, Tensor]:
    """``[rows, vocab]`` -> (value ``[rows]``, stats ``[rows, 4]``); see `._torch` for the stats."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if divergence == "hellinger":
        return _rows.finish_divergence(divergence, _hellinger_stats(x, y, inv_t), acc)
    lse = _lse_stats(x, y, inv_t)
    if divergence == "kl":
        return _rows.finish_divergence(divergence, lse, acc)
    a_x, a_y = _torch.jsd_partial(x.to(acc), y.to(acc), lse[0], lse[1], inv_t.to(acc))
    return _rows.finish_jsd(lse[0], lse[1], a_x, a_y, acc)


def backward_core(
    grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor, divergence: str = "kl"
) -> tuple[Tensor, Tensor]:
    """Pointwise gradients of ``[rows, vocab]`` logits, in the inputs' dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx, gy = _torch.chunk_grads(x, y, stats, grad, inv_t.to(acc), divergence)
    return gx.to(x.dtype), gy.to(y.dtype)


def entropy_backward_core(grad: Tensor, x: Tensor, stats: Tensor, inv_t: Tensor) -> Tensor:
    """Pointwise entropy gradient of ``[rows, vocab]`` logits, in their dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _torch.entropy_chunk_grad(x, stats, grad, inv_t.to(acc)).to(x.dtype)


# ----------------------------------------------------------------------------- compilation and caching

_state = {"broken": False}


@functools.cache
def available() -> bool:
    """Whether ``torch.compile`` can be used here at all (Dynamo supported, a C++ compiler for CPU)."""
    try:
        import torch._dynamo
        import torch._inductor.config as inductor_config
    except Exception:  # pragma: no cover - broken installs
        return False
    if not torch._dynamo.is_dynamo_supported():
        return False
    cxx = inductor_config.cpp.cxx[-1] if isinstance(inductor_config.cpp.cxx, tuple) else inductor_config.cpp.cxx
    return shutil.which(str(cxx)) is not None or torch.cuda.is_available()


def usable() -> bool:
    """``available()`` and no compilation has failed in this process yet."""
    return not _state["broken"] and available()


def usable_or_tracing() -> bool:
    """`usable`, or inside a caller's ``torch.compile`` (where the plain cores are traced, not compiled
    here, and `available` must not be traced)."""
    return torch.compiler.is_compiling() or usable()


def mark_broken() -> None:
    _state["broken"] = True


def _options() -> dict[str, object]:
    import torch._inductor.config as inductor_config

    # Let the C++ compiler contract a * b + c into FMAs (fewer instructions in the exp2-heavy loop).
    if hasattr(inductor_config.cpp, "enable_floating_point_contract_flag"):
        return {"cpp.enable_floating_point_contract_flag": "fast"}
    return {}


def _forward_kl(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return forward_core(x, y, inv_t, "kl")


def _forward_jsd(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return forward_core(x, y, inv_t, "jsd")


def _forward_hellinger(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return forward_core(x, y, inv_t, "hellinger")


def _backward_kl(grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return backward_core(grad, x, y, stats, inv_t, "kl")


def _backward_jsd(grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return backward_core(grad, x, y, stats, inv_t, "jsd")


def _backward_hellinger(grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return backward_core(grad, x, y, stats, inv_t, "hellinger")


_CORES: dict[tuple[str, str], Callable[..., Any]] = {
    ("forward", "kl"): _forward_kl,
    ("forward", "jsd"): _forward_jsd,
    ("forward", "hellinger"): _forward_hellinger,
    ("forward", "entropy"): entropy_forward_core,
    ("backward", "kl"): _backward_kl,
    ("backward", "jsd"): _backward_jsd,
    ("backward", "hellinger"): _backward_hellinger,
    ("backward", "entropy"): entropy_backward_core,
    ("forward", "joint"): joint_forward_core,
    ("backward", "joint"): joint_backward_core,
}


@functools.cache
def _compiled(kind: str, dtype: torch.dtype, op: str) -> Callable[..., Any]:
    """One compiled function per (kind, dtype, op), kept for the life of the process.

    Dynamo keeps its graphs (and its recompile limit) per code object, so each variant gets a copy
    of the core's code object: a new dtype never evicts another dtype's graphs.
    """
    core = _CORES["forward" if kind == "forward_small" else kind, op]
    tag = f"{core.__name__}_{kind}_{str(dtype).removeprefix('torch.')}"
    clone = types.FunctionType(core.__code__.replace(co_name=tag), core.__globals__, tag)
    return torch.compile(clone, dynamic=True, fullgraph=True, options=_options())


def _call(kind: str, dtype: torch.dtype, op: str, *args: Tensor) -> Any:
    if torch.compiler.is_compiling():  # inside the caller's torch.compile: trace the plain function
        return _CORES[kind, op](*args)
    if kind == "forward" and args[0].shape[-1] <= BLOCK:  # a separate graph for the one-block case
        return _compiled("forward_small", dtype, op)(*args)
    return _compiled(kind, dtype, op)(*args)


def _jsd_partial_core(x: Tensor, y: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _torch.jsd_partial(x, y, lse_x, lse_y, inv_t.to(acc))


@functools.cache
def _compiled_jsd_partial(dtype: torch.dtype) -> Callable[..., tuple[Tensor, Tensor]]:
    tag = f"_jsd_partial_{str(dtype).removeprefix('torch.')}"
    core = _jsd_partial_core
    clone = types.FunctionType(core.__code__.replace(co_name=tag), core.__globals__, tag)
    return torch.compile(clone, dynamic=True, fullgraph=True, options=_options())


def jsd_partial(x: Tensor, y: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """Compiled `._torch.jsd_partial` of ``[rows, vocab]`` logits (no chunk-sized temporaries)."""
    if torch.compiler.is_compiling():
        return _jsd_partial_core(x, y, lse_x, lse_y, _scalar(inv_t, x))
    return _compiled_jsd_partial(x.dtype)(x.detach(), y.detach(), lse_x, lse_y, _scalar(inv_t, x))


def jsd_partial_or_eager() -> Callable[..., tuple[Tensor, Tensor]]:
    """The second JSD sweep for backends that have none of their own: `jsd_partial` where
    ``torch.compile`` is usable (or being traced), else the chunked eager `._torch.jsd_partial_chunked`."""
    return jsd_partial if usable_or_tracing() else _torch.jsd_partial_chunked


def _scalar(value: float, x: Tensor) -> Tensor:
    """``1/T`` as a float64 0-d tensor: a graph input, so a new temperature does not recompile."""
    return torch.full((), value, dtype=torch.float64, device=x.device)


def _forward_rows(
    op: str, inputs: tuple[Tensor, ...], temperature: float, values: tuple[int, ...], n_stats: int
) -> tuple[Tensor, Tensor]:
    """The compiled forward of ``op`` over ``[batch, seq, vocab]`` inputs, as 2-D row views (no copy).

    Returns the values ``[batch, seq, *values]`` and the float64 stats ``[batch, seq, n_stats]``.
    """
    x = inputs[0]
    lead = x.shape[:-1]
    if lead.numel() == 0:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_zeros((*lead, *values), dtype=acc), x.new_zeros((*lead, n_stats), dtype=torch.float64)
    inv_t = _scalar(1.0 / temperature, x)
    parts = [_call("forward", x.dtype, op, *rows, inv_t) for rows in _rows.row_views(*inputs)]
    if len(parts) == 1:
        value, stats = parts[0]
    else:
        value, stats = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return value.view(*lead, *values), stats.view(*lead, n_stats)


def _backward_rows(
    op: str, grad: Tensor, inputs: tuple[Tensor, ...], stats: Tensor, temperature: float
) -> tuple[Tensor, ...]:
    """The compiled backward of ``op``: the gradients w.r.t. each of ``inputs``, in their dtypes."""
    x = inputs[0]
    if x.numel() == 0:
        return tuple(torch.zeros_like(t) for t in inputs)
    inv_t = _scalar(1.0 / temperature, x)
    views = _rows.row_views(*inputs)

    def run(g: Tensor, rows: tuple[Tensor, ...], s: Tensor) -> tuple[Tensor, ...]:
        out = _call("backward", x.dtype, op, g, *rows, s, inv_t)
        return out if isinstance(out, tuple) else (out,)

    if len(views) == 1:
        grads = run(grad.reshape(-1, *grad.shape[2:]), views[0], stats.reshape(-1, stats.shape[-1]))
        return tuple(g.view(t.shape) for g, t in zip(grads, inputs))
    per_batch = [run(grad[b], rows, stats[b]) for b, rows in enumerate(views)]
    return tuple(torch.stack(gs) for gs in zip(*per_batch))


def forward(x: Tensor, y: Tensor, temperature: float, divergence: str = "kl") -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (value ``[batch, seq]``, stats ``[batch, seq, 4]``)."""
    return _forward_rows(divergence, (x, y), temperature, (), 4)


def backward(
    grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, temperature: float, divergence: str = "kl"
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``x`` and ``y`` (``[batch, seq, vocab]``), in their dtypes."""
    gx, gy = _backward_rows(divergence, grad, (x, y), stats, temperature)
    return gx, gy


def entropy_forward(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (entropy ``[batch, seq]``, stats ``[batch, seq, 2]``)."""
    return _forward_rows("entropy", (x,), temperature, (), 2)


def entropy_backward(grad: Tensor, x: Tensor, stats: Tensor, temperature: float) -> Tensor:
    """Gradient w.r.t. ``x`` (``[batch, seq, vocab]``), in its dtype."""
    return _backward_rows("entropy", grad, (x,), stats, temperature)[0]


def joint_forward(x: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (values ``[batch, seq, 3]`` = (KL, H(p), H(q)), stats ``[batch, seq, 5]``)."""
    return _forward_rows("joint", (x, y), temperature, (3,), 5)


def joint_backward(grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``x`` and ``y`` (``[batch, seq, vocab]``) of ``sum(grad * (KL, H(p), H(q)))``."""
    gx, gy = _backward_rows("joint", grad, (x, y), stats, temperature)
    return gx, gy
