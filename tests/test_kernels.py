"""Kernel backends of visual_dependency against float64 oracles (cut-cross-entropy's criterion).

Every backend must be no worse than naive PyTorch in the same dtype, plus a tolerance:
``err(backend) <= err(naive) + TOL[dtype]``, both measured against a float64 oracle written as the formula.
The Triton kernels are tested in ``test_kernels_triton.py``, run here under ``TRITON_INTERPRET=1`` in a
subprocess (the variable must be set before the kernel module is imported, and must not leak into
this process). Compiled variants are kept few: each new graph costs seconds.
"""

import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import vppo_core.kernels as K
from vppo_core import (
    token_entropy,
    visual_dependency,
    visual_dependency_and_entropies,
    visual_dependency_from_hidden,
)
from vppo_core.kernels import _compile, _cpu, _hidden

from .helpers import assert_inputs_unchanged, random_mask

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}
LOW = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- oracles and naive baselines


def oracle(x: torch.Tensor, y: torch.Tensor, divergence: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """float64 divergence per row, from the definitions, with 0 log 0 = 0."""
    x, y = x.double() / temperature, y.double() / temperature
    if divergence == "reverse_kl":
        x, y = y, x
    logp, logq = x.log_softmax(-1), y.log_softmax(-1)
    p, q = logp.exp(), logq.exp()
    if divergence == "hellinger":  # squared: 1 - sum_j sqrt(p_j q_j)
        return 1.0 - torch.sqrt(p * q).sum(-1)
    if divergence in ("kl", "reverse_kl"):
        return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
    m = (p + q) / 2
    kl_pm = torch.where(p > 0, p * (logp - m.log()), 0.0).sum(-1)
    kl_qm = torch.where(q > 0, q * (logq - m.log()), 0.0).sum(-1)
    return (kl_pm + kl_qm) / 2


def naive(x: torch.Tensor, y: torch.Tensor, divergence: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """What a user would write in the input dtype: log_softmax of both, then kl_div."""
    if divergence == "reverse_kl":
        x, y = y, x
    logp, logq = torch.log_softmax(x / temperature, -1), torch.log_softmax(y / temperature, -1)
    if divergence == "hellinger":
        return 1.0 - torch.sqrt(logp.exp() * logq.exp()).sum(-1)
    if divergence in ("kl", "reverse_kl"):
        return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (
        F.kl_div(logm, logp, log_target=True, reduction="none").sum(-1)
        + F.kl_div(logm, logq, log_target=True, reduction="none").sum(-1)
    )


def logits(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(shape) * scale
    y = x + torch.randn(shape)
    return x.to(dtype), y.to(dtype)


def max_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected).abs().max().item()


def assert_no_worse_than_naive(got, base, expected, tol):
    """err(got) <= err(naive) + tol over the rows where the oracle is finite; elsewhere got must equal it.

    A NaN of the naive baseline (e.g. ``kl_div`` gives 0 * -inf = NaN for ``-inf`` logits) counts as 0 error.
    """
    finite = torch.isfinite(expected)
    assert torch.equal(got[~finite].double(), expected[~finite]) or torch.isnan(expected[~finite]).all()
    err = (got.double() - expected)[finite].abs()
    err_naive = (base.double() - expected)[finite].abs().nan_to_num(0.0, posinf=0.0)
    if err.numel():
        assert err.max() <= err_naive.max() + tol, (err.max().item(), err_naive.max().item())


def check_forward(backend: str, x, y, divergence="kl", temperature=1.0, mask=None):
    got = assert_inputs_unchanged(
        visual_dependency, x, y, mask, temperature=temperature, divergence=divergence, backend=backend
    )
    assert got.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert got.shape == x.shape[:-1]
    expected = oracle(x, y, divergence, temperature)
    base = naive(x, y, divergence, temperature)
    if mask is not None:
        expected, base = torch.where(mask, expected, 0.0), torch.where(mask, base, 0.0)
    assert_no_worse_than_naive(got, base, expected, TOL[x.dtype])
    return got


# ----------------------------------------------------------------------------- torch backend (fast, everything)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "hellinger"])
@pytest.mark.parametrize("shape", [(3, 7, 1271), (5, 64), (2, 1, 3)])
def test_torch_backend_matches_oracle(dtype, divergence, shape):
    x, y = logits(shape, dtype)
    check_forward("torch", x, y, divergence, temperature=0.7)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "hellinger"])
def test_torch_backend_gradcheck_float64(divergence):
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)

    def fn(a, b):
        return visual_dependency(a, b, mask, temperature=0.8, divergence=divergence, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, y))


@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 40),
    scale=st.floats(0.0, 30.0),
    temperature=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
)
def test_property_divergence_bounds(rows, vocab, scale, temperature, seed):
    """0 <= JSD <= log 2 (up to float32 rounding), 0 <= H^2 <= 1 and symmetric, KL >= 0, reverse KL = KL
    with swapped arguments, 0 if equal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    y = torch.randn(rows, vocab, generator=g) * scale
    kw = {"temperature": temperature, "backend": "torch"}
    jsd = visual_dependency(x, y, divergence="jsd", **kw)
    assert ((jsd >= 0) & (jsd <= math.log(2) + 1e-5)).all()  # up to float32 rounding
    h2 = visual_dependency(x, y, divergence="hellinger", **kw)
    assert ((h2 >= 0) & (h2 <= 1)).all()
    torch.testing.assert_close(h2, visual_dependency(y, x, divergence="hellinger", **kw), rtol=0, atol=1e-6)
    assert torch.equal(visual_dependency(x, y, divergence="reverse_kl", **kw), visual_dependency(y, x, **kw))
    for div in ("kl", "jsd", "hellinger"):
        assert torch.equal(visual_dependency(x, x, divergence=div, **kw), torch.zeros(rows))


# ----------------------------------------------------------------------------- backend choice and errors


def test_auto_routes_small_and_float64_to_torch_and_large_to_cpu_or_compile(monkeypatch):
    big = torch.empty(4, K.AUTO_COMPILE_MIN_ELEMENTS // 4)
    assert K.resolve_backend("auto", torch.empty(3, 5, 11)) == "torch"
    assert K.resolve_backend("auto", big.double()) == "torch"
    assert K.resolve_backend("auto", big) == ("cpu" if _cpu.available() else "compile")
    monkeypatch.setattr(_cpu, "available", lambda: False)
    assert K.resolve_backend("auto", big) == ("compile" if _compile.usable() else "torch")
    assert K.resolve_backend("torch", big) == "torch"


def test_triton_older_than_the_checked_versions_is_not_used(monkeypatch):
    """Triton 3.0's interpreter computes wrong sums with these kernels: ``auto`` passes it by, and an
    explicit ``backend="triton"`` says which version it found."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.6.0+git1234")
    assert K._triton_version() == (3, 6) or importlib.util.find_spec("triton") is None
    monkeypatch.setattr(K, "_TRITON_VERSION", (3, 0))
    assert K._resolve("auto", torch.device("cuda"), torch.float32, 1 << 24) in ("compile", "torch")
    with pytest.raises(ValueError, match=r"backend='triton' needs triton >= 3\.2, got triton 3\.0"):
        K._resolve("triton", torch.device("cuda"), torch.float32, 10)
    monkeypatch.setattr(K, "_TRITON_VERSION", None)
    with pytest.raises(ValueError, match=r"backend='triton' needs the triton package"):
        K._resolve("triton", torch.device("cuda"), torch.float32, 10)


def test_backend_errors_name_the_argument():
    x = torch.randn(2, 3, 5)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(ValueError, match=r"backend='triton' needs (CUDA tensors|the triton package|triton >= )"):
            visual_dependency(x, x, backend="triton")
    with pytest.raises((TypeError, ValueError), match="backend"):
        visual_dependency(x, x, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="divergence"):
        visual_dependency(x, x, divergence="kl2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_chunk_size must be >= 1, got 0"):
        visual_dependency_from_hidden(x, x, torch.randn(7, 5), vocab_chunk_size=0)


def test_auto_falls_back_to_torch_when_compilation_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(K, "AUTO_COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_compile, "forward", broken)
    monkeypatch.setattr(_cpu, "available", lambda: False)  # no C compiler either
    monkeypatch.setattr(_compile, "_state", {"broken": False})
    x, y = logits((2, 3, 50), torch.float32)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = visual_dependency(x, y)
    assert K.resolve_backend("auto", x) == "torch"  # and it stays on torch without warning again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = visual_dependency(x, y)
    torch.testing.assert_close(got, again)
    torch.testing.assert_close(got.double(), oracle(x, y), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- compile backend

COMPILE_SHAPE = (2, 3, 9001)  # vocab > 2 blocks of 4096 plus a tail: the general (blocked) graph


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "hellinger"])
def test_compile_backend_matches_oracle(dtype, divergence):
    x, y = logits(COMPILE_SHAPE, dtype)
    x[0, 0, :100] = -math.inf  # -inf in p only
    x[0, 1, :100] = -math.inf  # -inf in both
    y[0, 1, :100] = -math.inf
    if divergence == "hellinger":
        y[0, 2, 4000:4200] = -math.inf  # finite p, zero q (across a block boundary): those terms are 0
    mask = torch.ones(COMPILE_SHAPE[:-1], dtype=torch.bool)
    mask[1] = False  # a fully masked row of the batch
    x[1, 2] = float("nan")  # garbage under the mask
    got = check_forward("compile", x, y, divergence, temperature=0.7, mask=mask)
    assert torch.equal(got[1], torch.zeros(3))
    # identical inputs give exactly 0, as on the torch path
    assert torch.equal(visual_dependency(x[:1], x[:1], divergence=divergence, backend="compile"), torch.zeros(1, 3))


@pytest.mark.slow
def test_compile_backend_odd_vocab_inf_and_nan():
    x, y = logits((5, 1271), torch.float32)  # one block (vocab <= 4096): the small graph
    x[1, :10] = -math.inf
    y[2, 5] = -math.inf  # finite p, zero q: KL is +inf, Hellinger finite
    x[3, 7] = float("nan")
    x[4] = -math.inf  # no distribution p
    got = visual_dependency(x, y, backend="compile")
    expected = oracle(x, y)
    torch.testing.assert_close(got[:2].double(), expected[:2], rtol=1e-5, atol=1e-5)
    assert got[2] == math.inf
    assert got[3].isnan() and got[4].isnan()  # NaN in the row; no distribution p
    h2 = visual_dependency(x, y, divergence="hellinger", backend="compile")
    torch.testing.assert_close(h2[:3].double(), oracle(x[:3], y[:3], "hellinger"), rtol=0, atol=1e-6)
    assert h2[3:].isnan().all()


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("compile", marks=pytest.mark.slow)])
def test_underflowed_p_against_zero_q_is_inf_and_a_pos_inf_logit_is_nan(backend):
    # KL(p || q) is +inf wherever x_j is finite and y_j = -inf, even when p_j underflows in float32:
    # next to the row maximum, alone in a later block (whose weight underflows too), in the tail
    if backend == "cpu" and not _cpu.available():
        pytest.skip("no C compiler")
    x, y = torch.full((5, 5000), -math.inf), torch.full((5, 5000), -math.inf)
    x[:, 0] = y[:, 0] = 0.0
    x[0, 1] = -200.0
    x[1, 4500] = -150.0
    x[2, 4999] = -120.0
    x[3, 1], y[3, 1] = math.inf, 0.0  # a +inf logit: no distribution, NaN (was 0 on "torch")
    x[4, 1], y[4, 1] = -3.0, -4.0  # an ordinary row beside them
    got = visual_dependency(x, y, backend=backend)
    assert (got[:3] == math.inf).all() and got[3].isnan()
    torch.testing.assert_close(got[4].double(), oracle(x[4:], y[4:])[0], rtol=1e-5, atol=1e-6)
    assert (oracle(x[:3], y[:3]) == math.inf).all()  # float64 agrees
    rev = visual_dependency(y, x, divergence="reverse_kl", backend=backend)
    assert (rev[:3] == math.inf).all() and rev[3].isnan()
    if backend != "compile":  # the joint kernel: one more compile, covered by the same finisher
        joint = visual_dependency_and_entropies(x[:3], y[:3], backend=backend)
        assert (joint.dependency == math.inf).all()


def _grad_error(fn, x, y, upstream):
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    (fn(xx, yy) * upstream).sum().backward()
    xo, yo = x.double().requires_grad_(), y.double().requires_grad_()
    (oracle(xo, yo, temperature=0.01) * upstream.double()).sum().backward()
    scale = max(xo.grad.abs().max().item(), yo.grad.abs().max().item())
    return max((xx.grad - xo.grad).abs().max().item(), (yy.grad - yo.grad).abs().max().item()) / scale


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("compile", marks=pytest.mark.slow)])
def test_small_temperatures_and_large_offsets_keep_the_dtypes_accuracy(backend):
    # p is formed shifted before it is scaled (e^{(x - k)/T - rest}), never as e^{x/T - float32(lse)},
    # and x - y is centred by the float64 lse_x - lse_y: no error proportional to |x|/T or to an offset
    if backend == "cpu" and not _cpu.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5000, generator=g)
    y = x + 0.5 * torch.randn(4, 5000, generator=g)
    for t in (1e-3, 1e-2):  # the JSD stays within its bound log 2 and the float32 rounding of the inputs
        got = visual_dependency(x, y, divergence="jsd", temperature=t, backend=backend)
        assert got.max().item() <= math.log(2.0) + 1e-7
        torch.testing.assert_close(got.double(), oracle(x, y, "jsd", t), rtol=0, atol=1e-6)
    upstream = torch.rand(4, generator=g)

    def ours(a, b):
        return visual_dependency(a, b, temperature=0.01, backend=backend)

    def plain(a, b):
        return naive(a, b, temperature=0.01)

    # KL gradients at T = 0.01 (was 1e-3 relative on "torch", 3e-5 on compile/cpu; plain torch: 3e-8)
    assert _grad_error(ours, x, y, upstream) <= 4 * _grad_error(plain, x, y, upstream) + 1e-6
    # a common offset of 1e4 between the two inputs (was 7e-5 relative)
    assert _grad_error(ours, x + 1e4, y + 1e4, upstream) <= 4 * _grad_error(plain, x + 1e4, y + 1e4, upstream) + 1e-6


def offset_errors(fn, x, y, upstream):
    """(value error, naive's, gradient error, naive's) of the KL ``fn(x, y)`` at T = 1 against the float64
    oracle; the gradient errors relative to the largest oracle gradient."""
    xo, yo = x.double().requires_grad_(), y.double().requires_grad_()
    ref = oracle(xo, yo)
    (ref * upstream.double()).sum().backward()
    scale = max(xo.grad.abs().max().item(), yo.grad.abs().max().item())
    errors = []
    for f in (fn, naive):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = f(a, b)
        (out * upstream).sum().backward()
        errors.append((out.detach().double() - ref.detach()).abs().max().item())
        errors.append(max((a.grad - xo.grad).abs().max().item(), (b.grad - yo.grad).abs().max().item()) / scale)
    value, grad, value_naive, grad_naive = errors
    return value, value_naive, grad, grad_naive


def check_offsets(run, rows=4, vocab=5000):
    """An offset ``c`` between the two inputs (``y = x + noise + c``) costs no accuracy, value or gradient:
    ``x_j - y_j`` in float32 rounds to ``eps |c|``, so every pass forms ``log(p_j/q_j)`` from ``x_j - k_x``
    and ``y_j - k_y`` (each exact near its row's top) and adds the shifts back in float64. Measured
    before, at ``c = 10^4``: the KL off by 3.6e-5 (``"torch"``), 6.6e-4 (``"compile"``) and 1.2e-3
    (``"cpu"``), the gradients by 8e-4 to 4e-3 relative, where naive ``log_softmax`` + ``kl_div`` gives
    3.5e-7 and 8e-7; now 2e-7 and 6e-7 at most."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, vocab, generator=g) * 2
    noise = 0.5 * torch.randn(rows, vocab, generator=g)
    upstream = torch.rand(rows, generator=g)
    for c in (100.0, 1e4):
        value, value_naive, grad, grad_naive = offset_errors(run, x, x + noise + c, upstream)
        assert value <= value_naive + 1e-7, (c, value, value_naive)
        assert grad <= 2 * grad_naive + 1e-7, (c, grad, grad_naive)


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("compile", marks=pytest.mark.slow)])
def test_an_offset_between_the_inputs_costs_no_accuracy(backend):
    if backend == "cpu" and not _cpu.available():
        pytest.skip("no C compiler")
    check_offsets(lambda a, b: visual_dependency(a, b, backend=backend))
    if backend != "torch":  # the joint kernel's KL: the same centring
        check_offsets(lambda a, b: visual_dependency_and_entropies(a, b, backend=backend)[0])


@pytest.mark.slow
def test_compile_backend_jsd_and_reverse_kl():
    x, y = logits(COMPILE_SHAPE, torch.float32)
    for divergence in ("jsd", "reverse_kl"):
        check_forward("compile", x, y, divergence, temperature=1.3)


@pytest.mark.slow
def test_compile_backend_noncontiguous_slice_is_not_copied():
    full = torch.randn(2, 12, 9001)
    x, y = full[:, 3:-1], (full + torch.randn_like(full))[:, 3:-1]
    assert not x.is_contiguous()
    got = visual_dependency(x, y, backend="compile")
    torch.testing.assert_close(got.double(), oracle(x, y), rtol=1e-5, atol=1e-5)


def grad_errors(backend: str, x, y, mask, upstream, divergence="kl", temperature=1.3):
    """Max |grad - float64 oracle grad| for ``backend`` and for naive autograd in the same dtype."""
    errs = []
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    (oracle(x64, y64, divergence, temperature) * upstream.double() * mask).sum().backward()
    for fn in (
        lambda a, b: visual_dependency(a, b, mask, temperature=temperature, divergence=divergence, backend=backend),
        lambda a, b: torch.where(mask, naive(a, b, divergence, temperature), 0.0),
    ):
        a, b = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
        out = fn(a, b)
        (out * upstream.to(out.dtype)).sum().backward()
        assert a.grad.dtype == x.dtype and a.grad.shape == x.shape
        errs.append(max(max_err(a.grad, x64.grad), max_err(b.grad, y64.grad)))
    return errs


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_backward_random_upstream(dtype):
    x, y = logits((3, 4, 9001), dtype, scale=2.0)
    mask = random_mask(3, 4)
    err, err_naive = grad_errors("compile", x, y, mask, torch.randn(3, 4))
    assert err <= err_naive + GRAD_TOL[dtype], (err, err_naive)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["jsd", "hellinger"])
def test_compile_backward_other_divergences(divergence, dtype):
    x, y = logits((3, 4, 9001), dtype, scale=2.0)
    err, err_naive = grad_errors("compile", x, y, random_mask(3, 4), torch.randn(3, 4), divergence=divergence)
    assert err <= err_naive + GRAD_TOL[dtype], (err, err_naive)


@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("compile", marks=pytest.mark.slow)])
def test_masked_rows_get_exactly_zero_gradient_even_with_nan(backend, divergence):
    x, y = torch.randn(2, 4, 9001), torch.randn(2, 4, 9001)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = float("nan")
    y[~mask] = float("inf")
    x.requires_grad_(), y.requires_grad_()
    visual_dependency(x, y, mask, divergence=divergence, backend=backend).sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert torch.equal(y.grad[~mask], torch.zeros_like(y.grad[~mask]))
    assert torch.isfinite(x.grad[mask]).all() and torch.isfinite(y.grad[mask]).all()


def user_step(x, y, mask, upstream, backend):
    dep = visual_dependency(x, y, mask, temperature=1.3, backend=backend)
    jsd = visual_dependency(x, y, mask, divergence="jsd", backend=backend)
    h2 = visual_dependency(x, y, mask, divergence="hellinger", backend=backend)
    entropy = token_entropy(x, mask, temperature=0.9, backend=backend)
    return (dep * upstream).sum() + jsd.sum() + (h2 * upstream).sum() - 0.1 * entropy.sum(), dep


@pytest.mark.slow
def test_inside_user_torch_compile_fullgraph():
    """A user's step calling visual_dependency (KL as a loss, JSD, Hellinger) and token_entropy compiles
    as one graph and matches eager."""
    x, y = logits((3, 4, 600), torch.float32)
    x.requires_grad_(), y.requires_grad_()
    mask, upstream = random_mask(3, 4), torch.randn(3, 4)
    loss, dep = torch.compile(user_step, fullgraph=True)(x, y, mask, upstream, "compile")
    grads = torch.autograd.grad(loss, (x, y))
    loss_e, dep_e = user_step(x, y, mask, upstream, "torch")
    grads_e = torch.autograd.grad(loss_e, (x, y))
    torch.testing.assert_close(dep, dep_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- logit-free path


def hidden_case(dtype=torch.float64, tokens=(2, 7), hidden=16, vocab=301):
    hx = torch.randn(*tokens, hidden)
    hy = hx + 0.3 * torch.randn(*tokens, hidden)
    w = torch.randn(vocab, hidden)
    return hx.to(dtype), hy.to(dtype), w.to(dtype)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "hellinger"])
@pytest.mark.parametrize("chunks", [(4, 50), (3, 301), (100, 7)])
def test_from_hidden_matches_materialised_logits_and_gradients(divergence, chunks):
    hx, hy, w = (t.requires_grad_() for t in hidden_case())
    mask, upstream = random_mask(2, 7), torch.randn(2, 7)
    expected = torch.where(mask, oracle(hx @ w.T, hy @ w.T, divergence, 0.9), 0.0)
    grads_expected = torch.autograd.grad((expected * upstream).sum(), (hx, hy, w))
    got = assert_inputs_unchanged(
        visual_dependency_from_hidden,
        hx,
        hy,
        w,
        mask,
        temperature=0.9,
        divergence=divergence,
        backend="torch",
        chunk_size=chunks[0],
        vocab_chunk_size=chunks[1],
    )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((got * upstream).sum(), (hx, hy, w))
    for a, b in zip(grads, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_from_hidden_compile_backend_float32():
    hx, hy, w = (t.requires_grad_() for t in hidden_case(torch.float32, tokens=(3, 40), hidden=32, vocab=9001))
    mask, upstream = random_mask(3, 40), torch.randn(3, 40)
    got = visual_dependency_from_hidden(hx, hy, w, mask, backend="compile", chunk_size=64, vocab_chunk_size=4500)
    naive_dep = torch.where(mask, naive(hx @ w.T, hy @ w.T), 0.0)  # materialised float32 logits
    h64 = [t.detach().double().requires_grad_() for t in (hx, hy, w)]
    expected = torch.where(mask, oracle(h64[0] @ h64[2].T, h64[1] @ h64[2].T), 0.0)
    assert max_err(got, expected) <= max_err(naive_dep, expected) + TOL[torch.float32]
    grads_expected = torch.autograd.grad((expected * upstream).sum(), h64)
    grads = torch.autograd.grad((got * upstream).sum(), (hx, hy, w))
    grads_naive = torch.autograd.grad((naive_dep * upstream).sum(), (hx, hy, w))
    for a, b, e in zip(grads, grads_naive, grads_expected):
        # Tiles change the GEMMs' summation order: allow 1e-5 of the gradient's scale on top of naive's error.
        tol = 1e-5 * e.abs().max().item()
        assert max_err(a, e) <= max_err(b, e) + tol, (max_err(a, e), max_err(b, e))


def test_from_hidden_never_builds_a_tile_larger_than_the_chunks(monkeypatch):
    seen = []
    original = _hidden.balanced_chunks

    def spy(n, chunk):
        out = original(n, chunk)
        seen.append((n, chunk, max(s.stop - s.start for s in out)))
        return out

    monkeypatch.setattr(_hidden, "balanced_chunks", spy)
    hx, hy, w = (t.requires_grad_() for t in hidden_case(torch.float32, tokens=(5, 9), vocab=1000))
    visual_dependency_from_hidden(hx, hy, w, backend="torch", chunk_size=8, vocab_chunk_size=300).sum().backward()
    assert seen and all(biggest <= chunk for _, chunk, biggest in seen)
    # balanced: 1000 entries in chunks of <= 300 -> 4 chunks of 250, no sliver at the end
    assert original(1000, 300) == [slice(0, 250), slice(250, 500), slice(500, 750), slice(750, 1000)]


def test_from_hidden_padded_nan_rows_give_zero_and_finite_gradients():
    hx, hy, w = hidden_case(torch.float32)
    mask = random_mask(2, 7)
    mask[0, -1] = False
    hx[~mask] = float("nan")
    hx.requires_grad_(), hy.requires_grad_(), w.requires_grad_()
    dep = visual_dependency_from_hidden(hx, hy, w, mask, backend="torch", chunk_size=3, vocab_chunk_size=100)
    assert torch.equal(dep[~mask], torch.zeros(int((~mask).sum())))
    dep.sum().backward()
    assert torch.equal(hx.grad[~mask], torch.zeros_like(hx.grad[~mask]))
    assert torch.isfinite(w.grad).all()


# ----------------------------------------------------------------------------- Triton (interpreter, subprocess)


@pytest.mark.slow
def test_triton_kernels_under_the_cpu_interpreter():
    """Run tests/test_kernels_triton.py with TRITON_INTERPRET=1 in a fresh process (GPU machines run it natively)."""
    triton = pytest.importorskip("triton")
    if not K.triton_usable():
        pytest.skip(f"triton {triton.__version__} is older than the backend uses")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: test_kernels_triton.py runs natively in this session")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist", "-x"]
    kw = {"cwd": root, "env": env, "capture_output": True, "text": True, "timeout": 600}
    proc = subprocess.run([*cmd, str(root / "tests" / "test_kernels_triton.py")], **kw)
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    if " passed" not in proc.stdout and " failed" not in proc.stdout and skipped:  # the module skipped itself
        pytest.skip(skipped[0])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
