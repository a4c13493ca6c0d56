"""Helpers shared by the view builders."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def _check_generator(generator: Any) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (seeded by you), got {type(generator).__name__}")


def _image_mask(model: Any, inputs: Mapping[str, Any]) -> Tensor:
    """Image-token positions: ``mm_token_type_ids == 1``, else ``input_ids == config.image_token_id``."""
    mm = inputs.get("mm_token_type_ids")
    if mm is not None:
        return mm == 1
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        raise ValueError("inputs has no 'mm_token_type_ids' and the model's config no image_token_id")
    return inputs["input_ids"] == token
