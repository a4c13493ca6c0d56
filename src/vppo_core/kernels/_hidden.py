"""Logit-free divergence: from final hidden states and the output projection, chunk by chunk.

The ``[tokens, vocab]`` logits are never materialised. The forward walks over tiles of
``token_chunk x vocab_chunk`` logits (two small GEMMs per tile, in the inputs' dtype, as the model's
``lm_head`` would compute them), hands each tile to a backend's row kernel and merges the tiles'
row statistics with the log-sum-exp rule

    lse = logaddexp(lse_1, lse_2),   a = a_1 e^{lse_1 - lse} + a_2 e^{lse_2 - lse}

(``a = sum_j p_j (x_j - y_j)`` of a tile, normalised within the tile). The squared Hellinger
distance merges its third log-sum-exp, ``lse((x + y)/2)``, like the other two. The Jensen-Shannon
divergence needs the full-row normalisers first, so it sweeps the tiles twice.

The backward recomputes each tile's logits, gets the tile's logit gradients from the backend's
pointwise backward (which needs only the saved full-row statistics), and accumulates

    d h_img = G_x W,   d h_noimg = G_y W,   d W = G_x^T h_img + G_y^T h_noimg

with ``G`` the tile's logit gradients. ``dW`` is computed per vocabulary chunk with one GEMM over all
tokens, so the extra memory is ``2 x tokens x vocab_chunk`` gradient entries, not a ``[vocab, hidden]``
float32 accumulator. Rows whose upstream gradient is zero contribute exactly zero (their hidden
states are zeroed before the ``dW`` GEMM, so a NaN in a padded row cannot leak into ``dW``).
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._chunks import compute_dtype
from ._torch import hellinger_value

ForwardFn = Callable[[Tensor, Tensor, float, str], tuple[Tensor, Tensor]]
BackwardFn = Callable[[Tensor, Tensor, Tensor, Tensor, float, str], tuple[Tensor, Tensor]]
PartialFn = Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


def balanced_chunks(n: int, chunk: int) -> list[slice]:
    """Split ``range(n)`` into ``ceil(n / chunk)`` slices of nearly equal length (no tiny last chunk)."""
    if n == 0:
        return []
    count = math.ceil(n / chunk)
    size = math.ceil(n / count)
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _merge(run: Tensor | None, tile: Tensor, divergence: str) -> Tensor:
    """Merge ``[rows, 3]`` statistics of two disjoint vocabulary slices.

    ``(lse_x, lse_y, a_x)`` for the KL (``a_x`` weighted by the slices' shares of ``p``);
    ``(lse_x, lse_y, lse_h)`` for the squared Hellinger distance (three log-sum-exps).
    """
    if run is None:
        return tile
    lse_x = torch.logaddexp(run[:, 0], tile[:, 0])
    lse_y = torch.logaddexp(run[:, 1], tile[:, 1])
    if divergence == "hellinger":
        return torch.stack([lse_x, lse_y, torch.logaddexp(run[:, 2], tile[:, 2])], -1)

    def part(s: Tensor) -> Tensor:  # a slice that is all -inf has weight 0 (and a = 0/0 there)
        return torch.where(s[:, 0] == -math.inf, 0.0, s[:, 2] * torch.exp(s[:, 0] - lse_x))

    return torch.stack([lse_x, lse_y, part(run) + part(tile)], -1)


def forward(
    hx: Tensor,
    hy: Tensor,
    weight: Tensor,
    temperature: float,
    divergence: str,
    row_forward: ForwardFn,
    jsd_partial: PartialFn,
    token_chunk: int,
    vocab_chunk: int,
) -> tuple[Tensor, Tensor]:
    """``[tokens, hidden]`` x2, ``[vocab, hidden]`` -> (value ``[tokens]``, stats ``[tokens, 4]``)."""
    acc = compute_dtype(hx)
    tokens, vocab = hx.shape[0], weight.shape[0]
    values = torch.empty(tokens, dtype=acc, device=hx.device)
    stats = torch.zeros(tokens, 4, dtype=torch.float64, device=hx.device)  # merged in float64
    vslices = balanced_chunks(vocab, vocab_chunk)
    tile_divergence = "hellinger" if divergence == "hellinger" else "kl"  # JSD: the KL's lse's, then a sweep
    for t in balanced_chunks(tokens, token_chunk):
        run = None
        for v in vslices:
            x = hx[t] @ weight[v].T
            y = hy[t] @ weight[v].T
            _, tile = row_forward(x.unsqueeze(0), y.unsqueeze(0), temperature, tile_divergence)
            del x, y  # before the next tile's GEMMs: at most two logit tiles are alive
            run = _merge(run, tile[0, :, :3].double(), divergence)
        assert run is not None
        lse_x, lse_y = run[:, 0], run[:, 1]
        if divergence == "kl":
            stats[t, :3] = run
            values[t] = run[:, 2] - (lse_x - lse_y)
            continue
        if divergence == "hellinger":
            stats[t, :3] = run
            values[t] = hellinger_value(stats[t])
            continue
        a_x = torch.zeros_like(lse_x)
        a_y = torch.zeros_like(lse_y)
        for v in vslices:
            x = hx[t] @ weight[v].T
            y = hy[t] @ weight[v].T
            px, py = jsd_partial(x, y, lse_x, lse_y, 1.0 / temperature)
            del x, y
            a_x, a_y = a_x + px.double(), a_y + py.double()
        stats[t] = torch.stack([lse_x, lse_y, a_x, a_y], -1)
        values[t] = 0.5 * (a_x + a_y)
    return values.clamp_min(0.0), stats


def backward(
    grad: Tensor,
    hx: Tensor,
    hy: Tensor,
    weight: Tensor,
    stats: Tensor,
    temperature: float,
    divergence: str,
    row_backward: BackwardFn,
    token_chunk: int,
    vocab_chunk: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients w.r.t. ``hx``, ``hy`` and ``weight`` (``None`` where not needed), in their dtypes."""
    acc = compute_dtype(hx)
    tokens = hx.shape[0]
    need_hx, need_hy, need_w = needs
    dhx = torch.zeros(hx.shape, dtype=acc, device=hx.device) if need_hx else None
    dhy = torch.zeros(hy.shape, dtype=acc, device=hy.device) if need_hy else None
    dw = torch.empty_like(weight) if need_w else None
    live = (grad != 0).unsqueeze(-1)
    # Zero padded rows once, so that no NaN there reaches dW through 0 * NaN.
    hx_safe = torch.where(live, hx, 0.0) if need_w else hx
    hy_safe = torch.where(live, hy, 0.0) if need_w else hy
    tslices = balanced_chunks(tokens, token_chunk)
    for v in balanced_chunks(weight.shape[0], vocab_chunk):
        w = weight[v]
        gx_all = hx.new_empty(tokens, w.shape[0]) if need_w else None
        gy_all = hy.new_empty(tokens, w.shape[0]) if need_w else None
        for t in tslices:
            x = hx[t] @ w.T
            y = hy[t] @ w.T
            gx, gy = row_backward(
                grad[t].unsqueeze(0),
                x.unsqueeze(0),
                y.unsqueeze(0),
                stats[t].unsqueeze(0),
                temperature,
                divergence,
            )
            del x, y
            gx, gy = gx[0], gy[0]
            if dhx is not None:
                dhx[t] += gx @ w
            if dhy is not None:
                dhy[t] += gy @ w
            if gx_all is not None and gy_all is not None:
                gx_all[t], gy_all[t] = gx, gy
            del gx, gy
        if dw is not None and gx_all is not None and gy_all is not None:
            dw[v] = torch.addmm(gx_all.T @ hx_safe, gy_all.T, hy_safe)
    return (
        dhx.to(hx.dtype) if dhx is not None else None,
        dhy.to(hy.dtype) if dhy is not None else None,
        dw,
    )
