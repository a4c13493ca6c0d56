r"""Image perturbations $I \to I'$ for token visual dependency: patch blackening, noise, blur, masking.

VPPO (Huang et al., 2025, arXiv:2510.09285) scores each token by
$\mathrm{KL}(\pi(\cdot\mid s_t, I)\,\|\,\pi(\cdot\mid s_t, I'))$, where $I'$ is the image with random
14 x 14 pixel patches blackened (each with probability 0.5, a fresh draw per response). Its ablations
(Table 11) replace blackening by Gaussian noise ($\sigma = 189$ grey levels), Gaussian blur (radius 6)
or a uniform grey image (128, 128, 128). Every perturbation comes in three forms:

- on a ``[batch, channels, height, width]`` tensor (``uint8`` or float images): `blacken_patches`,
  `gaussian_noise`, `gaussian_blur`, `mask_image`;
- on PIL images (what a processor reads; the VPPO-RL code perturbs here):
  `blacken_patches_pil`, `gaussian_noise_pil`, `gaussian_blur_pil`, `mask_image_pil`;
- on a Qwen-VL processor's output ``pixel_values`` + ``image_grid_thw``, so the processor need not run
  twice: `blacken_patches_pixel_values`, `gaussian_noise_pixel_values`,
  `gaussian_blur_pixel_values`, `mask_pixel_values`. These act in pixel space: each
  perturbs the normalised image exactly as perturbing the image before the processor would (black
  becomes $(0 - \mu_c)/\sigma_c$), described by a `PixelLayout`.

All functions are pure: they never modify their input, and the random ones draw only from the
``torch.Generator`` they are given (never the global RNG), so a seed reproduces a perturbation.
Grey levels (``sigma``, ``value``) are on the 0-255 scale whatever the image dtype.
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Integer, UInt8
from torch import Tensor

from ._checks import typechecked

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PixelLayout",
    "blacken_patches",
    "blacken_patches_pil",
    "blacken_patches_pixel_values",
    "gaussian_blur",
    "gaussian_blur_pil",
    "gaussian_blur_pixel_values",
    "gaussian_noise",
    "gaussian_noise_pil",
    "gaussian_noise_pixel_values",
    "images_to_pixel_values",
    "mask_image",
    "mask_image_pil",
    "mask_pixel_values",
    "pixel_values_to_images",
]

#: OpenAI CLIP normalisation, used by the Qwen2-VL and Qwen2.5-VL processors.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

Images = UInt8[Tensor, "batch channels height width"] | Float[Tensor, "batch channels height width"]


class PixelLayout(NamedTuple):
    """How a Qwen-VL image processor lays images out in ``pixel_values`` (defaults: Qwen2/2.5-VL).

    Each image is resized to ``H x W`` pixels (multiples of ``patch_size * merge_size``), rescaled
    (``x * rescale_factor``), normalised per channel (``(x - mean) / std``), repeated
    ``temporal_patch_size`` times along time and cut into ``patch_size``-pixel squares. With
    ``h = H / patch_size``, ``w = W / patch_size`` and ``m = merge_size``, the image takes ``h * w`` rows;
    patch ``(i, j)`` (row ``i``, column ``j`` of the patch grid) is row

    ``((i // m) * (w // m) + j // m) * m * m + (i % m) * m + j % m``

    (the ``m x m`` patches that merge into one LLM token are consecutive), and its row holds the
    pixels in ``(channel, time, y, x)`` order: ``channels * temporal_patch_size * patch_size**2`` values.
    Images follow each other in ``image_grid_thw`` order. Qwen3-VL uses ``patch_size=16`` and
    ``image_mean = image_std = (0.5, 0.5, 0.5)``; `from_processor` reads all fields.

    Attributes:
        patch_size: The ViT patch side in pixels (14; Qwen3-VL 16).
        merge_size: Patches merged per side into one token (2).
        temporal_patch_size: Frames per temporal patch; an image is repeated this many times (2).
        image_mean: Per-channel mean of the normalisation, in ``[0, 1]`` units.
        image_std: Per-channel standard deviation of the normalisation.
        rescale_factor: The factor taking 0-255 grey levels to ``[0, 1]`` (1/255).
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_processor(cls, processor: Any) -> "PixelLayout":
        """Read the layout from a Qwen-VL processor or its ``image_processor``.

        Args:
            processor: A ``transformers`` processor (with ``.image_processor``) or image processor.

        Returns:
            The layout with the processor's patch, merge and temporal sizes, mean, std and rescale factor.

        Raises:
            TypeError: If ``processor`` lacks one of those attributes.

        Example:
            >>> from types import SimpleNamespace
            >>> ip = SimpleNamespace(patch_size=16, merge_size=2, temporal_patch_size=2,
            ...                      image_mean=[0.5] * 3, image_std=[0.5] * 3, rescale_factor=1 / 255)
            >>> PixelLayout.from_processor(ip).patch_size
            16
        """
        ip = getattr(processor, "image_processor", processor)
        names = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
        missing = [n for n in names if getattr(ip, n, None) is None]
        if missing:
            raise TypeError(
                f"processor must be a Qwen-VL processor or image processor with {', '.join(names)}; "
                f"{type(ip).__name__} lacks {', '.join(missing)}"
            )
        mean, std = ip.image_mean, ip.image_std
        return cls(
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            image_mean=tuple(float(v) for v in (mean if isinstance(mean, Sequence) else [mean] * 3)),
            image_std=tuple(float(v) for v in (std if isinstance(std, Sequence) else [std] * 3)),
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
        )


# ----------------------------------------------------------------------------------------------------
# argument checks


def _check_probability(p: float) -> None:
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")


def _check_patch_size(patch_size: int) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1, got {patch_size!r}")


def _check_nonnegative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_generator(generator: Any) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {type(generator).__name__}"
        )


def _per_channel(name: str, value: float | Sequence[float], channels: int) -> list[float]:
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"{name} must be a finite number or {channels} finite numbers (one per channel), got {value!r}"
        )
    return values


def _white(images: Tensor, pixel_max: float | None) -> float:
    if pixel_max is None:
        return 1.0 if images.is_floating_point() else 255.0
    if not (math.isfinite(pixel_max) and pixel_max > 0):
        raise ValueError(f"pixel_max must be a finite number > 0 (the value of white), got {pixel_max!r}")
    return float(pixel_max)


# ----------------------------------------------------------------------------------------------------
# random draws: one call per perturbation, images in order, so a batch and a list of the same images
# (and the pixel_values of those images) get the same draws from the same generator state


def _patch_masks(grids: Sequence[tuple[int, int]], p: float, generator: torch.Generator) -> list[Tensor]:
    """One Bernoulli(p) mask per image over its ``(rows, cols)`` patch grid, on the generator's device."""
    sizes = [gh * gw for gh, gw in grids]
    u = torch.rand(sum(sizes), generator=generator, device=generator.device)
    return [m.view(gh, gw) for m, (gh, gw) in zip((u < p).split(sizes), grids)]


def _normal(shapes: Sequence[tuple[int, ...]], generator: torch.Generator) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    z = torch.randn(sum(sizes), generator=generator, device=generator.device)
    return [part.view(s) for part, s in zip(z.split(sizes), shapes)]


# ----------------------------------------------------------------------------------------------------
# the operations, on float images [..., channels, height, width] with per-channel constants


def _pixel_mask(mask: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """Upsample a ``[..., rows, cols]`` patch mask to ``[..., height, width]`` pixels (edge patches cropped)."""
    full = mask.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return full[..., :height, :width]


def _grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    return -(-height // patch_size), -(-width // patch_size)


def _channel_view(values: Sequence[float], like: Tensor) -> Tensor:
    """Per-channel constants shaped ``[channels, 1, 1]`` in ``like``'s dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def _blur(x: Tensor, radius: float) -> Tensor:
    """Separable Gaussian blur (std ``radius`` pixels, kernel to 3 std) with replicated edges, per channel."""
    if radius == 0:
        return x.clone()
    half = max(1, math.ceil(3 * radius))
    offsets = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / radius) ** 2)
    kernel = kernel / kernel.sum()
    flat = x.reshape(-1, 1, *x.shape[-2:])
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(x.shape)


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finish(result: Tensor, like: Tensor) -> Tensor:
    """Back to ``like``'s dtype; integer images are rounded and clipped to 0-255."""
    if like.is_floating_point():
        return result.to(like.dtype)
    return result.round().clamp(0, 255).to(like.dtype)


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
