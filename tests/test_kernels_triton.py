"""Triton kernels of visual_dependency: forward, backward, custom ops, inside torch.compile.

Runs on CUDA when present; on the CPU only under ``TRITON_INTERPRET=1`` (``test_kernels.py`` starts it in
a subprocess with the variable set before anything imports the kernel module). Otherwise every test skips.
Sizes are small: the interpreter executes each program in numpy.
"""

import math
import os

import pytest
import torch

from vppo_core import visual_dependency, visual_dependency_from_hidden

from .helpers import assert_inputs_unchanged, random_mask
from .test_kernels import GRAD_TOL, TOL, assert_no_worse_than_naive, logits, naive, oracle

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not (CUDA or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (test_kernels.py runs it so)", allow_module_level=True)
triton = pytest.importorskip("triton")
# masked lanes compute -inf - -inf in the interpreter's numpy: harmless, discarded by tl.where
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def on_device(*ts):
    return tuple(t.to(DEVICE) for t in ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
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


def test_strided_token_axis_is_read_in_place():
    full = torch.randn(4, 12, 700)
    x = full[:, 3:-1]  # [batch, seq] strides that do not flatten
    y = (full + torch.randn_like(full)).transpose(0, 1).contiguous().transpose(0, 1)[:, 3:-1]
    assert not x.is_contiguous() and not y.is_contiguous() and x.stride() != y.stride()
    got = visual_dependency(*on_device(x, y), backend="triton").cpu()
    torch.testing.assert_close(got.double(), oracle(x, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
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


def test_masked_rows_get_exactly_zero_gradient_even_with_nan():
    x, y = torch.randn(2, 4, 300), torch.randn(2, 4, 300)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = float("nan")
    x, y, mask = on_device(x, y, mask)
    x.requires_grad_(), y.requires_grad_()
    visual_dependency(x, y, mask, backend="triton").sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert torch.equal(y.grad[~mask], torch.zeros_like(y.grad[~mask]))
    assert torch.isfinite(x.grad[mask]).all()


def test_custom_ops_pass_opcheck():
    from vppo_core.kernels import _autograd

    ops = _autograd.triton_ops()
    x, y = on_device(*logits((2, 3, 300), torch.float32))
    x.requires_grad_(), y.requires_grad_()
    torch.library.opcheck(ops.divergence_fwd, (x, y, 0.8, ops.DIV_KL))
    _, stats = ops.divergence_fwd(x.detach(), y.detach(), 0.8, ops.DIV_JSD)
    grad = torch.randn(2, 3, device=DEVICE)
    torch.library.opcheck(ops.divergence_bwd, (x.detach(), y.detach(), stats, grad, 0.8, ops.DIV_JSD))


def test_inside_user_torch_compile_fullgraph():
    def step(x, y, mask, upstream):
        return (visual_dependency(x, y, mask, temperature=1.3, backend="triton") * upstream).sum()

    x, y = on_device(*logits((3, 4, 600), torch.float32))
    x.requires_grad_(), y.requires_grad_()
    mask, upstream = on_device(random_mask(3, 4), torch.randn(3, 4))
    loss = torch.compile(step, fullgraph=True)(x, y, mask, upstream)
    grads = torch.autograd.grad(loss, (x, y))
    grads_e = torch.autograd.grad(step(x, y, mask, upstream), (x, y))
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_from_hidden_with_triton_tiles():
    hx = torch.randn(2, 5, 16)
    hy = hx + 0.3 * torch.randn(2, 5, 16)
    w = torch.randn(301, 16)
    mask, upstream = random_mask(2, 5), torch.randn(2, 5)
    hx, hy, w, mask, upstream = on_device(hx, hy, w, mask, upstream)
    hx.requires_grad_(), hy.requires_grad_(), w.requires_grad_()
    got = visual_dependency_from_hidden(hx, hy, w, mask, backend="triton", chunk_size=4, vocab_chunk_size=100)
    ref = visual_dependency(hx @ w.T, hy @ w.T, mask, backend="torch")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((got * upstream).sum(), (hx, hy, w))
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (hx, hy, w))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


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
