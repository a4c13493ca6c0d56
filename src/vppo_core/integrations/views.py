r"""View builders for the perception-aware family: the auxiliary inputs a method scores its tokens on.

Each method compares the policy on the original input with the policy on a *view* of it:

- no image: [`no_image_inputs`][vppo_core.integrations.views.no_image_inputs] (ToR);
- random black patches: ``vppo_core.perturb.blacken_patches_pixel_values`` (VPPO, PAPO, DVRP);
- VP-diffusion noise at an annealed step:
  [`vp_diffusion_noise_pixel_values`][vppo_core.integrations.views.vp_diffusion_noise_pixel_values]
  (DVRP, NoisyRollout);
- Gaussian noise on the normalised pixels:
  [`normalised_noise_pixel_values`][vppo_core.integrations.views.normalised_noise_pixel_values] (VEPO);
- boxes filled with their mean colour:
  [`fill_boxes_pixel_values`][vppo_core.integrations.views.fill_boxes_pixel_values] (CGPO);
- attention blind to the image tokens: [`blind_image_inputs`][vppo_core.integrations.views.blind_image_inputs] (PGPO);
- counterfactual attention: [`counterfactual_attention`][vppo_core.integrations.views.counterfactual_attention] (CFPO).

Conventions: every builder is pure (inputs, including the ``inputs`` mapping and its tensors, are never
modified; the model is left exactly as it was once a context manager exits), and the random ones
draw only from the ``torch.Generator`` they are given. The pixel-space builders act on a Qwen-VL
processor's ``pixel_values`` through a [`PixelLayout`][vppo_core.perturb.PixelLayout] (see
``vppo_core.perturb``). Score a view once per rollout batch with the rollout policy under
``torch.no_grad()``, e.g. with ``vppo_core.integrations.transformers.token_logprobs``.

Requires the ``hf`` extra for the model-level builders (the tensor-level ones need only torch).
"""

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Integer, Shaped
from torch import Tensor

from .._checks import as_bool_mask, typechecked
from ..perturb import PixelLayout, images_to_pixel_values, pixel_values_to_images

__all__ = [
    "blind_image_inputs",
    "counterfactual_attention",
    "counterfactual_attention_output",
    "dvrp_noise_step",
    "fill_boxes",
    "fill_boxes_pixel_values",
    "move_response_values",
    "no_image_inputs",
    "noisyrollout_noise_step",
    "normalised_noise_pixel_values",
    "vp_alpha_bar",
    "vp_diffusion_noise",
    "vp_diffusion_noise_pixel_values",
]

_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


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


# ----------------------------------------------------------------------------------------------------
# no image


def no_image_inputs(
    model: Any,
    inputs: Mapping[str, Any],
    response_mask: Tensor,
    *,
    padding_side: Literal["left", "right"] = "right",
) -> tuple[dict[str, Any], Tensor]:
    """The text-only view: the same prompt + response with every image removed (ToR's $\\pi(\\cdot\\mid\\varnothing)$).

    Every vision token (``<|vision_start|>``, ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_end|>``,
    ids from the model's config) and every padding token is dropped from each row, the rows are
    re-padded on ``padding_side`` with the text config's pad id, and ``pixel_values`` /
    ``image_grid_thw`` (and their video counterparts) are left out; ``mm_token_type_ids`` becomes all
    text. The response keeps its tokens in order, so values computed on this view line up with the
    original layout through [`move_response_values`][vppo_core.integrations.views.move_response_values].
    Keys other than ``input_ids``, ``attention_mask`` and the vision keys are not carried over.

    Args:
        model: A ``transformers`` Qwen-VL model (reads the vision token ids from its config).
        inputs: The processor's output for whole prompt + response sequences.
        response_mask: ``[batch, seq]``, true at response tokens of ``input_ids``.
        padding_side: Where the new rows are padded.

    Returns:
        ``(inputs, response_mask)`` of the text-only view.

    Raises:
        ValueError: If ``response_mask`` does not match ``input_ids`` or marks a vision token.

    Example:
        >>> import torch
        >>> from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl
        >>> from PIL import Image
        >>> processor = tiny_processor("qwen2_vl")
        >>> model = tiny_qwen_vl("qwen2_vl", processor.tokenizer)
        >>> text = "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>what colour ?<|im_end|>\\nred"
        >>> batch = processor(images=[Image.new("RGB", (56, 56))], text=[text], return_tensors="pt")
        >>> mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        >>> mask[:, -1] = True
        >>> view, view_mask = no_image_inputs(model, batch, mask)
        >>> batch["input_ids"].shape[1] - view["input_ids"].shape[1]  # 4 image pads + start + end
        6
        >>> view_ids = view["input_ids"]
        >>> processor.tokenizer.decode(view_ids[view_mask])
        'red'
    """
    ids = inputs["input_ids"]
    if tuple(response_mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"response_mask must have the shape of inputs['input_ids'] {tuple(ids.shape)}, "
            f"got {tuple(response_mask.shape)}"
        )
    config = model.config
    vision_ids = [
        getattr(config, name, None)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ]
    vision = torch.isin(ids, torch.tensor([i for i in vision_ids if i is not None], device=ids.device))
    resp = as_bool_mask(response_mask).to(ids.device)
    if bool((resp & vision).any()):
        raise ValueError("response_mask marks a vision token; the no-image view cannot keep it")
    attention = inputs.get("attention_mask")
    real = torch.ones_like(resp) if attention is None else attention != 0
    keep = real & ~vision
    n_keep = keep.sum(-1, keepdim=True)
    width = int(n_keep.max()) if ids.shape[0] else 0
    slot = keep.long().cumsum(-1) - 1
    if padding_side == "left":
        slot = slot + (width - n_keep)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad = getattr(text, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(-1).expand_as(ids)
    new_ids = ids.new_full((ids.shape[0], width), pad)
    new_ids[rows[keep], slot[keep]] = ids[keep]
    new_attention = torch.zeros_like(new_ids)
    new_attention[rows[keep], slot[keep]] = 1
    new_resp = torch.zeros_like(new_ids, dtype=torch.bool)
    new_resp[rows[keep], slot[keep]] = resp[keep]
    view: dict[str, Any] = {"input_ids": new_ids, "attention_mask": new_attention}
    if attention is not None:
        view["attention_mask"] = new_attention.to(attention.dtype)
    if inputs.get("mm_token_type_ids") is not None:
        view["mm_token_type_ids"] = torch.zeros_like(new_ids, dtype=inputs["mm_token_type_ids"].dtype)
    return view, new_resp


@typechecked
def move_response_values(
    values: Shaped[Tensor, "batch seq"],
    from_mask: Shaped[Tensor, "batch seq"],
    to_mask: Shaped[Tensor, "batch seq2"],
) -> Shaped[Tensor, "batch seq2"]:
    """Carry per-token values from one layout of the responses to another (same tokens, same order).

    ``out[to_mask] = values[from_mask]`` row by row, 0 elsewhere: e.g. the no-image log-probabilities
    from [`no_image_inputs`][vppo_core.integrations.views.no_image_inputs]'s layout back to the
    original one.

    Shapes:
        - ``values``, ``from_mask``: ``[batch, seq]``; ``to_mask``: ``[batch, seq2]``

    Raises:
        ValueError: If a row marks a different number of tokens in the two masks.

    Example:
        >>> import torch
        >>> v = torch.tensor([[0.0, 0.0, 1.0, 2.0]])
        >>> move_response_values(v, torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 1, 0]]))
        tensor([[1., 2., 0.]])
    """
    src, dst = as_bool_mask(from_mask, "from_mask"), as_bool_mask(to_mask, "to_mask")
    if not torch.equal(src.sum(-1), dst.sum(-1)):
        raise ValueError(
            f"from_mask and to_mask must mark as many tokens per row, got {src.sum(-1).tolist()} and "
            f"{dst.sum(-1).tolist()}"
        )
    out = values.new_zeros(dst.shape)
    out[dst] = values[src]
    return out


# ----------------------------------------------------------------------------------------------------
# VP-diffusion noise and its annealed steps


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

    Each image is taken back to $[0, 1]$ ($x\sigma_c + \mu_c$ with the layout's normalisation), noised
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
        x01 = work * std + mean
        t = x01.shape[0] // tp
        still = x01.reshape(t, tp, *x01.shape[1:])[:, 0]
        noised = vp_diffusion_noise(still, step=step, generator=generator, clamp=clamp)
        frames = noised.unsqueeze(1).expand(t, tp, *noised.shape[1:]).reshape(x01.shape)
        out.append(((frames - mean) / std).to(im.dtype))
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


# ----------------------------------------------------------------------------------------------------
# region fill


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


# ----------------------------------------------------------------------------------------------------
# attention views


def blind_image_inputs(model: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    r"""PGPO's blind view: the same inputs, with attention to every image token masked.

    PGPO (arXiv:2604.01840) scores tokens against the policy that cannot look at the image while every
    position keeps its place: the image tokens stay in the sequence (so M-RoPE positions, computed
    here once from the real inputs with the model's ``get_rope_index`` and passed as
    ``position_ids``, are unchanged), but the ``attention_mask`` is 0 on them, so no token attends to
    an image token. The logits of every text position are then independent of ``pixel_values``.

    Args:
        model: A ``transformers`` Qwen-VL ``*ForConditionalGeneration`` model.
        inputs: The processor's output for whole prompt + response sequences (with
            ``mm_token_type_ids``, as transformers 5 requires).

    Returns:
        A new inputs dict (the other entries shared with ``inputs``) with ``attention_mask`` and
        ``position_ids`` replaced.

    Raises:
        ValueError: If ``inputs`` lacks ``mm_token_type_ids`` or the model has no ``get_rope_index``.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl
        >>> processor = tiny_processor("qwen2_vl")
        >>> model = tiny_qwen_vl("qwen2_vl", processor.tokenizer)
        >>> text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what colour ?<|im_end|>\n"
        >>> batch = processor(images=[Image.new("RGB", (56, 56), "red")], text=[text], return_tensors="pt")
        >>> blind = blind_image_inputs(model, batch)
        >>> other = dict(blind, pixel_values=torch.randn_like(batch["pixel_values"]))
        >>> with torch.no_grad():
        ...     a, b = model(**blind).logits, model(**other).logits
        >>> text_positions = batch["mm_token_type_ids"] == 0
        >>> torch.allclose(a[text_positions], b[text_positions])
        True
    """
    if inputs.get("mm_token_type_ids") is None:
        raise ValueError("inputs must contain 'mm_token_type_ids' (the processor returns it) to blind the image tokens")
    base = getattr(model, "model", model)
    if not hasattr(base, "get_rope_index"):
        raise ValueError(f"model must be a Qwen-VL model with get_rope_index, got {type(model).__name__}")
    ids = inputs["input_ids"]
    attention = inputs.get("attention_mask")
    if attention is None:
        attention = torch.ones_like(ids)
    extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    with torch.no_grad():
        position_ids, _ = base.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], attention_mask=attention, **extra
        )
    view = dict(inputs)
    view["attention_mask"] = attention * (inputs["mm_token_type_ids"] != 1).to(attention.dtype)
    view["position_ids"] = position_ids
    return view


@typechecked
def counterfactual_attention_output(
    weights: Float[Tensor, "batch heads queries keys"],
    values: Float[Tensor, "batch heads keys head_dim"],
    image_mask: Shaped[Tensor, "batch keys"],
    query_mask: Shaped[Tensor, "batch queries"],
    *,
    k: float = 2.0,
) -> Float[Tensor, "batch heads queries head_dim"]:
    r"""CFPO's counterfactual attention output: salient image values replaced by the mean image value.

    For each sample and head, over the block of attention weights $A_{qv}$ from the queries
    ``query_mask`` (the text after the image) to the image keys ``image_mask``, with $\mu$, $\sigma$
    the mean and standard deviation (``torch.std``'s sample std) of that block,

    $$
    M_{qv} = \mathbb 1[A_{qv} > \mu + k\sigma], \qquad
    O = A V + (A \odot M)(\bar V - V), \qquad \bar V = \frac1{|\mathcal V|}\sum_{v} V_v ,
    $$

    i.e. every salient image value is replaced by the mean image value (CFPO, arXiv:2606.23206,
    $k = 2$). Rows outside ``query_mask`` and samples without image tokens are plain $AV$. The scope
    of $\mu, \sigma$ (per sample and head) is this library's reading of "over valid entries".

    Shapes:
        - ``weights``: ``[batch, heads, queries, keys]`` (softmaxed); ``values``: ``[batch, heads, keys, head_dim]``
        - ``image_mask``: ``[batch, keys]``; ``query_mask``: ``[batch, queries]``
        - returns: ``[batch, heads, queries, head_dim]``

    Example:
        >>> import torch
        >>> w = torch.tensor([[[[0.0, 1.0, 0.0], [0.1, 0.1, 0.8]]]])  # query 1 attends mostly to image key 2
        >>> v = torch.tensor([[[[0.0], [1.0], [3.0]]]])
        >>> img, queries = torch.tensor([[False, True, True]]), torch.tensor([[False, True]])
        >>> counterfactual_attention_output(w, v, img, queries, k=0.5)  # key 2's value 3 becomes the mean 2
        tensor([[[[1.0000],
                  [1.7000]]]])
    """
    img = as_bool_mask(image_mask, "image_mask")[:, None, None, :]
    qry = as_bool_mask(query_mask, "query_mask")[:, None, :, None]
    block = img & qry
    n = block.sum((-2, -1), keepdim=True).to(weights.dtype)
    a = torch.where(block, weights, 0.0)
    mu = a.sum((-2, -1), keepdim=True) / n.clamp_min(1)
    var = torch.where(block, (weights - mu).square(), 0.0).sum((-2, -1), keepdim=True) / (n - 1).clamp_min(1)
    salient = block & (weights > mu + k * var.sqrt())
    am = torch.where(salient, weights, 0.0)
    keys = as_bool_mask(image_mask, "image_mask")[:, None, :, None]  # [batch, 1, keys, 1]
    n_img = keys.sum(-2, keepdim=True).to(values.dtype).clamp_min(1)
    v_mean = torch.where(keys, values, 0.0).sum(-2, keepdim=True) / n_img  # [batch, heads, 1, head_dim]
    return weights @ values + am.sum(-1, keepdim=True) * v_mean - am @ values


_ATTENTION_NAME = "vppo_counterfactual"


class _ConfigProxy:
    """An attention module's config seen through a different ``_attn_implementation``; all else delegated."""

    def __init__(self, base: Any, implementation: str) -> None:
        self.__dict__["_base"] = base
        self.__dict__["_attn_implementation"] = implementation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_base"], name)


def _repeat_kv(x: Tensor, n: int) -> Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _counterfactual_forward(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager attention with CFPO's value substitution, for modules inside ``counterfactual_attention``."""
    state = module.__dict__.get("_vppo_counterfactual")
    if state is None:
        raise RuntimeError("the counterfactual attention function ran outside counterfactual_attention()")
    image_mask, query_mask, k = state
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    q_len, k_len = query.shape[-2], key.shape[-2]
    if q_len != k_len or image_mask.shape[-1] != k_len:
        raise ValueError(
            "counterfactual_attention supports full forward passes only (no cache, no generation): got "
            f"{q_len} queries, {k_len} keys for inputs of length {image_mask.shape[-1]}"
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scale
    if attention_mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :k_len]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = counterfactual_attention_output(weights, value, image_mask, query_mask, k=k)
    return out.transpose(1, 2).contiguous(), weights


def _text_attention_modules(model: Any) -> list[torch.nn.Module]:
    base = getattr(model, "model", model)
    decoder = getattr(base, "language_model", None)
    if decoder is None and hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
    modules = [] if decoder is None else [m for n, m in decoder.named_modules() if n.endswith("self_attn")]
    if not modules or not all(hasattr(m, "config") for m in modules):
        raise TypeError(
            "model must be a transformers VLM with decoder self-attention modules (…self_attn), "
            f"got {type(model).__name__}"
        )
    return modules


@contextlib.contextmanager
def counterfactual_attention(model: Any, inputs: Mapping[str, Any], *, k: float = 2.0) -> Iterator[Any]:
    r"""Run ``model`` with CFPO's counterfactual attention in every decoder self-attention (a context manager).

    Inside the ``with`` block, each text-decoder self-attention computes its weights eagerly and
    returns [`counterfactual_attention_output`][vppo_core.integrations.views.counterfactual_attention_output]:
    for the queries after the (last) image token of each sample, the attention to salient image
    tokens ($A > \mu + k\sigma$) reads the mean image value instead of the token's own value (CFPO,
    arXiv:2606.23206, $k = 2$). The vision tower is untouched. This gives $\pi_{cf}$ for
    [`cfpo`][vppo_core.family.cfpo]: score the same ``inputs`` inside the block.

    Mechanism: each attention module's ``config`` is temporarily replaced by a proxy whose
    ``_attn_implementation`` names an attention function registered under ``"vppo_counterfactual"``
    in ``transformers.AttentionInterface``; on exit every module gets its own config object back, so
    the model computes exactly what it did before (nothing else is changed; the registration, a
    name, stays). Only full forward passes of these ``inputs`` are supported (no cache).

    Args:
        model: A ``transformers`` Qwen-VL ``*ForConditionalGeneration`` model.
        inputs: The processor's output the model will be called with inside the block.
        k: Salience threshold in standard deviations.

    Yields:
        The model.

    Raises:
        TypeError: If the model has no decoder self-attention modules.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl
        >>> processor = tiny_processor("qwen2_vl")
        >>> model = tiny_qwen_vl("qwen2_vl", processor.tokenizer)
        >>> text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what colour ?<|im_end|>\n"
        >>> batch = processor(images=[Image.new("RGB", (56, 56), "red")], text=[text], return_tensors="pt")
        >>> with torch.no_grad():
        ...     before = model(**batch).logits
        ...     with counterfactual_attention(model, batch, k=0.0):
        ...         cf = model(**batch).logits
        ...     after = model(**batch).logits
        >>> bool(torch.equal(before, after)), bool((cf - before).abs().max() > 0)
        (True, True)
    """
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION_NAME, _counterfactual_forward)
    modules = _text_attention_modules(model)
    image_mask = _image_mask(model, inputs)
    positions = torch.arange(image_mask.shape[-1], device=image_mask.device)
    last_image = torch.where(image_mask, positions, -1).amax(-1, keepdim=True)
    attention = inputs.get("attention_mask")
    query_mask = (positions > last_image) & (last_image >= 0)
    if attention is not None:
        query_mask = query_mask & (attention != 0)
    originals = [m.config for m in modules]
    try:
        for m in modules:
            m.config = _ConfigProxy(m.config, _ATTENTION_NAME)
            m.__dict__["_vppo_counterfactual"] = (image_mask, query_mask, float(k))
        yield model
    finally:
        for m, config in zip(modules, originals):
            m.config = config
            m.__dict__.pop("_vppo_counterfactual", None)
