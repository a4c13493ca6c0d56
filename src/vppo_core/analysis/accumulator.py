"""A streaming accumulator of dependency statistics, for watching them during training.

Each ``update`` adds one batch's sums, counts, extrema and histogram counts to a fixed set of
tensors on the data's device (no host sync); ranks are combined with one ``all_reduce`` per
reduction kind; ``summary`` turns the state into plain floats for any logger.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from jaxtyping import Float, Integer, Shaped
from torch import Tensor

from .._checks import as_bool_mask, check_fraction, check_same_device, result_dtype, typechecked
from ..distributed import ProcessGroupLike, resolve_group
from ._groups import group_spread
from ._histogram import check_edges, histogram_counts, histogram_edges, histogram_quantile
from ._stats import gini, levels, top_share

__all__ = ["DependencyAccumulator"]


def _default_token_edges() -> Tensor:
    return histogram_edges(1e-6, 100.0, 80, log=True)  # 10 bins per decade


def _default_trajectory_edges() -> Tensor:
    return histogram_edges(1e-4, 10.0, 50, log=True)


# State entries by how they combine across updates and ranks. Sums of floats are float64, counts int64.
_INT_SUMS = ("token_count", "token_nan", "token_above", "token_hist", "traj_count", "traj_hist", "group_count")
_FLOAT_SUMS = (
    "token_sum",
    "token_sumsq",
    "traj_sum",
    "traj_sumsq",
    "traj_share",
    "traj_gini",
    "group_ratio",
    "group_std",
)
_MINS = ("token_min", "traj_min")
_MAXS = ("token_max", "traj_max")


def _tag(value: float) -> str:
    """``0.5 -> '50'``, ``0.025 -> '2.5'``: a level as a percentage for a metric name."""
    return f"{100 * value:g}"


@dataclass(eq=False)
class DependencyAccumulator:
    r"""Streaming statistics of token and trajectory visual dependency, mergeable across ranks.

    Call [`update`][vppo_core.analysis.DependencyAccumulator.update] with each rollout batch (cheap,
    no host sync), and [`summary`][vppo_core.analysis.DependencyAccumulator.summary] once per
    logging step for a ``dict[str, float]`` that TensorBoard, W&B or a CSV writer take as is;
    [`reset`][vppo_core.analysis.DependencyAccumulator.reset] to start a new window. The state is a
    few small tensors on the device of the data; pass ``process_group`` to ``summary`` (or call
    [`reduced`][vppo_core.analysis.DependencyAccumulator.reduced]) for statistics over every rank.

    **Exact under streaming** (the same, up to float64 summation order, whether the data come in one
    batch, in many, or spread over ranks): token and trajectory counts, means, standard deviations
    (unbiased, from float64 sums and sums of squares), minima and maxima; the pooled fraction of
    tokens above each threshold (integer counts); the top-$k$ shares and Gini coefficients averaged
    over trajectories (each trajectory lies whole in one batch); the histogram counts (integers with
    fixed edges); and the group spread averaged over groups, provided each group (the responses to
    one prompt) lies whole in one ``update`` on one rank; a split group is measured as separate parts.

    **Approximate**: the token and trajectory quantiles, read off the histograms by linear
    interpolation inside the bin that holds the target rank (the underflow bin spans
    $[\min, e_0)$, the overflow bin $[e_B, \max]$, with the exact extrema); the error is at most
    about one bin width. Use [`trajectory_quantiles`][vppo_core.analysis.trajectory_quantiles] on a
    batch for exact values.

    A NaN at a valid token is counted in ``token/nan_count`` and makes every other token, trajectory
    and group statistic NaN (never silently dropped). Padding is never read.

    Args:
        token_edges: Bin edges of the token histogram (default: log-spaced, $10^{-6}$ to $10^{2}$,
            10 bins per decade).
        trajectory_edges: Bin edges of the trajectory-mean histogram (default: log-spaced,
            $10^{-4}$ to $10$, 10 bins per decade).
        quantiles: Levels in $[0, 1]$ reported (approximately) for tokens and trajectories.
        top_fractions: Fractions $k \in (0, 1]$ for the average top-$k$ share (0.4 is TGF's $k$).
        thresholds: Thresholds for the pooled fraction of tokens above them.
        eps: The ``eps`` of [`group_spread`][vppo_core.analysis.group_spread]'s max/min ratio.
        device: Where the state lives until the first update, which moves an untouched state to the
            data's device. Give it for ranks that may summarise before any update under NCCL.

    Example:
        >>> import torch
        >>> from vppo_core.analysis import DependencyAccumulator
        >>> acc = DependencyAccumulator(quantiles=(0.5,), top_fractions=(0.5,), thresholds=(1.0,))
        >>> dep = torch.tensor([[0.1, 0.3, 2.0, 0.0], [0.2, 0.2, 0.2, 0.2]])
        >>> mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
        >>> acc.update(dep, mask, group_ids=torch.tensor([0, 0]))
        >>> stats = acc.summary()
        >>> stats["dependency/token/count"], round(stats["dependency/token/mean"], 4)
        (7.0, 0.4571)
        >>> round(stats["dependency/token/frac_above_1"], 4), round(stats["dependency/trajectory/top50_share"], 4)
        (0.1429, 0.7292)
    """

    token_edges: Tensor = field(default_factory=_default_token_edges, repr=False)
    trajectory_edges: Tensor = field(default_factory=_default_trajectory_edges, repr=False)
    quantiles: Sequence[float] = (0.5, 0.9, 0.99)
    top_fractions: Sequence[float] = (0.1, 0.2, 0.4)
    thresholds: Sequence[float] = (0.01, 0.1, 1.0)
    eps: float = 1e-6
    device: torch.device | str = "cpu"
    state: dict[str, Tensor] = field(init=False, repr=False)
    """The accumulated tensors (read them, e.g. ``state["token_hist"]``, but don't write them)."""
    _updated: bool = field(init=False, repr=False, default=False)

    def __post_init__(self) -> None:
        for name in ("token_edges", "trajectory_edges"):
            edges = getattr(self, name)
            if not (isinstance(edges, Tensor) and edges.is_floating_point()):
                raise TypeError(f"{name} must be a float tensor of bin edges, got {type(edges).__name__}")
            check_edges(edges, name)
        self.quantiles, _ = levels("quantiles", self.quantiles)
        for v in self.quantiles:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"every level in quantiles must be in [0, 1], got {v!r}")
        self.top_fractions, _ = levels("top_fractions", self.top_fractions)
        for v in self.top_fractions:
            check_fraction("top_fractions", v)
        self.thresholds, _ = levels("thresholds", self.thresholds)
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything accumulated (keeps the configuration and the device)."""
        device = torch.device(self.device)
        self.token_edges = self.token_edges.to(device=device, dtype=torch.float64)
        self.trajectory_edges = self.trajectory_edges.to(device=device, dtype=torch.float64)

        def ints(n: int | None = None) -> Tensor:
            return torch.zeros(() if n is None else n, dtype=torch.int64, device=device)

        def floats(n: int | None = None, value: float = 0.0) -> Tensor:
            return torch.full(() if n is None else (n,), value, dtype=torch.float64, device=device)

        inf = float("inf")
        self.state = {
            "token_count": ints(),
            "token_nan": ints(),
            "token_sum": floats(),
            "token_sumsq": floats(),
            "token_min": floats(value=inf),
            "token_max": floats(value=-inf),
            "token_above": ints(len(self.thresholds)),
            "token_hist": ints(self.token_edges.shape[0] + 1),
            "traj_count": ints(),
            "traj_sum": floats(),
            "traj_sumsq": floats(),
            "traj_min": floats(value=inf),
            "traj_max": floats(value=-inf),
            "traj_hist": ints(self.trajectory_edges.shape[0] + 1),
            "traj_share": floats(len(self.top_fractions)),
            "traj_gini": floats(),
            "group_count": ints(),
            "group_ratio": floats(),
            "group_std": floats(),
        }
        self._updated = False

    def _move_to(self, device: torch.device) -> None:
        self.device = device
        self.token_edges = self.token_edges.to(device)
        self.trajectory_edges = self.trajectory_edges.to(device)
        self.state = {k: v.to(device) for k, v in self.state.items()}

    def _copy(self) -> "DependencyAccumulator":
        out = dataclasses.replace(self)  # same configuration, fresh state (reset by __post_init__)
        out.state = {k: v.clone() for k, v in self.state.items()}
        out._updated = self._updated
        return out

    # ------------------------------------------------------------------ accumulate

    @typechecked
    def update(
        self,
        dependency: Float[Tensor, "batch seq"],
        response_mask: Shaped[Tensor, "batch seq"],
        group_ids: Integer[Tensor, " batch"] | None = None,
    ) -> None:
        """Add one batch (no host sync; the inputs are neither modified nor kept).

        Shapes:
            - ``dependency``, ``response_mask``: ``[batch, seq]``
            - ``group_ids``: ``[batch]``

        Args:
            dependency: Token visual dependency.
            response_mask: Valid response tokens (bool or 0/1).
            group_ids: Group (prompt) of each trajectory, for the within-group spread; ``None``
                skips the group statistics for this batch.

        Raises:
            ValueError: If the tensors are on different devices, or on another device than the
                data of earlier updates.
        """
        check_same_device(dependency=dependency, response_mask=response_mask, group_ids=group_ids)
        if dependency.device != self.state["token_count"].device:
            if self._updated:
                raise ValueError(
                    f"dependency is on {dependency.device} but this accumulator holds data on "
                    f"{self.state['token_count'].device}; keep every update on one device"
                )
            self._move_to(dependency.device)
        s = self.state
        valid = as_bool_mask(response_mask)
        dep = dependency.detach().to(result_dtype(dependency))
        x = torch.where(valid, dep, 0.0).to(torch.float64)  # padding never read
        inf = float("inf")
        s["token_count"] += valid.sum()
        s["token_nan"] += (valid & dep.isnan()).sum()
        s["token_sum"] += x.sum()
        s["token_sumsq"] += x.square().sum()
        lowest = torch.where(valid, x, inf).reshape(-1)
        highest = torch.where(valid, x, -inf).reshape(-1)
        s["token_min"] = torch.cat([lowest, s["token_min"].reshape(1)]).amin()
        s["token_max"] = torch.cat([highest, s["token_max"].reshape(1)]).amax()
        s["token_above"] += torch.stack([((x > c) & valid).sum() for c in self.thresholds])
        s["token_hist"] += histogram_counts(x, valid, self.token_edges)

        n = valid.sum(-1)
        row = n > 0
        mean = x.sum(-1) / n.clamp_min(1)
        m = torch.where(row, mean, 0.0)
        s["traj_count"] += row.sum()
        s["traj_sum"] += m.sum()
        s["traj_sumsq"] += m.square().sum()
        s["traj_min"] = torch.cat([torch.where(row, mean, inf), s["traj_min"].reshape(1)]).amin()
        s["traj_max"] = torch.cat([torch.where(row, mean, -inf), s["traj_max"].reshape(1)]).amax()
        s["traj_hist"] += histogram_counts(mean, row, self.trajectory_edges)
        shares = top_share(dep, valid, self.top_fractions).to(torch.float64)
        s["traj_share"] += torch.where(row.unsqueeze(-1), shares, 0.0).sum(0)
        s["traj_gini"] += torch.where(row, gini(dep, valid).to(torch.float64), 0.0).sum()

        if group_ids is not None:
            spread = group_spread(dep, valid, group_ids, eps=self.eps)
            ok = spread.size >= 2
            s["group_count"] += ok.sum()
            s["group_ratio"] += torch.where(ok, spread.ratio.to(torch.float64), 0.0).sum()
            s["group_std"] += torch.where(ok, spread.std.to(torch.float64), 0.0).sum()
        self._updated = True

    def merge(self, other: "DependencyAccumulator") -> "DependencyAccumulator":
        """Add another accumulator's state to this one (same configuration), in place; returns ``self``.

        Raises:
            ValueError: If the two differ in edges, levels, thresholds or ``eps``.
        """
        same = (
            self.quantiles == other.quantiles
            and self.top_fractions == other.top_fractions
            and self.thresholds == other.thresholds
            and self.eps == other.eps
            and torch.equal(self.token_edges.cpu(), other.token_edges.cpu())
            and torch.equal(self.trajectory_edges.cpu(), other.trajectory_edges.cpu())
        )
        if not same:
            raise ValueError("can only merge accumulators with the same edges, levels, thresholds and eps")
        if not self._updated and other._updated:
            self._move_to(other.state["token_count"].device)
        for name in _INT_SUMS + _FLOAT_SUMS:
            self.state[name] = self.state[name] + other.state[name].to(self.state[name].device)
        for name in _MINS:
            self.state[name] = torch.minimum(self.state[name], other.state[name].to(self.state[name].device))
        for name in _MAXS:
            self.state[name] = torch.maximum(self.state[name], other.state[name].to(self.state[name].device))
        self._updated = self._updated or other._updated
        return self

    def reduced(self, process_group: ProcessGroupLike = "world") -> "DependencyAccumulator":
        """A copy whose state is summed (min-ed, max-ed) over the ranks of ``process_group``.

        Four ``all_reduce`` calls (int64 sums, float64 sums, minima, maxima); every rank must call it.
        ``self`` is left unchanged, so reducing twice never double-counts. ``None``: a plain copy.

        Raises:
            ValueError: If ``process_group`` is given but ``torch.distributed`` is not initialised.
        """
        group = resolve_group(process_group)
        out = self._copy()
        if group is None:
            return out
        for names, op in (
            (_INT_SUMS, dist.ReduceOp.SUM),
            (_FLOAT_SUMS, dist.ReduceOp.SUM),
            (_MINS, dist.ReduceOp.MIN),
            (_MAXS, dist.ReduceOp.MAX),
        ):
            flat = torch.cat([out.state[n].reshape(-1) for n in names])
            dist.all_reduce(flat, op=op, group=group)
            offset = 0
            for n in names:
                size = out.state[n].numel()
                out.state[n] = flat[offset : offset + size].reshape(out.state[n].shape)
                offset += size
        return out

    # ------------------------------------------------------------------ report

    def summary(self, process_group: ProcessGroupLike = None, *, prefix: str = "dependency/") -> dict[str, float]:
        """Plain-float statistics for a logger. Syncs the host with the device (call it once per logging step).

        Keys (after ``prefix``; levels as percentages, e.g. ``p90``, ``top20_share``):

        - ``token/``: ``count``, ``nan_count``, ``mean``, ``std``, ``min``, ``max``, ``p{q}``
          (approximate), ``frac_above_{c}`` (pooled over tokens);
        - ``trajectory/``: ``count``, ``length_mean``, ``mean``, ``std``, ``min``, ``max``,
          ``p{q}`` (approximate), ``top{k}_share`` and ``gini`` (averaged over trajectories);
        - ``group/``: ``count`` (groups with two or more valid trajectories), ``max_min_ratio`` and
          ``std`` (averaged over those groups).

        An undefined value (no data, or a NaN in the data) is ``nan``.

        Args:
            process_group: Summarise over the ranks of this group (a collective: every rank must
                call it); ``None``: this process only.
            prefix: Prepended to every key.
        """
        acc = self.reduced(process_group) if process_group is not None else self
        st = acc.state
        ints = {n: st[n].cpu().tolist() for n in _INT_SUMS}
        floats = {n: st[n].cpu().tolist() for n in _FLOAT_SUMS + _MINS + _MAXS}
        nan = float("nan")
        poisoned = ints["token_nan"] > 0
        out: dict[str, float] = {}

        n_tok = ints["token_count"]
        out["token/count"] = float(n_tok)
        out["token/nan_count"] = float(ints["token_nan"])
        mean, std = _mean_std(n_tok, floats["token_sum"], floats["token_sumsq"])
        tmin, tmax = _extremum(n_tok, floats["token_min"]), _extremum(n_tok, floats["token_max"])
        out.update({"token/mean": mean, "token/std": std, "token/min": tmin, "token/max": tmax})
        edges = acc.token_edges.cpu().tolist()
        for q in self.quantiles:
            value = histogram_quantile(ints["token_hist"], edges, tmin, tmax, q)
            out[f"token/p{_tag(q)}"] = nan if poisoned else value
        for c, above in zip(self.thresholds, ints["token_above"]):
            out[f"token/frac_above_{c:g}"] = nan if poisoned or n_tok == 0 else above / n_tok

        n_traj = ints["traj_count"]
        out["trajectory/count"] = float(n_traj)
        out["trajectory/length_mean"] = n_tok / n_traj if n_traj else nan
        mean, std = _mean_std(n_traj, floats["traj_sum"], floats["traj_sumsq"])
        jmin, jmax = _extremum(n_traj, floats["traj_min"]), _extremum(n_traj, floats["traj_max"])
        out.update({"trajectory/mean": mean, "trajectory/std": std, "trajectory/min": jmin, "trajectory/max": jmax})
        edges = acc.trajectory_edges.cpu().tolist()
        for q in self.quantiles:
            value = histogram_quantile(ints["traj_hist"], edges, jmin, jmax, q)
            out[f"trajectory/p{_tag(q)}"] = nan if poisoned else value
        for k, total in zip(self.top_fractions, floats["traj_share"]):
            out[f"trajectory/top{_tag(k)}_share"] = total / n_traj if n_traj else nan
        out["trajectory/gini"] = floats["traj_gini"] / n_traj if n_traj else nan

        n_grp = ints["group_count"]
        out["group/count"] = float(n_grp)
        out["group/max_min_ratio"] = floats["group_ratio"] / n_grp if n_grp else nan
        out["group/std"] = floats["group_std"] / n_grp if n_grp else nan
        return {prefix + key: float(value) for key, value in out.items()}

    @property
    def token_histogram(self) -> tuple[Tensor, Tensor]:
        """``(edges, counts)`` of the token histogram; counts are ``[underflow, bins..., overflow]``."""
        return self.token_edges, self.state["token_hist"]

    @property
    def trajectory_histogram(self) -> tuple[Tensor, Tensor]:
        """``(edges, counts)`` of the trajectory-mean histogram, with under- and overflow."""
        return self.trajectory_edges, self.state["traj_hist"]


def _mean_std(n: int, total: float, total_sq: float) -> tuple[float, float]:
    nan = float("nan")
    mean = total / n if n else nan
    if n < 2:
        return mean, nan
    var = (total_sq - total * total / n) / (n - 1)
    return mean, math.sqrt(var) if var > 0 else (0.0 if var <= 0 else nan)


def _extremum(n: int, value: float) -> float:
    return value if n else float("nan")
