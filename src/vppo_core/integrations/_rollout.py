"""Model inputs and response masks for rollouts (re-exported by `vppo_core.integrations.transformers`).

`rollout_inputs` turns a prompt batch and ``generate``'s output into the inputs and response mask
that `token_dependency` and `token_logprobs` read; `response_mask_from_prompt_lengths` builds the
response mask of batches tokenised as whole prompt + response texts. Plain tensor code: no model,
no ``transformers`` import.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Integer, Shaped
from torch import Tensor

from .._checks import as_bool_mask, typechecked

__all__ = ["response_mask_from_prompt_lengths", "rollout_inputs"]


@typechecked
def response_mask_from_prompt_lengths(
    attention_mask: Shaped[Tensor, "batch seq"],
    prompt_lengths: Integer[Tensor, " batch"] | int,
) -> Bool[Tensor, "batch seq"]:
    """Mark the tokens after the first ``prompt_lengths[b]`` real tokens of each row as the response.

    For batches tokenised as whole prompt + response texts: counting only real tokens
    (``attention_mask != 0``), the first ``prompt_lengths[b]`` are the prompt and the rest of the row is
    the response, whether the row is left- or right-padded. ``prompt_lengths`` counts the tokens of
    the prompt *after* the processor's expansion of ``<|image_pad|>`` (tokenise the prompt alone with
    the same processor and image to get it).

    Shapes:
        - ``attention_mask``: ``[batch, seq]``
        - ``prompt_lengths``: ``[batch]`` or one int for all rows
        - returns: ``[batch, seq]`` bool

    Args:
        attention_mask: 1 at real tokens, 0 at padding.
        prompt_lengths: Real prompt tokens per row, each ``>= 1``.

    Returns:
        The response mask.

    Raises:
        ValueError: If a prompt length is below 1.

    Example:
        >>> import torch
        >>> am = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # left, right padding
        >>> response_mask_from_prompt_lengths(am, torch.tensor([2, 3])).int()
        tensor([[0, 0, 0, 0, 1, 1],
                [0, 0, 0, 1, 1, 0]], dtype=torch.int32)
    """
    lengths = torch.as_tensor(prompt_lengths, device=attention_mask.device)
    if lengths.is_floating_point() or bool((lengths < 1).any()):
        raise ValueError(f"prompt_lengths must be integers >= 1 (a response needs a prompt), got {prompt_lengths!r}")
    real = as_bool_mask(attention_mask, "attention_mask")
    count = real.long().cumsum(dim=1)
    return real & (count > lengths.reshape(-1, 1))


def rollout_inputs(
    prompt_inputs: Mapping[str, Any],
    sequences: Tensor,
    *,
    eos_token_id: int | Sequence[int],
) -> tuple[dict[str, Any], Tensor]:
    """Model inputs and response mask for ``generate``'s output, ready for `token_dependency`.

    ``model.generate(**prompt_inputs)`` returns ``sequences = [prompt_ids | generated]``: the
    (left-padded) prompt of width ``P`` followed by the generated tokens, padded after each row's
    first eos. The response is every generated token up to and including the first eos (or to the
    end). This returns ``inputs`` with ``input_ids = sequences``, ``attention_mask`` extended by the
    response mask (tokens after the eos are padding), ``mm_token_type_ids`` extended with text (0),
    and the prompt's ``pixel_values`` / ``image_grid_thw`` unchanged.

    Shapes:
        - ``prompt_inputs["input_ids"]``: ``[batch, P]``
        - ``sequences``: ``[batch, P + R]``
        - returns: ``(inputs, response_mask)``, ``response_mask`` ``[batch, P + R]`` bool

    Args:
        prompt_inputs: The processor's output that was passed to ``generate``.
        sequences: ``generate``'s output (``return_dict_in_generate=False``).
        eos_token_id: The end-of-response token id(s) (the tiny tokenizer's ``<|im_end|>``).

    Returns:
        ``(inputs, response_mask)``.

    Raises:
        ValueError: If ``sequences`` does not start with ``prompt_inputs["input_ids"]`` or has no
            generated tokens.

    Example:
        >>> import torch
        >>> prompt = {"input_ids": torch.tensor([[0, 7, 8], [9, 7, 8]]),
        ...           "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
        >>> seqs = torch.tensor([[0, 7, 8, 5, 2, 0], [9, 7, 8, 5, 6, 6]])  # eos = 2, pad = 0
        >>> inputs, mask = rollout_inputs(prompt, seqs, eos_token_id=2)
        >>> mask.int().tolist(), inputs["attention_mask"].tolist()
        ([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]], [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    """
    prompt_ids = prompt_inputs["input_ids"]
    width = prompt_ids.shape[1]
    if sequences.ndim != 2 or sequences.shape[0] != prompt_ids.shape[0] or sequences.shape[1] <= width:
        raise ValueError(
            f"sequences must be [batch={prompt_ids.shape[0]}, prompt width {width} + generated] from generate, "
            f"got shape {tuple(sequences.shape)}"
        )
    if not torch.equal(sequences[:, :width], prompt_ids.to(sequences.device)):
        raise ValueError("sequences must start with prompt_inputs['input_ids'] (generate's output for those inputs)")
    generated = sequences[:, width:]
    eos = torch.as_tensor(eos_token_id, device=sequences.device).reshape(-1)
    is_eos = torch.isin(generated, eos).long()
    response = (is_eos.cumsum(dim=1) - is_eos) == 0  # up to and including the first eos
    prompt_attention = prompt_inputs.get("attention_mask")
    if prompt_attention is None:
        prompt_attention = torch.ones_like(prompt_ids)
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = sequences
    inputs["attention_mask"] = torch.cat([prompt_attention, response.to(prompt_attention.dtype)], dim=1)
    if prompt_inputs.get("mm_token_type_ids") is not None:
        mm = prompt_inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([mm, mm.new_zeros(generated.shape)], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompt_ids, dtype=torch.bool), response], dim=1)
    return inputs, response_mask
