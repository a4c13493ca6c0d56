"""Shared test configuration: hypothesis profiles and small helpers."""

import ctypes
import ctypes.util
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"), max_examples=60, derandomize=True)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


_LIBM = ctypes.CDLL(ctypes.util.find_library("m")) if sys.platform == "linux" else None


@pytest.fixture(autouse=True)
def _ieee_subnormals() -> None:
    """Undo a flush-to-zero switch left by an earlier test in this process.

    torch 2.4's Inductor links its CPU kernels with ``-ffast-math``: loading one switches the thread to
    flush subnormals to zero. The tests' oracles (and hypothesis, which refuses to draw floats then)
    assume IEEE arithmetic, so the default floating-point environment is restored (glibc's
    ``fesetenv(FE_DFL_ENV)``, ``FE_DFL_ENV`` being ``(const fenv_t *) -1``).
    """
    if sys.float_info.min / 2 == 0.0 and _LIBM is not None:
        _LIBM.fesetenv(ctypes.c_void_p(-1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
