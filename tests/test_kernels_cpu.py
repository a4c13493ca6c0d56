"""The ``"cpu"`` backend (a C kernel built at first use) against float64 oracles, in both of its builds.

Same criterion as ``test_kernels.py``: ``err(cpu) <= err(naive in the same dtype) + TOL``. Every
forward test runs twice: the AVX-512 build (on a machine that has it; the portable loops elsewhere)
and the portable build (``-DVPPO_PORTABLE``), so both implementations of the block pass are checked
on any machine. The backward (and the JSD's second sweep) is the C kernel's own too, checked on both
builds again; nothing of this backend needs ``torch.compile``.
"""

import math
import os
import warnings

import pytest
import torch

import vppo_core.kernels as K
from vppo_core import token_entropy, visual_dependency, visual_dependency_and_entropies, visual_dependency_from_hidden
from vppo_core.kernels import _compile, _cpu

from . import test_joint as J
from . import test_kernels as T
from . import test_kernels_entropy as E
from .helpers import random_mask

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="no C compiler: the cpu backend cannot be built")

SHAPES = [(3, 7, 5000), (5, 13), (2, 1, 3)]  # > 2 blocks of 2048 and a tail not a multiple of 16; < 16; tiny


@pytest.fixture(params=["native", "portable"])
def build(request, monkeypatch):
    monkeypatch.setitem(_cpu._state, "portable", request.param == "portable")
    if request.param == "portable":
        assert _cpu.simd_width() == 1
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "hellinger"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle(build, dtype, divergence, shape):
    x, y = T.logits(shape, dtype)
    T.check_forward("cpu", x, y, divergence, temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1000, 5000, 21])
def test_negative_logits_with_a_tail_not_a_multiple_of_16(build, dtype, vocab):
    # every logit well below 0 (log-probabilities, a low temperature): a block tail's missing lanes must
    # not enter the block maximum (the 16-bit loads fill them with 0.0, which underflowed every exp)
    x, y = T.logits((3, 4, vocab), dtype)
    x, y = (x.float() - 100).to(dtype), (y.float() - 100).to(dtype)
    for divergence in ("kl", "jsd", "hellinger"):
        got = T.check_forward("cpu", x, y, divergence, temperature=0.7)
        assert torch.isfinite(got).all()
    h = token_entropy(x, backend="cpu")
    torch.testing.assert_close(h, token_entropy(x.double(), backend="torch").float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("divergence", ["kl", "hellinger", "jsd"])
def test_special_values_across_blocks(build, divergence):
    x, y = T.logits((2, 3, 5000), torch.float32)
    x[0, 0, :2100] = -math.inf  # -inf in p only, a whole block and more
    x[0, 1, :100] = -math.inf  # -inf in both
    y[0, 1, :100] = -math.inf
    y[0, 2, 4000:4200] = -math.inf  # finite p, zero q (across a block boundary): KL +inf
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 0] = False
    x[1, 0] = float("nan")  # garbage under the mask
    got = T.check_forward("cpu", x, y, divergence, temperature=0.7, mask=mask)
    assert got[1, 0] == 0.0
    if divergence == "kl":
        assert got[0, 2] == math.inf
    x2, y2 = x.clone(), y.clone()
    x2[1, 1, 4999] = float("nan")  # NaN in the tail of a counted row
    x2[1, 2] = -math.inf  # no distribution p
    out = visual_dependency(x2, y2, divergence=divergence, backend="cpu")
    assert out[1, 1].isnan() and out[1, 2].isnan()
    # identical inputs give exactly 0
    assert torch.equal(visual_dependency(y[1:], y[1:], divergence=divergence, backend="cpu"), torch.zeros(1, 3))


def test_same_as_the_compile_backend_on_special_rows(build):
    """Row by row the same non-finite pattern as the other backends (``test_kernels.py``'s odd-vocab case)."""
    x, y = T.logits((5, 1271), torch.float32)
    x[1, :10] = -math.inf
    y[2, 5] = -math.inf
    x[3, 7] = float("nan")
    x[4] = -math.inf
    for divergence in ("kl", "hellinger"):
        got = visual_dependency(x, y, divergence=divergence, backend="cpu")
        ref = visual_dependency(x, y, divergence=divergence, backend="torch")
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize(("temperature", "low"), [(1e-3, -1.0), (1.0, -1000.0)])
def test_kl_stays_infinite_when_the_minus_inf_sits_in_a_block_of_underflowed_weight(build, temperature, low):
    # the second block's weight against the row maximum underflows to 0 in float64; its d is +inf
    # (a finite x_j against y_j = -inf) and was dropped with the weight: a finite KL instead of +inf
    x = torch.zeros(1, 4196)
    x[:, 2048:] = low
    y = torch.zeros(1, 4196)
    y[:, 3000] = -math.inf
    assert visual_dependency(x, y, temperature=temperature, backend="torch").item() == math.inf
    assert visual_dependency(x, y, temperature=temperature, backend="cpu").item() == math.inf
    assert visual_dependency_and_entropies(x, y, temperature=temperature, backend="cpu")[0].item() == math.inf


def test_entropy(build):
    for dtype in (torch.float32, torch.bfloat16):
        E.check("cpu", E.logits((3, 7, 5000), dtype), temperature=0.7)
    E.check("cpu", E.logits((3, 7, 5000), torch.float32, scale=5.0, offset=1e4))  # large logits: shifted
    x, mask = E.special_rows(5000)
    E.check_special(token_entropy(x, mask, backend="cpu"), x)


def test_joint(build):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        J.check("cpu", J.logits((3, 7, 5000), dtype), J.logits((3, 7, 5000), dtype), temperature=0.7)
    x, y, mask = J.special_rows(5000)
    J.check_special(J.check("cpu", x, y, mask=mask))


def test_strided_rows_and_layouts_read_in_place(build):
    full_x, full_y = T.logits((3, 12, 2500), torch.float32)
    sx, sy = full_x[:, 3:-1], full_y[:, 3:-1]  # [batch, seq] strides that do not flatten
    assert not sx.is_contiguous()
    T.check_forward("cpu", sx, sy, "kl")
    tx, ty = full_x.transpose(0, 1), full_y.transpose(0, 1)  # batch-major rows
    torch.testing.assert_close(
        visual_dependency(tx, ty, backend="cpu"), visual_dependency(tx.contiguous(), ty.contiguous(), backend="cpu")
    )
    vx = full_x[..., ::2]  # a vocabulary stride: copied to unit stride first
    T.check_forward("cpu", vx, full_y[..., ::2], "kl")


def test_threads_do_not_change_the_result():
    x, y = T.logits((4, 9, 3000), torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = visual_dependency_and_entropies(x, y, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = visual_dependency_and_entropies(x, y, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_nothing_needs_torch_compile(monkeypatch):
    """Every quantity, forward and backward, logit-free JSD included, runs with ``torch.compile`` unusable
    and every compiled function broken: gradients within naive's error."""

    def broken(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cpu backend called a compiled function")

    monkeypatch.setattr(_compile, "usable", lambda: False)
    for name in ("forward", "backward", "entropy_backward", "joint_backward", "jsd_partial", "jsd_partial_or_eager"):
        monkeypatch.setattr(_compile, name, broken)
    hx, hy, w = torch.randn(7, 16), torch.randn(7, 16), torch.randn(301, 16) * 0.5
    hx.requires_grad_()
    visual_dependency_from_hidden(hx, hy, w, divergence="jsd", backend="cpu", vocab_chunk_size=64).sum().backward()
    J.check("cpu", J.logits((2, 3, 300), torch.float32), J.logits((2, 3, 300), torch.float32))
    for dtype in (torch.float32, torch.bfloat16):
        x, y = T.logits((3, 4, 3001), dtype, scale=2.0)
        for divergence in ("kl", "jsd", "hellinger"):
            mask = random_mask(3, 4)
            err, err_naive = T.grad_errors("cpu", x, y, mask, torch.randn(3, 4), divergence=divergence)
            assert err <= err_naive + T.GRAD_TOL[dtype], (divergence, err, err_naive)
    x = E.logits((3, 4, 3001), torch.float32)
    err, err_naive = E.grad_errors("cpu", x, random_mask(3, 4), torch.randn(3, 4))
    assert err <= err_naive + T.GRAD_TOL[torch.float32]


# ----------------------------------------------------------------------------- the C backward


@pytest.mark.parametrize(
    ("dtype", "divergence"),
    [
        *((d, div) for d in (torch.float32, torch.bfloat16) for div in ("kl", "reverse_kl", "jsd", "hellinger")),
        *((torch.float16, div) for div in ("kl", "reverse_kl", "jsd")),  # float16 Hellinger: naive's gradient is NaN
    ],
)
def test_backward_matches_oracle(build, dtype, divergence):
    # (the float16 Hellinger gradient is the float32 one rounded: test_backward_rounds_to_the_dtype_...)
    x, y = T.logits((3, 4, 5000), dtype, scale=2.0)
    err, err_naive = T.grad_errors("cpu", x, y, random_mask(3, 4), torch.randn(3, 4), divergence=divergence)
    assert err <= err_naive + T.GRAD_TOL[dtype], (err, err_naive)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_entropy_and_joint_backward_match_oracle(build, dtype):
    x = E.logits((3, 4, 5000), dtype, scale=2.0)
    err, err_naive = E.grad_errors("cpu", x, random_mask(3, 4), torch.randn(3, 4))
    assert err <= err_naive + T.GRAD_TOL[dtype], ("entropy", err, err_naive)
    x, y = J.logits((3, 4, 5000), dtype, scale=2.0), J.logits((3, 4, 5000), dtype, scale=2.0)
    err, err_naive = J.grad_errors("cpu", x, y, random_mask(3, 4), torch.randn(3, 4, 3, dtype=torch.float64))
    assert err <= err_naive + T.GRAD_TOL[dtype], ("joint", err, err_naive)


def _grads(fn, x, y, upstream):
    a, b = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    (fn(a, b) * upstream).sum().backward()
    return a.grad, b.grad


@pytest.mark.parametrize("divergence", ["kl", "jsd", "hellinger", "entropy", "joint"])
def test_backward_special_values_as_the_torch_backend(build, divergence):
    """-inf entries (p = 0: exactly 0), a masked row of NaN (exactly 0), a live NaN (NaN where the torch
    backend has NaN), q = 0 under a finite p (KL +inf): the same pattern and values as ``"torch"``."""
    x, y = T.logits((2, 4, 5000), torch.float32)
    x[0, 0, :2100] = -math.inf  # a whole block and more
    x[0, 1, :100] = y[0, 1, :100] = -math.inf
    y[0, 2, 4000:4200] = -math.inf  # across a block boundary
    x[1, 1, 4999] = float("nan")  # in the tail of a counted row
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 0] = False
    x[1, 0] = float("nan")
    y[1, 0] = math.inf
    ops = {
        "kl": lambda b: lambda u, v: visual_dependency(u, v, mask, divergence="kl", backend=b),
        "jsd": lambda b: lambda u, v: visual_dependency(u, v, mask, divergence="jsd", backend=b),
        "hellinger": lambda b: lambda u, v: visual_dependency(u, v, mask, divergence="hellinger", backend=b),
        "entropy": lambda b: lambda u, v: token_entropy(u, mask, backend=b) + token_entropy(v, mask, backend=b),
        "joint": lambda b: lambda u, v: J.stacked(visual_dependency_and_entropies(u, v, mask, backend=b)),
    }
    upstream = torch.randn(2, 4, 3) if divergence == "joint" else torch.randn(2, 4)
    got = _grads(ops[divergence]("cpu"), x, y, upstream)
    ref = _grads(ops[divergence]("torch"), x, y, upstream)
    for g, r in zip(got, ref):
        assert torch.equal(g[1, 0], torch.zeros(5000))
        assert torch.equal(g.isnan(), r.isnan()) and torch.equal(g.isinf(), r.isinf())
        assert torch.equal(g == 0, r == 0)
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert torch.equal(got[0][0, 0, :2100], torch.zeros(2100))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["kl", "jsd", "hellinger", "entropy", "joint"])
def test_backward_rounds_to_the_dtype_as_torch_does(build, dtype, mode):
    """A 16-bit gradient is the float32 one of the same values rounded to nearest even, bit for bit:
    subnormal and overflowing float16 values included (large logits make tiny p; a large upstream
    gradient overflows float16)."""
    x, y = T.logits((2, 3, 3001), dtype, scale=8.0)
    wide = (x.float(), y.float())
    g = torch.randn(2, 3, 3) * 1e7
    g[1, 2] = float("nan")  # a NaN gradient row
    if mode == "entropy":
        _, stats = _cpu.entropy_forward(x, 0.9)
        g = g[..., 0]
        low = (_cpu.entropy_backward(g, x, stats, 0.9),)
        high = (_cpu.entropy_backward(g, wide[0], stats, 0.9),)
    elif mode == "joint":
        _, stats = _cpu.joint_forward(x, y, 0.9)
        low, high = _cpu.joint_backward(g, x, y, stats, 0.9), _cpu.joint_backward(g, *wide, stats, 0.9)
    else:
        _, stats = _cpu.forward(x, y, 0.9, mode)
        g = g[..., 0]
        low, high = _cpu.backward(g, x, y, stats, 0.9, mode), _cpu.backward(g, *wide, stats, 0.9, mode)
    bits = torch.int16
    for a, b in zip(low, high):
        assert a.dtype == dtype and b.dtype == torch.float32
        rounded = b.to(dtype)
        assert torch.equal(a.isnan(), rounded.isnan()) and a.isnan().any()  # torch may keep a NaN's sign
        keep = ~a.isnan()
        assert torch.equal(a[keep].view(bits), rounded[keep].view(bits))
    if dtype == torch.float16:
        tiny = low[0].abs()
        assert ((tiny > 0) & (tiny < 2**-14)).any() and low[0].isinf().any()  # subnormals and overflow met


def test_backward_strided_rows_and_threads(build):
    """Rows read in place from views that do not flatten, and the same bits on any thread count."""
    full_x, full_y = T.logits((3, 12, 2500), torch.bfloat16)
    sx, sy = full_x[:, 3:-1], full_y[:, 3:-1]
    tx, ty = full_x.transpose(0, 1), full_y.transpose(0, 1)
    upstream = torch.randn(3, 8)

    def kl(u, v):
        return visual_dependency(u, v, temperature=0.8, backend="cpu")

    for gs, gc in zip(_grads(kl, sx, sy, upstream), _grads(kl, sx.contiguous(), sy.contiguous(), upstream)):
        assert torch.equal(gs, gc)
    upstream_t = torch.randn(12, 3)
    for gs, gc in zip(_grads(kl, tx, ty, upstream_t), _grads(kl, tx.contiguous(), ty.contiguous(), upstream_t)):
        assert torch.equal(gs, gc)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(kl, sx, sy, upstream)
        torch.set_num_threads(max(3, threads))
        many = _grads(kl, sx, sy, upstream)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_differentiating_one_input_computes_one_gradient(build):
    """The C backward computes (and allocates) only the gradients autograd asks for, with the same bits."""
    x, y = T.logits((2, 3, 3001), torch.bfloat16)
    ops = {
        "kl": lambda u, v: visual_dependency(u, v, temperature=0.9, backend="cpu"),
        "hellinger": lambda u, v: visual_dependency(u, v, divergence="hellinger", backend="cpu"),
        "jsd": lambda u, v: visual_dependency(u, v, divergence="jsd", backend="cpu"),
        "joint": lambda u, v: J.stacked(visual_dependency_and_entropies(u, v, backend="cpu")),
    }
    for name, fn in ops.items():
        upstream = torch.randn(2, 3, 3) if name == "joint" else torch.randn(2, 3)
        both = _grads(fn, x, y, upstream)
        a = x.clone().requires_grad_()
        (fn(a, y) * upstream).sum().backward()
        assert torch.equal(a.grad, both[0]), name
        b = y.clone().requires_grad_()
        (fn(x, b) * upstream).sum().backward()
        assert torch.equal(b.grad, both[1]), name
    _, stats = _cpu.forward(x, y, 0.9, "kl")
    gx, gy = _cpu.backward(torch.ones(2, 3), x, y, stats, 0.9, "kl", needs=(True, False))
    assert gx.shape == x.shape and gy.numel() == 0
    gx, gy = _cpu.backward(torch.ones(2, 3), x, y, stats, 0.9, "kl", needs=(False, True))
    assert gx.numel() == 0 and gy.shape == y.shape


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and AOT dispatch of both C ops agree with the real ones."""
    x, y = T.logits((2, 3, 300), torch.bfloat16)
    inv_t = torch.tensor(1.0 / 0.8, dtype=torch.float64)
    torch.library.opcheck(_cpu.row_stats, (x.view(6, 300), y.view(6, 300), _cpu.MODES["kl"], inv_t))
    _, stats = _cpu.forward(x, y, 0.8, "kl")
    cols = _cpu._kl_columns(*stats.unbind(-1)[:3], torch.randn(2, 3), 1.0 / 0.8)
    consts = _cpu._constants(cols, stats[..., 0]).contiguous()
    for mode in ("kl", "hellinger", "entropy", "joint", "jsd"):
        for need in (1, 2, 3):
            torch.library.opcheck(_cpu.row_grads, (x, y, consts, _cpu.GRAD_MODES[mode], inv_t, need))
    torch.library.opcheck(_cpu.jsd_sums, (x, y, consts, inv_t))


@pytest.mark.slow
def test_inside_user_torch_compile_fullgraph():
    """The kernel is a custom op: a user's compiled step with backend='cpu' is one graph and matches eager."""
    x, y = T.logits((3, 4, 600), torch.float32)
    x.requires_grad_(), y.requires_grad_()
    mask, upstream = random_mask(3, 4), torch.randn(3, 4)
    loss, dep = torch.compile(T.user_step, fullgraph=True)(x, y, mask, upstream, "cpu")
    grads = torch.autograd.grad(loss, (x, y))
    loss_e, dep_e = T.user_step(x, y, mask, upstream, "torch")
    grads_e = torch.autograd.grad(loss_e, (x, y))
    torch.testing.assert_close(dep, dep_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_from_hidden(monkeypatch):
    monkeypatch.setattr(_compile, "usable", lambda: False)
    hx, hy, w = torch.randn(37, 16), torch.randn(37, 16), torch.randn(3001, 16) * 0.5
    for divergence in ("kl", "jsd"):
        got = visual_dependency_from_hidden(hx, hy, w, divergence=divergence, backend="cpu", vocab_chunk_size=1024)
        ref = visual_dependency(hx @ w.T, hy @ w.T, divergence=divergence, backend="torch")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # gradients through the C backward of each vocabulary tile
    leaves = [t.clone().requires_grad_() for t in (hx, hy, w)]
    upstream = torch.randn(37)
    out = visual_dependency_from_hidden(*leaves, backend="cpu", vocab_chunk_size=1024)
    got = torch.autograd.grad((out * upstream).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (hx, hy, w)]
    out64 = visual_dependency(leaves64[0] @ leaves64[2].T, leaves64[1] @ leaves64[2].T, backend="torch")
    ref = torch.autograd.grad((out64 * upstream.double()).sum(), leaves64)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_errors_name_the_backend():
    with pytest.raises(ValueError, match=r"backend='cpu' takes float32, bfloat16 or float16 logits, got torch.float64"):
        visual_dependency(torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64), backend="cpu")
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors, got a tensor on meta"):
        K.resolve_backend("cpu", torch.empty(2, 5, device="meta"))


@pytest.fixture
def rebuild(monkeypatch):
    """Forget the loaded library (and whether it builds) before the test and after it, so that the test
    builds under its own environment and later tests load the usual one again."""

    def forget():
        _cpu.library.cache_clear()
        _cpu.unavailable_reason.cache_clear()

    forget()
    yield forget
    monkeypatch.undo()
    forget()


def auto_without_cpu() -> str:
    return K.resolve_backend("auto", torch.empty(4, K.AUTO_COMPILE_MIN_ELEMENTS // 4))


def test_build_is_cached_per_machine_and_a_missing_compiler_falls_back(rebuild, monkeypatch, tmp_path):
    monkeypatch.setenv("VPPO_CORE_CACHE_DIR", str(tmp_path))
    assert _cpu.available()
    assert len(list(tmp_path.glob("cpu_kernel_*.so"))) == 1
    x, y = T.logits((2, 3, 700), torch.float32)
    T.check_forward("cpu", x, y)
    rebuild()
    monkeypatch.setattr(_cpu, "compiler", lambda: None)
    assert not _cpu.available()
    with pytest.raises(ValueError, match="backend='cpu' needs a C compiler"):
        visual_dependency(x, y, backend="cpu")
    assert auto_without_cpu() == ("compile" if _compile.usable() else "torch")


def test_a_compiler_that_fails_makes_the_backend_unavailable(rebuild, monkeypatch, tmp_path):
    """Both build attempts (with and without -march=native) fail: no library, auto uses compile or torch."""
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: this compiler always fails' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("VPPO_CORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(failing))
    with pytest.raises(RuntimeError, match="this compiler always fails"):
        _cpu.library()
    assert not _cpu.available()
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is left to load
    # auto falls back with one warning that carries the compiler's message (it was silent)
    K._warn_cpu_build_failed.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"(?s)did not build.*this compiler always fails"):
        assert auto_without_cpu() == ("compile" if _compile.usable() else "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto_without_cpu()  # once per process
    # an explicit backend='cpu' says the build failed, not that no compiler exists
    x, y = T.logits((2, 3, 70), torch.float32)
    with pytest.raises(ValueError, match=r"(?s)backend='cpu' could not build its kernel: .*this compiler always fails"):
        visual_dependency(x, y, backend="cpu")
    K._warn_cpu_build_failed.cache_clear()


def test_cc_with_arguments_is_used(rebuild, monkeypatch, tmp_path):
    """``CC="ccache gcc"``-style values: the first word is looked up, the rest passed on (it fell back to cc)."""
    wrapper = tmp_path / "wrap"
    log = tmp_path / "called"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("VPPO_CORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", f"{wrapper} {_cpu.compiler()}")
    assert _cpu.compiler() == f"{wrapper} {os.environ['CC'].split()[1]}"
    assert _cpu.available()
    assert "-shared" in log.read_text()


def test_a_shared_temporary_cache_folder_owned_by_no_one_else_is_required(monkeypatch, tmp_path):
    # the fallback /tmp/vppo_core-<uid> is predictable: a folder others can write (or someone else's) could
    # hold a planted library, which would be loaded; such a folder is not used
    open_folder = tmp_path / f"vppo_core-{os.getuid()}"
    open_folder.mkdir(mode=0o777)
    open_folder.chmod(0o777)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.delenv("VPPO_CORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(_cpu.tempfile, "gettempdir", lambda: str(tmp_path))
    _cpu._own_temporary_dir.cache_clear()
    chosen = _cpu._cache_dir()
    assert chosen != open_folder and chosen.name.startswith("vppo_core-")
    assert not chosen.stat().st_mode & 0o077
    open_folder.chmod(0o700)
    assert _cpu._cache_dir() == open_folder  # private again: used


def test_an_unwritable_cache_home_falls_back_to_the_temporary_directory(rebuild, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.delenv("VPPO_CORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # ~/.cache/vppo_core cannot be created under a file
    monkeypatch.setattr(_cpu.tempfile, "gettempdir", lambda: str(tmp_path))
    assert _cpu._cache_dir().parent == tmp_path and _cpu._cache_dir().name.startswith("vppo_core-")
    assert _cpu.available()
    assert list(_cpu._cache_dir().glob("cpu_kernel_*.so"))
