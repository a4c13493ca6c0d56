"""Benchmark fixtures: the device, its measured memory bandwidth, and a peak-extra-memory probe.

Bandwidth is measured in the same session as the kernels (a machine shared with other jobs changes
from hour to hour): the best of several ``torch.sum`` reads of a 2 GiB float32 tensor (the kernels
only read their inputs), and a copy for reference.

Peak extra memory on the CPU is the operating system's view of the process: after returning freed
heap memory to the OS (``malloc_trim(0)``) and resetting the kernel's high-water mark
(``/proc/self/clear_refs``), it is ``VmHWM`` after one call minus ``VmRSS`` before it. It therefore
counts every allocation (torch tensors, Inductor buffers, OpenMP scratch), with page granularity. On
CUDA it is ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the call.

``benchmarks/run.py`` can split a run over several calls (a lent machine limits a command's time):
``VPPO_BENCH_DEADLINE`` (a Unix time) skips the benchmarks that would start after it, and
``VPPO_BENCH_SKIP_DONE`` (a results JSON) skips those already in it.
"""

import contextlib
import ctypes
import functools
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

GiB = 2**30


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_extra_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak memory above the starting point during one call of ``fn`` (see the module docstring)."""
    dev = device()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    try:
        _trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status("VmRSS")
        out = fn()
        peak = _status("VmHWM")
    except OSError:
        return None
    del out
    return max(peak - base, 0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn: Callable[[], Any], repeat: int = 5) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(nbytes: int = 2 * GiB) -> dict[str, float]:
    """Read (sum) and copy bandwidth in GB/s on the benchmark device, best of 5."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device())
    y = torch.empty_like(x)
    read = nbytes / _best(x.sum) / 1e9
    copy = 2 * nbytes / _best(functools.partial(y.copy_, x)) / 1e9
    del x, y
    _trim()
    return {"read_GBps": read, "copy_GBps": copy}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    with contextlib.suppress(ValueError, OSError):
        info["mem_total_GiB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


@pytest.fixture(scope="session")
def bandwidth() -> dict[str, float]:
    return measure_bandwidth()


RUN_ID = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}-{os.getpid()}"
"""This pytest session, the run: every row records it, so that a verdict never divides the times of two runs."""


@pytest.fixture(scope="session", autouse=True)
def _record_machine(request: pytest.FixtureRequest, bandwidth: dict[str, float]) -> None:
    info = {**machine(), **{k: round(v, 2) for k, v in bandwidth.items()}, "run": RUN_ID}
    request.config._vppo_machine = info  # type: ignore[attr-defined]


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    info = getattr(config, "_vppo_machine", {})
    info["loadavg_end"] = os.getloadavg()
    output_json["vppo_machine"] = info


DEADLINE = float(os.environ.get("VPPO_BENCH_DEADLINE", "inf"))
BUDGET_SKIP = "the run's time budget is spent"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    done_file = os.environ.get("VPPO_BENCH_SKIP_DONE")
    if not done_file or not Path(done_file).exists():
        return
    done = {b["name"] for b in json.loads(Path(done_file).read_text())["benchmarks"]}
    # Resume by whole groups (one test function at one size and dtype): a group with any row missing
    # is measured again entirely, so that the rows a target compares come from one run.
    groups: dict[tuple[str, ...], list[pytest.Item]] = {}
    for item in items:
        groups.setdefault(_group_key(item), []).append(item)
    for members in groups.values():
        if all(item.name in done for item in members):
            for item in members:
                item.add_marker(pytest.mark.skip(reason=f"already measured in {done_file}"))


def _group_key(item: pytest.Item) -> tuple[str, ...]:
    """The test function and its parameters other than the provider."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (item.originalname, *(f"{k}={v}" for k, v in sorted(params.items()) if k != "provider"))


@pytest.fixture(autouse=True)
def _time_budget() -> None:
    if time.time() > DEADLINE:
        pytest.skip(BUDGET_SKIP)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    left = sum(
        1
        for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r.longrepr, tuple) and BUDGET_SKIP in str(r.longrepr[-1])
    )
    if left:
        terminalreporter.write_line(f"{left} benchmarks left for lack of time: run again with --resume")
