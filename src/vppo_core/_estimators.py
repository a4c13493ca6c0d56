"""Sampled-token KL estimators (Schulman's k1/k2/k3), shared by the dependency and loss modules.

With ``logp`` the log-probability of the sampled token under the distribution the sample came from
and ``logq`` its log-probability under the other one, ``d = clamp(logq - logp, -20, 20)``:

* ``k1 = -d``                    (unbiased for KL(p||q), high variance, can be negative)
* ``k2 = d^2 / 2``               (biased, low variance, >= 0)
* ``k3 = exp(d) - d - 1``        (unbiased, low variance, >= 0; clamped to ``k3_range``)
"""

from typing import Literal

import torch
from torch import Tensor

Estimator = Literal["k1", "k2", "k3"]
ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0


def sampled_kl(logp: Tensor, logq: Tensor, estimator: str, k3_range: tuple[float, float]) -> Tensor:
    """Elementwise k1/k2/k3 estimate of KL(p||q) from sampled-token log-probabilities (no checks)."""
    d = (logq - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return (torch.expm1(d) - d).clamp(*k3_range)
    raise AssertionError(f"unreachable: estimator {estimator!r}")
