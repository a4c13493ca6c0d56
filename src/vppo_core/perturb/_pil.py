"""Perturbations of PIL images (the same draws as the tensor functions)."""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import (
    _check_generator,
    _check_nonnegative,
    _check_patch_size,
    _check_probability,
    _finish,
    _grid,
    _normal,
    _patch_masks,
    _pixel_mask,
)
from ._images import mask_image

# ----------------------------------------------------------------------------------------------------
# PIL images


def _pil_to_tensor(image: Any) -> tuple[Tensor, int]:
    """``uint8 [1, bands, H, W]`` of an 8-bit PIL image, and how many colour bands it has (alpha excluded)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be a PIL.Image.Image or a list of them, got {type(image).__name__}")
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        raise ValueError(
            f"images must have mode L, LA, RGB or RGBA, got mode {image.mode!r}; "
            "convert it first, e.g. image.convert('RGB')"
        )
    bands = len(image.getbands())
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    colour = bands - 1 if image.mode.endswith("A") else bands
    return data.view(height, width, bands).permute(2, 0, 1).unsqueeze(0), colour


def _tensor_to_pil(x: Tensor, mode: str) -> Any:
    from PIL import Image

    _, _, height, width = x.shape
    pixels = x[0].permute(1, 2, 0).contiguous().cpu()
    try:
        data = pixels.numpy().tobytes()
    except RuntimeError:  # torch built without numpy support
        data = bytes(pixels.flatten().tolist())
    return Image.frombytes(mode, (width, height), data)


def _map_pil(images: Any, fn: Any) -> Any:
    """Apply ``fn(list of uint8 [1, colour bands, H, W]) -> list`` to one PIL image or a list, keeping alpha."""
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    tensors, colours = zip(*(_pil_to_tensor(im) for im in items)) if items else ((), ())
    outs = fn([t[:, :c] for t, c in zip(tensors, colours)])
    results = []
    for im, t, c, out in zip(items, tensors, colours, outs):
        full = torch.cat([out, t[:, c:]], dim=1) if t.shape[1] > c else out
        results.append(_tensor_to_pil(full, im.mode))
    return results[0] if single else results


def blacken_patches_pil(images: Any, *, generator: torch.Generator, patch_size: int = 14, p: float = 0.5) -> Any:
    """`blacken_patches` for PIL images: one image or a list (a fresh draw per image).

    Same patches as `blacken_patches` on the stacked images for the same generator state (all
    draws are made at once, image after image). The VPPO-RL code perturbs here, before the processor
    resizes the image, so its 14-pixel grid need not line up with the ViT's patches; perturb the
    processor's output with `blacken_patches_pixel_values` to line them up. An alpha band is
    kept as is.

    Args:
        images: A ``PIL.Image.Image`` (mode L, LA, RGB or RGBA) or a list of them; not modified.
        generator: The random source.
        patch_size: Patch side in pixels (paper: 14).
        p: Probability that a patch is blackened.

    Returns:
        New image(s) of the same mode and size, as one image or a list like ``images``.

    Raises:
        ValueError: If an image has another mode, ``patch_size < 1`` or ``p`` is outside ``[0, 1]``.
        TypeError: If ``generator`` is not a ``torch.Generator`` or an item is not a PIL image.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> out = blacken_patches_pil(Image.new("RGB", (28, 14), "white"), generator=torch.Generator().manual_seed(1))
        >>> out.size, out.getpixel((0, 0)), out.getpixel((14, 0))
        ((28, 14), (255, 255, 255), (0, 0, 0))
    """
    _check_generator(generator)
    _check_patch_size(patch_size)
    _check_probability(p)

    def apply(xs: list[Tensor]) -> list[Tensor]:
        masks = _patch_masks([_grid(x.shape[-2], x.shape[-1], patch_size) for x in xs], p, generator)
        return [
            torch.where(_pixel_mask(m.to(x.device), patch_size, x.shape[-2], x.shape[-1]), 0, x)
            for x, m in zip(xs, masks)
        ]

    return _map_pil(images, apply)


def gaussian_noise_pil(images: Any, *, generator: torch.Generator, sigma: float = 189.0) -> Any:
    """`gaussian_noise` for PIL images (one or a list), ``sigma`` in grey levels; alpha kept.

    Draws the same numbers as `gaussian_noise` on the stacked images.

    Args:
        images: A ``PIL.Image.Image`` (mode L, LA, RGB or RGBA) or a list of them; not modified.
        generator: The random source.
        sigma: Noise standard deviation in 0-255 grey levels (paper ablation: 189).

    Returns:
        New image(s), rounded and clipped to 0-255.

    Raises:
        ValueError: If ``sigma < 0`` or an image has an unsupported mode.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> out = gaussian_noise_pil([Image.new("L", (4, 4), 128)] * 2, generator=torch.Generator().manual_seed(0))
        >>> len(out), out[0].mode, out[0].tobytes() != out[1].tobytes()
        (2, 'L', True)
    """
    _check_generator(generator)
    _check_nonnegative("sigma", sigma)

    def apply(xs: list[Tensor]) -> list[Tensor]:
        noises = _normal([tuple(x.shape) for x in xs], generator)
        return [_finish((x.float() + z.to(x.device) * float(sigma)).clamp(0.0, 255.0), x) for x, z in zip(xs, noises)]

    return _map_pil(images, apply)


def gaussian_blur_pil(images: Any, *, radius: float = 6.0) -> Any:
    """Pillow's ``ImageFilter.GaussianBlur(radius)`` on one image or a list: exactly the VPPO-RL ablation.

    Pillow approximates the Gaussian (std ``radius``) with repeated box blurs, so results differ
    slightly from `gaussian_blur`; every band, alpha included, is blurred.

    Args:
        images: A ``PIL.Image.Image`` or a list of them; not modified.
        radius: Standard deviation in pixels (paper ablation: 6).

    Returns:
        New image(s).

    Raises:
        ValueError: If ``radius < 0``.
        TypeError: If an item is not a PIL image.

    Example:
        >>> from PIL import Image
        >>> gaussian_blur_pil(Image.new("RGB", (8, 8), "red")).getpixel((4, 4))
        (255, 0, 0)
    """
    from PIL import Image, ImageFilter

    _check_nonnegative("radius", radius)
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    for im in items:
        if not isinstance(im, Image.Image):
            raise TypeError(f"images must be a PIL.Image.Image or a list of them, got {type(im).__name__}")
    out = [im.filter(ImageFilter.GaussianBlur(radius=radius)) for im in items]
    return out[0] if single else out


def mask_image_pil(images: Any, *, value: float | Sequence[float] = 128.0) -> Any:
    """`mask_image` for PIL images: a uniform colour (default grey 128) of the same size; alpha kept.

    Args:
        images: A ``PIL.Image.Image`` (mode L, LA, RGB or RGBA) or a list of them.
        value: The colour in 0-255 grey levels, one number or one per colour band.

    Returns:
        New image(s).

    Raises:
        ValueError: If ``value`` has the wrong length or an image has an unsupported mode.

    Example:
        >>> from PIL import Image
        >>> mask_image_pil(Image.new("RGB", (3, 3), "red")).getpixel((1, 1))
        (128, 128, 128)
    """
    return _map_pil(images, lambda xs: [mask_image(x, value=value) for x in xs])
