"""Token visual dependency: how much each token's next-token distribution depends on the image."""

from typing import Literal

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from . import kernels
from ._checks import (
    as_bool_mask,
    check_choice,
    check_positive,
    check_same_device,
    result_dtype,
    typechecked,
)
from ._estimators import ESTIMATORS, sampled_kl

__all__ = ["sampled_visual_dependency", "visual_dependency", "visual_dependency_from_hidden"]


@typechecked
def visual_dependency(
    logits_img: Float[Tensor, "*batch vocab"],
    logits_noimg: Float[Tensor, "*batch vocab"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    temperature: float = 1.0,
    divergence: Literal["kl", "reverse_kl", "jsd", "hellinger"] = "kl",
    backend: Literal["auto", "triton", "cpu", "compile", "torch"] = "auto",
) -> Float[Tensor, "*batch"]:
    r"""Exact token visual dependency: the KL between the policy with the real and the perturbed image.

    For each position, with $x = \text{logits\_img}/T$ and $y = \text{logits\_noimg}/T$ over the
    full vocabulary, $p = \mathrm{softmax}(x)$ and $q = \mathrm{softmax}(y)$,

    $$
    S_t = \mathrm{KL}(p\,\|\,q)
        = \sum_j p_j (x_j - y_j) - \big(\operatorname{lse}(x) - \operatorname{lse}(y)\big),
    $$

    computed in float32 (float64 for float64 inputs) in the log-sum-exp form above, without a
    float32 copy of the ``[batch, seq, vocab]`` input. This is Eq. 3 of VPPO (Huang et al., 2025,
    "Spotlight on Token Perception for Multimodal Reinforcement Learning", arXiv:2510.09285). The
    function is differentiable in both inputs
    ($\partial S/\partial x_j = p_j((x_j - y_j) - \sum_i p_i(x_i - y_i))/T$,
    $\partial S/\partial y_j = (q_j - p_j)/T$), so it also serves as a PAPO-style perception loss.
    First derivatives only: a gradient taken with ``create_graph=True`` cannot be differentiated
    again (doing so raises a ``RuntimeError``).

    ``divergence="reverse_kl"`` computes $\mathrm{KL}(q\,\|\,p)$ and ``divergence="jsd"`` the
    Jensen-Shannon divergence $\tfrac12\mathrm{KL}(p\,\|\,m) + \tfrac12\mathrm{KL}(q\,\|\,m)$,
    $m = (p + q)/2$ (the alternatives of VPPO's Table 13), through the same kernels.
    ``divergence="hellinger"`` computes the squared Hellinger distance

    $$
    H^2 = 1 - \sum_j \sqrt{p_j q_j}
        = 1 - \exp\Big(\operatorname{lse}\big(\tfrac{x + y}{2}\big)
          - \tfrac12\big(\operatorname{lse}(x) + \operatorname{lse}(y)\big)\Big) \in [0, 1],
    $$

    with $\partial H^2/\partial x_j = \mathrm{BC}\,(p_j - r_j)/(2T)$, $\mathrm{BC} = \sum_i \sqrt{p_i q_i}$,
    $r = \mathrm{softmax}((x + y)/2)$, and symmetrically in $y$ (the signal behind
    [`hellinger`][vppo_core.signals.hellinger]).

    Backends (see ``docs/kernels.md``): ``"torch"`` is chunked eager PyTorch; ``"compile"`` a
    kernel compiled with ``torch.compile`` that reads each input once (CPU and GPU); ``"cpu"`` a
    hand-vectorised C kernel for CPU tensors that reads each input once and overlaps the reads with
    the arithmetic (built with the system C compiler at first use; its backward is C too, and
    computes only the gradients of the inputs that require one);
    ``"triton"`` a fused single-pass GPU kernel. ``"cpu"`` and ``"triton"`` are ``torch.library``
    custom ops, so they also run inside your step compiled with ``torch.compile``. ``"auto"`` picks
    Triton for CUDA tensors (when Triton 3.2 or newer is installed); for CPU inputs of at least
    ``2**20`` logits ``"cpu"`` (``"compile"`` if no C compiler is found, or inside your
    ``torch.compile``); and ``"torch"`` for float64 and smaller inputs (where a compile would cost
    seconds to save microseconds) or where neither compiler is available. All backends give the same
    values up to float32 rounding.

    Special values: a vocabulary entry that is ``-inf`` in ``logits_img`` contributes nothing (it has
    zero probability), whatever ``logits_noimg`` holds there; an entry that is finite in
    ``logits_img`` but ``-inf`` in ``logits_noimg`` makes the KL ``+inf``, as it mathematically is
    (for Hellinger it adds $\sqrt{p_j \cdot 0} = 0$ to BC, and for JSD a finite term). A NaN
    anywhere in a counted row gives NaN for that row, and so does a row with no distribution (every
    logit ``-inf`` in either input), on every backend. Rows outside ``response_mask`` are exactly 0
    and receive exactly zero gradient, whatever they hold (padding is never read into the result).
    Results are clamped at 0 against rounding.

    Shapes:
        - ``logits_img``, ``logits_noimg``: ``[batch, seq, vocab]`` or ``[tokens, vocab]``
        - ``response_mask``: ``[batch, seq]`` or ``[tokens]`` (bool or 0/1)
        - returns: ``[batch, seq]`` or ``[tokens]``

    Args:
        logits_img: Next-token logits of the policy given the real image.
        logits_noimg: Next-token logits given the perturbed (or removed) image, same shape and dtype.
        response_mask: Positions that count; ``None`` counts every position.
        temperature: Sampling temperature $T > 0$ the logits are divided by (never in place).
        divergence: ``"kl"`` (default, the paper's), ``"reverse_kl"``, ``"jsd"`` or ``"hellinger"``
            (squared).
        backend: ``"auto"`` (default), ``"triton"``, ``"cpu"``, ``"compile"`` or ``"torch"``.

    Returns:
        The per-token divergence, float32 (float64 for float64 inputs on the ``"torch"`` and
        ``"compile"`` backends), ``>= 0`` (at most $\log 2$ for JSD and 1 for Hellinger).

    Raises:
        ValueError: If the inputs have different dtypes or devices, fewer than 2 or more than 3
            dimensions, an empty vocabulary, ``temperature <= 0``, or a backend that cannot run here
            (``"triton"`` without CUDA, ``"cpu"`` on a GPU tensor or without a C compiler, either for
            float64).
        TypeError: If a shape, a dtype, ``divergence`` or ``backend`` does not match the annotation
            (jaxtyping).

    Example:
        >>> import torch
        >>> from vppo_core import visual_dependency
        >>> x = torch.randn(2, 5, 11)
        >>> visual_dependency(x, x).abs().max().item()
        0.0
        >>> dep = visual_dependency(x, x + torch.randn(2, 5, 11))
        >>> dep.shape, bool((dep >= 0).all())
        (torch.Size([2, 5]), True)
        >>> jsd = visual_dependency(x, x + 1e3 * torch.eye(11)[:5], divergence="jsd", backend="torch")
        >>> bool((jsd <= torch.log(torch.tensor(2.0)) + 1e-6).all())  # JSD is at most log 2
        True
        >>> far = torch.tensor([[0.0, -float("inf")]]), torch.tensor([[-float("inf"), 0.0]])
        >>> visual_dependency(*far, divergence="hellinger")  # disjoint supports: H^2 = 1
        tensor([1.])
    """
    check_choice("divergence", divergence, kernels.DIVERGENCES)
    x, y = _logit_pair(logits_img, logits_noimg, response_mask, temperature, backend)
    dep = kernels.divergence(x, y, float(temperature), divergence=divergence, backend=backend)
    dep = dep.reshape(logits_img.shape[:-1])
    if response_mask is None:
        return dep
    return torch.where(as_bool_mask(response_mask), dep, 0.0)


@typechecked
def sampled_visual_dependency(
    logprobs_img: Float[Tensor, "*batch"],
    logprobs_noimg: Float[Tensor, "*batch"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    estimator: Literal["k1", "k2", "k3"] = "k3",
) -> Float[Tensor, "*batch"]:
    r"""Visual dependency estimated from the sampled tokens' log-probabilities (the VPPO-RL code's choice).

    With $d_t = \operatorname{clamp}(\log\pi(o_t\mid I') - \log\pi(o_t\mid I), -20, 20)$, the
    log-probability of the sampled token under the perturbed image minus that under the real image:

    $$
    k_1 = -d_t, \qquad k_2 = \tfrac12 d_t^2, \qquad
    k_3 = \operatorname{clamp}(e^{d_t} - d_t - 1,\ 0,\ 10).
    $$

    Each is a one-sample estimate of $\mathrm{KL}(\pi(\cdot\mid I)\,\|\,\pi(\cdot\mid I'))$ when
    $o_t \sim \pi(\cdot\mid I)$ ($k_1$ and $k_3$ unbiased before clamping). ``k3`` is what the
    official VPPO-RL training code computes (``low_var_kl`` of ``aug_log_probs - old_log_probs``);
    it needs only the two log-probability tensors, not the ``[batch, seq, vocab]`` logits.

    NaN inputs give NaN at counted positions; positions outside ``response_mask`` are exactly 0.
    Not differentiable by design of use (the signal is computed with the old policy under
    ``no_grad``), though autograd does flow through it.

    Shapes:
        - ``logprobs_img``, ``logprobs_noimg``, ``response_mask``: ``[batch, seq]`` (any shape, all equal)
        - returns: the same shape

    Args:
        logprobs_img: $\log\pi(o_t\mid I)$ of the sampled tokens with the real image.
        logprobs_noimg: $\log\pi(o_t\mid I')$ of the same tokens with the perturbed image.
        response_mask: Positions that count; ``None`` counts every position.
        estimator: ``"k3"`` (default, as in VPPO-RL), ``"k1"`` or ``"k2"``.

    Returns:
        The per-token estimate, float32 (float64 for float64 inputs).

    Raises:
        ValueError: If the tensors are on different devices.
        TypeError: If the shapes differ or ``estimator`` is unknown (jaxtyping).

    Example:
        >>> import torch
        >>> from vppo_core import sampled_visual_dependency
        >>> lp_img = torch.tensor([[-0.1, -2.0]])
        >>> lp_noimg = torch.tensor([[-0.1, -4.0]])
        >>> sampled_visual_dependency(lp_img, lp_noimg)  # e^-2 + 2 - 1 at the second token
        tensor([[0.0000, 1.1353]])
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_same_device(logprobs_img=logprobs_img, logprobs_noimg=logprobs_noimg, response_mask=response_mask)
    dtype = result_dtype(logprobs_img, logprobs_noimg)
    est = sampled_kl(logprobs_img.to(dtype), logprobs_noimg.to(dtype), estimator, k3_range=(0.0, 10.0))
    if response_mask is None:
        return est
    return torch.where(as_bool_mask(response_mask), est, 0.0)


@typechecked
def visual_dependency_from_hidden(
    hidden_img: Float[Tensor, "*batch hidden"],
    hidden_noimg: Float[Tensor, "*batch hidden"],
    lm_head_weight: Float[Tensor, "vocab hidden"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    temperature: float = 1.0,
    divergence: Literal["kl", "reverse_kl", "jsd", "hellinger"] = "kl",
    backend: Literal["auto", "triton", "cpu", "compile", "torch"] = "auto",
    chunk_size: int = 1024,
    vocab_chunk_size: int = 8192,
) -> Float[Tensor, "*batch"]:
    r"""Token visual dependency from final hidden states, without materialising ``[tokens, vocab]`` logits.

    Computes ``visual_dependency(hidden_img @ W.T, hidden_noimg @ W.T, response_mask)`` tile by tile:
    the logits of at most ``chunk_size`` tokens and ``vocab_chunk_size`` vocabulary entries are
    alive at a time (two GEMMs per tile, in the inputs' dtype), and the tiles' row statistics are
    merged with the log-sum-exp rule

    $$
    \operatorname{lse} = \log\big(e^{\operatorname{lse}_1} + e^{\operatorname{lse}_2}\big), \qquad
    \textstyle\sum_j p_j (x_j - y_j) = \sum_k e^{\operatorname{lse}_k - \operatorname{lse}}\, a_k ,
    $$

    so a user can run the two VLM forward passes to hidden states only. The result is
    differentiable w.r.t. both hidden states and the weight; the backward recomputes each tile and
    never holds more than ``2 x tokens x vocab_chunk_size`` logit gradients. Values, ``divergence``,
    ``backend`` and NaN/mask semantics are those of `visual_dependency`.

    Shapes:
        - ``hidden_img``, ``hidden_noimg``: ``[batch, seq, hidden]`` or ``[tokens, hidden]``
        - ``lm_head_weight``: ``[vocab, hidden]``
        - ``response_mask``: ``[batch, seq]`` or ``[tokens]``
        - returns: ``[batch, seq]`` or ``[tokens]``

    Args:
        hidden_img: Final-layer hidden states (after the final norm) with the real image.
        hidden_noimg: The same with the perturbed image.
        lm_head_weight: The output projection's weight (``model.lm_head.weight``).
        response_mask: Positions that count.
        temperature: Sampling temperature $T > 0$.
        divergence: ``"kl"`` (default), ``"reverse_kl"``, ``"jsd"`` (which sweeps the tiles twice) or
            ``"hellinger"`` (squared; merges a third log-sum-exp, $\operatorname{lse}((x + y)/2)$).
        backend: Row kernel for each tile: ``"auto"``, ``"triton"``, ``"cpu"``, ``"compile"`` or ``"torch"``.
        chunk_size: Tokens per tile.
        vocab_chunk_size: Vocabulary entries per tile.

    Returns:
        Per-token divergence, float32 (float64 for float64 inputs).

    Raises:
        ValueError: If the dtypes or devices differ, the hidden states have fewer than 2 or more than
            3 dimensions, ``lm_head_weight`` has no rows (an empty vocabulary), a chunk size is below
            1, or an argument of `visual_dependency` is invalid.

    Example:
        >>> import torch
        >>> h, w = torch.randn(2, 3, 8), torch.randn(50, 8)
        >>> ref = visual_dependency(h @ w.T, (h + 0.1) @ w.T)
        >>> torch.allclose(visual_dependency_from_hidden(h, h + 0.1, w, vocab_chunk_size=16), ref, atol=1e-6)
        True
    """
    check_positive("temperature", temperature)
    check_choice("divergence", divergence, kernels.DIVERGENCES)
    check_choice("backend", backend, kernels.BACKENDS)
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    if hidden_img.dtype != hidden_noimg.dtype or hidden_img.dtype != lm_head_weight.dtype:
        raise ValueError(
            "hidden_img, hidden_noimg and lm_head_weight must share a dtype, got "
            f"{hidden_img.dtype}, {hidden_noimg.dtype} and {lm_head_weight.dtype}"
        )
    check_same_device(
        hidden_img=hidden_img, hidden_noimg=hidden_noimg, lm_head_weight=lm_head_weight, response_mask=response_mask
    )
    _check_rows("hidden_img", hidden_img, "hidden")
    _check_vocab("lm_head_weight", lm_head_weight.shape[0], lm_head_weight.shape, "first")
    hx = hidden_img.reshape(-1, hidden_img.shape[-1])
    hy = hidden_noimg.reshape(-1, hidden_noimg.shape[-1])
    dep = kernels.divergence_from_hidden(
        hx,
        hy,
        lm_head_weight,
        float(temperature),
        divergence=divergence,
        backend=backend,
        token_chunk=chunk_size,
        vocab_chunk=vocab_chunk_size,
    )
    dep = dep.reshape(hidden_img.shape[:-1])
    if response_mask is None:
        return dep
    return torch.where(as_bool_mask(response_mask), dep, 0.0)


def _check_rows(name: str, t: Tensor, last: str) -> None:
    """``t`` is ``[batch, seq, last]`` or ``[tokens, last]``, else a ValueError naming ``name``."""
    if not 2 <= t.ndim <= 3:
        raise ValueError(
            f"{name} must be [batch, seq, {last}] or [tokens, {last}], got {t.ndim} dimensions (shape {tuple(t.shape)})"
        )


def _check_vocab(name: str, vocab: int, shape: torch.Size, axis: str) -> None:
    """A vocabulary of at least one entry (a softmax over nothing has no value)."""
    if vocab < 1:
        raise ValueError(
            f"{name} must have at least 1 vocabulary entry (its {axis} dimension), got shape {tuple(shape)}"
        )


def _logit_pair(
    logits_img: Tensor,
    logits_noimg: Tensor,
    response_mask: Tensor | None,
    temperature: float,
    backend: str,
    names: tuple[str, str] = ("logits_img", "logits_noimg"),
) -> tuple[Tensor, Tensor]:
    """Checks shared by the two-view functions, in the caller's argument ``names``; ``[tokens, vocab]``
    inputs come back as ``[1, tokens, vocab]`` views."""
    check_positive("temperature", temperature)
    check_choice("backend", backend, kernels.BACKENDS)
    a, b = names
    _check_rows(a, logits_img, "vocab")
    _check_vocab(a, logits_img.shape[-1], logits_img.shape, "last")
    if logits_img.dtype != logits_noimg.dtype:
        raise ValueError(f"{a} and {b} must have the same dtype, got {logits_img.dtype} and {logits_noimg.dtype}")
    check_same_device(**{a: logits_img, b: logits_noimg, "response_mask": response_mask})
    if logits_img.ndim == 2:
        return logits_img.unsqueeze(0), logits_noimg.unsqueeze(0)
    return logits_img, logits_noimg
