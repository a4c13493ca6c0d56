"""DependencyAccumulator: summary against loop oracles, streaming = one batch = merged = 2 gloo ranks."""

import doctest
import math
import os
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import assert_inputs_unchanged, gloo_group, random_mask
from tests.test_analysis import gini_oracle, share_oracle, spread_oracle, valid_rows
from vppo_core.analysis import DependencyAccumulator, histogram_counts, histogram_edges

B, T, G = 24, 19, 4  # 6 groups of 4 responses
QUANTILES, TOPS, THRESHOLDS = (0.1, 0.5, 0.9), (0.2, 0.4, 1.0), (0.05, 0.5, 2.0)


def make(**kwargs) -> DependencyAccumulator:
    return DependencyAccumulator(quantiles=QUANTILES, top_fractions=TOPS, thresholds=THRESHOLDS, **kwargs)


def global_batch(dtype=torch.float32):
    """The same batch in every process; padding holds NaN garbage."""
    g = torch.Generator().manual_seed(99)
    torch.manual_seed(99)
    mask = random_mask(B, T)
    scale = torch.empty(B, 1, dtype=torch.float64).log_normal_(-2.0, 0.8, generator=g)
    dep = torch.empty(B, T, dtype=torch.float64).exponential_(generator=g) * scale
    dep[5] = 0.0
    dep = torch.where(mask, dep, float("nan")).to(dtype)
    groups = torch.arange(B) // G + 100
    return dep, mask, groups


# Chunks aligned with the groups (each group whole in one update), of uneven sizes.
CHUNKS = [slice(0, 4), slice(4, 12), slice(12, 16), slice(16, 24)]
RANKS = [slice(0, 12), slice(12, 24)]


def summary_of(chunks, dep, mask, groups, **kwargs) -> dict[str, float]:
    acc = make()
    for c in chunks:
        acc.update(dep[c], mask[c], groups[c])
    return acc.summary(**kwargs)


def assert_same_summary(a: dict[str, float], b: dict[str, float], rel: float = 1e-12) -> None:
    assert list(a) == list(b)
    for key in a:
        if key.endswith("count"):
            assert a[key] == b[key], key
        else:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-15, nan_ok=True), key


# ----------------------------------------------------------------------------- against the oracles


def test_summary_matches_loop_oracles():
    dep, mask, groups = global_batch()
    s = summary_of([slice(0, B)], dep, mask, groups, prefix="")
    rows = valid_rows(dep, mask)
    tokens = [v for r in rows for v in r]
    n = len(tokens)
    mean = sum(tokens) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in tokens) / (n - 1))
    assert s["token/count"] == n and s["token/nan_count"] == 0
    assert s["token/mean"] == pytest.approx(mean, rel=1e-12)
    assert s["token/std"] == pytest.approx(std, rel=1e-9)
    assert (s["token/min"], s["token/max"]) == (min(tokens), max(tokens))
    for c in THRESHOLDS:
        assert s[f"token/frac_above_{c:g}"] == sum(v > c for v in tokens) / n

    traj = [r for r in rows if r]
    means = [sum(r) / len(r) for r in traj]
    m = sum(means) / len(means)
    assert s["trajectory/count"] == len(traj)
    assert s["trajectory/length_mean"] == pytest.approx(n / len(traj))
    assert s["trajectory/mean"] == pytest.approx(m, rel=1e-12)
    assert s["trajectory/std"] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in means) / (len(means) - 1)))
    assert s["trajectory/min"] == pytest.approx(min(means), rel=1e-15)
    assert s["trajectory/max"] == pytest.approx(max(means), rel=1e-15)
    for k in TOPS:
        expected = sum(share_oracle(r, k) for r in traj) / len(traj)
        assert s[f"trajectory/top{100 * k:g}_share"] == pytest.approx(expected, rel=1e-6)
    assert s["trajectory/gini"] == pytest.approx(sum(gini_oracle(r) for r in traj) / len(traj), rel=1e-6)

    spread = [v for v in spread_oracle(dep, mask, groups.tolist(), 1e-6).values() if v[0] >= 2]
    assert s["group/count"] == len(spread)
    assert s["group/max_min_ratio"] == pytest.approx(sum(v[3] for v in spread) / len(spread), rel=1e-6)
    assert s["group/std"] == pytest.approx(sum(v[2] for v in spread) / len(spread), rel=1e-6)


def test_keys_are_stable():
    s = make().summary()
    assert list(s) == [
        "dependency/token/count",
        "dependency/token/nan_count",
        "dependency/token/mean",
        "dependency/token/std",
        "dependency/token/min",
        "dependency/token/max",
        "dependency/token/p10",
        "dependency/token/p50",
        "dependency/token/p90",
        "dependency/token/frac_above_0.05",
        "dependency/token/frac_above_0.5",
        "dependency/token/frac_above_2",
        "dependency/trajectory/count",
        "dependency/trajectory/length_mean",
        "dependency/trajectory/mean",
        "dependency/trajectory/std",
        "dependency/trajectory/min",
        "dependency/trajectory/max",
        "dependency/trajectory/p10",
        "dependency/trajectory/p50",
        "dependency/trajectory/p90",
        "dependency/trajectory/top20_share",
        "dependency/trajectory/top40_share",
        "dependency/trajectory/top100_share",
        "dependency/trajectory/gini",
        "dependency/group/count",
        "dependency/group/max_min_ratio",
        "dependency/group/std",
    ]
    assert all(type(v) is float for v in s.values())


def test_histograms_are_exact_and_quantiles_within_a_bin():
    dep, mask, groups = global_batch(torch.float64)
    acc = DependencyAccumulator(quantiles=(0.1, 0.5, 0.9, 0.99))
    for c in CHUNKS:
        acc.update(dep[c], mask[c], groups[c])
    edges, counts = acc.token_histogram
    assert torch.equal(counts, histogram_counts(dep, mask, edges))
    rows = mask.any(-1)
    means = torch.where(mask, dep, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)
    t_edges, t_counts = acc.trajectory_histogram
    assert torch.equal(t_counts, histogram_counts(means, rows, t_edges))
    s = acc.summary(prefix="")
    values, traj = dep[mask], means[rows]  # every counted trajectory, a mean of 0 included
    for q in (0.1, 0.5, 0.9, 0.99):
        # the default edges are log-spaced, 10 per decade: within about one bin means within ~0.1 decade
        exact = torch.quantile(values, q).item()
        assert abs(math.log10(s[f"token/p{100 * q:g}"] / exact)) <= 0.1 + 1e-9
        exact = torch.quantile(traj, q).item()
        assert exact > 0  # (a level at 0 would sit in the underflow count)
        assert abs(math.log10(s[f"trajectory/p{100 * q:g}"] / exact)) <= 0.1 + 1e-9


def test_quantiles_from_fine_linear_bins_are_close():
    values = torch.rand(1, 5000, dtype=torch.float64)
    acc = DependencyAccumulator(token_edges=histogram_edges(0.0, 1.0, 1000), quantiles=(0.0, 0.25, 0.5, 1.0))
    acc.update(values, torch.ones_like(values))
    s = acc.summary(prefix="token/")
    for q in (0.25, 0.5):
        assert s[f"token/token/p{100 * q:g}"] == pytest.approx(torch.quantile(values, q).item(), abs=1e-3)
    assert s["token/token/p0"] == values.min().item() and s["token/token/p100"] == values.max().item()


def _closed_bin(value: float, edges: list[float], lo: float, hi: float) -> tuple[float, float]:
    """The bin holding ``value`` (half-open, like histogram_counts), closed and clipped to [lo, hi]."""
    j = sum(e <= value for e in edges)  # 0: underflow, len(edges): overflow
    left = lo if j == 0 else max(edges[j - 1], lo)
    right = hi if j == len(edges) else min(edges[j], hi)
    return left, right


@pytest.mark.parametrize("case", range(40))
def test_quantile_error_bound_holds_with_gaps_between_values(case):
    """The documented bound: the value lies in the bin of one of the two order statistics around the
    exact quantile, so |error| <= that bin's width + the gap between them, however far apart they are."""
    g = torch.Generator().manual_seed(case)
    n = int(torch.randint(1, 12, (1,), generator=g))
    clusters = torch.tensor([1e-3, 0.02, 10.0, 60.0, 500.0], dtype=torch.float64)  # 500: overflow
    pick = torch.randint(0, len(clusters), (n,), generator=g)
    values = clusters[pick] * (1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64))
    values[torch.rand(n, generator=g) < 0.2] = 0.0  # zeros: underflow
    levels = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    acc = DependencyAccumulator(quantiles=levels)
    acc.update(values[None], torch.ones(1, n))
    s = acc.summary(prefix="")
    xs = sorted(values.tolist())
    edges = acc.token_edges.tolist()
    for q in levels:
        got = s[f"token/p{100 * q:g}"]
        h = q * (n - 1)  # torch.quantile's linear interpolation, written out
        below, above = xs[math.floor(h)], xs[math.ceil(h)]
        exact = below + (h - math.floor(h)) * (above - below)
        assert exact == pytest.approx(torch.quantile(values, q).item(), rel=1e-12, abs=1e-300)
        bins = [_closed_bin(x, edges, xs[0], xs[-1]) for x in (below, above)]
        assert any(left <= got <= right for left, right in bins), (q, got, bins)
        width = max(right - left for left, right in bins)
        assert abs(got - exact) <= width + (above - below), q


def test_quantile_between_distant_values_is_in_the_bin_of_one_of_them():
    """[0.001, 10]: the median 5.0005 falls in the gap; the histogram returns a value in 0.001's bin."""
    acc = DependencyAccumulator(quantiles=(0.5,))
    acc.update(torch.tensor([[0.001, 10.0]], dtype=torch.float64), torch.ones(1, 2))
    got = acc.summary(prefix="")["token/p50"]
    left, right = _closed_bin(0.001, acc.token_edges.tolist(), 0.001, 10.0)
    assert left <= got <= right < 0.0013


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("value", [0.1, 0.3, 1.7, 3.3])
def test_std_of_equal_values_is_exactly_zero(value, ragged):
    """Equal values: the std is 0 and the mean is the value, in one batch, streamed, merged and copied."""
    dep, mask = torch.full((64, 50), value, dtype=torch.float64), torch.ones(64, 50, dtype=torch.bool)
    if ragged:  # a row of 7 tokens: its mean, sum / 7, may be off by an ulp, so only tokens are exact
        mask[3, 7:] = False
    streamed, parts = make(), [make(), make()]
    for c in (slice(0, 5), slice(5, 6), slice(6, 40), slice(40, 64)):
        streamed.update(dep[c], mask[c])
    parts[0].update(dep[:30], mask[:30])
    parts[1].update(dep[30:], mask[30:])
    for acc in (streamed, make().merge(parts[0]).merge(parts[1]), parts[0].reduced(None).merge(parts[1])):
        s = acc.summary(prefix="")
        assert (s["token/std"], s["token/mean"]) == (0.0, value)
        if not ragged:  # equal trajectory means (each sum / 50 rounds the same way)
            assert s["trajectory/std"] == 0.0 and s["trajectory/mean"] == pytest.approx(value, rel=1e-15)


def test_std_with_a_large_offset_matches_the_exact_oracle():
    """5 + 1e-6 N(0, 1): sums of squares cancel 13 digits; the two-pass merge loses none of them."""
    g = torch.Generator().manual_seed(5)
    dep = 5.0 + 1e-6 * torch.randn(64, 50, generator=g, dtype=torch.float64)
    mask = torch.rand(64, 50, generator=g) < 0.9
    tokens = dep[mask].tolist()
    traj = [sum(r) / len(r) for r in valid_rows(dep, mask) if r]
    acc = make()
    for c in (slice(0, 7), slice(7, 8), slice(8, 64)):
        acc.update(dep[c], mask[c])
    s = acc.summary(prefix="")
    # statistics.stdev/mean work in exact rational arithmetic on the float64 inputs
    assert s["token/std"] == pytest.approx(statistics.stdev(tokens), rel=1e-9)
    assert s["token/mean"] == pytest.approx(statistics.mean(tokens), rel=1e-15)
    assert s["trajectory/std"] == pytest.approx(statistics.stdev(traj), rel=1e-9)


# ----------------------------------------------------------------------------- streaming and merging


def test_one_batch_many_batches_and_merged_agree():
    dep, mask, groups = global_batch()
    whole = summary_of([slice(0, B)], dep, mask, groups)
    assert_same_summary(summary_of(CHUNKS, dep, mask, groups), whole)
    # extra padding columns (garbage included) change nothing
    wide = torch.cat([dep, torch.full((B, 5), float("inf"))], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(B, 5, dtype=torch.bool)], dim=1)
    assert_same_summary(summary_of([slice(0, 12), slice(12, B)], wide, wide_mask, groups), whole)
    parts = [make() for _ in RANKS]
    for acc, r in zip(parts, RANKS):
        acc.update(dep[r], mask[r], groups[r])
    merged = make().merge(parts[0]).merge(parts[1])
    assert_same_summary(merged.summary(), whole)
    assert_same_summary(parts[0].reduced(None).merge(parts[1]).summary(), whole)


def test_update_traces_without_graph_breaks():
    """fullgraph tracing fails on .item(), .tolist() and data-dependent shapes: a proxy for 'no host sync'."""
    dep, mask, groups = global_batch()
    acc, ref = make(), make()
    for a in (acc, ref):
        a.update(dep[:4], mask[:4], groups[:4])
    torch._dynamo.reset()
    torch.compile(acc.update, backend="eager", fullgraph=True)(dep[4:], mask[4:], groups[4:])
    ref.update(dep[4:], mask[4:], groups[4:])
    assert_same_summary(acc.summary(), ref.summary())


def test_update_is_pure_and_reset_forgets():
    dep, mask, groups = global_batch()
    acc = make()
    assert_inputs_unchanged(acc.update, dep, mask, groups)
    assert acc.summary()["dependency/token/count"] > 0
    acc.reset()
    assert_same_summary(acc.summary(), make().summary())
    acc.update(dep.requires_grad_(), mask.float(), groups)  # 0/1 masks, tensors that require grad
    assert all(not t.requires_grad for t in acc.state.values())


def test_empty_and_without_groups():
    s = make().summary(prefix="")
    assert s["token/count"] == 0 and s["trajectory/count"] == 0 and s["group/count"] == 0
    assert all(math.isnan(v) for k, v in s.items() if not k.endswith("count"))
    dep, mask, _ = global_batch()
    acc = make()
    acc.update(dep, mask)
    acc.update(dep[:, :0], mask[:, :0])  # no tokens at all
    acc.update(dep[:0], mask[:0])  # no trajectories at all
    s = acc.summary(prefix="")
    assert s["group/count"] == 0 and math.isnan(s["group/std"])
    assert s["token/count"] == int(mask.sum()) and s["trajectory/count"] == int(mask.any(-1).sum())


def test_nan_at_a_valid_token_poisons_the_summary():
    dep, mask, groups = global_batch()
    dep = dep.clone()
    dep[0, 0] = float("nan")
    assert mask[0, 0]
    acc = make()
    acc.update(dep, mask, groups)
    s = acc.summary(prefix="")
    assert s["token/nan_count"] == 1 and s["token/count"] == int(mask.sum())
    counted = ("count", "length_mean")  # counts of tokens and trajectories stay defined
    assert all(math.isnan(v) for k, v in s.items() if not k.endswith(counted))


def assert_poisoned(s: dict[str, float], n_tokens: int) -> None:
    """One NaN counted: the counts stay, every other statistic is NaN."""
    s = {k.removeprefix("dependency/"): v for k, v in s.items()}
    assert s["token/nan_count"] == 1 and s["token/count"] == n_tokens
    counted = ("count", "length_mean")
    assert all(math.isnan(v) for k, v in s.items() if not k.endswith(counted)), s


@pytest.mark.parametrize("row", [0, 13, 23])
def test_nan_poisons_min_max_on_every_path(row):
    """Wherever the NaN is (first or later batch, first or second part), min and max are NaN too."""
    dep, mask, groups = global_batch()
    dep = dep.clone()
    col = int(mask[row].nonzero()[0])
    dep[row, col] = float("nan")
    n = int(mask.sum())
    assert_poisoned(summary_of([slice(0, B)], dep, mask, groups), n)
    assert_poisoned(summary_of(CHUNKS, dep, mask, groups), n)
    parts = [make() for _ in RANKS]
    for acc, r in zip(parts, RANKS):
        acc.update(dep[r], mask[r], groups[r])
    assert_poisoned(make().merge(parts[0]).merge(parts[1]).summary(), n)
    assert_poisoned(parts[1].reduced(None).merge(parts[0]).summary(), n)


def test_nan_poisons_the_group_statistics():
    """A NaN trajectory alone in its group, or in a batch without group_ids, still poisons group/*."""
    nan = float("nan")
    dep = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.2, nan, 0.3]])
    mask = torch.ones(3, 3, dtype=torch.bool)
    alone = make()
    alone.update(dep, mask, torch.tensor([0, 0, 1]))
    later = make()
    later.update(dep[:2], mask[:2], torch.tensor([0, 0]))
    later.update(dep[2:], mask[2:])
    for acc in (alone, later):
        s = acc.summary(prefix="")
        assert s["group/count"] == 1
        assert_poisoned(s, 9)


def test_reduce_needs_distributed_and_merge_needs_same_config():
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        make().summary(process_group="world")
    with pytest.raises(ValueError, match=r"can only merge accumulators with the same edges"):
        make().merge(DependencyAccumulator())
    with pytest.raises(ValueError, match=r"eps differs: 1e-06 here, 0\.001 in the other"):
        DependencyAccumulator().merge(DependencyAccumulator(eps=1e-3))
    other = DependencyAccumulator(quantiles=(0.5,), top_fractions=TOPS, thresholds=THRESHOLDS)
    with pytest.raises(ValueError, match=r"quantiles differs: \(0\.1, 0\.5, 0\.9\) here, \(0\.5,\) in the other"):
        make().merge(other)
    edges = histogram_edges(0.0, 1.0, 2)
    with pytest.raises(ValueError, match=r"token_edges differs: .* here, \[0\.0, 0\.5, 1\.0\] in the other"):
        make().merge(make(token_edges=edges))


def test_summary_keys_never_collide():
    """Each level gets its own key; levels equal to 6 significant digits would overwrite each other."""
    with pytest.raises(ValueError, match=r"quantiles must give one summary key per value, got \(0\.5, 0\.5000001\)"):
        DependencyAccumulator(quantiles=(0.5, 0.5000001))
    with pytest.raises(ValueError, match=r"0\.1 and 0\.1000001 both give 'frac_above_0\.1'"):
        DependencyAccumulator(thresholds=(0.1, 0.1000001))
    with pytest.raises(ValueError, match=r"0\.2 and 0\.2 both give 'top20_share'"):
        DependencyAccumulator(top_fractions=(0.2, 0.2))
    acc = DependencyAccumulator(quantiles=(0.5, 0.50001), thresholds=(0.1, 0.100001), top_fractions=(0.2, 0.4))
    s = acc.summary(prefix="")
    assert [k for k in s if k.startswith("token/p")] == ["token/p50", "token/p50.001"]
    assert [k for k in s if "frac_above" in k] == ["token/frac_above_0.1", "token/frac_above_0.100001"]


def test_config_errors():
    with pytest.raises(ValueError, match=r"every level in quantiles must be in \[0, 1\], got 2.0"):
        DependencyAccumulator(quantiles=(0.5, 2.0))
    with pytest.raises(ValueError, match=r"top_fractions must be in \(0, 1\], got 0.0"):
        DependencyAccumulator(top_fractions=(0.0,))
    with pytest.raises(ValueError, match=r"thresholds must be a float or a non-empty sequence"):
        DependencyAccumulator(thresholds=())
    with pytest.raises(ValueError, match=r"token_edges must be finite and strictly increasing"):
        DependencyAccumulator(token_edges=torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match=r"trajectory_edges must be a float tensor of bin edges, got list"):
        DependencyAccumulator(trajectory_edges=[0.0, 1.0])
    with pytest.raises(TypeError, match=r"token_edges must be a float tensor of bin edges, got a torch\.int64 tensor"):
        DependencyAccumulator(token_edges=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -0.1"):
        DependencyAccumulator(eps=-0.1)
    with pytest.raises(TypeError):  # jaxtyping: group_ids of the wrong length
        make().update(torch.rand(2, 3), torch.ones(2, 3), torch.zeros(3, dtype=torch.long))


def test_docstring_examples_run():
    from vppo_core.analysis import accumulator

    result = doctest.testmod(accumulator)
    assert result.failed == 0 and result.attempted > 0


# ----------------------------------------------------------------------------- 2 gloo ranks


def nan_batch(holder: int, rank: int):
    """Rank ``rank``'s rows of the global batch with one NaN at a valid token of rank ``holder``'s rows."""
    dep, mask, groups = global_batch()
    row = RANKS[holder].start + 1
    dep[row, int(mask[row].nonzero()[0])] = float("nan")
    r = RANKS[rank]
    return dep[r], mask[r], groups[r]


def offset_batch():
    g = torch.Generator().manual_seed(7)
    return 5.0 + 1e-6 * torch.randn(B, T, generator=g, dtype=torch.float64), torch.rand(B, T, generator=g) < 0.9


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        dep, mask, groups = global_batch()
        r = RANKS[rank]
        acc = make()
        half = (r.stop - r.start) // 2 // G * G + r.start  # two group-aligned updates per rank
        for c in (slice(r.start, half), slice(half, r.stop)):
            acc.update(dep[c], mask[c], groups[c])
        only_rank0 = make()  # rank 1 never updates this one
        if rank == 0:
            only_rank0.update(dep[r], mask[r], groups[r])
        out = {
            "global": acc.summary(process_group="world"),
            "again": acc.summary(process_group=dist.group.WORLD),  # no double counting
            "local": acc.summary(),
            "only_rank0": only_rank0.summary(process_group="world"),
        }
        for holder in range(world):  # a NaN on one rank poisons every rank's summary
            poisoned = make()
            poisoned.update(*nan_batch(holder, rank))
            out[f"nan_on_rank{holder}"] = poisoned.summary(process_group="world")
        offset = make()  # std across ranks with a large offset
        dep5, mask5 = offset_batch()
        offset.update(dep5[r], mask5[r])
        out["offset"] = offset.summary(process_group="world")
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    dep, mask, groups = global_batch()
    whole = summary_of([slice(0, B)], dep, mask, groups)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert_same_summary(out["global"], whole)
        assert_same_summary(out["again"], whole)
        assert_same_summary(out["local"], summary_of([RANKS[rank]], dep, mask, groups))
        assert_same_summary(out["only_rank0"], summary_of([RANKS[0]], dep, mask, groups))
        for holder in range(2):
            assert_poisoned(out[f"nan_on_rank{holder}"], int(mask.sum()))
        dep5, mask5 = offset_batch()
        assert out["offset"]["dependency/token/std"] == pytest.approx(statistics.stdev(dep5[mask5].tolist()), rel=1e-9)
        assert out["offset"]["dependency/token/mean"] == pytest.approx(statistics.mean(dep5[mask5].tolist()), rel=1e-15)


def test_streamed_infinite_values_give_the_one_batch_mean():
    # equal infinite means of two parts: inf - inf made the combined mean NaN (with no NaN counted)
    dep = torch.tensor([[1.0, math.inf], [2.0, math.inf]])
    mask = torch.ones(2, 2)
    one = make()
    one.update(dep, mask)
    streamed = make()
    streamed.update(dep[:1], mask[:1])
    streamed.update(dep[1:], mask[1:])
    a, b = one.summary(prefix=""), streamed.summary(prefix="")
    for key in ("token/mean", "trajectory/mean", "token/nan_count"):
        assert a[key] == b[key], (key, a[key], b[key])
    assert a["token/mean"] == math.inf and a["token/nan_count"] == 0


@pytest.mark.parametrize(
    ("first", "second", "mean"),
    [
        ([1.0, 2.0], [math.inf, 3.0], math.inf),
        ([math.inf, 3.0], [1.0, 2.0], math.inf),
        ([math.inf], [-math.inf], math.nan),
    ],
)
def test_an_infinite_part_gives_the_one_batch_mean_in_either_order(first, second, mean):
    # the pairwise update gave NaN when the infinite mean came first and inf when it came second, so
    # two ranks summarised in rank order disagreed with one process
    one, streamed = make(), make()
    one.update(torch.tensor([first + second]), torch.ones(1, len(first) + len(second)))
    streamed.update(torch.tensor([first]), torch.ones(1, len(first)))
    streamed.update(torch.tensor([second]), torch.ones(1, len(second)))
    a, b = one.summary(prefix=""), streamed.summary(prefix="")
    for got in (a["token/mean"], b["token/mean"]):
        assert got == mean or (math.isnan(mean) and math.isnan(got)), (first, second, got)
    assert math.isnan(a["token/std"]) and math.isnan(b["token/std"])
