"""Token-perception analysis: the VPPO paper's measurements as reusable functions, an accumulator and plots.

VPPO (Huang et al., arXiv:2510.09285) looks at multimodal RL through each token's visual dependency
and finds that (1) within a trajectory dependency is sparse: a few tokens carry most of it, with a
long-tailed, roughly exponential distribution; and (2) trajectories differ a lot in their mean
dependency (a right-skewed distribution). This package measures both on your own rollouts:

- pure, sync-free statistics over ``dependency [batch, seq]`` and ``response_mask``:
  [`trajectory_dependency`][vppo_core.trajectory_dependency] (the mean, re-exported),
  [`trajectory_quantiles`][vppo_core.analysis.trajectory_quantiles],
  [`top_share`][vppo_core.analysis.top_share], [`fraction_above`][vppo_core.analysis.fraction_above],
  [`gini`][vppo_core.analysis.gini], [`group_spread`][vppo_core.analysis.group_spread],
  [`histogram_edges`][vppo_core.analysis.histogram_edges] and
  [`histogram_counts`][vppo_core.analysis.histogram_counts];
- [`DependencyAccumulator`][vppo_core.analysis.DependencyAccumulator], which streams them over
  steps and ranks and summarises to a ``dict[str, float]`` for any logger;
- matplotlib figures (the optional ``plot`` extra, imported only when a plot function is called):
  [`plot_token_distribution`][vppo_core.analysis.plot_token_distribution],
  [`plot_trajectory_distribution`][vppo_core.analysis.plot_trajectory_distribution],
  [`plot_histogram`][vppo_core.analysis.plot_histogram] and
  [`plot_token_strip`][vppo_core.analysis.plot_token_strip].

Besides the package's axis names (``batch``, ``seq``, ``group``), shapes here use ``q``, ``k`` and
``threshold`` for the levels asked for, and ``edge`` for histogram edges.
"""

from ..advantages import trajectory_dependency
from ._groups import GroupSpread, group_spread
from ._histogram import histogram_counts, histogram_edges
from ._stats import fraction_above, gini, top_share, trajectory_quantiles
from .accumulator import DependencyAccumulator
from .plots import plot_histogram, plot_token_distribution, plot_token_strip, plot_trajectory_distribution

__all__ = [
    "DependencyAccumulator",
    "GroupSpread",
    "fraction_above",
    "gini",
    "group_spread",
    "histogram_counts",
    "histogram_edges",
    "plot_histogram",
    "plot_token_distribution",
    "plot_token_strip",
    "plot_trajectory_distribution",
    "top_share",
    "trajectory_dependency",
    "trajectory_quantiles",
]
