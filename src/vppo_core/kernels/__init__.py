"""Row-wise full-vocabulary kernels behind `vppo_core.visual_dependency` and `vppo_core.token_entropy`.

Every full-vocabulary quantity of the library goes through these kernels: the divergences of two
logit tensors (KL, reverse KL, Jensen-Shannon, squared Hellinger), the entropy of one, and the KL
with both entropies from one pass (`divergence_and_entropies`).

Three layers (as in Liger-Kernel): the kernels and launchers of each backend (``_torch``: chunked
eager; ``_compile``: ``torch.compile``; ``_cpu``: hand-vectorised C kernels for CPU tensors, built
at first use, as ``torch.library`` custom ops; ``_triton``: Triton GPU kernels as custom ops), the
autograd layer that saves tensors and delegates (``_autograd``), and the public, checked functions
in `vppo_core.dependency`, `vppo_core.entropy` and ``vppo_core._joint``, which call `divergence`,
`divergence_from_hidden`, `entropy` and `divergence_and_entropies` here. ``_hidden`` drives any backend
over tiles of logits computed from hidden states.

Backend choice (``backend="auto"``):

- CUDA tensors and Triton (3.2 or newer) installed: ``"triton"`` (float64 goes to ``"torch"``);
- inside a caller's ``torch.compile``: ``"compile"`` (its plain-torch core is traced into the graph);
- float64, or fewer than :data:`AUTO_COMPILE_MIN_ELEMENTS` logits per input: ``"torch"`` (float64 is
  for oracles and gradcheck; for small inputs a compile costs seconds and saves microseconds);
- otherwise, on the CPU, ``"cpu"`` when its C kernel builds here (a C compiler is found), then
  ``"compile"`` when ``torch.compile`` works here, else ``"torch"``. If compiling fails at run time,
  in the forward or the backward, the process warns once and uses ``"torch"`` from then on
  (``"cpu"`` compiles nothing: its forward and backward are C kernels).

Every backward gives first derivatives only: differentiating a gradient taken with
``create_graph=True`` raises (`._autograd.first_order`).
"""

import functools
import importlib.metadata
import importlib.util
import os
import re
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from . import _autograd, _compile, _cpu, _hidden, _torch

Backend = Literal["auto", "triton", "cpu", "compile", "torch"]
Divergence = Literal["kl", "reverse_kl", "jsd", "hellinger"]
BACKENDS = ("auto", "triton", "cpu", "compile", "torch")
DIVERGENCES = ("kl", "reverse_kl", "jsd", "hellinger")

#: Below this many logits per input, ``backend="auto"`` uses the eager ``"torch"`` path.
AUTO_COMPILE_MIN_ELEMENTS = 1 << 20


#: The oldest Triton the Triton backend uses. Its interpreter passes the kernels' tests (as do 3.6's
#: and 3.9's; 3.0's computes wrong sums), and 3.3, 3.4, 3.6 and 3.9 compile them for sm_80/90/100.
TRITON_MIN_VERSION = (3, 2)


def _triton_version() -> tuple[int, int] | None:
    """(major, minor) of the installed Triton, read without importing it; None if it is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # e.g. installed as pytorch-triton
        import triton

        version = triton.__version__
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


_TRITON_VERSION = _triton_version()


def triton_usable() -> bool:
    """Triton is installed, at `TRITON_MIN_VERSION` or newer."""
    return _TRITON_VERSION is not None and _TRITON_VERSION >= TRITON_MIN_VERSION


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or (os.environ.get("TRITON_INTERPRET", "0") == "1" and device.type == "cpu")


@functools.cache
def _warn_cpu_build_failed() -> None:
    """Once per process: ``"auto"`` skips ``"cpu"`` because a compiler exists but the build failed (no
    compiler at all is the documented, silent case)."""
    reason = _cpu.unavailable_reason()
    if reason is not None and reason != _cpu.NO_COMPILER:
        warnings.warn(
            f"vppo_core: the 'cpu' backend's C kernel did not build, so backend='auto' uses "
            f"'compile' or 'torch' on the CPU (slower): {reason}",
            RuntimeWarning,
            stacklevel=4,
        )


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that runs for ``backend`` on logits like ``x``; raises if an explicit one cannot run."""
    return _resolve(backend, x.device, x.dtype, x.numel())


def _resolve(backend: str, device: torch.device, dtype: torch.dtype, numel: int) -> str:
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64 and triton_usable():
            return "triton"
        if torch.compiler.is_compiling():
            return "compile"
        if dtype == torch.float64 or numel < AUTO_COMPILE_MIN_ELEMENTS:
            return "torch"
        if device.type == "cpu":
            if _cpu.available():
                return "cpu"
            _warn_cpu_build_failed()
        return "compile" if _compile.usable() else "torch"
    if backend == "triton":
        if _TRITON_VERSION is None:
            raise ValueError("backend='triton' needs the triton package (pip install 'vppo_core[triton]')")
        if not triton_usable():
            need, got = ".".join(map(str, TRITON_MIN_VERSION)), ".".join(map(str, _TRITON_VERSION))
            raise ValueError(f"backend='triton' needs triton >= {need}, got triton {got}; use backend='compile'")
        if not _triton_runs_on(device):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter), "
                f"got a tensor on {device}; use backend='compile' or 'torch' on this device"
            )
        if dtype == torch.float64:
            raise ValueError("backend='triton' computes in float32; use backend='torch' for float64 inputs")
        return "triton"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got a tensor on {device}")
        if dtype not in _cpu.DTYPES:
            raise ValueError(f"backend='cpu' takes float32, bfloat16 or float16 logits, got {dtype}; use 'torch'")
        reason = None if torch.compiler.is_compiling() else _cpu.unavailable_reason()
        if reason == _cpu.NO_COMPILER:
            raise ValueError("backend='cpu' needs a C compiler to build its kernel (cc, gcc or clang, or $CC)")
        if reason is not None:
            raise ValueError(f"backend='cpu' could not build its kernel: {reason}")
        return "cpu"
    if backend == "compile" and not torch.compiler.is_compiling() and not _compile.available():
        raise ValueError("backend='compile' needs a working torch.compile (Dynamo and a C++ compiler for CPU)")
    return backend


def _dispatch(
    backend: str,
    x: Tensor,
    triton_fn: Callable[[], Tensor],
    fused_fn: Callable[[str, bool], Tensor],
    torch_fn: Callable[[], Tensor],
) -> Tensor:
    """Run the backend that `resolve_backend` picks; ``"auto"`` falls back to ``"torch"`` if compiling fails,
    in the forward here and in the backward (``fused_fn``'s second argument).

    ``fused_fn(impl, fallback)`` runs the ``"compile"`` or ``"cpu"`` backend.
    """
    name = resolve_backend(backend, x)
    if name == "triton":
        return triton_fn()
    if name == "cpu":
        return fused_fn("cpu", False)  # C forward and backward: nothing to fall back from
    if name == "compile":
        if backend != "auto" or torch.compiler.is_compiling():
            return fused_fn("compile", False)
        try:
            return fused_fn("compile", True)
        except Exception as err:  # a compiler that is missing or broken at run time
            _compile.fall_back(err, stacklevel=3)
    return torch_fn()


def divergence(x: Tensor, y: Tensor, temperature: float, *, divergence: str = "kl", backend: str = "auto") -> Tensor:
    """Per-row divergence of ``[batch, seq, vocab]`` logits -> ``[batch, seq]``, differentiable.

    ``divergence``: ``"kl"`` = KL(softmax(x/T) || softmax(y/T)), ``"reverse_kl"`` = KL(q || p),
    ``"jsd"`` = Jensen-Shannon, ``"hellinger"`` = squared Hellinger distance ``1 - sum_j sqrt(p_j q_j)``.
    float32 result (float64 for float64 inputs on the torch backend).
    """
    if divergence == "reverse_kl":
        x, y, divergence = y, x, "kl"
    return _dispatch(
        backend,
        x,
        lambda: _autograd.triton_divergence(x, y, temperature, divergence),
        lambda impl, fallback: _autograd.FusedDivergence.apply(x, y, temperature, divergence, impl, fallback),
        lambda: _autograd.TorchDivergence.apply(x, y, temperature, divergence),
    )


def entropy(x: Tensor, temperature: float, *, backend: str = "auto") -> Tensor:
    """Per-row entropy of ``softmax(x / T)`` for ``[batch, seq, vocab]`` logits -> ``[batch, seq]``, differentiable.

    Backend choice as for `divergence`; float32 result (float64 for float64 inputs on the torch backend).
    """
    return _dispatch(
        backend,
        x,
        lambda: _autograd.triton_entropy(x, temperature),
        lambda impl, fallback: _autograd.FusedEntropy.apply(x, temperature, impl, fallback),
        lambda: _autograd.TorchEntropy.apply(x, temperature),
    )


def divergence_and_entropies(x: Tensor, y: Tensor, temperature: float, *, backend: str = "auto") -> Tensor:
    """``[batch, seq, 3]`` = (KL(p || q), H(p), H(q)) per row of ``[batch, seq, vocab]`` logits, differentiable.

    One read of each input forward and one gradient per input backward (instead of three kernels and
    two gradient sums). Backend choice as for `divergence`.
    """
    return _dispatch(
        backend,
        x,
        lambda: _autograd.triton_joint(x, y, temperature),
        lambda impl, fallback: _autograd.FusedJoint.apply(x, y, temperature, impl, fallback),
        lambda: _autograd.TorchJoint.apply(x, y, temperature),
    )


def _row_ops(name: str) -> tuple[_hidden.ForwardFn, _hidden.BackwardFn, _hidden.PartialFn]:
    if name == "triton":
        ops = _autograd.triton_ops()

        def fwd(x: Tensor, y: Tensor, temperature: float, div: str) -> tuple[Tensor, Tensor]:
            return ops.divergence_fwd(x, y, 1.0 / temperature, ops.div_code(div))

        def bwd(g: Tensor, x: Tensor, y: Tensor, s: Tensor, temperature: float, div: str) -> tuple[Tensor, Tensor]:
            return ops.divergence_bwd(x, y, s, g, 1.0 / temperature, ops.div_code(div))

        sweep = _compile.jsd_partial_or_eager()

        def jsd_partial(x: Tensor, y: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
            return sweep(x, y, lse_x, lse_y, ops.kernel_inv_t(inv_t))  # the 1/T the kernels' lse's used

        return fwd, bwd, jsd_partial
    if name == "compile":
        return _compile.forward, _compile.backward, _compile.jsd_partial
    if name == "auto:compile":  # falls back to "torch", with one warning, if compiling fails
        return (
            functools.partial(_compile.or_eager, _compile.forward, _torch.forward),
            functools.partial(_compile.or_eager, _compile.backward, _torch.backward),
            _compile.jsd_partial_or_eager(),
        )
    if name == "cpu":
        return _cpu.forward, _cpu.backward, _cpu.jsd_partial
    return _torch.forward, _torch.backward, _torch.jsd_partial_chunked


def divergence_from_hidden(
    hx: Tensor,
    hy: Tensor,
    weight: Tensor,
    temperature: float,
    *,
    divergence: str = "kl",
    backend: str = "auto",
    token_chunk: int = 1024,
    vocab_chunk: int = 8192,
) -> Tensor:
    """Per-token divergence of the logits ``hx @ weight.T`` and ``hy @ weight.T`` (``[tokens, hidden]``
    inputs), never materialising them; differentiable w.r.t. both hidden states and the weight."""
    if divergence == "reverse_kl":
        hx, hy, divergence = hy, hx, "kl"
    tile_numel = min(token_chunk, hx.shape[0]) * min(vocab_chunk, weight.shape[0])
    name = _resolve(backend, hx.device, hx.dtype, tile_numel)
    auto_compile = name == "compile" and backend == "auto" and not torch.compiler.is_compiling()
    fwd, bwd, part = _row_ops("auto:compile" if auto_compile else name)
    return _autograd.HiddenDivergence.apply(
        hx, hy, weight, temperature, divergence, (fwd, bwd, part), token_chunk, vocab_chunk
    )


if triton_usable() and (os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available()):
    # Import (and register the custom ops) now, outside any caller's torch.compile trace.
    _autograd.triton_ops()

__all__ = [
    "AUTO_COMPILE_MIN_ELEMENTS",
    "BACKENDS",
    "DIVERGENCES",
    "Backend",
    "divergence",
    "divergence_and_entropies",
    "divergence_from_hidden",
    "entropy",
    "resolve_backend",
]
