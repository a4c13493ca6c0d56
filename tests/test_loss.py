"""clipped_surrogate, kl_penalty, aggregate and vppo_loss against float64 oracles; gradients; errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vppo_core import aggregate, clipped_surrogate, kl_penalty, vppo_loss

from .helpers import assert_inputs_unchanged, random_mask
from .oracles import sampled_oracle, surrogate_oracle


def make_batch(batch=6, seq=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 3
    lp = old + 0.4 * torch.randn(batch, seq, generator=g, dtype=torch.float64)  # ratios both sides of the clip
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, seq, generator=g) < 0.8
    mask[0] = True
    mask[-1] = False
    keep = (torch.rand(batch, seq, generator=g) < 0.4) & mask
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask, keep


# ----------------------------------------------------------------------------- oracles for aggregation


def agg_oracle(values, mask, weights, agg, denominator):
    """Loops over sequences; weights is a float tensor (1 where no token mask)."""
    B, T = values.shape
    seq_terms, nonempty = [], 0
    total_c, total_d = 0.0, 0.0
    for b in range(B):
        c = sum(values[b, t].item() * weights[b, t].item() for t in range(T) if mask[b, t])
        d = sum((weights[b, t].item() if denominator == "kept" else 1.0) for t in range(T) if mask[b, t])
        total_c += c
        total_d += d
        if any(mask[b]):
            nonempty += 1
            if agg == "seq-mean-token-mean":
                seq_terms.append(c / d if d > 0 else c)
            elif agg == "seq-mean-token-sum":
                seq_terms.append(c)
            elif agg == "seq-mean-token-sum-norm":
                seq_terms.append(c / T)
    if agg == "token-mean":
        return total_c / (total_d if total_d > 0 else 1.0)
    return sum(seq_terms) / max(nonempty, 1)


# ----------------------------------------------------------------------------- clipped surrogate


@pytest.mark.parametrize("dual_clip", [3.0, None])
@pytest.mark.parametrize("clips", [(0.2, 0.28), (0.2, 0.2), (0.0, 0.0)])
def test_surrogate_matches_oracle(dual_clip, clips):
    lp, old, adv, _, _ = make_batch(dtype=torch.float64)
    lp[0, 0], old[0, 0] = 30.0, -30.0  # log-ratio beyond the +-20 clamp
    adv[1] = -2.0
    lp[1, :3] = old[1, :3] + 2.0  # big ratio with a negative advantage: the dual clip binds
    got = assert_inputs_unchanged(
        clipped_surrogate, lp, old, adv, clip_low=clips[0], clip_high=clips[1], dual_clip=dual_clip
    )
    expected = torch.tensor(
        [
            [surrogate_oracle(lp[b, t].item(), old[b, t].item(), adv[b].item(), *clips, dual_clip) for t in range(9)]
            for b in range(6)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_surrogate_token_level_advantages_and_dtype():
    lp, old, adv, _, _ = make_batch(dtype=torch.bfloat16)
    tok = adv.unsqueeze(-1).expand(6, 9)
    got = clipped_surrogate(lp, old, tok)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, clipped_surrogate(lp, old, adv))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_formula(estimator):
    lp, old, *_ = make_batch(dtype=torch.float64)
    got = kl_penalty(lp, old, estimator=estimator)
    # the same family as the dependency estimate, with the roles lp <-> ref; k3 clamped to [-10, 10]
    expected = sampled_oracle(lp, old, estimator)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("denominator", ["valid", "kept"])
@pytest.mark.parametrize("token_mask_kind", ["none", "bool", "float"])
def test_aggregate_matches_oracle(agg, denominator, token_mask_kind):
    values = torch.randn(6, 9, dtype=torch.float64)
    mask = random_mask(6, 9)
    if token_mask_kind == "none":
        tm, w = None, torch.ones(6, 9, dtype=torch.float64)
    elif token_mask_kind == "bool":
        tm = torch.rand(6, 9) < 0.5
        w = tm.double()
    else:
        tm = torch.rand(6, 9, dtype=torch.float64)
        w = tm
    got = assert_inputs_unchanged(aggregate, values, mask, tm, agg=agg, denominator=denominator)
    assert got.ndim == 0
    assert got.item() == pytest.approx(agg_oracle(values, mask, w, agg, denominator), rel=1e-12, abs=1e-12)


def test_aggregate_global_counts_make_microbatches_add_up():
    values = torch.randn(8, 5, dtype=torch.float64)
    mask = random_mask(8, 5)
    full = aggregate(values, mask)
    n = mask.sum()
    parts = sum(aggregate(values[i : i + 3], mask[i : i + 3], num_tokens=n) for i in range(0, 8, 3))
    torch.testing.assert_close(parts, full)
    full = aggregate(values, mask, agg="seq-mean-token-mean")
    n_seq = mask.any(-1).sum()
    parts = sum(
        aggregate(values[i : i + 3], mask[i : i + 3], agg="seq-mean-token-mean", num_sequences=n_seq)
        for i in range(0, 8, 3)
    )
    torch.testing.assert_close(parts, full)


def test_sum_norm_micro_batches_padded_to_their_own_length_add_up_with_norm_length():
    # Dr.GRPO divides by a constant (the generation budget); micro-batches padded to their own
    # longest response must pass it, or each would be divided by a different T
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([2, 3, 9, 7, 1, 4])
    budget = 12
    values = torch.randn(6, budget, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(budget) < lengths[:, None]
    full = aggregate(values, mask, agg="seq-mean-token-sum-norm")  # padded to the budget: T = 12
    (grad_full,) = torch.autograd.grad(full, values)
    n_seq = mask.any(-1).sum()
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        width = int(lengths[rows].max())  # dynamic padding
        v, m = values[rows, :width], mask[rows, :width]
        parts = parts + aggregate(v, m, agg="seq-mean-token-sum-norm", num_sequences=n_seq, norm_length=budget)
    (grad_parts,) = torch.autograd.grad(parts, values)
    torch.testing.assert_close(parts, full)
    torch.testing.assert_close(grad_parts, grad_full)
    # oracle: mean over sequences of the token sum over the budget
    expected = sum(values[b, : lengths[b]].sum() / budget for b in range(6)) / 6
    torch.testing.assert_close(full, expected)
    # the loss functions forward it
    lp, old, adv, m2, _ = make_batch(dtype=torch.float64)
    a = vppo_loss(lp, old, adv, m2, agg="seq-mean-token-sum-norm", norm_length=40, entropy_coef=0.1)
    b = vppo_loss(lp, old, adv, m2, agg="seq-mean-token-sum-norm", entropy_coef=0.1)
    torch.testing.assert_close(a.loss * 40, b.loss * lp.shape[-1])


def test_aggregate_all_padding_is_zero_not_nan():
    values = torch.full((2, 3), float("nan"))
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert aggregate(values, torch.zeros(2, 3), agg=agg) == 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("denominator", ["valid", "kept"])
def test_aggregate_float_weights_are_constants_and_padding_nan_weights_do_not_leak(agg, denominator):
    # the reference code detaches its token mask; a weight built from a differentiable signal got
    # gradient, and a NaN weight at a padded position reached the values' gradient as 0 * NaN
    source = torch.rand(2, 3, requires_grad=True)
    weights = torch.sigmoid(source).detach().clone()
    weights[0, 2], weights[1, 2] = math.nan, math.inf  # outside the response below
    weights = weights + 0 * source  # differentiable, same values
    values = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = aggregate(values, mask, weights, agg=agg, denominator=denominator)
    out.backward()
    assert source.grad is None or torch.equal(source.grad, torch.zeros(2, 3))
    assert torch.isfinite(values.grad).all() and torch.equal(values.grad[mask == 0], torch.zeros(3))
    expected = aggregate(
        values.detach(), mask, torch.where(mask.bool(), weights.detach(), 0.0), agg=agg, denominator=denominator
    )
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aggregate_half_values_are_summed_and_returned_in_float32(dtype):
    values = torch.ones(1, 1001, dtype=dtype)
    keep = torch.zeros(1, 1001, dtype=torch.bool)
    keep[0, :500] = True
    out = aggregate(values, torch.ones(1, 1001), keep)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(500 / 1001, rel=1e-6)  # 0.5 when summed in bf16


def test_aggregate_errors():
    v, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(TypeError, match="agg"):
        aggregate(v, m, agg="sum")
    with pytest.raises(ValueError, match="num_tokens applies to agg='token-mean' only"):
        aggregate(v, m, agg="seq-mean-token-sum", num_tokens=4)
    with pytest.raises(ValueError, match="num_sequences applies to the seq-mean"):
        aggregate(v, m, num_sequences=4)
    with pytest.raises(ValueError, match="num_tokens must be > 0, got 0"):
        aggregate(v, m, num_tokens=0)
    with pytest.raises(ValueError, match=r"norm_length applies to agg='seq-mean-token-sum-norm' only, got agg='seq"):
        aggregate(v, m, agg="seq-mean-token-sum", norm_length=8)
    for bad in (0, -3, True):
        with pytest.raises(ValueError, match=rf"norm_length must be a positive integer, got {bad!r}"):
            aggregate(v, m, agg="seq-mean-token-sum-norm", norm_length=bad)


# ----------------------------------------------------------------------------- the VPPO loss


def vppo_oracle(lp, old, adv, mask, keep, *, entropy_coef=0.0, ref=None, kl_coef=0.0, denominator="valid"):
    """Token-mean VPPO loss in float64 with Python loops (the reference code's semantics)."""
    B, T = lp.shape
    pg = ent = kl = 0.0
    n_valid = n_kept = 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            n_valid += 1
            ent += -lp[b, t].item()
            if ref is not None:
                d = max(-20.0, min(20.0, ref[b, t].item() - lp[b, t].item()))
                kl += max(-10.0, min(10.0, math.exp(d) - d - 1))
            if keep is not None and not keep[b, t]:
                continue
            n_kept += 1
            pg += surrogate_oracle(lp[b, t].item(), old[b, t].item(), adv[b].item(), 0.2, 0.28, 3.0)
    denom = n_valid if denominator == "valid" else n_kept
    return pg / max(denom, 1) + entropy_coef * ent / max(n_valid, 1) + kl_coef * kl / max(n_valid, 1)


@pytest.mark.parametrize("denominator", ["valid", "kept"])
@pytest.mark.parametrize("with_aux", [False, True])
def test_vppo_loss_matches_oracle(denominator, with_aux):
    lp, old, adv, mask, keep = make_batch(dtype=torch.float64)
    ref = old - 0.3 * torch.rand_like(old) if with_aux else None
    coefs = {"entropy_coef": 0.06, "kl_coef": 0.01} if with_aux else {}
    out = assert_inputs_unchanged(
        vppo_loss, lp, old, adv, mask, keep, ref_logprobs=ref, denominator=denominator, **coefs
    )
    expected = vppo_oracle(lp, old, adv, mask, keep, ref=ref, denominator=denominator, **coefs)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    for field in out._fields[1:]:
        assert not getattr(out, field).requires_grad and getattr(out, field).ndim == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vppo_loss_returns_float32(dtype):
    lp, old, adv, mask, keep = make_batch(dtype=dtype)
    out = vppo_loss(lp, old, adv, mask, keep)
    assert all(getattr(out, f).dtype == torch.float32 for f in out._fields)
    lp64, old64, adv64 = lp.double(), old.double(), adv.double()
    assert out.loss.item() == pytest.approx(vppo_oracle(lp64, old64, adv64, mask, keep), rel=1e-5, abs=1e-6)


def test_vppo_loss_diagnostics():
    lp, old, adv, mask, keep = make_batch(dtype=torch.float64)
    out = vppo_loss(lp, old, adv, mask, keep)
    n = mask.sum().item()
    assert out.kept_frac.item() == pytest.approx(keep.sum().item() / n)
    assert out.approx_kl.item() == pytest.approx((old - lp)[mask].mean().item())
    assert out.entropy_loss.item() == pytest.approx(-lp[mask].mean().item())
    a = adv.unsqueeze(-1).expand_as(lp)
    ratio = torch.exp(lp - old)
    clipped = ((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8))
    assert out.clip_frac.item() == pytest.approx(clipped[mask].double().mean().item())
    dual = (a < 0) & (ratio > 3.0)
    assert out.dual_clip_frac.item() == pytest.approx(dual[mask].double().mean().item())
    assert out.kl_loss.item() == 0 and out.pg_loss.item() == pytest.approx(out.loss.item())


def test_gradcheck_float64():
    lp, old, adv, mask, keep = make_batch(batch=3, seq=4, dtype=torch.float64)
    lp.requires_grad_()
    ref = old - 0.2

    def f(lp_, adv_):
        return vppo_loss(lp_, old, adv_, mask, keep, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.06).loss

    assert torch.autograd.gradcheck(f, (lp, adv.clone().requires_grad_()))


def test_gradient_matches_oracle_with_random_upstream():
    lp, old, adv, mask, keep = make_batch(dtype=torch.float64)
    lp.requires_grad_()
    out = vppo_loss(lp, old, adv, mask, keep, entropy_coef=0.06)
    upstream = torch.randn((), dtype=torch.float64)
    (out.loss * upstream).backward()
    # analytic: d/dlp of -A r (unclipped) is -A r, zero where a clip binds
    a = adv.unsqueeze(-1).expand_as(lp)
    ratio = torch.exp(lp.detach() - old)
    live = ~(((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8)) | ((a < 0) & (ratio > 3.0)))
    n = mask.sum()
    expected = torch.where(keep & live, -a * ratio, 0.0) / n - 0.06 * mask.double() / n
    torch.testing.assert_close(lp.grad, upstream * expected, rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["bool", "float"]))
def test_property_filtered_and_padded_tokens_get_exactly_zero_gradient(seed, kind):
    lp, old, adv, mask, keep = make_batch(seed=seed)
    lp = lp.masked_fill(~mask, float("-inf"))  # garbage in padding must not leak
    old = old.masked_fill(~mask, float("nan"))
    lp.requires_grad_()
    token_mask = keep if kind == "bool" else keep.float() * torch.rand(keep.shape)
    out = vppo_loss(lp, old, adv, mask, token_mask)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    filtered = ~mask | (~keep)
    assert torch.equal(lp.grad[filtered], torch.zeros(int(filtered.sum())))


def test_nan_at_a_valid_token_propagates():
    lp, old, adv, mask, keep = make_batch()
    kept_pos, dropped_pos = keep.nonzero()[0].tolist(), (mask & ~keep).nonzero()[0].tolist()
    bad = lp.clone()
    bad[tuple(kept_pos)] = float("nan")
    assert vppo_loss(bad, old, adv, mask, keep).loss.isnan()
    # A valid token that TGF filtered out does not enter the surrogate; its NaN still shows in the
    # diagnostics and in the loss as soon as a term counts every valid token.
    bad = lp.clone()
    bad[tuple(dropped_pos)] = float("nan")
    out = vppo_loss(bad, old, adv, mask, keep)
    assert torch.isfinite(out.pg_loss) and out.entropy_loss.isnan() and out.approx_kl.isnan()
    assert vppo_loss(bad, old, adv, mask, keep, entropy_coef=0.06).loss.isnan()


def test_microbatches_with_global_count_sum_to_the_full_batch_gradient():
    lp, old, adv, mask, keep = make_batch(batch=8, dtype=torch.float64)
    lp.requires_grad_()
    vppo_loss(lp, old, adv, mask, keep, entropy_coef=0.06).loss.backward()
    full_grad = lp.grad.clone()
    lp.grad = None
    n = mask.sum()
    for i in range(0, 8, 3):
        sl = slice(i, i + 3)
        vppo_loss(lp[sl], old[sl], adv[sl], mask[sl], keep[sl], entropy_coef=0.06, num_tokens=n).loss.backward()
    torch.testing.assert_close(lp.grad, full_grad, rtol=1e-12, atol=1e-14)


def test_vppo_without_filter_equals_grpo_surrogate():
    lp, old, adv, mask, _ = make_batch(dtype=torch.float64)
    out = vppo_loss(lp, old, adv, mask, dual_clip=None, clip_high=0.2)
    expected = aggregate(clipped_surrogate(lp, old, adv, clip_high=0.2, dual_clip=None), mask)
    torch.testing.assert_close(out.loss, expected)
    assert out.kept_frac == 1


def test_vppo_loss_errors():
    lp, old, adv, mask, keep = make_batch()
    with pytest.raises(ValueError, match=r"kl_coef=0.1 needs ref_logprobs"):
        vppo_loss(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"clip_low must be in \[0, 1\), got 1.0"):
        vppo_loss(lp, old, adv, mask, clip_low=1.0)
    with pytest.raises(ValueError, match=r"dual_clip must be > 1 .*got 0.5"):
        vppo_loss(lp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="ambiguous"):
        vppo_loss(lp, old, adv, mask, keep, denominator="kept", num_tokens=10, entropy_coef=0.1)
    with pytest.raises(ValueError, match=r"advantages must be \[batch\] or \[batch, seq\]"):
        vppo_loss(lp, old, torch.zeros(6, 9, 1).squeeze(-1)[:, :4], mask)
    with pytest.raises(TypeError, match="agg"):
        vppo_loss(lp, old, adv, mask, agg="mean")
    with pytest.raises(TypeError):
        vppo_loss(lp, old[:, :3], adv, mask)
