r"""Recipes for the rest of the perception-aware family: ToR, DVRP, PEPO, VEPO, VGPO, CGPO, CFPO and NoisyRollout.

Each recipe is a short composition of the shared blocks (signals, transforms, selection, factors and
the loss), in the two-stage style of [`vppo_core.recipes`][vppo_core.recipes]:

1. **once per rollout batch** (no gradient, rollout policy, whole batch, over ranks with
   ``process_group``): the ``*_rollout`` functions turn advantages and signals into a
   [`RolloutBatch`][vppo_core.recipes.RolloutBatch] of (token) advantages and a token mask or
   float token weights. Every batch-wide statistic (ToR's pooled top-30%, CGPO's median/MAD, VGPO's
   group min-max) is computed here, once, and nothing is silently recomputed per micro-batch.
2. **per micro-batch** (with gradient): the loss recipes take the current and rollout
   log-probabilities and the micro-batch's slice of stage 1, and pass ``num_tokens`` /
   ``num_kept_tokens`` / ``num_sequences`` through so micro-batches and ranks add up to one global mean.

PEPO and CFPO read their signal from the update's own forward pass, so they are stage 2 only; DVRP
and CFPO add auxiliary terms built on [`sampled_perception_loss`][vppo_core.sampled_perception_loss]
(an auxiliary $k_3$ term of either sign). Every recipe names the paper, its defaults, and in a
"Paper vs code" paragraph which variant it follows and the switch for the other. The views these
methods need (no image, VP-diffusion noise, normalised-pixel noise, region fill, blinded or
counterfactual attention) are built in ``vppo_core.integrations.views``. Where a paper does not
pin the base objective, the recipe uses the family's usual DAPO base (clip-higher
$\epsilon_{low} = 0.2$, $\epsilon_{high} = 0.28$, token mean, no dual clip), as
[`recipes.pgpo`][vppo_core.recipes.pgpo] does.
"""

from ._cfpo import CFPOOutput, cfpo
from ._cgpo import cgpo, cgpo_rewards, cgpo_rollout
from ._dvrp import DVRPOutput, dvrp
from ._noisyrollout import noisyrollout_rollout
from ._pepo import pepo, pepo_advantages
from ._tor import tor, tor_rollout
from ._vepo import VEPOOutput, vepo, vepo_rollout
from ._vgpo import vgpo, vgpo_rollout

__all__ = [
    "CFPOOutput",
    "DVRPOutput",
    "VEPOOutput",
    "cfpo",
    "cgpo",
    "cgpo_rewards",
    "cgpo_rollout",
    "dvrp",
    "noisyrollout_rollout",
    "pepo",
    "pepo_advantages",
    "tor",
    "tor_rollout",
    "vepo",
    "vepo_rollout",
    "vgpo",
    "vgpo_rollout",
]
