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

Backward. One pointwise pass per element, from the row statistics the forward saved
(``lse_x, lse_y, a_x, a_y``, see `._torch`): reads both inputs, writes both gradients.

Compilation. One ``torch.compile`` function per (kind, dtype), ``dynamic=True``, so a new number of
tokens or a new vocabulary size does not recompile; the process keeps them for its lifetime and
Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) serves later processes. Inside a caller's own
``torch.compile`` the plain functions below are traced into the caller's graph instead.
"""

import functools
import math
import shutil
import types
from collections.abc import Callable

import torch
from torch import Tensor

from . import _torch

BLOCK = 4096
LOG2E = 1.4426950408889634
_NEG_INF = -math.inf

# ----------------------------------------------------------------------------- traced cores (no checks)


def _block_stats(x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Raw maxima and base-2 sums over the last axis of float32 blocks ``[..., n]``."""
    mx = x.amax(-1, keepdim=True)
    my = y.amax(-1, keepdim=True)
    ex = torch.exp2((x - torch.where(mx == _NEG_INF, 0.0, mx)) * c)
    ey = torch.exp2((y - torch.where(my == _NEG_INF, 0.0, my)) * c)
    d = torch.where(x > _NEG_INF, ex * (x - y), 0.0).sum(-1)
    return mx.squeeze(-1), ex.sum(-1), d, my.squeeze(-1), ey.sum(-1)


def _lse_stats(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float64 ``(lse_x, lse_y, sum_j p_j (x_j - y_j))`` of ``[rows, vocab]`` logits times ``inv_t`` (float64).

    ``vocab > BLOCK``: ``nb >= 1`` full blocks plus a tail of 1 to ``BLOCK`` entries, so no part is
    ever empty (an empty part would change the traced graph). ``vocab <= BLOCK``: one block per row.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = (inv_t * LOG2E).to(acc)
    if x.shape[-1] <= BLOCK:
        mx, sx, d, my, sy = _block_stats(x.to(acc), y.to(acc), c)
    else:
        nb = (x.shape[-1] - 1) // BLOCK
        main = _block_stats(
            x[:, : nb * BLOCK].unflatten(-1, (nb, BLOCK)).to(acc),
            y[:, : nb * BLOCK].unflatten(-1, (nb, BLOCK)).to(acc),
            c,
        )
        tail = _block_stats(x[:, nb * BLOCK :].to(acc), y[:, nb * BLOCK :].to(acc), c)
        mx = torch.maximum(main[0].amax(-1), tail[0])
        my = torch.maximum(main[3].amax(-1), tail[3])
        wx = torch.exp2((main[0] - mx.unsqueeze(-1)) * c)
        wy = torch.exp2((main[3] - my.unsqueeze(-1)) * c)
        wx_tail = torch.exp2((tail[0] - mx) * c)
        sx = (main[1] * wx).sum(-1) + tail[1] * wx_tail
        d = (main[2] * wx).sum(-1) + tail[2] * wx_tail
        sy = (main[4] * wy).sum(-1) + tail[4] * torch.exp2((tail[3] - my) * c)
    # Per-row finalisation in float64 (see _torch: the statistics are float64).
    lse_x = mx.double() * inv_t + torch.log(sx.double())
    lse_y = my.double() * inv_t + torch.log(sy.double())
    return lse_x, lse_y, d.double() * inv_t / sx.double()


def forward_core(x: Tensor, y: Tensor, inv_t: Tensor, jsd: bool = False) -> tuple[Tensor, Tensor]:
    """``[rows, vocab]`` -> (value ``[rows]``, stats ``[rows, 4]``); see `._torch` for the stats."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lse_x, lse_y, a_x = _lse_stats(x, y, inv_t)
    if not jsd:
        value = a_x - (lse_x - lse_y)
        return value.clamp_min(0.0).to(acc), torch.stack([lse_x, lse_y, a_x, torch.zeros_like(a_x)], -1)
    a_x, a_y = _torch.jsd_partial(x.to(acc), y.to(acc), lse_x, lse_y, inv_t.to(acc))
    a_x, a_y = a_x.double(), a_y.double()
    value = 0.5 * (a_x + a_y)
    return value.clamp_min(0.0).to(acc), torch.stack([lse_x, lse_y, a_x, a_y], -1)


def backward_core(
    grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor, jsd: bool = False
) -> tuple[Tensor, Tensor]:
    """Pointwise gradients of ``[rows, vocab]`` logits, in the inputs' dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx, gy = _torch.chunk_grads(x, y, stats, grad, inv_t.to(acc), "jsd" if jsd else "kl")
    return gx.to(x.dtype), gy.to(y.dtype)


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


def mark_broken() -> None:
    _state["broken"] = True


def _options() -> dict[str, object]:
    import torch._inductor.config as inductor_config

    # Let the C++ compiler contract a * b + c into FMAs (fewer instructions in the exp2-heavy loop).
    if hasattr(inductor_config.cpp, "enable_floating_point_contract_flag"):
        return {"cpp.enable_floating_point_contract_flag": "fast"}
    return {}


def _forward_kl(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return forward_core(x, y, inv_t, jsd=False)


def _forward_jsd(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return forward_core(x, y, inv_t, jsd=True)


def _backward_kl(grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return backward_core(grad, x, y, stats, inv_t, jsd=False)


def _backward_jsd(grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return backward_core(grad, x, y, stats, inv_t, jsd=True)


_CORES = {
    ("forward", False): _forward_kl,
    ("forward", True): _forward_jsd,
    ("backward", False): _backward_kl,
    ("backward", True): _backward_jsd,
}


@functools.cache
def _compiled(kind: str, dtype: torch.dtype, jsd: bool) -> Callable[..., tuple[Tensor, Tensor]]:
    """One compiled function per (kind, dtype, divergence), kept for the life of the process.

    Dynamo keeps its graphs (and its recompile limit) per code object, so each variant gets a copy
    of the core's code object: a new dtype never evicts another dtype's graphs.
    """
    core = _CORES["forward" if kind == "forward_small" else kind, jsd]
    tag = f"{core.__name__}_{kind}_{str(dtype).removeprefix('torch.')}"
    clone = types.FunctionType(core.__code__.replace(co_name=tag), core.__globals__, tag)
    return torch.compile(clone, dynamic=True, fullgraph=True, options=_options())


def _call(kind: str, dtype: torch.dtype, jsd: bool, *args: Tensor) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():  # inside the caller's torch.compile: trace the plain function
        return _CORES[kind, jsd](*args)
    if kind == "forward" and args[0].shape[-1] <= BLOCK:  # a separate graph for the one-block case
        return _compiled("forward_small", dtype, jsd)(*args)
    return _compiled(kind, dtype, jsd)(*args)


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


def _rows_flatten(t: Tensor) -> bool:
    """Whether ``[B, S, V]`` views as ``[B*S, V]`` without a copy."""
    return t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def _row_views(*ts: Tensor) -> list[tuple[Tensor, ...]]:
    """``[B, S, V]`` tensors -> 2-D row views covering them in order: one each if all flatten, else per batch.

    The views are detached last, which drops their ``_base``: Dynamo would otherwise guard on the
    base tensor's sizes and strides and recompile for each new layout of the caller's tensor.
    """
    if all(_rows_flatten(t) for t in ts):
        return [tuple(t.view(-1, t.shape[-1]).detach() for t in ts)]
    return [tuple(t[b].detach() for t in ts) for b in range(ts[0].shape[0])]


def _scalar(value: float, x: Tensor) -> Tensor:
    """``1/T`` as a float64 0-d tensor: a graph input, so a new temperature does not recompile."""
    return torch.full((), value, dtype=torch.float64, device=x.device)


def forward(x: Tensor, y: Tensor, temperature: float, divergence: str = "kl") -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (value ``[batch, seq]``, stats ``[batch, seq, 4]``)."""
    jsd = divergence == "jsd"
    inv_t = _scalar(1.0 / temperature, x)
    if x.shape[0] * x.shape[1] == 0:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_zeros(x.shape[:-1], dtype=acc), x.new_zeros((*x.shape[:-1], 4), dtype=torch.float64)
    parts = [_call("forward", x.dtype, jsd, xr, yr, inv_t) for xr, yr in _row_views(x, y)]
    if len(parts) == 1:
        value, stats = parts[0]
    else:
        value, stats = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return value.view(x.shape[:-1]), stats.view(*x.shape[:-1], 4)


def backward(
    grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, temperature: float, divergence: str = "kl"
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``x`` and ``y`` (``[batch, seq, vocab]``), in their dtypes."""
    jsd = divergence == "jsd"
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(y)
    inv_t = _scalar(1.0 / temperature, x)
    views = _row_views(x, y)
    if len(views) == 1:
        (xr, yr), g, s = views[0], grad.reshape(-1), stats.reshape(-1, 4)
        gx, gy = _call("backward", x.dtype, jsd, g, xr, yr, s, inv_t)
        return gx.view(x.shape), gy.view(y.shape)
    grads = [_call("backward", x.dtype, jsd, grad[b], xr, yr, stats[b], inv_t) for b, (xr, yr) in enumerate(views)]
    return torch.stack([g[0] for g in grads]), torch.stack([g[1] for g in grads])
