"""Data-parallel correctness: per-rank results with a gloo process group equal one process on the whole batch."""

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vppo_core as V
from vppo_core.analysis import DependencyAccumulator
from vppo_core.distributed import loss_denominators
from vppo_core.factors import minmax_normalise

from .helpers import gloo_group

B, T, H, VOCAB = 13, 7, 5, 11


def global_batch():
    """The same global batch in every process."""
    g = torch.Generator().manual_seed(1234)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[5:8] = False  # with the split below, rank 1 of 3 holds no valid token at all
    dep = torch.rand(B, T, generator=g, dtype=torch.float64) ** 3
    groups = torch.arange(B) // 4  # groups of 4 straddle the rank boundaries
    x = torch.randn(B, T, H, generator=g)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    return mask, dep, groups, x, tokens, rewards


def splits(world: int) -> list[slice]:
    bounds = {2: [0, 9, 13], 3: [0, 5, 8, 13]}[world]  # uneven shards
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def model_logprobs(model: torch.nn.Linear, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(x), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def compute(mask, dep, groups, x, tokens, rewards, *, group=None, micro_batches=1, reduction="sum", micro_ids=None):
    """One VPPO step's factors, loss and model gradient, on this process's shard."""
    factors = V.advantage_factors(dep, mask, process_group=group)
    factors_grouped = V.advantage_factors(dep, mask, group_ids=groups, beta_min=0.8, process_group=group)
    # the VPPO-RL code's rule: min/max over the (global) batch, the mean per rank-local micro-batch
    micro_ids = torch.arange(mask.shape[0]) // 2 if micro_ids is None else micro_ids
    factors_micro = V.advantage_factors(dep, mask, micro_batch_ids=micro_ids, process_group=group)
    factors_micro_grouped = V.advantage_factors(
        dep, mask, group_ids=groups, micro_batch_ids=micro_ids, process_group=group
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(H, VOCAB).double()
    with torch.no_grad():
        old = model_logprobs(model, x.double(), tokens) - 0.1
    adv = rewards.double() - 0.5
    shaped = V.shape_advantages(adv, dep, mask, process_group=group)
    keep = V.token_filter_mask(dep, mask, k=0.4)
    n = mask.shape[0]  # the rank's batch whole, or in micro-batches of 2 trajectories
    chunks = [slice(i, i + 2) for i in range(0, n, 2)] if micro_batches > 1 else [slice(0, n)]
    den = loss_denominators([mask[c] for c in chunks], process_group=group, gradient_reduction=reduction)
    total = torch.zeros((), dtype=torch.float64)
    for c in chunks:
        lp = model_logprobs(model, x[c].double(), tokens[c])
        out = V.vppo_loss(lp, old[c], shaped[c], mask[c], keep[c], entropy_coef=0.06, num_tokens=den.num_tokens)
        out.loss.backward()
        total = total + out.loss.detach()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return {
        "factors": factors,
        "factors_grouped": factors_grouped,
        "factors_micro": factors_micro,
        "factors_micro_grouped": factors_micro_grouped,
        "loss": total,
        "grad": grads,
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        sl = splits(world)[rank]
        shard = [t[sl] for t in global_batch()]
        results = {
            "sum": compute(*shard, group="world", micro_batches=2, reduction="sum"),
            "mean": compute(*shard, group=dist.group.WORLD, reduction="mean"),
        }
        for key in ("sum", "mean"):  # what DDP would do with the gradients
            summed = results[key]["grad"].clone()
            dist.all_reduce(summed)
            results[key]["grad_reduced"] = summed if key == "sum" else summed / world
            loss = results[key]["loss"].clone()
            dist.all_reduce(loss)
            results[key]["loss_reduced"] = loss if key == "sum" else loss / world
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    # one process: each rank's micro-batches of 2 under ids of their own
    micro_ids = torch.cat([r * 100 + torch.arange(sl.stop - sl.start) // 2 for r, sl in enumerate(splits(world))])
    full = compute(*global_batch(), micro_ids=micro_ids)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for key in ("sum", "mean"):
        for name in ("factors", "factors_grouped", "factors_micro", "factors_micro_grouped"):
            got = torch.cat([r[key][name] for r in per_rank])
            torch.testing.assert_close(got, full[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        for r in per_rank:
            torch.testing.assert_close(r[key]["grad_reduced"], full["grad"], rtol=0, atol=1e-6)
            torch.testing.assert_close(r[key]["loss_reduced"], full["loss"], rtol=0, atol=1e-6)
    # the split really does exercise the edge cases
    if world == 3:
        assert not global_batch()[0][splits(3)[1]].any()
    assert (full["factors"] != 1).any() and (full["factors_grouped"] != 1).any()
    assert not torch.allclose(full["factors_micro"], full["factors"])  # the micro-batch mean changes them


NAN_SPLIT = [slice(0, 3), slice(3, 6)]


def nan_batch(holder: int):
    """A global batch of 6 with NaN at a valid entry of rank ``holder``'s rows (ranks split 3 + 3).

    Both ranks also hold a NaN where it is never read (an invalid response, a padded token).
    """
    other = NAN_SPLIT[1 - holder].start
    at = NAN_SPLIT[holder].start + 1
    values = torch.tensor([2.0, 3.0, 0.5, 1.0, 4.0, 2.5], dtype=torch.float64)
    valid = torch.ones(6, dtype=torch.bool)
    values[at], values[other], valid[other] = float("nan"), float("nan"), False
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:, 3] = False
    dep = torch.linspace(0.1, 2.0, 24, dtype=torch.float64).reshape(6, 4)
    dep[at, 1], dep[other, 3] = float("nan"), float("nan")
    # +inf and -inf in one trajectory: its mean is NaN though no token is
    inf_dep = dep.nan_to_num(0.5)
    inf_dep[at, 0], inf_dep[at, 1] = float("inf"), float("-inf")
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # rank 0's NaN row is in group 0, rank 1's in group 2
    return values, valid, dep, mask, inf_dep, groups


def nan_compute(values, valid, dep, mask, inf_dep, groups, *, group=None, micro_ids=None):
    micro_ids = torch.arange(values.shape[0]) // 2 if micro_ids is None else micro_ids
    acc = DependencyAccumulator()
    acc.update(inf_dep, mask)
    traj = acc.summary(process_group=group)
    return {
        "minmax": minmax_normalise(values, valid, process_group=group),
        "minmax_groups": minmax_normalise(values, valid, group_ids=groups, process_group=group),
        "factors": V.advantage_factors(dep, mask, process_group=group),
        "factors_beta_max": V.advantage_factors(dep, mask, beta_min=0.8, beta_max=1.2, process_group=group),
        "factors_micro": V.advantage_factors(dep, mask, micro_batch_ids=micro_ids, process_group=group),
        "factors_grouped": V.advantage_factors(dep, mask, group_ids=groups, process_group=group),
        "shaped": V.shape_advantages(values.nan_to_num(1.0), dep, mask, beta_max=1.5, process_group=group),
        "traj_min_max": torch.tensor([traj["dependency/trajectory/min"], traj["dependency/trajectory/max"]]),
    }


def _nan_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        out = {}
        for holder in range(world):
            shard = [t[NAN_SPLIT[rank]] for t in nan_batch(holder)]
            out[holder] = nan_compute(*shard, group="world")
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_nan_on_any_rank_gives_the_single_process_result(tmp_path):
    """ReduceOp.MIN/MAX may drop a NaN depending on the rank holding it: every rank must still get NaN."""
    mp.spawn(_nan_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    micro_ids = torch.cat([r * 100 + torch.arange(3) // 2 for r in range(2)])
    wrong = []
    for holder in range(2):
        full = nan_compute(*nan_batch(holder), micro_ids=micro_ids)
        for name, expected in full.items():
            if name == "traj_min_max":  # the summary is every rank's
                got_all = [r[holder][name] for r in per_rank]
            else:
                got_all = [torch.cat([r[holder][name] for r in per_rank])]
            for got in got_all:
                if not torch.allclose(got, expected, rtol=0, atol=1e-12, equal_nan=True):
                    wrong.append(f"NaN on rank {holder}, {name}: {got.tolist()} != {expected.tolist()}")
        # one process: NaN for every valid row of the affected batch (or group), and only there
        valid = nan_batch(holder)[1]
        assert full["minmax"][valid].isnan().all() and (full["minmax"][~valid] == 0).all()
        nan_group = full["minmax_groups"].isnan()
        assert nan_group.any() and not nan_group.all()
        for name in ("factors", "factors_beta_max", "factors_micro", "shaped", "traj_min_max"):
            assert full[name].isnan().all(), name
        assert full["factors_grouped"].isnan().sum() == 2
    assert not wrong, "\n".join(wrong)


def test_loss_denominators_single_process():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    keep = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    den = loss_denominators(mask, keep)
    assert (den.num_tokens.item(), den.num_kept_tokens.item(), den.num_sequences.item()) == (5, 3, 2)
    split = loss_denominators([mask[:1], mask[1:]], [keep[:1], keep[1:]])
    assert split == den or all(torch.equal(a, b) for a, b in zip(split, den))
    empty = loss_denominators(torch.zeros(2, 3, dtype=torch.bool))
    assert empty.num_tokens == 1  # an empty batch gives loss 0, not 0/0


def test_loss_denominators_with_token_weights_split_like_one_batch():
    # float token weights (ToR's) with denominator="kept": aggregate divides by their sum over valid
    # tokens, so the global count must be that sum, or micro-batches would not add up to one batch
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, generator=g) < 0.7
    weights = torch.rand(6, 5, generator=g, dtype=torch.float64) * (torch.rand(6, 5, generator=g) < 0.6)
    weights[~mask] = 3.0  # padding's weight is never read
    values = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    whole = V.aggregate(values, mask, weights, denominator="kept")
    (grad_whole,) = torch.autograd.grad(whole, values)
    den = loss_denominators([mask[:2], mask[2:]], [weights[:2], weights[2:]], gradient_reduction="sum")
    torch.testing.assert_close(den.num_kept_tokens.double(), weights[mask].sum(), rtol=1e-6, atol=0)
    parts = sum(
        V.aggregate(values[c], mask[c], weights[c], denominator="kept", num_tokens=den.num_kept_tokens)
        for c in (slice(0, 2), slice(2, 6))
    )
    (grad_parts,) = torch.autograd.grad(parts, values)
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_parts, grad_whole, rtol=1e-6, atol=0)


def test_loss_denominators_shape_errors():
    # a [1, seq] token mask was broadcast over the batch, and a 1-D mask counted as one sequence
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"token_mask must have response_mask's shape \(2, 3\), got shape \(1, 3\)"):
        loss_denominators(mask, mask[:1])
    with pytest.raises(ValueError, match=r"response_mask\[1\] must be a \[batch, seq\] tensor, got shape \(3,\)"):
        loss_denominators([mask, mask[0]])
    with pytest.raises(ValueError, match=r"token_mask\[0\] must have response_mask\[0\]'s shape \(2, 3\), got list"):
        loss_denominators([mask], [[1, 0, 1]])


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo", "cpu:gloo,cuda:gloo", "mpi", "cpu:gloo,cuda:nccl", "hccl"])
def test_empty_rank_counts_go_where_the_backend_reduces(backend, monkeypatch):
    # get_backend names one backend or one per device ("cpu:gloo"); an exact match on "gloo" refused
    # an ordinary gloo group, so the rank without micro-batches raised and left the others waiting
    from vppo_core import distributed

    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: backend)
    device = distributed._group_device(None)
    host_only = backend in ("gloo", "cpu:gloo", "cpu:gloo,cuda:gloo", "mpi")
    accelerator = torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())
    if host_only or not accelerator:  # on a machine without an accelerator, every backend reduces on the host
        assert device == torch.device("cpu")
    else:
        assert device.type != "cpu"


def test_process_group_errors():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        loss_denominators(mask, process_group="world")
    with pytest.raises(ValueError, match=r"needs torch\.distributed to be initialised"):
        V.advantage_factors(torch.rand(2, 3), mask, process_group="world")
    with pytest.raises(ValueError, match=r"token_mask must have one tensor per response_mask micro-batch \(2\), got 1"):
        loss_denominators([mask, mask], [mask])
    with pytest.raises(ValueError, match="gradient_reduction must be one of"):
        loss_denominators(mask, gradient_reduction="avg")
