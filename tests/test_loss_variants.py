"""GSPO and CISPO: per-token surrogates and losses against float64 oracles of their papers' objectives."""

import math

import pytest
import torch

from vppo_core import aggregate, cispo_loss, cispo_surrogate, gspo_loss, gspo_surrogate

from .helpers import assert_inputs_unchanged
from .test_loss import make_batch


def gspo_sequence_objective(lp, old, adv, mask, clip_low, clip_high):
    """GSPO's objective as the paper writes it: per sequence, with s_i = exp(mean_t log ratio)."""
    losses = []
    for b in range(lp.shape[0]):
        idx = mask[b].nonzero().squeeze(-1)
        if len(idx) == 0:
            continue
        s = torch.exp((lp[b, idx] - old[b, idx]).mean())
        a = adv[b]
        losses.append(-torch.minimum(s * a, s.clamp(1 - clip_low, 1 + clip_high) * a))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("clips", [(3e-4, 4e-4), (0.2, 0.28)])
def test_gspo_value_and_gradient_equal_the_sequence_objective(clips):
    lp, old, adv, mask, _ = make_batch(dtype=torch.float64)
    lp = old + 0.001 * torch.randn_like(old)  # some sequences inside the tiny clip range, some outside
    lp[0] = old[0] + 1e-5
    lp = lp.requires_grad_()
    out = assert_inputs_unchanged(gspo_loss, lp, old, adv, mask, clip_low=clips[0], clip_high=clips[1])
    (grad,) = torch.autograd.grad(out.loss, lp)
    lp2 = lp.detach().clone().requires_grad_()
    expected = gspo_sequence_objective(lp2, old, adv, mask, *clips)
    (grad2,) = torch.autograd.grad(expected, lp2)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad2, rtol=1e-10, atol=1e-14)
    assert grad.abs().sum() > 0 and 0 <= out.clip_frac <= 1


def test_gspo_surrogate_zero_on_padding_and_token_advantages():
    lp, old, adv, mask, _ = make_batch(dtype=torch.float64)
    tok = gspo_surrogate(lp, old, adv, mask)
    assert torch.equal(tok[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    torch.testing.assert_close(gspo_surrogate(lp, old, adv.unsqueeze(-1).expand_as(lp), mask), tok)


def cispo_oracle(lp, old, adv, mask, clip_low, clip_high):
    total, n = 0.0, 0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(max(-20, min(20, lp[b, t].item() - old[b, t].item())))
            w = min(max(ratio, 1 - clip_low), 1 + clip_high)
            total += -w * adv[b].item() * lp[b, t].item()
            n += 1
    return total / max(n, 1)


@pytest.mark.parametrize("clips", [(1.0, 0.28), (0.2, 0.28)])
def test_cispo_value_and_gradient(clips):
    lp, old, adv, mask, _ = make_batch(dtype=torch.float64)
    lp.requires_grad_()
    out = cispo_loss(lp, old, adv, mask, clip_low=clips[0], clip_high=clips[1])
    assert out.loss.item() == pytest.approx(cispo_oracle(lp, old, adv, mask, *clips), rel=1e-12)
    (grad,) = torch.autograd.grad(out.loss, lp)
    ratio = torch.exp(lp.detach() - old).clamp(1 - clips[0], 1 + clips[1])
    expected = torch.where(mask, -ratio * adv[:, None], 0.0) / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)
    # unlike the PPO clip, every valid token keeps a gradient (when its advantage is non-zero)
    assert (grad[mask] != 0).all()
    flagged = ((torch.exp(lp.detach() - old) > 1 + clips[1]) | (torch.exp(lp.detach() - old) < 1 - clips[0]))[mask]
    assert out.clip_frac.item() == pytest.approx(flagged.double().mean().item())


def test_variants_share_masking_and_aggregation():
    lp, old, adv, mask, keep = make_batch(dtype=torch.float64)
    lp = lp.masked_fill(~mask, float("nan")).requires_grad_()
    for fn, surrogate in ((cispo_loss, cispo_surrogate), (gspo_loss, None)):
        out = fn(lp, old, adv, mask, keep, agg="token-mean", entropy_coef=0.1)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert torch.equal(lp.grad[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
        assert out.kept_frac.item() == pytest.approx(keep.sum().item() / mask.sum().item())
        if surrogate is not None:
            clean = torch.where(mask, lp.detach(), 0.0)
            expected = aggregate(surrogate(clean, old, adv), mask, keep) + 0.1 * aggregate(-clean, mask)
            torch.testing.assert_close(out.loss.detach(), expected)
        lp.grad = None


def test_variant_errors():
    lp, old, adv, mask, _ = make_batch()
    with pytest.raises(ValueError, match=r"clip_low must be in \[0, 1\] .*got 1.5"):
        cispo_loss(lp, old, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match=r"clip_low must be in \[0, 1\), got 1.0"):
        gspo_loss(lp, old, adv, mask, clip_low=1.0)
    with pytest.raises(ValueError, match=r"kl_coef=0\.5 needs ref_logprobs"):
        gspo_loss(lp, old, adv, mask, kl_coef=0.5)
