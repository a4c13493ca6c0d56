"""The demo's outputs: the per-step table, the JSON and CSV logs, and the PNG figure."""

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .train import Config, RunResult, StepLog

COLUMNS = (
    ("step", "step", "{:>4d}"),
    ("reward", "reward", "{:>6.3f}"),
    ("accuracy", "held-out acc", "{:>12}"),
    ("kept_frac", "kept", "{:>5.2f}"),
    ("dep_mean", "dep mean", "{:>8.4f}"),
    ("dep_p50", "dep p50", "{:>8.4f}"),
    ("dep_p90", "dep p90", "{:>8.4f}"),
    ("dep_max", "dep max", "{:>7.3f}"),
    ("top20_share", "top-20% share", "{:>13.2f}"),
    ("factor_min", "TAS min", "{:>7.3f}"),
    ("factor_max", "TAS max", "{:>7.3f}"),
)


def format_row(log: StepLog) -> str:
    cells = []
    for key, _, fmt in COLUMNS:
        value = getattr(log, key)
        if key == "accuracy":
            value = "-" if value is None else f"{value:.3f}"
        cells.append(fmt.format(value))
    return "  ".join(cells)


def header() -> str:
    widths = [len(fmt.format(0 if key != "accuracy" else "")) for key, _, fmt in COLUMNS]
    return "  ".join(title.rjust(w) for (_, title, _), w in zip(COLUMNS, widths))


def table(result: RunResult, every: int) -> str:
    rows = [log for log in result.logs if log.step % every == 0 or log.step in (1, result.logs[-1].step)]
    return "\n".join([f"[{result.method}]", header(), *(format_row(r) for r in rows)])


def write_logs(out: Path, cfg: Config, start_accuracy: float, sft_losses: Sequence[float], runs: Sequence[RunResult]):
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": asdict(cfg),
        "warm_start": {"accuracy": start_accuracy, "losses": list(sft_losses)},
        "runs": {
            r.method: {
                "final_accuracy": r.final_accuracy,
                "dependency": r.dependency.summary(),
                "steps": [asdict(log) for log in r.logs],
                "example": {"tokens": r.example_tokens, "dependency": r.example_dependency, "kept": r.example_kept},
            }
            for r in runs
        },
    }
    (out / "log.json").write_text(json.dumps(payload, indent=1))
    with (out / "log.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        keys = list(asdict(runs[0].logs[0]))
        writer.writerow(["method", *keys])
        for r in runs:
            for log in r.logs:
                writer.writerow([r.method, *(asdict(log)[k] for k in keys)])


def plot(out: Path, start_accuracy: float, runs: Sequence[RunResult]) -> Path:
    """Learning curves of both runs, VPPO's token-dependency histogram, and one response's tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    ax_acc, ax_rew, ax_hist, ax_strip = axes.ravel()
    for r in runs:
        acc = [(0, start_accuracy)] + [(log.step, log.accuracy) for log in r.logs if log.accuracy is not None]
        ax_acc.plot(*zip(*acc), marker="o", label=r.method.upper())
        rewards = [log.reward for log in r.logs]
        window = 5
        smooth = [
            sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax_rew.plot([log.step for log in r.logs], smooth, label=r.method.upper())
    ax_acc.set(title="held-out accuracy (greedy)", xlabel="RL step", ylabel="accuracy")
    ax_rew.set(title="rollout reward (moving mean of 5)", xlabel="RL step", ylabel="mean reward")
    for ax in (ax_acc, ax_rew):
        ax.axhline(0.25, color="grey", lw=0.8, ls="--", label="chance")
        ax.legend()

    vppo = next((r for r in runs if r.method == "vppo"), runs[-1])
    edges, counts = vppo.dependency.token_histogram
    edges, counts = edges.tolist(), counts.tolist()
    n = sum(counts)
    ax_hist.stairs(counts[1:-1], edges, fill=True, color="tab:orange")
    ax_hist.set_xscale("log")
    ax_hist.set_yscale("log")
    ax_hist.set(
        title=f"token visual dependency, all {vppo.method.upper()} rollouts (n={n})",
        xlabel="KL(π(·|I) || π(·|I')) per token",
        ylabel="tokens",
    )
    if counts[0] or counts[-1]:
        ax_hist.text(
            0.02,
            0.95,
            f"below {edges[0]:g}: {counts[0]}, above {edges[-1]:g}: {counts[-1]}",
            transform=ax_hist.transAxes,
            va="top",
            fontsize=8,
        )

    tokens, dep, kept = vppo.example_tokens, vppo.example_dependency, vppo.example_kept
    if tokens:
        colours = ["tab:orange" if k else "lightgrey" for k in kept]
        ax_strip.bar(range(len(tokens)), dep, color=colours)
        ax_strip.set_xticks(range(len(tokens)), tokens, rotation=30)
        ax_strip.set(title="one response: dependency per token (orange = kept by TGF)", ylabel="dependency")
    fig.tight_layout()
    path = out / "vppo_demo.png"
    fig.savefig(path)
    plt.close(fig)
    if tokens:
        from vppo_core.analysis import plot_token_strip

        plot_token_strip(
            tokens,
            dep,
            kept,
            title=f"{vppo.method.upper()}: one response, kept tokens boxed",
            path=out / "token_strip.png",
        )
    return path
