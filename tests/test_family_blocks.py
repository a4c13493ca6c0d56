"""The family's blocks (signals, transforms, selection, factors) against float64 oracles written from the formulas."""

import math
import statistics
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vppo_core.kernels._chunks as chunks_module
from vppo_core.entropy import high_entropy_mask
from vppo_core.factors import (
    anneal_weights,
    centred_clamp,
    group_centred_clamp,
    median_mad,
    median_mad_factors,
    minmax_normalise,
    reduce_response,
)
from vppo_core.masking import topk_token_mask
from vppo_core.selection import (
    kept_count,
    priority_weights,
    span_mask,
    tail_window_mask,
    topq_mask,
    topq_threshold,
)
from vppo_core.signals import (
    entropy_gap,
    hellinger,
    jensen_shannon,
    log_ratio_signal,
    relative_position,
    top_p_entropy,
    visual_similarity,
)
from vppo_core.transforms import minmax_per_response, response_softmax, shift_nonnegative, soft_or, tanh_gate

from .helpers import LargestFloat32, assert_inputs_unchanged, random_mask

F64 = torch.float64


def make(batch=6, seq=9, seed=0, left_pad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, generator=g, dtype=F64)
    mask = random_mask(batch, seq, left_pad=left_pad)
    mask[1, :1] = True  # a one-token row at least
    mask[1, 1:] = False
    return x, mask


def rows_of(x, mask):
    """Per row: the list of (position, value) of valid tokens."""
    return [[(t, x[b, t].item()) for t in range(x.shape[1]) if mask[b, t]] for b in range(x.shape[0])]


def put(shape, entries):
    out = torch.zeros(shape, dtype=F64)
    for (b, t), v in entries.items():
        out[b, t] = v
    return out


# ----------------------------------------------------------------------------- transforms


def test_minmax_shift_gate_softmax_match_oracles():
    x, mask = make()
    x = x.masked_fill(~mask, float("nan"))  # padding is never read
    mm, sh, gate, sm = {}, {}, {}, {}
    for b, row in enumerate(rows_of(x, mask)):
        if not row:
            continue
        vals = [v for _, v in row]
        lo, hi, mean = min(vals), max(vals), sum(vals) / len(vals)
        z = sum(math.exp(v / 1.7) for v in vals)
        for t, v in row:
            mm[b, t] = (v - lo) / (hi - lo + 1e-8)
            sh[b, t] = v - min(0.0, lo)
            gate[b, t] = 1 + 0.3 * math.tanh(v - mean)
            sm[b, t] = len(vals) * math.exp(v / 1.7) / z
    close = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(assert_inputs_unchanged(minmax_per_response, x, mask), put(x.shape, mm), **close)
    torch.testing.assert_close(shift_nonnegative(x, mask), put(x.shape, sh), **close)
    torch.testing.assert_close(tanh_gate(x, mask, alpha=0.3), put(x.shape, gate), **close)
    torch.testing.assert_close(response_softmax(x, mask, temperature=1.7), put(x.shape, sm), **close)


def test_transforms_dtypes_and_errors():
    x = torch.rand(2, 3, dtype=torch.bfloat16)
    assert minmax_per_response(x, torch.ones(2, 3)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        response_softmax(x, torch.ones(2, 3), temperature=0)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got -1"):
        minmax_per_response(x, torch.ones(2, 3), eps=-1)
    with pytest.raises(ValueError, match=r"one weight per signal .* got 2 signals and 1 weights"):
        soft_or([x, x], [1.0])
    with pytest.raises(ValueError, match=r"weights\[1\] must be a finite number >= 0, got -0.5"):
        soft_or([x, x], [1.0, -0.5])


def test_soft_or_matches_oracle_and_zero_weight():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 5, generator=g, dtype=F64), torch.rand(3, 5, generator=g, dtype=F64)
    a[0, 0] = 1.0
    expected = 1 - (1 - a) ** 0.7 * (1 - b) ** 0.3
    torch.testing.assert_close(soft_or([a, b], [0.7, 0.3]), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(soft_or([a, b], [1.0, 0.0]), a.clone().mul_(1))  # weight 0 ignores b, even where a = 1
    mask = torch.rand(3, 5, generator=g) < 0.5
    assert torch.equal(soft_or([a], [1.0], mask), torch.where(mask, a, 0.0))


TRANSFORMS = {
    "minmax_per_response": lambda xs, m: minmax_per_response(xs[0], m),
    "shift_nonnegative": lambda xs, m: shift_nonnegative(xs[0] - 0.5, m),
    "soft_or": lambda xs, m: soft_or(xs, [0.7, 0.3], m),
    "tanh_gate": lambda xs, m: tanh_gate(xs[0], m, alpha=0.05),
    "response_softmax": lambda xs, m: response_softmax(xs[0], m),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_never_read_padding_in_values_or_gradients(name, bad):
    # soft_or once raised every signal to its power at padding too: the value was masked, the gradient NaN
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(3, 5, generator=g) < 0.6
    mask[:, 0] = True
    clean = [torch.where(mask, torch.rand(3, 5, generator=g, dtype=F64), 0.0) for _ in range(2)]
    dirty = [torch.where(mask, x, bad).requires_grad_() for x in clean]
    out = TRANSFORMS[name](dirty, mask)
    torch.testing.assert_close(out, TRANSFORMS[name](clean, mask), rtol=0, atol=0)
    up = torch.rand(3, 5, generator=g, dtype=F64)
    grads = torch.autograd.grad(out, dirty, up, allow_unused=True)
    for i, grad in enumerate(grads):
        if grad is not None:
            assert torch.isfinite(grad).all(), f"signal {i}"
            assert (grad[~mask] == 0).all(), f"signal {i}"


@given(st.integers(0, 2**16), st.floats(0.1, 5.0))
def test_response_softmax_mean_one(seed, temperature):
    x, mask = make(seed=seed)
    w = response_softmax(x * 3, mask, temperature=temperature)
    n = mask.sum(-1)
    nonempty = n > 0
    torch.testing.assert_close(w.sum(-1)[nonempty], n[nonempty].to(F64), rtol=1e-10, atol=1e-10)
    assert (w[~mask] == 0).all() and (w >= 0).all()


# ----------------------------------------------------------------------------- selection


def count_oracle(n, q, rounding="ceil"):
    if n == 0:
        return 0
    raw = math.ceil(Fraction(str(q)) * n) if rounding == "ceil" else math.floor(Fraction(str(q)) * n)
    return min(n, max(1, raw))


def units(scores, mask, scope, micro_batch_ids=None):
    """The (flat index) members of each scope unit."""
    B, T = scores.shape
    if scope == "response":
        keys = list(range(B))
    elif scope == "micro-batch" and micro_batch_ids is not None:
        keys = micro_batch_ids.tolist()
    else:
        keys = [0] * B
    out = {}
    for b in range(B):
        for t in range(T):
            out.setdefault(keys[b], []).append((b, t))
    return out


def topq_oracle(scores, mask, q, scope, exact=True, rounding="ceil", tie=None, micro_batch_ids=None):
    """Sort each unit by (-score, tie key); keep the first n (exact) or all >= the n-th value."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    T = scores.shape[1]
    for members in units(scores, mask, scope, micro_batch_ids).values():
        valid = [m for m in members if mask[m]]
        n = count_oracle(len(valid), q, rounding)
        if n == 0:
            continue

        def key(m):
            s = scores[m].item()
            tie_key = m[0] * T + m[1] if tie is None else tie[m[0] * T + m[1]]
            return (0 if math.isnan(s) else 1, -s if not math.isnan(s) else 0.0, tie_key)

        ordered = sorted(valid, key=key)
        if exact:
            for m in ordered[:n]:
                keep[m] = True
        else:
            kth = scores[ordered[n - 1]].item()
            for m in valid:
                s = scores[m].item()
                keep[m] = math.isnan(s) or s >= kth
    return keep


@pytest.mark.parametrize("scope", ["response", "micro-batch", "batch"])
@pytest.mark.parametrize(("exact", "rounding"), [(True, "ceil"), (True, "floor"), (False, "ceil")])
def test_topq_mask_matches_oracle(scope, exact, rounding):
    x, mask = make(batch=7, seq=8, seed=3)
    scores = torch.round(x * 2) / 2  # many ties
    scores[2, 3] = float("nan")
    ids = torch.tensor([5, 5, 1, 1, 1, 9, 9]) if scope == "micro-batch" else None
    got = assert_inputs_unchanged(
        topq_mask, scores, mask, q=0.3, scope=scope, exact=exact, rounding=rounding, micro_batch_ids=ids
    )
    assert torch.equal(got, topq_oracle(scores, mask, 0.3, scope, exact, rounding, micro_batch_ids=ids))
    assert not (got & ~mask).any()


@pytest.mark.parametrize("scope", ["response", "batch"])
def test_topq_random_tie_break(scope):
    scores = torch.zeros(4, 10, dtype=F64)  # all tied, like top-p entropies that are exactly 0
    scores[0, 3] = 1.0
    mask = torch.ones(4, 10, dtype=torch.bool)
    masks = []
    for seed in (0, 0, 1):
        g = torch.Generator().manual_seed(seed)
        got = topq_mask(scores, mask, q=0.3, scope=scope, tie_break="random", generator=g)
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(seed))  # the j-th valid token's key
        assert torch.equal(got, topq_oracle(scores, mask, 0.3, scope, tie=perm.tolist()))
        masks.append(got)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])  # seeded, and random
    assert bool(masks[2][0, 3])  # the unique maximum is always kept


@pytest.mark.parametrize("scope", ["response", "batch"])
def test_topq_random_tie_break_does_not_depend_on_padding(scope):
    # the permutation was drawn over every entry, padding included: padding the same responses to
    # another length (each rank pads to its own longest response) chose other tokens
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([3, 6, 2, 5])
    mask = torch.arange(6) < lengths[:, None]
    scores = torch.where(mask, torch.randint(0, 2, (4, 6), generator=g).double(), 0.0)  # many ties
    got = topq_mask(scores, mask, q=0.3, scope=scope, tie_break="random", generator=torch.Generator().manual_seed(5))
    wide = torch.nn.functional.pad(scores, (0, 4))
    wide_mask = torch.nn.functional.pad(mask, (0, 4))
    again = topq_mask(
        wide, wide_mask, q=0.3, scope=scope, tie_break="random", generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(again[:, :6], got) and not again[:, 6:].any()
    keys = torch.randperm(int(mask.sum()), generator=torch.Generator().manual_seed(5))
    tie = torch.full((4 * 6,), 99, dtype=torch.long)
    tie[mask.reshape(-1)] = keys
    assert torch.equal(got, topq_oracle(scores, mask, 0.3, scope, tie=tie.tolist()))


def test_topq_equals_existing_masks():
    x, mask = make(batch=8, seq=11, seed=5)
    scores = torch.round(x)
    assert torch.equal(topq_mask(scores, mask, q=0.4), topk_token_mask(scores, mask, k=0.4))
    for exact in (True, False):
        assert torch.equal(
            topq_mask(scores, mask, q=0.2, scope="batch", exact=exact),
            high_entropy_mask(scores, mask, rho=0.2, exact_count=exact),
        )


@given(st.integers(0, 2**16), st.sampled_from([0.1, 0.2, 0.3, 0.7, 1.0]), st.sampled_from(["ceil", "floor"]))
def test_topq_counts_and_threshold_superset(seed, q, rounding):
    x, mask = make(seed=seed)
    scores = torch.round(x)
    exact = topq_mask(scores, mask, q=q, scope="batch", rounding=rounding)
    assert int(exact.sum()) == count_oracle(int(mask.sum()), q, rounding)
    per_row = topq_mask(scores, mask, q=q, rounding=rounding)
    assert per_row.sum(-1).tolist() == [count_oracle(int(n), q, rounding) for n in mask.sum(-1)]
    loose = topq_mask(scores, mask, q=q, scope="batch", exact=False, rounding=rounding)
    assert not (exact & ~loose).any()
    threshold = topq_threshold(scores, mask, q=q, scope="batch", rounding=rounding)
    assert torch.equal(loose, mask & (scores >= threshold[:, None]))


def test_kept_count_matches_exact_rounding():
    n = torch.arange(0, 40)
    for q in (0.1, 0.2, 0.3, 0.7, 0.9, 1.0):
        for rounding in ("ceil", "floor"):
            assert kept_count(n, q, rounding).tolist() == [count_oracle(k, q, rounding) for k in range(40)]


def test_topq_threshold_per_unit():
    x, mask = make(batch=6, seq=7, seed=8)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    thr = topq_threshold(x, mask, q=0.25, scope="micro-batch", micro_batch_ids=ids)
    expected = []
    for b in range(6):
        unit = [x[r, t].item() for r in range(6) if ids[r] == ids[b] for t in range(7) if mask[r, t]]
        n = count_oracle(len(unit), 0.25)
        expected.append(sorted(unit, reverse=True)[n - 1] if n else math.inf)
    assert thr.tolist() == expected
    per_row = topq_threshold(x, mask, q=0.25, scope="response")
    assert per_row[~mask.any(-1)].eq(math.inf).all()


def test_topq_threshold_recipe_keeps_nan_scores_as_topq_mask_does():
    # NaN ranks first, so the n-th largest score can itself be NaN: "scores >= threshold" alone
    # then keeps nothing, or drops the NaN token topq_mask keeps
    scores = torch.tensor([[math.nan, 0.1, 2.0, 0.3], [0.2, 0.1, 0.0, -1.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    for q in (0.25, 0.5):
        for scope in ("response", "batch"):
            threshold = topq_threshold(scores, mask, q=q, scope=scope)
            recipe = mask & ((scores >= threshold[:, None]) | scores.isnan())
            assert torch.equal(recipe, topq_mask(scores, mask, q=q, scope=scope, exact=False)), (q, scope)
            assert recipe[0, 0]


def test_selection_errors():
    s, m = torch.rand(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"q must be in \(0, 1\], got 1.5"):
        topq_mask(s, m, q=1.5)
    with pytest.raises(ValueError, match=r"tie_break=.random. needs an explicit torch\.Generator"):
        topq_mask(s, m, q=0.5, tie_break="random")
    with pytest.raises(TypeError, match="scope"):  # the Literal annotation is checked at call time
        topq_mask(s, m, q=0.5, scope="rollout")
    with pytest.raises(ValueError, match="applies to scope='batch' only, got scope='response'"):
        topq_mask(s, m, q=0.5, process_group="world")
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        topq_mask(s, m, q=0.5, scope="batch", process_group="world")
    with pytest.raises(ValueError, match="micro_batch_ids applies to scope='micro-batch' only, got scope='batch'"):
        topq_mask(s, m, q=0.5, scope="batch", micro_batch_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        tail_window_mask(m, fraction=0)
    with pytest.raises(ValueError, match="one weight per mask, got 2 masks and 1 weights"):
        priority_weights([m, m], [1.0], m)


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.9, 1.0])
def test_tail_window_and_relative_position(left_pad, fraction):
    _, mask = make(batch=8, seq=10, seed=2, left_pad=left_pad)
    window, pos = tail_window_mask(mask, fraction=fraction), relative_position(mask, dtype=F64)
    exp_w, exp_p = torch.zeros(mask.shape, dtype=torch.bool), torch.zeros(mask.shape, dtype=F64)
    for b in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[b, t]]
        length = len(idx)
        start = math.floor((1 - Fraction(str(fraction))) * length)
        for j, t in enumerate(idx):
            exp_w[b, t] = j >= start
            exp_p[b, t] = j / (length - 1) if length > 1 else 0.0
    assert torch.equal(window, exp_w)
    torch.testing.assert_close(pos, exp_p, rtol=0, atol=1e-15)
    assert relative_position(mask).dtype == torch.float32


def span_stack_oracle(ids, open_ids, close_ids, resp, include_tags):
    """Tags as brackets with a stack: an opening tag pushes, a closing tag pops, a stray one is ignored."""
    out = []
    for row, keep in zip(ids, resp):
        depth, res = 0, []
        for tok, k in zip(row, keep):
            if tok in open_ids:
                inside, depth = True, depth + 1
            elif tok in close_ids:
                inside, depth = depth > 0, max(depth - 1, 0)
            else:
                inside = depth > 0
            res.append(inside and (include_tags or tok not in (*open_ids, *close_ids)) and bool(k))
        out.append(res)
    return torch.tensor(out, dtype=torch.bool).reshape(len(ids), -1)


@given(
    ids=st.lists(st.lists(st.integers(0, 5), min_size=12, max_size=12), min_size=1, max_size=4),
    keep=st.lists(st.booleans(), min_size=48, max_size=48),
    include=st.booleans(),
)
def test_span_mask_matches_stack_oracle(ids, keep, include):
    # 1 and 3 open, 2 closes; strays, nesting, unclosed spans and tags in the masked (prompt) part happen
    resp = torch.tensor(keep[: len(ids) * 12]).reshape(len(ids), 12)
    got = span_mask(torch.tensor(ids), [1, 3], 2, resp, include_tags=include)
    assert torch.equal(got, span_stack_oracle(ids, (1, 3), (2,), resp.tolist(), include))
    assert torch.equal(
        span_mask(torch.tensor(ids), [1, 3], [2], include_tags=include),
        span_stack_oracle(ids, (1, 3), (2,), [[True] * 12] * len(ids), include),
    )


def test_span_mask_stray_closing_tag_and_edges():
    # the docstring's rule: a stray closing tag is ignored (it used to swallow the next span)
    assert span_mask(torch.tensor([[2, 1, 7, 2, 9]]), 1, 2).int().tolist() == [[0, 1, 1, 1, 0]]
    assert span_mask(torch.tensor([[2, 2, 1, 7, 2, 1, 8, 2]]), 1, 2).int().tolist() == [[0, 0, 1, 1, 1, 1, 1, 1]]
    assert span_mask(torch.tensor([[1, 1, 2, 5, 2, 5]]), 1, 2).int().tolist() == [[1, 1, 1, 1, 1, 0]]  # nested
    # an opening tag in the prompt (masked out) still opens the span that the response continues
    assert span_mask(torch.tensor([[1, 5, 6, 2, 7]]), 1, 2, torch.tensor([[0, 0, 1, 1, 1]])).int().tolist() == [
        [0, 0, 1, 1, 0]
    ]
    assert span_mask(torch.zeros(3, 0, dtype=torch.long), 1, 2).shape == (3, 0)
    with pytest.raises(ValueError, match=r"open_ids and close_ids must be disjoint, got \[3\]"):
        span_mask(torch.tensor([[1, 3]]), [1, 3], [3])


def test_priority_weights_first_mask_wins():
    g = torch.Generator().manual_seed(6)
    m1, m2, valid = (torch.rand(4, 7, generator=g) < p for p in (0.3, 0.5, 0.8))
    got = priority_weights([m1, m2], [1.0, 0.5], valid, default=0.1)
    expected = torch.where(m1, 1.0, torch.where(m2, 0.5, 0.1))
    assert torch.equal(got, torch.where(valid, expected, 0.0).float())


# ----------------------------------------------------------------------------- factors


def test_reduce_response():
    x, mask = make()
    x = x.masked_fill(~mask, float("nan"))
    for reduce, fn in (("mean", statistics.fmean), ("sum", math.fsum), ("max", max)):
        expected = [fn([v for _, v in row]) if row else 0.0 for row in rows_of(x, mask)]
        torch.testing.assert_close(reduce_response(x, mask, reduce=reduce), torch.tensor(expected, dtype=F64))


def group_values():
    g = torch.Generator().manual_seed(7)
    values = torch.rand(10, generator=g, dtype=F64) * 4 - 1
    groups = torch.tensor([3, 3, 3, 0, 0, 8, 8, 8, 8, 5])
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    values[2] = float("nan")  # invalid: never read
    return values, groups, valid


def test_minmax_normalise_batch_and_groups():
    v, groups, valid = group_values()
    for ids in (None, groups):
        got = assert_inputs_unchanged(minmax_normalise, v, valid, group_ids=ids)
        expected = []
        for i in range(10):
            if not valid[i]:
                expected.append(0.0)
                continue
            unit = [v[j].item() for j in range(10) if valid[j] and (ids is None or groups[j] == groups[i])]
            expected.append((v[i].item() - min(unit)) / (max(unit) - min(unit) + 1e-8))
        torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    assert minmax_normalise(v, valid, group_ids=groups)[9] == 0  # a group of one


@pytest.mark.parametrize("n_valid", [0, 1, 4, 7])
def test_median_mad_and_factors(n_valid):
    g = torch.Generator().manual_seed(n_valid)
    v = torch.rand(7, generator=g, dtype=F64) * 3
    valid = torch.arange(7) < n_valid
    stats = median_mad(v, valid)
    kept = [x for x, k in zip(v.tolist(), valid.tolist()) if k]
    med = statistics.median(kept) if kept else 0.0
    mad = statistics.median([abs(x - med) for x in kept]) if kept else 0.0
    assert math.isclose(stats.median.item(), med, abs_tol=1e-12)
    assert math.isclose(stats.mad.item(), mad, abs_tol=1e-12)
    factors = median_mad_factors(v, valid, lam=0.1)
    expected = [1 + 0.1 * math.tanh((x - med) / (mad + 1e-8)) if k else 1.0 for x, k in zip(v.tolist(), valid.tolist())]
    torch.testing.assert_close(factors, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


def test_centred_clamps():
    x, mask = make()
    x = x.masked_fill(~mask, float("nan"))
    expected = {}
    for b, row in enumerate(rows_of(x, mask)):
        mean = sum(v for _, v in row) / max(len(row), 1)
        for t, v in row:
            expected[b, t] = min(max(1 + v - mean, 0.1), 2.0)
    torch.testing.assert_close(centred_clamp(x, mask, low=0.1, high=2.0), put(x.shape, expected))
    free = centred_clamp(x, mask)
    nonempty = mask.any(-1)
    torch.testing.assert_close(free.sum(-1)[nonempty], mask.sum(-1)[nonempty].to(F64))  # mean 1 without clamps

    v, groups, valid = group_values()
    got = group_centred_clamp(v, groups, valid, low=0.9, high=2.0)
    exp = []
    for i in range(10):
        unit = [v[j].item() for j in range(10) if valid[j] and groups[j] == groups[i]]
        exp.append(min(max(1 + v[i].item() - sum(unit) / len(unit), 0.9), 2.0) if valid[i] else 1.0)
    torch.testing.assert_close(got, torch.tensor(exp, dtype=F64), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"low must be <= high, got low=2\.0 and high=1\.0"):
        centred_clamp(x, mask, low=2.0, high=1.0)


def test_anneal_weights():
    w = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    torch.testing.assert_close(anneal_weights(w, 0.25), torch.tensor([0.75, 1.0, 1.5], dtype=F64))
    assert torch.equal(anneal_weights(w, 0.0), torch.ones(3, dtype=F64))
    assert torch.equal(anneal_weights(w, torch.tensor(1.0)), w)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\] .* got 1.5"):
        anneal_weights(w, 1.5)


# ----------------------------------------------------------------------------- signals: sampled and hidden


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs", "positive"])
def test_log_ratio_signal(kind):
    g = torch.Generator().manual_seed(9)
    lp = -torch.rand(4, 6, generator=g, dtype=F64) * 5
    lq = -torch.rand(4, 6, generator=g, dtype=F64) * 5
    lq[0, 0] = -50.0  # beyond the +-20 clamp
    mask = torch.rand(4, 6, generator=g) < 0.7
    mask[0, 0] = True  # the entry beyond the clamp counts
    got = assert_inputs_unchanged(log_ratio_signal, lp, lq, mask, kind=kind)
    d = (lq - lp).clamp(-20, 20)
    expected = {
        "k1": -d,
        "k2": d * d / 2,
        "k3": (torch.exp(d) - d - 1).clamp(0, 10),
        "abs": (lq - lp).abs(),  # ToR's P_t has no clamp
        "positive": torch.relu(-d),
    }[kind]
    torch.testing.assert_close(got, torch.where(mask, expected, 0.0), rtol=1e-12, atol=1e-12)


def test_unknown_options_raise_type_error_as_documented():
    x, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="kind"):
        log_ratio_signal(x, x, kind="bogus")
    for option in ({"mode": "x"}, {"align": "x"}, {"layers": "first"}):
        with pytest.raises(TypeError, match=next(iter(option))):
            visual_similarity(torch.zeros(2, 3, 4), mask, **option)


def similarity_oracle(states, img, mode, align):
    B, T, _ = states[0].shape
    out = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        image = [v for v in range(T) if img[b, v]]
        if not image:
            continue
        for t in range(T):
            total = 0.0
            for h in states:
                h = h.double()

                def cos(u, w):
                    return (u @ w).item() / (u.norm().item() * w.norm().item())

                if mode == "pairwise":
                    total += sum(cos(h[b, t], h[b, v]) for v in image) / len(image)
                else:
                    total += cos(h[b, t], torch.stack([h[b, v] for v in image]).mean(0))
            out[b, t] = total / len(states)
    if align == "predicting":
        out = torch.cat([torch.zeros(B, 1, dtype=F64), out[:, :-1]], 1)
    return out


@pytest.mark.parametrize("mode", ["pairwise", "prototype"])
@pytest.mark.parametrize("align", ["predicting", "token"])
def test_visual_similarity_matches_oracle(mode, align):
    g = torch.Generator().manual_seed(10)
    states = tuple(torch.randn(3, 7, 5, generator=g) for _ in range(3))
    img = torch.zeros(3, 7, dtype=torch.bool)
    img[0, 1:4], img[1, 2] = True, True  # row 2 has no image: 0
    resp = torch.rand(3, 7, generator=g) < 0.8
    got = assert_inputs_unchanged(visual_similarity, states, img, resp, mode=mode, align=align)
    expected = torch.where(resp, similarity_oracle(states, img, mode, align), 0.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    last = visual_similarity(states, img, resp, layers="last", mode=mode, align=align)
    torch.testing.assert_close(last, visual_similarity(states[-1], img, resp, mode=mode, align=align))
    picked = visual_similarity(states, img, resp, layers=[0, -1], mode=mode, align=align)
    torch.testing.assert_close(
        picked.double(), torch.where(resp, similarity_oracle(states[::2], img, mode, align), 0.0)
    )
    with pytest.raises(ValueError, match="layers holds index 3, but hidden_states has 3 layers"):
        visual_similarity(states, img, layers=[3])


@pytest.mark.parametrize("mode", ["pairwise", "prototype"])
@pytest.mark.parametrize("align", ["predicting", "token"])
def test_visual_similarity_nan_padding_reaches_neither_value_nor_gradient(mode, align):
    # left padding (fully masked rows of some attention kernels give NaN states there): the value
    # was finite, but the image mean's backward carried 0 * NaN into every image and response state
    g = torch.Generator().manual_seed(11)
    h = torch.randn(2, 7, 4, generator=g, dtype=F64)
    img = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    resp = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    clean = h.clone().requires_grad_()
    dirty = h.clone()
    dirty[0, 0], dirty[1, :2] = math.nan, math.inf  # read by no counted position
    dirty.requires_grad_()
    upstream = torch.randn(2, 7, generator=g, dtype=F64)
    outs = []
    for x in (clean, dirty):
        out = visual_similarity(x, img, resp, mode=mode, align=align)
        (out * upstream).sum().backward()
        outs.append(out.detach())
    assert torch.equal(outs[0], outs[1])
    assert torch.isfinite(dirty.grad).all()
    torch.testing.assert_close(dirty.grad, clean.grad, rtol=0, atol=0)


def test_visual_similarity_gradient_flows():
    h = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    img = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: visual_similarity(x, img, mode="prototype"), (h,))


# ----------------------------------------------------------------------------- signals: full vocabulary


def hellinger_row(x, y, temperature=1.0):
    p = torch.softmax(x.double() / temperature, 0)
    q = torch.softmax(y.double() / temperature, 0)
    return 1 - sum(math.sqrt(a * b) for a, b in zip(p.tolist(), q.tolist()))


def top_p_entropy_row(x, top_p, temperature=1.0):
    p = sorted(torch.softmax(x.double() / temperature, 0).tolist(), reverse=True)
    kept, mass = [], 0.0
    for v in p:
        if mass >= top_p and kept:
            break
        if v > 0:
            kept.append(v)
        mass += v
    s = sum(kept)
    return -sum(v / s * math.log(v / s) for v in kept)


def entropy_row(x):
    p = torch.softmax(x.double(), 0).tolist()
    return -sum(v * math.log(v) for v in p if v > 0)


def per_row(fn, x, *others, mask=None):
    rows = x.reshape(-1, x.shape[-1])
    rest = [o.reshape(-1, o.shape[-1]) for o in others]
    keep = [True] * rows.shape[0] if mask is None else mask.reshape(-1).tolist()
    vals = [fn(r, *[o[i] for o in rest]) if keep[i] else 0.0 for i, r in enumerate(rows)]
    return torch.tensor(vals, dtype=F64).reshape(x.shape[:-1])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 2e-6)])
def test_hellinger_matches_oracle(dtype, tol):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 5, 1271, generator=g) * 3).to(dtype)
    y = (x.float() + torch.randn(3, 5, 1271, generator=g)).to(dtype)
    x[0, 0, :7] = float("-inf")
    y[0, 1, :5] = float("-inf")
    mask = torch.rand(3, 5, generator=g) < 0.7
    x[~mask] = float("nan")  # masked rows are never read
    got = assert_inputs_unchanged(hellinger, x, y, mask, squared=True, temperature=1.3)
    expected = per_row(lambda a, b: hellinger_row(a, b, 1.3), x, y, mask=mask)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=tol)
    dist = hellinger(x, y, mask, temperature=1.3)
    torch.testing.assert_close(dist.double(), expected.clamp_min(0).sqrt(), rtol=0, atol=10 * math.sqrt(tol))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_hellinger_gradients():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 9, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(2, 4, 9, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hellinger(a, b, squared=True, temperature=0.7), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: hellinger(a, b), (x, y))
    # random upstream gradient, masked rows get exactly zero, -inf entries get zero
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    xx = x.detach().clone()
    xx[0, 2] = float("nan")
    xx[0, 0, :3] = float("-inf")
    xx.requires_grad_()
    up = torch.randn(2, 4, generator=g, dtype=F64)
    (hellinger(xx, y, mask, squared=True) * up).sum().backward()
    assert (xx.grad[~mask] == 0).all() and (y.grad[~mask] == 0).all()
    assert (xx.grad[0, 0, :3] == 0).all() and torch.isfinite(xx.grad).all()
    # compare with autograd of the formula on a masked-free copy
    xr = xx.detach().clone()
    xr[0, 2] = 0.0
    xr.requires_grad_()
    yr = y.detach().clone().requires_grad_()
    # sum_j sqrt(p_j q_j) = exp(lse((log p + log q) / 2)): differentiable where p_j = 0 too
    ref = 1 - torch.logsumexp((torch.log_softmax(xr, -1) + torch.log_softmax(yr, -1)) / 2, -1).exp()
    (torch.where(mask, ref, 0.0) * up).sum().backward()
    torch.testing.assert_close(xx.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, yr.grad, rtol=1e-10, atol=1e-12)


def test_hellinger_identical_nan_and_errors():
    x = torch.randn(2, 3, 7)
    assert torch.equal(hellinger(x, x), torch.zeros(2, 3))
    y = x.clone()
    y[1, 1, 2] = float("nan")
    assert hellinger(x, y)[1, 1].isnan() and not hellinger(x, y)[0].isnan().any()
    with pytest.raises(ValueError, match=r"same dtype, got torch\.float32 and torch\.float64"):
        hellinger(x, x.double())
    with pytest.raises(ValueError, match="got 4 dimensions"):
        hellinger(x[None], x[None])


def test_never_a_float32_copy_of_the_whole_logits(monkeypatch):
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", 4 * 1000 * 16)  # 16 rows of 1000 per chunk
    x = torch.randn(2, 64, 1000).bfloat16().requires_grad_()
    y = torch.randn(2, 64, 1000).bfloat16()
    with LargestFloat32() as seen:
        hellinger(x, y, squared=True).backward(torch.randn(2, 64))
        top_p_entropy(x, top_p=0.9)
    assert seen.largest <= 16 * 1000 < x.numel()


@pytest.mark.parametrize("top_p", [0.5, 0.95, 1.0])
def test_top_p_entropy_matches_oracle(top_p):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(3, 6, 101, generator=g) * 2.5
    x[0, 0] = -30.0
    x[0, 0, 4] = 10.0  # one token above top_p: entropy exactly 0
    x[1, 2, :50] = float("-inf")
    mask = torch.rand(3, 6, generator=g) < 0.8
    mask[0, 0] = True
    got = assert_inputs_unchanged(top_p_entropy, x, mask, top_p=top_p, temperature=0.9)
    expected = per_row(lambda r: top_p_entropy_row(r, top_p, 0.9), x, mask=mask)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)
    assert not got.requires_grad
    if top_p < 1:
        assert got[0, 0] == 0  # exactly: the nucleus is one token


def test_entropy_gap():
    g = torch.Generator().manual_seed(14)
    x, y = torch.randn(2, 3, 17, generator=g, dtype=F64), torch.randn(2, 3, 17, generator=g, dtype=F64)
    out = entropy_gap(x, y)
    hx, hy = per_row(entropy_row, x), per_row(entropy_row, y)
    torch.testing.assert_close(out.entropy, hx)
    torch.testing.assert_close(out.view_entropy, hy)
    torch.testing.assert_close(out.gap, (hy - hx).abs())


def test_jensen_shannon_matches_oracle():
    g = torch.Generator().manual_seed(15)
    x, y = torch.randn(2, 4, 33, generator=g, dtype=F64), torch.randn(2, 4, 33, generator=g, dtype=F64) * 3
    mask = torch.rand(2, 4, generator=g) < 0.7

    def jsd_row(a, b):
        p, q = torch.softmax(a / 1.2, 0), torch.softmax(b / 1.2, 0)
        m = (p + q) / 2
        return (0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()).item()

    got = jensen_shannon(x, y, mask, temperature=1.2, backend="torch")
    torch.testing.assert_close(got, per_row(jsd_row, x, y, mask=mask), rtol=1e-10, atol=1e-12)


def test_jensen_shannon_errors_name_its_own_arguments():
    x = torch.randn(2, 3, 7)
    with pytest.raises(ValueError, match=r"logits_p and logits_q must have the same dtype, got torch\.float32"):
        jensen_shannon(x, x.double())
    with pytest.raises(ValueError, match=r"logits_p must be .* got 4 dimensions"):
        jensen_shannon(x[None], x[None])
    with pytest.raises(ValueError, match="temperature"):
        jensen_shannon(x, x, temperature=0.0)
