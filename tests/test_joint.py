"""visual_dependency_and_entropies: the KL and both entropies from one kernel, on every backend.

The Triton kernels are tested in ``test_kernels_triton.py`` (under ``TRITON_INTERPRET=1`` in a subprocess
on the CPU). Criterion as in ``test_kernels.py``: against a float64 oracle written as the formulas, each of the
three outputs has ``err(backend) <= err(naive torch in the same dtype) + TOL[dtype]``; the backward is
checked with random upstream gradients on all three outputs at once. Compiled variants are few: the
blocked graph (vocab 9001) forward in float32 and bfloat16 and backward in float32, and the one-block
graph in float32.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vppo_core.kernels as K
from vppo_core import token_entropy, visual_dependency, visual_dependency_and_entropies
from vppo_core.kernels import _chunks, _compile, _cpu

from .helpers import LargestFloat32, assert_inputs_unchanged, random_mask

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float64: 1e-12}
COMPILE = pytest.param("compile", marks=pytest.mark.slow)


def _safe(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, 0.0)


def oracle_terms(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[..., 3]`` = (KL(p||q), H(p), H(q)) in float64, with 0 log 0 = 0; differentiable in x and y.

    NaN where the formula is undefined: a NaN in the row, or no distribution (every logit ``-inf``).
    """
    lp = torch.log_softmax(x.double() / temperature, -1)
    lq = torch.log_softmax(y.double() / temperature, -1)
    p, q = lp.exp(), lq.exp()
    kl = torch.where(p > 0, p * (_safe(lp) - lq), 0.0).sum(-1)
    hp = -torch.where(p > 0, p * _safe(lp), 0.0).sum(-1)
    hq = -torch.where(q > 0, q * _safe(lq), 0.0).sum(-1)
    bad_x = x.isnan().any(-1) | (x == -math.inf).all(-1)
    bad_y = y.isnan().any(-1) | (y == -math.inf).all(-1)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    kl = torch.where(bad_x | bad_y, nan, kl)
    return torch.stack([kl, torch.where(bad_x, nan, hp), torch.where(bad_y, nan, hq)], -1)


def naive_terms(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """What a user would write, in the input dtype."""
    lp, lq = torch.log_softmax(x / temperature, -1), torch.log_softmax(y / temperature, -1)
    p, q = lp.exp(), lq.exp()
    return torch.stack([(p * (lp - lq)).sum(-1), -(p * lp).sum(-1), -(q * lq).sum(-1)], -1)


def logits(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(shape) * scale).to(dtype)


def stacked(out) -> torch.Tensor:
    return torch.stack(list(out), -1)


def check(backend: str, x, y, temperature: float = 1.0, mask=None) -> torch.Tensor:
    out = assert_inputs_unchanged(visual_dependency_and_entropies, x, y, mask, temperature=temperature, backend=backend)
    got = stacked(out)
    assert got.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert got.shape == (*x.shape[:-1], 3)
    expected, base = oracle_terms(x, y, temperature), naive_terms(x, y, temperature)
    if mask is not None:
        m = mask.unsqueeze(-1)
        expected, base = torch.where(m, expected, 0.0), torch.where(m, base, 0.0)
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    finite = torch.isfinite(expected)
    assert got[expected.isnan()].isnan().all()
    assert (got[expected == math.inf] == math.inf).all()
    for k in range(3):
        f = finite[..., k]
        err = (got[..., k].double() - expected[..., k])[f].abs()
        err_naive = (base[..., k].double() - expected[..., k])[f].abs().nan_to_num(0.0, posinf=0.0)
        if err.numel():
            assert err.max() <= err_naive.max() + TOL[x.dtype], (k, err.max().item(), err_naive.max().item())
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 1271), (5, 64), (2, 1, 3)])
def test_torch_backend_matches_oracle(dtype, shape):
    check("torch", logits(shape, dtype), logits(shape, dtype), temperature=0.7, mask=None)


def special_rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = logits((2, 5, vocab), torch.float32), logits((2, 5, vocab), torch.float32)
    x[0, 0, : vocab // 2] = -math.inf  # -inf in both: contributes nothing
    y[0, 0, : vocab // 3] = -math.inf
    y[0, 1, vocab - 1] = -math.inf  # q = 0 where p > 0: KL = +inf, entropies finite
    x[0, 2, 3] = float("nan")  # NaN in a counted row of x: KL and H(p) NaN
    x[0, 3] = -math.inf  # no distribution p: KL and H(p) NaN
    x[1, 4] = float("nan")  # garbage under the mask
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    return x, y, mask


def check_special(got: torch.Tensor) -> None:
    assert torch.isfinite(got[0, 0]).all()
    assert got[0, 1, 0] == math.inf and torch.isfinite(got[0, 1, 1:]).all()
    assert got[0, 2, :2].isnan().all() and torch.isfinite(got[0, 2, 2])  # NaN in x: KL and H(p), not H(q)
    # no distribution p: the KL and H(p) are NaN on every backend, H(q) is finite
    assert got[0, 3, :2].isnan().all() and torch.isfinite(got[0, 3, 2])
    assert torch.equal(got[1, 4], torch.zeros(3))


@pytest.mark.parametrize("backend", ["torch", COMPILE])
def test_special_values(backend):
    x, y, mask = special_rows(1271)
    check_special(check(backend, x, y, mask=mask))


def test_equals_the_separate_calls():
    x, y = logits((3, 6, 531), torch.float32), logits((3, 6, 531), torch.float32)
    mask = random_mask(3, 6)
    out = visual_dependency_and_entropies(x, y, mask, temperature=0.9, backend="torch")
    torch.testing.assert_close(out.dependency, visual_dependency(x, y, mask, temperature=0.9, backend="torch"))
    torch.testing.assert_close(out.entropy_img, token_entropy(x, mask, temperature=0.9, backend="torch"))
    torch.testing.assert_close(out.entropy_noimg, token_entropy(y, mask, temperature=0.9, backend="torch"))


def test_tokens_layout_and_strided_rows():
    full_x, full_y = logits((3, 12, 97), torch.float32), logits((3, 12, 97), torch.float32)
    sx, sy = full_x[:, 3:-1], full_y[:, 3:-1]  # [batch, seq] strides that do not flatten: read in place
    assert not sx.is_contiguous()
    check("torch", sx, sy)
    check("torch", full_x[0], full_y[0], mask=random_mask(1, 12)[0])  # [tokens, vocab], [tokens]


def test_torch_backend_gradcheck_float64():
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    y = torch.randn(2, 3, 7, dtype=torch.float64)
    x[0, 1, :2] = -math.inf  # zero probability in both: zero gradient
    y[0, 1, :2] = -math.inf
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)

    def f(a, b):
        return stacked(visual_dependency_and_entropies(a, b, mask, temperature=0.8, backend="torch"))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), y.requires_grad_()))


def grad_errors(backend: str, x, y, mask, upstream) -> tuple[float, float]:
    """Max gradient error of the backend and of naive torch (same dtype) against the float64 oracle."""

    def grads(fn, a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        out = torch.where(mask.unsqueeze(-1), fn(a, b), 0.0)
        (out.double() * upstream).sum().backward()
        return a.grad.double(), b.grad.double()

    finite_x = torch.where(torch.isfinite(x), x.double(), -math.inf)
    gx_ref, gy_ref = grads(oracle_terms, finite_x, y.double())
    gx, gy = grads(lambda a, b: stacked(visual_dependency_and_entropies(a, b, backend=backend)), x, y)
    nx, ny = grads(naive_terms, x, y)
    err = max((gx - gx_ref).abs().max().item(), (gy - gy_ref).abs().max().item())
    err_naive = max((nx - gx_ref).abs().max().item(), (ny - gy_ref).abs().max().item())
    return err, err_naive


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        ("torch", torch.float32),
        ("torch", torch.bfloat16),
        pytest.param("compile", torch.float32, marks=pytest.mark.slow),
    ],
)
def test_backward_random_upstream(backend, dtype):
    shape = (3, 4, 9001) if backend == "compile" else (3, 4, 531)
    x, y = logits(shape, dtype, scale=2.0), logits(shape, dtype, scale=2.0)
    err, err_naive = grad_errors(backend, x, y, random_mask(3, 4), torch.randn(3, 4, 3, dtype=torch.float64))
    assert err <= err_naive + GRAD_TOL[dtype], (err, err_naive)


@pytest.mark.parametrize("backend", ["torch", COMPILE])
def test_masked_rows_and_neg_inf_entries_get_exactly_zero_gradient(backend):
    x, y = torch.randn(2, 4, 9001), torch.randn(2, 4, 9001)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = float("nan")
    y[~mask] = float("nan")
    x[0, 0, :5000] = -math.inf  # a whole block and part of the next, in both inputs
    y[0, 0, :5000] = -math.inf
    x.requires_grad_()
    y.requires_grad_()
    out = stacked(visual_dependency_and_entropies(x, y, mask, backend=backend))
    out.backward(torch.randn(2, 4, 3))
    for g in (x.grad, y.grad):
        assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))
        assert torch.equal(g[0, 0, :5000], torch.zeros(5000))
        assert torch.isfinite(g[mask]).all()


def test_one_output_only_matches_its_own_function():
    """The gradient of one output alone is that output's gradient: the others' upstream is exactly zero."""
    x, y = logits((2, 3, 301), torch.float64), logits((2, 3, 301), torch.float64)
    a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
    visual_dependency_and_entropies(a, b, backend="torch").entropy_img.sum().backward()
    c = x.clone().requires_grad_()
    token_entropy(c, backend="torch").sum().backward()
    torch.testing.assert_close(a.grad, c.grad)
    assert torch.equal(b.grad, torch.zeros_like(b.grad))


def test_never_a_float32_copy_of_the_whole_logits(monkeypatch):
    monkeypatch.setattr(_chunks, "CHUNK_BYTES", 4 * 1000 * 16)  # 16 rows of 1000 per chunk
    x = torch.randn(2, 64, 1000).bfloat16().requires_grad_()
    y = torch.randn(2, 64, 1000).bfloat16().requires_grad_()
    with LargestFloat32() as seen:
        out = visual_dependency_and_entropies(x, y, backend="torch")
        stacked(out).backward(torch.randn(2, 64, 3))
    assert seen.largest <= 16 * 1000 < x.numel()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(2, 40),
    st.floats(0.3, 3.0),
    st.integers(0, 2**31 - 1),
)
def test_properties(batch, seq, vocab, temperature, seed):
    """KL >= 0, = 0 for identical inputs (then both entropies agree); 0 <= H <= log V."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, vocab, generator=g) * 4
    y = torch.randn(batch, seq, vocab, generator=g) * 4
    out = visual_dependency_and_entropies(x, y, temperature=temperature, backend="torch")
    assert (out.dependency >= 0).all()
    for h in (out.entropy_img, out.entropy_noimg):
        assert ((h >= 0) & (h <= math.log(vocab) + 1e-5)).all()
    same = visual_dependency_and_entropies(x, x, temperature=temperature, backend="torch")
    assert torch.equal(same.dependency, torch.zeros_like(same.dependency))
    assert torch.equal(same.entropy_img, same.entropy_noimg)


# ----------------------------------------------------------------------------- compile backend


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_backend_matches_oracle(dtype):
    shape = (2, 3, 9001)  # two blocks of 4096 and a tail: the blocked graph
    x, y = logits(shape, dtype), logits(shape, dtype)
    x[0, 0, :5000] = -math.inf  # an all -inf block, merged with weight 0
    y[0, 0, :4500] = -math.inf
    x[0, 1, 4000:4200] = -math.inf  # across a block boundary
    y[0, 1, 4000:4100] = -math.inf
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    mask[1, 1:] = False
    x[1, 2] = float("nan")  # garbage under the mask
    check("compile", x, y, temperature=0.7, mask=mask)
    if dtype == torch.float32:  # a large common offset: no cancellation (the blocks are shifted)
        big_x, big_y = x[:1] + 40.0, y[:1] + 40.0
        got = check("compile", big_x, big_y, temperature=0.7)
        entropies = oracle_terms(big_x, big_y, 0.7)[..., 1:]  # lse(x) - sum p x, both near 57
        torch.testing.assert_close(got[..., 1:].double(), entropies, rtol=0, atol=2e-6)


@pytest.mark.slow
def test_compile_step_fullgraph():
    """A user's compiled step that calls the function traces the compile core into its own graph."""
    x, y = logits((2, 3, 1271), torch.float32), logits((2, 3, 1271), torch.float32)
    mask = random_mask(2, 3)

    def step(a, b):
        out = visual_dependency_and_entropies(a, b, mask)
        return (-0.02 * out.dependency + 0.03 * out.entropy_img + 0.03 * out.entropy_noimg).sum()

    a1, b1 = x.clone().requires_grad_(), y.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(a1, b1).backward()
    a2, b2 = x.double().requires_grad_(), y.double().requires_grad_()
    expected = torch.where(mask.unsqueeze(-1), oracle_terms(a2, b2), 0.0)
    (expected * torch.tensor([-0.02, 0.03, 0.03], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(a1.grad.double(), a2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(b1.grad.double(), b2.grad, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- backend choice and errors


def test_auto_falls_back_to_torch_when_compilation_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(K, "AUTO_COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_compile, "joint_forward", broken)
    monkeypatch.setattr(_cpu, "available", lambda: False)  # no C compiler either
    monkeypatch.setattr(_compile, "_state", {"broken": False})
    x, y = logits((2, 3, 50), torch.float32), logits((2, 3, 50), torch.float32)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = stacked(visual_dependency_and_entropies(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = stacked(visual_dependency_and_entropies(x, y))
    torch.testing.assert_close(got, again)
    torch.testing.assert_close(got.double(), oracle_terms(x, y), rtol=1e-5, atol=1e-6)


def test_errors_name_the_argument():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"logits_img and logits_noimg must have the same dtype"):
        visual_dependency_and_entropies(x, x.double())
    with pytest.raises(ValueError, match=r"logits_img must be \[batch, seq, vocab\] or \[tokens, vocab\], got 4"):
        visual_dependency_and_entropies(x[None], x[None])
    with pytest.raises(ValueError, match="temperature"):
        visual_dependency_and_entropies(x, x, temperature=0.0)
    with pytest.raises((TypeError, ValueError), match="backend"):
        visual_dependency_and_entropies(x, x, backend="cuda")  # type: ignore[arg-type]
    if not K._triton_runs_on(x.device):
        with pytest.raises(ValueError, match=r"backend='triton' needs (CUDA tensors|the triton package|triton >= )"):
            visual_dependency_and_entropies(x, x, backend="triton")
