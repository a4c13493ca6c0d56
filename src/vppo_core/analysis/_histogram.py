"""Histograms with fixed edges: integer counts that add up across steps and ranks."""

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int64, Shaped
from torch import Tensor

from .._checks import as_bool_mask, check_same_device, typechecked

__all__ = ["histogram_counts", "histogram_edges"]


@typechecked
def histogram_edges(
    low: float,
    high: float,
    bins: int,
    *,
    log: bool = False,
    device: torch.device | str | None = None,
) -> Float[Tensor, " edge"]:
    r"""Bin edges for [`histogram_counts`][vppo_core.analysis.histogram_counts]: ``bins + 1`` increasing float64 values.

    Linear edges $e_j = \mathrm{low} + j\,(\mathrm{high} - \mathrm{low}) / \mathrm{bins}$, or with
    ``log=True`` log-spaced ones $e_j = \mathrm{low}\,(\mathrm{high}/\mathrm{low})^{j / \mathrm{bins}}$
    (which need ``low > 0``: the long, roughly exponential tail of token dependency spans several
    decades, and zeros then land in the underflow count). The end points are exactly ``low`` and
    ``high``. Fixed edges make histograms from different steps and ranks addable.

    Shapes:
        - returns: ``[edge]`` with ``edge = bins + 1``

    Args:
        low: First edge.
        high: Last edge, ``> low``.
        bins: Number of bins, ``>= 1``.
        log: Log-spaced instead of linear.
        device: Where to create the edges (use the dependency's device).

    Returns:
        Float64 edges.

    Raises:
        ValueError: If ``low``/``high`` are not finite, ``high <= low``, ``bins < 1``, ``log``
            with ``low <= 0``, or a range too narrow for ``bins`` distinct float64 edges.

    Example:
        >>> from vppo_core.analysis import histogram_edges
        >>> histogram_edges(0.0, 1.0, 4)
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000], dtype=torch.float64)
        >>> histogram_edges(0.01, 10.0, 3, log=True).tolist()
        [0.01, 0.1, 1.0, 10.0]
    """
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"low and high must be finite with high > low, got low={low!r}, high={high!r}")
    if isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    if log and not low > 0:
        raise ValueError(f"log-spaced edges need low > 0, got low={low!r}; values below low go to the underflow count")
    if log:
        edges = torch.logspace(math.log10(low), math.log10(high), bins + 1, dtype=torch.float64)
    else:
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    edges[0], edges[-1] = low, high
    if not bool((edges[1:] > edges[:-1]).all()) or not bool(edges.isfinite().all()):
        raise ValueError(
            f"low={low!r} and high={high!r} are too close for {bins} distinct float64 bins"
            f"{' on a log scale' if log else ''}; widen the range or use fewer bins"
        )
    return edges.to(device) if device is not None else edges


def check_edges(edges: Tensor, name: str = "edges") -> None:
    """Host-side check (CPU edges only) that edges are finite and strictly increasing."""
    if edges.ndim != 1 or edges.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 values, got shape {tuple(edges.shape)}")
    if edges.device.type == "cpu" and not torch.compiler.is_compiling():
        e = edges.to(torch.float64)
        if not bool(torch.isfinite(e).all()) or not bool((e[1:] > e[:-1]).all()):
            raise ValueError(f"{name} must be finite and strictly increasing, got {edges.tolist()}")


@typechecked
def histogram_counts(
    dependency: Float[Tensor, "*shape"],
    response_mask: Shaped[Tensor, "*shape"],
    edges: Float[Tensor, " edge"],
) -> Int64[Tensor, " edge+1"]:
    r"""Integer histogram of the valid values, with underflow and overflow counts.

    With edges $e_0 < \dots < e_{B}$ ($B$ bins), the result has $B + 2$ counts:

    - ``counts[0]``: underflow, values $< e_0$ (e.g. zeros below the first log-spaced edge);
    - ``counts[j + 1]``: bin $j$, values in $[e_j, e_{j+1})$, half-open;
    - ``counts[B + 1]``: overflow, values $\ge e_B$ (the last edge itself included).

    So ``counts.sum()`` is the number of valid non-NaN values: nothing is dropped, and counts from
    different steps and ranks add up exactly (``torch.distributed.all_reduce`` the int64 tensor).
    NaN values are in no bin; count them with ``(dependency.isnan() & response_mask).sum()``.
    Works for any shape: pass the per-trajectory means (and ``response_mask.any(-1)``) for the
    trajectory-level histogram. Values are compared in float64; no host sync.

    Shapes:
        - ``dependency``, ``response_mask``: any shape, the same for both (``[batch, seq]``,
          or ``[batch]`` for trajectory values)
        - ``edges``: ``[edge]``
        - returns: ``[edge + 1]`` int64

    Args:
        dependency: Values to count.
        response_mask: Which values count (bool or 0/1).
        edges: Strictly increasing, finite bin edges on the same device, e.g. from
            [`histogram_edges`][vppo_core.analysis.histogram_edges].

    Returns:
        Int64 counts ``[underflow, bin_0, ..., bin_{B-1}, overflow]``.

    Raises:
        ValueError: If ``edges`` has fewer than two values or (checked for CPU edges) is not finite
            and strictly increasing.

    Example:
        >>> import torch
        >>> from vppo_core.analysis import histogram_counts
        >>> dep = torch.tensor([[0.0, 0.1, 0.6, 2.0], [0.5, float("nan"), 1.0, 0.2]])
        >>> mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])
        >>> histogram_counts(dep, mask, torch.tensor([0.1, 0.5, 1.0]))
        tensor([1, 2, 2, 2])
    """
    check_edges(edges)
    check_same_device(dependency=dependency, response_mask=response_mask, edges=edges)
    valid = as_bool_mask(response_mask)
    values = dependency.detach().to(torch.float64).reshape(-1)
    index = torch.bucketize(values, edges.to(torch.float64), right=True)
    weight = (valid.reshape(-1) & ~values.isnan()).long()
    return torch.zeros(edges.shape[0] + 1, dtype=torch.int64, device=edges.device).index_add(0, index, weight)


def histogram_quantile(counts: Sequence[int], edges: Sequence[float], lo: float, hi: float, q: float) -> float:
    """Quantile ``q`` of a histogram with under/overflow, by linear interpolation inside one bin.

    The target rank ``q * N`` falls in the first bin whose cumulative count reaches it; the value
    moves through that bin in proportion. Bin bounds are clipped to the exact extrema ``[lo, hi]``
    (which also bound the under- and overflow bins).
    """
    total = sum(counts)
    if total == 0 or math.isnan(lo) or math.isnan(hi):
        return float("nan")
    target = q * total
    cumulative = 0
    for j, c in enumerate(counts):
        if c == 0 or cumulative + c < target:
            cumulative += c
            continue
        left = lo if j == 0 else max(edges[j - 1], lo)
        right = hi if j == len(counts) - 1 else min(edges[j], hi)
        frac = min(max((target - cumulative) / c, 0.0), 1.0)
        return min(max(left + frac * (right - left), lo), hi)
    return hi
