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
   ``dapo``, ``vppo``, ``pgpo``, ``papo``, ``papo_exact``, ``high_entropy``) take the current and rollout
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

from ._papo import PAPOOutput, papo, papo_exact
from ._policy import dapo, grpo, high_entropy, pgpo, vppo
from ._rollout import RolloutBatch, high_entropy_rollout, pgpo_rollout, vppo_rollout

__all__ = [
    "PAPOOutput",
    "RolloutBatch",
    "dapo",
    "grpo",
    "high_entropy",
    "high_entropy_rollout",
    "papo",
    "papo_exact",
    "pgpo",
    "pgpo_rollout",
    "vppo",
    "vppo_rollout",
]
