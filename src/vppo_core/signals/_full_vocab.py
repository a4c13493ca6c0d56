"""Full-vocabulary signals: the Jensen-Shannon and Hellinger divergences, the entropy gap and top-p entropy."""

from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from .. import _vocab
from .._checks import check_fraction, check_positive, check_same_device, typechecked
from ..dependency import _logit_pair, visual_dependency
from ..entropy import token_entropy
from ._common import _check_logits, _masked


@typechecked
def jensen_shannon(
    logits_p: Float[Tensor, "*batch vocab"],
    logits_q: Float[Tensor, "*batch vocab"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    temperature: float = 1.0,
    backend: Literal["auto", "triton", "cpu", "compile", "torch"] = "auto",
) -> Float[Tensor, "*batch"]:
    r"""Per-token Jensen-Shannon divergence between the policy on the original input and on a view.

    $$
    \mathrm{JSD}_t(P\Vert Q) = \tfrac12\mathrm{KL}(P\Vert M) + \tfrac12\mathrm{KL}(Q\Vert M),
    \qquad M = \tfrac12(P + Q), \qquad 0 \le \mathrm{JSD} \le \log 2 ,
    $$

    over the full vocabulary at temperature $T$. VEPO (arXiv:2606.03937) fuses it with the entropy
    shift. Computed by ``visual_dependency(logits_p, logits_q, response_mask, divergence="jsd")``
    ([`visual_dependency`][vppo_core.visual_dependency], the chunked/fused kernels, no float32 copy
    of ``[batch, seq, vocab]``); see it for the backends, special values, masking and gradients.

    Shapes:
        - ``logits_p``, ``logits_q``: ``[batch, seq, vocab]`` or ``[tokens, vocab]``
        - ``response_mask``: ``[batch, seq]`` or ``[tokens]``
        - returns: ``[batch, seq]`` or ``[tokens]``

    Args:
        logits_p: Logits on the original input.
        logits_q: Logits on the view, same shape and dtype.
        response_mask: Positions that count; ``None``: all.
        temperature: $T > 0$.
        backend: Kernel backend of [`visual_dependency`][vppo_core.visual_dependency].

    Returns:
        float32 (float64 for float64 input).

    Raises:
        ValueError: On different dtypes or devices, a bad number of dimensions, or ``temperature <= 0``.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 11)
        >>> jsd = jensen_shannon(x, x + 5 * torch.randn(2, 3, 11))
        >>> bool(((jsd >= 0) & (jsd <= 0.6932)).all())
        True
    """
    _logit_pair(logits_p, logits_q, response_mask, temperature, backend, ("logits_p", "logits_q"))
    return visual_dependency(
        logits_p, logits_q, response_mask, temperature=temperature, divergence="jsd", backend=backend
    )


@typechecked
def hellinger(
    logits_p: Float[Tensor, "*batch vocab"],
    logits_q: Float[Tensor, "*batch vocab"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    temperature: float = 1.0,
    squared: bool = False,
) -> Float[Tensor, "*batch"]:
    r"""Per-token Hellinger distance between the policy on the original input and on a view, full vocabulary.

    With $p = \operatorname{softmax}(x/T)$, $q = \operatorname{softmax}(y/T)$ and the Bhattacharyya
    coefficient $\mathrm{BC} = \sum_j \sqrt{p_j q_j}$,

    $$
    H^2_t = 1 - \mathrm{BC} = \tfrac12 \sum_j \big(\sqrt{p_j} - \sqrt{q_j}\big)^2 \in [0, 1],
    \qquad \log\mathrm{BC} = \operatorname{lse}\!\big(\tfrac{x+y}{2}\big)
      - \tfrac12\big(\operatorname{lse}x + \operatorname{lse}y\big),
    $$

    computed in that log-sum-exp form, in float32 (float64 for float64 input), by
    ``visual_dependency(logits_p, logits_q, response_mask, divergence="hellinger")``
    ([`visual_dependency`][vppo_core.visual_dependency]: the fused kernels, one read of each input,
    no float32 copy of ``[batch, seq, vocab]``, ``backend="auto"``). A bounded, symmetric
    alternative to the KL (listed among the family's divergences, FAMILY.md section 10).
    ``squared=False`` (default) returns the distance $H_t = \sqrt{H^2_t}$, whose gradient is taken
    as 0 where $H_t = 0$.

    Gradients: $\partial H^2/\partial x_j = \mathrm{BC}\,(p_j - r_j)/(2T)$ with
    $r = \operatorname{softmax}((x+y)/2)$, and symmetrically in $y$. Special values: an entry ``-inf``
    in either input contributes nothing; NaN in a counted row, or a row of only ``-inf``, gives NaN.
    Rows outside ``response_mask`` are exactly 0 and get exactly zero gradient.

    Shapes:
        - ``logits_p``, ``logits_q``: ``[batch, seq, vocab]`` or ``[tokens, vocab]``
        - ``response_mask``: ``[batch, seq]`` or ``[tokens]``
        - returns: ``[batch, seq]`` or ``[tokens]``

    Args:
        logits_p: Logits on the original input (any float dtype; never modified).
        logits_q: Logits on the view, same shape and dtype.
        response_mask: Positions that count; ``None``: all.
        temperature: $T > 0$.
        squared: Return $H^2$ instead of $H$.

    Returns:
        float32 (float64 for float64 input), in $[0, 1]$.

    Raises:
        ValueError: On different dtypes or devices, a bad number of dimensions, or ``temperature <= 0``.

    Example:
        >>> import torch
        >>> x = torch.log(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
        >>> y = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
        >>> hellinger(x, y)  # identical, disjoint
        tensor([0., 1.])
    """
    _logit_pair(logits_p, logits_q, response_mask, temperature, "auto", ("logits_p", "logits_q"))
    h2 = visual_dependency(logits_p, logits_q, response_mask, temperature=temperature, divergence="hellinger")
    if squared:
        return h2
    positive = h2 > 0
    return torch.where(positive, torch.where(positive, h2, 1.0).sqrt(), h2)


class EntropyGap(NamedTuple):
    """What [`entropy_gap`][vppo_core.signals.entropy_gap] returns, each ``[batch, seq]``."""

    entropy: Tensor
    """$H(P)$, the entropy on the original input."""
    view_entropy: Tensor
    """$H(Q)$, the entropy on the view."""
    gap: Tensor
    """$\\lvert H(Q) - H(P)\\rvert$."""


@typechecked
def entropy_gap(
    logits_p: Float[Tensor, "*batch vocab"],
    logits_q: Float[Tensor, "*batch vocab"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    temperature: float = 1.0,
) -> EntropyGap:
    r"""Entropies on the original input and on a view, and their absolute difference $\lvert\Delta H_t\rvert$.

    $H_t(P)$ and $H_t(Q)$ over the full vocabulary with [`token_entropy`][vppo_core.token_entropy]
    (the fused kernels, ``backend="auto"``, float32; each input read once), and
    $\lvert\Delta H_t\rvert = \lvert H_t(Q) - H_t(P)\rvert$. VEPO (arXiv:2606.03937) uses $H(P)$
    as its uncertainty signal and $\lvert\Delta H\rvert$ as a perception signal. Differentiable;
    the gap has gradient $\operatorname{sign}(\Delta H)$ (0 at 0).

    Shapes:
        - ``logits_p``, ``logits_q``: ``[batch, seq, vocab]`` or ``[tokens, vocab]``
        - ``response_mask``: ``[batch, seq]`` or ``[tokens]``
        - returns: three tensors of shape ``[batch, seq]`` or ``[tokens]``

    Args:
        logits_p: Logits on the original input.
        logits_q: Logits on the view.
        response_mask: Positions that count; ``None``: all.
        temperature: $T > 0$.

    Returns:
        [`EntropyGap`][vppo_core.signals.EntropyGap] of float32 tensors (float64 for float64 input).

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # log 4
        >>> y = torch.tensor([[0.0, 0.0, -float("inf"), -float("inf")]])  # log 2
        >>> entropy_gap(x, y).gap
        tensor([0.6931])
    """
    h_p = token_entropy(logits_p, response_mask, temperature=temperature)
    h_q = token_entropy(logits_q, response_mask, temperature=temperature)
    return EntropyGap(h_p, h_q, (h_q - h_p).abs())


@typechecked
def top_p_entropy(
    logits: Float[Tensor, "*batch vocab"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    top_p: float = 0.95,
    temperature: float = 1.0,
) -> Float[Tensor, "*batch"]:
    r"""Entropy of the renormalised top-$p$ (nucleus) distribution at every position.

    With $p = \operatorname{softmax}(\text{logits}/T)$ sorted in decreasing order, the nucleus $N_t$
    is the smallest prefix whose mass reaches ``top_p`` (a token is kept while the mass before it is
    below ``top_p``; the most probable token always is), and

    $$
    H^{(p)}_t = -\sum_{j \in N_t} \frac{p_j}{s_t}\log\frac{p_j}{s_t}, \qquad s_t = \sum_{j \in N_t} p_j .
    $$

    ToR's reasoning score (arXiv:2603.25077, ``top_p=0.95``): it ignores the long tail that inflates
    the full entropy and is exactly 0 wherever one token holds at least ``top_p`` of the mass (so
    selections over it need a tie-break: see [`topq_mask`][vppo_core.selection.topq_mask]).
    ``top_p=1`` is the full entropy ([`token_entropy`][vppo_core.token_entropy]). Row chunks in
    float32 (float64 for float64); a signal, **not differentiable** (computed under ``no_grad``).

    Shapes:
        - ``logits``: ``[batch, seq, vocab]`` or ``[tokens, vocab]``
        - ``response_mask``: ``[batch, seq]`` or ``[tokens]``
        - returns: ``[batch, seq]`` or ``[tokens]``

    Args:
        logits: Next-token logits (never modified).
        response_mask: Positions that count (others are 0); ``None``: all.
        top_p: Nucleus mass, in $(0, 1]$.
        temperature: $T > 0$.

    Returns:
        Detached float32 (float64 for float64 input), in $[0, \log V]$.

    Raises:
        ValueError: If ``top_p`` is not in $(0, 1]$, ``temperature <= 0``, or ``logits`` has a bad
            number of dimensions.

    Example:
        >>> import torch
        >>> logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.96, 0.02, 0.01, 0.01]]))
        >>> top_p_entropy(logits, top_p=0.9)  # nucleus {0.5, 0.3, 0.15}; the second row's is one token
        tensor([0.9933, 0.0000])
    """
    check_fraction("top_p", top_p)
    check_positive("temperature", temperature)
    _check_logits("logits", logits)
    check_same_device(logits=logits, response_mask=response_mask)
    if top_p == 1.0:
        with torch.no_grad():
            return token_entropy(logits.detach(), response_mask, temperature=temperature)
    x = logits.detach()
    x = x.unsqueeze(0) if x.ndim == 2 else x
    out = _vocab.top_p_entropy_forward(x, float(temperature), float(top_p)).reshape(logits.shape[:-1])
    return _masked(out, response_mask)
