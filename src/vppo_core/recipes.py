r"""Named recipes: GRPO, DAPO, VPPO, PAPO, PGPO and high-entropy tokens, each a short composition of public blocks.

Each recipe is a few lines you can read (and copy): the blocks it calls, with the paper's
hyperparameters as defaults and the paper cited. They are examples of composition, not a
configuration system; when you need something they don't do, call the blocks directly.

A training loop has two stages, and the recipes follow them:

1. **Once per rollout batch** (no gradient, rollout policy): advantages, visual dependency,
   entropies, and everything that needs batch-wide statistics (TAS's min/max, a pooled entropy
   threshold, possibly over ranks with ``process_group``). The ``*_rollout`` functions do this
   part for the methods that have one and return a [`RolloutBatch`][vppo_core.recipes.RolloutBatch]
   of per-trajectory or per-token advantages and a token mask. GRPO, DAPO and PAPO need nothing here
   beyond the advantages (and, for PAPO, the masked-image log-probabilities).
2. **Per (micro-)batch of the update** (with gradient): the loss. The loss recipes (``grpo``,
   ``dapo``, ``vppo``, ``pgpo``, ``papo``, ``high_entropy``) take the current and rollout
   log-probabilities and the slice of stage 1's outputs, and pass ``num_tokens`` (or
   ``num_sequences``) through to [`aggregate`][vppo_core.aggregate], so that micro-batches and
   ranks add up to one global mean (see [`loss_denominators`][vppo_core.loss_denominators]).

```python
import torch
import vppo_core as V
from vppo_core import recipes

with torch.no_grad():                                      # stage 1, once per rollout batch
    adv = V.grpo_advantages(rewards, group_ids)
    dep = V.visual_dependency(logits_img, logits_noimg, response_mask)
    batch = recipes.vppo_rollout(adv, dep, response_mask)  # TAS advantages + TGF mask

den = V.loss_denominators([response_mask[mb] for mb in micro_batches])
for mb in micro_batches:                                   # stage 2, with gradient
    out = recipes.vppo(logprobs_of(mb), old_logprobs[mb], batch.advantages[mb], response_mask[mb],
                       batch.token_mask[mb], num_tokens=den.num_tokens)
    out.loss.backward()
```

Outside the loss, and so outside every recipe: rollout generation, rewards, DAPO's dynamic
sampling (dropping groups whose rewards are all equal) and overlong reward shaping, and building the
perturbed or masked images (see the integration layer).
"""

from typing import NamedTuple

from jaxtyping import Float, Integer, Shaped
from torch import Tensor

from ._checks import typechecked
from .advantages import shape_advantages
from .distributed import ProcessGroupLike
from .entropy import high_entropy_mask
from .loss import LossOutput, vppo_loss
from .masking import token_filter_mask
from .papo import DoubleEntropyTerm, PerceptionTerm, double_entropy_loss, sampled_perception_loss
from .pgpo import pgpo_advantages

__all__ = [
    "PAPOOutput",
    "RolloutBatch",
    "dapo",
    "grpo",
    "high_entropy",
    "high_entropy_rollout",
    "papo",
    "pgpo",
    "pgpo_rollout",
    "vppo",
    "vppo_rollout",
]


class RolloutBatch(NamedTuple):
    """What a ``*_rollout`` recipe returns: the inputs of the matching loss recipe, for the whole rollout batch.

    Slice both along the batch dimension for each micro-batch.
    """

    advantages: Tensor
    """Advantages, ``[batch]`` or ``[batch, seq]``, detached from the signals that shaped them."""
    token_mask: Tensor | None
    """Bool ``[batch, seq]`` mask of the tokens that carry gradient, float ``[batch, seq]`` token weights
    (e.g. ToR's), or ``None`` for all valid tokens."""


class PAPOOutput(NamedTuple):
    """What [`papo`][vppo_core.recipes.papo] returns: the total loss and each part's outputs."""

    loss: Tensor
    """The scalar to ``backward()``: ``policy.loss + perception.loss + entropy.loss``."""
    policy: LossOutput
    """The DAPO policy loss and its diagnostics."""
    perception: PerceptionTerm
    """The Implicit Perception Loss term and the detached $\\mathrm{KL}_{prcp}$."""
    entropy: DoubleEntropyTerm
    """The Double Entropy Loss term and the detached entropies."""


# ----------------------------------------------------------------------------- stage 1: per rollout batch


@typechecked
def vppo_rollout(
    advantages: Float[Tensor, " batch"],
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    k: float = 0.4,
    beta_min: float = 0.9,
    beta_max: float | None = None,
    group_ids: Integer[Tensor, " batch"] | None = None,
    process_group: ProcessGroupLike = None,
) -> RolloutBatch:
    r"""VPPO's per-rollout-batch step: TAS-shaped advantages and the TGF mask.

    VPPO (Huang et al., 2025, arXiv:2510.09285):
    ``shape_advantages(advantages, dependency, response_mask, beta_min=0.9, beta_max=None)``
    ([`shape_advantages`][vppo_core.shape_advantages], Eq. 5, with the code's mean-preserving
    dynamic $\beta_{max}$) and ``token_filter_mask(dependency, response_mask, k=0.4)``
    ([`token_filter_mask`][vppo_core.token_filter_mask]; the paper's best $k$; the official
    VPPO-RL code defaults to 0.2). The official code normalises TAS over each device's mini-batch;
    pass ``process_group`` for the global batch instead.

    Shapes:
        - ``advantages``, ``group_ids``: ``[batch]``
        - ``dependency``, ``response_mask``: ``[batch, seq]``

    Args:
        advantages: Per-trajectory advantages, e.g. from [`grpo_advantages`][vppo_core.grpo_advantages].
        dependency: Token visual dependency of the rollout policy.
        response_mask: Valid response tokens.
        k: TGF fraction kept per trajectory.
        beta_min: Smallest TAS factor.
        beta_max: Largest TAS factor, or ``None`` for the mean-preserving rule.
        group_ids: Normalise TAS within prompt groups instead of over the batch.
        process_group: TAS statistics over the global batch of this process group.

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of shaped ``[batch]`` advantages and the TGF mask.

    Example:
        >>> import torch
        >>> dep = torch.tensor([[0.1, 2.0, 0.3], [0.0, 0.1, 0.0]])
        >>> batch = vppo_rollout(torch.tensor([1.0, -1.0]), dep, torch.ones(2, 3))
        >>> batch.advantages, batch.token_mask
        (tensor([ 1.1000, -0.9000]), tensor([[False,  True,  True],
                [ True,  True, False]]))
    """
    shaped = shape_advantages(
        advantages,
        dependency,
        response_mask,
        beta_min=beta_min,
        beta_max=beta_max,
        group_ids=group_ids,
        process_group=process_group,
    )
    return RolloutBatch(shaped, token_filter_mask(dependency, response_mask, k=k))


@typechecked
def pgpo_rollout(
    advantages: Float[Tensor, " batch"],
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    tau: float = 0.4,
    beta: float = 2.0,
) -> RolloutBatch:
    r"""PGPO's per-rollout-batch step: token advantages $w_t \hat A_i$ from the dependency.

    ``pgpo_advantages(advantages, dependency, response_mask, tau=0.4, beta=2.0)``
    ([`pgpo_advantages`][vppo_core.pgpo_advantages]; PGPO, arXiv:2604.01840). Every weight depends
    on its own response only, so no batch statistic (and no ``process_group``) is involved.

    Shapes:
        - ``advantages``: ``[batch]``
        - ``dependency``, ``response_mask``: ``[batch, seq]``

    Args:
        advantages: Per-trajectory advantages.
        dependency: Token visual dependency $S_t \ge 0$.
        response_mask: Valid response tokens.
        tau: Gate $\tau \in (0, 1)$.
        beta: Amplification $\beta \ge 0$.

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of ``[batch, seq]`` token advantages and no mask.

    Example:
        >>> import torch
        >>> batch = pgpo_rollout(torch.tensor([1.0]), torch.tensor([[0.0, 0.2, 1.0, 3.0]]), torch.ones(1, 4))
        >>> batch.advantages, batch.token_mask
        (tensor([[0.0000, 0.2821, 1.1440, 2.5739]]), None)
    """
    return RolloutBatch(pgpo_advantages(advantages, dependency, response_mask, tau=tau, beta=beta), None)


@typechecked
def high_entropy_rollout(
    advantages: Float[Tensor, " batch"],
    entropy: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    rho: float = 0.2,
    process_group: ProcessGroupLike = None,
) -> RolloutBatch:
    r"""The high-entropy-minority rule's per-rollout-batch step: one pooled entropy threshold, top $\rho = 20\%$.

    ``high_entropy_mask(entropy, response_mask, rho=0.2)``
    ([`high_entropy_mask`][vppo_core.high_entropy_mask]; Wang et al., 2025, arXiv:2506.01939), with
    the rollout policy's entropies ([`token_entropy`][vppo_core.token_entropy] of the logits of the
    old-log-probability pass), pooled over the whole rollout batch (and over ranks with
    ``process_group``). The official code instead takes the exact top $\lceil\rho N\rceil$ of each
    micro-batch, on the entropies of the update's own forward pass: for that, call
    ``high_entropy_mask(entropy, mask, rho=0.2, exact_count=True)`` per micro-batch.

    Shapes:
        - ``advantages``: ``[batch]``
        - ``entropy``, ``response_mask``: ``[batch, seq]``

    Args:
        advantages: Per-trajectory advantages (returned unchanged).
        entropy: Per-token entropy of the rollout policy.
        response_mask: Valid response tokens.
        rho: Fraction of the batch's valid tokens kept.
        process_group: Pool the threshold over the ranks of this process group.

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of the advantages and the pooled high-entropy mask.

    Example:
        >>> import torch
        >>> h = torch.tensor([[0.5, 2.0, 0.1, 0.2], [1.0, 0.3, 0.2, 0.4]])
        >>> high_entropy_rollout(torch.tensor([1.0, -1.0]), h, torch.ones(2, 4)).token_mask
        tensor([[False,  True, False, False],
                [ True, False, False, False]])
    """
    return RolloutBatch(advantages, high_entropy_mask(entropy, response_mask, rho=rho, process_group=process_group))


# ----------------------------------------------------------------------------- stage 2: the losses


@typechecked
def grpo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    ref_logprobs: Float[Tensor, "batch seq"] | None = None,
    *,
    clip: float = 0.2,
    kl_coef: float = 0.04,
    num_sequences: float | Tensor | None = None,
) -> LossOutput:
    r"""GRPO as published: symmetric PPO clip, per-sequence token mean, $k_3$ KL to a reference policy.

    GRPO (Shao et al., 2024, "DeepSeekMath", arXiv:2402.03300):
    $\frac1G\sum_i \frac1{|o_i|}\sum_t \big[\ell_{i,t} + \beta\,\widehat{\mathrm{KL}}_{i,t}(\pi\|\pi_{ref})\big]$
    with $\epsilon = 0.2$ and $\beta = 0.04$, i.e.
    ``vppo_loss(..., clip_low=0.2, clip_high=0.2, dual_clip=None, ref_logprobs=ref_logprobs,
    kl_coef=0.04, kl_estimator="k3", agg="seq-mean-token-mean")``. Advantages from
    [`grpo_advantages`][vppo_core.grpo_advantages]. Pass ``kl_coef=0`` to drop the KL term (then no
    ``ref_logprobs`` are needed), as DAPO, VPPO and most later work do; for micro-batches pass the
    global ``num_sequences``. verl/EasyR1 default to a token mean instead of the per-sequence mean.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``ref_logprobs``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: GRPO advantages, ``[batch]`` or ``[batch, seq]``.
        response_mask: Valid response tokens.
        ref_logprobs: Reference-policy log-probabilities for the KL term.
        clip: Symmetric clip range $\epsilon$.
        kl_coef: $\beta$ of the $k_3$ KL to the reference policy.
        num_sequences: Global sequence count (ranks, gradient accumulation).

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Raises:
        ValueError: If ``kl_coef != 0`` and ``ref_logprobs`` is ``None``.

    Example:
        >>> import torch
        >>> lp = torch.zeros(2, 3, requires_grad=True)
        >>> out = grpo(lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.ones(2, 3), torch.zeros(2, 3))
        >>> out.loss, out.kl_loss
        (tensor(0., grad_fn=<AddBackward0>), tensor(0.))
    """
    return vppo_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_low=clip,
        clip_high=clip,
        dual_clip=None,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        kl_estimator="k3",
        agg="seq-mean-token-mean",
        num_sequences=num_sequences,
    )


@typechecked
def dapo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    r"""DAPO's loss: clip-higher ($\epsilon_{low} = 0.2$, $\epsilon_{high} = 0.28$), token-level mean, no KL.

    DAPO (Yu et al., 2025, arXiv:2503.14476):
    ``vppo_loss(..., clip_low=0.2, clip_high=0.28, dual_clip=None, agg="token-mean")``, the
    clipped surrogate averaged over every valid token of the batch (not per sequence), with no KL
    penalty. DAPO's two other ingredients are not in the loss: dynamic sampling (drop the groups
    whose rewards are all equal, before computing advantages) and overlong reward shaping (a
    length-dependent reward penalty). verl's DAPO recipe also sets a dual clip ($c = 10$); pass
    through [`vppo_loss`][vppo_core.vppo_loss] for it. (VPPO's baselines add a 0.06 NLL term,
    ``entropy_coef=0.06``, without which DAPO collapsed in their runs.)

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: Advantages, ``[batch]`` or ``[batch, seq]``.
        response_mask: Valid response tokens.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$ (clip-higher).
        num_tokens: Global valid-token count (ranks, gradient accumulation).

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[1.5, 0.5]]))
        >>> dapo(lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2)).loss  # 1.5 clipped to 1.28
        tensor(-0.8900)
    """
    return vppo_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=None,
        agg="token-mean",
        num_tokens=num_tokens,
    )


@typechecked
def vppo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_mask: Shaped[Tensor, "batch seq"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    entropy_coef: float = 0.06,
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    r"""VPPO's loss: the clipped surrogate on the TGF-kept tokens, all-token denominator, 0.06 NLL.

    VPPO (Huang et al., 2025, arXiv:2510.09285, Eq. 6) as its official code trains it:
    ``vppo_loss(..., token_mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, entropy_coef=0.06,
    agg="token-mean", denominator="valid")``, with ``advantages`` and ``token_mask`` from
    [`vppo_rollout`][vppo_core.recipes.vppo_rollout] (TAS and TGF). The denominator counts every
    valid token, kept or not (so the gradient is about $k$ times GRPO's); ``num_tokens`` is then
    ``loss_denominators(...).num_tokens``. The 0.06 term is the code's "entropy penalty", a
    sampled-token NLL $0.06\cdot\operatorname{mean}(-\log\pi(o_t))$ applied to VPPO and its
    baselines alike; the published runs use no KL. The paper writes a per-sequence mean
    ($1/|o_i|$); the code uses the token mean.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``token_mask``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: TAS-shaped advantages, ``[batch]`` or ``[batch, seq]``.
        response_mask: Valid response tokens.
        token_mask: TGF mask of the tokens that carry gradient.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        dual_clip: Dual-clip constant $c > 1$, or ``None``.
        entropy_coef: Coefficient of the sampled-token NLL term.
        num_tokens: Global valid-token count (``loss_denominators(...).num_tokens``).

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 4, requires_grad=True)
        >>> keep = torch.tensor([[True, False, True, False]])
        >>> out = vppo(lp, torch.zeros(1, 4), torch.tensor([1.0]), torch.ones(1, 4), keep, entropy_coef=0.0)
        >>> out.loss, out.kept_frac  # -(1 + 1) / 4 valid tokens
        (tensor(-0.5000, grad_fn=<DivBackward0>), tensor(0.5000))
    """
    return vppo_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        token_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        entropy_coef=entropy_coef,
        agg="token-mean",
        denominator="valid",
        num_tokens=num_tokens,
    )


@typechecked
def pgpo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    r"""PGPO's loss: the DAPO loss on PGPO's token-level advantages $w_t \hat A_i$.

    ``dapo(logprobs, old_logprobs, advantages, response_mask)`` ([`dapo`][vppo_core.recipes.dapo])
    with the ``[batch, seq]`` advantages of [`pgpo_rollout`][vppo_core.recipes.pgpo_rollout]
    (PGPO, arXiv:2604.01840: $\tau = 0.4$, $\beta = 2$). PGPO's official repository is empty and its
    base objective is not verified here; the surrogate and aggregation are DAPO's, the usual base
    in this family. For GRPO as the base, call [`grpo`][vppo_core.recipes.grpo] with the same
    token advantages.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``: ``[batch, seq]``
        - ``advantages``: ``[batch, seq]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: PGPO token advantages, ``[batch, seq]``.
        response_mask: Valid response tokens.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global valid-token count.

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> adv = pgpo_rollout(torch.tensor([1.0]), torch.tensor([[0.0, 3.0]]), torch.ones(1, 2)).advantages
        >>> lp = torch.zeros(1, 2, requires_grad=True)
        >>> pgpo(lp, torch.zeros(1, 2), adv, torch.ones(1, 2)).loss.backward()
        >>> lp.grad  # all of the response's advantage on the dependent token
        tensor([[-0., -1.]])
    """
    return dapo(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        num_tokens=num_tokens,
    )


@typechecked
def papo(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    masked_logprobs: Float[Tensor, "batch seq"],
    *,
    gamma: float = 0.01,
    eta1: float = 0.03,
    eta2: float = 0.03,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> PAPOOutput:
    r"""PAPO_D: the DAPO loss, minus $\gamma$ times the perception KL, plus the Double Entropy Loss.

    PAPO (Wang et al., 2025, arXiv:2507.06448), the DAPO variant PAPO_D of its Table 3, as its
    official code computes it (every term a token mean over the valid tokens, ``num_tokens`` passed
    to each):

    - ``dapo(logprobs, old_logprobs, advantages, response_mask)`` ([`dapo`][vppo_core.recipes.dapo]);
    - ``sampled_perception_loss(logprobs, masked_logprobs, response_mask, gamma=0.01)``: the clamped
      $k_3$ of the sampled tokens ([`sampled_perception_loss`][vppo_core.sampled_perception_loss]);
    - ``double_entropy_loss(-logprobs, -masked_logprobs, response_mask, eta1=0.03, eta2=0.03)``: the
      entropies estimated by the sampled-token NLL, as in the paper's implementation
      ([`double_entropy_loss`][vppo_core.double_entropy_loss]).

    ``masked_logprobs`` are $\log\pi(o_t\mid I_{mask})$ of the sampled tokens with the masked image
    (14-px patches blackened with probability 0.6). The official code computes them once per rollout
    batch with the rollout policy under ``no_grad``, so the $\eta_2$ term then has no gradient; pass
    them with gradient (an extra masked forward pass per micro-batch) to make it act.

    Where this differs from the paper: the paper writes the exact KL and entropies (use
    [`perception_loss`][vppo_core.perception_loss] and [`token_entropy`][vppo_core.token_entropy]
    with [`double_entropy_loss`][vppo_core.double_entropy_loss]). PAPO_G is the GRPO variant:
    $\gamma = 0.02$ (Qwen2.5-VL; 0.01 for Qwen3-VL-2B), a reference KL with $\beta = 0.01$,
    $\epsilon_{high} = 0.3$, and double entropy only for the 7B model ($\eta = 0.05$); compose it
    from [`vppo_loss`][vppo_core.vppo_loss] and the two terms. EasyR1, the code base PAPO (like
    VPPO-RL) builds on, also applies a dual clip ($c = 3$) by default; pass ``dual_clip=3.0`` to
    [`vppo_loss`][vppo_core.vppo_loss] in your own composition for it.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``masked_logprobs``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: Advantages, ``[batch]`` or ``[batch, seq]``.
        response_mask: Valid response tokens.
        masked_logprobs: The sampled tokens' log-probabilities with the masked image.
        gamma: $\gamma$ of the perception KL (maximised).
        eta1: $\eta_1$, entropy penalty with the real image.
        eta2: $\eta_2$, entropy penalty with the masked image.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global valid-token count, passed to every term.

    Returns:
        [`PAPOOutput`][vppo_core.recipes.PAPOOutput]: the total loss and each part's outputs.

    Example:
        >>> import torch
        >>> lp = torch.log(torch.tensor([[0.5, 0.9]])).requires_grad_()
        >>> masked = torch.log(torch.tensor([[0.1, 0.9]]))
        >>> out = papo(lp, lp.detach(), torch.tensor([1.0]), torch.ones(1, 2), masked)
        >>> out.perception.kl  # (0.2 - log 0.2 - 1 + 0) / 2
        tensor(0.4047)
        >>> bool(out.loss == out.policy.loss + out.perception.loss + out.entropy.loss)
        True
    """
    policy = dapo(
        logprobs, old_logprobs, advantages, response_mask, clip_low=clip_low, clip_high=clip_high, num_tokens=num_tokens
    )
    perception = sampled_perception_loss(logprobs, masked_logprobs, response_mask, gamma=gamma, num_tokens=num_tokens)
    entropy = double_entropy_loss(
        -logprobs, -masked_logprobs, response_mask, eta1=eta1, eta2=eta2, num_tokens=num_tokens
    )
    return PAPOOutput(policy.loss + perception.loss + entropy.loss, policy, perception, entropy)


@typechecked
def high_entropy(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, "batch *seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    token_mask: Shaped[Tensor, "batch seq"],
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | Tensor | None = None,
) -> LossOutput:
    r"""The high-entropy-minority loss: DAPO's surrogate on the top-20% entropy tokens, averaged over them.

    Wang et al. (2025, "Beyond the 80/20 Rule", arXiv:2506.01939) train DAPO with the policy
    gradient restricted to the high-entropy "forking" tokens:
    ``vppo_loss(..., token_mask, clip_low=0.2, clip_high=0.28, dual_clip=None, agg="token-mean",
    denominator="kept")``, with ``token_mask`` from
    [`high_entropy_rollout`][vppo_core.recipes.high_entropy_rollout] (or
    [`high_entropy_mask`][vppo_core.high_entropy_mask]). As in the official code, the loss is
    averaged over the **kept** tokens (VPPO divides by all valid tokens instead), so with
    micro-batches ``num_tokens`` is ``loss_denominators(masks, token_masks).num_kept_tokens``.

    Shapes:
        - ``logprobs``, ``old_logprobs``, ``response_mask``, ``token_mask``: ``[batch, seq]``
        - ``advantages``: ``[batch]`` or ``[batch, seq]``

    Args:
        logprobs: Sampled tokens' log-probabilities under the current policy (with gradient).
        old_logprobs: The same under the rollout policy.
        advantages: Advantages, ``[batch]`` or ``[batch, seq]``.
        response_mask: Valid response tokens.
        token_mask: The high-entropy tokens that carry gradient.
        clip_low: $\epsilon_{low}$.
        clip_high: $\epsilon_{high}$.
        num_tokens: Global **kept**-token count (``loss_denominators(...).num_kept_tokens``).

    Returns:
        [`LossOutput`][vppo_core.LossOutput].

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 4, requires_grad=True)
        >>> keep = torch.tensor([[True, False, True, False]])
        >>> high_entropy(lp, torch.zeros(1, 4), torch.tensor([1.0]), torch.ones(1, 4), keep).loss
        tensor(-1., grad_fn=<DivBackward0>)
    """
    return vppo_loss(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        token_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=None,
        agg="token-mean",
        denominator="kept",
        num_tokens=num_tokens,
    )
