"""The NoisyRollout recipe (see `vppo_core.family`)."""

from typing import Literal

from jaxtyping import Bool, Integer, Real
from torch import Tensor

from .._checks import typechecked
from ..advantages import grpo_advantages
from ..recipes import RolloutBatch

__all__ = ["noisyrollout_rollout"]


@typechecked
def noisyrollout_rollout(
    rewards: Real[Tensor, " batch"] | Bool[Tensor, " batch"],
    group_ids: Integer[Tensor, " batch"],
    *,
    scale: Literal["std", "none"] = "std",
) -> RolloutBatch:
    r"""NoisyRollout's advantages: one GRPO group over the clean and the noisy rollouts of a prompt.

    NoisyRollout (arXiv:2504.13055, NeurIPS 2025; official code) changes only the rollouts: for each
    prompt, $n/2$ responses are sampled on the clean image and $n/2$ on one noised copy (a VP-diffusion
    step, annealed $k_t = \lfloor\alpha_0(1 - \sigma(\lambda(t - \gamma)/t_{max}))\rfloor$,
    $\alpha_0 = 500$, $\lambda = 30$, $\gamma = 40$, $t_{max} = 60$: ``noisyrollout_noise_step`` and
    ``vp_diffusion_noise_pixel_values`` in ``vppo_core.integrations.views``), and all $n$ form **one**
    group: ``grpo_advantages(rewards, group_ids)`` with the same id for both halves
    ([`grpo_advantages`][vppo_core.grpo_advantages]). The old and current log-probabilities of every
    response are then computed on the **clean** image, with no importance correction for the noisy
    half, and the loss is GRPO's ([`recipes.grpo`][vppo_core.recipes.grpo]).

    Paper vs code: FAMILY.md records no difference; the noise schedule above is the official code's.
    ``scale="none"`` gives Dr.GRPO advantages.

    Shapes:
        - ``rewards``, ``group_ids``: ``[batch]`` (clean and noisy rollouts of a prompt share an id)

    Args:
        rewards: One reward per response.
        group_ids: The prompt of each response.
        scale: ``"std"`` (GRPO) or ``"none"`` (Dr.GRPO).

    Returns:
        [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of ``[batch]`` advantages and no mask.

    Example:
        >>> import torch
        >>> rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # clean, clean, noisy, noisy of one prompt
        >>> noisyrollout_rollout(rewards, torch.tensor([0, 0, 0, 0])).advantages
        tensor([ 0.5000, -1.5000,  0.5000,  0.5000])
    """
    return RolloutBatch(grpo_advantages(rewards, group_ids, scale=scale), None)
