"""A streaming accumulator of dependency statistics, for watching them during training.

Each ``update`` adds one batch's counts, means and squared deviations, sums, extrema and histogram
counts to a fixed set of tensors on the data's device (no host sync); ranks are combined with one
``all_reduce`` per reduction kind and one ``all_gather`` of the per-rank means and squared
deviations; ``summary`` turns the state into plain floats for any logger.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from jaxtyping import Float, Integer, Shaped
from torch import Tensor

from .._checks import as_bool_mask, check_fraction, check_same_device, result_dtype, typechecked
from ..distributed import ProcessGroupLike, all_reduce_min_max, resolve_group
from ._groups import group_spread
from ._histogram import check_edges, histogram_counts, histogram_edges, histogram_quantile
from ._stats import gini, levels, top_share

__all__ = ["DependencyAccumulator"]


def _default_token_edges() -> Tensor:
    return histogram_edges(1e-6, 100.0, 80, log=True)  # 10 bins per decade


def _default_trajectory_edges() -> Tensor:
    return histogram_edges(1e-4, 10.0, 50, log=True)


# State entries by how they combine across updates and ranks. Floats are float64, counts int64.
_INT_SUMS = ("token_count", "token_nan", "token_above", "token_hist", "traj_count", "traj_hist", "group_count")
_FLOAT_SUMS = ("traj_share", "traj_gini", "group_ratio", "group_std")
_MINS = ("token_min", "traj_min")
_MAXS = ("token_max", "traj_max")
# Each count comes with a mean and a sum of squared deviations from it (combined by `_combine_moments`).
_COUNTS = ("token_count", "traj_count")
_MOMENTS = ("token_mean", "token_m2", "traj_mean", "traj_m2")
# Summary keys that stay defined when a NaN was counted.
_NAN_PROOF = ("token/count", "token/nan_count", "trajectory/count", "trajectory/length_mean", "group/count")


def _tag(value: float) -> str:
    """``0.5 -> '50'``, ``0.025 -> '2.5'``: a level as a percentage for a metric name."""
    return f"{100 * value:g}"


def _threshold_tag(value: float) -> str:
    return f"{value:g}"


def _check_keys(name: str, values: Sequence[float], key: Callable[[float], str]) -> None:
    """Raise if two values of ``name`` would give the same summary key (one would overwrite the other)."""
    seen: dict[str, float] = {}
    for v in values:
        k = key(v)
        if k in seen:
            raise ValueError(
                f"{name} must give one summary key per value, got {tuple(values)!r}: {seen[k]!r} and {v!r} "
                f"both give {k!r}; give each value once, differing within 6 significant digits"
            )
        seen[k] = v


def _batch_moments(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and sum of squared deviations of the valid float64 values, in two passes.

    The values are shifted by the first finite valid one before the two passes, so equal values
    give a mean equal to them and exactly 0 squared deviation. No host sync.
    """
    x, valid = x.reshape(-1), valid.reshape(-1)
    n = valid.sum().to(torch.float64)
    if x.numel() == 0:
        zero = x.new_zeros(())
        return n, zero, zero
    pivot = x.gather(0, valid.long().argmax().reshape(1)).squeeze(0)  # the first valid value, or x[0]
    pivot = torch.where(pivot.isfinite() & valid.any(), pivot, 0.0)
    d = torch.where(valid, x - pivot, 0.0)
    d_mean = d.sum() / n.clamp_min(1)
    m2 = torch.where(valid, (d - d_mean).square(), 0.0).sum()
    return n, pivot + d_mean, m2


def _combine_moments(
    n_a: Tensor, mean_a: Tensor, m2_a: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Mean and sum of squared deviations of two parts (Chan, Golub & LeVeque 1979, the pairwise update).

    $\bar x = \bar x_a + \delta\, n_b / n$ and $M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / n$ with
    $\delta = \bar x_b - \bar x_a$, $n = n_a + n_b$; an empty part leaves the other unchanged. A
    part with an infinite (or NaN) mean gives what one batch of both gives, whatever the order:
    $\bar x_a + \bar x_b$ (inf, or NaN for $\infty - \infty$) and $M_2$ NaN. (The update itself
    gave NaN for $\bar x_a = \infty$ but $\infty$ for $\bar x_b = \infty$.)
    """
    n = n_a + n_b
    w = n_b / n.clamp_min(1)
    finite = mean_a.isfinite() & mean_b.isfinite()
    delta = torch.where(finite, mean_b - mean_a, 0.0)
    either_empty = (n_a == 0) | (n_b == 0)
    both = torch.where(finite, mean_a + delta * w, mean_a + mean_b)
    mean = torch.where(n_b == 0, mean_a, torch.where(n_a == 0, mean_b, both))
    m2_both = torch.where(finite, m2_a + m2_b + delta.square() * n_a * w, float("nan"))
    m2 = torch.where(either_empty, m2_a + m2_b, m2_both)
    return mean, m2


def _unflatten(state: dict[str, Tensor], names: Sequence[str], flat: Tensor) -> None:
    """Store the consecutive pieces of ``flat`` as ``state[name]``, each in its old shape."""
    sizes = [state[n].numel() for n in names]
    for n, piece in zip(names, flat.split(sizes)):
        state[n] = piece.reshape(state[n].shape)


@dataclass(eq=False)
class DependencyAccumulator:
    r"""Streaming statistics of token and trajectory visual dependency, mergeable across ranks.

    Call [`update`][vppo_core.analysis.DependencyAccumulator.update] with each rollout batch (cheap,
    no host sync), and [`summary`][vppo_core.analysis.DependencyAccumulator.summary] once per
    logging step for a ``dict[str, float]`` that TensorBoard, W&B or a CSV writer take as is;
    [`reset`][vppo_core.analysis.DependencyAccumulator.reset] to start a new window. The state is a
    few small tensors on the device of the data; pass ``process_group`` to ``summary`` (or call
    [`reduced`][vppo_core.analysis.DependencyAccumulator.reduced]) for statistics over every rank.

    **Exact under streaming** (the same, up to float64 rounding, whether the data come in one
    batch, in many, or spread over ranks): token and trajectory counts, means, standard deviations
    (unbiased; each batch's mean and squared deviations from it in float64, in two passes, combined
    with the pairwise update of Chan, Golub & LeVeque, so there is no sum-of-squares cancellation),
    minima and maxima; the pooled fraction of tokens above each threshold (integer counts); the
    top-$k$ shares and Gini coefficients averaged over trajectories (each trajectory lies whole in
    one batch); the histogram counts (integers with fixed edges); and the group spread averaged over
    groups, provided each group (the responses to one prompt) lies whole in one ``update`` on one
    rank; a split group is measured as separate parts.

    **Approximate**: the token and trajectory quantiles, read off the histograms by linear
    interpolation inside the bin that holds the target rank (the underflow bin spans
    $[\min, e_0)$, the overflow bin $[e_B, \max]$, with the exact extrema). With $N$ values
    $x_{(1)} \le \dots \le x_{(N)}$, level $q$ returns a value in the closed bin (clipped to the
    extrema) that holds $x_{(r)}$, $r = \max(1, \lceil qN \rceil)$. The exact quantile
    (``torch.quantile``'s linear interpolation) lies between $x_{(\lfloor h \rfloor + 1)}$ and
    $x_{(\lceil h \rceil + 1)}$, $h = q(N - 1)$, and $x_{(r)}$ is one of these two. So the error is
    at most that bin's width plus the gap between the two order statistics: about a bin width where
    the data are dense, but as large as the gap where the quantile falls between two distant values
    (``[0.001, 10]`` gives a median near 0.001, not 5). Use
    [`trajectory_quantiles`][vppo_core.analysis.trajectory_quantiles] on a batch for exact values.

    A NaN at a valid token is counted in ``token/nan_count`` and makes every other token, trajectory
    and group statistic NaN, on one process and across ranks (never silently dropped). Padding is
    never read.

    Args:
        token_edges: Bin edges of the token histogram (default: log-spaced, $10^{-6}$ to $10^{2}$,
            10 bins per decade).
        trajectory_edges: Bin edges of the trajectory-mean histogram (default: log-spaced,
            $10^{-4}$ to $10$, 10 bins per decade).
        quantiles: Levels in $[0, 1]$ reported (approximately) for tokens and trajectories.
        top_fractions: Fractions $k \in (0, 1]$ for the average top-$k$ share (0.4 is TGF's $k$).
        thresholds: Thresholds for the pooled fraction of tokens above them.
        (Each value of ``quantiles``, ``top_fractions`` and ``thresholds`` names its own summary
        key, formatted with 6 significant digits: values that give the same key are an error.)
        eps: The ``eps`` of [`group_spread`][vppo_core.analysis.group_spread]'s max/min ratio.
        device: Where the state lives until the first update, which moves an untouched state to the
            data's device. Give it for ranks that may summarise before any update under NCCL.

    Raises:
        TypeError: If an edge tensor is not a float tensor.
        ValueError: If edges are not finite and strictly increasing, a level or fraction is out of
            range, two values give the same summary key, or ``eps`` is negative.

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
            if not isinstance(edges, Tensor):
                raise TypeError(f"{name} must be a float tensor of bin edges, got {type(edges).__name__}")
            if not edges.is_floating_point():
                raise TypeError(
                    f"{name} must be a float tensor of bin edges, got a {edges.dtype} tensor; "
                    f"pass e.g. {name}.double() or histogram_edges(...)"
                )
            check_edges(edges, name)
        self.quantiles, _ = levels("quantiles", self.quantiles)
        for v in self.quantiles:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"every level in quantiles must be in [0, 1], got {v!r}")
        self.top_fractions, _ = levels("top_fractions", self.top_fractions)
        for v in self.top_fractions:
            check_fraction("top_fractions", v)
        self.thresholds, _ = levels("thresholds", self.thresholds)
        _check_keys("quantiles", self.quantiles, lambda v: f"p{_tag(v)}")
        _check_keys("top_fractions", self.top_fractions, lambda v: f"top{_tag(v)}_share")
        _check_keys("thresholds", self.thresholds, lambda v: f"frac_above_{_threshold_tag(v)}")
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
            "token_mean": floats(),
            "token_m2": floats(),
            "token_min": floats(value=inf),
            "token_max": floats(value=-inf),
            "token_above": ints(len(self.thresholds)),
            "token_hist": ints(self.token_edges.shape[0] + 1),
            "traj_count": ints(),
            "traj_mean": floats(),
            "traj_m2": floats(),
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
        self._add_moments("token", *_batch_moments(x, valid))
        s["token_nan"] += (valid & dep.isnan()).sum()
        lowest = torch.where(valid, x, inf).reshape(-1)
        highest = torch.where(valid, x, -inf).reshape(-1)
        s["token_min"] = torch.cat([lowest, s["token_min"].reshape(1)]).amin()
        s["token_max"] = torch.cat([highest, s["token_max"].reshape(1)]).amax()
        s["token_above"] += torch.stack([((x > c) & valid).sum() for c in self.thresholds])
        s["token_hist"] += histogram_counts(x, valid, self.token_edges)

        n = valid.sum(-1)
        row = n > 0
        mean = x.sum(-1) / n.clamp_min(1)
        self._add_moments("traj", *_batch_moments(mean, row))
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

    def _add_moments(self, kind: str, n: Tensor, mean: Tensor, m2: Tensor) -> None:
        """Combine a part's float64 count ``n``, ``mean`` and ``m2`` into ``{kind}_count/mean/m2``."""
        s = self.state
        count = s[f"{kind}_count"]
        s[f"{kind}_mean"], s[f"{kind}_m2"] = _combine_moments(
            count.to(torch.float64), s[f"{kind}_mean"], s[f"{kind}_m2"], n, mean, m2
        )
        s[f"{kind}_count"] = count + n.to(torch.int64)

    def merge(self, other: "DependencyAccumulator") -> "DependencyAccumulator":
        """Add another accumulator's state to this one (same configuration), in place; returns ``self``.

        Raises:
            ValueError: If the two differ in edges, levels, thresholds or ``eps`` (the message names
                the first field that differs and both values).
        """
        for name in ("quantiles", "top_fractions", "thresholds", "eps", "token_edges", "trajectory_edges"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, Tensor):
                mine, theirs = mine.cpu().tolist(), theirs.cpu().tolist()
            if mine != theirs:
                raise ValueError(
                    "can only merge accumulators with the same edges, levels, thresholds and eps; "
                    f"{name} differs: {mine!r} here, {theirs!r} in the other; build both with the same arguments"
                )
        if not self._updated and other._updated:
            self._move_to(other.state["token_count"].device)
        device = self.state["token_count"].device
        for kind in ("token", "traj"):
            o = {k: other.state[f"{kind}_{k}"].to(device) for k in ("count", "mean", "m2")}
            self._add_moments(kind, o["count"].to(torch.float64), o["mean"], o["m2"])
        for name in tuple(n for n in _INT_SUMS if n not in _COUNTS) + _FLOAT_SUMS:  # counts: _add_moments
            self.state[name] = self.state[name] + other.state[name].to(self.state[name].device)
        for name in _MINS:
            self.state[name] = torch.minimum(self.state[name], other.state[name].to(self.state[name].device))
        for name in _MAXS:
            self.state[name] = torch.maximum(self.state[name], other.state[name].to(self.state[name].device))
        self._updated = self._updated or other._updated
        return self

    def reduced(self, process_group: ProcessGroupLike = "world") -> "DependencyAccumulator":
        """A copy whose state is combined over the ranks of ``process_group``.

        One ``all_gather`` of each rank's counts, means and squared deviations (combined in rank
        order, so every rank gets the same result) and three ``all_reduce`` calls (int64 sums,
        float64 sums, minima and maxima); every rank must call it. A NaN minimum or maximum on any
        rank stays NaN, as `merge` gives (``all_reduce`` with ``MIN``/``MAX`` may drop a NaN). ``self`` is
        left unchanged, so reducing twice never double-counts. ``None``: a plain copy.

        Raises:
            ValueError: If ``process_group`` is given but ``torch.distributed`` is not initialised.
        """
        group = resolve_group(process_group)
        out = self._copy()
        if group is None:
            return out
        st = out.state
        names = ("token_count", "token_mean", "token_m2", "traj_count", "traj_mean", "traj_m2")
        local = torch.stack([st[name].to(torch.float64) for name in names])  # counts exact below 2**53
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        for kind, at in (("token", 0), ("traj", 3)):
            n, mean, m2 = (local.new_zeros(()) for _ in range(3))
            for part in parts:
                mean, m2 = _combine_moments(n, mean, m2, part[at], part[at + 1], part[at + 2])
                n = n + part[at]
            st[f"{kind}_mean"], st[f"{kind}_m2"] = mean, m2
        for names in (_INT_SUMS, _FLOAT_SUMS):
            flat = torch.cat([st[n].reshape(-1) for n in names])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            _unflatten(st, names, flat)
        lows, highs = all_reduce_min_max(
            torch.cat([st[n].reshape(-1) for n in _MINS]), torch.cat([st[n].reshape(-1) for n in _MAXS]), group
        )
        _unflatten(st, _MINS, lows)
        _unflatten(st, _MAXS, highs)
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

        An undefined value is ``nan``: without data, and for every statistic but the counts
        (``token/count``, ``token/nan_count``, ``trajectory/count``, ``trajectory/length_mean``,
        ``group/count``) once a NaN was counted, here or on any rank of ``process_group``.

        Args:
            process_group: Summarise over the ranks of this group (a collective: every rank must
                call it); ``None``: this process only.
            prefix: Prepended to every key.
        """
        acc = self.reduced(process_group) if process_group is not None else self
        st = acc.state
        ints = {n: st[n].cpu().tolist() for n in _INT_SUMS}
        floats = {n: st[n].cpu().tolist() for n in _FLOAT_SUMS + _MINS + _MAXS + _MOMENTS}
        nan = float("nan")
        out: dict[str, float] = {}

        n_tok = ints["token_count"]
        out["token/count"] = float(n_tok)
        out["token/nan_count"] = float(ints["token_nan"])
        mean, std = _mean_std(n_tok, floats["token_mean"], floats["token_m2"])
        tmin, tmax = _extremum(n_tok, floats["token_min"]), _extremum(n_tok, floats["token_max"])
        out.update({"token/mean": mean, "token/std": std, "token/min": tmin, "token/max": tmax})
        edges = acc.token_edges.cpu().tolist()
        for q in self.quantiles:
            out[f"token/p{_tag(q)}"] = histogram_quantile(ints["token_hist"], edges, tmin, tmax, q)
        for c, above in zip(self.thresholds, ints["token_above"]):
            out[f"token/frac_above_{_threshold_tag(c)}"] = above / n_tok if n_tok else nan

        n_traj = ints["traj_count"]
        out["trajectory/count"] = float(n_traj)
        out["trajectory/length_mean"] = n_tok / n_traj if n_traj else nan
        mean, std = _mean_std(n_traj, floats["traj_mean"], floats["traj_m2"])
        jmin, jmax = _extremum(n_traj, floats["traj_min"]), _extremum(n_traj, floats["traj_max"])
        out.update({"trajectory/mean": mean, "trajectory/std": std, "trajectory/min": jmin, "trajectory/max": jmax})
        edges = acc.trajectory_edges.cpu().tolist()
        for q in self.quantiles:
            out[f"trajectory/p{_tag(q)}"] = histogram_quantile(ints["traj_hist"], edges, jmin, jmax, q)
        for k, total in zip(self.top_fractions, floats["traj_share"]):
            out[f"trajectory/top{_tag(k)}_share"] = total / n_traj if n_traj else nan
        out["trajectory/gini"] = floats["traj_gini"] / n_traj if n_traj else nan

        n_grp = ints["group_count"]
        out["group/count"] = float(n_grp)
        out["group/max_min_ratio"] = floats["group_ratio"] / n_grp if n_grp else nan
        out["group/std"] = floats["group_std"] / n_grp if n_grp else nan
        if ints["token_nan"] > 0:  # a NaN poisons every statistic but the counts, whatever held it
            out = {key: value if key in _NAN_PROOF else nan for key, value in out.items()}
        return {prefix + key: float(value) for key, value in out.items()}

    @property
    def token_histogram(self) -> tuple[Tensor, Tensor]:
        """``(edges, counts)`` of the token histogram; counts are ``[underflow, bins..., overflow]``."""
        return self.token_edges, self.state["token_hist"]

    @property
    def trajectory_histogram(self) -> tuple[Tensor, Tensor]:
        """``(edges, counts)`` of the trajectory-mean histogram, with under- and overflow."""
        return self.trajectory_edges, self.state["traj_hist"]


def _mean_std(n: int, mean: float, m2: float) -> tuple[float, float]:
    """The mean and the unbiased standard deviation from a count, a mean and squared deviations."""
    nan = float("nan")
    return (mean if n else nan), (math.sqrt(m2 / (n - 1)) if n >= 2 else nan)


def _extremum(n: int, value: float) -> float:
    return value if n else float("nan")
