"""visual_dependency and sampled_visual_dependency against float64 oracles, properties, gradients, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from vppo_core import sampled_visual_dependency, visual_dependency, visual_dependency_from_hidden

from .helpers import assert_inputs_unchanged, random_mask
from .oracles import kl_autograd_oracle, kl_oracle, sampled_oracle

# Tolerance added to torch's own error in the same dtype (cut-cross-entropy's criterion).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}


def naive_kl(x: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """What a user would write in the input dtype: log_softmax both, then kl_div."""
    logp = torch.log_softmax(x / temperature, -1)
    logq = torch.log_softmax(y / temperature, -1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 1271), (5, 64), (2, 1, 3)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_oracle_no_worse_than_torch(dtype, shape, temperature):
    x = (torch.randn(shape) * 3).to(dtype)
    y = (x.double() + torch.randn(shape)).to(dtype)
    expected = kl_oracle(x, y, temperature=temperature)
    got = assert_inputs_unchanged(visual_dependency, x, y, temperature=temperature)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == shape[:-1]
    err = (got.double() - expected).abs().max().item()
    err_torch = (naive_kl(x, y, temperature).double() - expected).abs().max().item()
    assert err <= err_torch + TOL[dtype], (err, err_torch)
    if dtype in (torch.bfloat16, torch.float16):
        # computed in float32: no worse than torch on the same (rounded) inputs upcast to float32. The
        # bound above alone would pass a kernel that computed in the input's half precision.
        err_fp32 = (naive_kl(x.float(), y.float(), temperature).double() - expected).abs().max().item()
        assert err <= err_fp32 + TOL[torch.float32], (err, err_fp32)


def test_identical_inputs_give_exact_zero_and_result_is_nonnegative():
    x = torch.randn(4, 9, 301)
    assert torch.equal(visual_dependency(x, x), torch.zeros(4, 9))
    y = x + 1e-4 * torch.randn_like(x)  # nearly equal: rounding could go negative without the clamp
    assert (visual_dependency(x, y) >= 0).all()


def test_mask_gives_exact_zero_even_over_nan_rows():
    x, y = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    mask = random_mask(3, 5)
    x = x.masked_fill(~mask.unsqueeze(-1), float("nan"))  # garbage in padding
    got = visual_dependency(x, y, mask)
    assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(got, kl_oracle(x, y, mask).float(), rtol=1e-5, atol=1e-6)
    # 0/1 integer and float masks mean the same as bool
    assert torch.equal(visual_dependency(x, y, mask.long()), got)
    assert torch.equal(visual_dependency(x, y, mask.float()), got)


def test_nan_at_a_counted_position_propagates():
    x, y = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    x[0, 1, 4] = float("nan")
    y[1, 2, 0] = float("nan")
    got = visual_dependency(x, y)
    assert got[0, 1].isnan() and got[1, 2].isnan()
    assert got.isnan().sum() == 2


@pytest.mark.parametrize("backend", ["torch", pytest.param("compile", marks=pytest.mark.slow)])
def test_no_distribution_gives_nan_not_inf(backend):
    """Every logit of a counted row -inf in either input: no distribution, so NaN (not +inf), on every backend."""
    x, y = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    x[0, 2] = -math.inf
    y[1, 0] = -math.inf
    for divergence in ("kl", "reverse_kl", "jsd", "hellinger"):
        got = visual_dependency(x, y, divergence=divergence, backend=backend)
        assert got[0, 2].isnan() and got[1, 0].isnan() and got.isnan().sum() == 2, divergence


def test_neg_inf_logits():
    x, y = torch.randn(4, 50), torch.randn(4, 50)
    x[0, :10] = -math.inf  # masked in the real-image pass only: contributes nothing
    x[1, :10] = -math.inf  # masked in both: contributes nothing
    y[1, :10] = -math.inf
    y[2, 5] = -math.inf  # zero probability under q where p > 0: KL is +inf
    got = visual_dependency(x, y)
    expected = kl_oracle(x, y)
    torch.testing.assert_close(got[[0, 1, 3]].double(), expected[[0, 1, 3]], rtol=1e-5, atol=1e-6)
    assert got[2] == math.inf
    assert torch.isfinite(got[[0, 1, 3]]).all()


def test_noncontiguous_slice_input():
    full = torch.randn(2, 12, 97)
    x, y = full[:, 3:-1], (full + torch.randn_like(full))[:, 3:-1]
    assert not x.is_contiguous()
    torch.testing.assert_close(visual_dependency(x, y), kl_oracle(x, y).float(), rtol=1e-5, atol=1e-6)


@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 40),
    scale=st.floats(0.0, 30.0),
    temperature=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
)
def test_property_nonnegative_and_zero_on_equal(rows, vocab, scale, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    y = torch.randn(rows, vocab, generator=g) * scale
    assert (visual_dependency(x, y, temperature=temperature) >= 0).all()
    assert torch.equal(visual_dependency(x, x, temperature=temperature), torch.zeros(rows))


def test_gradcheck_float64():
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b: visual_dependency(a, b, mask, temperature=0.8), (x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_random_upstream_matches_oracle(dtype):
    x = (torch.randn(3, 4, 129) * 2).to(dtype).requires_grad_()
    y = (torch.randn(3, 4, 129) * 2).to(dtype).requires_grad_()
    mask = random_mask(3, 4)
    upstream = torch.randn(3, 4)
    visual_dependency(x, y, mask, temperature=1.3).backward(upstream)
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    (kl_autograd_oracle(x64, y64, 1.3) * upstream.double() * mask).sum().backward()
    # bf16 gradients are float32 gradients rounded once: within one bf16 ulp (2^-7 relative) of the oracle
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (2**-7, 1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=rtol, atol=atol)
    assert x.grad.dtype == dtype


def test_masked_rows_get_exactly_zero_gradient_even_with_nan():
    x = torch.randn(2, 4, 11)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = float("nan")
    x.requires_grad_()
    y = torch.randn(2, 4, 11, requires_grad=True)
    visual_dependency(x, y, mask).sum().backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert torch.equal(y.grad[~mask], torch.zeros_like(y.grad[~mask]))
    assert torch.isfinite(x.grad[mask]).all()


def test_tokens_vocab_layout_matches_batched():
    x, y = torch.randn(2, 5, 33), torch.randn(2, 5, 33)
    mask = random_mask(2, 5)
    flat = visual_dependency(x.reshape(10, 33), y.reshape(10, 33), mask.reshape(10))
    assert torch.equal(flat.reshape(2, 5), visual_dependency(x, y, mask))


def test_from_hidden_matches_logits():
    h_img, h_noimg = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    w = torch.randn(301, 16)
    mask = random_mask(2, 6)
    got = visual_dependency_from_hidden(h_img, h_noimg, w, mask, temperature=0.9)
    expected = kl_oracle(h_img.double() @ w.double().T, h_noimg.double() @ w.double().T, mask, 0.9)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_errors_name_the_argument():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        visual_dependency(x, x, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -1"):
        visual_dependency(x, x, temperature=-1.0)
    with pytest.raises(ValueError, match="same dtype"):
        visual_dependency(x, x.double())
    with pytest.raises(ValueError, match="got 4 dimensions"):
        visual_dependency(x[None], x[None])
    with pytest.raises(TypeError):  # jaxtyping: shape mismatch between the two inputs
        visual_dependency(x, torch.randn(2, 3, 6))
    with pytest.raises(TypeError):  # mask shape mismatch
        visual_dependency(x, x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError):  # integer logits
        visual_dependency(x.long(), x.long())


# ----------------------------------------------------------------------------- sampled estimate


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sampled_matches_formula(estimator, dtype):
    lp_img = (-torch.rand(4, 9) * 30).to(dtype)  # includes |d| > 20 (clamped) and k3 > 10 (clamped)
    lp_noimg = (-torch.rand(4, 9) * 30).to(dtype)
    mask = random_mask(4, 9)
    got = assert_inputs_unchanged(sampled_visual_dependency, lp_img, lp_noimg, mask, estimator=estimator)
    expected = torch.where(mask, sampled_oracle(lp_img, lp_noimg, estimator), 0.0)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_sampled_k3_clamps_and_nan():
    lp_img = torch.tensor([[0.0, 0.0, -50.0, float("nan"), float("nan")]])
    lp_noimg = torch.tensor([[0.0, -5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    got = sampled_visual_dependency(lp_img, lp_noimg, mask)
    assert got[0, 0] == 0
    assert got[0, 1] == pytest.approx(math.exp(-5) + 5 - 1)
    assert got[0, 2] == 10  # d clamped to 20, then exp(20) - 21 clamped to 10
    assert got[0, 3].isnan()  # NaN at a counted position propagates
    assert got[0, 4] == 0  # NaN in padding is not read
    k1 = sampled_visual_dependency(lp_img, lp_noimg, mask, estimator="k1")
    assert k1[0, 2] == -20  # the log-ratio is clamped to [-20, 20] before every estimator


def test_sampled_k3_is_unbiased_for_kl_before_clamping():
    """E_{o~p}[k3] = KL(p||q): the sampled estimate targets the same quantity as visual_dependency."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, generator=g), torch.randn(12, generator=g) * 0.5
    logp, logq = torch.log_softmax(x.double(), 0), torch.log_softmax(y.double(), 0)
    tokens = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=g)
    est = sampled_visual_dependency(logp[tokens], logq[tokens], estimator="k3")
    exact = visual_dependency(x.double()[None], y.double()[None])[0]
    stderr = est.std() / math.sqrt(len(tokens))
    assert abs(est.mean() - exact) < 4 * stderr


def test_sampled_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="estimator"):
        sampled_visual_dependency(lp, lp, estimator="k4")
    with pytest.raises(TypeError):
        sampled_visual_dependency(lp, torch.zeros(2, 4))
