"""Benchmarks of visual_dependency's backends at Qwen2.5-VL sizes (pytest-benchmark; no timed asserts).

Run ``python benchmarks/run.py`` (it writes ``benchmarks/RESULTS.md``) or
``python -m pytest benchmarks/bench_visual_dependency.py --benchmark-json=out.json``.

Providers on ``[tokens, vocab]`` logits (vocab 151 936, fp32 and bf16):

- ``naive``: ``log_softmax`` of both inputs, then ``kl_div``, in the input dtype (what a user writes);
- ``torch``, ``compile``, ``cpu``, ``triton``: ``visual_dependency(..., backend=...)`` (``auto`` is
  ``cpu`` on the CPU at these sizes when a C compiler is found, else ``compile``, and ``triton`` on
  CUDA; each row records what ``auto`` resolved to);
- ``compile+bwd``, ``cpu+bwd``, ``triton+bwd``: forward and backward w.r.t. both inputs (KL as a loss);
- ``liger``, ``liger-none``, ``liger+bwd`` (CUDA, if installed): ``log_softmax`` of both inputs, then
  Liger-Kernel's ``LigerKLDIVLoss``: with ``reduction="sum"`` (its fastest mode, which returns only the
  batch total), with ``reduction="none"`` and a row sum (per-token values like ours; it writes
  ``[tokens, vocab]`` float32), and forward + backward of the sum (Liger gives no gradient to its
  target, so only ``y`` gets one: less work than our ``+bwd`` rows, which differentiate both);
- ``exp-floor``: a reference, not a provider: a compiled ``sum(exp2(x)) + sum(exp2(y))``, the least
  arithmetic any exact method does (two exponentials per vocabulary entry).

The squared Hellinger distance, the Jensen-Shannon divergence and the token entropy run on the same
kernels (``test_other``, groups ``hellinger ...``, ``jsd ...`` and ``entropy ...``,
``VPPO_BENCH_OTHER_TOKENS``, default ``2048``): ``naive`` is ``softmax`` of both then
``1 - sum sqrt(p q)``, resp. ``log_softmax`` of both, ``logaddexp`` for ``log m`` and the two sums,
resp. ``log_softmax`` then ``-sum p log p``, in the input dtype; ``torch``, ``compile``, ``cpu``,
``triton`` and ``+bwd`` call ``visual_dependency(..., divergence="hellinger")`` (``"jsd"``) resp.
``token_entropy``. The entropy reads one input, so its bytes are those
of ``x`` alone. Group ``kl+entropies``: ``visual_dependency_and_entropies`` (``torch``, ``compile``,
``cpu``, ``triton``, ``+bwd``: the gradient of the sum of the three values) against ``separate`` (the
same three values from ``visual_dependency`` and two ``token_entropy`` calls, compiled;
``separate-cpu`` with the cpu backend, ``separate-triton`` on CUDA) and ``naive`` (``log_softmax`` of
both, then the three sums).

Group ``sliced``: ``logits[:, :-1]`` of ``[4, 513, vocab]`` fp32 logits, the usual way to drop the
last position, whose rows do not flatten to one 2-D view (``naive``, ``compile``, ``cpu``,
``triton`` and their ``+bwd``).

Logit-free providers on ``[tokens, 3584]`` hidden states and a ``[151 936, 3584]`` weight:
``hidden`` (``visual_dependency_from_hidden``) against ``matmul`` (the two GEMMs it needs,
materialising the logits, nothing else).

Reported per row (``extra_info``): effective GB/s (the least traffic / best time: the bytes of the
inputs read once, three times that for ``+bwd``, see ``traffic_factor``), its fraction of the read
bandwidth measured in the same session, and the peak extra memory of one call (see ``conftest.py``).
Sizes: ``VPPO_BENCH_TOKENS`` (default ``512,2048,8192``) and ``VPPO_BENCH_HIDDEN_TOKENS`` (default
``512`` on CPU, ``2048`` on CUDA); a size is skipped when its inputs and the provider's temporaries
would not fit in the available memory.
"""

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import RUN_ID, GiB, device, peak_extra_bytes, sync
from vppo_core import (
    kernels,
    token_entropy,
    visual_dependency,
    visual_dependency_and_entropies,
    visual_dependency_from_hidden,
)

VOCAB = 151_936
HIDDEN = 3_584
DEV = device()
CUDA = DEV.type == "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _env_ints(name: str, default: str) -> list[int]:
    return [int(v) for v in os.environ.get(name, default).split(",") if v.strip()]


TOKENS = _env_ints("VPPO_BENCH_TOKENS", "512,2048,8192")
HIDDEN_TOKENS = _env_ints("VPPO_BENCH_HIDDEN_TOKENS", "2048" if CUDA else "512")


def available_bytes() -> int:
    if CUDA:  # what the driver has free, plus what PyTorch's allocator holds cached for reuse
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- providers


def naive(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp, logq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


@functools.cache
def _liger(reduction: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """KL(p || q) through Liger-Kernel: its input is log q, its target log p (``log_target=True``)."""
    from liger_kernel.transformers import LigerKLDIVLoss

    loss = LigerKLDIVLoss(reduction=reduction, log_target=True)
    if reduction == "none":  # [tokens, vocab] float32 terms: the row sums are the per-token KL
        return lambda x, y: loss(torch.log_softmax(y, -1), torch.log_softmax(x, -1)).sum(-1)
    return lambda x, y: loss(torch.log_softmax(y, -1), torch.log_softmax(x, -1))


def _liger_backward(x: torch.Tensor, y: torch.Tensor) -> Any:
    """Forward and backward of Liger's summed KL; its target (``x``'s side) receives no gradient."""
    y = y.detach().requires_grad_()
    return torch.autograd.grad(_liger("sum")(x, y), (y,))


@functools.cache
def _exp_floor() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def floor(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.exp2(x.float()).sum(-1) + torch.exp2(y.float()).sum(-1)

    return torch.compile(floor, dynamic=True)


def _with_backward(backend: str) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    def run(x: torch.Tensor, y: torch.Tensor) -> Any:
        x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
        dep = visual_dependency(x, y, backend=backend)
        return torch.autograd.grad(dep.sum(), (x, y))

    return run


PROVIDERS: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "naive": naive,
    "torch": lambda x, y: visual_dependency(x, y, backend="torch"),
    "compile": lambda x, y: visual_dependency(x, y, backend="compile"),
    "compile+bwd": _with_backward("compile"),
    "cpu": lambda x, y: visual_dependency(x, y, backend="cpu"),
    "cpu+bwd": _with_backward("cpu"),
    "triton": lambda x, y: visual_dependency(x, y, backend="triton"),
    "triton+bwd": _with_backward("triton"),
    "liger": lambda x, y: _liger("sum")(x, y),
    "liger-none": lambda x, y: _liger("none")(x, y),
    "liger+bwd": _liger_backward,
    "exp-floor": lambda x, y: _exp_floor()(x, y),
}
GPU_ONLY = {"triton", "triton+bwd", "liger", "liger-none", "liger+bwd"}
CPU_ONLY = {"cpu", "cpu+bwd", "separate-cpu"}


def extra_bytes_estimate(provider: str, tokens: int, dtype: torch.dtype) -> int:
    """Inputs plus the provider's temporaries (for skipping sizes that cannot fit)."""
    one = tokens * VOCAB
    inputs = 2 * one * torch.finfo(dtype).bits // 8
    if provider == "naive" or provider.startswith("liger"):
        return inputs + 6 * one * 4  # two float32 upcasts, two log_softmax outputs, kl_div's output, ...
    if provider.endswith("+bwd"):
        return 2 * inputs + 2 * one * 4 // 8
    return inputs + inputs // 8


_CACHE: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def inputs(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a realistic spread (std 3) and a perturbed copy; one size is kept at a time."""
    key = (tokens, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        g = torch.Generator(device=DEV).manual_seed(0)
        x = torch.randn(tokens, VOCAB, generator=g, device=DEV).mul_(3.0)
        y = torch.randn(tokens, VOCAB, generator=g, device=DEV).add_(x)
        _CACHE[key] = (x.to(dtype), y.to(dtype))
        del x, y
    return _CACHE[key]


def _rounds(seconds_per_call: float) -> int:
    return max(2, min(10, math.ceil(6.0 / max(seconds_per_call, 1e-3))))


def traffic_factor(provider: str) -> float:
    """The least memory traffic of a provider, in units of its input bytes.

    A forward reads each input once (1). A forward + backward that returns every input's gradient
    reads the inputs twice (a vocabulary row does not fit in on-chip memory, so the backward reads it
    again after the row statistics are known) and writes gradients of the same size: 3.
    ``liger+bwd`` writes the gradient of one input of two: 2.5.
    """
    if provider == "liger+bwd":
        return 2.5
    return 3.0 if provider.endswith("+bwd") else 1.0


def _run(
    benchmark: Any,
    fn: Callable[[], Any],
    nbytes: int,
    bandwidth: dict[str, float],
    ref_bytes: int,
    provider: str,
) -> None:
    """Time ``fn``; ``nbytes`` are its input bytes, ``ref_bytes`` what its peak memory is compared with."""
    sync()
    t = time.perf_counter()
    fn()  # first call: includes compilation for the compiled providers
    sync()
    first = time.perf_counter() - t
    t = time.perf_counter()
    peak = peak_extra_bytes(fn)  # the second call: peak memory, and its time sizes the rounds
    second = time.perf_counter() - t

    def timed() -> None:
        fn()
        sync()

    benchmark.pedantic(timed, rounds=_rounds(second), iterations=1, warmup_rounds=0)
    best = benchmark.stats.stats.min
    traffic = round(nbytes * traffic_factor(provider))
    gbps = traffic / best / 1e9
    benchmark.extra_info.update(
        {
            "device": DEV.type,
            "run": RUN_ID,
            "first_call_s": round(first, 3),
            "input_bytes": nbytes,
            "bytes": traffic,
            "read_GBps": bandwidth["read_GBps"],
            "GBps": round(gbps, 2),
            "frac_read_bw": round(gbps / bandwidth["read_GBps"], 4),
            "floor_s": traffic / bandwidth["read_GBps"] / 1e9,
            "peak_extra_bytes": peak,
            "peak_extra_frac": None if peak is None else round(peak / ref_bytes, 5),
        }
    )


CASES = [
    (tokens, dname, provider)
    for tokens in TOKENS
    for dname in DTYPES
    for provider in PROVIDERS
    if not (provider in GPU_ONLY and not CUDA) and not (provider in CPU_ONLY and CUDA)
]


@pytest.mark.parametrize(("tokens", "dtype_name", "provider"), CASES, ids=[f"{t}-{d}-{p}" for t, d, p in CASES])
def test_logits(benchmark: Any, bandwidth: dict[str, float], tokens: int, dtype_name: str, provider: str) -> None:
    dtype = DTYPES[dtype_name]
    if provider.startswith("liger"):
        pytest.importorskip("liger_kernel")
    need = extra_bytes_estimate(provider, tokens, dtype)
    if need > 0.85 * (available_bytes() + (2 * tokens * VOCAB * dtype.itemsize if (tokens, dtype) in _CACHE else 0)):
        pytest.skip(f"needs ~{need / GiB:.1f} GiB, more than this machine has available")
    x, y = inputs(tokens, dtype)
    fn = PROVIDERS[provider]
    benchmark.group = f"logits {tokens}x{VOCAB} {dtype_name}"
    benchmark.extra_info.update({"tokens": tokens, "vocab": VOCAB, "dtype": dtype_name, "provider": provider})
    benchmark.extra_info["auto"] = kernels.resolve_backend("auto", x)  # the backend auto picks for these
    nbytes = 2 * x.numel() * x.element_size()
    _run(benchmark, lambda: fn(x, y), nbytes, bandwidth, ref_bytes=nbytes, provider=provider)


# ----------------------------------------------------------------------------- Hellinger and entropy

OTHER_TOKENS = _env_ints("VPPO_BENCH_OTHER_TOKENS", "2048")


def naive_hellinger(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.sqrt(torch.softmax(x, -1) * torch.softmax(y, -1)).sum(-1)


def naive_entropy(x: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(x, -1)
    return -(logp.exp() * logp).sum(-1)


def naive_jsd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))


def _divergence(divergence: str) -> Callable[..., Callable[[torch.Tensor, torch.Tensor], Any]]:
    def make(backend: str, bwd: bool = False) -> Callable[[torch.Tensor, torch.Tensor], Any]:
        def run(x: torch.Tensor, y: torch.Tensor) -> Any:
            if not bwd:
                return visual_dependency(x, y, divergence=divergence, backend=backend)
            x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
            return torch.autograd.grad(visual_dependency(x, y, divergence=divergence, backend=backend).sum(), (x, y))

        return run

    return make


def _entropy(backend: str, bwd: bool = False) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    def run(x: torch.Tensor, y: torch.Tensor) -> Any:
        if not bwd:
            return token_entropy(x, backend=backend)
        x = x.detach().requires_grad_()
        return torch.autograd.grad(token_entropy(x, backend=backend).sum(), (x,))

    return run


OTHER: dict[str, dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]] = {
    quantity: {
        "naive": {"hellinger": naive_hellinger, "jsd": naive_jsd}.get(quantity, lambda x, y: naive_entropy(x)),
        **{
            name: make(backend, bwd)
            for name, backend, bwd in (
                ("torch", "torch", False),
                ("compile", "compile", False),
                ("compile+bwd", "compile", True),
                ("cpu", "cpu", False),
                ("cpu+bwd", "cpu", True),
                ("triton", "triton", False),
                ("triton+bwd", "triton", True),
            )
        },
    }
    for quantity, make in (("hellinger", _divergence("hellinger")), ("jsd", _divergence("jsd")), ("entropy", _entropy))
}


def naive_joint(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(p || q), H(p), H(q) from ``log_softmax`` of both, in the input dtype (what a user writes)."""
    lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    p, q = lp.exp(), lq.exp()
    return torch.stack([(p * (lp - lq)).sum(-1), -(p * lp).sum(-1), -(q * lq).sum(-1)], -1)


def _separate(backend: str, bwd: bool = False) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """The three values from three calls: ``visual_dependency`` and ``token_entropy`` of each input."""

    def run(x: torch.Tensor, y: torch.Tensor) -> Any:
        if bwd:
            x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
        out = (
            visual_dependency(x, y, backend=backend)
            + token_entropy(x, backend=backend)
            + token_entropy(y, backend=backend)
        )
        return torch.autograd.grad(out.sum(), (x, y)) if bwd else out

    return run


def _joint(backend: str, bwd: bool = False) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    def run(x: torch.Tensor, y: torch.Tensor) -> Any:
        if bwd:
            x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
        out = visual_dependency_and_entropies(x, y, backend=backend)
        total = out.dependency + out.entropy_img + out.entropy_noimg
        return torch.autograd.grad(total.sum(), (x, y)) if bwd else total

    return run


OTHER["kl+entropies"] = {
    "naive": naive_joint,
    "separate": _separate("compile"),
    "separate+bwd": _separate("compile", bwd=True),
    "torch": _joint("torch"),
    "compile": _joint("compile"),
    "compile+bwd": _joint("compile", bwd=True),
    "separate-cpu": _separate("cpu"),
    "cpu": _joint("cpu"),
    "cpu+bwd": _joint("cpu", bwd=True),
    "separate-triton": _separate("triton"),
    "separate-triton+bwd": _separate("triton", bwd=True),
    "triton": _joint("triton"),
    "triton+bwd": _joint("triton", bwd=True),
}
GPU_ONLY |= {"separate-triton", "separate-triton+bwd"}

OTHER_CASES = [
    (tokens, dname, quantity, provider)
    for tokens in OTHER_TOKENS
    for dname in DTYPES
    for quantity in OTHER
    for provider in OTHER[quantity]
    if not (provider in GPU_ONLY and not CUDA) and not (provider in CPU_ONLY and CUDA)
]


@pytest.mark.parametrize(
    ("tokens", "dtype_name", "quantity", "provider"),
    OTHER_CASES,
    ids=[f"{t}-{d}-{q}-{p}" for t, d, q, p in OTHER_CASES],
)
def test_other(
    benchmark: Any, bandwidth: dict[str, float], tokens: int, dtype_name: str, quantity: str, provider: str
) -> None:
    dtype = DTYPES[dtype_name]
    need = extra_bytes_estimate(provider, tokens, dtype)
    if need > 0.85 * (available_bytes() + (2 * tokens * VOCAB * dtype.itemsize if (tokens, dtype) in _CACHE else 0)):
        pytest.skip(f"needs ~{need / GiB:.1f} GiB, more than this machine has available")
    x, y = inputs(tokens, dtype)
    fn = OTHER[quantity][provider]
    benchmark.group = f"{quantity} {tokens}x{VOCAB} {dtype_name}"
    benchmark.extra_info.update(
        {"tokens": tokens, "vocab": VOCAB, "dtype": dtype_name, "provider": provider, "quantity": quantity}
    )
    nbytes = (1 if quantity == "entropy" else 2) * x.numel() * x.element_size()
    _run(benchmark, lambda: fn(x, y), nbytes, bandwidth, ref_bytes=nbytes, provider=provider)


# ----------------------------------------------------------------------------- sliced logits, batch > 1

SLICED_BATCH, SLICED_SEQ = 4, 512
SLICED_CASES = [
    p
    for p in ("naive", "compile", "compile+bwd", "cpu", "cpu+bwd", "triton", "triton+bwd")
    if not (p in GPU_ONLY and not CUDA) and not (p in CPU_ONLY and CUDA)
]


@pytest.mark.parametrize("provider", SLICED_CASES)
def test_sliced(benchmark: Any, bandwidth: dict[str, float], provider: str) -> None:
    """``logits[:, :-1]`` of ``[4, 513, vocab]`` fp32 logits: rows that do not flatten to one 2-D view
    (the fused backends run them per batch element, read in place)."""
    tokens = SLICED_BATCH * SLICED_SEQ
    need = extra_bytes_estimate(provider, tokens, torch.float32)
    if need > 0.85 * available_bytes():
        pytest.skip(f"needs ~{need / GiB:.1f} GiB, more than this machine has available")
    full_x, full_y = inputs(SLICED_BATCH * (SLICED_SEQ + 1), torch.float32)
    x = full_x.view(SLICED_BATCH, SLICED_SEQ + 1, VOCAB)[:, :-1]
    y = full_y.view(SLICED_BATCH, SLICED_SEQ + 1, VOCAB)[:, :-1]
    fn = PROVIDERS[provider]
    benchmark.group = f"sliced {SLICED_BATCH}x{SLICED_SEQ}x{VOCAB} fp32, logits[:, :-1]"
    benchmark.extra_info.update({"tokens": tokens, "vocab": VOCAB, "dtype": "fp32", "provider": provider})
    nbytes = 2 * x.numel() * x.element_size()
    _run(benchmark, lambda: fn(x, y), nbytes, bandwidth, ref_bytes=nbytes, provider=provider)


# ----------------------------------------------------------------------------- logit-free path

HIDDEN_CASES = [(t, d, p) for t in HIDDEN_TOKENS for d in DTYPES for p in ("matmul", "hidden")]


@pytest.mark.parametrize(
    ("tokens", "dtype_name", "provider"), HIDDEN_CASES, ids=[f"{t}-{d}-{p}" for t, d, p in HIDDEN_CASES]
)
def test_logit_free(benchmark: Any, bandwidth: dict[str, float], tokens: int, dtype_name: str, provider: str) -> None:
    dtype = DTYPES[dtype_name]
    logits_bytes = 2 * tokens * VOCAB * dtype.itemsize
    weight_bytes = VOCAB * HIDDEN * dtype.itemsize
    need = weight_bytes + (logits_bytes if provider == "matmul" else logits_bytes // 4)
    if need > 0.85 * available_bytes():
        pytest.skip(f"needs ~{need / GiB:.1f} GiB, more than this machine has available")
    _CACHE.clear()
    g = torch.Generator(device=DEV).manual_seed(0)
    w = (torch.randn(VOCAB, HIDDEN, generator=g, device=DEV) / HIDDEN**0.5).to(dtype)
    hx = torch.randn(tokens, HIDDEN, generator=g, device=DEV).to(dtype)
    hy = (hx.float() + 0.3 * torch.randn(tokens, HIDDEN, generator=g, device=DEV)).to(dtype)
    if provider == "matmul":

        def fn() -> Any:
            return hx @ w.T, hy @ w.T
    else:

        def fn() -> Any:
            return visual_dependency_from_hidden(hx, hy, w)

    benchmark.group = f"logit-free {tokens}x{HIDDEN}x{VOCAB} {dtype_name}"
    benchmark.extra_info.update(
        {"tokens": tokens, "vocab": VOCAB, "hidden": HIDDEN, "dtype": dtype_name, "provider": provider}
    )
    _run(benchmark, fn, logits_bytes, bandwidth, ref_bytes=logits_bytes, provider=provider)
