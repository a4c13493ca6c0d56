"""Perturbations applied directly to a Qwen-VL processor's flattened ``pixel_values``."""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Integer
from torch import Tensor

from .._checks import typechecked
from ._common import (
    PixelLayout,
    _blur,
    _check_generator,
    _check_nonnegative,
    _check_patch_size,
    _check_probability,
    _grid,
    _normal,
    _patch_masks,
    _per_channel,
    _pixel_mask,
    _work_dtype,
)

# ----------------------------------------------------------------------------------------------------
# Qwen-VL pixel_values


def _grid_items(pixel_values: Tensor, image_grid_thw: Tensor, layout: PixelLayout) -> list[tuple[int, int, int]]:
    if not isinstance(layout, PixelLayout):
        raise TypeError(
            f"layout must be a PixelLayout (e.g. PixelLayout.from_processor(processor)), got {type(layout).__name__}"
        )
    if len(layout.image_mean) != len(layout.image_std):
        raise ValueError(
            f"layout.image_mean and layout.image_std must have one value per channel, "
            f"got {len(layout.image_mean)} and {len(layout.image_std)}"
        )
    channels, t_size, patch = len(layout.image_mean), layout.temporal_patch_size, layout.patch_size
    features = channels * t_size * patch * patch
    if pixel_values.shape[1] != features:
        raise ValueError(
            f"pixel_values must have channels * temporal_patch_size * patch_size**2 = "
            f"{channels} * {t_size} * {patch}**2 = {features} columns for this layout, "
            f"got {pixel_values.shape[1]}; is the layout the processor's (PixelLayout.from_processor)?"
        )
    items = [(int(t), int(h), int(w)) for t, h, w in image_grid_thw.tolist()]
    m = layout.merge_size
    for t, h, w in items:
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise ValueError(
                f"image_grid_thw rows must be positive with h and w multiples of merge_size={m}, got {[t, h, w]}"
            )
    total = sum(t * h * w for t, h, w in items)
    if total != pixel_values.shape[0]:
        raise ValueError(
            f"image_grid_thw describes {total} patches (sum of t*h*w) but pixel_values has {pixel_values.shape[0]} rows"
        )
    return items


def _unpatchify(rows: Tensor, t: int, h: int, w: int, layout: PixelLayout) -> Tensor:
    """Rows of one image -> ``[t, temporal, channels, h*patch, w*patch]`` (a copy)."""
    m, p, tp, c = layout.merge_size, layout.patch_size, layout.temporal_patch_size, len(layout.image_mean)
    x = rows.reshape(t, h // m, w // m, m, m, c, tp, p, p)
    return x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, tp, c, h * p, w * p)


def _patchify(frames: Tensor, layout: PixelLayout) -> Tensor:
    """``[t, temporal, channels, H, W]`` -> rows in the processor's order (inverse of `_unpatchify`)."""
    m, p = layout.merge_size, layout.patch_size
    t, tp, c, height, width = frames.shape
    h, w = height // p, width // p
    x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p)
    return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, c * tp * p * p)


def _map_items(pixel_values: Tensor, items: Sequence[tuple[int, int, int]], layout: PixelLayout, fn: Any) -> Tensor:
    """Unpatchify every image, apply ``fn(list of frames) -> list``, patchify back, concatenate."""
    sizes = [t * h * w for t, h, w in items]
    frames = [_unpatchify(rows, *item, layout) for rows, item in zip(pixel_values.split(sizes), items)]
    out = [_patchify(f, layout) for f in fn(frames)]
    return torch.cat(out) if out else pixel_values.clone()


def _normalised(levels: Sequence[float], layout: PixelLayout, like: Tensor) -> Tensor:
    """Grey levels -> the processor's normalised values, ``[channels, 1, 1]``, float32 arithmetic as the processor."""
    x = torch.tensor([v * layout.rescale_factor for v in levels], dtype=torch.float64).to(torch.float32)
    mean = torch.tensor(layout.image_mean, dtype=torch.float32)
    std = torch.tensor(layout.image_std, dtype=torch.float32)
    return ((x - mean) / std).to(like.device, like.dtype).view(-1, 1, 1)


@typechecked
def pixel_values_to_images(
    pixel_values: Float[Tensor, "patches features"],
    image_grid_thw: Integer[Tensor, "images 3"],
    layout: PixelLayout,
) -> list[Float[Tensor, "_frames channels _height _width"]]:
    """Undo the Qwen-VL patch layout: the normalised images, ``[t * temporal, C, h * patch, w * patch]`` each.

    An image (``t = 1``) comes back as ``temporal_patch_size`` identical frames. See
    `PixelLayout` for the layout.

    Shapes:
        - ``pixel_values``: ``[patches, channels * temporal * patch * patch]``
        - ``image_grid_thw``: ``[images, 3]``
        - returns: one ``[frames, channels, height, width]`` tensor per image

    Args:
        pixel_values: The processor's ``pixel_values``.
        image_grid_thw: The processor's ``image_grid_thw`` (rows ``t, h, w`` in patches).
        layout: The processor's layout, ``PixelLayout.from_processor(processor)``.

    Returns:
        The images, still normalised.

    Raises:
        ValueError: If the shapes do not fit the layout.

    Example:
        >>> import torch
        >>> pv = torch.randn(16, 3 * 2 * 14 * 14)
        >>> (image,) = pixel_values_to_images(pv, torch.tensor([[1, 4, 4]]), PixelLayout())
        >>> image.shape
        torch.Size([2, 3, 56, 56])
    """
    items = _grid_items(pixel_values, image_grid_thw, layout)
    sizes = [t * h * w for t, h, w in items]
    return [
        _unpatchify(rows, t, h, w, layout).flatten(0, 1) for rows, (t, h, w) in zip(pixel_values.split(sizes), items)
    ]


@typechecked
def images_to_pixel_values(
    images: Sequence[Float[Tensor, "_frames channels _height _width"]],
    layout: PixelLayout,
) -> tuple[Float[Tensor, "patches features"], Integer[Tensor, "images 3"]]:
    """Lay out normalised images as a Qwen-VL processor does: the inverse of `pixel_values_to_images`.

    Args:
        images: One ``[frames, channels, height, width]`` tensor per image; ``frames`` a multiple of
            ``temporal_patch_size`` (repeat a still image), ``height`` and ``width`` multiples of
            ``patch_size * merge_size``. No resizing or normalisation is done.
        layout: The target layout.

    Returns:
        ``(pixel_values, image_grid_thw)``.

    Raises:
        ValueError: If a size does not fit the layout.

    Example:
        >>> import torch
        >>> pv, thw = images_to_pixel_values([torch.randn(2, 3, 28, 56)], PixelLayout())
        >>> pv.shape, thw.tolist()
        (torch.Size([8, 1176]), [[1, 2, 4]])
    """
    p, m, tp = layout.patch_size, layout.merge_size, layout.temporal_patch_size
    rows, grids = [], []
    for i, im in enumerate(images):
        frames, channels, height, width = im.shape
        if frames % tp or height % (p * m) or width % (p * m) or channels != len(layout.image_mean):
            raise ValueError(
                f"images[{i}] must be [k * {tp}, {len(layout.image_mean)}, a * {p * m}, b * {p * m}] for this layout, "
                f"got {list(im.shape)}"
            )
        rows.append(_patchify(im.reshape(frames // tp, tp, channels, height, width), layout))
        grids.append([frames // tp, height // p, width // p])
    device = images[0].device if images else None
    thw = torch.tensor(grids, dtype=torch.long, device=device).reshape(-1, 3)
    if not rows:
        return torch.zeros(0, len(layout.image_mean) * tp * p * p, device=device), thw
    return torch.cat(rows), thw


@typechecked
def blacken_patches_pixel_values(
    pixel_values: Float[Tensor, "patches features"],
    image_grid_thw: Integer[Tensor, "images 3"],
    layout: PixelLayout,
    *,
    generator: torch.Generator,
    patch_size: int | None = None,
    p: float = 0.5,
) -> Float[Tensor, "patches features"]:
    r"""Blacken random square patches of the images inside a Qwen-VL processor's ``pixel_values``.

    Equivalent to `blacken_patches` on each (resized) image followed by the processor: a
    blackened pixel becomes the normalised black $(0 - \mu_c)/\sigma_c$ in every temporal copy, so the
    perturbed ``pixel_values`` can go straight to the model. Patches are cut from the resized image's
    top-left corner. With the default ``patch_size=None`` they are the ViT's own patches
    (``layout.patch_size``: 14 for Qwen2/2.5-VL, 16 for Qwen3-VL), so each blackened patch is exactly
    one row of ``pixel_values`` (see `PixelLayout` for which); pass ``patch_size=14`` to apply
    the paper's fixed 14-pixel grid to Qwen3-VL (patches then straddle rows; edge patches are cropped
    as in `blacken_patches`).

    Draws: one ``torch.rand`` of $\sum_i \lceil H_i/s\rceil\lceil W_i/s\rceil$ numbers, image after image,
    patches row-major: the same patches as `blacken_patches` / `blacken_patches_pil` on
    the processor's resized images with the same generator state. For a video grid (``t > 1``) one
    mask covers all its frames.

    Shapes:
        - ``pixel_values``: ``[patches, channels * temporal * patch * patch]``
        - ``image_grid_thw``: ``[images, 3]``
        - returns: the shape and dtype of ``pixel_values``

    Args:
        pixel_values: The processor's ``pixel_values``; not modified.
        image_grid_thw: The processor's ``image_grid_thw``.
        layout: The processor's layout (``PixelLayout.from_processor(processor)``).
        generator: The random source.
        patch_size: Patch side in pixels; ``None`` uses the ViT patch ``layout.patch_size``.
        p: Probability that a patch is blackened.

    Returns:
        The perturbed ``pixel_values``; untouched values are bit-identical.

    Raises:
        ValueError: If the shapes do not fit the layout, ``patch_size < 1`` or ``p`` is outside ``[0, 1]``.
        TypeError: If ``generator`` is not a ``torch.Generator`` or ``layout`` not a `PixelLayout`.

    Example:
        >>> import torch
        >>> pv, thw = torch.randn(16, 1176), torch.tensor([[1, 4, 4]])
        >>> out = blacken_patches_pixel_values(pv, thw, PixelLayout(), generator=torch.Generator().manual_seed(0))
        >>> changed = (out != pv).all(dim=1)  # an aligned patch is one whole row
        >>> bool(((out != pv).any(dim=1) == changed).all()), round(float(out[changed].min()), 4)
        (True, -1.7923)
    """
    _check_generator(generator)
    size = layout.patch_size if patch_size is None else patch_size
    _check_patch_size(size)
    _check_probability(p)
    items = _grid_items(pixel_values, image_grid_thw, layout)
    black = _normalised([0.0] * len(layout.image_mean), layout, pixel_values)
    grids = [_grid(h * layout.patch_size, w * layout.patch_size, size) for _, h, w in items]
    masks = _patch_masks(grids, p, generator)

    def apply(frames: list[Tensor]) -> list[Tensor]:
        return [
            torch.where(_pixel_mask(m.to(f.device), size, f.shape[-2], f.shape[-1]), black, f)
            for f, m in zip(frames, masks)
        ]

    return _map_items(pixel_values, items, layout, apply)


@typechecked
def gaussian_noise_pixel_values(
    pixel_values: Float[Tensor, "patches features"],
    image_grid_thw: Integer[Tensor, "images 3"],
    layout: PixelLayout,
    *,
    generator: torch.Generator,
    sigma: float = 189.0,
) -> Float[Tensor, "patches features"]:
    r"""Gaussian noise of ``sigma`` grey levels on the images inside ``pixel_values``, clipped to black..white.

    In normalised units the noise of channel $c$ has std $\sigma\cdot r/\sigma_c$ ($r$ the rescale factor,
    1/255) and the result is clipped to $[(0-\mu_c)/\sigma_c,\ (255r-\mu_c)/\sigma_c]$: the same as
    `gaussian_noise` before the processor, without the rounding to ``uint8``. The noise is
    drawn once per image (``[t, channels, H, W]`` normals, image after image) and shared by its
    temporal copies, as the processor copies the noisy image.

    Shapes:
        - ``pixel_values``: ``[patches, features]``; ``image_grid_thw``: ``[images, 3]``
        - returns: the shape and dtype of ``pixel_values``

    Args:
        pixel_values: The processor's ``pixel_values``; not modified.
        image_grid_thw: The processor's ``image_grid_thw``.
        layout: The processor's layout.
        generator: The random source.
        sigma: Noise standard deviation in 0-255 grey levels (paper ablation: 189).

    Returns:
        The perturbed ``pixel_values``.

    Raises:
        ValueError: If the shapes do not fit the layout or ``sigma < 0``.

    Example:
        >>> import torch
        >>> pv, thw = torch.zeros(4, 1176), torch.tensor([[1, 2, 2]])
        >>> out = gaussian_noise_pixel_values(pv, thw, PixelLayout(), generator=torch.Generator().manual_seed(0))
        >>> out.shape, bool((out != 0).any())
        (torch.Size([4, 1176]), True)
    """
    _check_generator(generator)
    _check_nonnegative("sigma", sigma)
    items = _grid_items(pixel_values, image_grid_thw, layout)
    c, p = len(layout.image_mean), layout.patch_size
    work = _work_dtype(pixel_values)
    lo = _normalised([0.0] * c, layout, pixel_values).to(work)
    hi = _normalised([255.0] * c, layout, pixel_values).to(work)
    std = torch.tensor([sigma * layout.rescale_factor / s for s in layout.image_std], dtype=work)
    std = std.to(pixel_values.device).view(-1, 1, 1)
    noises = _normal([(t, 1, c, h * p, w * p) for t, h, w in items], generator)

    def apply(frames: list[Tensor]) -> list[Tensor]:
        out = []
        for f, z in zip(frames, noises):
            noisy = f.to(work) + z.to(f.device, work) * std
            out.append(torch.minimum(torch.maximum(noisy, lo), hi).to(f.dtype))
        return out

    return _map_items(pixel_values, items, layout, apply)


@typechecked
def gaussian_blur_pixel_values(
    pixel_values: Float[Tensor, "patches features"],
    image_grid_thw: Integer[Tensor, "images 3"],
    layout: PixelLayout,
    *,
    radius: float = 6.0,
) -> Float[Tensor, "patches features"]:
    """`gaussian_blur` on the images inside ``pixel_values`` (radius in pixels of the resized image).

    The blur is linear with weights summing to 1 and replicated edges, so blurring the normalised
    image equals normalising the blurred image (up to the ``uint8`` rounding a blur before the
    processor would do).

    Shapes:
        - ``pixel_values``: ``[patches, features]``; ``image_grid_thw``: ``[images, 3]``
        - returns: the shape and dtype of ``pixel_values``

    Args:
        pixel_values: The processor's ``pixel_values``; not modified.
        image_grid_thw: The processor's ``image_grid_thw``.
        layout: The processor's layout.
        radius: Standard deviation in pixels (paper ablation: 6).

    Returns:
        The blurred ``pixel_values``.

    Raises:
        ValueError: If the shapes do not fit the layout or ``radius < 0``.

    Example:
        >>> import torch
        >>> pv = torch.ones(4, 1176)
        >>> torch.allclose(gaussian_blur_pixel_values(pv, torch.tensor([[1, 2, 2]]), PixelLayout()), pv)
        True
    """
    _check_nonnegative("radius", radius)
    items = _grid_items(pixel_values, image_grid_thw, layout)

    def apply(frames: list[Tensor]) -> list[Tensor]:
        return [_blur(f.to(_work_dtype(f)), float(radius)).to(f.dtype) for f in frames]

    return _map_items(pixel_values, items, layout, apply)


@typechecked
def mask_pixel_values(
    pixel_values: Float[Tensor, "patches features"],
    image_grid_thw: Integer[Tensor, "images 3"],
    layout: PixelLayout,
    *,
    value: float | Sequence[float] = 128.0,
) -> Float[Tensor, "patches features"]:
    """Replace every image inside ``pixel_values`` by one colour (default grey 128), normalised.

    Shapes:
        - ``pixel_values``: ``[patches, features]``; ``image_grid_thw``: ``[images, 3]``
        - returns: the shape and dtype of ``pixel_values``

    Args:
        pixel_values: The processor's ``pixel_values`` (only shape, dtype and device are read).
        image_grid_thw: The processor's ``image_grid_thw``.
        layout: The processor's layout.
        value: The colour in 0-255 grey levels, one number or one per channel.

    Returns:
        The masked ``pixel_values``: channel ``c`` of every pixel is ``(value_c / 255 - mean_c) / std_c``.

    Raises:
        ValueError: If the shapes do not fit the layout or ``value`` has the wrong length.

    Example:
        >>> import torch
        >>> out = mask_pixel_values(torch.randn(4, 1176), torch.tensor([[1, 2, 2]]), PixelLayout(), value=0)
        >>> round(float(out[0, 0]), 4)  # (0 - 0.4815) / 0.2686
        -1.7923
    """
    items = _grid_items(pixel_values, image_grid_thw, layout)
    colour = _normalised(_per_channel("value", value, len(layout.image_mean)), layout, pixel_values)
    return _map_items(pixel_values, items, layout, lambda frames: [colour.expand(f.shape).clone() for f in frames])
