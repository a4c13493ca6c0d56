"""A user's training step that calls the public functions runs under torch.compile(fullgraph=True)."""

import pytest
import torch

import vppo_core as V
from vppo_core.kernels import _cpu


def user_step(lp, old, aug, adv_rewards, group_ids, mask):
    adv = V.grpo_advantages(adv_rewards, group_ids)
    dep = V.sampled_visual_dependency(old, aug, mask)
    keep = V.token_filter_mask(dep, mask, k=0.4)
    shaped = V.shape_advantages(adv, dep, mask)
    out = V.vppo_loss(lp, old, shaped, mask, keep, entropy_coef=0.06)
    return out.loss, out.kept_frac, V.advantage_factors(dep, mask, group_ids=group_ids)


@pytest.mark.slow
def test_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    B, T = 8, 12
    old = -torch.rand(B, T) * 3
    aug = old - torch.rand(B, T) ** 2
    lp = (old + 0.2 * torch.randn(B, T)).requires_grad_()
    rewards = (torch.rand(B) < 0.5).float()
    groups = torch.arange(B) // 4
    mask = torch.rand(B, T) < 0.8
    compiled = torch.compile(user_step, fullgraph=True)
    got = compiled(lp, old, aug, rewards, groups, mask)
    (grad_c,) = torch.autograd.grad(got[0], lp)
    want = user_step(lp, old, aug, rewards, groups, mask)
    (grad_e,) = torch.autograd.grad(want[0], lp)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    ["compile", pytest.param("cpu", marks=pytest.mark.skipif(not _cpu.available(), reason="no C compiler"))],
)
def test_dynamic_compile_keeps_one_graph_for_new_temperatures_and_sizes(backend):
    """Under ``torch.compile(dynamic=True)`` the temperature is symbolic: the scalar checks step aside
    (they run eagerly) and the kernels take 1/T as a tensor, so one graph serves every call."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def step(x, y, temperature):
        return V.visual_dependency(x, y, temperature=temperature, backend=backend).sum()

    compiled = torch.compile(step, backend=counter, dynamic=True)

    def run(calls):
        for tokens, temperature in calls:
            x, y = torch.randn(2, tokens, 300), torch.randn(2, tokens, 300)
            torch.testing.assert_close(compiled(x, y, temperature), step(x, y, temperature))
        return x, y

    run(((5, 1.0), (7, 0.7)))
    # One graph; torch 2.6's Dynamo compiles a second, general one at the first new temperature
    warm = counter.frame_count
    assert warm in (1, 2), warm
    x, y = run(((9, 1.3), (11, 0.5)))
    # none for later temperatures and sizes (torch 2.4's Dynamo specialises floats: one per temperature)
    assert counter.frame_count == warm + (2 if torch._dynamo.config.specialize_float else 0), counter.frame_count
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -1\.0"):
        step(x, y, -1.0)  # the eager call still checks


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    ["auto", pytest.param("cpu", marks=pytest.mark.skipif(not _cpu.available(), reason="no C compiler"))],
)
def test_dynamic_compile_of_two_kernels_with_gradients(backend):
    """Two kernel Functions in one ``torch.compile(dynamic=True)`` graph, differentiated. A module-level
    float (log2 e) read in their traced code became a SymFloat that Dynamo cached with the proxy of the
    first Function's subgraph (or of a backward trace it retried), and the next one failed with
    "lift_tracked_freevar_to_input should not be called on root SubgraphTracer"."""
    torch._dynamo.reset()

    def step(x, y, t):
        return (
            V.token_entropy(x, temperature=t, backend=backend)
            + V.visual_dependency(x, y, temperature=t, backend=backend)
        ).sum()

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 5, 300, generator=g), torch.randn(2, 5, 300, generator=g)
    xc, yc, xe, ye = (t.clone().requires_grad_() for t in (x, y, x, y))
    got = torch.compile(step, dynamic=True)(xc, yc, 0.7)
    got.backward()
    want = step(xe, ye, 0.7)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yc.grad, ye.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fullgraph_compile_with_coefficients_that_change_between_calls():
    """A coefficient schedule (PAPO's gamma, ToR's weights, an analysis level) makes Dynamo trace the
    float symbolically from its second value on; checks written with ``math.isfinite`` then raised
    ``Unsupported`` under fullgraph. The scalar checks step aside while tracing, and run eagerly."""
    from vppo_core.analysis import group_spread
    from vppo_core.selection import priority_weights
    from vppo_core.signals import top_p_entropy

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    B, T, V_ = 4, 6, 16
    lp = (-torch.rand(B, T, generator=g)).requires_grad_()
    old, masked = lp.detach() - 0.1, lp.detach() - torch.rand(B, T, generator=g)
    adv, mask = torch.randn(B, generator=g), torch.rand(B, T, generator=g) < 0.8
    logits = torch.randn(B, T, V_, generator=g)
    first, second = torch.rand(B, T, generator=g) < 0.3, torch.rand(B, T, generator=g) < 0.3

    def step(coef):
        loss = V.sampled_perception_loss(lp, masked, mask, gamma=coef).loss
        w = priority_weights([first, second], [1.0, coef], mask, default=0.0)
        h = top_p_entropy(logits, mask, top_p=0.5 + coef)
        spread = group_spread(h.detach(), mask, torch.arange(B) // 2, eps=coef)
        return loss + (w * old).sum() + V.vppo_loss(lp, old, adv, mask).loss, h, spread.ratio

    compiled = torch.compile(step, fullgraph=True)
    for coef in (0.01, 0.02, 0.03):
        for got, want in zip(compiled(coef), step(coef)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    with pytest.raises(ValueError, match=r"gamma must be a finite number, got nan"):
        step(float("nan"))  # eager still checks


@pytest.mark.slow
def test_fullgraph_compile_of_the_torch_backend_on_sliced_logits():
    """``logits[:, :-1]`` does not flatten to rows; the chunked eager backend tried ``view`` inside a
    ``try``, which Dynamo cannot trace (``TorchRuntimeError`` under compile, fullgraph or not)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 7, 50, generator=g), torch.randn(3, 7, 50, generator=g)

    def step(x, y):
        xs, ys = x[:, :-1], y[:, :-1]
        return V.visual_dependency(xs, ys, backend="torch"), V.token_entropy(xs, backend="torch")

    for got, want in zip(torch.compile(step, fullgraph=True)(x, y), step(x, y)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
