"""vppo_core: composable, pure-tensor losses for perception-aware RL of vision-language models.

The public API: token visual dependency (exact and sampled), GRPO advantages, VPPO's
Trajectory-level Advantage Shaping (TAS) and Token-level Gradient Filtering (TGF), and the clipped
surrogate loss they feed. See the documentation for the maths and the papers.
"""

from . import factors, family, recipes, selection, signals, transforms
from ._joint import DependencyEntropies, visual_dependency_and_entropies
from .advantages import advantage_factors, grpo_advantages, shape_advantages, trajectory_dependency
from .dependency import sampled_visual_dependency, visual_dependency, visual_dependency_from_hidden
from .distributed import LossDenominators, loss_denominators
from .entropy import high_entropy_mask, high_entropy_threshold, token_entropy, topk_entropy_mask
from .loss import (
    AGGREGATIONS,
    LossOutput,
    aggregate,
    cispo_loss,
    cispo_surrogate,
    clipped_surrogate,
    gspo_loss,
    gspo_surrogate,
    kl_penalty,
    vppo_loss,
)
from .masking import num_kept_tokens, token_filter_mask, topk_token_mask
from .papo import DoubleEntropyTerm, PerceptionTerm, double_entropy_loss, perception_loss, sampled_perception_loss
from .pgpo import pgpo_advantages, pgpo_weights

__version__ = "0.1.0"

__all__ = [
    "AGGREGATIONS",
    "DependencyEntropies",
    "DoubleEntropyTerm",
    "LossDenominators",
    "LossOutput",
    "PerceptionTerm",
    "__version__",
    "advantage_factors",
    "aggregate",
    "cispo_loss",
    "cispo_surrogate",
    "clipped_surrogate",
    "double_entropy_loss",
    "factors",
    "family",
    "grpo_advantages",
    "gspo_loss",
    "gspo_surrogate",
    "high_entropy_mask",
    "high_entropy_threshold",
    "kl_penalty",
    "loss_denominators",
    "num_kept_tokens",
    "perception_loss",
    "pgpo_advantages",
    "pgpo_weights",
    "recipes",
    "sampled_perception_loss",
    "sampled_visual_dependency",
    "selection",
    "shape_advantages",
    "signals",
    "token_entropy",
    "token_filter_mask",
    "topk_entropy_mask",
    "topk_token_mask",
    "trajectory_dependency",
    "transforms",
    "visual_dependency",
    "visual_dependency_and_entropies",
    "visual_dependency_from_hidden",
    "vppo_loss",
]
