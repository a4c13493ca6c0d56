r"""Token signals of the perception-aware family: log-ratios, divergences, entropies, visual similarity, position.

Every perception-aware method scores each response token by how much it depends on the image (or
how uncertain it is) and turns the score into a mask or a weight. The signals and who uses them:

- sampled log-ratio ($k_1, k_2, k_3$, $\lvert\log r\rvert$, positive part):
  [`log_ratio_signal`][vppo_core.signals.log_ratio_signal] (VPPO's code, ToR, CGPO);
- full-vocabulary KL: [`visual_dependency`][vppo_core.visual_dependency] (VPPO, PAPO, PGPO);
- Jensen-Shannon divergence: [`jensen_shannon`][vppo_core.signals.jensen_shannon] (VEPO);
- Hellinger distance: [`hellinger`][vppo_core.signals.hellinger] (a bounded alternative);
- $H(P)$, $H(Q)$, $\lvert\Delta H\rvert$: [`entropy_gap`][vppo_core.signals.entropy_gap] and
  [`token_entropy`][vppo_core.token_entropy] (VEPO, PEPO, CGPO);
- top-$p$ entropy: [`top_p_entropy`][vppo_core.signals.top_p_entropy] (ToR);
- hidden-state visual similarity: [`visual_similarity`][vppo_core.signals.visual_similarity] (PEPO, VGPO);
- relative position $t/(L-1)$: [`relative_position`][vppo_core.signals.relative_position] (VGPO).

Conventions: ``[batch, seq]`` results aligned like the inputs, exactly 0 outside ``response_mask``,
float32 (float64 for float64 input). Full-vocabulary quantities (KL, JSD, Hellinger, entropies) go
through the fused kernels of [`visual_dependency`][vppo_core.visual_dependency] (top-$p$ entropy,
which sorts, row chunk by row chunk) and never build a float32 copy of the whole
``[batch, seq, vocab]`` logits. Signals are computed with the rollout (old) policy under
``no_grad`` in the per-rollout-batch stage unless a method says otherwise; detach them before they
feed a mask or a weight (selection and factor blocks do).
"""

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from . import _vocab
from ._checks import as_bool_mask, check_choice, check_positive, check_same_device, result_dtype, typechecked
from ._estimators import LOG_RATIO_CLAMP
from .dependency import visual_dependency
from .entropy import token_entropy

__all__ = [
    "EntropyGap",
    "entropy_gap",
    "hellinger",
    "jensen_shannon",
    "log_ratio_signal",
    "relative_position",
    "top_p_entropy",
    "visual_similarity",
]

LogRatioKind = Literal["k1", "k2", "k3", "abs", "positive"]


def _check_logits(name: str, logits: Tensor) -> None:
    if not 2 <= logits.ndim <= 3:
        raise ValueError(
            f"{name} must be [batch, seq, vocab] or [tokens, vocab], got {logits.ndim} dimensions "
            f"(shape {tuple(logits.shape)})"
        )


def _check_view_pair(logits_p: Tensor, logits_q: Tensor, response_mask: Tensor | None, temperature: float) -> None:
    """Argument checks of the two-view divergences, in their own argument names."""
    check_positive("temperature", temperature)
    _check_logits("logits_p", logits_p)
    if logits_p.dtype != logits_q.dtype:
        raise ValueError(f"logits_p and logits_q must have the same dtype, got {logits_p.dtype} and {logits_q.dtype}")
    check_same_device(logits_p=logits_p, logits_q=logits_q, response_mask=response_mask)


def _masked(values: Tensor, response_mask: Tensor | None) -> Tensor:
    return values if response_mask is None else torch.where(as_bool_mask(response_mask), values, 0.0)


# ----------------------------------------------------------------------------- sampled log-ratio family


@typechecked
def log_ratio_signal(
    logprobs: Float[Tensor, "*batch"],
    view_logprobs: Float[Tensor, "*batch"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    kind: LogRatioKind = "k3",
    k3_range: tuple[float, float] = (0.0, 10.0),
) -> Float[Tensor, "*batch"]:
    r"""Per-token signals from the sampled token's log-probability under the original input and a view.

    With $d_t = \operatorname{clamp}(\log q(o_t) - \log p(o_t), -20, 20)$, $p$ the policy on the
    original input and $q$ on the view (no image, masked, noised, counterfactual):

    | ``kind`` | value | |
    |---|---|---|
    | ``"k1"`` | $-d_t$ | unbiased for $\mathrm{KL}(p\Vert q)$, signed |
    | ``"k2"`` | $d_t^2/2$ | |
    | ``"k3"`` | $\operatorname{clamp}(e^{d_t} - d_t - 1, \text{k3\_range})$ | VPPO code, CGPO ($S_t$) |
    | ``"abs"`` | $\lvert d_t\rvert$ | ToR's perception score $P_t$ (arXiv:2603.25077) |
    | ``"positive"`` | $\max(-d_t, 0)$ | the log-probability the token loses on the view |

    ``k3_range`` is $[0, 10]$ for a rollout-policy reference (a signal) and $[-10, 10]$ for the
    current policy (a loss term, as [`kl_penalty`][vppo_core.kl_penalty]). Only the two log-probability
    tensors are needed, not the logits. Differentiable; detach before it feeds a mask or a weight.

    Shapes:
        - ``logprobs``, ``view_logprobs``, ``response_mask``: ``[batch, seq]`` (any shape, all equal)
        - returns: the same shape

    Args:
        logprobs: $\log p(o_t)$ of the sampled tokens on the original input.
        view_logprobs: $\log q(o_t)$ of the same tokens on the view.
        response_mask: Positions that count (others are exactly 0); ``None``: all.
        kind: One of the rows above.
        k3_range: Clamp of ``"k3"``.

    Returns:
        float32 (float64 for float64 input).

    Raises:
        ValueError: On an unknown ``kind`` or a ``k3_range`` with ``low > high``.

    Example:
        >>> import torch
        >>> lp, lq = torch.tensor([[-0.1, -2.0, -1.0]]), torch.tensor([[-0.1, -4.0, -0.5]])
        >>> log_ratio_signal(lp, lq, kind="abs"), log_ratio_signal(lp, lq, kind="positive")
        (tensor([[0.0000, 2.0000, 0.5000]]), tensor([[0., 2., 0.]]))
    """
    check_choice("kind", kind, ("k1", "k2", "k3", "abs", "positive"))
    if not k3_range[0] <= k3_range[1]:
        raise ValueError(f"k3_range must be (low, high) with low <= high, got {k3_range!r}")
    check_same_device(logprobs=logprobs, view_logprobs=view_logprobs, response_mask=response_mask)
    dtype = result_dtype(logprobs, view_logprobs)
    d = (view_logprobs.to(dtype) - logprobs.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if kind == "k1":
        out = 0.0 - d  # not -d: no negative zeros
    elif kind == "k2":
        out = 0.5 * d.square()
    elif kind == "k3":
        out = (torch.expm1(d) - d).clamp(*k3_range)
    elif kind == "abs":
        out = d.abs()
    else:
        out = (0.0 - d).clamp_min(0.0)
    return _masked(out, response_mask)


# ----------------------------------------------------------------------------- full-vocabulary divergences


@typechecked
def jensen_shannon(
    logits_p: Float[Tensor, "*batch vocab"],
    logits_q: Float[Tensor, "*batch vocab"],
    response_mask: Shaped[Tensor, "*batch"] | None = None,
    *,
    temperature: float = 1.0,
    backend: Literal["auto", "triton", "compile", "torch"] = "auto",
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
    _check_view_pair(logits_p, logits_q, response_mask, temperature)
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
    _check_view_pair(logits_p, logits_q, response_mask, temperature)
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
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
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


# ----------------------------------------------------------------------------- hidden-state similarity


def _layers(hidden_states: Tensor | Sequence[Tensor], layers: str | Sequence[int]) -> list[Tensor]:
    states = [hidden_states] if isinstance(hidden_states, Tensor) else list(hidden_states)
    if not states:
        raise ValueError("hidden_states must hold at least one [batch, seq, hidden] tensor, got an empty sequence")
    if isinstance(layers, str):
        check_choice("layers", layers, ("all", "last"))
        return states if layers == "all" else states[-1:]
    picked = []
    for i in layers:
        if not -len(states) <= i < len(states):
            raise ValueError(f"layers holds index {i}, but hidden_states has {len(states)} layers")
        picked.append(states[i])
    if not picked:
        raise ValueError("layers must select at least one layer, got an empty sequence")
    return picked


@typechecked
def visual_similarity(
    hidden_states: Float[Tensor, "batch seq hidden"] | Sequence[Float[Tensor, "batch seq hidden"]],
    image_mask: Shaped[Tensor, "batch seq"],
    response_mask: Shaped[Tensor, "batch seq"] | None = None,
    *,
    layers: Literal["all", "last"] | Sequence[int] = "all",
    mode: Literal["pairwise", "prototype"] = "pairwise",
    align: Literal["predicting", "token"] = "predicting",
    eps: float = 1e-8,
) -> Float[Tensor, "batch seq"]:
    r"""Cosine similarity of each position's hidden state to the image tokens' hidden states, averaged over layers.

    With $h^\ell_t$ the hidden state of layer $\ell$ at position $t$, $\mathcal V$ the image-token
    positions of the row and $\mathcal L$ the chosen layers,

    $$
    \texttt{pairwise:}\ VS_t = \frac{1}{|\mathcal L|}\sum_{\ell}\frac{1}{|\mathcal V|}\sum_{v \in \mathcal V}
    \cos(h^\ell_t, h^\ell_v),
    \qquad
    \texttt{prototype:}\ S_t = \frac{1}{|\mathcal L|}\sum_{\ell}
      \cos\Big(h^\ell_t, \frac{1}{|\mathcal V|}\sum_{v} h^\ell_v\Big).
    $$

    PEPO (arXiv:2603.22847) uses ``mode="pairwise", layers="all"`` (every returned layer, embeddings
    included) on the update forward; VGPO (arXiv:2604.09349) ``mode="prototype", layers="last"`` (the
    last returned state, after the final norm). The pairwise mean is computed as
    $\hat h_t\cdot\frac1{|\mathcal V|}\sum_v \hat h_v$ with unit vectors $\hat h$, so the cost is
    $O(\text{seq}\cdot\text{hidden})$ per layer, not quadratic. ``hidden_states`` is what a
    ``transformers`` model returns with ``output_hidden_states=True`` (a tuple of
    ``[batch, seq, hidden]``, embeddings first, the last after the final norm), or one tensor.

    Alignment: ``align="predicting"`` (default) gives position $t$ the similarity of the hidden state
    at $t-1$, the one whose logits predict ``input_ids[t]``, so the result lines up with log-probabilities,
    entropies and response masks in the convention of ``vppo_core.integrations.transformers`` (entry
    ``[b, t]`` about token ``input_ids[b, t]``; position 0 gets 0). ``align="token"`` uses the hidden
    state at $t$ itself. Which one PEPO's and VGPO's code read is not pinned down by their
    descriptions.

    Norms are clamped at ``eps``. A row without image tokens gets 0. Computed in float32 (float64 for
    float64), one layer at a time (``[batch, seq, hidden]``, never ``vocab``); differentiable (PEPO's
    official code lets the gradient flow through its weights; detach for the re-implementation).

    Shapes:
        - ``hidden_states``: ``[batch, seq, hidden]`` or a sequence of them (layers)
        - ``image_mask``, ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        hidden_states: Hidden states of one forward pass.
        image_mask: Image-token positions (``inputs["mm_token_type_ids"] == 1``, or
            ``input_ids == model.config.image_token_id``).
        response_mask: Positions that count (others are 0); ``None``: all.
        layers: ``"all"``, ``"last"``, or indices into ``hidden_states``.
        mode: ``"pairwise"`` (mean of cosines) or ``"prototype"`` (cosine to the mean).
        align: ``"predicting"`` or ``"token"`` (see above).
        eps: Smallest norm, $> 0$.

    Returns:
        Similarities in $[-1, 1]$, float32 (float64 for float64 input).

    Raises:
        ValueError: On an unknown option, an empty or out-of-range layer selection, or ``eps <= 0``.

    Example:
        >>> import torch
        >>> h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
        >>> img = torch.tensor([[True, True, False, False]])
        >>> visual_similarity(h, img, align="token")  # pairwise mean of cosines to (1, 0) and (0, 1)
        tensor([[ 0.5000,  0.5000,  0.7071, -0.5000]])
        >>> visual_similarity(h, img, mode="prototype", align="token")  # cosine to the mean (0.5, 0.5)
        tensor([[ 0.7071,  0.7071,  1.0000, -0.7071]])
    """
    check_choice("mode", mode, ("pairwise", "prototype"))
    check_choice("align", align, ("predicting", "token"))
    check_positive("eps", eps)
    states = _layers(hidden_states, layers)
    check_same_device(hidden_states=states[0], image_mask=image_mask, response_mask=response_mask)
    img = as_bool_mask(image_mask, "image_mask")
    n_img = img.sum(-1, keepdim=True)
    dtype = result_dtype(*states)
    total = None
    for h in states:
        if h.shape[:2] != img.shape:
            raise ValueError(
                f"every hidden state must be [batch, seq, hidden] with [batch, seq] = {tuple(img.shape)}, "
                f"got {tuple(h.shape)}"
            )
        h = h.to(dtype)
        unit = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(eps)
        source = unit if mode == "pairwise" else h
        mean_img = torch.where(img.unsqueeze(-1), source, 0.0).sum(1, keepdim=True) / n_img.clamp_min(1).unsqueeze(-1)
        if mode == "prototype":
            mean_img = mean_img / torch.linalg.vector_norm(mean_img, dim=-1, keepdim=True).clamp_min(eps)
        sim = (unit * mean_img).sum(-1)
        total = sim if total is None else total + sim
    assert total is not None
    sim = torch.where(n_img > 0, total / len(states), 0.0)
    if align == "predicting":
        sim = torch.cat([sim.new_zeros(sim.shape[0], min(1, sim.shape[1])), sim[:, :-1]], dim=1)
    return _masked(sim, response_mask)


@typechecked
def relative_position(
    response_mask: Shaped[Tensor, "batch seq"], *, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "batch seq"]:
    r"""Each valid token's relative position in its response, $j/(L_i - 1) \in [0, 1]$.

    $j = 0, \dots, L_i - 1$ counts the response's valid tokens in order (left or right padding
    alike); a one-token response gives 0, padding 0. VGPO (arXiv:2604.09349) boosts late tokens by
    $1 + \beta\, t/(L-1)$.

    Shapes:
        - ``response_mask``: ``[batch, seq]``
        - returns: ``[batch, seq]``

    Args:
        response_mask: Valid response tokens.
        dtype: Result dtype (float32, or float64 to compose with float64 signals).

    Returns:
        Relative positions in ``dtype``.

    Example:
        >>> import torch
        >>> relative_position(torch.tensor([[0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]))
        tensor([[0.0000, 0.0000, 0.2500, 0.5000, 0.7500, 1.0000],
                [0.0000, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000]])
    """
    valid = as_bool_mask(response_mask)
    index = (valid.long().cumsum(-1) - 1).to(dtype)
    span = (valid.sum(-1, keepdim=True) - 1).clamp_min(1).to(dtype)
    return torch.where(valid, index / span, 0.0)
