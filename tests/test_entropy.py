"""token_entropy and the entropy masks against float64 oracles; gradients, memory, properties, errors, ranks."""

import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

import vppo_core.kernels._chunks as chunks_module
from vppo_core.entropy import high_entropy_mask, high_entropy_threshold, token_entropy, topk_entropy_mask
from vppo_core.masking import topk_token_mask

from .helpers import LargestFloat32, assert_inputs_unchanged, gloo_group, random_mask
from .oracles import exact_ceil, topk_oracle

# Tolerance added to torch's own error in the same dtype (cut-cross-entropy's criterion).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-12}


# ----------------------------------------------------------------------------- oracles


def entropy_row(x: torch.Tensor, temperature: float = 1.0) -> float:
    """-sum_j p_j log p_j of one row in float64, with 0 log 0 = 0."""
    z = x.double() / temperature
    logp = z - torch.logsumexp(z, 0)
    return -sum(math.exp(lp) * lp for lp in logp.tolist() if lp != -math.inf)


def entropy_oracle(x: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    keep = torch.ones(rows.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    out = [entropy_row(r, temperature) if k else 0.0 for r, k in zip(rows, keep.tolist())]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape[:-1])


def entropy_autograd_oracle(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable float64 entropy (finite inputs only), for gradient references."""
    logp = torch.log_softmax(x / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def naive_entropy(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """What a user would write in the input dtype."""
    logp = torch.log_softmax(x / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def pooled_oracle(h: torch.Tensor, mask: torch.Tensor, rho: float, exact: bool) -> torch.Tensor:
    """The pooled rule as a loop: values of valid tokens in batch order, NaN above every number."""
    flat, valid = h.reshape(-1).tolist(), mask.reshape(-1).bool().tolist()
    idx = [i for i in range(len(flat)) if valid[i]]

    def key(i):  # descending value, NaN first, then lowest flat index
        v = flat[i]
        return (0, 0.0, i) if math.isnan(v) else (1, -v, i)

    idx.sort(key=key)
    n_keep = max(1, exact_ceil(rho, len(idx))) if idx else 0
    out = torch.zeros(len(flat), dtype=torch.bool)
    if exact:
        out[idx[:n_keep]] = True
    elif n_keep:
        thr = flat[idx[n_keep - 1]]
        for i in idx:
            v = flat[i]
            out[i] = math.isnan(v) or (not math.isnan(thr) and v >= thr)
    return out.reshape(h.shape)


# ----------------------------------------------------------------------------- token_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 1271), (5, 64), (2, 1, 3)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_oracle_no_worse_than_torch(dtype, shape, temperature):
    x = (torch.randn(shape) * 3).to(dtype)
    expected = entropy_oracle(x, temperature=temperature)
    got = assert_inputs_unchanged(token_entropy, x, temperature=temperature)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == shape[:-1]
    err = (got.double() - expected).abs().max().item()
    err_torch = (naive_entropy(x, temperature).double() - expected).abs().max().item()
    assert err <= err_torch + TOL[dtype], (err, err_torch)


def test_known_values_and_neg_inf_logits():
    ninf = -math.inf
    x = torch.tensor(
        [
            [0.0] * 6,  # uniform: log 6
            [0.0, 0.0, ninf, ninf, ninf, ninf],  # uniform over 2: log 2
            [3.0, ninf, ninf, ninf, ninf, ninf],  # deterministic: exactly 0
            [1.0, 2.0, ninf, 0.5, ninf, -1.0],  # -inf entries contribute nothing
            [ninf] * 6,  # no distribution: NaN
        ]
    )
    got = token_entropy(x)
    assert got[0].item() == pytest.approx(math.log(6), abs=1e-6)
    assert got[1].item() == pytest.approx(math.log(2), abs=1e-6)
    assert got[2].item() == 0.0
    assert got[3].item() == pytest.approx(entropy_row(x[3]), abs=1e-6)
    assert got[4].isnan()


def test_mask_gives_exact_zero_even_over_nan_rows_and_nan_propagates():
    x = torch.randn(3, 5, 40)
    mask = random_mask(3, 5)
    x = x.masked_fill(~mask.unsqueeze(-1), float("nan"))
    got = token_entropy(x, mask)
    assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(got, entropy_oracle(x, mask).float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(token_entropy(x, mask.long()), got)
    y = torch.randn(2, 10)
    y[1, 3] = float("nan")
    out = token_entropy(y)
    assert torch.isfinite(out[0]) and out[1].isnan()


@given(
    rows=st.integers(1, 4),
    vocab=st.integers(1, 40),
    scale=st.floats(0.0, 30.0),
    temperature=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
)
def test_property_between_zero_and_log_vocab(rows, vocab, scale, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    h = token_entropy(x, temperature=temperature)
    assert (h >= 0).all() and (h <= math.log(vocab) + 1e-5).all()
    flat = token_entropy(torch.full((rows, vocab), scale), temperature=temperature)
    torch.testing.assert_close(flat, torch.full((rows,), math.log(vocab)), rtol=1e-6, atol=1e-6)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    x[0, 1, 2] = -math.inf  # a masked-out vocabulary entry: zero probability, zero gradient
    x.requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a: token_entropy(a, mask, temperature=0.8), (x,))
    y = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)  # [tokens, vocab]
    assert torch.autograd.gradcheck(lambda a: token_entropy(a, temperature=1.7), (y,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_random_upstream_matches_oracle(dtype):
    x = (torch.randn(3, 4, 129) * 2).to(dtype).requires_grad_()
    mask = random_mask(3, 4)
    upstream = torch.randn(3, 4)
    token_entropy(x, mask, temperature=1.3).backward(upstream)
    x64 = x.detach().double().requires_grad_()
    (entropy_autograd_oracle(x64, 1.3) * upstream.double() * mask).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    assert x.grad.dtype == dtype


def test_masked_rows_and_neg_inf_entries_get_exactly_zero_gradient():
    x = torch.randn(2, 4, 11)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    x[~mask] = float("nan")
    x[0, 0, :3] = -math.inf
    x.requires_grad_()
    token_entropy(x, mask).backward(torch.randn(2, 4))
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert torch.equal(x.grad[0, 0, :3], torch.zeros(3))
    assert torch.isfinite(x.grad[mask]).all()


def test_chunks_layouts_and_non_viewable_slices(monkeypatch):
    full = torch.randn(3, 12, 97)
    reference = token_entropy(full)
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", 4 * 97 * 5)  # 5 rows per chunk, ragged last chunk
    torch.testing.assert_close(token_entropy(full), reference, rtol=0, atol=1e-6)
    sliced = full[:, 3:-1]  # cannot be flattened to rows without a copy
    assert not sliced.is_contiguous()
    torch.testing.assert_close(token_entropy(sliced), entropy_oracle(sliced).float(), rtol=1e-5, atol=1e-6)
    x = sliced.clone().requires_grad_()
    token_entropy(x).backward(torch.ones(3, 8))
    s = sliced.clone().requires_grad_()
    token_entropy(s).backward(torch.ones(3, 8))
    torch.testing.assert_close(s.grad, x.grad)
    flat = token_entropy(full.reshape(36, 97))
    assert torch.equal(flat.reshape(3, 12), token_entropy(full))
    assert token_entropy(torch.randn(2, 0, 5)).shape == (2, 0)


def test_never_a_float32_copy_of_the_whole_logits(monkeypatch):
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", 4 * 1000 * 16)  # 16 rows of 1000 per chunk
    x = torch.randn(2, 64, 1000).bfloat16().requires_grad_()
    with LargestFloat32() as seen:
        token_entropy(x).backward(torch.randn(2, 64))
    assert seen.largest <= 16 * 1000 < x.numel()


def test_errors():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        token_entropy(x, temperature=0.0)
    with pytest.raises(ValueError, match="got 4 dimensions"):
        token_entropy(x[None])
    with pytest.raises(TypeError):  # mask shape mismatch
        token_entropy(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError):  # integer logits
        token_entropy(x.long())


@pytest.mark.slow
def test_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(2, 5, 33, requires_grad=True)
    mask = random_mask(2, 5)

    def step(logits, m):
        return (token_entropy(logits, m, temperature=0.9) * 0.1).sum()

    got = torch.compile(step, fullgraph=True)(x, mask)
    (grad_c,) = torch.autograd.grad(got, x)
    want = step(x, mask)
    (grad_e,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_c, grad_e)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_topk_entropy_mask_is_the_per_trajectory_topk(k):
    h = torch.rand(7, 13)
    mask = random_mask(7, 13)
    got = assert_inputs_unchanged(topk_entropy_mask, h, mask, k=k)
    assert torch.equal(got, topk_oracle(h, mask, k))
    assert torch.equal(got, topk_token_mask(h, mask, k=k))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("rho", [0.05, 0.2, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("left_pad", [False, True])
def test_high_entropy_mask_matches_oracle(exact, rho, ties, left_pad):
    h = torch.randint(0, 4, (6, 11)).float() if ties else torch.rand(6, 11)
    mask = random_mask(6, 11, left_pad=left_pad)
    h = h.masked_fill(~mask, 100.0)  # large padding values must not count
    got = assert_inputs_unchanged(high_entropy_mask, h, mask, rho=rho, exact_count=exact)
    assert torch.equal(got, pooled_oracle(h, mask, rho, exact))
    n = int(mask.sum())
    if exact:
        assert int(got.sum()) == max(1, exact_ceil(rho, n))


def test_quantile_ignores_padding():
    """Padding never enters the threshold: the same valid tokens, padded anyhow, give the same mask."""
    g = torch.Generator().manual_seed(3)
    h = torch.rand(5, 9, generator=g)
    mask = random_mask(5, 9)
    valid = h[mask]
    threshold = high_entropy_threshold(h, mask, rho=0.2)
    compact = high_entropy_threshold(valid.unsqueeze(0), torch.ones(1, valid.numel()), rho=0.2)
    assert threshold == compact == torch.sort(valid, descending=True).values[exact_ceil(0.2, valid.numel()) - 1]
    for fill in (0.0, 1e9, float("nan"), float("inf"), -float("inf")):
        padded = h.masked_fill(~mask, fill)
        assert high_entropy_threshold(padded, mask, rho=0.2) == threshold
        assert torch.equal(high_entropy_mask(padded, mask, rho=0.2), high_entropy_mask(h, mask, rho=0.2))
    # more padding, same valid tokens: same kept tokens
    wider = torch.cat([h, torch.full((5, 4), 50.0)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(5, 4, dtype=torch.bool)], dim=1)
    assert torch.equal(high_entropy_mask(wider, wider_mask, rho=0.2)[:, :9], high_entropy_mask(h, mask, rho=0.2))


def test_ties_threshold_keeps_all_tied_exact_breaks_by_batch_order():
    h = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # ceil(0.4 * 7) = 3: threshold is the 3rd largest valid value, 0.0, shared by six tokens: all kept
    assert torch.equal(high_entropy_mask(h, mask, rho=0.4), mask.bool())
    exact = high_entropy_mask(h, mask, rho=0.4, exact_count=True)
    assert exact.tolist() == [[True, True, False, False], [False, False, True, False]]


def test_nan_ranks_first_and_edge_cases():
    h = torch.tensor([[0.1, float("nan"), 0.3, 0.2, 0.5]])
    mask = torch.ones(1, 5)
    assert high_entropy_mask(h, mask, rho=0.2).tolist() == [[False, True, False, False, False]]
    assert high_entropy_mask(h, mask, rho=0.4).tolist() == [[False, True, False, False, True]]
    assert high_entropy_threshold(h, mask, rho=0.2).isnan()
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert not high_entropy_mask(torch.rand(2, 3), empty).any()
    assert not high_entropy_mask(torch.rand(2, 3), empty, exact_count=True).any()
    assert high_entropy_threshold(torch.rand(2, 3), empty) == math.inf
    assert high_entropy_mask(torch.rand(0, 3), torch.zeros(0, 3)).shape == (0, 3)
    m = random_mask(4, 6)
    assert torch.equal(high_entropy_mask(torch.rand(4, 6), m, rho=1.0), m)


@given(
    batch=st.integers(1, 6),
    seq=st.integers(1, 30),
    rho_thousandths=st.integers(1, 1000),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_property_pooled_counts_and_order(batch, seq, rho_thousandths, seed, ties):
    rho = rho_thousandths / 1000
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, 3, (batch, seq), generator=g).float() if ties else torch.randn(batch, seq, generator=g)
    mask = torch.rand(batch, seq, generator=g) < 0.6
    n = int(mask.sum())
    n_keep = max(1, exact_ceil(rho, n)) if n else 0
    loose = high_entropy_mask(h, mask, rho=rho)
    exact = high_entropy_mask(h, mask, rho=rho, exact_count=True)
    assert int(exact.sum()) == n_keep and int(loose.sum()) >= n_keep
    assert not (exact & ~loose).any() and not (loose & ~mask).any()
    kept, dropped = h[loose], h[mask & ~loose]
    if len(kept) and len(dropped):
        assert kept.min() > dropped.max()  # the threshold rule never splits a tie
    if not ties:
        assert torch.equal(loose, exact)


def test_mask_errors():
    h, m = torch.rand(2, 3), torch.ones(2, 3)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"rho must be in \(0, 1\], got"):
            high_entropy_mask(h, m, rho=bad)
        with pytest.raises(ValueError, match=r"k must be in \(0, 1\], got"):
            topk_entropy_mask(h, m, k=bad)
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        high_entropy_mask(h, m, process_group="world")
    with pytest.raises(TypeError):
        high_entropy_mask(h, torch.ones(2, 4))


# ----------------------------------------------------------------------------- over ranks

B, T = 9, 7
BOUNDS = [0, 6, 9]  # uneven shards; rank 1 holds no valid token


def global_batch():
    g = torch.Generator().manual_seed(11)
    h = torch.randint(0, 5, (B, T), generator=g).float() / 2  # many ties
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[6:] = False
    return h, mask


def _pooled_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        h, mask = global_batch()
        sl = slice(BOUNDS[rank], BOUNDS[rank + 1])
        results = {
            (rho, exact): high_entropy_mask(h[sl], mask[sl], rho=rho, exact_count=exact, process_group="world")
            for rho, exact in itertools.product((0.2, 0.45), (False, True))
        }
        results["threshold"] = high_entropy_threshold(h[sl], mask[sl], rho=0.2, process_group=dist.group.WORLD)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ranks_match_single_process(tmp_path):
    mp.spawn(_pooled_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    h, mask = global_batch()
    for rho, exact in itertools.product((0.2, 0.45), (False, True)):
        full = high_entropy_mask(h, mask, rho=rho, exact_count=exact)
        assert torch.equal(torch.cat([r[(rho, exact)] for r in per_rank]), full)
        assert full.any() and not per_rank[1][(rho, exact)].any()
    for r in per_rank:
        assert r["threshold"] == high_entropy_threshold(h, mask, rho=0.2)
