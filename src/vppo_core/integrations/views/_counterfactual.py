"""CFPO's counterfactual attention: salient image values replaced by their mean, as a removable hook."""

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from ..._checks import as_bool_mask, typechecked
from ._common import _image_mask


@typechecked
def counterfactual_attention_output(
    weights: Float[Tensor, "batch heads queries keys"],
    values: Float[Tensor, "batch heads keys head_dim"],
    image_mask: Shaped[Tensor, "batch keys"],
    query_mask: Shaped[Tensor, "batch queries"],
    *,
    k: float = 2.0,
) -> Float[Tensor, "batch heads queries head_dim"]:
    r"""CFPO's counterfactual attention output: salient image values replaced by the mean image value.

    For each sample and head, over the block of attention weights $A_{qv}$ from the queries
    ``query_mask`` (the text after the image) to the image keys ``image_mask``, with $\mu$, $\sigma$
    the mean and standard deviation (``torch.std``'s sample std) of that block,

    $$
    M_{qv} = \mathbb 1[A_{qv} > \mu + k\sigma], \qquad
    O = A V + (A \odot M)(\bar V - V), \qquad \bar V = \frac1{|\mathcal V|}\sum_{v} V_v ,
    $$

    i.e. every salient image value is replaced by the mean image value (CFPO, arXiv:2606.23206,
    $k = 2$). Rows outside ``query_mask`` and samples without image tokens are plain $AV$. The scope
    of $\mu, \sigma$ (per sample and head) is this library's reading of "over valid entries".

    Shapes:
        - ``weights``: ``[batch, heads, queries, keys]`` (softmaxed); ``values``: ``[batch, heads, keys, head_dim]``
        - ``image_mask``: ``[batch, keys]``; ``query_mask``: ``[batch, queries]``
        - returns: ``[batch, heads, queries, head_dim]``

    Example:
        >>> import torch
        >>> w = torch.tensor([[[[0.0, 1.0, 0.0], [0.1, 0.1, 0.8]]]])  # query 1 attends mostly to image key 2
        >>> v = torch.tensor([[[[0.0], [1.0], [3.0]]]])
        >>> img, queries = torch.tensor([[False, True, True]]), torch.tensor([[False, True]])
        >>> counterfactual_attention_output(w, v, img, queries, k=0.5)  # key 2's value 3 becomes the mean 2
        tensor([[[[1.0000],
                  [1.7000]]]])
    """
    img = as_bool_mask(image_mask, "image_mask")[:, None, None, :]
    qry = as_bool_mask(query_mask, "query_mask")[:, None, :, None]
    block = img & qry
    n = block.sum((-2, -1), keepdim=True).to(weights.dtype)
    a = torch.where(block, weights, 0.0)
    mu = a.sum((-2, -1), keepdim=True) / n.clamp_min(1)
    var = torch.where(block, (weights - mu).square(), 0.0).sum((-2, -1), keepdim=True) / (n - 1).clamp_min(1)
    salient = block & (weights > mu + k * var.sqrt())
    am = torch.where(salient, weights, 0.0)
    keys = as_bool_mask(image_mask, "image_mask")[:, None, :, None]  # [batch, 1, keys, 1]
    n_img = keys.sum(-2, keepdim=True).to(values.dtype).clamp_min(1)
    v_mean = torch.where(keys, values, 0.0).sum(-2, keepdim=True) / n_img  # [batch, heads, 1, head_dim]
    return weights @ values + am.sum(-1, keepdim=True) * v_mean - am @ values


_ATTENTION_NAME = "vppo_counterfactual"


class _ConfigProxy:
    """An attention module's config seen through a different ``_attn_implementation``; all else delegated."""

    def __init__(self, base: Any, implementation: str) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_attn_implementation"] = implementation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_base"], name)


def _repeat_kv(x: Tensor, n: int) -> Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _counterfactual_forward(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager attention with CFPO's value substitution, for modules inside ``counterfactual_attention``."""
    state = module.__dict__.get("_vppo_counterfactual")
    if state is None:
        raise RuntimeError("the counterfactual attention function ran outside counterfactual_attention()")
    image_mask, query_mask, k = state
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    q_len, k_len = query.shape[-2], key.shape[-2]
    if q_len != k_len or image_mask.shape[-1] != k_len:
        raise ValueError(
            "counterfactual_attention supports full forward passes only (no cache, no generation): got "
            f"{q_len} queries, {k_len} keys for inputs of length {image_mask.shape[-1]}"
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scale
    # Masked scores are the dtype's lowest finite value, not -inf: a query that may attend to no key
    # (a left-padding position) would otherwise get a NaN softmax row, which the next layers spread
    # to every token of its sample. Such a row reads nothing (zero weights), as in torch's SDPA.
    if attention_mask is None or attention_mask.dim() == 2:
        # no mask, or a flash-attention model's [batch, keys] padding mask (1: a real token): causal part added
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :k_len].bool()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :k_len]
        scores = scores.clamp_min(torch.finfo(scores.dtype).min)  # an additive -inf counts as masked
    attends = scores.amax(-1, keepdim=True) > torch.finfo(scores.dtype).min
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.where(attends, weights, 0.0)
    out = counterfactual_attention_output(weights, value, image_mask, query_mask, k=k)
    return out.transpose(1, 2).contiguous(), weights


def _text_attention_modules(model: Any) -> list[torch.nn.Module]:
    base = getattr(model, "model", model)
    decoder = getattr(base, "language_model", None)
    if decoder is None and hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
    modules = [] if decoder is None else [m for n, m in decoder.named_modules() if n.endswith("self_attn")]
    if not modules or not all(hasattr(m, "config") for m in modules):
        raise TypeError(
            "model must be a transformers VLM with decoder self-attention modules (…self_attn), "
            f"got {type(model).__name__}"
        )
    return modules


@contextlib.contextmanager
def counterfactual_attention(model: Any, inputs: Mapping[str, Any], *, k: float = 2.0) -> Iterator[Any]:
    r"""Run ``model`` with CFPO's counterfactual attention in every decoder self-attention (a context manager).

    Inside the ``with`` block, each text-decoder self-attention computes its weights eagerly and
    returns [`counterfactual_attention_output`][vppo_core.integrations.views.counterfactual_attention_output]:
    for the queries after the (last) image token of each sample, the attention to salient image
    tokens ($A > \mu + k\sigma$) reads the mean image value instead of the token's own value (CFPO,
    arXiv:2606.23206, $k = 2$). The vision tower is untouched. This gives $\pi_{cf}$ for
    [`cfpo`][vppo_core.family.cfpo]: score the same ``inputs`` inside the block.

    Mechanism: each attention module's ``config`` is temporarily replaced by a proxy whose
    ``_attn_implementation`` names an attention function registered under ``"vppo_counterfactual"``
    in ``transformers.AttentionInterface``; on exit every module gets its own config object back, so
    the model computes exactly what it did before (nothing else is changed; the registration, a
    name, stays). The attention mask is the one the model builds for its own implementation: a 4-D
    mask (eager, SDPA), or a ``[batch, keys]`` padding mask or none (flash attention), to which the
    causal mask is added. Only full forward passes of these ``inputs`` are supported (no cache), on
    padded batches: a packed (padding-free) batch, whose sequence boundaries live in
    ``position_ids`` only, would attend across them.

    Args:
        model: A ``transformers`` Qwen-VL ``*ForConditionalGeneration`` model.
        inputs: The processor's output the model will be called with inside the block.
        k: Salience threshold in standard deviations.

    Yields:
        The model.

    Raises:
        TypeError: If the model has no decoder self-attention modules.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl
        >>> processor = tiny_processor("qwen2_vl")
        >>> model = tiny_qwen_vl("qwen2_vl", processor.tokenizer)
        >>> text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what colour ?<|im_end|>\n"
        >>> batch = processor(images=[Image.new("RGB", (56, 56), "red")], text=[text], return_tensors="pt")
        >>> with torch.no_grad():
        ...     before = model(**batch).logits
        ...     with counterfactual_attention(model, batch, k=0.0):
        ...         cf = model(**batch).logits
        ...     after = model(**batch).logits
        >>> bool(torch.equal(before, after)), bool((cf - before).abs().max() > 0)
        (True, True)
    """
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION_NAME, _counterfactual_forward)
    modules = _text_attention_modules(model)
    image_mask = _image_mask(model, inputs)
    positions = torch.arange(image_mask.shape[-1], device=image_mask.device)
    last_image = torch.where(image_mask, positions, -1).amax(-1, keepdim=True)
    attention = inputs.get("attention_mask")
    query_mask = (positions > last_image) & (last_image >= 0)
    if attention is not None:
        query_mask = query_mask & (attention != 0)
    originals = [m.config for m in modules]
    try:
        for m in modules:
            m.config = _ConfigProxy(m.config, _ATTENTION_NAME)
            m.__dict__["_vppo_counterfactual"] = (image_mask, query_mask, float(k))
        yield model
    finally:
        for m, config in zip(modules, originals):
            m.config = config
            m.__dict__.pop("_vppo_counterfactual", None)
