"""Shared pieces of the perturbations: the pixel layout of Qwen-VL processors, checks and helpers."""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, UInt8
from torch import Tensor

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
    ``image_mean = image_std = (0.5, 0.5, 0.5)``; `from_processor` reads all fields. A processor that
    does not normalise (``do_normalize=False``) has ``image_mean = 0``, ``image_std = 1``; one that does
    not rescale (``do_rescale=False``) has ``rescale_factor = 1``.

    Attributes:
        patch_size: The ViT patch side in pixels (14; Qwen3-VL 16).
        merge_size: Patches merged per side into one token (2).
        temporal_patch_size: Frames per temporal patch; an image is repeated this many times (2).
        image_mean: Per-channel mean of the normalisation, in rescaled units (``[0, 1]`` by default).
        image_std: Per-channel standard deviation of the normalisation.
        rescale_factor: The factor applied to the 0-255 grey levels (1/255: to ``[0, 1]``).
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_processor(cls, processor: Any, *, verify: bool = True) -> "PixelLayout":
        """Read the layout from a Qwen-VL processor or its ``image_processor``, and check it on an image.

        The processor's ``do_normalize`` and ``do_rescale`` (default true when absent) are honoured:
        without normalisation the layout's mean is 0 and its std 1, without rescaling its
        ``rescale_factor`` is 1, so a perturbation of ``pixel_values`` still equals running the
        processor on the perturbed image. ``image_mean`` / ``image_std`` may be a number (one value
        for every channel) or any sequence of numbers (list, tuple, NumPy array, tensor).

        Other models' image processors can carry the same attribute names with another row order
        (HunYuan-VL's rows are in raster order, not in merge blocks), and a perturbation of their
        ``pixel_values`` would then hit the wrong pixels without any error. So with ``verify`` (the
        default) a callable image processor is run once on a random image of a size it keeps, and
        the layout must give that image back from the ``pixel_values`` (within 1.5 grey levels);
        this takes milliseconds. Objects that cannot be called, and any processor where Pillow is
        not installed, are not checked.

        Args:
            processor: A ``transformers`` processor (with ``.image_processor``) or image processor.
            verify: Check the layout on a random image (see above).

        Returns:
            The layout with the processor's patch, merge and temporal sizes, mean, std and rescale factor.

        Raises:
            TypeError: If ``processor`` lacks one of those attributes, or its ``image_mean`` /
                ``image_std`` is not a number or a sequence of numbers.
            ValueError: If ``verify`` finds that the processor lays images out another way.

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
        mean, std = _channel_values("image_mean", ip.image_mean), _channel_values("image_std", ip.image_std)
        if getattr(ip, "do_normalize", True) is False:
            mean, std = (0.0,) * len(mean), (1.0,) * len(std)
        rescale = float(getattr(ip, "rescale_factor", 1 / 255))
        layout = cls(
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            image_mean=mean,
            image_std=std,
            rescale_factor=rescale if getattr(ip, "do_rescale", True) is not False else 1.0,
        )
        if verify and callable(ip):
            _verify_layout(ip, layout)
        return layout


def _verify_layout(ip: Any, layout: PixelLayout) -> None:
    """Run the image processor on a random image it does not resize; the layout must give it back."""
    try:
        from PIL import Image
    except ImportError:  # without Pillow the image cannot be made: nothing is checked
        return

    from ._pixel_values import pixel_values_to_images

    name = type(ip).__name__
    side = 2 * layout.patch_size * layout.merge_size
    try:  # the processor's own size for a small image (it may scale it up to its minimum)
        thw = ip(images=[Image.new("RGB", (side, side))], return_tensors="pt")["image_grid_thw"]
        height, width = int(thw[0, 1]) * layout.patch_size, int(thw[0, 2]) * layout.patch_size
        g = torch.Generator().manual_seed(0)
        grey = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)
        image = Image.frombytes("RGB", (width, height), bytes(grey.flatten().tolist()))
        out = ip(images=[image], return_tensors="pt")
        pixel_values, grid = torch.as_tensor(out["pixel_values"]), torch.as_tensor(out["image_grid_thw"])
        frames = pixel_values_to_images(pixel_values.float(), grid, layout)[0]
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        first_line = (str(error).splitlines() or [""])[0]
        raise ValueError(
            f"processor's image processor {name} does not lay images out as a Qwen-VL processor does "
            f"(patch rows in merge blocks, an image_grid_thw per image): {type(error).__name__}: {first_line}"
        ) from error
    mean = torch.tensor(layout.image_mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(layout.image_std, dtype=torch.float64).view(-1, 1, 1)
    back = (frames.double() * std + mean) / layout.rescale_factor  # grey levels
    fits = back.shape[1:] == (3, height, width)
    off = (back - grey.permute(2, 0, 1).double()).abs().amax().item() if fits else None
    if off is None or not off <= 1.5:
        got = f"an image {off:.1f} grey levels off" if off is not None else f"frames of shape {tuple(back.shape)}"
        raise ValueError(
            f"processor's image processor {name} does not lay images out as a Qwen-VL processor does: "
            f"the layout read from it gives {got} from its pixel_values (expected [3, {height}, {width}] "
            "within 1.5 grey levels); the pixel_values perturbations need the Qwen-VL layout (Qwen2-VL, "
            "Qwen2.5-VL, Qwen3-VL and processors that share it); from_processor(..., verify=False) skips this check"
        )


def _channel_values(name: str, value: Any) -> tuple[float, ...]:
    """A processor's per-channel constant as a tuple of floats; a single number is used for 3 channels."""
    try:
        values = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"the image processor's {name} must be a number or a sequence of numbers (one per channel), got {value!r}"
        ) from error
    flat = values.flatten().tolist()
    return tuple(flat * 3 if values.ndim == 0 else flat)


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
