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

from ._common import CLIP_MEAN, CLIP_STD, PixelLayout
from ._images import blacken_patches, gaussian_blur, gaussian_noise, mask_image
from ._pil import blacken_patches_pil, gaussian_blur_pil, gaussian_noise_pil, mask_image_pil
from ._pixel_values import (
    blacken_patches_pixel_values,
    gaussian_blur_pixel_values,
    gaussian_noise_pixel_values,
    images_to_pixel_values,
    mask_pixel_values,
    pixel_values_to_images,
)

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
