"""vppo_core.analysis statistics: float64 oracles written as the formulas, properties, edge cases, errors."""

import doctest
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import assert_inputs_unchanged, random_mask
from vppo_core.analysis import (
    fraction_above,
    gini,
    group_spread,
    histogram_counts,
    histogram_edges,
    top_share,
    trajectory_quantiles,
)

NAN = float("nan")

# ----------------------------------------------------------------------------- oracles (float64, loops)


def valid_rows(dep, mask):
    """Each row's valid values as a list of Python floats (padding dropped)."""
    return [[v for v, m in zip(row, ms) if m] for row, ms in zip(dep.double().tolist(), mask.bool().tolist())]


def undefined(vals):
    return not vals or any(math.isnan(v) for v in vals)


def quantile_oracle(vals, q):
    if undefined(vals):
        return NAN
    x = sorted(vals)
    h = q * (len(x) - 1)
    lo, hi = math.floor(h), math.ceil(h)
    return x[lo] + (h - lo) * (x[hi] - x[lo])


def kept_oracle(n, k):
    return min(n, max(1, math.ceil(Fraction(str(k)) * n)))


def share_oracle(vals, k):
    if undefined(vals):
        return NAN
    n, m = len(vals), kept_oracle(len(vals), k)
    x = sorted(vals, reverse=True)
    total = sum(x)
    return m / n if total == 0 else sum(x[:m]) / total


def above_oracle(vals, c):
    return NAN if undefined(vals) else sum(v > c for v in vals) / len(vals)


def gini_oracle(vals):
    """Mean absolute difference over twice the mean (not the sorted-weights form of the fast path)."""
    if undefined(vals):
        return NAN
    n, total = len(vals), sum(vals)
    if total == 0:
        return 0.0
    return sum(abs(a - b) for a in vals for b in vals) / (2 * n * total)


def histogram_oracle(vals, edges):
    counts = [0] * (len(edges) + 1)
    for v in vals:
        if math.isnan(v):
            continue
        if v < edges[0]:
            counts[0] += 1
        elif v >= edges[-1]:
            counts[-1] += 1
        else:
            j = max(i for i in range(len(edges) - 1) if edges[i] <= v)
            counts[j + 1] += 1
    return counts


def spread_oracle(dep, mask, ids, eps):
    """{group id: (size, mean, std, ratio)} over trajectories with a valid token."""
    groups: dict[int, list[float]] = {}
    for vals, g in zip(valid_rows(dep, mask), ids):
        groups.setdefault(g, [])  # every id gets an entry, even with no valid trajectory
        if vals:
            groups[g].append(sum(vals) / len(vals))
    out = {}
    for g, means in groups.items():
        n = len(means)
        mean = sum(means) / n if n else NAN
        if n < 2:
            out[g] = (n, mean, NAN, NAN)
            continue
        std = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1))
        out[g] = (n, mean, std, (max(means) + eps) / (min(means) + eps))
    return out


def assert_matches(actual, expected, dtype):
    tol = {torch.float64: 1e-12, torch.float32: 2e-5}[actual.dtype]
    assert actual.dtype == dtype
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol, equal_nan=True)


# ----------------------------------------------------------------------------- data


def batch(b=9, t=13, dtype=torch.float32, seed=0, garbage=True):
    """Long-tailed dependency with rows of every kind; padding filled with NaN/inf garbage."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mask = random_mask(b, t)
    dep = torch.empty(b, t, dtype=torch.float64).exponential_(generator=g) ** 2
    dep[1, :] = 0.0  # a row whose dependency sums to 0 (if it has valid tokens)
    dep[2, :3] = 0.5  # ties
    if garbage:
        pad = ~mask
        dep = torch.where(pad & (torch.rand(b, t, generator=g) < 0.5), NAN, dep)
        dep = torch.where(pad & (torch.rand(b, t, generator=g) < 0.3), float("inf"), dep)
    return dep.to(dtype), mask


DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize(("dtype", "out_dtype"), DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_quantiles_match_oracle(dtype, out_dtype, seed):
    dep, mask = batch(dtype=dtype, seed=seed)
    levels = [0.0, 0.1, 0.5, 0.75, 0.9, 1.0]
    out = assert_inputs_unchanged(trajectory_quantiles, dep, mask, levels)
    rows = valid_rows(dep, mask)
    assert out.shape == (dep.shape[0], len(levels))
    assert_matches(out, [[quantile_oracle(r, q) for q in levels] for r in rows], out_dtype)
    single = trajectory_quantiles(dep, mask, 0.9)
    assert single.shape == (dep.shape[0],)
    torch.testing.assert_close(single, out[:, 4], equal_nan=True, rtol=0, atol=0)


def test_quantiles_equal_torch_quantile_per_row():
    dep, mask = batch(dtype=torch.float64, garbage=False)
    levels = [0.05, 0.5, 0.95]
    out = trajectory_quantiles(dep, mask, levels)
    for i in range(dep.shape[0]):
        vals = dep[i][mask[i]]
        if vals.numel():
            torch.testing.assert_close(out[i], torch.quantile(vals, torch.tensor(levels, dtype=torch.float64)))


@pytest.mark.parametrize(("dtype", "out_dtype"), DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_top_share_matches_oracle(dtype, out_dtype, seed):
    dep, mask = batch(dtype=dtype, seed=seed)
    ks = [0.05, 0.2, 0.4, 0.7, 1.0]
    out = assert_inputs_unchanged(top_share, dep, mask, ks)
    rows = valid_rows(dep, mask)
    assert_matches(out, [[share_oracle(r, k) for k in ks] for r in rows], out_dtype)


def test_top_share_counts_tgf_kept_tokens():
    from vppo_core import token_filter_mask

    dep, mask = batch(dtype=torch.float64, seed=3, garbage=False)
    keep = token_filter_mask(dep, mask, k=0.4)
    kept_total = torch.where(keep, dep, 0.0).sum(-1)
    total = torch.where(mask, dep, 0.0).sum(-1)
    share = top_share(dep, mask, 0.4)
    rows = mask.any(-1) & (total > 0)
    torch.testing.assert_close(share[rows], (kept_total / total)[rows])


@pytest.mark.parametrize(("dtype", "out_dtype"), DTYPES)
def test_fraction_above_matches_oracle(dtype, out_dtype):
    dep, mask = batch(dtype=dtype)
    thresholds = [-1.0, 0.0, 0.5, 1, 3.0]
    out = assert_inputs_unchanged(fraction_above, dep, mask, thresholds)
    rows = valid_rows(dep, mask)
    assert_matches(out, [[above_oracle(r, c) for c in thresholds] for r in rows], out_dtype)


@pytest.mark.parametrize(("dtype", "out_dtype"), [*DTYPES, (torch.float16, torch.float32)])
def test_fraction_above_compares_in_float64_at_the_threshold(dtype, out_dtype):
    """float32(0.1) = 0.10000000149... is above the threshold 0.1; the oracle compares Python floats."""
    dep = torch.tensor([[0.1, 0.1, 0.0, 0.0], [0.3, 0.7, 1.1, 0.1]], dtype=dtype)
    mask = torch.ones(2, 4, dtype=torch.bool)
    thresholds = [0.1, 0.3, 0.7, 1.1]
    rows = valid_rows(dep, mask)  # the stored values, as float64
    expected = [[above_oracle(r, c) for c in thresholds] for r in rows]
    assert_matches(fraction_above(dep, mask, thresholds), expected, out_dtype)
    if dtype == torch.float32:
        assert expected[0][0] == 0.5  # the audit's case


@pytest.mark.parametrize(("dtype", "out_dtype"), DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_gini_matches_oracle(dtype, out_dtype, seed):
    dep, mask = batch(dtype=dtype, seed=seed)
    out = assert_inputs_unchanged(gini, dep, mask)
    assert_matches(out, [gini_oracle(r) for r in valid_rows(dep, mask)], out_dtype)


def test_gini_extremes():
    mask = torch.ones(3, 5, dtype=torch.bool)
    dep = torch.tensor([[2.0] * 5, [0.0, 0, 0, 0, 7], [0.0] * 5])
    torch.testing.assert_close(gini(dep, mask), torch.tensor([0.0, 0.8, 0.0]))


@pytest.mark.parametrize(("dtype", "out_dtype"), DTYPES)
@pytest.mark.parametrize("with_ids", [True, False])
def test_group_spread_matches_oracle(dtype, out_dtype, with_ids):
    dep, mask = batch(b=14, dtype=dtype, seed=2)
    ids = torch.tensor([5, 5, 9, -3, 9, 5, 9, -3, 2, 2, 2, 2, 40, 9]) if with_ids else None
    eps = 1e-3
    out = assert_inputs_unchanged(group_spread, dep, mask, ids, eps=eps)
    expected = spread_oracle(dep, mask, ids.tolist() if with_ids else [0] * 14, eps)
    slots = sorted(expected)
    n_slots = 14 if with_ids else 1
    assert out.group_ids.tolist() == slots + [0] * (n_slots - len(slots))
    assert out.size.tolist() == [expected[g][0] for g in slots] + [0] * (n_slots - len(slots))
    for field, j in (("mean", 1), ("std", 2), ("ratio", 3)):
        values = getattr(out, field)
        assert values.dtype == out_dtype and values.shape == (n_slots,)
        assert_matches(values[: len(slots)], [expected[g][j] for g in slots], out_dtype)
        assert values[len(slots) :].isnan().all()


def test_group_spread_equal_means_ratio_one_and_zero_means_finite():
    dep = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.3, 0.3], [0.3, 0.3], [0.0, 0.0], [0.2, 0.2]])
    out = group_spread(dep, torch.ones(6, 2), torch.tensor([0, 0, 1, 1, 2, 2]), eps=1e-6)
    torch.testing.assert_close(out.ratio[:2], torch.ones(2))
    torch.testing.assert_close(out.ratio[2], torch.tensor((0.2 + 1e-6) / 1e-6))
    torch.testing.assert_close(out.std[:2], torch.zeros(2))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_histogram_matches_oracle(log, dtype):
    dep, mask = batch(b=11, t=17, dtype=dtype, seed=4)
    dep = dep.clone()
    dep[3, 0] = NAN if mask[3, 0] else dep[3, 0]  # a valid NaN is counted nowhere
    edges = histogram_edges(0.01, 4.0, 9, log=log)
    counts = assert_inputs_unchanged(histogram_counts, dep, mask, edges)
    vals = [v for r in valid_rows(dep, mask) for v in r]
    assert counts.dtype == torch.int64
    assert counts.tolist() == histogram_oracle(vals, edges.tolist())
    assert int(counts.sum()) == sum(not math.isnan(v) for v in vals)


def test_histogram_bins_are_half_open_and_edges_exact():
    edges = torch.tensor([0.0, 1.0, 2.0])
    values = torch.tensor([-0.5, 0.0, 0.999, 1.0, 2.0, 7.0, float("inf"), float("-inf")])
    counts = histogram_counts(values, torch.ones(8), edges)
    assert counts.tolist() == [2, 2, 1, 3]
    log_edges = histogram_edges(1e-6, 100.0, 80, log=True)
    assert log_edges[0].item() == 1e-6 and log_edges[-1].item() == 100.0 and log_edges.shape == (81,)
    torch.testing.assert_close(log_edges[10], torch.tensor(1e-5, dtype=torch.float64))


def test_histogram_counts_add_up_across_batches_and_any_shape():
    dep, mask = batch(b=12, dtype=torch.float64, seed=5)
    edges = histogram_edges(0.0, 3.0, 7)
    whole = histogram_counts(dep, mask, edges)
    parts = histogram_counts(dep[:5], mask[:5], edges) + histogram_counts(dep[5:], mask[5:], edges)
    assert torch.equal(whole, parts)
    flat = histogram_counts(dep.reshape(-1), mask.reshape(-1), edges)  # [batch]-style trajectory values
    assert torch.equal(whole, flat)


# ----------------------------------------------------------------------------- NaN, padding, empty rows


STATS = [
    lambda d, m: trajectory_quantiles(d, m, [0.2, 0.5]),
    lambda d, m: top_share(d, m, [0.2, 1.0]),
    lambda d, m: fraction_above(d, m, [0.1, 1.0]),
    lambda d, m: gini(d, m),
    lambda d, m: group_spread(d, m, torch.arange(d.shape[0]) // 2).std,
    lambda d, m: histogram_counts(d, m, torch.tensor([0.0, 0.5, 1.0])),
]


@pytest.mark.parametrize("stat", STATS)
def test_nan_in_valid_token_poisons_its_row_only(stat):
    dep = torch.rand(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    clean = stat(dep, mask)
    dep[0, 2] = NAN
    out = stat(dep, mask)
    if out.dtype == torch.int64:  # histogram: one value fewer, nothing else changes
        assert int(clean.sum() - out.sum()) == 1
        return
    assert out[0].isnan().all()
    torch.testing.assert_close(out[1:], clean[1:], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("stat", STATS[:4])
def test_rows_without_valid_tokens_are_nan_and_empty_shapes(stat):
    dep = torch.rand(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2] = False
    out = stat(dep, mask)
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()
    assert stat(torch.rand(4, 0), torch.ones(4, 0, dtype=torch.bool)).isnan().all()
    assert stat(torch.rand(0, 5), torch.ones(0, 5, dtype=torch.bool)).shape[0] == 0


def test_group_spread_without_valid_trajectories_and_singletons():
    dep = torch.rand(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    out = group_spread(dep, mask, torch.tensor([0, 0, 1]))
    assert out.size.tolist() == [1, 1, 0]
    assert out.std.isnan().all() and out.ratio.isnan().all()
    assert not out.mean[:2].isnan().any()


def test_zero_one_masks_and_bool_masks_agree():
    dep, mask = batch(seed=6)
    for stat in STATS:
        torch.testing.assert_close(stat(dep, mask.float()), stat(dep, mask), equal_nan=True, rtol=0, atol=0)


def test_results_carry_no_gradient():
    dep = torch.rand(3, 4, requires_grad=True)
    mask = torch.ones(3, 4)
    for stat in STATS:
        assert not stat(dep, mask).requires_grad


# ----------------------------------------------------------------------------- properties


@st.composite
def masked_batches(draw, min_value=0.0):
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 9))
    values = st.floats(min_value, 50.0, allow_nan=False, allow_infinity=False, width=32)
    dep = torch.tensor(draw(st.lists(st.lists(values, min_size=t, max_size=t), min_size=b, max_size=b)))
    mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
    return dep, mask


@given(masked_batches(), st.sampled_from([0.05, 0.2, 0.4, 0.7]))
def test_property_top_share_bounds(data, k):
    dep, mask = data
    share = top_share(dep, mask, [k, 1.0])
    rows = mask.any(-1)
    assert (share[rows, 1] == 1).all()  # the top 100% carry everything, exactly
    assert share[~rows].isnan().all()
    n = mask.sum(-1).double()
    kept = torch.tensor([kept_oracle(int(v), k) if v else 0 for v in n.tolist()], dtype=torch.float64)
    # non-negative values: the top tokens carry at least their proportional share, at most all of it
    assert (share[rows, 0].double() >= (kept / n)[rows] - 1e-6).all()
    assert (share[rows, 0] <= 1 + 1e-6).all()


@given(masked_batches())
def test_property_gini_in_unit_interval(data):
    dep, mask = data
    g = gini(dep, mask).double()
    rows = mask.any(-1)
    n = mask.sum(-1).double()
    assert (g[rows] >= -1e-7).all() and (g[rows] < 1).all()
    assert (g[rows] <= ((n - 1) / n)[rows] + 1e-6).all()


@given(masked_batches(min_value=-5.0), st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_property_quantiles_monotone_and_bounded(data, levels):
    dep, mask = data
    levels = sorted(levels)
    out = trajectory_quantiles(dep, mask, levels)
    rows = mask.any(-1)
    lo = torch.where(mask, dep, float("inf")).amin(-1)
    hi = torch.where(mask, dep, float("-inf")).amax(-1)
    assert (out[rows].diff(dim=-1) >= -1e-5).all()
    assert (out[rows] >= lo[rows, None] - 1e-5).all() and (out[rows] <= hi[rows, None] + 1e-5).all()


@given(masked_batches(), st.integers(0, 2**31 - 1))
def test_property_padding_is_never_read(data, seed):
    dep, mask = data
    g = torch.Generator().manual_seed(seed)
    garbage = torch.where(torch.rand(dep.shape, generator=g) < 0.5, NAN, 1e30)
    other = torch.where(mask, dep, garbage)
    for stat in STATS[:4] + STATS[5:]:
        torch.testing.assert_close(stat(other, mask), stat(dep, mask), equal_nan=True, rtol=0, atol=0)
    ids = torch.arange(dep.shape[0]) // 2
    a, b = group_spread(other, mask, ids), group_spread(dep, mask, ids)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, equal_nan=True, rtol=0, atol=0)


@given(masked_batches(), st.integers(1, 12), st.booleans())
def test_property_histogram_counts_every_valid_value(data, bins, log):
    dep, mask = data
    edges = histogram_edges(0.1 if log else 0.0, 30.0, bins, log=log)
    counts = histogram_counts(dep, mask, edges)
    assert (counts >= 0).all() and int(counts.sum()) == int(mask.sum())


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    dep, mask = torch.rand(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"every level in q must be in \[0, 1\], got 1.5"):
        trajectory_quantiles(dep, mask, [0.5, 1.5])
    with pytest.raises(ValueError, match=r"q must be a float or a non-empty sequence of floats, got \[\]"):
        trajectory_quantiles(dep, mask, [])
    with pytest.raises(ValueError, match=r"k must be in \(0, 1\], got 0.0"):
        top_share(dep, mask, [0.2, 0.0])
    with pytest.raises(ValueError, match=r"every value of thresholds must be a finite float, got nan"):
        fraction_above(dep, mask, [0.1, NAN])
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1.0"):
        group_spread(dep, mask, eps=-1.0)
    with pytest.raises(ValueError, match=r"edges must be finite and strictly increasing, got \[0.0, 2.0, 1.0\]"):
        histogram_counts(dep, mask, torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"edges must be 1-D with at least 2 values, got shape \(1,\)"):
        histogram_counts(dep, mask, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"bins must be an integer >= 1, got 0"):
        histogram_edges(0.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"log-spaced edges need low > 0, got low=0.0"):
        histogram_edges(0.0, 1.0, 4, log=True)
    with pytest.raises(ValueError, match=r"high > low, got low=1.0, high=1.0"):
        histogram_edges(1.0, 1.0, 4)
    with pytest.raises(TypeError):  # jaxtyping: mask shape differs
        gini(dep, torch.ones(2, 4))
    with pytest.raises(TypeError):  # an integer dependency is not a float tensor
        gini(torch.ones(2, 3, dtype=torch.long), mask)


# ----------------------------------------------------------------------------- tracing, doctests


def test_statistics_trace_without_graph_breaks():
    """fullgraph tracing fails on .item(), .tolist(), data-dependent shapes: a proxy for 'no host sync'."""
    dep, mask = batch(b=6, t=8, seed=7)
    ids = torch.tensor([3, 3, 1, 1, 1, 8])
    edges = histogram_edges(0.01, 10.0, 6, log=True)

    def all_stats(d, m, i):
        return (
            trajectory_quantiles(d, m, [0.5, 0.9]),
            top_share(d, m, [0.2, 0.4]),
            fraction_above(d, m, [0.1]),
            gini(d, m),
            histogram_counts(d, m, edges),
            *group_spread(d, m, i),
        )

    torch._dynamo.reset()
    compiled = torch.compile(all_stats, backend="eager", fullgraph=True)
    for a, b in zip(compiled(dep, mask, ids), all_stats(dep, mask, ids)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def test_docstring_examples_run():
    from vppo_core.analysis import _histogram, _stats

    for module in (_stats, _histogram):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.failed == 0 and result.attempted > 0


def test_histogram_edges_refuse_a_range_too_narrow_for_distinct_bins():
    # linspace over a few ulps repeats values: the promise of bins + 1 increasing edges would break
    with pytest.raises(ValueError, match=r"low=1.0 and high=1.0000000000000004 are too close for 8 distinct"):
        histogram_edges(1.0, 1.0 + 4e-16, 8)
    assert histogram_edges(1.0, 1.0 + 4e-16, 1).tolist() == [1.0, 1.0 + 4e-16]
