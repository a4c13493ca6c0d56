r"""Token signals of the perception-aware family: log-ratios, divergences, entropies, visual similarity, position.

Every perception-aware method scores each response token by how much it depends on the image (or
how uncertain it is) and turns the score into a mask or a weight. The signals and who uses them:

- sampled log-ratio ($k_1, k_2, k_3$, $\lvert\log r\rvert$, positive part):
  [`log_ratio_signal`][vppo_core.signals.log_ratio_signal] (VPPO's code, ToR, CGPO);
- full-vocabulary KL: [`visual_dependency`][vppo_core.visual_dependency] (VPPO, PAPO, PGPO);
- Jensen-Shannon divergence: [`jensen_shannon`][vppo_core.signals.jensen_shannon] (VEPO);
- Hellinger distance: [`hellinger`][vppo_core.signals.hellinger] (a bounded alternative);
- $H(P)$, $H(Q)$, $\lvert\Delta H\rvert$: [`entropy_gap`][vppo_core.signals.entropy_gap] and
  [`token_entropy`][vppo_core.token_entropy] (VEPO, PEPO, CGPO);
- top-$p$ entropy: [`top_p_entropy`][vppo_core.signals.top_p_entropy] (ToR);
- hidden-state visual similarity: [`visual_similarity`][vppo_core.signals.visual_similarity] (PEPO, VGPO);
- relative position $t/(L-1)$: [`relative_position`][vppo_core.signals.relative_position] (VGPO).

Conventions: ``[batch, seq]`` results aligned like the inputs, exactly 0 outside ``response_mask``,
float32 (float64 for float64 input). Full-vocabulary quantities (KL, JSD, Hellinger, entropies) go
through the fused kernels of [`visual_dependency`][vppo_core.visual_dependency] (top-$p$ entropy,
which sorts, row chunk by row chunk) and never build a float32 copy of the whole
``[batch, seq, vocab]`` logits. Signals are computed with the rollout (old) policy under
``no_grad`` in the per-rollout-batch stage unless a method says otherwise; detach them before they
feed a mask or a weight (selection and factor blocks do).
"""

from ._full_vocab import EntropyGap, entropy_gap, hellinger, jensen_shannon, top_p_entropy
from ._hidden import relative_position, visual_similarity
from ._log_ratio import log_ratio_signal

__all__ = [
    "EntropyGap",
    "entropy_gap",
    "hellinger",
    "jensen_shannon",
    "log_ratio_signal",
    "relative_position",
    "top_p_entropy",
    "visual_similarity",
]
