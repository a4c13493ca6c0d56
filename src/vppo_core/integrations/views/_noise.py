"""VP-diffusion noise with its annealed step schedules, and Gaussian noise on normalised pixel values."""

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float, Integer
from torch import Tensor

from ..._checks import typechecked
from ...perturb import PixelLayout, images_to_pixel_values, pixel_values_to_images
from ._common import _check_generator


def vp_alpha_bar(num_steps: int = 1000, *, beta_min: float = 1e-5, beta_max: float = 5e-3) -> Tensor:
    r"""Cumulative signal fraction $\bar\alpha_t = \prod_{s \le t}(1 - \beta_s)$ of the VP-diffusion schedule.

    $\beta = \sigma(\operatorname{linspace}(-6, 6, 1000))\,(5\cdot10^{-3} - 10^{-5}) + 10^{-5}$, the
    sigmoid schedule DVRP (arXiv:2601.06801) and NoisyRollout (arXiv:2504.13055) use; steps are
    0-indexed as in their code. float64.

    Example:
        >>> ab = vp_alpha_bar()
        >>> ab.shape, round(float(ab[0]), 6), round(float(ab[499]), 4)
        (torch.Size([1000]), 0.999978, 0.7467)
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (beta_max - beta_min) + beta_min
    return torch.cumprod(1.0 - betas, 0)


def _check_step(step: int, num_steps: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
        raise ValueError(f"step must be an integer in [0, {num_steps}), got {step!r}")


def dvrp_noise_step(progress: float, *, t_init: int = 500, gamma: float = 10.0) -> int:
    r"""DVRP's annealed diffusion step $t = \lfloor T_{init}\,\sigma(\gamma(0.5 - \text{progress}))\rfloor$.

    DVRP (arXiv:2601.06801): $T_{init} = 500$, $\gamma = 10$; strong noise early, little late.

    Example:
        >>> dvrp_noise_step(0.0), dvrp_noise_step(0.5), dvrp_noise_step(1.0)
        (496, 250, 3)
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (step / max_steps), got {progress!r}")
    return math.floor(t_init / (1.0 + math.exp(-gamma * (0.5 - progress))))


def noisyrollout_noise_step(
    step: int, *, alpha0: int = 500, lam: float = 30.0, gamma: float = 40.0, t_max: int = 60
) -> int:
    r"""NoisyRollout's annealed diffusion step $k_t = \lfloor\alpha_0(1 - \sigma(\lambda(t - \gamma)/t_{max}))\rfloor$.

    NoisyRollout (arXiv:2504.13055), e.g. $\alpha_0 = 500$, $\lambda = 30$, $\gamma = 40$,
    $t_{max} = 60$ training steps.

    Example:
        >>> noisyrollout_noise_step(0), noisyrollout_noise_step(40), noisyrollout_noise_step(60)
        (499, 250, 0)
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    return math.floor(alpha0 * (1.0 - 1.0 / (1.0 + math.exp(-lam * (step - gamma) / t_max))))


@typechecked
def vp_diffusion_noise(
    images: Float[Tensor, "batch channels height width"],
    *,
    step: int,
    generator: torch.Generator,
    clamp: bool = True,
) -> Float[Tensor, "batch channels height width"]:
    r"""A VP-diffusion forward step on $[0, 1]$ images: $x_t = \sqrt{\bar\alpha_t}x + \sqrt{1-\bar\alpha_t}\varepsilon$.

    $\bar\alpha_t$ from [`vp_alpha_bar`][vppo_core.integrations.views.vp_alpha_bar] (DVRP, NoisyRollout),
    $\varepsilon \sim \mathcal N(0, I)$ drawn from ``generator`` (float32, on the CPU, then moved),
    the result clamped to $[0, 1]$ (a valid image; ``clamp=False`` keeps the raw step).

    Shapes:
        - ``images``: ``[batch, channels, height, width]`` in $[0, 1]$
        - returns: the same shape and dtype

    Args:
        images: Float images in $[0, 1]$ (never modified).
        step: Diffusion step $t \in [0, 1000)$ (e.g. [`dvrp_noise_step`][vppo_core.integrations.views.dvrp_noise_step]).
        generator: The random source.
        clamp: Clamp the result to $[0, 1]$.

    Returns:
        The noised images.

    Raises:
        ValueError: If ``step`` is not an integer in $[0, 1000)$.
        TypeError: If ``generator`` is not a ``torch.Generator``.

    Example:
        >>> import torch
        >>> x = torch.full((1, 3, 4, 4), 0.5)
        >>> y = vp_diffusion_noise(x, step=999, generator=torch.Generator().manual_seed(0))
        >>> float((y - 0.5).abs().mean()) > 0.2  # almost pure noise at the last step
        True
    """
    _check_generator(generator)
    _check_step(step, 1000)
    ab = vp_alpha_bar()[step]
    noise = torch.randn(images.shape, generator=generator, device=generator.device).to(images.device)
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    out = ab.sqrt().item() * images.to(work) + (1.0 - ab).sqrt().item() * noise.to(work)
    return (out.clamp(0.0, 1.0) if clamp else out).to(images.dtype)


def _channel(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


@typechecked
def vp_diffusion_noise_pixel_values(
    pixel_values: Float[Tensor, "patches features"],
    image_grid_thw: Integer[Tensor, "images 3"],
    layout: PixelLayout,
    *,
    step: int,
    generator: torch.Generator,
    clamp: bool = True,
) -> Float[Tensor, "patches features"]:
    r"""VP-diffusion noise on the images inside a Qwen-VL ``pixel_values``.

    Each image is taken back to $[0, 1]$ ($(x\sigma_c + \mu_c)/(255 r)$ with the layout's normalisation
    and rescale factor $r$; $255 r = 1$ for the usual $r = 1/255$), noised
    with one draw of $\varepsilon$ per image (``[t, channels, H, W]``, image after image, shared by its
    temporal copies as the processor copies the noised image), clamped, and normalised again: what
    noising the resized image before the processor gives, without the ``uint8`` rounding. This is the
    noisy view of DVRP (arXiv:2601.06801, step from
    [`dvrp_noise_step`][vppo_core.integrations.views.dvrp_noise_step]) and the noisy rollouts of
    NoisyRollout (arXiv:2504.13055, step from
    [`noisyrollout_noise_step`][vppo_core.integrations.views.noisyrollout_noise_step]).

    Shapes:
        - ``pixel_values``: ``[patches, features]``; ``image_grid_thw``: ``[images, 3]``
        - returns: the shape and dtype of ``pixel_values``

    Args:
        pixel_values: The processor's ``pixel_values`` (never modified).
        image_grid_thw: The processor's ``image_grid_thw``.
        layout: ``PixelLayout.from_processor(processor)``.
        step: Diffusion step in $[0, 1000)$.
        generator: The random source.
        clamp: Clamp to the valid pixel range.

    Returns:
        The noised ``pixel_values``.

    Example:
        >>> import torch
        >>> from vppo_core.perturb import PixelLayout
        >>> pv, thw = torch.zeros(4, 1176), torch.tensor([[1, 2, 2]])
        >>> out = vp_diffusion_noise_pixel_values(pv, thw, PixelLayout(), step=10,
        ...                                       generator=torch.Generator().manual_seed(0))
        >>> out.shape, bool((out != pv).any())
        (torch.Size([4, 1176]), True)
    """
    _check_generator(generator)
    _check_step(step, 1000)
    images = pixel_values_to_images(pixel_values, image_grid_thw, layout)
    tp = layout.temporal_patch_size
    out = []
    for im in images:
        work = im.to(torch.float64 if im.dtype == torch.float64 else torch.float32)
        mean, std = _channel(layout.image_mean, work), _channel(layout.image_std, work)
        scale = 255.0 * layout.rescale_factor  # rescaled units per [0, 1] (1, or 255 without rescaling)
        x01 = (work * std + mean) / scale
        t = x01.shape[0] // tp
        still = x01.reshape(t, tp, *x01.shape[1:])[:, 0]
        noised = vp_diffusion_noise(still, step=step, generator=generator, clamp=clamp)
        frames = noised.unsqueeze(1).expand(t, tp, *noised.shape[1:]).reshape(x01.shape)
        out.append(((frames * scale - mean) / std).to(im.dtype))
    return images_to_pixel_values(out, layout)[0] if out else pixel_values.clone()


@typechecked
def normalised_noise_pixel_values(
    pixel_values: Float[Tensor, "patches features"],
    *,
    generator: torch.Generator,
    sigma: float = 6.93,
) -> Float[Tensor, "patches features"]:
    r"""Gaussian noise added directly to the processor's normalised ``pixel_values``: $x + \sigma\varepsilon$.

    VEPO's view (arXiv:2606.03937): its official code adds noise of effective standard deviation
    $\approx 6.93$ in normalised units (the default), which all but replaces the image; no clamping,
    one independent draw per value (``pixel_values``' shape, float32 on the generator's device).

    Shapes:
        - ``pixel_values``: ``[patches, features]``; returns the same shape and dtype

    Args:
        pixel_values: The processor's ``pixel_values`` (never modified).
        generator: The random source.
        sigma: Noise standard deviation in normalised units, $\ge 0$.

    Returns:
        The noised ``pixel_values``.

    Example:
        >>> import torch
        >>> out = normalised_noise_pixel_values(torch.zeros(4, 8), generator=torch.Generator().manual_seed(0))
        >>> 4 < float(out.std()) < 10
        True
    """
    _check_generator(generator)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    noise = torch.randn(pixel_values.shape, generator=generator, device=generator.device).to(pixel_values.device)
    work = torch.float64 if pixel_values.dtype == torch.float64 else torch.float32
    return (pixel_values.to(work) + sigma * noise.to(work)).to(pixel_values.dtype)
