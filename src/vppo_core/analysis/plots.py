"""Figures for the paper's two findings and for TGF on one response (matplotlib, the ``plot`` extra).

matplotlib is imported when a function is called, never at import time. Figures are built with
``matplotlib.figure.Figure`` on an Agg canvas: no pyplot state, no GUI backend, nothing is shown.
Each function returns the ``Figure`` (which a notebook displays) and, given ``path``, saves a PNG of
exactly ``figsize * dpi`` pixels. Plotting reads the data on the host (it syncs, like any plot).
"""

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Integer, Shaped
from torch import Tensor

from .._checks import as_bool_mask, check_choice, typechecked
from ._histogram import check_edges, histogram_counts, histogram_edges

__all__ = ["plot_histogram", "plot_token_distribution", "plot_token_strip", "plot_trajectory_distribution"]

PathLike = str | os.PathLike[str]


def _matplotlib() -> Any:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "vppo_core.analysis plots need matplotlib, an optional dependency: pip install 'vppo_core[plot]'"
        ) from err
    return Figure, FigureCanvasAgg


def _figure(figsize: tuple[float, float], dpi: int) -> Any:
    if not (isinstance(dpi, int) and dpi > 0):
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")
    if len(figsize) != 2 or not all(math.isfinite(v) and v > 0 for v in figsize):
        raise ValueError(f"figsize must be (width, height) in inches, both > 0, got {figsize!r}")
    figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=figsize, dpi=dpi)
    canvas_cls(fig)
    return fig


def _save(fig: Any, path: PathLike | None) -> Any:
    if path is not None:
        fig.savefig(path, format="png", dpi=fig.dpi)
    return fig


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
        high = high * 10 if high <= low else high * (1 + 1e-9)
        return histogram_edges(low, high, bins, log=True)
    if finite.numel() == 0:
        return histogram_edges(0.0, 1.0, bins)
    low, high = min(float(finite.min()), 0.0), float(finite.max())
    high = low + 1.0 if high <= low else high + (high - low) * 1e-9  # keep the maximum inside the last bin
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
    lines mark the mean and the median; the legend states the count and the sample skewness
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
            mean, median = float(values.mean()), float(values.median())
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


# ----------------------------------------------------------------------------- token strip

_SHOWN = {"\n": "↵", "\t": "→", "\r": ""}


def _shown(token: str, limit: int) -> str:
    text = "".join(_SHOWN.get(ch, ch if ch.isprintable() else "·") for ch in token)
    if not text.strip():
        text = "␣" * max(len(text), 1)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@typechecked
def plot_token_strip(
    tokens: Sequence[str],
    dependency: Float[Tensor, " seq"] | Sequence[float],
    kept: Bool[Tensor, " seq"] | Sequence[bool] | None = None,
    *,
    line_chars: int = 80,
    vmax: float | None = None,
    cmap: str = "YlOrRd",
    fontsize: float = 10.0,
    family: str | Sequence[str] = "monospace",
    title: str | None = None,
    path: PathLike | None = None,
    dpi: int = 100,
) -> Any:
    r"""One decoded response, each token shaded by its visual dependency, TGF's kept tokens outlined.

    The picture that makes VPPO obvious: the few tokens that read the image (numbers, objects,
    spatial words) are dark and boxed; the reasoning filler around them is pale and gets no
    gradient under TGF. Tokens flow left to right in a monospace font and wrap at ``line_chars``
    characters (and after a newline token); newlines show as ``↵``, whitespace-only tokens as ``␣``.
    Token strings are drawn literally (``$`` is not maths). NaN dependency is grey.

    For row ``i`` of a batch, pass the valid positions only, e.g.
    ``m = mask[i].bool(); plot_token_strip(tokens, dep[i][m], keep[i][m])`` with
    ``keep = token_filter_mask(dep, mask, k=0.4)`` and ``tokens`` the response decoded token by token.

    The figure is ``line_chars`` characters wide (about ``0.6 * fontsize`` points each) and as tall
    as the wrapped text needs; its size is rounded to whole pixels at ``dpi``.

    Shapes:
        - ``tokens``, ``dependency``, ``kept``: ``[seq]`` (equal lengths)

    Args:
        tokens: The response's tokens as strings.
        dependency: Each token's visual dependency.
        kept: Each token's TGF mask (e.g. a row of
            [`token_filter_mask`][vppo_core.token_filter_mask]); ``None`` outlines nothing.
        line_chars: Characters per line, ``>= 10``.
        vmax: Dependency at the darkest colour (default: the largest finite value).
        cmap: A matplotlib colormap name (light for low values reads best).
        fontsize: Font size in points.
        family: Font family, or a list tried in turn per glyph. The default monospace font
            (DejaVu Sans Mono) has no CJK glyphs: matplotlib warns and draws boxes; add an
            installed font, e.g. ``["DejaVu Sans Mono", "Noto Sans CJK SC"]``.
        title: Figure title.
        path: Save a PNG there.
        dpi: Pixels per inch of the saved image.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ValueError: If the lengths differ, ``line_chars < 10``, or ``vmax <= 0``.
        ImportError: Without matplotlib (``pip install 'vppo_core[plot]'``).

    Example:
        >>> import torch
        >>> from vppo_core import token_filter_mask
        >>> from vppo_core.analysis import plot_token_strip
        >>> tokens = ["The", " bar", " for", " 2019", " is", " 42", "."]
        >>> dep = torch.tensor([0.01, 0.3, 0.02, 0.9, 0.01, 1.2, 0.0])
        >>> keep = token_filter_mask(dep[None], torch.ones(1, 7), k=0.4)[0]
        >>> fig = plot_token_strip(tokens, dep, keep, title="k = 0.4")
        >>> len(fig.axes)  # the text and the colour bar
        2
    """
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of token strings, got one str; pass a list of tokens")
    values = [float(v) for v in (dependency.detach().cpu().tolist() if isinstance(dependency, Tensor) else dependency)]
    if kept is None:
        keep = [False] * len(values)
    else:
        keep = [bool(v) for v in (kept.tolist() if isinstance(kept, Tensor) else kept)]
    if not (len(tokens) == len(values) == len(keep)):
        raise ValueError(
            "tokens, dependency and kept must have one entry per token, got lengths "
            f"{len(tokens)}, {len(values)} and {len(keep)}"
        )
    if isinstance(line_chars, bool) or line_chars < 10:
        raise ValueError(f"line_chars must be an integer >= 10, got {line_chars!r}")
    if vmax is not None and not (math.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be a finite number > 0 or None, got {vmax!r}")
    if not (math.isfinite(fontsize) and fontsize > 0):
        raise ValueError(f"fontsize must be > 0, got {fontsize!r}")
    _matplotlib()
    import matplotlib as mpl
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch, Rectangle

    # Layout in character cells: x in characters, y in lines.
    gap = 0.35
    cells: list[tuple[float, int, float, str]] = []  # (x, line, width, text)
    x, line = 0.0, 0
    for token in tokens:
        text = _shown(token, line_chars - 1)
        width = len(text) + 0.4
        if x > 0 and x + width > line_chars:
            x, line = 0.0, line + 1
        cells.append((x, line, width, text))
        x += width + gap
        if "\n" in token:
            x, line = 0.0, line + 1
    n_lines = max((c[1] for c in cells), default=0) + 1

    char_w, line_h = 0.6 * fontsize / 72, 2.0 * fontsize / 72  # inches
    pad, top, bottom = 0.3, (0.5 if title else 0.2), 0.75
    width_in = math.ceil((line_chars * char_w + 2 * pad) * dpi) / dpi
    height_in = math.ceil((top + n_lines * line_h + bottom) * dpi) / dpi
    fig = _figure((width_in, height_in), dpi)
    ax = fig.add_axes((pad / width_in, bottom / height_in, 1 - 2 * pad / width_in, n_lines * line_h / height_in))
    ax.set_xlim(0, line_chars)
    ax.set_ylim(n_lines, 0)
    ax.set_axis_off()

    finite = [v for v in values if math.isfinite(v)]
    top_value = vmax if vmax is not None else max([*finite, 0.0])
    norm = Normalize(vmin=0.0, vmax=top_value if top_value > 0 else 1.0)
    colormap = mpl.colormaps[cmap].with_extremes(bad="lightgrey")
    outline = "tab:blue"
    for (cx, cy, cw, text), value, is_kept in zip(cells, values, keep):
        face = colormap(norm(value)) if not math.isnan(value) else colormap(float("nan"))
        ax.add_patch(
            Rectangle(
                (cx, cy + 0.1),
                cw,
                0.8,
                facecolor=face,
                edgecolor=outline if is_kept else "none",
                linewidth=2.0 if is_kept else 0.0,
            )
        )
        r, g, b = face[:3]
        ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black"
        ax.text(
            cx + cw / 2,
            cy + 0.5,
            text,
            ha="center",
            va="center",
            family=family,
            fontsize=fontsize,
            color=ink,
            parse_math=False,
        )

    bar = fig.add_axes((pad / width_in, 0.4 / height_in, 0.45 * (1 - 2 * pad / width_in), 0.12 / height_in))
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=colormap), cax=bar, orientation="horizontal")
    bar.tick_params(labelsize=8)
    bar.set_title("visual dependency", fontsize=8, loc="left")
    if kept is not None:
        label = f"kept by TGF: {sum(keep)} of {len(keep)} tokens"
        handle = Patch(facecolor="none", edgecolor=outline, linewidth=2.0, label=label)
        fig.legend(handles=[handle], loc="lower right", fontsize=8, frameon=False, bbox_to_anchor=(1 - 0.02, 0.0))
    if title:
        fig.suptitle(title, y=1 - 0.12 / height_in, va="top")
    return _save(fig, path)
