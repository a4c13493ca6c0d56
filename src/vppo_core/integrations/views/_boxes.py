"""Region fill: boxes replaced by their mean colour (CGPO's counterfactual images)."""

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Integer
from torch import Tensor

from ..._checks import typechecked
from ...perturb import PixelLayout, images_to_pixel_values, pixel_values_to_images


def _box_slices(box: Sequence[float], height: int, width: int) -> tuple[slice, slice] | None:
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
    right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    if right <= left or bottom <= top:
        return None
    return slice(top, bottom), slice(left, right)


def _as_boxes(boxes: Sequence[Any], n_images: int) -> list[list[Sequence[float]]]:
    if len(boxes) != n_images:
        raise ValueError(f"boxes must hold one list of boxes per image ({n_images}), got {len(boxes)}")
    out = []
    for i, per_image in enumerate(boxes):
        rows = per_image.tolist() if isinstance(per_image, Tensor) else list(per_image)
        for box in rows:
            if len(box) != 4:
                raise ValueError(f"boxes[{i}] must hold (x0, y0, x1, y1) boxes, got {box!r}")
        out.append(rows)
    return out


def _fill(frames: Tensor, boxes: list[Sequence[float]]) -> Tensor:
    """Fill each box of ``[frames, C, H, W]`` with the per-channel mean of the original pixels in it."""
    out = frames.clone()
    height, width = frames.shape[-2:]
    for box in boxes:
        region = _box_slices(box, height, width)
        if region is None:
            continue
        ys, xs = region
        patch = frames[..., ys, xs]
        mean = patch.to(torch.float64).mean(dim=(-2, -1), keepdim=True)
        if not frames.is_floating_point():
            mean = mean.round()
        out[..., ys, xs] = mean.to(frames.dtype).expand_as(patch)
    return out


def fill_boxes(images: Tensor, boxes: Sequence[Any]) -> Tensor:
    """Fill boxes of ``[batch, channels, height, width]`` images with their local mean colour (CGPO's view).

    CGPO (ACM MM 2026) removes the evidence a response points at: every ``<region>`` box named in the
    response is replaced by the mean colour of the pixels inside it, so shape and texture go but the
    overall colour stays. Boxes are ``(x0, y0, x1, y1)`` in pixels (floored / ceiled to whole pixels,
    clipped to the image; empty boxes are skipped); each box's mean is taken from the original image,
    and later boxes overwrite earlier ones where they overlap. ``uint8`` means are rounded.

    Args:
        images: ``[batch, channels, height, width]`` uint8 or float (never modified).
        boxes: One sequence (or ``[n, 4]`` tensor) of boxes per image.

    Returns:
        The filled images, same dtype.

    Raises:
        ValueError: If ``boxes`` does not hold one entry per image, or a box has not 4 numbers.

    Example:
        >>> import torch
        >>> img = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> fill_boxes(img, [[(0, 0, 2, 2)]])[0, 0]
        tensor([[ 2.5000,  2.5000,  2.0000,  3.0000],
                [ 2.5000,  2.5000,  6.0000,  7.0000],
                [ 8.0000,  9.0000, 10.0000, 11.0000],
                [12.0000, 13.0000, 14.0000, 15.0000]])
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, channels, height, width], got shape {tuple(images.shape)}")
    per_image = _as_boxes(boxes, images.shape[0])
    return (
        torch.cat([_fill(images[i : i + 1], b) for i, b in enumerate(per_image)]) if len(per_image) else images.clone()
    )


@typechecked
def fill_boxes_pixel_values(
    pixel_values: Float[Tensor, "patches features"],
    image_grid_thw: Integer[Tensor, "images 3"],
    layout: PixelLayout,
    boxes: Sequence[Any],
) -> Float[Tensor, "patches features"]:
    """[`fill_boxes`][vppo_core.integrations.views.fill_boxes] on the images inside a Qwen-VL ``pixel_values``.

    Boxes are in pixels of the processor's resized image (``w * patch`` by ``h * patch``: the
    coordinates Qwen2.5-VL reads and writes). Normalisation is affine, so filling with the mean of the
    normalised values equals normalising the filled image; every temporal copy is filled alike.

    Shapes:
        - ``pixel_values``: ``[patches, features]``; ``image_grid_thw``: ``[images, 3]``

    Args:
        pixel_values: The processor's ``pixel_values`` (never modified).
        image_grid_thw: The processor's ``image_grid_thw``.
        layout: ``PixelLayout.from_processor(processor)``.
        boxes: One sequence of ``(x0, y0, x1, y1)`` boxes per image.

    Returns:
        The filled ``pixel_values``; values outside the boxes are bit-identical.

    Example:
        >>> import torch
        >>> from vppo_core.perturb import PixelLayout
        >>> pv, thw = torch.randn(16, 1176), torch.tensor([[1, 4, 4]])
        >>> out = fill_boxes_pixel_values(pv, thw, PixelLayout(), [[(0, 0, 14, 14)]])  # one ViT patch
        >>> int((out != pv).any(dim=1).sum()), round(float(out[0, :196].std()), 6)  # one row, constant per channel
        (1, 0.0)
    """
    images = pixel_values_to_images(pixel_values, image_grid_thw, layout)
    per_image = _as_boxes(boxes, len(images))
    filled = [_fill(im, b) for im, b in zip(images, per_image)]
    return images_to_pixel_values(filled, layout)[0] if filled else pixel_values.clone()
