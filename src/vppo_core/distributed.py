"""Batch-level statistics over the global batch: ranks of a process group and gradient-accumulation steps.

A loss is only data-parallel-correct if every batch-level statistic (a token count, a min/max, a mean,
a quantile) is computed over the global batch rather than over the rank's shard. The helpers here
do that with ``torch.distributed`` collectives (any backend: gloo on CPU, NCCL on GPU). They are
opt-in: nothing in vppo_core communicates unless you pass a ``process_group``.

Collectives synchronise the ranks, and the few helpers that gather variable-sized shards read the
shard sizes on the host; both happen once per rollout or optimisation batch, not per token.
"""

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from jaxtyping import Shaped
from torch import Tensor

from ._checks import as_bool_mask, check_choice

__all__ = ["LossDenominators", "ProcessGroupLike", "loss_denominators"]

ProcessGroupLike = getattr(dist, "ProcessGroup", object) | Literal["world"] | None
"""A process group, ``"world"`` for the default group, or ``None`` for no communication."""


def resolve_group(process_group: ProcessGroupLike) -> dist.ProcessGroup | None:
    if process_group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"process_group={process_group!r} needs torch.distributed to be initialised "
            "(call torch.distributed.init_process_group first), or pass process_group=None"
        )
    if isinstance(process_group, str):
        check_choice("process_group", process_group, ("world",))
        return dist.group.WORLD
    return process_group


def _wire(t: Tensor) -> Tensor:
    """A copy of ``t`` for a collective: floating point in float64, so that ranks holding different
    float dtypes (a bf16 batch here, a float32 empty shard there) send the same number of bytes."""
    return t.to(torch.float64, copy=True) if t.is_floating_point() else t.clone()


def all_reduce(t: Tensor, op: "dist.ReduceOp.RedOpType", group: dist.ProcessGroup | None) -> Tensor:
    """All-reduce a copy of ``t`` (the argument is left untouched; floats travel in float64 and come
    back in ``t``'s dtype); identity without a group."""
    if group is None:
        return t
    out = _wire(t)
    dist.all_reduce(out, op=op, group=group)
    return out.to(t.dtype)


def all_reduce_min_max(lo: Tensor, hi: Tensor, group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """Elementwise minimum of ``lo`` and maximum of ``hi`` over the ranks, NaN propagating.

    ``ReduceOp.MIN``/``MAX`` (gloo, NCCL) may drop a NaN, depending on which rank holds it, so a
    0/1 flag "this rank's entry is NaN" is reduced alongside and flagged entries are set to NaN:
    every rank gets what ``amin``/``amax`` give on the concatenated batch. One ``MAX`` collective
    (the minimum as the maximum of ``-lo``; negation is exact), no host sync. The arguments are
    left untouched; identity without a group.
    """
    if group is None:
        return lo, hi
    assert lo.dtype == hi.dtype and lo.is_floating_point(), (lo.dtype, hi.dtype)
    n, m = lo.numel(), hi.numel()
    flat_lo, flat_hi = lo.reshape(-1), hi.reshape(-1)
    flags = (flat_lo.isnan().to(lo.dtype), flat_hi.isnan().to(hi.dtype))
    packed = torch.cat([-flat_lo, flat_hi, *flags]).to(torch.float64)  # a fresh tensor, in float64 as `_wire`
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    neg_lo, hi_out, lo_nan, hi_nan = packed.split([n, m, n, m])
    lo_out = torch.where(lo_nan > 0, float("nan"), -neg_lo).to(lo.dtype)
    hi_out = torch.where(hi_nan > 0, float("nan"), hi_out).to(hi.dtype)
    return lo_out.reshape(lo.shape), hi_out.reshape(hi.shape)


def all_gather_rows(t: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, int]:
    """Concatenate every rank's ``t`` along dim 0 (shards may differ in size).

    Returns the global tensor (in ``t``'s dtype; floats travel in float64, so ranks may hold
    different float dtypes) and the offset of this rank's rows in it. Reads the shard sizes on the
    host (one small collective).
    """
    world = dist.get_world_size(group)
    size = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in torch.cat(sizes).tolist()]
    biggest = max(counts)
    wire = _wire(t[:0])
    padded = wire.new_zeros((biggest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    offset = sum(counts[:rank])
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(t.dtype), offset


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """The device for the counts of a rank that holds no mask to take it from.

    ``get_backend`` names one backend (``"gloo"``, ``"nccl"``) or one per device
    (``"cpu:gloo,cuda:nccl"``): the host for host-only backends (gloo, MPI), else the current
    accelerator (CUDA for NCCL), else the host.
    """
    names = {part.rsplit(":", 1)[-1].strip() for part in str(dist.get_backend(group)).lower().split(",")}
    if names <= {"gloo", "mpi"}:
        return torch.device("cpu")
    if "nccl" in names and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: XPU, NPU, ...
    if accelerator is not None and accelerator.is_available():
        kind, index = accelerator.current_accelerator().type, getattr(accelerator, "current_device_index", None)
        return torch.device(kind, index()) if index is not None else torch.device(kind)
    return torch.device("cpu")


class LossDenominators(NamedTuple):
    """Global counts to pass to `vppo_core.vppo_loss` / `vppo_core.aggregate`.

    Each is a 0-d float tensor, already divided by the world size when gradients are averaged over
    ranks (see `loss_denominators`).
    """

    num_tokens: Tensor
    """Valid response tokens: ``num_tokens`` for ``denominator="valid"`` (1 if there are none)."""
    num_kept_tokens: Tensor
    """Kept valid tokens (``token_mask``): ``num_tokens`` for ``denominator="kept"``. For a float
    ``token_mask`` (token weights), the sum of the weights over valid tokens, as ``aggregate`` divides by."""
    num_sequences: Tensor
    """Sequences with at least one valid token: ``num_sequences`` for the ``seq-mean-*`` modes."""


def loss_denominators(
    response_mask: Shaped[Tensor, "batch seq"] | Sequence[Shaped[Tensor, "batch seq"]],
    token_mask: Shaped[Tensor, "batch seq"] | Sequence[Shaped[Tensor, "batch seq"]] | None = None,
    *,
    process_group: ProcessGroupLike = None,
    gradient_reduction: Literal["mean", "sum"] = "mean",
) -> LossDenominators:
    r"""Global loss denominators over gradient-accumulation micro-batches and data-parallel ranks.

    With these counts, every micro-batch's loss is its share of one global mean, so the summed
    gradient equals that of a single process holding the whole batch, however the batch is split:

    $$
    \nabla \frac{\sum_{\text{all tokens}} \ell_t}{N_{global}}
      = \sum_{\text{ranks}} \sum_{\text{micro-batches}} \nabla \frac{\sum_{\text{local}} \ell_t}{N_{global}} .
    $$

    DDP and FSDP *average* gradients over ranks; with ``gradient_reduction="mean"`` (the default)
    the counts are divided by the world size to undo that average. Use ``"sum"`` if your setup sums
    gradients (or for a single process). The VPPO-RL code achieves the same by multiplying each
    micro-batch loss by ``sum(mask) * world_size / global_tokens``.

    Shapes:
        - ``response_mask``, ``token_mask``: ``[batch, seq]``, or a sequence of them (the rank's
          micro-batches of one optimisation step)

    Args:
        response_mask: This rank's valid tokens for the whole optimisation step. With a
            ``process_group``, a rank without micro-batches may pass an empty sequence (it counts
            0 and still joins the collective: a rank that raised would leave the others waiting);
            its counts go on the host for a gloo/MPI group, else on the current accelerator (CUDA
            for NCCL). Where the other ranks hold their masks elsewhere, pass an empty
            ``[0, seq]`` mask on their device instead.
        token_mask: This rank's kept tokens (TGF), for ``num_kept_tokens``; ``None`` counts all valid.
            Float (or integer) token weights are summed over the valid tokens instead of counted.
        process_group: Group to sum over (``"world"`` for the default group); ``None`` for no
            communication.
        gradient_reduction: ``"mean"`` if the data-parallel wrapper averages gradients over ranks
            (DDP, FSDP), ``"sum"`` if it sums them.

    Returns:
        [`LossDenominators`][vppo_core.distributed.LossDenominators] of 0-d float32 tensors.

    Raises:
        ValueError: If ``process_group`` is given but torch.distributed is not initialised,
            ``gradient_reduction`` is unknown, a mask is not ``[batch, seq]``, or a ``token_mask``
            differs in shape from its ``response_mask``.

    Example:
        >>> import torch
        >>> from vppo_core.distributed import loss_denominators
        >>> mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
        >>> loss_denominators([mask[:2], mask[2:]], gradient_reduction="sum")
        LossDenominators(num_tokens=tensor(5.), num_kept_tokens=tensor(5.), num_sequences=tensor(2.))
    """
    check_choice("gradient_reduction", gradient_reduction, ("mean", "sum"))
    group = resolve_group(process_group)
    masks = [response_mask] if isinstance(response_mask, Tensor) else list(response_mask)
    if token_mask is None:
        keeps = [None] * len(masks)
    else:
        keeps = [token_mask] if isinstance(token_mask, Tensor) else list(token_mask)
        if len(keeps) != len(masks):
            raise ValueError(
                f"token_mask must have one tensor per response_mask micro-batch ({len(masks)}), got {len(keeps)}"
            )
    if not masks and group is None:
        raise ValueError("response_mask must hold at least one micro-batch, got an empty sequence")
    single = isinstance(response_mask, Tensor)
    for i, (mask, keep) in enumerate(zip(masks, keeps)):
        at = "" if single else f"[{i}]"
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            got = f"shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"response_mask{at} must be a [batch, seq] tensor, got {got}")
        if keep is not None and (not isinstance(keep, Tensor) or keep.shape != mask.shape):
            got = f"shape {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
            raise ValueError(f"token_mask{at} must have response_mask{at}'s shape {tuple(mask.shape)}, got {got}")
    counts = torch.zeros(3, dtype=torch.float32, device=masks[0].device if masks else _group_device(group))
    for mask, keep in zip(masks, keeps):
        valid = as_bool_mask(mask)
        if keep is None:
            kept = valid.sum()
        elif keep.dtype == torch.bool:
            kept = (valid & keep).sum()
        else:  # token weights (ToR's): aggregate's "kept" denominator is their sum over valid tokens
            kept = torch.where(valid, keep.to(counts.dtype), 0.0).sum()
        counts = counts + torch.stack([valid.sum(), kept, valid.any(-1).sum()]).to(counts.dtype)
    counts = all_reduce(counts, dist.ReduceOp.SUM, group)
    counts = torch.where(counts > 0, counts, 1.0)  # an empty global batch gives loss 0, not 0/0
    if group is not None and gradient_reduction == "mean":
        counts = counts / dist.get_world_size(group)
    return LossDenominators(num_tokens=counts[0], num_kept_tokens=counts[1], num_sequences=counts[2])
