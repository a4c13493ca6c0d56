"""``torch.compile`` backend: compiles the cores of `._compile_cores` (a blocked single-read forward
and a one-pass pointwise backward) and runs them over ``[batch, seq, vocab]`` row views.

Compilation. One ``torch.compile`` function per (kind, dtype, quantity, layout), ``dynamic=True``, so a
new number of tokens or a new vocabulary size does not recompile, and the row views are brought to
one of a few layouts (`_canonical`, `_layout`) that each get their own function, so new strides
never pile up to Dynamo's recompile limit. The process keeps them for its lifetime and Inductor's
on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) serves later processes. Inside a caller's own
``torch.compile`` the plain cores are traced into the caller's graph instead. `or_eager` runs the
eager `._torch` function instead once compiling has failed (one warning per process).
"""

import functools
import shutil
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _rows, _torch
from ._chunks import compute_dtype
from ._compile_cores import (
    BLOCK,
    backward_core,
    entropy_backward_core,
    entropy_forward_core,
    forward_core,
    joint_backward_core,
    joint_forward_core,
    jsd_partial_core,
)

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


def fall_back(err: Exception, stacklevel: int = 2) -> None:
    """After ``torch.compile`` failed at run time: warn (once: `usable` is False from now on) and
    mark it broken, so that the eager `._torch` kernels run for the rest of the process."""
    if not _state["broken"]:
        warnings.warn(
            f"vppo_core: torch.compile failed ({type(err).__name__}: {err}); backend='auto' (and the backward "
            "of backend='cpu') uses the eager 'torch' kernels for the rest of this process",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
    mark_broken()


def or_eager(compiled: Callable[..., Any], eager: Callable[..., Any], *args: Any) -> Any:
    """``compiled(*args)`` while ``torch.compile`` is usable; once it fails (`fall_back`), ``eager(*args)``.

    Inside a caller's ``torch.compile`` the compiled path is traced and a failure is the caller's.
    """
    if torch.compiler.is_compiling():
        return compiled(*args)
    if usable():
        try:
            return compiled(*args)
        except Exception as err:  # a compiler that is missing or broken at run time
            fall_back(err, stacklevel=3)
    return eager(*args)


def _options() -> dict[str, object]:
    import torch._inductor.config as inductor_config

    # Let the C++ compiler contract a * b + c into FMAs (fewer instructions in the exp2-heavy loop).
    # Older releases (torch 2.4) take a bool here; setting it there contracts the two inputs' sums
    # differently, so that identical inputs no longer give exactly 0: they keep their default.
    if isinstance(getattr(inductor_config.cpp, "enable_floating_point_contract_flag", None), str):
        return {"cpp.enable_floating_point_contract_flag": "fast"}
    return {}


def _forward_kl(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return forward_core(x, y, inv_t, "kl")


def _forward_jsd(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return forward_core(x, y, inv_t, "jsd")


def _forward_hellinger(x: Tensor, y: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return forward_core(x, y, inv_t, "hellinger")


_FORWARD: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "kl": _forward_kl,
    "jsd": _forward_jsd,
    "hellinger": _forward_hellinger,
    "entropy": entropy_forward_core,
    "joint": joint_forward_core,
}


def _backward_pure(
    op: str, grad: Tensor, inputs: tuple[Tensor, ...], stats: Tensor, inv_t: Tensor
) -> tuple[Tensor, ...]:
    """The gradients of ``op`` w.r.t. each of the ``[rows, vocab]`` ``inputs``, as new tensors."""
    if op == "entropy":
        return (entropy_backward_core(grad, *inputs, stats, inv_t),)
    if op == "joint":
        return joint_backward_core(grad, *inputs, stats, inv_t)
    return backward_core(grad, *inputs, stats, inv_t, op)


def _backward_into(
    op: str, outs: tuple[Tensor, ...], grad: Tensor, inputs: tuple[Tensor, ...], stats: Tensor, inv_t: Tensor
) -> None:
    """`_backward_pure` written into ``outs``: compiled, the pointwise pass stores straight into them."""
    for out, g in zip(outs, _backward_pure(op, grad, inputs, stats, inv_t)):
        out.copy_(g)


@functools.cache
def _compiled(kind: str, dtype: torch.dtype, op: str, layout: str) -> Callable[..., Any]:
    """One compiled function per (kind, dtype, op, layout), kept for the life of the process.

    Dynamo keeps its graphs (and its recompile limit) per code object, so each variant gets a copy
    of the core's code object: a new dtype or layout (`_layout`) never evicts another's graphs, and
    the layouts a process meets never add up to the recompile limit.
    """
    core = _backward_into if kind == "backward" else _FORWARD[op]
    return _compile_copy(core, f"_{kind}_{op}_{str(dtype).removeprefix('torch.')}_{layout}")


def _compile_copy(core: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """``torch.compile`` of a copy of ``core``'s code object named ``tag`` (its own Dynamo cache)."""
    clone = types.FunctionType(core.__code__.replace(co_name=tag), core.__globals__, tag)
    return torch.compile(clone, dynamic=True, fullgraph=True, options=_options())


def _canonical(t: Tensor) -> Tensor:
    """A ``[rows, vocab]`` view with unit vocabulary stride and a row stride of ``vocab`` (contiguous)
    or more (a slice of the caller's logits, still read in place).

    A strided vocabulary axis and overlapping rows (``expand``) are copied; one row gets contiguous
    strides (a view). Fewer stride patterns, fewer graphs (see `_layout`).
    """
    rows, vocab = t.shape
    if t.stride(1) != 1 and vocab > 1:  # a strided vocabulary (as_strided below would read past a row)
        return t.contiguous()
    if rows <= 1:
        return t if t.stride() == (vocab, 1) else t.as_strided((rows, vocab), (vocab, 1))
    return t.contiguous() if t.stride(0) < vocab else t


def _fresh(t: Tensor) -> Tensor:
    """A contiguous copy at storage offset 0 of a small tensor (row statistics, upstream gradients):
    one layout for Dynamo whatever view the caller's autograd graph hands over."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _layout(*ts: Tensor) -> str:
    """The stride pattern Dynamo specialises a graph on: per ``[rows, vocab]`` argument ``c``
    (contiguous) or ``s`` (a larger row stride), and ``1`` for a single row.

    Each pattern gets its own compiled function (`_compiled`), so however many layouts and argument
    orders a process meets (slices, per-batch views, ``reverse_kl``'s swap), no function sees more than
    a graph or two, far below Dynamo's recompile limit.
    """
    return "".join("c" if t.is_contiguous() else "s" for t in ts) + ("1" if ts[0].shape[0] == 1 else "")


def _call_forward(dtype: torch.dtype, op: str, *args: Tensor) -> tuple[Tensor, Tensor]:
    if torch.compiler.is_compiling():  # inside the caller's torch.compile: trace the plain function
        return _FORWARD[op](*args)
    *rows, inv_t = args
    rows = [_canonical(t) for t in rows]
    kind = "forward_small" if rows[0].shape[-1] <= BLOCK else "forward"  # a separate graph for one block
    return _compiled(kind, dtype, op, _layout(*rows))(*rows, inv_t)


@functools.cache
def _compiled_jsd_partial(dtype: torch.dtype, layout: str) -> Callable[..., tuple[Tensor, Tensor]]:
    return _compile_copy(jsd_partial_core, f"_jsd_partial_{str(dtype).removeprefix('torch.')}_{layout}")


def jsd_partial(x: Tensor, y: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """Compiled `._torch.jsd_partial` of ``[rows, vocab]`` logits (no chunk-sized temporaries)."""
    if torch.compiler.is_compiling():
        return jsd_partial_core(x, y, lse_x, lse_y, _scalar(inv_t, x))
    x, y = _canonical(x.detach()), _canonical(y.detach())
    lse_x, lse_y = _fresh(lse_x), _fresh(lse_y)
    return _compiled_jsd_partial(x.dtype, _layout(x, y))(x, y, lse_x, lse_y, _scalar(inv_t, x))


def jsd_partial_or_eager() -> Callable[..., tuple[Tensor, Tensor]]:
    """The second JSD sweep for backends that have none of their own: `jsd_partial` where
    ``torch.compile`` is usable (or being traced), else, or once it fails (`or_eager`), the chunked
    eager `._torch.jsd_partial_chunked`."""
    return functools.partial(or_eager, jsd_partial, _torch.jsd_partial_chunked)


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
        acc = compute_dtype(x)
        return x.new_zeros((*lead, *values), dtype=acc), x.new_zeros((*lead, n_stats), dtype=torch.float64)
    inv_t = _scalar(1.0 / temperature, x)
    parts = [_call_forward(x.dtype, op, *rows, inv_t) for rows in _rows.row_views(*inputs)]
    if len(parts) == 1:
        value, stats = parts[0]
    else:
        value, stats = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return value.view(*lead, *values), stats.view(*lead, n_stats)


def _new_grads(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Contiguous uninitialised gradients shaped like ``inputs``, for the compiled backward to fill."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in inputs)


def _backward_rows(
    op: str, grad: Tensor, inputs: tuple[Tensor, ...], stats: Tensor, temperature: float
) -> tuple[Tensor, ...]:
    """The compiled backward of ``op``: the gradients w.r.t. each of ``inputs``, in their dtypes.

    Outside a caller's ``torch.compile`` the gradients are allocated here (`_new_grads`) and the
    compiled pass writes into them, one row view at a time: rows that do not flatten to one 2-D view
    fill slices of the same buffers, with no per-batch gradients to stack.
    """
    x = inputs[0]
    if x.numel() == 0:
        return tuple(torch.zeros_like(t) for t in inputs)
    inv_t = _scalar(1.0 / temperature, x)
    views = _rows.row_views(*inputs)
    flat = len(views) == 1
    pieces = (  # (upstream gradient, input rows, stats) of each row view
        [(grad.reshape(-1, *grad.shape[2:]), views[0], stats.reshape(-1, stats.shape[-1]))]
        if flat
        else [(grad[b], rows, stats[b]) for b, rows in enumerate(views)]
    )
    if torch.compiler.is_compiling():  # trace the plain functions into the caller's graph
        per_piece = [_backward_pure(op, g, rows, s, inv_t) for g, rows, s in pieces]
        if flat:
            return tuple(g.view(t.shape) for g, t in zip(per_piece[0], inputs))
        return tuple(torch.stack(gs) for gs in zip(*per_piece))
    outs = _new_grads(inputs)
    for i, (g, rows, s) in enumerate(pieces):
        targets = tuple((o.view(-1, o.shape[-1]) if flat else o[i]).detach() for o in outs)  # no _base guards
        rows = tuple(map(_canonical, rows))
        g, s = _fresh(g), _fresh(s)
        layout = _layout(*targets, *rows)
        _compiled("backward", x.dtype, op, layout)(op, targets, g, rows, s, inv_t)
    return outs


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
