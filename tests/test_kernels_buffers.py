"""The compiled backward writes the gradients into buffers it allocates once (`._compile._new_grads`).

For rows that flatten to one 2-D view and for rows that do not (sliced logits with batch > 1, which
run per batch element), the gradients autograd receives are those buffers, not per-batch gradients
stacked into a second copy, and they equal the torch backend's.
"""

import pytest
import torch

import vppo_core.kernels as K
from vppo_core import token_entropy, visual_dependency
from vppo_core.kernels import _compile


def kl(backend: str):
    return lambda a, b: visual_dependency(a, b, temperature=0.8, backend=backend)


def entropy(backend: str):
    return lambda a: token_entropy(a, temperature=0.8, backend=backend)


def joint(backend: str):
    return lambda a, b: K.divergence_and_entropies(a, b, 0.8, backend=backend)


def grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().requires_grad_() for t in inputs]  # detach keeps the views' strides
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad((out * upstream).sum(), leaves)


@pytest.mark.parametrize("layout", ["flat", "per-batch"])
def test_compiled_backward_fills_the_buffers_it_allocated(monkeypatch, layout):
    if not _compile.usable():
        pytest.skip("torch.compile is not usable here")
    full_x = torch.randn(3, 10, 5000) * 2
    full_y = full_x + torch.randn(3, 10, 5000)
    x, y = (full_x, full_y) if layout == "flat" else (full_x[:, 3:-1], full_y[:, 3:-1])
    assert x.is_contiguous() == (layout == "flat")
    made: list[torch.Tensor] = []

    def recording(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        made.extend(torch.empty(t.shape, dtype=t.dtype) for t in inputs)
        return tuple(made[-len(inputs) :])

    monkeypatch.setattr(_compile, "_new_grads", recording)
    for op, inputs in ((kl, (x, y)), (entropy, (x,)), (joint, (x, y))):
        made.clear()
        got = grads(op("compile"), *inputs)
        assert [g.data_ptr() for g in got] == [m.data_ptr() for m in made], op.__name__
        assert all(g.is_contiguous() and g.shape == x.shape and g.dtype == x.dtype for g in got), op.__name__
        for g, e in zip(got, grads(op("torch"), *inputs)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
