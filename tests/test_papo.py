"""PAPO's perception loss (exact and sampled k3) and Double Entropy Loss: oracles, Monte-Carlo agreement, gradients."""

import math

import pytest
import torch

from vppo_core.entropy import token_entropy
from vppo_core.papo import double_entropy_loss, perception_loss, sampled_perception_loss

from .helpers import assert_inputs_unchanged, random_mask
from .oracles import kl_autograd_oracle, kl_oracle


def masked_mean(values, mask):
    """Mean over valid tokens, written as a loop (0 for an empty batch)."""
    picked = [values[b, t].item() for b in range(values.shape[0]) for t in range(values.shape[1]) if mask[b, t]]
    return sum(picked) / len(picked) if picked else 0.0


def seq_mean(values, mask):
    rows = []
    for b in range(values.shape[0]):
        picked = [values[b, t].item() for t in range(values.shape[1]) if mask[b, t]]
        if picked:
            rows.append(sum(picked) / len(picked))
    return sum(rows) / max(len(rows), 1)


def k3_oracle(lp, masked):
    d = max(-20.0, min(20.0, masked - lp))
    return max(-10.0, min(10.0, math.exp(d) - d - 1))


def make_logits(batch=4, seq=6, vocab=19, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64) * 2
    y = x + torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype), random_mask(batch, seq)


# ----------------------------------------------------------------------------- exact form


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_exact_matches_oracle(agg, temperature):
    x, y, mask = make_logits()
    out = assert_inputs_unchanged(perception_loss, x, y, mask, gamma=0.02, temperature=temperature, agg=agg)
    kl = kl_oracle(x, y, mask, temperature)
    expected = masked_mean(kl, mask) if agg == "token-mean" else seq_mean(kl, mask)
    assert out.kl.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert out.loss.item() == pytest.approx(-0.02 * expected, rel=1e-10, abs=1e-14)
    assert not out.kl.requires_grad


@pytest.mark.parametrize("masked_has_grad", [False, True])
def test_exact_gradient_random_upstream(masked_has_grad):
    x, y, mask = make_logits()
    x = x.masked_fill(~mask.unsqueeze(-1), float("nan"))  # padding holds garbage
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_(masked_has_grad)
    upstream = torch.randn((), dtype=torch.float64)
    (perception_loss(xg, yg, mask, gamma=0.02).loss * upstream).backward()
    xr = torch.where(mask.unsqueeze(-1), x, 0.0).requires_grad_()
    yr = y.clone().requires_grad_(masked_has_grad)
    (-0.02 * upstream * (kl_autograd_oracle(xr, yr) * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(xg.grad, torch.where(mask.unsqueeze(-1), xr.grad, 0.0), rtol=1e-10, atol=1e-14)
    assert torch.equal(xg.grad[~mask], torch.zeros_like(xg.grad[~mask]))
    if masked_has_grad:
        torch.testing.assert_close(yg.grad, yr.grad, rtol=1e-10, atol=1e-14)
    else:
        assert yg.grad is None


def test_exact_gradcheck():
    x, y, mask = make_logits(batch=2, seq=3, vocab=5)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: perception_loss(a, b, mask, gamma=0.3, temperature=0.9).loss, (x, y))


# ----------------------------------------------------------------------------- sampled form


def make_logprobs(batch=6, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(batch, seq, generator=g, dtype=torch.float64) * 3
    masked = lp - torch.randn(batch, seq, generator=g, dtype=torch.float64)
    masked[0, 0], lp[0, 1] = 30.0, -40.0  # beyond the +-20 log-ratio clamp and the 10 value clamp
    return lp, masked, random_mask(batch, seq)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_sampled_matches_oracle(agg):
    lp, masked, mask = make_logprobs()
    mask[0, :2] = True
    out = assert_inputs_unchanged(sampled_perception_loss, lp, masked, mask, gamma=0.01, agg=agg)
    k3 = torch.tensor(
        [[k3_oracle(a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(lp.tolist(), masked.tolist())], dtype=torch.float64
    )
    expected = masked_mean(k3, mask) if agg == "token-mean" else seq_mean(k3, mask)
    assert out.kl.item() == pytest.approx(expected, rel=1e-12)
    assert out.loss.item() == pytest.approx(-0.01 * expected, rel=1e-12)


def test_sampled_padding_never_reaches_value_or_gradient():
    lp, masked, mask = make_logprobs()
    lp_bad = lp.masked_fill(~mask, float("-inf")).requires_grad_()
    masked_bad = masked.masked_fill(~mask, float("nan"))
    out = sampled_perception_loss(lp_bad, masked_bad, mask)
    out.loss.backward(torch.tensor(1.7, dtype=torch.float64))
    assert torch.isfinite(out.loss) and out.kl == sampled_perception_loss(lp, masked, mask).kl
    assert torch.equal(lp_bad.grad[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    # the gradient at valid tokens: -gamma * (1 - e^d) / N, with d = masked - lp (inside the clamps)
    d = (masked - lp).clamp(-20, 20)
    live = mask & ((torch.exp(d) - d - 1) < 10)
    expected = torch.where(live, -0.01 * 1.7 * (1 - torch.exp(d)) / mask.sum(), 0.0)
    torch.testing.assert_close(lp_bad.grad, expected, rtol=1e-10, atol=1e-14)


def test_exact_and_sampled_agree_in_expectation():
    """Monte-Carlo over tokens sampled from p: mean k3 -> KL(p || q) (the value of the exact form), and
    the k3 gradient -> the gradient of the reverse KL(q || p), which is p - q w.r.t. the logits of p."""
    g = torch.Generator().manual_seed(5)
    vocab, n = 12, 200_000
    x = torch.randn(vocab, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(vocab, generator=g, dtype=torch.float64)
    p, q = torch.softmax(x, 0), torch.softmax(y, 0)
    tokens = torch.multinomial(p, n, replacement=True, generator=g)
    exact = perception_loss(x.view(1, 1, -1), y.view(1, 1, -1), torch.ones(1, 1), gamma=1.0).kl
    xs = x.clone().requires_grad_()
    logp = torch.log_softmax(xs, 0)[tokens].unsqueeze(0)
    logq = torch.log_softmax(y, 0)[tokens].unsqueeze(0)
    sampled = sampled_perception_loss(logp, logq, torch.ones(1, n), gamma=-1.0)  # loss = +mean k3
    per_token = torch.expm1(logq - logp.detach()) - (logq - logp.detach())
    stderr = per_token.std() / math.sqrt(n)
    assert abs(sampled.kl - exact) < 4 * stderr
    sampled.loss.backward()
    # per-sample gradient of k3 w.r.t. the logits: (1 - q_o / p_o) (onehot(o) - p)
    weight = 1 - torch.exp(logq - logp.detach()).squeeze(0)
    per_sample = weight.unsqueeze(-1) * (torch.nn.functional.one_hot(tokens, vocab) - p)
    grad_stderr = per_sample.std(0) / math.sqrt(n)
    assert ((xs.grad - (p - q)).abs() < 5 * grad_stderr).all()
    forward_kl_grad = p * ((x - y) - (p * (x - y)).sum())
    assert ((xs.grad - forward_kl_grad).abs() > 10 * grad_stderr).any()  # not the forward KL's gradient


# ----------------------------------------------------------------------------- double entropy


def test_double_entropy_matches_oracle_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    h, h_mask = torch.rand(5, 8, generator=g, dtype=torch.float64), torch.rand(5, 8, generator=g, dtype=torch.float64)
    mask = random_mask(5, 8)
    out = assert_inputs_unchanged(double_entropy_loss, h, h_mask, mask, eta1=0.05, eta2=0.03)
    e1, e2 = masked_mean(h, mask), masked_mean(h_mask, mask)
    assert out.loss.item() == pytest.approx(0.05 * e1 + 0.03 * e2, rel=1e-12)
    assert (out.entropy.item(), out.masked_entropy.item()) == (pytest.approx(e1), pytest.approx(e2))
    # TRL's PAPO averaged over padding too; here padding (whatever it holds, however much) changes nothing
    wide = torch.cat([h, torch.full((5, 6), float("nan"), dtype=torch.float64)], 1)
    wide_mask = torch.cat([mask, torch.zeros(5, 6, dtype=torch.bool)], 1)
    again = double_entropy_loss(wide, wide, wide_mask, eta1=0.05, eta2=0.03)
    assert again.entropy.item() == pytest.approx(out.entropy.item(), rel=1e-12) and torch.isfinite(again.loss)


def test_double_entropy_of_bf16_entropies_is_float32():
    h = torch.rand(4, 300, generator=torch.Generator().manual_seed(2))
    mask = random_mask(4, 300)
    out = double_entropy_loss(h.bfloat16(), h.bfloat16(), mask, eta1=0.05, eta2=0.03)
    assert out.loss.dtype == out.entropy.dtype == torch.float32
    assert out.entropy.item() == pytest.approx(masked_mean(h.bfloat16().double(), mask), rel=1e-6)


def test_double_entropy_with_token_entropy_gradient():
    x, y, mask = make_logits(dtype=torch.float32)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = double_entropy_loss(token_entropy(xg, mask), token_entropy(yg, mask), mask, eta1=0.05, eta2=0.02)
    upstream = torch.randn(())
    (out.loss * upstream).backward()
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()

    def ent(z):
        logp = torch.log_softmax(z, -1)
        return -(logp.exp() * logp).sum(-1)

    ref = (0.05 * (ent(x64) * mask).sum() + 0.02 * (ent(y64) * mask).sum()) / mask.sum()
    (ref * upstream.double()).backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(yg.grad.double(), y64.grad, rtol=1e-5, atol=1e-7)


def test_global_counts_make_micro_batches_add_up():
    lp, masked, mask = make_logprobs(batch=8)
    lp.requires_grad_()
    n = mask.sum()
    sampled_perception_loss(lp, masked, mask, gamma=0.02).loss.backward()
    full = lp.grad.clone()
    lp.grad = None
    for i in range(0, 8, 3):
        sl = slice(i, i + 3)
        sampled_perception_loss(lp[sl], masked[sl], mask[sl], gamma=0.02, num_tokens=n).loss.backward()
    torch.testing.assert_close(lp.grad, full, rtol=1e-12, atol=1e-15)


def test_errors():
    lp, masked, mask = make_logprobs()
    with pytest.raises(ValueError, match="gamma must be a finite number, got nan"):
        sampled_perception_loss(lp, masked, mask, gamma=float("nan"))
    with pytest.raises(ValueError, match="eta2 must be a finite number, got inf"):
        double_entropy_loss(lp, masked, mask, eta2=float("inf"))
    with pytest.raises(ValueError, match="num_tokens applies to agg='token-mean' only"):
        sampled_perception_loss(lp, masked, mask, agg="seq-mean-token-mean", num_tokens=10)
    x, y, m = make_logits()
    with pytest.raises(ValueError, match="same dtype"):
        perception_loss(x, y.float(), m)
    with pytest.raises(TypeError):
        perception_loss(x[..., :5], y, m)
    with pytest.raises(TypeError):
        sampled_perception_loss(lp, masked[:, :3], mask)


def test_norm_length_reaches_every_term():
    # seq-mean-token-sum-norm with norm_length T: each term is the padded-length version times seq / T
    g = torch.Generator().manual_seed(9)
    b, s, v = 3, 5, 7
    x = torch.randn(b, s, v, generator=g, dtype=torch.float64)
    y = torch.randn(b, s, v, generator=g, dtype=torch.float64)
    lp, lm = -torch.rand(b, s, generator=g, dtype=torch.float64), -torch.rand(b, s, generator=g, dtype=torch.float64)
    mask = random_mask(b, s)
    agg = {"agg": "seq-mean-token-sum-norm"}
    scale = s / 16
    pairs = [
        (perception_loss(x, y, mask, **agg, norm_length=16).kl, perception_loss(x, y, mask, **agg).kl),
        (
            sampled_perception_loss(lp, lm, mask, **agg, norm_length=16).kl,
            sampled_perception_loss(lp, lm, mask, **agg).kl,
        ),
        (
            double_entropy_loss(-lp, -lm, mask, **agg, norm_length=16).loss,
            double_entropy_loss(-lp, -lm, mask, **agg).loss,
        ),
    ]
    for with_t, padded in pairs:
        torch.testing.assert_close(with_t, padded * scale)
