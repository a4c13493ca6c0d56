"""vppo_core.perturb: patch blackening, noise, blur and masking on tensors, PIL images and Qwen pixel_values."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vppo_core.perturb import (
    PixelLayout,
    blacken_patches,
    blacken_patches_pil,
    blacken_patches_pixel_values,
    gaussian_blur,
    gaussian_blur_pil,
    gaussian_blur_pixel_values,
    gaussian_noise,
    gaussian_noise_pil,
    gaussian_noise_pixel_values,
    images_to_pixel_values,
    mask_image,
    mask_image_pil,
    mask_pixel_values,
    pixel_values_to_images,
)

from .helpers import assert_inputs_unchanged, require_transformers

Image = pytest.importorskip("PIL.Image")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(batch: int, height: int, width: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Random uint8 images with no black pixel (so a blackened pixel is recognisable)."""
    return torch.randint(1, 256, (batch, channels, height, width), dtype=torch.uint8, generator=gen(seed))


def to_pil(image: torch.Tensor) -> "Image.Image":
    """uint8 [C, H, W] -> PIL (independent of the module's private converter)."""
    channels, height, width = image.shape
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    data = image.permute(1, 2, 0).contiguous().numpy().tobytes()
    return Image.frombytes(mode, (width, height), data)


def from_pil(image: "Image.Image") -> torch.Tensor:
    width, height = image.size
    bands = len(image.getbands())
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, bands).permute(2, 0, 1)


def patch_states(original: torch.Tensor, out: torch.Tensor, size: int) -> torch.Tensor:
    """[batch, rows, cols] bool: which patches were blackened; asserts each patch is all-or-nothing.

    ``original`` must have no black pixel.
    """
    batch, _, height, width = original.shape
    rows, cols = math.ceil(height / size), math.ceil(width / size)
    states = torch.zeros(batch, rows, cols, dtype=torch.bool)
    for i in range(rows):
        for j in range(cols):
            o = original[:, :, i * size : (i + 1) * size, j * size : (j + 1) * size]
            p = out[:, :, i * size : (i + 1) * size, j * size : (j + 1) * size]
            black = (p == 0).flatten(1).all(dim=1)
            same = (p == o).flatten(1).all(dim=1)
            assert bool((black | same).all()), "a patch is partly blackened"
            states[:, i, j] = black
    return states


# ----------------------------------------------------------------------------------------------------
# blacken_patches on tensors


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.bfloat16])
def test_blacken_shape_dtype_and_values(dtype: torch.dtype) -> None:
    images = random_images(3, 42, 56).to(dtype)
    out = assert_inputs_unchanged(blacken_patches, images, generator=gen(), patch_size=14)
    assert out.shape == images.shape and out.dtype == images.dtype
    changed = out != images
    assert bool(((out == 0) | ~changed).all())  # changed pixels are black
    states = patch_states(images, out, 14)
    assert 0 < int(states.sum()) < states.numel()


def test_blacken_expected_fraction_binomial() -> None:
    images = torch.full((8, 1, 140, 140), 200, dtype=torch.uint8)  # 100 patches per image
    g = gen(123)
    for p in (0.5, 0.2):
        draws = torch.stack([blacken_patches(images, generator=g, p=p)[:, 0, ::14, ::14] == 0 for _ in range(25)])
        n = draws.numel()  # 25 * 8 * 100 = 20 000 Bernoulli(p)
        fraction = draws.float().mean().item()
        assert abs(fraction - p) < 5 * math.sqrt(p * (1 - p) / n), (p, fraction)
        # every patch position and every image of the batch is blackened at about the same rate
        per_position = draws.float().mean(dim=(0, 1))
        assert per_position.min() > 0.02 and per_position.max() < 0.98
    assert bool((blacken_patches(images, generator=g, p=0.0) == images).all())
    assert bool((blacken_patches(images, generator=g, p=1.0) == 0).all())


def test_blacken_reproducible_and_fresh_per_image() -> None:
    images = torch.full((4, 3, 56, 56), 255, dtype=torch.uint8)
    a = blacken_patches(images, generator=gen(7))
    b = blacken_patches(images, generator=gen(7))
    c = blacken_patches(images, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # identical images, different draws
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 4))
    # the generator advances: a second call with the same generator differs
    g = gen(7)
    assert not torch.equal(blacken_patches(images, generator=g), blacken_patches(images, generator=g))


def test_blacken_never_touches_global_rng() -> None:
    state = torch.get_rng_state()
    blacken_patches(random_images(2, 28, 28), generator=gen())
    gaussian_noise(random_images(2, 28, 28), generator=gen())
    assert torch.equal(state, torch.get_rng_state())


def test_blacken_draw_order_is_documented() -> None:
    """Patch (i, j) of image b is blackened iff rand[b, i, j] < p, rand = torch.rand(batch * rows * cols)."""
    images = torch.full((2, 1, 30, 44), 9, dtype=torch.uint8)  # 3 x 4 patches of 14, edge patches cropped
    out = blacken_patches(images, generator=gen(3), p=0.4)
    expected = torch.rand(2 * 3 * 4, generator=gen(3)).view(2, 3, 4) < 0.4
    assert torch.equal(patch_states(images, out, 14), expected)


def test_blacken_edge_patches_are_cropped_patches() -> None:
    images = torch.full((1, 3, 30, 20), 255, dtype=torch.uint8)  # rows 28-29 and cols 14-19 are edge patches
    out = blacken_patches(images, generator=gen(0), p=1.0)
    assert bool((out == 0).all())
    for seed in range(20):
        out = blacken_patches(images, generator=gen(seed))
        states = patch_states(images, out, 14)
        assert states.shape == (1, 3, 2)
        # the 2-pixel-high bottom row of patches follows its own draw
        assert torch.equal(out[0, 0, 28:, :14] == 0, states[0, 2, 0].expand(2, 14))


def test_blacken_empty_batch() -> None:
    assert blacken_patches(torch.zeros(0, 3, 30, 30), generator=gen()).shape == (0, 3, 30, 30)


def test_blacken_fill_per_channel() -> None:
    images = torch.zeros(1, 3, 14, 14)
    out = blacken_patches(images, generator=gen(), p=1.0, fill=(-1.0, -2.0, -3.0))
    assert torch.equal(out[0, :, 0, 0], torch.tensor([-1.0, -2.0, -3.0]))


@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    size=st.integers(1, 20),
    p=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_blacken_property_all_or_nothing(height: int, width: int, size: int, p: float, seed: int) -> None:
    images = torch.randint(1, 256, (2, 2, height, width), dtype=torch.uint8, generator=gen(seed))
    out = blacken_patches(images, generator=gen(seed), patch_size=size, p=p)
    states = patch_states(images, out, size)
    expected = torch.rand(states.numel(), generator=gen(seed)).view(states.shape) < p
    assert torch.equal(states, expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"p": 1.5}, ValueError, r"p must be a probability in \[0, 1\], got 1.5"),
        ({"p": float("nan")}, ValueError, "p must be a probability"),
        ({"patch_size": 0}, ValueError, "patch_size must be an integer >= 1, got 0"),
        ({"fill": (0.0, 0.0)}, ValueError, "fill must be a finite number or 3 finite numbers"),
        (
            {"fill": -1.0, "images": torch.zeros(1, 3, 14, 14, dtype=torch.uint8)},
            ValueError,
            r"fill must be in \[0, 255\]",
        ),
        ({"generator": None}, TypeError, "generator"),
    ],
)
def test_blacken_errors(kwargs: dict, error: type, match: str) -> None:
    args = {"generator": gen(), "images": torch.zeros(1, 3, 14, 14), **kwargs}
    with pytest.raises(error, match=match):
        blacken_patches(**args)


def test_blacken_rejects_bad_shape_and_dtype() -> None:
    with pytest.raises(TypeError):
        blacken_patches(torch.zeros(3, 14, 14), generator=gen())
    with pytest.raises(TypeError):
        blacken_patches(torch.zeros(1, 3, 14, 14, dtype=torch.int64), generator=gen())


# ----------------------------------------------------------------------------------------------------
# noise, blur, mask on tensors


def test_gaussian_noise_statistics_and_clipping() -> None:
    images = torch.full((4, 3, 32, 32), 0.5, dtype=torch.float64)
    out = assert_inputs_unchanged(gaussian_noise, images, generator=gen(), sigma=12.75)  # 0.05 in [0, 1] units
    assert out.dtype == torch.float64
    assert abs((out - images).std().item() - 0.05) < 0.002
    assert abs((out - images).mean().item()) < 0.002
    big = gaussian_noise(images, generator=gen(), sigma=189.0)
    assert float(big.min()) == 0.0 and float(big.max()) == 1.0
    u8 = gaussian_noise(torch.full((1, 3, 8, 8), 128, dtype=torch.uint8), generator=gen(), sigma=189.0)
    assert u8.dtype == torch.uint8 and int(u8.min()) == 0 and int(u8.max()) == 255
    # pixel_max scales sigma: the same draws on a 0-255 float image
    scaled = gaussian_noise(images * 255, generator=gen(), sigma=12.75, pixel_max=255.0)
    torch.testing.assert_close(scaled / 255, out)
    assert torch.equal(gaussian_noise(images, generator=gen(), sigma=0.0), images)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0, got -1"):
        gaussian_noise(images, generator=gen(), sigma=-1.0)
    with pytest.raises(ValueError, match="pixel_max must be a finite number > 0"):
        gaussian_noise(images, generator=gen(), pixel_max=0.0)


def test_gaussian_blur() -> None:
    flat = torch.full((2, 3, 20, 24), 77, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(flat, radius=6.0), flat)
    impulse = torch.zeros(1, 1, 41, 41, dtype=torch.float64)
    impulse[..., 20, 20] = 1.0
    out = assert_inputs_unchanged(gaussian_blur, impulse, radius=3.0)
    assert abs(out.sum().item() - 1.0) < 1e-12  # interior: mass preserved
    # separable Gaussian with std = radius: the centre row follows exp(-x^2 / 2r^2)
    row = out[0, 0, 20]
    x = torch.arange(-20, 21, dtype=torch.float64)
    expected = torch.exp(-(x**2) / 18)
    expected = expected * (row[20] / expected[20])
    torch.testing.assert_close(row[11:30], expected[11:30])
    assert torch.equal(gaussian_blur(impulse, radius=0.0), impulse)
    with pytest.raises(ValueError, match="radius must be a finite number >= 0"):
        gaussian_blur(impulse, radius=-1.0)


def test_gaussian_blur_close_to_pillow() -> None:
    images = random_images(1, 48, 48, seed=4)
    ours = gaussian_blur(images, radius=2.0).float()
    pil = from_pil(gaussian_blur_pil(to_pil(images[0]), radius=2.0)).float()
    # Pillow approximates the Gaussian with box blurs: close in the interior, not identical
    assert (ours[0, :, 8:-8, 8:-8] - pil[:, 8:-8, 8:-8]).abs().mean() < 1.5


def test_mask_image() -> None:
    images = random_images(2, 5, 7)
    out = assert_inputs_unchanged(mask_image, images)
    assert out.dtype == torch.uint8 and bool((out == 128).all())
    red = mask_image(torch.rand(1, 3, 2, 2), value=(255, 0, 0))
    assert torch.equal(red[0, :, 1, 1], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="value must be a finite number or 3 finite numbers"):
        mask_image(images, value=(1, 2))


# ----------------------------------------------------------------------------------------------------
# PIL


def test_pil_functions_match_tensor_functions() -> None:
    images = random_images(3, 42, 30, seed=1)
    pils = [to_pil(im) for im in images]
    before = [im.tobytes() for im in pils]
    out = blacken_patches_pil(pils, generator=gen(5))
    assert [im.tobytes() for im in pils] == before  # inputs untouched
    assert all(o.size == (30, 42) and o.mode == "RGB" for o in out)
    assert torch.equal(torch.stack([from_pil(o) for o in out]), blacken_patches(images, generator=gen(5)))
    single = blacken_patches_pil(pils[0], generator=gen(5))
    assert isinstance(single, Image.Image) and torch.equal(from_pil(single), from_pil(out[0]))
    noisy = gaussian_noise_pil(pils, generator=gen(6), sigma=30.0)
    assert torch.equal(torch.stack([from_pil(o) for o in noisy]), gaussian_noise(images, generator=gen(6), sigma=30.0))
    masked = mask_image_pil(pils)
    assert all(set(o.tobytes()) == {128} for o in masked)


def test_pil_sizes_modes_and_alpha() -> None:
    rgba = Image.new("RGBA", (28, 28), (200, 100, 50, 77))
    out = blacken_patches_pil([rgba, Image.new("L", (15, 40), 255)], generator=gen(0), p=1.0)
    assert out[0].mode == "RGBA" and set(zip(*[iter(out[0].tobytes())] * 4)) == {(0, 0, 0, 77)}
    assert out[1].mode == "L" and out[1].size == (15, 40) and set(out[1].tobytes()) == {0}
    # images of different sizes draw in sequence: the second image's draws follow the first's
    a, b = Image.new("L", (28, 14), 255), Image.new("L", (14, 28), 255)
    out = blacken_patches_pil([a, b], generator=gen(9))
    u = torch.rand(4, generator=gen(9)) < 0.5
    assert [out[0].getpixel((0, 0)) == 0, out[0].getpixel((14, 0)) == 0] == u[:2].tolist()
    assert [out[1].getpixel((0, 0)) == 0, out[1].getpixel((0, 14)) == 0] == u[2:].tolist()
    with pytest.raises(ValueError, match="mode L, LA, RGB or RGBA, got mode 'P'"):
        blacken_patches_pil(Image.new("P", (4, 4)), generator=gen())
    with pytest.raises(TypeError, match=r"PIL\.Image\.Image or a list of them, got Tensor"):
        blacken_patches_pil(torch.zeros(3, 4, 4), generator=gen())


# ----------------------------------------------------------------------------------------------------
# Qwen pixel_values


LAYOUTS = {
    "qwen2_vl": PixelLayout(),
    "qwen3_vl": PixelLayout(patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def processed(request: pytest.FixtureRequest) -> tuple:
    """Two aligned images of different sizes (no resize happens), run through the real image processor."""
    require_transformers()
    from vppo_core.integrations.tiny_vlm import tiny_image_processor

    processor = tiny_image_processor(request.param, max_pixels=300 * 300)
    layout = PixelLayout.from_processor(processor)
    assert layout == LAYOUTS[request.param]
    s = layout.patch_size
    images = [random_images(1, 4 * s, 6 * s, seed=10)[0], random_images(1, 8 * s, 2 * s, seed=11)[0]]
    batch = processor([to_pil(im) for im in images], return_tensors="pt")
    return processor, layout, images, batch["pixel_values"], batch["image_grid_thw"]


def process(processor, images: list[torch.Tensor]) -> torch.Tensor:
    return processor([to_pil(im) for im in images], return_tensors="pt")["pixel_values"]


def test_layout_round_trip_and_row_formula(processed: tuple) -> None:
    _, layout, images, pv, thw = processed
    frames = pixel_values_to_images(pv, thw, layout)
    mean = torch.tensor(layout.image_mean).view(3, 1, 1)
    std = torch.tensor(layout.image_std).view(3, 1, 1)
    for f, im in zip(frames, images):
        assert f.shape == (2, 3, *im.shape[1:])
        assert torch.equal(f[0], f[1])  # the two temporal copies
        torch.testing.assert_close(f[0], (im.float() / 255 - mean) / std, atol=1e-6, rtol=0)
    back, back_thw = images_to_pixel_values(frames, layout)
    assert torch.equal(back, pv) and torch.equal(back_thw, thw)
    # the documented position of patch (i, j) of the first image, pixel (c, y, x) of it
    p, m = layout.patch_size, layout.merge_size
    w = int(thw[0, 2])
    for i, j, c, y, x in [(0, 0, 0, 0, 0), (1, 2, 1, 3, 5), (3, 5, 2, p - 1, p - 1), (2, 1, 0, 7, 2)]:
        row = ((i // m) * (w // m) + j // m) * m * m + (i % m) * m + j % m
        for t in range(layout.temporal_patch_size):
            col = ((c * layout.temporal_patch_size + t) * p + y) * p + x
            assert pv[row, col] == frames[0][t, c, i * p + y, j * p + x]


def test_blacken_pixel_values_matches_perturbing_the_image(processed: tuple) -> None:
    processor, layout, images, pv, thw = processed
    for seed in range(4):
        out = assert_inputs_unchanged(blacken_patches_pixel_values, pv, thw, layout, generator=gen(seed))
        stacked_first = blacken_patches(images[0][None], generator=gen(seed), patch_size=layout.patch_size)
        rest = blacken_patches_pil([to_pil(im) for im in images], generator=gen(seed), patch_size=layout.patch_size)
        expected = processor(rest, return_tensors="pt")["pixel_values"]
        assert torch.equal(out, expected)  # bit-exact, black = (0 - mean) / std in float32
        assert torch.equal(from_pil(rest[0]), stacked_first[0])
        # aligned patches: whole rows change, nothing else
        changed = out != pv
        assert torch.equal(changed.any(dim=1), changed.all(dim=1))


def test_blacken_pixel_values_unaligned_patch_size(processed: tuple) -> None:
    """The paper's fixed 14-pixel grid on any layout (on Qwen3-VL's 16-pixel patches it straddles rows)."""
    processor, layout, images, pv, thw = processed
    out = blacken_patches_pixel_values(pv, thw, layout, generator=gen(2), patch_size=14)
    perturbed = blacken_patches_pil([to_pil(im) for im in images], generator=gen(2))  # default 14 px
    assert torch.equal(out, processor(perturbed, return_tensors="pt")["pixel_values"])


def test_blacken_pixel_values_fraction(processed: tuple) -> None:
    _, layout, _, pv, thw = processed
    g = gen(0)
    changed = torch.stack(
        [(blacken_patches_pixel_values(pv, thw, layout, generator=g, p=0.3) != pv).any(dim=1) for _ in range(100)]
    )
    n = changed.numel()
    assert abs(changed.float().mean().item() - 0.3) < 5 * math.sqrt(0.21 / n)


def test_mask_pixel_values_matches_processor(processed: tuple) -> None:
    processor, layout, images, pv, thw = processed
    out = assert_inputs_unchanged(mask_pixel_values, pv, thw, layout)
    assert torch.equal(
        out, processor(mask_image_pil([to_pil(im) for im in images]), return_tensors="pt")["pixel_values"]
    )
    out = mask_pixel_values(pv, thw, layout, value=(10, 20, 30))
    expected = process(processor, [mask_image(im[None], value=(10, 20, 30))[0] for im in images])
    assert torch.equal(out, expected)


def test_noise_and_blur_pixel_values_match_float_pipeline(processed: tuple) -> None:
    """Noise / blur on the normalised image == normalise(noise / blur on the 0-255 float image)."""
    _, layout, images, pv, thw = processed
    mean = torch.tensor(layout.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(layout.image_std, dtype=torch.float64).view(3, 1, 1)

    def normalise(ims: list[torch.Tensor]) -> torch.Tensor:
        frames = [((im / 255 - mean) / std).float().expand(2, -1, -1, -1) for im in ims]
        return images_to_pixel_values(frames, layout)[0]

    floats = [im.double()[None] for im in images]
    noisy = assert_inputs_unchanged(gaussian_noise_pixel_values, pv, thw, layout, generator=gen(3), sigma=40.0)
    g = gen(3)  # the same draws, image after image
    expected = normalise([gaussian_noise(x, generator=g, sigma=40.0, pixel_max=255.0)[0] for x in floats])
    torch.testing.assert_close(noisy, expected, atol=2e-5, rtol=0)
    assert float(noisy.min()) >= float(((0 - mean) / std).min()) - 1e-6

    blurred = assert_inputs_unchanged(gaussian_blur_pixel_values, pv, thw, layout, radius=1.5)
    expected = normalise([gaussian_blur(x, radius=1.5)[0] for x in floats])
    torch.testing.assert_close(blurred, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "flags", [{"do_normalize": False}, {"do_rescale": False}, {"do_normalize": False, "do_rescale": False}]
)
def test_layout_honours_the_processor_flags(flags: dict) -> None:
    """Without normalising or rescaling, perturbing pixel_values still equals processing the perturbed image."""
    require_transformers()
    from vppo_core.integrations.tiny_vlm import tiny_image_processor

    processor = tiny_image_processor("qwen2_vl", max_pixels=300 * 300)
    for name, value in flags.items():
        setattr(processor, name, value)
    layout = PixelLayout.from_processor(processor)
    normalise, rescale = flags.get("do_normalize", True), flags.get("do_rescale", True)
    assert layout.image_mean == (LAYOUTS["qwen2_vl"].image_mean if normalise else (0.0, 0.0, 0.0))
    assert layout.image_std == (LAYOUTS["qwen2_vl"].image_std if normalise else (1.0, 1.0, 1.0))
    assert layout.rescale_factor == (1 / 255 if rescale else 1.0)
    s = layout.patch_size
    images = [random_images(1, 4 * s, 6 * s, seed=10)[0], random_images(1, 2 * s, 4 * s, seed=11)[0]]
    batch = processor([to_pil(im) for im in images], return_tensors="pt")
    pv, thw = batch["pixel_values"], batch["image_grid_thw"]
    out = blacken_patches_pixel_values(pv, thw, layout, generator=gen(0))
    blackened = blacken_patches_pil([to_pil(im) for im in images], generator=gen(0), patch_size=s)
    assert bool((out != pv).any())
    assert torch.equal(out, process(processor, [from_pil(im) for im in blackened]))
    coloured = mask_pixel_values(pv, thw, layout, value=(10, 20, 30))
    expected = process(processor, [mask_image(im[None], value=(10, 20, 30))[0] for im in images])
    assert torch.equal(coloured, expected)


class _RasterRows:
    """A Qwen-VL image processor whose rows come out in raster order (as HunYuan-VL's do), same attributes."""

    def __init__(self, processor, rows="raster"):
        self.inner, self.rows = processor, rows
        for name in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "rescale_factor"):
            setattr(self, name, getattr(processor, name))

    def __call__(self, images, return_tensors="pt"):
        out = dict(self.inner(images, return_tensors=return_tensors))
        if self.rows == "raster":  # undo the 2x2 merge blocks of every image
            pv, grid, parts, m = out["pixel_values"], out["image_grid_thw"], [], self.merge_size
            for rows, (t, h, w) in zip(pv.split(grid.prod(-1).tolist()), grid.tolist()):
                blocks = rows.view(t, h // m, w // m, m, m, -1).permute(0, 1, 3, 2, 4, 5)
                parts.append(blocks.reshape(t * h * w, -1))
            out["pixel_values"] = torch.cat(parts)
        else:  # no image_grid_thw
            del out["image_grid_thw"]
        return out


def test_layout_from_processor_checks_the_layout_on_an_image() -> None:
    # Other models' image processors carry the same attribute names with another row order; their
    # layout was accepted and every perturbation hit the wrong pixels without an error.
    require_transformers()
    from vppo_core.integrations.tiny_vlm import tiny_image_processor

    processor = tiny_image_processor("qwen3_vl")
    assert PixelLayout.from_processor(processor) == LAYOUTS["qwen3_vl"]
    with pytest.raises(ValueError, match=r"_RasterRows does not lay images out as a Qwen-VL .* grey levels off"):
        PixelLayout.from_processor(_RasterRows(processor))
    assert PixelLayout.from_processor(_RasterRows(processor), verify=False) == LAYOUTS["qwen3_vl"]
    with pytest.raises(ValueError, match=r"_RasterRows does not lay images out .* KeyError: 'image_grid_thw'"):
        PixelLayout.from_processor(_RasterRows(processor, rows="no grid"))


def test_layout_from_processor_constant_types() -> None:
    """image_mean / image_std as a NumPy array, a tensor or one number for every channel."""
    np = pytest.importorskip("numpy")
    from types import SimpleNamespace

    sizes = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2}
    for mean, std in [(np.array([0.5, 0.25, 0.125]), torch.tensor([0.5, 0.5, 0.5])), (0.5, np.float32(0.5))]:
        layout = PixelLayout.from_processor(SimpleNamespace(image_mean=mean, image_std=std, **sizes))
        assert layout.image_mean == tuple(float(v) for v in torch.as_tensor(mean).expand(3))
        assert layout.image_std == (0.5, 0.5, 0.5)
    with pytest.raises(TypeError, match=r"image_mean must be a number or a sequence of numbers .* got 'grey'"):
        PixelLayout.from_processor(SimpleNamespace(image_mean="grey", image_std=0.5, **sizes))


def test_pixel_values_errors() -> None:
    pv, thw, layout = torch.zeros(16, 1176), torch.tensor([[1, 4, 4]]), PixelLayout()
    with pytest.raises(ValueError, match="1176 columns for this layout, got 1536"):
        blacken_patches_pixel_values(torch.zeros(16, 1536), thw, layout, generator=gen())
    with pytest.raises(ValueError, match=r"describes 24 patches .* but pixel_values has 16 rows"):
        mask_pixel_values(pv, torch.tensor([[1, 4, 6]]), layout)
    with pytest.raises(ValueError, match=r"multiples of merge_size=2, got \[1, 4, 3\]"):
        mask_pixel_values(torch.zeros(12, 1176), torch.tensor([[1, 4, 3]]), layout)
    with pytest.raises(TypeError, match="layout"):
        mask_pixel_values(pv, thw, {"patch_size": 14})
    with pytest.raises(TypeError, match="lacks patch_size"):
        PixelLayout.from_processor(object())
    with pytest.raises(ValueError, match=r"images\[0\] must be"):
        images_to_pixel_values([torch.zeros(2, 3, 30, 28)], layout)
