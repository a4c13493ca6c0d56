"""Triton kernels of visual_dependency and token_entropy: forward, backward, custom ops, inside torch.compile.

Runs on CUDA when present; on the CPU only under ``TRITON_INTERPRET=1`` (``test_kernels.py`` starts it in
a subprocess with the variable set before anything imports the kernel module). Otherwise every test skips.
Sizes are small: the interpreter executes each program in numpy.
"""

import math
import os

import pytest
import torch

from vppo_core import kernels as K
from vppo_core import token_entropy, visual_dependency, visual_dependency_and_entropies, visual_dependency_from_hidden

from . import test_joint as joint_tests
from . import test_kernels_entropy as entropy_tests
from .helpers import assert_inputs_unchanged, random_mask
from .test_kernels import (
    GRAD_TOL,
    TOL,
    _grad_error,
    assert_no_worse_than_naive,
    check_offsets,
    logits,
    naive,
    oracle,
)
from .test_kernels_robustness import SECOND_ORDER

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not (CUDA or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (test_kernels.py runs it so)", allow_module_level=True)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
if not K.triton_usable():
    pytest.skip(f"triton {triton.__version__} is older than the backend uses", allow_module_level=True)


if INTERPRET:

    @triton.jit
    def _count(out, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(out, total)

    def _interpreter_runs_runtime_loops() -> bool:
        out = torch.zeros(1, dtype=torch.int32)
        try:
            _count[(1,)](out, 3)
        except Exception:  # e.g. triton <= 3.6 with numpy >= 2.4: TypeError converting the bound
            return False
        return int(out) == 3

    if not _interpreter_runs_runtime_loops():
        import numpy as np

        pytest.skip(
            f"the interpreter of triton {triton.__version__} cannot run a loop over a runtime bound with "
            f"numpy {np.__version__} (GPU machines run these tests natively)",
            allow_module_level=True,
        )
# masked lanes compute -inf - -inf in the interpreter's numpy: harmless, discarded by tl.where
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def on_device(*ts):
    return tuple(t.to(DEVICE) for t in ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "hellinger"])
@pytest.mark.parametrize("shape", [(3, 7, 1271), (2, 513), (1, 1, 3)])
def test_forward_matches_oracle(dtype, divergence, shape):
    x, y = on_device(*logits(shape, dtype))
    got = assert_inputs_unchanged(visual_dependency, x, y, temperature=0.7, divergence=divergence, backend="triton")
    assert got.dtype == torch.float32 and got.shape == shape[:-1] and got.device.type == DEVICE
    x, y, got = x.cpu(), y.cpu(), got.cpu()
    assert_no_worse_than_naive(got, naive(x, y, divergence, 0.7), oracle(x, y, divergence, 0.7), TOL[dtype])


def test_neg_inf_nan_masked_rows_and_exact_zero():
    x, y = logits((5, 300), torch.float32)
    x[0, :10] = -math.inf  # -inf in p only: contributes nothing
    x[1, :10] = -math.inf  # -inf in both
    y[1, :10] = -math.inf
    y[2, 5] = -math.inf  # finite p, zero q: +inf
    x[3, 7] = float("nan")  # NaN at a counted row
    x[4] = float("nan")  # NaN under the mask
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    got = visual_dependency(*on_device(x, y, mask), backend="triton").cpu()
    torch.testing.assert_close(got[:2].double(), oracle(x[:2], y[:2]), rtol=1e-5, atol=1e-5)
    assert got[2] == math.inf and got[3].isnan() and got[4] == 0
    same = visual_dependency(*on_device(x[:2], x[:2]), backend="triton").cpu()
    assert torch.equal(same, torch.zeros(2))
    # finite x_j whose p_j underflows in float32 (in the max's block, and alone in a later block)
    # against y_j = -inf: still +inf, not 0 * inf = NaN; a +inf logit has no distribution: NaN
    x, y = torch.full((3, 600), -math.inf), torch.full((3, 600), -math.inf)
    x[:, 0] = y[:, 0] = 0.0
    x[0, 1] = -200.0
    x[1, 590] = -150.0
    x[2, 1], y[2, 1] = math.inf, 0.0
    got = visual_dependency(*on_device(x, y), backend="triton").cpu()
    assert got[0] == math.inf and got[1] == math.inf and got[2].isnan()
    joint = visual_dependency_and_entropies(*on_device(x[:2], y[:2]), backend="triton")
    assert (joint.dependency.cpu() == math.inf).all()


def test_small_temperatures_and_large_offsets_keep_the_dtypes_accuracy():
    # the kernels shift before they scale, e^{(x - m)/T}, and centre x - y by lse_x - lse_y in the backward
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 700, generator=g)
    y = x + 0.5 * torch.randn(2, 700, generator=g)
    for t in (1e-3, 1e-2):
        got = visual_dependency(*on_device(x, y), divergence="jsd", temperature=t, backend="triton").cpu()
        assert got.max().item() <= math.log(2.0) + 1e-7
        torch.testing.assert_close(got.double(), oracle(x, y, "jsd", t), rtol=0, atol=1e-6)
    upstream = torch.rand(2, generator=g)

    def ours(a, b):
        out = visual_dependency(*on_device(a, b), temperature=0.01, backend="triton")
        return out.cpu()

    def plain(a, b):
        return naive(a, b, temperature=0.01)

    for off in (0.0, 1e4):
        bound = 4 * _grad_error(plain, x + off, y + off, upstream) + 1e-6
        assert _grad_error(ours, x + off, y + off, upstream) <= bound


def test_an_offset_between_the_inputs_costs_no_accuracy():
    # the forward keeps the KL's sum centred at the running shifts, the backward forms log(p/q) from
    # x - k_x and y - k_y (test_kernels.check_offsets)
    def dep(a, b):
        return visual_dependency(*on_device(a, b), backend="triton").cpu()

    def joint(a, b):
        return visual_dependency_and_entropies(*on_device(a, b), backend="triton")[0].cpu()

    check_offsets(dep, rows=2, vocab=1300)
    check_offsets(joint, rows=2, vocab=1300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 1271), (2, 513), (1, 1, 3)])
def test_entropy_forward_matches_oracle(dtype, shape):
    x = entropy_tests.logits(shape, dtype)
    got = assert_inputs_unchanged(token_entropy, on_device(x)[0], temperature=0.7, backend="triton")
    assert got.dtype == torch.float32 and got.shape == shape[:-1] and got.device.type == DEVICE
    err = (got.cpu().double() - entropy_tests.oracle(x, 0.7)).abs().max()
    err_naive = (entropy_tests.naive(x, 0.7).double() - entropy_tests.oracle(x, 0.7)).abs().max()
    assert err <= err_naive + TOL[dtype], (err, err_naive)


def test_hellinger_and_entropy_special_values():
    x, y = logits((6, 300), torch.float32)
    x[0, :10] = -math.inf  # -inf in p only: contributes nothing
    x[1, :10] = -math.inf  # -inf in both
    y[1, :10] = -math.inf
    y[2, 5:290] = -math.inf  # finite p, zero q: those terms of BC are 0 (spans both 256-blocks)
    x[3, 7] = float("nan")  # NaN at a counted row
    x[4] = -math.inf  # no distribution p
    x[5] = float("nan")  # NaN under the mask
    mask = torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)
    h2 = visual_dependency(*on_device(x, y, mask), divergence="hellinger", backend="triton").cpu()
    torch.testing.assert_close(h2[:3].double(), oracle(x[:3], y[:3], "hellinger"), rtol=0, atol=1e-6)
    assert h2[3:5].isnan().all() and h2[5] == 0
    kl = visual_dependency(*on_device(x, y, mask), backend="triton").cpu()
    assert kl[3:5].isnan().all() and kl[5] == 0  # NaN in the row; no distribution p
    same = visual_dependency(*on_device(x[:3], x[:3]), divergence="hellinger", backend="triton").cpu()
    assert torch.equal(same, torch.zeros(3))  # exactly 0 for identical inputs
    x[2] = -math.inf
    x[2, 299] = 1.0  # one finite entry: entropy exactly 0
    h = token_entropy(*on_device(x, mask), backend="triton").cpu()
    torch.testing.assert_close(h[:2].double(), entropy_tests.oracle(x[:2]), rtol=0, atol=2e-6)
    assert h[2] == 0 and h[3:5].isnan().all() and h[5] == 0


def test_strided_token_axis_is_read_in_place():
    full = torch.randn(4, 12, 700)
    x = full[:, 3:-1]  # [batch, seq] strides that do not flatten
    y = (full + torch.randn_like(full)).transpose(0, 1).contiguous().transpose(0, 1)[:, 3:-1]
    assert not x.is_contiguous() and not y.is_contiguous() and x.stride() != y.stride()
    got = visual_dependency(*on_device(x, y), backend="triton").cpu()
    torch.testing.assert_close(got.double(), oracle(x, y), rtol=1e-5, atol=1e-5)
    got = visual_dependency(*on_device(x, y), divergence="hellinger", backend="triton").cpu()
    torch.testing.assert_close(got.double(), oracle(x, y, "hellinger"), rtol=0, atol=1e-6)
    got = token_entropy(on_device(y)[0], backend="triton").cpu()
    torch.testing.assert_close(got.double(), entropy_tests.oracle(y), rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "hellinger"])
def test_backward_random_upstream(dtype, divergence):
    x, y = logits((3, 4, 531), dtype, scale=2.0)
    mask, upstream = random_mask(3, 4), torch.randn(3, 4)
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    (oracle(x64, y64, divergence, 1.3) * upstream.double() * mask).sum().backward()
    errs = []
    for backend in ("triton", "naive"):
        a, b = (t.clone().to(DEVICE).requires_grad_() for t in (x, y))
        m, u = on_device(mask, upstream)
        if backend == "naive":
            out = torch.where(m, naive(a, b, divergence, 1.3), 0.0)
        else:
            out = visual_dependency(a, b, m, temperature=1.3, divergence=divergence, backend="triton")
        (out * u.to(out.dtype)).sum().backward()
        assert a.grad.dtype == dtype and a.grad.shape == x.shape
        errs.append(max((a.grad.cpu().double() - x64.grad).abs().max(), (b.grad.cpu().double() - y64.grad).abs().max()))
    assert errs[0] <= errs[1] + GRAD_TOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_backward_random_upstream(dtype):
    x = entropy_tests.logits((3, 4, 531), dtype, scale=2.0)
    mask, upstream = random_mask(3, 4), torch.randn(3, 4)
    x64 = x.double().requires_grad_()
    (entropy_tests.oracle(x64, 1.3) * upstream.double() * mask).sum().backward()
    errs = []
    for backend in ("triton", "naive"):
        a = x.clone().to(DEVICE).requires_grad_()
        m, u = on_device(mask, upstream)
        if backend == "naive":
            out = torch.where(m, entropy_tests.naive(a, 1.3), 0.0)
        else:
            out = token_entropy(a, m, temperature=1.3, backend="triton")
        (out * u.to(out.dtype)).sum().backward()
        assert a.grad.dtype == dtype and a.grad.shape == x.shape
        errs.append((a.grad.cpu().double() - x64.grad).abs().max())
    assert errs[0] <= errs[1] + GRAD_TOL[dtype], errs


@pytest.mark.parametrize("divergence", ["kl", "hellinger", "entropy"])
def test_masked_rows_get_exactly_zero_gradient_even_with_nan(divergence):
    x, y = torch.randn(2, 4, 300), torch.randn(2, 4, 300)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = float("nan")
    x[0, 0, :260] = -math.inf  # a whole 256-block and part of the next: zero gradient there
    x, y, mask = on_device(x, y, mask)
    x.requires_grad_(), y.requires_grad_()
    if divergence == "entropy":
        token_entropy(x, mask, backend="triton").backward(torch.randn(2, 4, device=DEVICE))
    else:
        visual_dependency(x, y, mask, divergence=divergence, backend="triton").sum().backward()
        assert torch.equal(y.grad[~mask], torch.zeros_like(y.grad[~mask]))
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert torch.equal(x.grad[0, 0, :260], torch.zeros(260, device=DEVICE))
    assert torch.isfinite(x.grad[mask]).all()


def test_custom_ops_pass_opcheck():
    from vppo_core.kernels import _autograd

    ops = _autograd.triton_ops()
    x, y = on_device(*logits((2, 3, 300), torch.float32))
    x.requires_grad_(), y.requires_grad_()
    torch.library.opcheck(ops.divergence_fwd, (x, y, 0.8, ops.DIV_KL))
    torch.library.opcheck(ops.divergence_fwd, (x, y, 0.8, ops.DIV_HELLINGER))
    torch.library.opcheck(ops.entropy_fwd, (x, 0.8))
    grad = torch.randn(2, 3, device=DEVICE)
    for code in (ops.DIV_JSD, ops.DIV_HELLINGER):
        _, stats = ops.divergence_fwd(x.detach(), y.detach(), 0.8, code)
        torch.library.opcheck(ops.divergence_bwd, (x.detach(), y.detach(), stats, grad, 0.8, code))
    _, stats = ops.entropy_fwd(x.detach(), 0.8)
    torch.library.opcheck(ops.entropy_bwd, (x.detach(), stats, grad, 0.8))


def test_inside_user_torch_compile_fullgraph():
    def step(x, y, mask, upstream):
        dep = visual_dependency(x, y, mask, temperature=1.3, backend="triton")
        h2 = visual_dependency(x, y, mask, divergence="hellinger", backend="triton")
        entropy = token_entropy(x, mask, temperature=0.9, backend="triton")
        return ((dep + h2) * upstream).sum() - 0.1 * entropy.sum()

    x, y = on_device(*logits((3, 4, 600), torch.float32))
    x.requires_grad_(), y.requires_grad_()
    mask, upstream = on_device(random_mask(3, 4), torch.randn(3, 4))
    loss = torch.compile(step, fullgraph=True)(x, y, mask, upstream)
    grads = torch.autograd.grad(loss, (x, y))
    grads_e = torch.autograd.grad(step(x, y, mask, upstream), (x, y))
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("divergence", ["kl", "jsd", "hellinger"])
def test_from_hidden_with_triton_tiles(divergence):
    hx = torch.randn(2, 5, 16)
    hy = hx + 0.3 * torch.randn(2, 5, 16)
    w = torch.randn(301, 16)
    mask, upstream = random_mask(2, 5), torch.randn(2, 5)
    hx, hy, w, mask, upstream = on_device(hx, hy, w, mask, upstream)
    hx.requires_grad_(), hy.requires_grad_(), w.requires_grad_()
    kw = {"divergence": divergence}
    got = visual_dependency_from_hidden(hx, hy, w, mask, backend="triton", chunk_size=4, vocab_chunk_size=100, **kw)
    ref = visual_dependency(hx @ w.T, hy @ w.T, mask, backend="torch", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((got * upstream).sum(), (hx, hy, w))
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (hx, hy, w))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_from_hidden_jsd_sweep_uses_the_kernels_inverse_temperature(monkeypatch):
    # Triton passes a Python float as float32 on the GPU: the logit-free JSD's second sweep meets the
    # kernels' lse's, so it must use that same rounded 1/T (with the exact one, the exponents were off
    # by |x|/T 2^-24: 1.6e-5 in the JSD at logits near 1000 on a GPU; the interpreter kept float64)
    from vppo_core.kernels import _compile, _triton

    seen: list[float] = []
    sweep = _compile.jsd_partial_or_eager()

    def spy(x, y, lse_x, lse_y, inv_t):
        seen.append(inv_t)
        return sweep(x, y, lse_x, lse_y, inv_t)

    monkeypatch.setattr(_compile, "jsd_partial_or_eager", lambda: spy)
    g = torch.Generator().manual_seed(4)
    off = 1000.0  # every logit offset by 1000 through a constant feature
    hx = torch.cat([torch.randn(1, 4, 16, generator=g), torch.ones(1, 4, 1)], -1)
    hy = torch.cat([hx[..., :16] + 0.3 * torch.randn(1, 4, 16, generator=g), torch.ones(1, 4, 1)], -1)
    w = torch.cat([torch.randn(301, 16, generator=g), torch.full((301, 1), off)], -1)
    hx, hy, w = on_device(hx, hy, w)
    got = visual_dependency_from_hidden(
        hx, hy, w, temperature=0.7, divergence="jsd", backend="triton", vocab_chunk_size=100
    )
    assert seen and all(v == _triton.kernel_inv_t(1 / 0.7) for v in seen), seen
    assert _triton.kernel_inv_t(1 / 0.7) != 1 / 0.7  # the test would not tell the two apart otherwise
    expected = oracle((hx @ w.T).cpu(), (hy @ w.T).cpu(), "jsd", 0.7)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda():
    from vppo_core import kernels

    assert kernels.resolve_backend("auto", torch.empty(2, 3, 5, device="cuda")) == "triton"
    assert kernels.resolve_backend("auto", torch.empty(2, 3, 5, device="cuda", dtype=torch.float64)) == "torch"


@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets_beyond_2_pow_31():
    vocab = 131072
    rows = 2**31 // vocab + 2  # rows * vocab > 2^31: element offsets need int64
    x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    got = visual_dependency(x, y, backend="triton")
    tail = slice(rows - 3, rows)
    torch.testing.assert_close(got[tail], visual_dependency(x[tail], y[tail], backend="torch"), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- KL and both entropies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 1271), (2, 513), (1, 1, 3)])
def test_joint_forward_matches_oracle(dtype, shape):
    x, y = joint_tests.logits(shape, dtype), joint_tests.logits(shape, dtype)
    got = joint_tests.stacked(
        assert_inputs_unchanged(visual_dependency_and_entropies, *on_device(x, y), temperature=0.7, backend="triton")
    )
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 3) and got.device.type == DEVICE
    expected, base = joint_tests.oracle_terms(x, y, 0.7), joint_tests.naive_terms(x, y, 0.7)
    for k in range(3):
        err = (got[..., k].cpu().double() - expected[..., k]).abs().max()
        err_naive = (base[..., k].double() - expected[..., k]).abs().max()
        assert err <= err_naive + joint_tests.TOL[dtype], (k, err, err_naive)


def test_joint_special_values_and_strided_rows():
    x, y, mask = joint_tests.special_rows(300)  # vocab 300: two 256-blocks under the interpreter
    got = joint_tests.stacked(visual_dependency_and_entropies(*on_device(x, y, mask), backend="triton")).cpu()
    joint_tests.check_special(got)
    expected = joint_tests.oracle_terms(x, y)
    torch.testing.assert_close(got[0, 0].double(), expected[0, 0], rtol=1e-5, atol=1e-5)
    full_x, full_y = joint_tests.logits((2, 9, 97), torch.float32), joint_tests.logits((2, 9, 97), torch.float32)
    sx, sy = on_device(full_x[:, 2:-1], full_y[:, 2:-1])  # does not flatten: read in place
    got = joint_tests.stacked(visual_dependency_and_entropies(sx, sy, backend="triton")).cpu()
    torch.testing.assert_close(got.double(), joint_tests.oracle_terms(sx.cpu(), sy.cpu()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_backward_random_upstream(dtype):
    x, y = joint_tests.logits((3, 4, 531), dtype, scale=2.0), joint_tests.logits((3, 4, 531), dtype, scale=2.0)
    x[0, 0, :300] = -math.inf  # a 256-block and part of the next, in both inputs
    y[0, 0, :300] = -math.inf
    mask, upstream = random_mask(3, 4), torch.randn(3, 4, 3, dtype=torch.float64)
    # -inf as -1e4 in the float64 oracle: the same (zero) probabilities, and an autograd without -inf - -inf
    x64, y64 = (t.double().clamp_min(-1e4).requires_grad_() for t in (x, y))
    (torch.where(mask.unsqueeze(-1), joint_tests.oracle_terms(x64, y64), 0.0) * upstream).sum().backward()
    errs = []
    for backend in ("triton", "naive"):
        a, b = (t.clone().to(DEVICE).requires_grad_() for t in (x, y))
        m = mask.to(DEVICE)
        if backend == "naive":
            out = torch.where(m.unsqueeze(-1), joint_tests.naive_terms(a, b), 0.0)
        else:
            out = joint_tests.stacked(visual_dependency_and_entropies(a, b, m, backend="triton"))
        (out * upstream.to(DEVICE, out.dtype)).sum().backward()
        assert a.grad.dtype == dtype and b.grad.shape == y.shape
        ga, gb = a.grad.cpu().double(), b.grad.cpu().double()
        if backend == "triton":  # zero probability in both inputs: exactly zero gradient
            assert torch.equal(ga[0, 0, :300], torch.zeros(300, dtype=torch.float64))
            assert torch.equal(gb[0, 0, :300], torch.zeros(300, dtype=torch.float64))
        if backend == "naive":  # its NaN at -inf - -inf counted as no error: a stricter baseline
            ga, gb = ga.nan_to_num(0.0), gb.nan_to_num(0.0)
        errs.append(max((ga - x64.grad).abs().max(), (gb - y64.grad).abs().max()))
    assert errs[0] <= errs[1] + GRAD_TOL[dtype], errs


def test_joint_masked_rows_and_single_outputs_get_exactly_zero_gradient():
    x, y = torch.randn(2, 4, 300), torch.randn(2, 4, 300)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = float("nan")
    y[~mask] = float("nan")
    x, y, mask = on_device(x, y, mask)
    x.requires_grad_(), y.requires_grad_()
    visual_dependency_and_entropies(x, y, mask, backend="triton").entropy_img.sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert torch.equal(y.grad, torch.zeros_like(y.grad))  # H(p) alone does not reach y
    expected = torch.autograd.grad(token_entropy(x, mask, backend="triton").sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_joint_custom_ops_pass_opcheck_and_run_in_user_compile():
    from vppo_core.kernels import _autograd

    ops = _autograd.triton_ops()
    x, y = on_device(*logits((2, 3, 300), torch.float32))
    x.requires_grad_(), y.requires_grad_()
    torch.library.opcheck(ops.joint_fwd, (x, y, 0.8))
    _, stats = ops.joint_fwd(x.detach(), y.detach(), 0.8)
    grad = torch.randn(2, 3, 3, device=DEVICE)
    torch.library.opcheck(ops.joint_bwd, (x.detach(), y.detach(), stats, grad, 0.8))

    def step(a, b, mask):
        out = visual_dependency_and_entropies(a, b, mask, temperature=1.3, backend="triton")
        return (-0.02 * out.dependency + 0.03 * (out.entropy_img + out.entropy_noimg)).sum()

    mask = random_mask(2, 3).to(DEVICE)
    grads = torch.autograd.grad(torch.compile(step, fullgraph=True)(x, y, mask), (x, y))
    for a, b in zip(grads, torch.autograd.grad(step(x, y, mask), (x, y))):
        torch.testing.assert_close(a, b)


def test_double_backward_raises():
    """First derivatives only, as on the other backends (``test_kernels_robustness.py``)."""
    x0, y = on_device(*logits((2, 3, 300), torch.float32))
    terms = {
        "kl": lambda x: visual_dependency(x, y, backend="triton"),
        "entropy": lambda x: token_entropy(x, backend="triton"),
        "joint": lambda x: torch.stack(visual_dependency_and_entropies(x, y, backend="triton"), -1),
    }
    for name, term in terms.items():
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(term(x).sum(), x, create_graph=True)
        torch.testing.assert_close(g.detach(), torch.autograd.grad(term(x).sum(), x)[0], msg=name)
        with pytest.raises(RuntimeError, match=SECOND_ORDER):
            torch.autograd.grad((g * g).sum(), x)
