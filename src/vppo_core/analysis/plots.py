"""Figures for the paper's two findings and for TGF on one response (matplotlib, the ``plot`` extra).

matplotlib is imported when a function is called, never at import time. Figures are built with
``matplotlib.figure.Figure`` on an Agg canvas: no pyplot state, no GUI backend, nothing is shown.
Each function returns the ``Figure`` (which a notebook displays) and, given ``path``, saves a PNG of
exactly ``figsize * dpi`` pixels. Plotting reads the data on the host (it syncs, like any plot).
"""

import math
import sys
from typing import Any, Literal

import torch
from jaxtyping import Float, Integer, Shaped
from torch import Tensor

from .._checks import as_bool_mask, check_choice, typechecked
from ._figures import PathLike, _figure, _save
from ._histogram import check_edges, histogram_counts, histogram_edges
from ._strip import plot_token_strip

__all__ = ["plot_histogram", "plot_token_distribution", "plot_token_strip", "plot_trajectory_distribution"]


def _valid_values(values: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Valid values as float64 on the host, without NaN, and how many NaN were dropped."""
    x = values.detach().to(device="cpu", dtype=torch.float64)[as_bool_mask(mask).cpu()]
    nan = x.isnan()
    return x[~nan], int(nan.sum())


def _auto_edges(values: Tensor, bins: int | Tensor, xscale: str, name: str) -> Tensor:
    if isinstance(bins, Tensor):
        check_edges(bins, "bins")
        return bins.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1 or a tensor of edges, got {bins!r}")
    finite = values[values.isfinite()]
    if xscale == "log":
        finite = finite[finite > 0]
        if finite.numel() == 0:
            raise ValueError(f"xscale='log' needs positive {name} values, got none; use xscale='linear'")
        low, high = float(finite.min()), float(finite.max())
        # never past the largest float (values near it would overflow the widened end to inf)
        if high > low * (1 + 1e-6):
            high = min(high * (1 + 1e-9), sys.float_info.max)
        else:  # too narrow for distinct log bins (constant data): a decade
            high = min(high * 10, sys.float_info.max)
            low = low if high > low * (1 + 1e-6) else low / 10
        return histogram_edges(low, high, bins, log=True)
    if finite.numel() == 0:
        return histogram_edges(0.0, 1.0, bins)
    low, high = min(float(finite.min()), 0.0), float(finite.max())
    # keep the maximum inside the last bin; a range of a few ulps (constant or near-constant data)
    # is widened to at least 1 (or 1e-6 of the values' size)
    if high - low > 64 * bins * math.ulp(max(abs(low), abs(high))):
        high = high + (high - low) * 1e-9
    else:
        high = low + max(1.0, abs(low) * 1e-6)
    return histogram_edges(low, high, bins)


def _draw_histogram(ax: Any, edges: Tensor, counts: Tensor, *, xscale: str, yscale: str, label: str | None) -> None:
    e, c = edges.tolist(), counts.tolist()
    ax.stairs(c[1:-1], e, fill=True, alpha=0.75, label=label)
    ax.set_xscale(xscale)
    if yscale == "log":
        ax.set_yscale("log")
    notes = []
    if c[0]:
        notes.append(f"{c[0]} below {e[0]:.3g}")
    if c[-1]:
        notes.append(f"{c[-1]} at or above {e[-1]:.3g}")
    if notes:
        ax.text(0.98, 0.5, "\n".join(notes), transform=ax.transAxes, ha="right", va="center", fontsize=8)


def _axes_for(fig: Any, yscale: str) -> list[tuple[Any, str]]:
    scales = ["linear", "log"] if yscale == "both" else [yscale]
    axes = fig.subplots(1, len(scales), squeeze=False)[0]
    return list(zip(axes, scales))


@typechecked
def plot_histogram(
    edges: Float[Tensor, " edge"],
    counts: Integer[Tensor, " edge+1"],
    *,
    yscale: Literal["linear", "log", "both"] = "both",
    xscale: Literal["linear", "log"] = "linear",
    xlabel: str = "visual dependency",
    ylabel: str = "tokens",
    title: str | None = None,
    path: PathLike | None = None,
    dpi: int = 100,
    figsize: tuple[float, float] | None = None,
) -> Any:
    """Plot a histogram with under- and overflow counts, e.g. one streamed by the accumulator.

    Draws the bins of [`histogram_counts`][vppo_core.analysis.histogram_counts] (or
    ``DependencyAccumulator.token_histogram``) as steps; non-zero under- and overflow counts are
    written in the corner. ``yscale="both"`` draws a linear and a log panel side by side: an
    exponential tail is a straight line on the log panel.

    Shapes:
        - ``edges``: ``[edge]``
        - ``counts``: ``[edge + 1]``

    Args:
        edges: Bin edges.
        counts: ``[underflow, bin_0, ..., overflow]``.
        yscale: ``"linear"``, ``"log"`` or ``"both"`` (two panels).
        xscale: ``"log"`` for log-spaced edges.
        xlabel: Label of the x axis.
        ylabel: Label of the y axis.
        title: Figure title.
        path: Save a PNG there.
        dpi: Pixels per inch of the saved image.
        figsize: ``(width, height)`` in inches; default ``(11, 4)`` for two panels, else ``(6, 4)``.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: Without matplotlib (``pip install 'vppo_core[plot]'``).

    Example:
        >>> from vppo_core.analysis import histogram_edges, plot_histogram
        >>> import torch
        >>> fig = plot_histogram(histogram_edges(0.0, 1.0, 4), torch.tensor([0, 5, 3, 1, 1, 2]))
        >>> fig.get_size_inches().tolist()
        [11.0, 4.0]
    """
    check_choice("yscale", yscale, ("linear", "log", "both"))
    check_choice("xscale", xscale, ("linear", "log"))
    check_edges(edges)
    figsize = figsize or ((11.0, 4.0) if yscale == "both" else (6.0, 4.0))
    fig = _figure(figsize, dpi)
    e, c = edges.detach().cpu().to(torch.float64), counts.detach().cpu()
    for ax, scale in _axes_for(fig, yscale):
        _draw_histogram(ax, e, c, xscale=xscale, yscale=scale, label=None)
        ax.set(xlabel=xlabel, ylabel=ylabel + (" (log)" if scale == "log" else ""))
    if title:
        fig.suptitle(title)
    fig.set_layout_engine("constrained")
    return _save(fig, path)


@typechecked
def plot_token_distribution(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    bins: int | Float[Tensor, " edge"] = 60,
    yscale: Literal["linear", "log", "both"] = "both",
    xscale: Literal["linear", "log"] = "linear",
    fit_exponential: bool = True,
    title: str | None = "Token visual dependency",
    path: PathLike | None = None,
    dpi: int = 100,
    figsize: tuple[float, float] | None = None,
) -> Any:
    r"""The distribution of token visual dependency over every valid token (the paper's first finding).

    Most tokens barely depend on the image; a few depend on it a lot. With ``yscale="both"`` the
    right panel's log axis shows the long tail; ``fit_exponential`` overlays the exponential
    distribution with the same mean, $N\,(e^{-a/\mu} - e^{-b/\mu})$ tokens in bin $[a, b)$, which
    the tail roughly follows (VPPO, arXiv:2510.09285, Sec. 3). NaN values are left out and counted
    in the corner, as are values outside the edges.

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - ``bins``: an integer, or ``[edge]`` edges

    Args:
        dependency: Token visual dependency.
        response_mask: Valid response tokens (bool or 0/1).
        bins: Number of bins between ``min(0, min S)`` and ``max S`` (log-spaced from the smallest
            positive value with ``xscale="log"``), or the edges themselves.
        yscale: ``"linear"``, ``"log"`` or ``"both"`` (two panels).
        xscale: ``"linear"`` or ``"log"``.
        fit_exponential: Overlay the exponential distribution with the same mean (for non-negative
            dependency).
        title: Figure title (``None`` for none).
        path: Save a PNG there.
        dpi: Pixels per inch of the saved image.
        figsize: ``(width, height)`` in inches; default ``(11, 4)`` for two panels, else ``(6, 4)``.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: If ``bins`` is not a positive integer or valid edges, or ``xscale="log"`` with
            no positive value.
        ImportError: Without matplotlib (``pip install 'vppo_core[plot]'``).

    Example:
        >>> import torch
        >>> from vppo_core.analysis import plot_token_distribution
        >>> dep = torch.distributions.Exponential(torch.tensor(8.0)).sample((16, 64))
        >>> fig = plot_token_distribution(dep, torch.ones(16, 64, dtype=torch.bool))
        >>> fig.axes[0].get_yscale(), fig.axes[1].get_yscale()
        ('linear', 'log')
    """
    check_choice("yscale", yscale, ("linear", "log", "both"))
    check_choice("xscale", xscale, ("linear", "log"))
    values, n_nan = _valid_values(dependency, response_mask)
    edges = _auto_edges(values, bins, xscale, "dependency")
    counts = histogram_counts(values, torch.ones_like(values, dtype=torch.bool), edges)
    figsize = figsize or ((11.0, 4.0) if yscale == "both" else (6.0, 4.0))
    fig = _figure(figsize, dpi)
    n = values.numel()
    mean = float(values.mean()) if n else float("nan")
    for ax, scale in _axes_for(fig, yscale):
        _draw_histogram(ax, edges, counts, xscale=xscale, yscale=scale, label=f"{n} tokens")
        if fit_exponential and n and mean > 0 and float(edges[0]) >= 0:
            tail = torch.exp(-edges / mean)
            expected = (n * (tail[:-1] - tail[1:])).tolist()
            ax.stairs(expected, edges.tolist(), color="black", linestyle="--", label=f"exponential, mean {mean:.3g}")
        if scale == "log":
            ax.set_ylim(bottom=0.5)  # the fitted tail would otherwise stretch the axis to tiny counts
        ax.set(xlabel="token visual dependency $S_t$", ylabel="tokens" + (" (log)" if scale == "log" else ""))
        ax.legend(loc="upper right", fontsize=8)
    if n_nan:
        fig.text(0.01, 0.01, f"{n_nan} NaN value(s) left out", fontsize=8, color="red")
    if title:
        fig.suptitle(title)
    fig.set_layout_engine("constrained")
    return _save(fig, path)


@typechecked
def plot_trajectory_distribution(
    dependency: Float[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    bins: int | Float[Tensor, " edge"] = 30,
    yscale: Literal["linear", "log", "both"] = "linear",
    xscale: Literal["linear", "log"] = "linear",
    title: str | None = "Trajectory visual dependency",
    path: PathLike | None = None,
    dpi: int = 100,
    figsize: tuple[float, float] | None = None,
) -> Any:
    r"""The distribution of trajectory dependency $\bar S(\tau_i)$ (the paper's second finding).

    One value per trajectory with at least one valid token: its mean token dependency, from
    [`trajectory_dependency`][vppo_core.trajectory_dependency]. The paper finds it right-skewed:
    trajectories differ a lot in how much they look at the image, which TAS exploits. Vertical
    lines mark the mean and the median (halfway between the two middle values for an even count,
    like ``torch.quantile`` and [`trajectory_quantiles`][vppo_core.analysis.trajectory_quantiles]);
    the legend states the count and the sample skewness
    $\frac{1}{n}\sum (x - \bar x)^3 / \sigma^3$.

    Shapes:
        - ``dependency``, ``response_mask``: ``[batch, seq]``
        - ``bins``: an integer, or ``[edge]`` edges

    Args:
        dependency: Token visual dependency.
        response_mask: Valid response tokens (bool or 0/1).
        bins: Number of bins, or the edges themselves.
        yscale: ``"linear"``, ``"log"`` or ``"both"`` (two panels).
        xscale: ``"linear"`` or ``"log"``.
        title: Figure title (``None`` for none).
        path: Save a PNG there.
        dpi: Pixels per inch of the saved image.
        figsize: ``(width, height)`` in inches; default ``(11, 4)`` for two panels, else ``(6, 4)``.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: If ``bins`` is not a positive integer or valid edges, or ``xscale="log"`` with
            no positive value.
        ImportError: Without matplotlib (``pip install 'vppo_core[plot]'``).

    Example:
        >>> import torch
        >>> from vppo_core.analysis import plot_trajectory_distribution
        >>> dep = torch.rand(32, 20) ** 4
        >>> fig = plot_trajectory_distribution(dep, torch.ones(32, 20), path=None)
        >>> fig.axes[0].get_xlabel()
        'trajectory dependency (mean over tokens)'
    """
    check_choice("yscale", yscale, ("linear", "log", "both"))
    check_choice("xscale", xscale, ("linear", "log"))
    valid = as_bool_mask(response_mask)
    rows = valid.any(-1)
    means = torch.where(valid, dependency.detach().to(torch.float64), 0.0).sum(-1) / valid.sum(-1).clamp_min(1)
    values, n_nan = _valid_values(means, rows)
    edges = _auto_edges(values, bins, xscale, "trajectory")
    counts = histogram_counts(values, torch.ones_like(values, dtype=torch.bool), edges)
    figsize = figsize or ((11.0, 4.0) if yscale == "both" else (6.0, 4.0))
    fig = _figure(figsize, dpi)
    n = values.numel()
    stats = None
    if n > 2:
        centred = values - values.mean()
        std = float(centred.square().mean().sqrt())
        skew = float(centred.pow(3).mean()) / std**3 if std > 0 else 0.0
        stats = f"skewness {skew:.2f}"
    for ax, scale in _axes_for(fig, yscale):
        _draw_histogram(ax, edges, counts, xscale=xscale, yscale=scale, label=f"{n} trajectories")
        if n:
            mean, median = float(values.mean()), float(torch.quantile(values, 0.5))  # interpolated median
            ax.axvline(mean, color="black", linestyle="--", label=f"mean {mean:.3g}")
            ax.axvline(median, color="tab:red", linestyle=":", label=f"median {median:.3g}")
        ax.set(xlabel="trajectory dependency (mean over tokens)", ylabel="trajectories")
        ax.legend(loc="upper right", fontsize=8, title=stats, title_fontsize=8)
    if n_nan:
        fig.text(0.01, 0.01, f"{n_nan} NaN value(s) left out", fontsize=8, color="red")
    if title:
        fig.suptitle(title)
    fig.set_layout_engine("constrained")
    return _save(fig, path)
