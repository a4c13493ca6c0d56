"""Group-relative advantages and VPPO's Trajectory-level Advantage Shaping (TAS)."""

from typing import Literal

import torch
import torch.distributed as dist
from jaxtyping import Bool, Float, Integer, Real, Shaped
from torch import Tensor

from ._checks import (
    as_bool_mask,
    check_choice,
    check_number,
    check_same_device,
    host_checks_allowed,
    result_dtype,
    typechecked,
)
from ._segments import broadcast, dense_ids, segment_amax, segment_amin, segment_sum
from .distributed import ProcessGroupLike, all_gather_rows, all_reduce, all_reduce_min_max, resolve_group

__all__ = ["advantage_factors", "grpo_advantages", "shape_advantages", "trajectory_dependency"]

# Below this score range the batch (or group) counts as "all equal" and every factor is 1,
# as in the VPPO-RL code.
TAS_MIN_RANGE = 1e-6


@typechecked
def grpo_advantages(
    rewards: Real[Tensor, " batch"] | Bool[Tensor, " batch"],
    group_ids: Integer[Tensor, " batch"],
    *,
    eps: float = 1e-6,
    scale: Literal["std", "none"] = "std",
    process_group: ProcessGroupLike = None,
) -> Float[Tensor, " batch"]:
    r"""Group-relative outcome advantage of GRPO (or Dr.GRPO with ``scale="none"``).

    For response $i$ in group $g(i)$ (the responses sampled for one prompt),

    $$
    \hat A_i = \frac{R_i - \operatorname{mean}_{g(i)} R}{\operatorname{std}_{g(i)} R + \epsilon}
    \quad(\texttt{scale="std"}), \qquad
    \hat A_i = R_i - \operatorname{mean}_{g(i)} R \quad(\texttt{scale="none"}),
    $$

    with the unbiased standard deviation, as in the GRPO reference code (Shao et al., 2024,
    arXiv:2402.03300) and VPPO-RL; ``scale="none"`` is Dr.GRPO (Liu et al., 2025, arXiv:2503.20783).
    Vectorised over the batch (no Python loop, no ``torch.unique``), no host sync on accelerators.

    A group whose rewards are all equal gets advantage exactly 0 (whatever the rewards' rounding in
    the mean). A NaN reward makes its whole group NaN.
    A group of one member has no spread to compare with: on CPU tensors it raises ``ValueError``;
    on an accelerator that check would need a host sync, so it is skipped and the group's advantage
    is NaN with ``scale="std"`` (0/0) and 0 with ``scale="none"``.

    With ``process_group``, every rank's rewards and ids are gathered (one small collective; the
    shard sizes are read on the host), so that a prompt whose responses sit on several ranks is
    one group; each rank gets its own rows. Without it, keep each group on one rank.

    Shapes:
        - ``rewards``, ``group_ids``: ``[batch]``
        - returns: ``[batch]``

    Args:
        rewards: One scalar reward per response (float, int or bool).
        group_ids: Any integers; responses with equal ids form a group (need not be contiguous).
        eps: Added to the standard deviation.
        scale: ``"std"`` (GRPO) or ``"none"`` (Dr.GRPO).
        process_group: Groups over the ranks of this process group (``"world"``: the default group;
            group ids must be globally consistent); ``None``: this process's batch only.

    Returns:
        Advantages, float32 (float64 for float64 rewards).

    Raises:
        ValueError: On a group of one member (CPU inputs; over the global batch with
            ``process_group``), ``eps < 0``, or ``process_group`` without ``torch.distributed``.
        TypeError: On an unknown ``scale``, or a shape or dtype that does not match the annotation
            (jaxtyping).

    Example:
        >>> import torch
        >>> from vppo_core import grpo_advantages
        >>> grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([7, 7, 3, 3]))
        tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    check_choice("scale", scale, ("std", "none"))
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    check_same_device(rewards=rewards, group_ids=group_ids)
    r = rewards.to(result_dtype(rewards))
    group = resolve_group(process_group)
    if group is not None:  # the global batch; this rank's rows of its advantages
        everything, offset = all_gather_rows(r, group)
        ids, _ = all_gather_rows(group_ids.long(), group)
        return grpo_advantages(everything, ids, eps=eps, scale=scale)[offset : offset + r.shape[0]]
    n = r.shape[0]
    seg = dense_ids(group_ids)
    count = segment_sum(torch.ones_like(r), seg)
    if host_checks_allowed(count) and n > 0 and bool((count[seg] == 1).any()):
        singles = group_ids[(count[seg] == 1)].tolist()
        raise ValueError(
            "every group in group_ids needs at least 2 responses to compare, got groups of one member: "
            f"{singles[:8]}{' ...' if len(singles) > 8 else ''}; sample G >= 2 responses per prompt"
        )
    mean = segment_sum(r, seg) / count.clamp_min(1)
    # exactly 0 for a group of equal rewards: a mean summed in float32 is off by a few ulps for
    # rewards such as 0.1 or 0.9, and dividing that by std + eps (std ~ 0) made it a large advantage
    equal = segment_amin(r, seg) == segment_amax(r, seg)  # False for a group with a NaN reward
    centred = torch.where(equal[seg], 0.0, r - mean[seg])
    if scale == "none":
        return centred
    var = segment_sum(centred.square(), seg) / (count - 1)
    return centred / (var.sqrt()[seg] + eps)


@typechecked
def trajectory_dependency(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
) -> Float[Tensor, " batch"]:
    r"""Mean token dependency of each trajectory over its valid tokens (0 for a trajectory with none).

    $$\bar S(\tau_i) = \frac{1}{|o_i|}\sum_{t \in o_i} S_t.$$

    Padded positions are never read into the mean (NaN there does not leak); NaN at a valid
    position gives NaN.

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch]``

    Example:
        >>> import torch
        >>> from vppo_core import trajectory_dependency
        >>> dep = torch.tensor([[1.0, 3.0, 9.0], [0.5, 0.0, 0.0]])
        >>> mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
        >>> trajectory_dependency(dep, mask)
        tensor([2., 0.])
    """
    check_same_device(dependency=dependency, response_mask=response_mask)
    mask = as_bool_mask(response_mask)
    dep = dependency.to(result_dtype(dependency))
    total = torch.where(mask, dep, 0.0).sum(-1)
    return total / mask.sum(-1).clamp_min(1).to(dep.dtype)


def _check_betas(beta_min: float, beta_max: float | None) -> None:
    check_number("beta_min", beta_min)
    if beta_max is not None:
        check_number("beta_max", beta_max)
    if not beta_min > 0:
        raise ValueError(f"beta_min must be > 0 (factors must keep the advantage's sign), got {beta_min!r}")
    if beta_max is None and not beta_min <= 1:
        raise ValueError(f"beta_min must be <= 1 with beta_max=None (the factors average to 1), got {beta_min!r}")
    if beta_max is not None and not beta_max >= beta_min:
        raise ValueError(
            f"beta_max must be >= beta_min (= {beta_min!r}), or None for the mean-preserving rule; got {beta_max!r}"
        )


@typechecked
def advantage_factors(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    beta_min: float = 0.9,
    beta_max: float | None = None,
    group_ids: Integer[Tensor, " batch"] | None = None,
    micro_batch_ids: Integer[Tensor, " batch"] | None = None,
    process_group: ProcessGroupLike = None,
) -> Float[Tensor, " batch"]:
    r"""TAS factors: each trajectory's mean dependency min-max normalised and mapped to $[\beta_{min}, \beta_{max}]$.

    With $\bar S_i$ from [`trajectory_dependency`][vppo_core.trajectory_dependency] and the minimum and maximum
    taken over the valid trajectories of the batch (or of each group when ``group_ids`` is given),

    $$
    n_i = \frac{\bar S_i - \min \bar S}{\max \bar S - \min \bar S}, \qquad
    \alpha_i = \beta_{min} + (\beta_{max} - \beta_{min})\, n_i .
    $$

    This is VPPO's Eq. 5 (arXiv:2510.09285). ``beta_max=None`` is the VPPO-RL code's dynamic,
    mean-preserving rule $\beta_{max} = \beta_{min} + (1 - \beta_{min}) / \operatorname{mean}(n)$,
    under which the factors of the valid trajectories average to exactly 1 (TAS only redistributes
    advantage). The code adds $10^{-8}$ to the mean; it is not needed here because
    $\operatorname{mean}(n) \ge 1/n_{valid} > 0$ whenever the range is positive.

    The VPPO-RL code takes the minimum and maximum over the per-device mini-batch but the mean
    $\mu = \operatorname{mean}(n)$ over each **micro-batch**, so its factors average to 1 per
    micro-batch, not over the mini-batch. Pass ``micro_batch_ids`` (one id per trajectory, e.g.
    ``torch.arange(batch) // micro_batch_size``) to reproduce that: the minimum, maximum and the
    "fewer than two valid / range $\le 10^{-6}$" test stay over the batch (or group), and $\mu$ is
    taken over the valid trajectories sharing both the group and the micro-batch id. A micro-batch
    whose valid trajectories all sit at the minimum ($\mu = 0$) gets $\beta_{min}$, as in the code.

    Factor 1 is given to trajectories with no valid token, and to every trajectory of a batch (or
    group) with fewer than two valid trajectories or a score range $\le 10^{-6}$. Factors are always
    $\ge \beta_{min} > 0$, so shaping never flips an advantage's sign. The dependency is detached
    (factors carry no gradient). NaN in a valid token's dependency makes its batch's (or group's)
    factors NaN.

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - ``group_ids``: ``[batch]``
        - returns: ``[batch]``

    Args:
        dependency: Token visual dependency, e.g. from [`visual_dependency`][vppo_core.visual_dependency].
        response_mask: Valid response tokens.
        beta_min: Smallest factor, $> 0$ (paper: 0.9).
        beta_max: Largest factor ($\ge$ ``beta_min``), or ``None`` for the mean-preserving rule.
        group_ids: Normalise within each group instead of over the whole batch.
        micro_batch_ids: Take the mean-preserving rule's $\mu$ per micro-batch (the VPPO-RL code)
            instead of over the batch; only with ``beta_max=None``. Micro-batches are this
            process's own: with ``process_group`` their $\mu$ is never all-reduced.
        process_group: Compute the statistics over the global batch of this process group
            (``"world"`` for the default group): the min, max, count and mean are all-reduced, and
            with ``group_ids`` every rank's trajectories are gathered so that groups split across
            ranks are handled (group ids must then be the same on every rank for one prompt). The
            factors equal those of one process holding the concatenated batch. ``None``: this
            process's batch only, no communication.

    Returns:
        One factor per trajectory, float32 (float64 for float64 dependency).

    Raises:
        ValueError: If ``beta_min <= 0``, ``beta_max < beta_min``, ``beta_min > 1`` with
            ``beta_max=None``, or ``micro_batch_ids`` with a ``beta_max``.

    Example:
        >>> import torch
        >>> from vppo_core import advantage_factors
        >>> dep = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0], [2.0, 2.0]])
        >>> mask = torch.ones(4, 2, dtype=torch.bool)
        >>> advantage_factors(dep, mask, beta_min=0.8, beta_max=1.2)
        tensor([0.8000, 0.9333, 1.2000, 1.0667])
        >>> advantage_factors(dep, mask).mean()
        tensor(1.)
        >>> f = advantage_factors(dep, mask, micro_batch_ids=torch.tensor([0, 0, 1, 1]))
        >>> f[:2].mean(), f[2:].mean()  # the VPPO-RL code: mean 1 per micro-batch of 2
        (tensor(1.), tensor(1.))
    """
    _check_betas(beta_min, beta_max)
    if micro_batch_ids is not None and beta_max is not None:
        raise ValueError(
            f"micro_batch_ids only applies to the mean-preserving rule (beta_max=None), got beta_max={beta_max!r}"
        )
    check_same_device(
        dependency=dependency, response_mask=response_mask, group_ids=group_ids, micro_batch_ids=micro_batch_ids
    )
    group = resolve_group(process_group)
    mask = as_bool_mask(response_mask)
    score = trajectory_dependency(dependency.detach(), mask)
    valid = mask.any(-1)
    if group is not None and group_ids is not None:
        # Groups may be split across ranks: gather every rank's trajectories, compute the factors of
        # the global batch, keep this rank's rows.
        all_rows, offset = all_gather_rows(torch.stack([score, valid.to(score.dtype)], dim=-1), group)
        all_ids, _ = all_gather_rows(group_ids.long(), group)
        all_micro = None
        if micro_batch_ids is not None:
            # (rank, micro-batch id): one rank's micro-batch 0 is not another's
            rank = torch.full_like(micro_batch_ids, dist.get_rank(group), dtype=torch.long)
            pairs, _ = all_gather_rows(torch.stack([rank, micro_batch_ids.long()], dim=-1), group)
            all_micro = _pair_ids(pairs[:, 0], dense_ids(pairs[:, 1]))
        factors = _tas_factors(
            all_rows[:, 0], all_rows[:, 1] > 0, dense_ids(all_ids), beta_min, beta_max, None, all_micro
        )
        return factors[offset : offset + score.shape[0]]
    seg = dense_ids(group_ids) if group_ids is not None else None
    micro = dense_ids(micro_batch_ids) if micro_batch_ids is not None else None
    return _tas_factors(score, valid, seg, beta_min, beta_max, group, micro)


def _pair_ids(a: Tensor, b: Tensor) -> Tensor:
    """Dense ids of the pairs ``(a_i, b_i)``, for ``b`` in ``[0, len)`` and non-negative ``a``."""
    return dense_ids(a * max(b.shape[0], 1) + b)


def _tas_factors(
    score: Tensor,
    valid: Tensor,
    seg: Tensor | None,
    beta_min: float,
    beta_max: float | None,
    group: "dist.ProcessGroup | None",
    micro: Tensor | None = None,
) -> Tensor:
    """TAS factors from trajectory scores; batch-wide statistics all-reduced over ``group`` (seg=None).

    ``micro`` (dense micro-batch ids, local to this process): the mean-preserving rule's mean is
    taken per (segment, micro-batch) and never all-reduced.
    """
    b = score.shape[0]
    n_valid = all_reduce(segment_sum(valid.to(score.dtype), seg), dist.ReduceOp.SUM, group)
    lo = segment_amin(torch.where(valid, score, float("inf")), seg)
    hi = segment_amax(torch.where(valid, score, float("-inf")), seg)
    lo, hi = all_reduce_min_max(lo, hi, group)  # NaN on any rank stays NaN, as in one process
    span = hi - lo
    # `not (span <= eps)` rather than `span > eps`: a NaN range must stay active and give NaN factors.
    active = (n_valid >= 2) & ~(span <= TAS_MIN_RANGE)
    safe_span = torch.where(active, span, 1.0)
    normalised = ((score - broadcast(lo, seg, b)) / broadcast(safe_span, seg, b)).clamp(0.0, 1.0)
    if beta_max is None and micro is not None:
        key = micro if seg is None else _pair_ids(seg, micro)
        total = segment_sum(torch.where(valid, normalised, 0.0), key)
        mean = total / segment_sum(valid.to(score.dtype), key).clamp_min(1)
        # mean 0: all of the micro-batch's valid trajectories sit at the minimum, factor beta_min
        # (the code's 1e-8 in the denominator gives the same); `not (mean <= 0)` keeps a NaN mean.
        spread = broadcast(torch.where(mean <= 0, 0.0, (1.0 - beta_min) / mean), key, b)
    elif beta_max is None:
        total = all_reduce(segment_sum(torch.where(valid, normalised, 0.0), seg), dist.ReduceOp.SUM, group)
        safe_mean = torch.where(active, total / n_valid.clamp_min(1), 1.0)
        spread = broadcast((1.0 - beta_min) / safe_mean, seg, b)
    else:
        spread = torch.full_like(score, beta_max - beta_min)
    factors = beta_min + spread * normalised
    return torch.where(valid & broadcast(active, seg, b), factors, 1.0)


@typechecked
def shape_advantages(
    advantages: Float[Tensor, " batch *seq"],
    dependency: Float[Tensor, "batch seq2"],
    response_mask: Shaped[Tensor, "batch seq2"],
    *,
    beta_min: float = 0.9,
    beta_max: float | None = None,
    group_ids: Integer[Tensor, " batch"] | None = None,
    micro_batch_ids: Integer[Tensor, " batch"] | None = None,
    process_group: ProcessGroupLike = None,
) -> Float[Tensor, " batch *seq"]:
    r"""Trajectory-level Advantage Shaping (TAS): $\hat A'_i = \alpha_i \hat A_i$.

    Multiplies each trajectory's advantage (per-trajectory ``[batch]`` or per-token
    ``[batch, seq]``) by its factor from [`advantage_factors`][vppo_core.advantage_factors] (VPPO, arXiv:2510.09285,
    Eq. 5),
    whatever the advantage's sign. See [`advantage_factors`][vppo_core.advantage_factors] for the normalisation, the
    mean-preserving ``beta_max=None`` rule, the edge cases and NaN handling; call it directly to log
    the factors.

    Shapes:
        - ``advantages``: ``[batch]`` or ``[batch, seq]``
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - ``group_ids``, ``micro_batch_ids``: ``[batch]``
        - returns: the shape of ``advantages``

    Args:
        advantages: GRPO/PPO advantages, e.g. from [`grpo_advantages`][vppo_core.grpo_advantages]. Gradients
            flow through them unchanged (the factors are constants).
        dependency: Token visual dependency.
        response_mask: Valid response tokens.
        beta_min: Smallest factor, $> 0$.
        beta_max: Largest factor, or ``None`` for the mean-preserving rule.
        group_ids: Normalise within each group instead of over the batch.
        micro_batch_ids: The mean-preserving rule's mean per micro-batch, as the VPPO-RL code (see
            [`advantage_factors`][vppo_core.advantage_factors]).
        process_group: Statistics over the global batch of this process group (see
            [`advantage_factors`][vppo_core.advantage_factors]).

    Returns:
        The shaped advantages, float32 (float64 for float64 inputs).

    Raises:
        ValueError: If ``advantages`` is ``[batch, seq]`` with a different ``seq`` than
            ``dependency``, on bad ``beta_min``/``beta_max``, or ``micro_batch_ids`` with a
            ``beta_max``.

    Example:
        >>> import torch
        >>> from vppo_core import shape_advantages
        >>> adv = torch.tensor([1.0, -1.0, 0.5])
        >>> dep = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0]])
        >>> shape_advantages(adv, dep, torch.ones(3, 2), beta_min=0.8, beta_max=1.2)
        tensor([ 0.8000, -0.9333,  0.6000])
    """
    if advantages.ndim > 2 or (advantages.ndim == 2 and advantages.shape != dependency.shape):
        raise ValueError(
            "advantages must be [batch] or [batch, seq] matching dependency "
            f"{tuple(dependency.shape)}, got {tuple(advantages.shape)}"
        )
    factors = advantage_factors(
        dependency,
        response_mask,
        beta_min=beta_min,
        beta_max=beta_max,
        group_ids=group_ids,
        micro_batch_ids=micro_batch_ids,
        process_group=process_group,
    )
    adv = advantages.to(result_dtype(advantages, factors))
    return adv * (factors.unsqueeze(-1) if adv.ndim == 2 else factors)
