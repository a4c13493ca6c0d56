"""Batch-wide statistics of the family (pooled top-q, thresholds, group min-max, median/MAD, group means, and the
rollout recipes built on them) give on 2 gloo ranks exactly what one process gives on the concatenated batch."""

import itertools
import os

import pytest
import torch
import torch.multiprocessing as mp

import vppo_core as V
from vppo_core import family as Fm
from vppo_core.distributed import loss_denominators
from vppo_core.entropy import high_entropy_mask, high_entropy_threshold
from vppo_core.factors import group_centred_clamp, median_mad_factors, minmax_normalise
from vppo_core.selection import topq_mask, topq_threshold

from .helpers import gloo_group

B, T = 13, 7
BOUNDS = [0, 9, 13]  # uneven shards; the prompt groups of 4 straddle the boundary


def global_batch():
    g = torch.Generator().manual_seed(99)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[4] = False  # an empty response
    scores = torch.round(torch.rand(B, T, generator=g, dtype=torch.float64) * 5)  # ties
    values = torch.rand(B, generator=g, dtype=torch.float64)
    groups = torch.arange(B) // 4
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    dep = torch.rand(B, T, generator=g, dtype=torch.float64) ** 2
    sim = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1
    return mask, scores, values, groups, adv, dep, sim


def compute(mask, scores, values, groups, adv, dep, sim, *, group=None, micro_batch_ids=None):
    valid = mask.any(-1)
    return {
        "top_random": topq_mask(
            scores,
            mask,
            q=0.3,
            scope="batch",
            tie_break="random",
            generator=torch.Generator().manual_seed(5),
            process_group=group,
        ),
        "top_threshold": topq_mask(scores, mask, q=0.3, scope="batch", exact=False, process_group=group),
        "threshold": topq_threshold(scores, mask, q=0.3, scope="batch", process_group=group),
        "minmax": minmax_normalise(values, valid, process_group=group),
        "minmax_groups": minmax_normalise(values, valid, group_ids=groups, process_group=group),
        "median_mad": median_mad_factors(values, valid, process_group=group),
        "group_clamp": group_centred_clamp(values, groups, valid, low=0.9, high=1.05, process_group=group),
        "tor": Fm.tor_rollout(
            adv, scores, dep, mask, generator=torch.Generator().manual_seed(7), process_group=group
        ).token_mask,
        "cgpo_batch": Fm.cgpo_rollout(adv, dep, scores, mask, mask_scope="batch", process_group=group).advantages,
        "cgpo_micro": Fm.cgpo_rollout(adv, dep, scores, mask, micro_batch_ids=micro_batch_ids, process_group=group)[0],
        "vgpo": Fm.vgpo_rollout(adv, sim, mask, groups, process_group=group).advantages,
        # a prompt's responses on both ranks (rank 0 holds one of group 2's five): one group
        "grpo": V.grpo_advantages((values > 0.5).float(), groups.clamp_max(2), process_group=group),
        "dr_grpo": V.grpo_advantages(values, groups.clamp_max(2), scale="none", process_group=group),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        shard = [t[BOUNDS[rank] : BOUNDS[rank + 1]] for t in global_batch()]
        torch.save(compute(*shard, group="world"), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # one process: the whole batch; the per-rank micro-batch masks of CGPO become two micro-batches
    ranks_as_micro_batches = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(itertools.pairwise(BOUNDS))])
    full = compute(*global_batch(), micro_batch_ids=ranks_as_micro_batches)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, expected in full.items():
        got = torch.cat([s[key] for s in shards])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=key)
    # the batch really exercises the statistics
    assert (full["minmax_groups"] > 0).any() and not torch.equal(full["median_mad"], torch.ones(B, dtype=torch.float64))
    assert full["top_threshold"].sum() > full["top_random"].sum()  # ties at the threshold


# Ranks pad to their own longest response, and a rank may hold only empty responses ([k, 0]). The
# random tie-break once drew its permutation over padding too (other tokens than one process chose),
# topq_threshold gave +inf on a [k, 0] rank, and loss_denominators raised on a rank without
# micro-batches, leaving the other ranks waiting in the collective.


def ragged_batch():
    mask, scores, _, _, adv, dep, _ = global_batch()
    mask = mask.clone()
    mask[BOUNDS[1] :] = False  # rank 1's responses are all empty
    mask[:, -2:] = False  # rank 0 pads to fewer columns than the global batch
    return mask, torch.where(mask, scores, 0.0), adv, dep


def ragged_compute(mask, scores, adv, dep, *, group=None, micro_batches=None):
    return {
        "top_random": topq_mask(
            scores, mask, q=0.3, scope="batch", tie_break="random",
            generator=torch.Generator().manual_seed(5), process_group=group,
        ),
        "threshold": topq_threshold(scores, mask, q=0.3, scope="batch", process_group=group),
        "tor": Fm.tor_rollout(
            adv, scores, dep, mask, generator=torch.Generator().manual_seed(7), process_group=group
        ).token_mask,
        "num_tokens": loss_denominators(
            [mask[mb] for mb in micro_batches], process_group=group, gradient_reduction="sum"
        ).num_tokens,
    }  # fmt: skip


def _ragged_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        mask, scores, adv, dep = (t[BOUNDS[rank] : BOUNDS[rank + 1]] for t in ragged_batch())
        width = int(torch.where(mask, torch.arange(T) + 1, 0).amax()) if mask.any() else 0
        micro = [slice(0, 4), slice(4, None)] if mask.any() else []  # rank 1: no micro-batch at all
        out = ragged_compute(
            mask[:, :width], scores[:, :width], adv, dep[:, :width], group="world", micro_batches=micro
        )
        out["width"] = width
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ranks_padded_to_their_own_length_match_one_process(tmp_path):
    mp.spawn(_ragged_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    full = ragged_compute(*ragged_batch(), micro_batches=[slice(None)])
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert shards[0]["width"] < T and shards[1]["width"] == 0
    for key in ("top_random", "tor"):
        got = torch.zeros(B, T, dtype=full[key].dtype)
        for r, s in enumerate(shards):
            got[BOUNDS[r] : BOUNDS[r + 1], : s["width"]] = s[key]
        assert torch.equal(got, full[key]), key
    torch.testing.assert_close(torch.cat([s["threshold"] for s in shards]), full["threshold"], rtol=0, atol=0)
    assert torch.isfinite(full["threshold"]).all()
    assert all(s["num_tokens"] == full["num_tokens"] for s in shards)


# Ranks may hold different float dtypes: a bf16 batch on one, an empty float32 shard on another
# (torch.zeros(0, T)). Collectives of the rank's own dtype then sent different byte counts, and gloo
# aborted ("Received data size doesn't match") or a rank read garbage.


def mixed_compute(mask, scores, values, groups, *, group=None):
    valid = mask.any(-1)
    return {
        "entropy_mask": high_entropy_mask(scores, mask, rho=0.3, process_group=group),
        "entropy_threshold": high_entropy_threshold(scores, mask, rho=0.3, process_group=group).float(),
        "top": topq_mask(scores, mask, q=0.3, scope="batch", process_group=group),
        "minmax": minmax_normalise(values, valid, process_group=group).float(),
        "factors": V.advantage_factors(scores, mask, group_ids=groups, process_group=group).float(),
    }


def _mixed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        mask, scores, values, groups, *_ = global_batch()
        if rank == 0:  # the whole batch, in bf16
            out = mixed_compute(mask, scores.bfloat16(), values.bfloat16(), groups, group="world")
        else:  # nothing, in float32
            empty = torch.zeros(0, T)
            out = mixed_compute(empty > 0, empty, torch.zeros(0), groups[:0], group="world")
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ranks_with_different_float_dtypes_match_one_process(tmp_path):
    mp.spawn(_mixed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    mask, scores, values, groups, *_ = global_batch()
    full = mixed_compute(mask, scores.bfloat16(), values.bfloat16(), groups)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, expected in full.items():
        if key == "entropy_threshold":  # one global value, on every rank
            assert torch.equal(shards[0][key], expected) and torch.equal(shards[1][key], expected), key
        else:
            assert torch.equal(shards[0][key], expected) and shards[1][key].shape[0] == 0, key
