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


@pytest.mark.slow
def test_per_batch_rows_inside_user_compile_are_traced(monkeypatch):
    """Inside a caller's ``torch.compile`` the backward is traced into the caller's graph: no buffers of
    ours, and sliced rows (per-batch views) get the torch backend's gradients."""
    monkeypatch.setattr(_compile, "_new_grads", lambda inputs: pytest.fail("allocated while tracing"))
    full_x, full_y = torch.randn(3, 9, 600) * 2, torch.randn(3, 9, 600)
    x, y = full_x[:, :-1], full_y[:, :-1]
    weights = torch.linspace(0.5, 1.5, 8)

    def step(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
        return (visual_dependency(a, b, temperature=0.8, backend=backend) * weights).sum()

    got = grads(lambda a, b: torch.compile(step, fullgraph=True)(a, b, "compile"), x, y)
    eager = grads(lambda a, b: step(a, b, "torch"), x, y)
    exact = grads(lambda a, b: step(a, b, "torch"), x.double(), y.double())  # float64 reference
    for g, e, r in zip(got, eager, exact):
        err, err_eager = (g.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= err_eager + 1e-6, (err, err_eager)  # no worse than eager float32, as in test_kernels
