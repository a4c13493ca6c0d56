"""Perturbations of ``[batch, channels, height, width]`` image tensors."""

from collections.abc import Sequence

import torch

from .._checks import typechecked
from ._common import (
    Images,
    _blur,
    _channel_view,
    _check_generator,
    _check_nonnegative,
    _check_patch_size,
    _check_probability,
    _finish,
    _grid,
    _normal,
    _patch_masks,
    _per_channel,
    _pixel_mask,
    _white,
    _work_dtype,
)

# ----------------------------------------------------------------------------------------------------
# [batch, channels, height, width] tensors


@typechecked
def blacken_patches(
    images: Images,
    *,
    generator: torch.Generator,
    patch_size: int = 14,
    p: float = 0.5,
    fill: float | Sequence[float] = 0.0,
) -> Images:
    r"""Blacken random square patches of each image (VPPO's perturbation).

    The image is cut into ``patch_size x patch_size`` pixel squares from the top-left corner; each is
    set to black independently with probability ``p``, with a fresh draw per image. When ``height`` or
    ``width`` is not a multiple of ``patch_size``, the last row / column of patches is narrower (the
    grid has $\lceil H/s\rceil \times \lceil W/s\rceil$ patches, each edge patch cropped to the image) and
    is blackened with the same probability, as in the VPPO-RL code.

    Draws: ``torch.rand`` of ``batch * rows * cols`` numbers from ``generator`` (on its device),
    image-major, patches in row-major order; patch ``(i, j)`` of image ``b`` is blackened iff its number
    is ``< p``. So the same generator state gives the same patches for a batch, a list of the same PIL
    images, and their Qwen ``pixel_values`` (`blacken_patches_pixel_values`, aligned patches).

    Shapes:
        - ``images``: ``[batch, channels, height, width]``, ``uint8`` or float
        - returns: the same shape and dtype

    Args:
        images: The images; not modified.
        generator: The random source (``torch.Generator().manual_seed(seed)``).
        patch_size: Patch side in pixels. The paper uses 14 (the ViT patch of Qwen2/2.5-VL) for every
            model; pass 16 to align with Qwen3-VL's ViT patch.
        p: Probability that a patch is blackened.
        fill: Value written into blackened pixels, one number or one per channel; 0 is black for
            un-normalised images (pass ``(0 - mean) / std`` for normalised ones).

    Returns:
        A new tensor with the chosen patches set to ``fill``, every other pixel bit-identical.

    Raises:
        ValueError: If ``patch_size < 1``, ``p`` is outside ``[0, 1]``, or ``fill`` has the wrong length
            (or is outside ``[0, 255]`` for ``uint8`` images).
        TypeError: If ``generator`` is not a ``torch.Generator`` or ``images`` is not 4-D uint8/float.

    Example:
        >>> import torch
        >>> img = torch.full((2, 3, 28, 28), 200, dtype=torch.uint8)
        >>> out = blacken_patches(img, generator=torch.Generator().manual_seed(0))
        >>> out.shape, out.dtype, sorted(out.unique().tolist())
        (torch.Size([2, 3, 28, 28]), torch.uint8, [0, 200])
    """
    _check_generator(generator)
    _check_patch_size(patch_size)
    _check_probability(p)
    batch, channels, height, width = images.shape
    fills = _per_channel("fill", fill, channels)
    if not images.is_floating_point() and not all(0 <= v <= 255 for v in fills):
        raise ValueError(f"fill must be in [0, 255] for uint8 images, got {fill!r}")
    if batch == 0:
        return images.clone()
    mask = torch.stack(_patch_masks([_grid(height, width, patch_size)] * batch, p, generator))
    pixel_mask = _pixel_mask(mask.to(images.device), patch_size, height, width).unsqueeze(1)
    return torch.where(pixel_mask, _channel_view(fills, images), images)


@typechecked
def gaussian_noise(
    images: Images,
    *,
    generator: torch.Generator,
    sigma: float = 189.0,
    pixel_max: float | None = None,
) -> Images:
    r"""Add i.i.d. Gaussian noise of ``sigma`` grey levels, then clip to the valid range.

    $I' = \operatorname{clip}(I + \varepsilon, 0, \text{white})$, $\varepsilon \sim
    \mathcal N(0, (\sigma\cdot\text{white}/255)^2)$ per pixel and channel: the paper's noise ablation
    ($\sigma = 189$). ``uint8`` results are rounded (the VPPO-RL code truncates).

    Shapes:
        - ``images``: ``[batch, channels, height, width]``
        - returns: the same shape and dtype

    Args:
        images: The images; not modified.
        generator: The random source; draws ``images.numel()`` normals in ``images``' memory order.
        sigma: Noise standard deviation in 0-255 grey levels.
        pixel_max: The value of white: default 255 for ``uint8``, 1.0 for float images.

    Returns:
        The noisy images.

    Raises:
        ValueError: If ``sigma < 0`` or ``pixel_max <= 0``.

    Example:
        >>> import torch
        >>> img = torch.full((1, 3, 8, 8), 0.5)
        >>> out = gaussian_noise(img, generator=torch.Generator().manual_seed(0), sigma=25.5)
        >>> bool(((out >= 0) & (out <= 1)).all()), round(float((out - img).std()), 1)
        (True, 0.1)
    """
    _check_generator(generator)
    _check_nonnegative("sigma", sigma)
    white = _white(images, pixel_max)
    (noise,) = _normal([tuple(images.shape)], generator)
    x = images.to(_work_dtype(images))
    out = (x + noise.to(x.device, x.dtype) * (sigma * white / 255.0)).clamp(0.0, white)
    return _finish(out, images)


@typechecked
def gaussian_blur(images: Images, *, radius: float = 6.0) -> Images:
    r"""Gaussian blur with standard deviation ``radius`` pixels (the paper's blur ablation: radius 6).

    A separable kernel $\propto e^{-x^2/(2r^2)}$ truncated at $\lceil 3r\rceil$ pixels, normalised to sum
    1, with edge pixels replicated; each channel is blurred alone. Pillow's ``GaussianBlur`` (what
    `gaussian_blur_pil` and the VPPO-RL code use) approximates the same filter with box blurs.
    ``radius=0`` returns a copy.

    Shapes:
        - ``images``: ``[batch, channels, height, width]``
        - returns: the same shape and dtype

    Args:
        images: The images; not modified.
        radius: Standard deviation of the Gaussian, in pixels.

    Returns:
        The blurred images (``uint8`` rounded).

    Raises:
        ValueError: If ``radius < 0``.

    Example:
        >>> import torch
        >>> img = torch.zeros(1, 1, 9, 9)
        >>> img[..., 4, 4] = 1.0
        >>> out = gaussian_blur(img, radius=1.0)
        >>> round(float(out.sum()), 4), bool(out[..., 4, 4] < 1)
        (1.0, True)
    """
    _check_nonnegative("radius", radius)
    return _finish(_blur(images.to(_work_dtype(images)), float(radius)), images)


@typechecked
def mask_image(
    images: Images,
    *,
    value: float | Sequence[float] = 128.0,
    pixel_max: float | None = None,
) -> Images:
    """Replace every pixel by one colour (the paper's full-mask ablation: grey 128, 128, 128).

    Shapes:
        - ``images``: ``[batch, channels, height, width]``
        - returns: the same shape and dtype

    Args:
        images: The images (only their shape, dtype and device are read).
        value: The colour in 0-255 grey levels, one number or one per channel.
        pixel_max: The value of white: default 255 for ``uint8``, 1.0 for float images.

    Returns:
        A new tensor filled with ``value`` (scaled to ``pixel_max``; rounded for ``uint8``).

    Raises:
        ValueError: If ``value`` has the wrong length or ``pixel_max <= 0``.

    Example:
        >>> import torch
        >>> mask_image(torch.rand(1, 3, 2, 2), value=(255, 0, 0))[0, :, 0, 0]
        tensor([1., 0., 0.])
    """
    white = _white(images, pixel_max)
    levels = _per_channel("value", value, images.shape[1])
    dtype = _work_dtype(images)
    colour = torch.tensor([v * white / 255.0 for v in levels], dtype=dtype, device=images.device)
    return _finish(colour.view(1, -1, 1, 1).expand(images.shape).clone(), images)
