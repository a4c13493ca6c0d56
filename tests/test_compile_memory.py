"""The compiled passes allocate no temporaries the size of their inputs.

Inductor stores a pointwise result that calls ``exp`` or ``log`` to memory on CPU whenever it is read
more than once (a full float32 copy per such result), so a core written with ``exp`` where it reuses
the value gets a multi-GiB temporary at real sizes; `._compile_cores` forms them with ``exp2``. The
probe is the process's resident high-water mark (as in ``benchmarks/conftest.py``): every allocation,
Inductor's own buffers included, which torch's profiler does not see.
"""

import contextlib
import ctypes
import gc

import pytest
import torch

from vppo_core.kernels import _compile

ROWS, VOCAB = 64, 65_536  # 16 MiB per float32 input
SLACK = 2 * 2**20  # row statistics, thread scratch, page granularity


def _memory() -> dict[str, int]:
    """The ``kB`` fields of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        fields = (line.split(":", 1) for line in f)
        return {k: int(v.split()[0]) * 1024 for k, v in fields if v.strip().endswith("kB")}


def peak_extra(fn) -> int:
    """Resident memory above the start at its highest during ``fn()`` (skips where it cannot be read)."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = _memory()["VmRSS"]
    except (OSError, KeyError):
        pytest.skip("the resident high-water mark cannot be reset here")
    out = fn()
    peak = _memory()["VmHWM"]
    del out
    return peak - base


@pytest.fixture(scope="module")
def logits():
    if not _compile.usable():
        pytest.skip("torch.compile is not usable here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, ROWS, VOCAB, generator=g) * 3
    return x, x + torch.randn(1, ROWS, VOCAB, generator=g)


def _forward(op, x, y):
    if op == "entropy":
        return _compile.entropy_forward(x, 1.0)
    if op == "joint":
        return _compile.joint_forward(x, y, 1.0)
    return _compile.forward(x, y, 1.0, op)


def _backward(op, x, y):
    grad_shape = (1, ROWS, 3) if op == "joint" else (1, ROWS)
    grad = torch.randn(grad_shape, generator=torch.Generator().manual_seed(1))
    stats = _forward(op, x, y)[1]
    if op == "entropy":
        return lambda: _compile.entropy_backward(grad, x, stats, 1.0)
    if op == "joint":
        return lambda: _compile.joint_backward(grad, x, y, stats, 1.0)
    return lambda: _compile.backward(grad, x, y, stats, 1.0, op)


OPS = ["kl", "jsd", "hellinger", "entropy", "joint"]


@pytest.mark.parametrize("op", OPS)
def test_compiled_forward_allocates_only_row_statistics(logits, op):
    x, y = logits
    _forward(op, x, y)  # compiled (and its graph cached) outside the measurement
    extra = peak_extra(lambda: _forward(op, x, y))
    assert extra < SLACK, f"{op}: {extra / 2**20:.1f} MiB extra for {x.nbytes / 2**20:.0f} MiB inputs"


@pytest.mark.parametrize("op", OPS)
def test_compiled_backward_allocates_only_the_gradients(logits, op):
    x, y = logits
    call = _backward(op, x, y)
    call()
    extra = peak_extra(call)
    grads = x.nbytes * (1 if op == "entropy" else 2)
    assert extra < grads + SLACK, f"{op}: {(extra - grads) / 2**20:.1f} MiB beyond the gradients"


def test_compiled_jsd_sweep_allocates_only_row_sums(logits):
    x, y = (t[0] for t in logits)
    lse_x, lse_y = (torch.logsumexp(t.double(), -1) for t in (x, y))
    _compile.jsd_partial(x, y, lse_x, lse_y, 1.0)
    extra = peak_extra(lambda: _compile.jsd_partial(x, y, lse_x, lse_y, 1.0))
    assert extra < SLACK, f"{extra / 2**20:.1f} MiB extra for {x.nbytes / 2**20:.0f} MiB inputs"
