"""Run the visual_dependency benchmarks and write ``benchmarks/RESULTS.md``.

    python benchmarks/run.py                      # this machine's device; then render RESULTS.md
    python benchmarks/run.py --tokens 512,2048    # fewer sizes
    python benchmarks/run.py --budget 420 --resume  # start no benchmark after 7 min; keep earlier
                                                    # results, run the groups with a row missing
    python benchmarks/run.py --render-only        # re-render from the saved JSON files

Raw pytest-benchmark JSON is kept per device in ``benchmarks/results/{cpu,cuda}.json``, so a GPU run
adds its section without discarding the CPU numbers (and vice versa). With ``--resume`` a run adds
its rows to that file (replacing rows of the same name) and records its machine beside the earlier
runs'; each row keeps the bandwidth measured in its own run, and its run id. A resumed run measures
every group (a test at one size and dtype) with a row missing again in full, and a target that
compares two rows is judged only when both come from one run. Timings on a shared machine are noisy:
the load average at the start and end of each run is recorded beside them.
"""

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 2**20

TARGETS_CPU = {"fp32": 8.0, "bf16": 15.0}  # auto at 2048 x 151936 vs naive, from the issue
TARGET_GPU_FWD, TARGET_GPU_BWD = 0.85, 0.70  # fractions of the measured read bandwidth, from the issue


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s rows plus ``old``'s rows of other names; the machines of both runs in ``vppo_runs``."""
    names = {b["name"] for b in new["benchmarks"]}
    merged = dict(new)
    merged["benchmarks"] = [b for b in old["benchmarks"] if b["name"] not in names] + new["benchmarks"]
    runs = old.get("vppo_runs") or [old.get("vppo_machine", {})]
    merged["vppo_runs"] = runs + ([new.get("vppo_machine", {})] if new["benchmarks"] else [])
    if not new["benchmarks"]:
        merged["vppo_machine"] = old.get("vppo_machine", {})
    return merged


def run(
    device: str, tokens: str | None, hidden_tokens: str | None, extra: list[str], resume: bool, budget: float | None
) -> int:
    """Run the benchmarks into ``results/{device}.json``; returns pytest's exit status."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{device}.json"
    fresh = RESULTS / f"{device}.new.json"
    env = dict(os.environ)
    if tokens:
        env["VPPO_BENCH_TOKENS"] = tokens
    if hidden_tokens:
        env["VPPO_BENCH_HIDDEN_TOKENS"] = hidden_tokens
    if resume and out.exists():
        env["VPPO_BENCH_SKIP_DONE"] = str(out)
    if budget is not None:
        env["VPPO_BENCH_DEADLINE"] = str(time.time() + budget)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(HERE.parent / ".cache" / "inductor"))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE / "bench_visual_dependency.py"),
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        f"--benchmark-json={fresh}",
        "--benchmark-columns=min,median,rounds",
        "--benchmark-sort=name",
        *extra,
    ]
    print(" ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=HERE.parent, env=env).returncode
    if not fresh.exists():
        return status or 1
    data = json.loads(fresh.read_text())
    if resume and out.exists():
        data = merge(json.loads(out.read_text()), data)
    out.write_text(json.dumps(data, indent=4))
    fresh.unlink()
    print(f"{len(data['benchmarks'])} rows in {out}", flush=True)
    return status


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MiB:,.1f}"


def _pct(f: float | None) -> str:
    return "n/a" if f is None else f"{100 * f:.2f}%"


def _machine_lines(m: dict[str, Any]) -> list[str]:
    return [
        f"- Device: {m.get('gpu') or m.get('cpu', '?')}; {m.get('cpus', '?')} CPU cores, torch threads "
        f"{m.get('threads', '?')}, {m.get('mem_total_GiB', '?')} GiB RAM",
        f"- Software: {m.get('platform', '?')}, Python {m.get('python', '?')}, torch {m.get('torch', '?')}, "
        f"triton {m.get('triton', 'n/a')}",
        f"- Measured in the same run: read bandwidth **{m.get('read_GBps', '?')} GB/s** (sum of a 2 GiB "
        f"float32 tensor, best of 5), copy {m.get('copy_GBps', '?')} GB/s (read + write)",
        f"- Load average (1, 5, 15 min) at start {tuple(round(v, 2) for v in m.get('loadavg_start', ()))}, "
        f"at end {tuple(round(v, 2) for v in m.get('loadavg_end', ()))} on {m.get('cpus', '?')} cores",
    ]


def render_device(data: dict[str, Any]) -> list[str]:
    runs = data.get("vppo_runs") or [data.get("vppo_machine", {})]
    if len(runs) == 1:
        lines = [f"Run of {data.get('datetime', '?')[:19]} UTC.", "", *_machine_lines(runs[0]), ""]
    else:
        lines = [
            f"{len(runs)} runs, the last of {data.get('datetime', '?')[:19]} UTC; each row's bandwidth "
            "figures use the bandwidth measured in its own run.",
            "",
        ]
        for k, m in enumerate(runs, 1):
            lines += [f"Run {k}:", "", *_machine_lines(m), ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    for group, items in groups.items():
        logit_free = group.startswith("logit-free")
        naive = next((b for b in items if b["extra_info"]["provider"] in ("naive", "matmul")), None)
        lines += [f"### {group}", ""]
        ref = "the two matmuls" if logit_free else "naive"
        head = (
            f"| provider | best ms | median ms | speed-up vs {ref} | GB/s | % of read bw | × floor "
            f"| peak extra MiB | peak extra / {'logits' if logit_free else 'inputs'} | first call s |"
        )
        lines += [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in items:
            e, s = b["extra_info"], b["stats"]
            speed = naive["stats"]["min"] / s["min"] if naive else None
            floor = s["min"] / e["floor_s"] if e.get("floor_s") else None
            gbps = "–" if logit_free else f"{e['GBps']:,.1f}"
            frac = "–" if logit_free else _pct(e["frac_read_bw"])
            lines.append(
                f"| {e['provider']} | {_ms(s['min'])} | {_ms(s['median'])} | "
                f"{'–' if speed is None else f'{speed:.2f}'} | {gbps} | {frac} | "
                f"{'–' if logit_free or floor is None else f'{floor:.2f}'} | {_mib(e['peak_extra_bytes'])} | "
                f"{_pct(e['peak_extra_frac'])} | {e['first_call_s']:.2f} |"
            )
        lines.append("")
    return lines


def _logit_rows(data: dict[str, Any]) -> dict[tuple[int, str, str], dict[str, Any]]:
    """The KL rows on ``[tokens, vocab]`` logits, by (tokens, dtype name, provider)."""
    return {
        (b["extra_info"]["tokens"], b["extra_info"]["dtype"], b["extra_info"]["provider"]): b
        for b in data["benchmarks"]
        if b["group"].startswith("logits")
    }


def targets_gpu(data: dict[str, Any]) -> list[str]:
    """The issue's GPU targets at every measured size, for the backend ``auto`` picked (Triton)."""
    by = _logit_rows(data)
    lines = []
    for tokens, dname in sorted({k[:2] for k in by}, key=lambda k: (k[1], k[0])):
        size = f"{tokens} × 151 936 {dname}"
        auto = next((b["extra_info"].get("auto") for k, b in by.items() if k[:2] == (tokens, dname)), None) or "triton"
        fwd, bwd = by.get((tokens, dname, auto)), by.get((tokens, dname, f"{auto}+bwd"))
        for row, want, what in ((fwd, TARGET_GPU_FWD, "forward"), (bwd, TARGET_GPU_BWD, "forward + backward")):
            if row is None:
                lines.append(f"| auto {what} ≥ {want:.0%} of read bandwidth, {size} | not measured | – |")
                continue
            frac = row["extra_info"]["frac_read_bw"]
            lines.append(
                f"| auto (= {row['extra_info']['provider']}) {what} ≥ {want:.0%} of read bandwidth, {size} | "
                f"{_pct(frac)} ({row['extra_info']['GBps']:,.0f} GB/s) | {'yes' if frac >= want else 'no'} |"
            )
        for name, what in (("liger", 'reduction="sum"'), ("liger-none", 'reduction="none", row sums')):
            other = by.get((tokens, dname, name))
            if fwd is None or other is None:
                lines.append(f"| auto faster than log_softmax + LigerKLDIVLoss ({what}), {size} | not measured | – |")
                continue
            speed = other["stats"]["min"] / fwd["stats"]["min"]
            if not _one_run(data, other, fwd):
                lines.append(
                    f"| auto faster than log_softmax + LigerKLDIVLoss ({what}), {size} | {DIFFERENT_RUNS} | – |"
                )
                continue
            lines.append(
                f"| auto faster than log_softmax + LigerKLDIVLoss ({what}), {size} | {speed:.1f}× "
                f"({_ms(other['stats']['min'])} → {_ms(fwd['stats']['min'])} ms) | {'yes' if speed > 1 else 'no'} |"
            )
    return lines


def _one_run(data: dict[str, Any], *rows: dict[str, Any]) -> bool:
    """Whether ``rows`` were measured in one run (rows from before run ids count as one run when the
    file holds a single run)."""
    ids = {row["extra_info"].get("run") for row in rows}
    if None in ids:
        return ids == {None} and len(data.get("vppo_runs") or [None]) <= 1
    return len(ids) == 1


DIFFERENT_RUNS = "measured in different runs: re-run this group"


def targets_cpu(data: dict[str, Any]) -> list[str]:
    """The issue's CPU targets, evaluated on this run's numbers for the backend ``auto`` picked."""
    by = _logit_rows(data)
    lines = []
    for dname, want in TARGETS_CPU.items():
        n = by.get((2048, dname, "naive"))
        auto = n["extra_info"].get("auto", "compile") if n else "compile"
        b = by.get((2048, dname, auto))
        if b is None or n is None:
            lines.append(f"| auto ≥ {want:g}× naive, 2048 × 151 936 {dname} | not measured | – |")
            continue
        speed = n["stats"]["min"] / b["stats"]["min"]
        if _one_run(data, n, b):
            lines.append(
                f"| auto (= {auto}) ≥ {want:g}× naive, 2048 × 151 936 {dname} | {speed:.1f}× "
                f"({_ms(n['stats']['min'])} → {_ms(b['stats']['min'])} ms) | {'yes' if speed >= want else 'no'} |"
            )
        else:
            lines.append(f"| auto (= {auto}) ≥ {want:g}× naive, 2048 × 151 936 {dname} | {DIFFERENT_RUNS} | – |")
        frac = b["extra_info"]["peak_extra_frac"]
        met = "–" if frac is None else "yes" if frac < 0.01 else "no"
        lines.append(
            f"| peak extra memory < 1% of inputs, {dname} | {_pct(frac)} "
            f"({_mib(b['extra_info']['peak_extra_bytes'])} MiB) | {met} |"
        )
        floor = b["stats"]["min"] / b["extra_info"]["floor_s"]
        lines.append(
            f"| within 2× of the bandwidth floor, {dname} | {floor:.2f}× the floor "
            f"({_ms(b['extra_info']['floor_s'])} ms) | {'yes' if floor <= 2 else 'no'} |"
        )
    return lines


def targets(data: dict[str, Any], device: str) -> list[str]:
    """The issue's targets for ``device`` (``cpu`` or ``cuda``), then the logit-free path's."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += targets_cpu(data) if device == "cpu" else targets_gpu(data)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e["provider"] != "hidden" or e["tokens"] != 2048:  # the size, 2048 x 3584 x 151 936
            continue
        same = [c for c in data["benchmarks"] if c["group"] == b["group"]]
        mm = next((c for c in same if c["extra_info"]["provider"] == "matmul"), None)
        ratio = b["stats"]["min"] / mm["stats"]["min"] if mm and _one_run(data, b, mm) else None
        frac = e["peak_extra_frac"]
        met = "–" if frac is None else "yes" if frac <= 0.125 else "no"
        lines.append(
            f"| logit-free peak extra ≤ 1/8 of the logits, {e['tokens']} tokens {e['dtype']} | {_pct(frac)} | {met} |"
        )
        if ratio is not None:
            lines.append(
                f"| logit-free time ≤ 1.3× the two matmuls, {e['tokens']} tokens {e['dtype']} | {ratio:.2f}× | "
                f"{'yes' if ratio <= 1.3 else 'no'} |"
            )
        elif mm is not None:
            lines.append(
                f"| logit-free time ≤ 1.3× the two matmuls, {e['tokens']} tokens {e['dtype']} | {DIFFERENT_RUNS} | – |"
            )
    return lines


def render() -> Path:
    lines = [
        "# visual_dependency benchmarks",
        "",
        "Generated by `python benchmarks/run.py` from `benchmarks/results/*.json` "
        f"(rendered {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC). What is measured and how: "
        "[docs/benchmarks.md](../docs/benchmarks.md). Columns: best and median wall time; speed-up over the "
        "naive baseline (logit-free: over the two matmuls) measured in the same run; effective GB/s = the "
        "least traffic / best time (the inputs read once; for `+bwd` rows three times their bytes: read "
        "twice, gradients written once); the fraction of the read bandwidth measured in the same run; "
        "× floor = best time / (least traffic / read bandwidth); peak extra memory of one call (OS "
        "high-water mark on the CPU, "
        "`max_memory_allocated` on CUDA) and its ratio to the input (or materialised-logit) bytes; the "
        "first call's time (includes compilation for `compile`).",
        "",
    ]
    for device, title in (("cpu", "CPU"), ("cuda", "GPU")):
        path = RESULTS / f"{device}.json"
        lines += [f"## {title}", ""]
        if not path.exists():
            lines += [
                f"**Not measured.** No {title} run has been recorded yet"
                + (
                    " (no GPU was available in the sessions that produced these results). Run "
                    "`python benchmarks/run.py` on a CUDA machine (with `pip install liger-kernel` for the "
                    "outside baseline; on a machine without network, `.ci/gpu bench`, see "
                    "docs/contributing.md) to add this section."
                    if device == "cuda"
                    else "."
                ),
                "",
            ]
            continue
        data = json.loads(path.read_text())
        if device == "cpu":
            lines += [
                "> The benchmark itself keeps the 2 cores busy (a load average near 2 is its own); a load "
                "well above 2 means other jobs shared the machine. Repeated runs on this machine differ by "
                "up to about 20%, most of all the naive baseline, which allocates about 6 GiB per call.",
                "",
            ]
        lines += render_device(data)
        lines += ["### Targets (issue 3), from these results", "", *targets(data, device), ""]
    out = HERE / "RESULTS.md"
    out.write_text("\n".join(lines))
    _update_docs(lines)
    return out


def _update_docs(lines: list[str]) -> None:
    """Copy the tables (headings one level down) between the markers of docs/benchmarks.md."""
    page = HERE.parent / "docs" / "benchmarks.md"
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if not page.exists():
        return
    text = page.read_text()
    if start not in text or end not in text:
        return
    body = [("#" + line if line.startswith("##") else line) for line in lines[1:]]  # drop the title
    body = [line.replace("[docs/benchmarks.md](../docs/benchmarks.md)", "this page") for line in body]
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(head + start + "\n" + "\n".join(body).strip() + "\n" + end + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", help="comma-separated token counts (default 512,2048,8192)")
    parser.add_argument("--hidden-tokens", help="token counts of the logit-free benchmark")
    parser.add_argument("--render-only", action="store_true", help="only re-render RESULTS.md")
    parser.add_argument("--resume", action="store_true", help="keep earlier rows; re-run the groups with a row missing")
    parser.add_argument(
        "--budget", type=float, metavar="SECONDS", help="start no benchmark after this many seconds (then --resume)"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    status = 0
    if not args.render_only:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        status = run(device, args.tokens, args.hidden_tokens, args.pytest_args, args.resume, args.budget)
    print(f"wrote {render()}")
    sys.exit(status)


if __name__ == "__main__":
    main()
