"""``benchmarks/run.py``'s bookkeeping on made-up results: merging runs, and the targets it reports.

The GPU targets are only ever rendered from a GPU run's numbers; these tests make sure that
rendering, and the merge of a run split over several commands, work before such a run exists.
"""

import importlib.util
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("vppo_bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(provider: str, seconds: float, *, tokens: int = 2048, dtype: str = "bf16", frac: float = 0.5, **extra):
    input_bytes = 2 * tokens * 151_936 * (2 if dtype == "bf16" else 4)
    factor = 3.0 if provider.endswith("+bwd") else 1.0
    return {
        "group": f"logits {tokens}x151936 {dtype}",
        "name": f"test_logits[{tokens}-{dtype}-{provider}]",
        "stats": {"min": seconds, "median": seconds * 1.1},
        "extra_info": {
            "tokens": tokens,
            "dtype": dtype,
            "provider": provider,
            "auto": "triton",
            "input_bytes": input_bytes,
            "bytes": int(input_bytes * factor),
            "GBps": input_bytes * factor / seconds / 1e9,
            "frac_read_bw": frac,
            "floor_s": seconds * frac,
            "peak_extra_bytes": 1024,
            "peak_extra_frac": 1e-5,
            "first_call_s": 1.0,
            **extra,
        },
    }


def results(rows, machine=None):
    return {"benchmarks": rows, "datetime": "2026-11-25T03:00:00", "vppo_machine": machine or {"read_GBps": 3000.0}}


def test_merge_replaces_rows_of_the_same_name_and_keeps_every_run(runner):
    old = results([row("naive", 2.0), row("triton", 0.5)], {"read_GBps": 1.0})
    new = results([row("triton", 0.4), row("liger", 0.9)], {"read_GBps": 2.0})
    merged = runner.merge(old, new)
    by_name = {b["name"]: b["stats"]["min"] for b in merged["benchmarks"]}
    assert by_name == {
        "test_logits[2048-bf16-naive]": 2.0,
        "test_logits[2048-bf16-triton]": 0.4,
        "test_logits[2048-bf16-liger]": 0.9,
    }
    assert [m["read_GBps"] for m in merged["vppo_runs"]] == [1.0, 2.0]
    again = runner.merge(merged, results([row("triton+bwd", 1.0)], {"read_GBps": 3.0}))
    assert [m["read_GBps"] for m in again["vppo_runs"]] == [1.0, 2.0, 3.0]
    assert len(again["benchmarks"]) == 4


def test_merge_of_an_empty_run_keeps_the_earlier_machine(runner):
    old = results([row("naive", 2.0)], {"read_GBps": 1.0})
    merged = runner.merge(old, results([], {"read_GBps": 9.0}))
    assert merged["benchmarks"] == old["benchmarks"]
    assert merged["vppo_machine"] == {"read_GBps": 1.0} and merged["vppo_runs"] == [{"read_GBps": 1.0}]


def test_gpu_targets_are_judged_on_the_rows(runner):
    data = results(
        [
            row("triton", 0.010, frac=0.91),
            row("triton+bwd", 0.040, frac=0.65),
            row("liger", 0.030),
            row("liger-none", 0.008),
        ]
    )
    lines = runner.targets(data, "cuda")
    assert lines[:2] == ["| target | measured | met |", "|---|---|---|"]
    text = "\n".join(lines)
    assert "forward ≥ 85% of read bandwidth, 2048 × 151 936 bf16 | 91.00%" in text
    assert "forward + backward ≥ 70% of read bandwidth, 2048 × 151 936 bf16 | 65.00%" in text
    met = [line.rsplit("|", 2)[-2].strip() for line in lines[2:]]
    assert met == ["yes", "no", "yes", "no"]  # forward, forward + backward, vs liger (3.0×), vs liger-none (0.8×)
    assert "3.0×" in lines[4] and "0.8×" in lines[5]


def test_gpu_targets_say_what_was_not_measured(runner):
    lines = runner.targets(results([row("triton", 0.010, frac=0.9, tokens=512)]), "cuda")
    assert sum("not measured" in line for line in lines) == 3  # forward + backward and both Liger rows


def test_render_lists_every_run(runner):
    data = results([row("naive", 2.0), row("triton", 0.5)])
    data["vppo_runs"] = [{"read_GBps": 1.5, "gpu": "GPU A"}, {"read_GBps": 2.5, "gpu": "GPU A"}]
    text = "\n".join(runner.render_device(data))
    assert text.startswith("2 runs,") and "Run 1:" in text and "Run 2:" in text
    assert "**1.5 GB/s**" in text and "**2.5 GB/s**" in text
    assert "| triton | 500.0 | 550.0 | 4.00 |" in text


def test_ratio_targets_are_judged_only_within_one_run(runner):
    # a resumed run added rows to another run's: the ratio of two runs' times (possibly of two
    # machines) was reported as a met target
    same = results([row("naive", 2.0, run="A"), row("cpu", 0.1, run="A")])
    mixed = results([row("naive", 2.0, run="A"), row("cpu", 0.1, run="B")])
    mixed["vppo_runs"] = [{"run": "A"}, {"run": "B"}]
    for r in same["benchmarks"] + mixed["benchmarks"]:
        r["extra_info"]["auto"] = "cpu"
    assert any("20.0×" in line and "| yes |" in line for line in runner.targets_cpu(same))
    lines = runner.targets_cpu(mixed)
    assert any("different runs" in line for line in lines) and not any("20.0×" in line for line in lines)
    legacy = results([row("naive", 2.0), row("cpu", 0.1)])  # rows from before run ids, one run in the file
    for r in legacy["benchmarks"]:
        r["extra_info"]["auto"] = "cpu"
    assert any("20.0×" in line for line in runner.targets_cpu(legacy))
