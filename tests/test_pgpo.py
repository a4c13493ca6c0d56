"""pgpo_weights and pgpo_advantages against a float64 oracle; mass conservation, order, edge cases, errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vppo_core.pgpo import PGPO_EPS, pgpo_advantages, pgpo_weights

from .helpers import assert_inputs_unchanged, random_mask


def pgpo_oracle(dep, mask, tau=0.4, beta=2.0, tau_quantile=None, tau_floor=0.1):
    """PGPO's weights as the formula, one response at a time, in float64."""
    out = torch.zeros(dep.shape, dtype=torch.float64)
    for b in range(dep.shape[0]):
        idx = [t for t in range(dep.shape[1]) if mask[b, t]]
        if not idx:
            continue
        x = [math.log1p(dep[b, t].item()) for t in idx]
        lo, hi = min(x), max(x)
        importance = [(v - lo) / (hi - lo + 1e-8) for v in x]
        gate = tau
        if tau_quantile is not None:
            q = torch.quantile(torch.tensor(importance, dtype=torch.float64), tau_quantile).item()
            gate = max(tau_floor, q)
        raw = []
        for v in importance:
            if v < gate:
                raw.append(v / gate)
            else:
                raw.append(1.0 + beta * (v - gate) / (1.0 - gate) if gate < 1 else 1.0)
        total = sum(raw)
        if tau_quantile is None:
            raw = [len(idx) * r / total for r in raw] if total > 1e-8 else [1.0] * len(idx)
        for t, w in zip(idx, raw):
            out[b, t] = w
    return out


def make(batch=7, seq=12, seed=0, left_pad=False):
    g = torch.Generator().manual_seed(seed)
    dep = torch.rand(batch, seq, generator=g, dtype=torch.float64) ** 3 * 4  # long-tailed, like KL
    mask = random_mask(batch, seq, left_pad=left_pad)
    return dep, mask


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize(("tau", "beta"), [(0.4, 2.0), (0.2, 0.0), (0.7, 5.0)])
def test_weights_match_oracle(left_pad, tau, beta):
    dep, mask = make(left_pad=left_pad)
    dep[1, :] = 0.3  # a constant response: every weight 1
    mask[1, :] = True
    dep = dep.masked_fill(~mask, float("nan"))  # padding is never read
    got = assert_inputs_unchanged(pgpo_weights, dep, mask, tau=tau, beta=beta)
    torch.testing.assert_close(got, pgpo_oracle(dep, mask, tau, beta), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], torch.ones(12, dtype=torch.float64))


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_development_variant_matches_oracle(q):
    dep, mask = make(seed=1)
    got = pgpo_weights(dep, mask, tau_quantile=q, tau_floor=0.1)
    torch.testing.assert_close(got, pgpo_oracle(dep, mask, tau_quantile=q, tau_floor=0.1), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all() and torch.equal(got[~mask], torch.zeros(int((~mask).sum()), dtype=got.dtype))


@given(
    batch=st.integers(1, 5),
    seq=st.integers(1, 30),
    tau=st.floats(0.05, 0.95),
    beta=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_property_sum_to_length_and_preserve_order(batch, seq, tau, beta, seed, ties):
    g = torch.Generator().manual_seed(seed)
    if ties:
        dep = torch.randint(0, 3, (batch, seq), generator=g).double()
    else:
        dep = torch.rand(batch, seq, generator=g, dtype=torch.float64) * 10
    mask = torch.rand(batch, seq, generator=g) < 0.7
    w = pgpo_weights(dep, mask, tau=tau, beta=beta)
    torch.testing.assert_close(w.sum(-1), mask.sum(-1).double(), rtol=1e-10, atol=1e-10)
    assert (w >= 0).all() and not (w[~mask] != 0).any()
    for b in range(batch):
        s, ww = dep[b][mask[b]], w[b][mask[b]]
        if not len(s):
            continue
        order = torch.argsort(s)
        assert (ww[order].diff() >= -1e-12).all()  # non-decreasing in the dependency
        assert (ww[s == s.max()] == ww.max()).all()


def test_edge_cases_single_token_empty_rows_zero_length():
    dep = torch.tensor([[5.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    w = pgpo_weights(dep, mask)
    assert w.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert pgpo_weights(torch.zeros(2, 0), torch.zeros(2, 0)).shape == (2, 0)
    assert PGPO_EPS == 1e-8


def test_nan_at_a_valid_token_makes_its_response_nan():
    dep, mask = make(seed=2)
    mask[0] = True
    dep[0, 3] = float("nan")
    w = pgpo_weights(dep, mask)
    assert w[0].isnan().all()
    assert torch.isfinite(w[1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dtypes_and_detached(dtype):
    dep, mask = make()
    d = dep.to(dtype).requires_grad_()
    w = pgpo_weights(d, mask)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and not w.requires_grad
    tol = 1e-6 if dtype != torch.bfloat16 else 1e-5
    torch.testing.assert_close(w.double(), pgpo_oracle(d.detach().double(), mask), rtol=tol, atol=tol)


def test_advantages_are_weights_times_advantage_and_keep_the_total():
    dep, mask = make(seed=3)
    adv = torch.randn(7, dtype=torch.float64, requires_grad=True)
    got = assert_inputs_unchanged(pgpo_advantages, adv, dep, mask)
    w = pgpo_oracle(dep, mask)
    torch.testing.assert_close(got, adv.detach().unsqueeze(-1) * w, rtol=1e-12, atol=1e-12)
    # each response's total advantage is unchanged, every token keeps the sign (or is 0)
    torch.testing.assert_close(got.sum(-1), adv.detach() * mask.sum(-1), rtol=1e-10, atol=1e-10)
    assert ((got * adv.detach().unsqueeze(-1)) >= 0).all()
    upstream = torch.randn(7, 12, dtype=torch.float64)
    (got * upstream).sum().backward()
    torch.testing.assert_close(adv.grad, (upstream * w).sum(-1))
    token_adv = adv.detach().unsqueeze(-1).expand(7, 12) * (1 + torch.rand(7, 12, dtype=torch.float64))
    torch.testing.assert_close(pgpo_advantages(token_adv, dep, mask), token_adv * w)


def test_errors():
    dep, mask = torch.rand(2, 3), torch.ones(2, 3)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"tau must be in \(0, 1\), got"):
            pgpo_weights(dep, mask, tau=bad)
    with pytest.raises(ValueError, match=r"beta must be >= 0, got -1"):
        pgpo_weights(dep, mask, beta=-1.0)
    with pytest.raises(ValueError, match=r"tau_quantile must be in \[0, 1\]"):
        pgpo_weights(dep, mask, tau_quantile=1.5)
    with pytest.raises(ValueError, match=r"tau_floor must be in \(0, 1\], got 0"):
        pgpo_weights(dep, mask, tau_quantile=0.5, tau_floor=0.0)
    with pytest.raises(ValueError, match=r"advantages must be \[batch\] or \[batch, seq\]"):
        pgpo_advantages(torch.zeros(2, 4), dep, mask)
    with pytest.raises(TypeError):
        pgpo_weights(dep, torch.ones(2, 4))
