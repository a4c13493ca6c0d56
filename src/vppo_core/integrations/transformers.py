r"""Per-token log-probabilities and visual dependency from a Hugging Face vision-language model.

`token_dependency` runs a ``*ForConditionalGeneration`` VLM twice on a batch of
prompt + response sequences, once with the real image (in the caller's grad mode, so the same
forward can feed the policy loss) and once with a perturbed image (under ``no_grad``), and returns,
for every response token $o_t$,

- $\log\pi(o_t\mid s_t, I)$ and $\log\pi(o_t\mid s_t, I')$ at temperature $T$, and
- the exact visual dependency $\mathrm{KL}(\pi(\cdot\mid s_t, I)\,\|\,\pi(\cdot\mid s_t, I'))$ (VPPO Eq. 3),
  computed from the two final hidden states with `vppo_core.visual_dependency_from_hidden`, so
  ``[batch, seq, vocab]`` logits are never built (only ``[response tokens, vocab]`` chunks).

`token_logprobs` is the single-pass version (old / reference / current policy log-probs);
`rollout_inputs` turns a prompt batch and ``generate``'s output into the model inputs and
response mask these functions read; `response_mask_from_prompt_lengths` builds a response mask
for batches tokenised as whole prompt + response texts.

Conventions, shared by all functions:

- ``inputs`` is what the processor returns (``input_ids``, ``attention_mask``, ``pixel_values``,
  ``image_grid_thw``, ``mm_token_type_ids``), for whole prompt + response sequences, left- or
  right-padded. ``mm_token_type_ids`` (0 text, 1 image, 2 video) is required by transformers 5 for
  Qwen-VL models (Qwen2.5-VL silently drops M-RoPE without it); when missing it is rebuilt from the
  config's ``image_token_id`` / ``video_token_id``.
- ``response_mask[b, t]`` is true where ``input_ids[b, t]`` is a response token (same shape as
  ``input_ids``; never position 0, never padding). Results are ``[batch, seq]`` tensors aligned with
  ``input_ids``: entry ``[b, t]`` is about token ``input_ids[b, t]``, predicted from the hidden state
  at ``t - 1``; entries outside the mask are 0. So ``response_mask`` is also the loss mask.

Requires the ``hf`` extra (``transformers``).
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Shaped
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._checks import as_bool_mask, check_positive, result_dtype, typechecked
from ..dependency import visual_dependency, visual_dependency_from_hidden
from ._rollout import response_mask_from_prompt_lengths, rollout_inputs

__all__ = [
    "TokenDependency",
    "response_mask_from_prompt_lengths",
    "rollout_inputs",
    "token_dependency",
    "token_logprobs",
]


class TokenDependency(NamedTuple):
    """Per-token results of `token_dependency`, each ``[batch, seq]`` aligned with ``input_ids``.

    Attributes:
        logprobs: $\\log\\pi(o_t\\mid I)$ of the sequence's tokens under the real image, at the given
            temperature; differentiable w.r.t. the model's parameters when computed in grad mode.
        logprobs_perturbed: $\\log\\pi(o_t\\mid I')$ under the perturbed image; no gradient.
        dependency: $\\mathrm{KL}(\\pi(\\cdot\\mid I)\\,\\|\\,\\pi(\\cdot\\mid I'))$ over the full vocabulary,
            ``>= 0``; no gradient.
    """

    logprobs: Tensor
    logprobs_perturbed: Tensor
    dependency: Tensor


# ----------------------------------------------------------------------------------------------------
# helpers


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_model(model: Any) -> None:
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise TypeError(
            "model must be a transformers *ForConditionalGeneration / *ForCausalLM model with an output "
            f"embedding (lm_head), got {type(model).__name__}"
        )
    text = _text_config(model)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(text, name, None) not in (None, 1.0):
            raise NotImplementedError(
                f"model's config sets {name}={getattr(text, name)!r}: its logits are not lm_head(hidden), "
                "which these functions assume"
            )


def _model_kwargs(model: Any, inputs: Mapping[str, Any], pixel_values: Tensor | None) -> dict[str, Any]:
    if "input_ids" not in inputs:
        raise ValueError(f"inputs must contain 'input_ids' (the processor's output), got keys {sorted(inputs)}")
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "logits_to_keep")}
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
    has_vision = kwargs.get("image_grid_thw") is not None or kwargs.get("video_grid_thw") is not None
    if has_vision and kwargs.get("mm_token_type_ids") is None:
        input_ids = kwargs["input_ids"]
        mm = torch.zeros_like(input_ids)
        for type_id, name in ((1, "image_token_id"), (2, "video_token_id")):
            token = getattr(model.config, name, None)
            if token is not None:
                mm = torch.where(input_ids == token, type_id, mm)
        kwargs["mm_token_type_ids"] = mm
    kwargs["use_cache"] = False
    return kwargs


def _final_hidden(model: Any, kwargs: Mapping[str, Any]) -> Tensor:
    """The decoder's last hidden state (after the final norm), ``[batch, seq, hidden]``: what lm_head reads."""
    out = model.base_model(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class _Selection(NamedTuple):
    rows: Tensor  # batch index of each response token
    cols: Tensor  # its position in input_ids (>= 1)
    targets: Tensor  # its token id
    shape: tuple[int, int]


def _select(inputs: Mapping[str, Any], response_mask: Tensor) -> _Selection:
    input_ids = inputs["input_ids"]
    if tuple(response_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"response_mask must have the shape of inputs['input_ids'] {tuple(input_ids.shape)}, "
            f"got {tuple(response_mask.shape)}"
        )
    mask = as_bool_mask(response_mask).to(input_ids.device)
    if input_ids.shape[1] and bool(mask[:, 0].any()):
        raise ValueError(
            "response_mask marks position 0, which no position predicts; response tokens must follow a prompt"
        )
    attention = inputs.get("attention_mask")
    if attention is not None and bool((mask & (attention == 0)).any()):
        raise ValueError("response_mask marks padding (attention_mask == 0); mark only real response tokens")
    rows, cols = mask.nonzero(as_tuple=True)
    return _Selection(rows, cols, input_ids[rows, cols], (input_ids.shape[0], input_ids.shape[1]))


def _chunk_logprobs(hidden: Tensor, head: torch.nn.Module, targets: Tensor, temperature: float) -> Tensor:
    logits = head(hidden).to(result_dtype(hidden)) / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _logprobs(hidden: Tensor, head: torch.nn.Module, targets: Tensor, temperature: float, chunk_size: int) -> Tensor:
    """``log softmax(head(hidden) / T)[target]`` in float32 (float64 for float64), ``chunk_size`` rows at a time.

    With gradient, each chunk is checkpointed: its logits are recomputed in the backward instead of
    being kept for it (``logsumexp`` saves its input), so one chunk's logits are alive at a time in
    the backward too, for one more ``head`` matmul.
    """
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start : start + chunk_size], head, targets[start : start + chunk_size], temperature)
        if grad:
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=result_dtype(hidden))


def _scatter(values: Tensor, sel: _Selection) -> Tensor:
    out = values.new_zeros(sel.shape)
    return out.index_put((sel.rows, sel.cols), values)


def _check_chunk(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


# ----------------------------------------------------------------------------------------------------
# public functions


@typechecked
def token_logprobs(
    model: Any,
    inputs: Mapping[str, Any],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Float[Tensor, "batch seq"]:
    r"""Log-probabilities $\log\pi(o_t\mid s_t, I)$ of the response tokens, from one forward pass.

    ``log_softmax(lm_head(h_{t-1}) / T)[input_ids[t]]`` at every ``t`` marked by ``response_mask``,
    with the logits of at most ``chunk_size`` tokens alive at a time. Runs in the caller's grad
    mode: under ``torch.no_grad()`` for the old / reference policy, with grad for the update. With
    grad, each chunk is checkpointed (its logits are recomputed in the backward, one more ``lm_head``
    matmul over the response tokens), so the backward too holds one chunk's logits at a time
    instead of all ``[tokens, vocab]`` of them.

    Shapes:
        - ``response_mask``: ``[batch, seq]`` like ``inputs["input_ids"]``
        - returns: ``[batch, seq]``, 0 outside ``response_mask``

    Args:
        model: A ``transformers`` causal (vision-)language model (``*ForConditionalGeneration``).
        inputs: The processor's output for whole prompt + response sequences (see the module notes).
        response_mask: True at the positions of response tokens in ``input_ids``.
        temperature: The sampling temperature $T > 0$ the rollouts were drawn at.
        chunk_size: Tokens per ``lm_head`` chunk.

    Returns:
        float32 log-probabilities (float64 for a float64 model).

    Raises:
        ValueError: If ``response_mask`` does not match ``input_ids``, marks position 0 or padding,
            or ``temperature <= 0``.
        TypeError: If ``model`` has no output embedding.

    Example:
        >>> import torch
        >>> from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl
        >>> from PIL import Image
        >>> processor = tiny_processor("qwen2_vl")
        >>> model = tiny_qwen_vl("qwen2_vl", processor.tokenizer)
        >>> text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what colour ?<|im_end|>\n"
        >>> batch = processor(images=[Image.new("RGB", (56, 56))], text=[text + "red"], return_tensors="pt")
        >>> mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        >>> mask[:, -1] = True  # the last token, "red", is the response
        >>> with torch.no_grad():
        ...     lp = token_logprobs(model, batch, mask)
        >>> lp.shape == mask.shape, bool(lp[0, -1] < 0), float(lp[0, 0])
        (True, True, 0.0)
    """
    check_positive("temperature", temperature)
    _check_chunk(chunk_size)
    _check_model(model)
    sel = _select(inputs, response_mask)
    hidden = _final_hidden(model, _model_kwargs(model, inputs, None))
    lp = _logprobs(hidden[sel.rows, sel.cols - 1], model.get_output_embeddings(), sel.targets, temperature, chunk_size)
    return _scatter(lp, sel)


@typechecked
def token_dependency(
    model: Any,
    inputs: Mapping[str, Any],
    perturbed_pixel_values: Float[Tensor, "patches features"],
    response_mask: Shaped[Tensor, "batch seq"],
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> TokenDependency:
    r"""Log-probabilities under the real and the perturbed image, and the exact token visual dependency.

    Two forward passes to the final hidden states $h$ (the real image in the caller's grad mode, the
    perturbed one under ``no_grad``), then for each marked position $t$, with
    $x = W h^{I}_{t-1}/T$ and $y = W h^{I'}_{t-1}/T$ ($W$ the output embedding, tied or not):

    $$
    \log\pi(o_t\mid I) = x_{o_t} - \operatorname{lse}(x),\quad
    \log\pi(o_t\mid I') = y_{o_t} - \operatorname{lse}(y),\quad
    S_t = \mathrm{KL}\big(\mathrm{softmax}(x)\,\|\,\mathrm{softmax}(y)\big),
    $$

    $S_t$ being VPPO's token visual dependency (Huang et al., 2025, arXiv:2510.09285, Eq. 3), computed
    by `vppo_core.visual_dependency_from_hidden` on detached hidden states. Only response
    positions are projected to the vocabulary, ``chunk_size`` tokens at a time for the dependency.
    The paper scores tokens with the old (rollout) policy: call this under ``torch.no_grad()`` once per
    rollout batch, and use ``logprobs`` as the old log-probabilities. Called in grad mode instead,
    ``logprobs`` carries the gradient of the current policy, and the same forward feeds the loss.
    Both passes run in the model's current mode: with dropout active (``model.train()`` and a
    non-zero dropout; the Qwen-VL configs have none) they draw different masks, and the dependency
    then measures that noise too, so score in ``model.eval()``.

    Shapes:
        - ``perturbed_pixel_values``: the shape of ``inputs["pixel_values"]``
        - ``response_mask``: ``[batch, seq]`` like ``inputs["input_ids"]``
        - returns: three ``[batch, seq]`` tensors, 0 outside ``response_mask``

    Args:
        model: A ``transformers`` vision-language model (``Qwen2VLForConditionalGeneration``, ...).
        inputs: The processor's output for whole prompt + response sequences, with the real
            ``pixel_values``; left or right padding.
        perturbed_pixel_values: The perturbed image(s), same layout
            (`vppo_core.perturb.blacken_patches_pixel_values`, or the processor run on perturbed images).
        response_mask: True at the positions of response tokens in ``input_ids``.
        temperature: The sampling temperature $T > 0$ of the rollouts.
        chunk_size: Tokens per vocabulary-projection chunk of the dependency.

    Returns:
        A `TokenDependency` of float32 tensors (float64 for a float64 model).

    Raises:
        ValueError: If ``inputs`` has no ``pixel_values`` or its shape differs from
            ``perturbed_pixel_values``, if ``response_mask`` does not match ``input_ids`` or marks
            position 0 or padding, or if ``temperature <= 0``.
        TypeError: If ``model`` has no output embedding.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl
        >>> from vppo_core.perturb import PixelLayout, blacken_patches_pixel_values
        >>> processor = tiny_processor("qwen2_vl")
        >>> model = tiny_qwen_vl("qwen2_vl", processor.tokenizer)
        >>> prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>how many circles ?<|im_end|>\n"
        >>> prompt += "<|im_start|>assistant\n"
        >>> batch = processor(images=[Image.new("RGB", (56, 56), "red")], text=[prompt + "answer : 3"],
        ...                   return_tensors="pt")
        >>> prompt_ids = processor(images=[Image.new("RGB", (56, 56))], text=[prompt])["input_ids"]
        >>> n_prompt = len(prompt_ids[0])  # prompt tokens after the image pads are expanded
        >>> mask = response_mask_from_prompt_lengths(batch["attention_mask"], torch.tensor([n_prompt]))
        >>> perturbed = blacken_patches_pixel_values(batch["pixel_values"], batch["image_grid_thw"],
        ...     PixelLayout.from_processor(processor), generator=torch.Generator().manual_seed(0))
        >>> with torch.no_grad():
        ...     out = token_dependency(model, batch, perturbed, mask)
        >>> int(mask.sum()), bool((out.dependency[mask] >= 0).all()), float(out.dependency[~mask].abs().sum())
        (3, True, 0.0)
    """
    check_positive("temperature", temperature)
    _check_chunk(chunk_size)
    _check_model(model)
    real = inputs.get("pixel_values")
    if real is None:
        raise ValueError("inputs must contain the real 'pixel_values' (the processor's output for the images)")
    if tuple(real.shape) != tuple(perturbed_pixel_values.shape):
        raise ValueError(
            f"perturbed_pixel_values must have the shape of inputs['pixel_values'] {tuple(real.shape)}, "
            f"got {tuple(perturbed_pixel_values.shape)}"
        )
    sel = _select(inputs, response_mask)
    head = model.get_output_embeddings()
    positions = (sel.rows, sel.cols - 1)

    hidden_img = _final_hidden(model, _model_kwargs(model, inputs, None))[positions]
    logprobs = _logprobs(hidden_img, head, sel.targets, temperature, chunk_size)
    with torch.no_grad():
        hidden_pert = _final_hidden(model, _model_kwargs(model, inputs, perturbed_pixel_values))[positions]
        logprobs_pert = _logprobs(hidden_pert, head, sel.targets, temperature, chunk_size)
        hx = hidden_img.detach()
        if getattr(head, "bias", None) is None:
            weight = head.weight.detach()
            # in the head's dtype, as the head computes (TRL's cast_lm_head_to_fp32: bf16 states, fp32 head)
            dependency = visual_dependency_from_hidden(
                hx.to(weight.dtype),
                hidden_pert.to(weight.dtype),
                weight,
                temperature=temperature,
                chunk_size=chunk_size,
            )
        else:  # a biased head: project chunk by chunk, then the logit-level KL
            dependency = torch.cat(
                [
                    visual_dependency(
                        head(hx[i : i + chunk_size]), head(hidden_pert[i : i + chunk_size]), temperature=temperature
                    )
                    for i in range(0, hx.shape[0], chunk_size)
                ]
                or [hx.new_zeros(0, dtype=result_dtype(hx))]
            )
    return TokenDependency(
        logprobs=_scatter(logprobs, sel),
        logprobs_perturbed=_scatter(logprobs_pert, sel),
        dependency=_scatter(dependency.to(logprobs.dtype), sel),
    )
