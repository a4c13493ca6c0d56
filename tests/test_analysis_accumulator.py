"""DependencyAccumulator: summary against loop oracles, streaming = one batch = merged = 2 gloo ranks."""

import doctest
import math
import os

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
    values, traj = dep[mask], means[rows & (means > 0)]
    for q in (0.1, 0.5, 0.9, 0.99):
        # the default edges are log-spaced, 10 per decade: within about one bin means within ~0.1 decade
        exact = torch.quantile(values, q).item()
        assert abs(math.log10(s[f"token/p{100 * q:g}"] / exact)) <= 0.1 + 1e-9
        exact = torch.quantile(traj, q).item()
        assert abs(math.log10(s[f"trajectory/p{100 * q:g}"] / exact)) <= 0.1 + 1e-9


def test_quantiles_from_fine_linear_bins_are_close():
    values = torch.rand(1, 5000, dtype=torch.float64)
    acc = DependencyAccumulator(token_edges=histogram_edges(0.0, 1.0, 1000), quantiles=(0.0, 0.25, 0.5, 1.0))
    acc.update(values, torch.ones_like(values))
    s = acc.summary(prefix="token/")
    for q in (0.25, 0.5):
        assert s[f"token/token/p{100 * q:g}"] == pytest.approx(torch.quantile(values, q).item(), abs=1e-3)
    assert s["token/token/p0"] == values.min().item() and s["token/token/p100"] == values.max().item()


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


def test_reduce_needs_distributed_and_merge_needs_same_config():
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        make().summary(process_group="world")
    with pytest.raises(ValueError, match=r"can only merge accumulators with the same edges"):
        make().merge(DependencyAccumulator())


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
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -0.1"):
        DependencyAccumulator(eps=-0.1)
    with pytest.raises(TypeError):  # jaxtyping: group_ids of the wrong length
        make().update(torch.rand(2, 3), torch.ones(2, 3), torch.zeros(3, dtype=torch.long))


def test_docstring_examples_run():
    from vppo_core.analysis import accumulator

    result = doctest.testmod(accumulator)
    assert result.failed == 0 and result.attempted > 0


# ----------------------------------------------------------------------------- 2 gloo ranks


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
