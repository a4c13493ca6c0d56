"""Gradient buffers of the CPU backward passes (`vppo_core.kernels._alloc`).

- Large CPU buffers are advised to use transparent huge pages (seen in the kernel's ``VmFlags``).
- The advice is never given to small buffers, other devices, fake tensors or inside tracing.
- The compiled backward writes into the buffers it allocated (no second copy of a gradient), for
  row views that flatten and for per-batch views, and gives the same gradients as the torch backend.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vppo_core.kernels as K
from vppo_core import token_entropy, visual_dependency
from vppo_core.kernels import _alloc, _compile, _torch

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def vm_flags(address: int) -> set[str]:
    """The ``VmFlags`` of the mapping of this process that contains ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping contains {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists(), reason="needs Linux with THP")
def test_large_cpu_buffer_is_advised_to_use_huge_pages():
    like = torch.empty(4096, 1024)  # 16 MiB
    out = _alloc.empty_grad(like)
    assert out.shape == like.shape and out.dtype == like.dtype and out.is_contiguous()
    middle = out.data_ptr() + out.nbytes // 2
    assert "hg" in vm_flags(middle)  # VM_HUGEPAGE: set by madvise(MADV_HUGEPAGE)
    out.fill_(1.0)  # writable, and the advice does not change the values
    assert torch.equal(out, torch.ones_like(out))


def test_advice_only_for_large_real_cpu_buffers(monkeypatch):
    advised = []
    monkeypatch.setattr(_alloc, "advise_huge_pages", lambda t: advised.append(t.nbytes) or True)
    _alloc.empty_grad(torch.empty(16, 16))  # 1 KiB
    _alloc.empty_grad(torch.empty(2, _alloc.MIN_BYTES // 8, dtype=torch.float32))  # MIN_BYTES
    _alloc.empty_grad(torch.empty(2, _alloc.MIN_BYTES // 8, device="meta"))
    assert advised == [_alloc.MIN_BYTES]
    compiled = torch.compile(_alloc.empty_grad, fullgraph=True, backend="eager")
    assert compiled(torch.empty(2, _alloc.MIN_BYTES // 4)).shape == (2, _alloc.MIN_BYTES // 4)
    assert advised == [_alloc.MIN_BYTES]  # not while tracing


def test_advise_refuses_tensors_without_real_cpu_memory():
    assert not _alloc.advise_huge_pages(torch.empty(2**22, device="meta"))
    with FakeTensorMode():
        fake = torch.empty(2**22)
    assert not _alloc.advise_huge_pages(fake)


def record_allocations(monkeypatch, module) -> list[torch.Tensor]:
    made: list[torch.Tensor] = []

    def recording(like: torch.Tensor) -> torch.Tensor:
        made.append(_alloc.empty_grad(like))
        return made[-1]

    monkeypatch.setattr(module, "empty_grad", recording)
    return made


def grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * upstream).sum(), leaves)


def kl(backend: str):
    return lambda a, b: visual_dependency(a, b, temperature=0.8, backend=backend)


def entropy(backend: str):
    return lambda a: token_entropy(a, temperature=0.8, backend=backend)


def joint(backend: str):
    return lambda a, b: K.divergence_and_entropies(a, b, 0.8, backend=backend)


@pytest.mark.parametrize("layout", ["flat", "per-batch"])
def test_compiled_backward_writes_into_its_buffers(monkeypatch, layout):
    if not _compile.usable():
        pytest.skip("torch.compile is not usable here")
    full_x = torch.randn(3, 10, 5000) * 2
    full_y = full_x + torch.randn(3, 10, 5000)
    x, y = (full_x, full_y) if layout == "flat" else (full_x[:, 3:-1], full_y[:, 3:-1])  # does not flatten
    made = record_allocations(monkeypatch, _compile)
    for op, inputs in ((kl, (x, y)), (entropy, (x,)), (joint, (x, y))):
        made.clear()
        got = grads(op("compile"), *inputs)
        assert [g.data_ptr() for g in got] == [m.data_ptr() for m in made], op  # the buffers it allocated
        assert all(g.is_contiguous() and g.shape == x.shape and g.dtype == x.dtype for g in got), op
        for g, e in zip(got, grads(op("torch"), *inputs)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_torch_backward_allocates_through_empty_grad(monkeypatch):
    made = record_allocations(monkeypatch, _torch)
    x, y = torch.randn(2, 3, 700), torch.randn(2, 3, 700)
    got = grads(kl("torch"), x, y)
    assert [g.data_ptr() for g in got] == [m.data_ptr() for m in made]
