"""The entropy kernels behind token_entropy, every backend against a float64 oracle.

Same criterion as ``test_kernels.py``: ``err(backend) <= err(naive torch in the same dtype) + TOL[dtype]``
against an oracle written as the formula ``-sum_j p_j log p_j``. The squared Hellinger distance is a
divergence of the same kernels and is tested with the others in ``test_kernels.py``; the Triton
entropy kernels are tested in ``test_kernels_triton.py`` (under ``TRITON_INTERPRET=1`` in a
subprocess on the CPU). Compiled variants are few: forward in three dtypes on one shape above a block,
the one-block graph in float32, and the backward in float32 and bfloat16.
"""

import math
import warnings

import pytest
import torch

import vppo_core.kernels as K
from vppo_core import token_entropy
from vppo_core.kernels import _compile, _cpu

from .helpers import assert_inputs_unchanged, random_mask

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}
COMPILE_SHAPE = (2, 3, 9001)  # vocab > 2 blocks of 4096 plus a tail: the general (blocked) graph
COMPILE = pytest.param("compile", marks=pytest.mark.slow)


def oracle(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float64 ``-sum_j p_j log p_j`` per row, with 0 log 0 = 0 (NaN for a row of only -inf)."""
    logp = torch.log_softmax(x.double() / temperature, -1)
    return -torch.where(logp == -math.inf, 0.0, logp.exp() * logp).sum(-1)


def naive(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """What a user would write in the input dtype."""
    logp = torch.log_softmax(x / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def logits(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(shape) * scale + offset).to(dtype)


def check(backend: str, x: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``err(backend) <= err(naive) + TOL`` on the rows where the oracle is finite; NaN rows stay NaN."""
    got = assert_inputs_unchanged(token_entropy, x, mask, temperature=temperature, backend=backend)
    assert got.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert got.shape == x.shape[:-1]
    expected, base = oracle(x, temperature), naive(x, temperature)
    if mask is not None:
        expected, base = torch.where(mask, expected, 0.0), torch.where(mask, base, 0.0)
    finite = torch.isfinite(expected)
    assert got[~finite].isnan().all()
    err = (got.double() - expected)[finite].abs()
    err_naive = (base.double() - expected)[finite].abs().nan_to_num(0.0, posinf=0.0)
    if err.numel():
        assert err.max() <= err_naive.max() + TOL[x.dtype], (err.max().item(), err_naive.max().item())
    return got


def special_rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with -inf entries, one finite entry, NaN, only -inf, and NaN under the mask."""
    x = logits((2, 4, vocab), torch.float32)
    x[0, 0, : vocab // 3] = -math.inf  # -inf entries contribute nothing (0 log 0 = 0)
    x[0, 1] = -math.inf
    x[0, 1, vocab - 1] = 2.0  # one finite entry: exactly 0
    x[0, 2, 7] = float("nan")  # NaN in a counted row: NaN
    x[0, 3] = -math.inf  # no distribution: NaN
    x[1, 1] = float("nan")  # garbage under the mask
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 1] = False
    return x, mask


def check_special(got: torch.Tensor, x: torch.Tensor) -> None:
    torch.testing.assert_close(got[0, 0].double(), oracle(x[0, 0]), rtol=0, atol=1e-6)
    assert got[0, 1] == 0.0
    assert got[0, 2].isnan() and got[0, 3].isnan()
    assert got[1, 1] == 0.0 and torch.isfinite(got[1]).all()


def grad_errors(backend: str, x: torch.Tensor, mask: torch.Tensor, upstream: torch.Tensor, temperature: float = 1.3):
    """Max |grad - float64 oracle grad| for ``backend`` and for naive autograd in the same dtype."""
    x64 = x.detach().double().requires_grad_()
    (oracle(x64, temperature) * upstream.double() * mask).sum().backward()
    errs = []
    for fn in (
        lambda a: token_entropy(a, mask, temperature=temperature, backend=backend),
        lambda a: torch.where(mask, naive(a, temperature), 0.0),
    ):
        a = x.detach().clone().requires_grad_()
        (fn(a) * upstream.to(torch.float32)).sum().backward()
        assert a.grad.dtype == x.dtype and a.grad.shape == x.shape
        errs.append((a.grad.double() - x64.grad).abs().max().item())
    return errs


# ----------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 1271), (5, 64), (2, 1, 3)])
def test_torch_backend_matches_oracle(dtype, shape):
    check("torch", logits(shape, dtype), temperature=0.7)


def test_torch_backend_large_logits_are_shifted_not_cancelled():
    """Logits around 60 (after T): sum_j p_j x_j would lose digits in float32; the row-max shift does not."""
    x = logits((4, 1271), torch.float32, offset=40.0)
    got = check("torch", x, temperature=0.7)
    torch.testing.assert_close(got.double(), oracle(x, 0.7), rtol=0, atol=2e-6)


def test_torch_backend_special_values_and_strided_rows():
    x, mask = special_rows(301)
    check_special(check("torch", x, mask=mask), x)
    full = logits((3, 12, 97), torch.float32)
    sliced = full[:, 3:-1]  # [batch, seq] strides that do not flatten: read in place
    assert not sliced.is_contiguous()
    torch.testing.assert_close(token_entropy(sliced, backend="torch").double(), oracle(sliced), rtol=0, atol=1e-6)


def test_torch_backend_gradcheck_float64():
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    x[0, 1, :2] = -math.inf  # zero probability: zero gradient
    x.requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a: token_entropy(a, mask, temperature=0.8, backend="torch"), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", COMPILE])
def test_backward_random_upstream(backend, dtype):
    shape = (3, 4, 9001) if backend == "compile" else (3, 4, 531)
    x = logits(shape, dtype, scale=2.0)
    err, err_naive = grad_errors(backend, x, random_mask(3, 4), torch.randn(3, 4))
    assert err <= err_naive + GRAD_TOL[dtype], (err, err_naive)


@pytest.mark.parametrize("backend", ["torch", COMPILE])
def test_masked_rows_and_neg_inf_entries_get_exactly_zero_gradient(backend):
    x = torch.randn(2, 4, 9001)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = float("nan")
    x[0, 0, :5000] = -math.inf  # a whole block and part of the next
    x.requires_grad_()
    token_entropy(x, mask, backend=backend).backward(torch.randn(2, 4))
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert torch.equal(x.grad[0, 0, :5000], torch.zeros(5000))
    assert torch.isfinite(x.grad[mask]).all()


# ----------------------------------------------------------------------------- compile backend


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compile_backend_matches_oracle(dtype):
    x = logits(COMPILE_SHAPE, dtype)
    x[0, 0, :5000] = -math.inf  # an all -inf block, merged with weight 0
    x[0, 1, 4000:4200] = -math.inf  # across a block boundary
    mask = torch.ones(COMPILE_SHAPE[:-1], dtype=torch.bool)
    mask[1, 1:] = False
    x[1, 2] = float("nan")  # garbage under the mask
    got = check("compile", x, temperature=0.7, mask=mask)
    assert torch.equal(got[1, 1:], torch.zeros(2))
    if dtype == torch.float32:  # a large common offset: no cancellation (the blocks are shifted too)
        big = x[:1] + 40.0
        got_big = check("compile", big, temperature=0.7)
        torch.testing.assert_close(got_big.double(), oracle(big, 0.7), rtol=0, atol=2e-6)


@pytest.mark.slow
def test_compile_backend_one_block_special_values_and_strided_rows():
    x, mask = special_rows(1271)  # vocab <= 4096: the one-block graph
    check_special(check("compile", x, mask=mask), x)
    full = logits((3, 12, 1271), torch.float32)
    sliced = full[:, 3:-1]  # does not flatten: per-batch row views, no copy
    got = token_entropy(sliced, backend="compile")
    torch.testing.assert_close(got.double(), oracle(sliced), rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- backend choice


def test_auto_falls_back_to_torch_when_compilation_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(K, "AUTO_COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_compile, "entropy_forward", broken)
    monkeypatch.setattr(_cpu, "available", lambda: False)  # no C compiler either
    monkeypatch.setattr(_compile, "_state", {"broken": False})
    x = logits((2, 3, 50), torch.float32)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = token_entropy(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = token_entropy(x)
    torch.testing.assert_close(got, again)
    torch.testing.assert_close(got.double(), oracle(x), rtol=1e-5, atol=1e-6)


def test_backend_errors_name_the_argument():
    x = torch.randn(2, 3, 5)
    with pytest.raises((TypeError, ValueError), match="backend"):
        token_entropy(x, backend="cuda")  # type: ignore[arg-type]
    if not K._triton_runs_on(x.device):
        with pytest.raises(ValueError, match=r"backend='triton' needs (CUDA tensors|the triton package|triton >= )"):
            token_entropy(x, backend="triton")
