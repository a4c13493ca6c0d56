"""Row-wise divergence kernels behind :func:`vppo_core.visual_dependency`.

Three layers (as in Liger-Kernel): the kernels of a backend (``_torch``), the autograd Functions
that save tensors and delegate (``_autograd``), and the public, checked function in
:mod:`vppo_core.dependency`, which dispatches here on ``backend``.
"""

from torch import Tensor

from ._autograd import TorchKL


def kl_rows(x: Tensor, y: Tensor, temperature: float) -> Tensor:
    """Per-row KL(softmax(x/T) || softmax(y/T)) of ``[batch, seq, vocab]`` logits, differentiable."""
    return TorchKL.apply(x, y, temperature)


__all__ = ["kl_rows"]
