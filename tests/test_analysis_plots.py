"""vppo_core.analysis plots: PNG files from the Agg canvas, of the expected pixel size and not blank."""

import doctest
import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib")
from PIL import Image

from tests.helpers import assert_inputs_unchanged, random_mask
from vppo_core import token_filter_mask
from vppo_core.analysis import (
    DependencyAccumulator,
    plot_histogram,
    plot_token_distribution,
    plot_token_strip,
    plot_trajectory_distribution,
)


def rollouts(b=24, t=40):
    torch.manual_seed(3)
    mask = random_mask(b, t)
    scale = torch.empty(b, 1).log_normal_(-2.0, 0.7)
    dep = torch.empty(b, t).exponential_() * scale
    return torch.where(mask, dep, float("nan")), mask


def assert_png(path, fig, dpi):
    """A PNG of exactly figsize * dpi pixels with more than one colour."""
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        width, height = (round(v * dpi) for v in fig.get_size_inches())
        assert img.size == (width, height)
        extrema = img.convert("L").getextrema()
        assert extrema[0] < extrema[1]  # not a blank image
    assert type(fig.canvas).__name__ == "FigureCanvasAgg"


@pytest.mark.parametrize(
    ("yscale", "xscale", "n_axes"), [("both", "linear", 2), ("log", "log", 1), ("linear", "linear", 1)]
)
def test_token_distribution_png(tmp_path, yscale, xscale, n_axes):
    dep, mask = rollouts()
    path = tmp_path / "tokens.png"
    fig = assert_inputs_unchanged(plot_token_distribution, dep, mask, yscale=yscale, xscale=xscale, path=path, dpi=50)
    assert [ax.get_yscale() for ax in fig.axes] == (["linear", "log"] if yscale == "both" else [yscale])
    assert len(fig.axes) == n_axes and fig.axes[0].get_xscale() == xscale
    assert_png(path, fig, 50)


def test_trajectory_distribution_png_with_edges_and_nan(tmp_path):
    dep, mask = rollouts()
    dep[0, 0] = float("nan")  # a valid NaN: that trajectory is left out and counted
    path = tmp_path / "trajectories.png"
    fig = plot_trajectory_distribution(dep, mask, bins=torch.linspace(0, 0.5, 11), path=path, figsize=(5, 3))
    texts = [t.get_text() for t in fig.texts]
    assert any("1 NaN value(s) left out" in t for t in texts)
    assert_png(path, fig, 100)
    assert tuple(fig.get_size_inches()) == (5, 3)


@pytest.mark.parametrize(
    ("rows", "mask", "median"),
    [
        ([[1.0], [2.0], [3.0], [10.0]], [[1], [1], [1], [1]], 2.5),
        ([[1.0], [2.0], [30.0]], [[1], [1], [1]], 2.0),
        ([[0.5, 1.5], [4.0, 99.0], [2.0, 0.0], [7.0, 7.0]], [[1, 1], [1, 0], [1, 1], [1, 1]], 2.5),
    ],
)
def test_trajectory_distribution_marks_the_interpolated_median(rows, mask, median):
    """An even count: halfway between the two middle means, like torch.quantile and trajectory_quantiles."""
    means = sorted(sum(v for v, m in zip(r, mr) if m) / sum(mr) for r, mr in zip(rows, mask))
    n = len(means)
    assert (means[(n - 1) // 2] + means[n // 2]) / 2 == median  # the oracle, from the definition
    fig = plot_trajectory_distribution(torch.tensor(rows), torch.tensor(mask))
    for ax in fig.axes:
        (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("median")]
        assert line.get_xdata()[0] == median
        assert line.get_label() == f"median {median:.3g}"


def test_histogram_from_accumulator_png(tmp_path):
    dep, mask = rollouts()
    acc = DependencyAccumulator()
    acc.update(dep, mask)
    edges, counts = acc.token_histogram
    path = tmp_path / "hist.png"
    fig = plot_histogram(edges, counts, xscale="log", yscale="log", title="tokens", path=path, dpi=40)
    assert_png(path, fig, 40)


def test_token_strip_png_highlights_kept_tokens(tmp_path):
    tokens = ["The", " bar", " for", " 2019", " costs", " $", "42", ".\n", "So", " 42", "\t", "", " ", "x" * 300]
    dep = torch.tensor([0.01, 0.4, 0.02, 0.9, 0.05, 0.1, 1.3, 0.0, 0.01, 0.8, 0.0, float("nan"), 0.0, 0.2])
    keep = token_filter_mask(dep.nan_to_num()[None], torch.ones(1, len(tokens)), k=0.3)[0]
    path = tmp_path / "strip.png"
    fig = plot_token_strip(tokens, dep, keep, title="kept tokens", path=path, dpi=80, line_chars=40)
    assert_png(path, fig, 80)
    outlined = [p for p in fig.axes[0].patches if p.get_linewidth() > 0]
    assert len(outlined) == int(keep.sum()) == 5
    shown = [t.get_text() for t in fig.axes[0].texts]
    assert shown[7] == ".↵" and shown[10] == "→" and shown[12] == "␣" and shown[13].endswith("…")
    assert len(shown[13]) == 39  # fits on one line
    # plain lists work too, and without a mask nothing is outlined; more lines make a taller figure
    short = plot_token_strip(["a", "b"], [0.1, 0.2], line_chars=40, dpi=80)
    assert not [p for p in short.axes[0].patches if p.get_linewidth() > 0]
    assert short.get_size_inches()[1] < fig.get_size_inches()[1]


def test_token_strip_errors():
    with pytest.raises(ValueError, match=r"one entry per token, got lengths 2, 3 and 3"):
        plot_token_strip(["a", "b"], [0.1, 0.2, 0.3], [True, False, True])
    with pytest.raises(TypeError, match=r"got one str"):
        plot_token_strip("ab", [0.1, 0.2])
    with pytest.raises(ValueError, match=r"line_chars must be an integer >= 10, got 3"):
        plot_token_strip(["a"], [0.1], line_chars=3)
    with pytest.raises(ValueError, match=r"vmax must be a finite number > 0 or None, got 0.0"):
        plot_token_strip(["a"], [0.1], vmax=0.0)
    for dpi in (0, -3, True):  # checked before the size in pixels is computed
        with pytest.raises(ValueError, match=rf"dpi must be a positive integer, got {dpi!r}"):
            plot_token_strip(["a"], [0.1], dpi=dpi)


def test_distribution_errors():
    dep, mask = rollouts()
    with pytest.raises(ValueError, match=r"bins must be an integer >= 1 or a tensor of edges, got 0"):
        plot_token_distribution(dep, mask, bins=0)
    with pytest.raises(ValueError, match=r"xscale='log' needs positive dependency values"):
        plot_token_distribution(torch.zeros(2, 3), torch.ones(2, 3), xscale="log")
    with pytest.raises(ValueError, match=r"dpi must be a positive integer, got 0"):
        plot_trajectory_distribution(dep, mask, dpi=0)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'vppo_core\[plot\]'"):
        plot_token_strip(["a"], [0.1])


def test_importing_analysis_does_not_import_matplotlib():
    code = "import sys, vppo_core.analysis; assert 'matplotlib' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_examples_run():
    from vppo_core.analysis import plots

    result = doctest.testmod(plots)
    assert result.failed == 0 and result.attempted > 0


def test_docs_page_examples_run(tmp_path, monkeypatch):
    """docs/analysis.md's Python blocks run in order (the TensorBoard and W&B ones need those packages)."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "analysis.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        code = compile(block, str(page), "exec")  # every block at least compiles
        if "tensorboard" not in block and "wandb" not in block:
            exec(code, namespace)
    for name in ("token_dependency.png", "trajectory_dependency.png", "strip.png", "dependency.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert namespace["stats"]["dependency/token/count"] > 0


@pytest.mark.parametrize(
    ("values", "xscale"),
    [
        ([[-1 + 1e-15, -1.0, -1.0], [-1.0, -1.0, -1.0]], "linear"),  # negative, a few ulps apart (k1)
        ([[1e20, 1e20, 1e20]], "linear"),  # constant and large: low + 1 would equal low
        ([[1e308, 1e308], [1e308, 1e308]], "log"),  # widening the last edge must not overflow to inf
        ([[0.5, 0.5 * (1 + 1e-15)]], "log"),
    ],
)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # matplotlib's own, near 1e308
def test_distribution_of_near_constant_values_plots(tmp_path, values, xscale):
    dep = torch.tensor(values, dtype=torch.float64)
    mask = torch.ones(dep.shape, dtype=torch.bool)
    plots = (plot_token_distribution, plot_trajectory_distribution)
    if values[0][0] == 1e308:  # (a trajectory mean of these overflows to inf: no finite value to plot)
        plots = plots[:1]
    for plot in plots:
        out = tmp_path / f"{plot.__name__}.png"
        fig = plot(dep, mask, xscale=xscale, path=out, dpi=30)
        assert_png(out, fig, 30)
