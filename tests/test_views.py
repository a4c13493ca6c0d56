"""View builders on tiny Qwen-VL models: inputs untouched, reproducible with a generator, oracles for every view,
and models left exactly as they were when an attention hook is removed."""

import math

import pytest
import torch

from .helpers import require_transformers

require_transformers()
Image = pytest.importorskip("PIL.Image")

from vppo_core.integrations.tiny_vlm import FAMILIES, tiny_processor, tiny_qwen_vl  # noqa: E402
from vppo_core.integrations.transformers import token_logprobs  # noqa: E402
from vppo_core.integrations.views import (  # noqa: E402
    blind_image_inputs,
    counterfactual_attention,
    counterfactual_attention_output,
    dvrp_noise_step,
    fill_boxes,
    fill_boxes_pixel_values,
    move_response_values,
    no_image_inputs,
    noisyrollout_noise_step,
    normalised_noise_pixel_values,
    vp_alpha_bar,
    vp_diffusion_noise,
    vp_diffusion_noise_pixel_values,
)
from vppo_core.perturb import PixelLayout, pixel_values_to_images  # noqa: E402

from .helpers import assert_inputs_unchanged  # noqa: E402

PROMPT = "<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
SAMPLES = [
    ("how many red circles ?", "i see 2 red circles<|im_end|>", (4, 4)),
    ("is there a star ?", "no<|im_end|>", (2, 6)),
]


def random_image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)
    return Image.frombytes("RGB", (width, height), data.numpy().tobytes())


def make_batch(processor, with_image=True, padding_side="right"):
    patch = processor.image_processor.patch_size
    texts = [PROMPT.format(image=IMAGE if with_image else "", question=q) + r for q, r, _ in SAMPLES]
    prompts = [PROMPT.format(image=IMAGE if with_image else "", question=q) for q, _, _ in SAMPLES]
    processor.tokenizer.padding_side = padding_side
    if with_image:
        images = [random_image(w * patch, h * patch, i) for i, (_, _, (w, h)) in enumerate(SAMPLES)]
        batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
        n_prompt = [len(processor(images=[im], text=[p])["input_ids"][0]) for im, p in zip(images, prompts)]
    else:
        batch = processor.tokenizer(texts, return_tensors="pt", padding=True)
        n_prompt = [len(processor.tokenizer(p)["input_ids"]) for p in prompts]
    processor.tokenizer.padding_side = "right"
    lengths = batch["attention_mask"].sum(-1, keepdim=True)
    pos = torch.arange(batch["input_ids"].shape[1])
    start = batch["input_ids"].shape[1] - lengths if padding_side == "left" else torch.zeros_like(lengths)
    mask = (pos >= start + torch.tensor(n_prompt)[:, None]) & (pos < start + lengths)
    return dict(batch), mask


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    processor = tiny_processor(request.param)
    model = tiny_qwen_vl(request.param, processor.tokenizer, seed=3)
    with torch.no_grad():  # larger weights than the default init, so the image matters visibly
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(6.0)
    return model, processor


@pytest.fixture(scope="module")
def qwen2(request):
    processor = tiny_processor("qwen2_vl")
    return tiny_qwen_vl("qwen2_vl", processor.tokenizer, seed=3), processor


def unchanged_inputs(fn, model, inputs, *args, **kwargs):
    """Call fn and check that no tensor of the inputs mapping (nor the mapping) changed."""
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    out = fn(model, inputs, *args, **kwargs)
    assert set(inputs) == set(before)
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(inputs[k], v), k
    return out


# ----------------------------------------------------------------------------- no image


def test_no_image_view_is_the_text_only_prompt(qwen2):
    model, processor = qwen2
    batch, mask = make_batch(processor)
    view, view_mask = unchanged_inputs(no_image_inputs, model, batch, mask)
    text_only, text_mask = make_batch(processor, with_image=False)
    assert torch.equal(view["input_ids"], text_only["input_ids"])
    assert torch.equal(view["attention_mask"], text_only["attention_mask"])
    assert torch.equal(view_mask, text_mask)
    assert "pixel_values" not in view and not view["mm_token_type_ids"].any()
    with torch.no_grad():
        lp_view = token_logprobs(model, view, view_mask)
        lp_text = token_logprobs(model, text_only, text_mask)
    torch.testing.assert_close(lp_view, lp_text)
    back = move_response_values(lp_view, view_mask, mask)
    assert torch.equal(back[mask], lp_view[view_mask]) and (back[~mask] == 0).all()
    left, left_mask = no_image_inputs(model, batch, mask, padding_side="left")
    assert torch.equal(left["input_ids"][left_mask], view["input_ids"][view_mask])
    assert (left["attention_mask"][:, -1] == 1).all()
    with pytest.raises(ValueError, match="response_mask marks a vision token"):
        no_image_inputs(model, batch, batch["mm_token_type_ids"] == 1)
    for side in ("LEFT", "middle"):
        with pytest.raises(ValueError, match=rf"padding_side must be one of 'left', 'right'; got '{side}'"):
            no_image_inputs(model, batch, mask, padding_side=side)


# ----------------------------------------------------------------------------- VP-diffusion and pixel noise


def alpha_bar_oracle(step):
    total = 1.0
    for s in range(step + 1):
        beta = 1 / (1 + math.exp(-(-6 + 12 * s / 999))) * (5e-3 - 1e-5) + 1e-5
        total *= 1 - beta
    return total


def test_schedules_match_formulas():
    ab = vp_alpha_bar()
    for step in (0, 1, 250, 499, 999):
        assert math.isclose(ab[step].item(), alpha_bar_oracle(step), rel_tol=1e-12)
    for progress in (0.0, 0.1, 0.5, 0.73, 1.0):
        assert dvrp_noise_step(progress) == math.floor(500 / (1 + math.exp(-10 * (0.5 - progress))))
    for step in (0, 20, 40, 45, 60, 100):
        assert noisyrollout_noise_step(step) == math.floor(500 * (1 - 1 / (1 + math.exp(-30 * (step - 40) / 60))))
    assert dvrp_noise_step(0.0) > dvrp_noise_step(1.0) and noisyrollout_noise_step(0) > noisyrollout_noise_step(60)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
        dvrp_noise_step(1.5)


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen3_vl"])
def test_vp_noise_on_pixel_values(family_name):
    processor = tiny_processor(family_name)
    batch, _ = make_batch(processor)
    layout = PixelLayout.from_processor(processor)
    pv, thw = batch["pixel_values"], batch["image_grid_thw"]
    kw = {"step": 300}
    out = assert_inputs_unchanged(
        vp_diffusion_noise_pixel_values, pv, thw, layout, generator=torch.Generator().manual_seed(1), **kw
    )
    again = vp_diffusion_noise_pixel_values(pv, thw, layout, generator=torch.Generator().manual_seed(1), **kw)
    other = vp_diffusion_noise_pixel_values(pv, thw, layout, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(out, again) and not torch.equal(out, other)
    # oracle: back to [0, 1], one normal draw per image in order, the formula, clamp, normalise
    g = torch.Generator().manual_seed(1)
    ab = alpha_bar_oracle(300)
    mean = torch.tensor(layout.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(layout.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    for got, im in zip(pixel_values_to_images(out, thw, layout), pixel_values_to_images(pv, thw, layout)):
        x01 = im.double() * std + mean
        eps = torch.randn((1, *im.shape[1:]), generator=g).double()
        expected = ((math.sqrt(ab) * x01[:1] + math.sqrt(1 - ab) * eps).clamp(0, 1) - mean) / std
        torch.testing.assert_close(got.double(), expected.expand_as(x01), rtol=0, atol=1e-5)
    images = torch.rand(2, 3, 8, 8)
    noised = assert_inputs_unchanged(vp_diffusion_noise, images, step=999, generator=torch.Generator().manual_seed(0))
    assert noised.min() >= 0 and noised.max() <= 1
    with pytest.raises(ValueError, match=r"step must be an integer in \[0, 1000\), got 1000"):
        vp_diffusion_noise(images, step=1000, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):  # checked by the annotation
        vp_diffusion_noise(images, step=1, generator=0)


@pytest.mark.parametrize("rescale_factor", [1.0, 1 / 127.5])
def test_vp_noise_is_the_same_image_noise_whatever_the_rescale_factor(rescale_factor):
    # the [0, 1] image was taken as x * std + mean, right only for rescale_factor = 1/255: without
    # rescaling (do_rescale=False) the image was clamped to one grey level
    processor = tiny_processor("qwen2_vl")
    batch, _ = make_batch(processor)
    layout = PixelLayout.from_processor(processor)
    assert layout.rescale_factor == 1 / 255
    pv, thw = batch["pixel_values"].double(), batch["image_grid_thw"]
    channels = layout.temporal_patch_size * layout.patch_size**2
    mean = torch.tensor(layout.image_mean, dtype=torch.float64).repeat_interleave(channels)
    std = torch.tensor(layout.image_std, dtype=torch.float64).repeat_interleave(channels)
    grey = (pv * std + mean) * 255  # the 0-255 image the processor saw
    other = layout._replace(rescale_factor=rescale_factor)
    pv_other = (grey * rescale_factor - mean) / std  # what a processor with that factor gives
    for step in (0, 300):
        a = vp_diffusion_noise_pixel_values(pv, thw, layout, step=step, generator=torch.Generator().manual_seed(3))
        b = vp_diffusion_noise_pixel_values(pv_other, thw, other, step=step, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close((b * std + mean) / (255 * rescale_factor), a * std + mean, rtol=0, atol=1e-12)


def test_normalised_noise():
    pv = torch.randn(16, 1176)
    out = assert_inputs_unchanged(normalised_noise_pixel_values, pv, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(pv.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, pv + 6.93 * noise)
    assert torch.equal(normalised_noise_pixel_values(pv, generator=torch.Generator().manual_seed(4), sigma=0.0), pv)


# ----------------------------------------------------------------------------- region fill


def fill_oracle(image, boxes):
    out = image.clone().double()
    _, height, width = image.shape
    for x0, y0, x1, y1 in boxes:
        xs = range(max(0, math.floor(x0)), min(width, math.ceil(x1)))
        ys = range(max(0, math.floor(y0)), min(height, math.ceil(y1)))
        if not xs or not ys:
            continue
        for c in range(image.shape[0]):
            m = sum(image[c, y, x].item() for y in ys for x in xs) / (len(xs) * len(ys))
            for y in ys:
                for x in xs:
                    out[c, y, x] = round(m) if not image.is_floating_point() else m
    return out


def test_fill_boxes_matches_oracle():
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8, generator=g)
    boxes = [[(1.5, 2, 6, 7.2), (4, 4, 11, 9), (20, 20, 30, 30)], torch.tensor([[0.0, 0.0, 12.0, 3.0]])]
    for imgs in (images, images.float() / 255):
        got = assert_inputs_unchanged(fill_boxes, imgs, boxes)
        for i in range(2):
            b = boxes[i].tolist() if isinstance(boxes[i], torch.Tensor) else boxes[i]
            torch.testing.assert_close(got[i].double(), fill_oracle(imgs[i], b), rtol=0, atol=1e-6)
        assert got.dtype == imgs.dtype
    with pytest.raises(ValueError, match=r"one list of boxes per image \(2\), got 1"):
        fill_boxes(images, boxes[:1])


def test_fill_boxes_pixel_values_equals_filling_before_the_processor(qwen2):
    _, processor = qwen2
    layout = PixelLayout.from_processor(processor)
    image = random_image(56, 56, 9)
    box = (10, 14, 40, 30)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(56, 56, 3).permute(2, 0, 1)
    filled = fill_boxes(pixels[None], [[box]])[0]
    filled_image = Image.frombytes("RGB", (56, 56), filled.permute(1, 2, 0).contiguous().numpy().tobytes())
    text = [PROMPT.format(image=IMAGE, question="what ?")]
    real = processor(images=[image], text=text, return_tensors="pt")
    expected = processor(images=[filled_image], text=text, return_tensors="pt")["pixel_values"]
    got = assert_inputs_unchanged(
        fill_boxes_pixel_values, real["pixel_values"], real["image_grid_thw"], layout, [[box]]
    )
    # the processor rounds the mean colour to uint8: at most half a grey level apart
    torch.testing.assert_close(got, expected, rtol=0, atol=0.51 / 255 / min(layout.image_std) + 1e-6)
    untouched = (got == real["pixel_values"]).all(dim=1)
    assert untouched.any() and not untouched.all()


# ----------------------------------------------------------------------------- attention views


def test_blind_view_ignores_the_image(family):
    model, processor = family
    batch, _ = make_batch(processor)
    blind = unchanged_inputs(blind_image_inputs, model, batch)
    other = dict(blind, pixel_values=torch.randn_like(batch["pixel_values"]))
    text = (batch["mm_token_type_ids"] == 0) & (batch["attention_mask"] == 1)
    with torch.no_grad():
        a, b = model(**blind).logits, model(**other).logits
        seeing = model(**batch).logits
        seeing_other = model(**dict(batch, pixel_values=other["pixel_values"])).logits
    torch.testing.assert_close(a[text], b[text], rtol=0, atol=1e-5)  # blind: the image has no effect
    assert (seeing[text] - seeing_other[text]).abs().max() > 1e-3  # without blinding it does
    base_positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(blind["position_ids"], base_positions)


def cf_oracle(weights, values, image, queries, k):
    """Loops over samples and heads, float64, the formula as written."""
    out = (weights.double() @ values.double()).clone()
    B, H, Q, K = weights.shape
    for b in range(B):
        img = [v for v in range(K) if image[b, v]]
        qs = [q for q in range(Q) if queries[b, q]]
        if not img or not qs:
            continue
        for h in range(H):
            block = [weights[b, h, q, v].item() for q in qs for v in img]
            mu = sum(block) / len(block)
            sigma = math.sqrt(sum((x - mu) ** 2 for x in block) / max(len(block) - 1, 1))
            v_mean = values[b, h, img].double().mean(0)
            for q in qs:
                for v in img:
                    a = weights[b, h, q, v].item()
                    if a > mu + k * sigma:
                        out[b, h, q] += a * (v_mean - values[b, h, v].double())
    return out


def test_counterfactual_attention_output_matches_oracle():
    g = torch.Generator().manual_seed(6)
    weights = torch.softmax(torch.randn(2, 3, 6, 6, generator=g) * 3, -1)
    values = torch.randn(2, 3, 6, 4, generator=g)
    image = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # sample 1: no image
    queries = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    for k in (0.0, 1.0, 2.0):
        got = assert_inputs_unchanged(counterfactual_attention_output, weights, values, image, queries, k=k)
        torch.testing.assert_close(got.double(), cf_oracle(weights, values, image, queries, k), rtol=0, atol=1e-6)
    same = counterfactual_attention_output(weights, values, image, queries, k=float("inf"))
    torch.testing.assert_close(same, weights @ values)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_counterfactual_hook_and_its_removal(family, padding_side):
    model, processor = family
    batch, _ = make_batch(processor, padding_side=padding_side)
    assert bool((batch["attention_mask"] == 0).any()), "the batch must be padded for this test"
    modules = [m for n, m in model.model.language_model.named_modules() if n.endswith("self_attn")]
    configs = [m.config for m in modules]
    real = (batch["attention_mask"] == 1).clone()
    with torch.no_grad():
        before = model(**batch).logits
        with counterfactual_attention(model, batch, k=float("inf")):  # nothing salient: plain eager attention
            plain = model(**batch).logits
        with counterfactual_attention(model, batch, k=1.0):
            cf = model(**batch).logits
        after = model(**batch).logits
    assert torch.equal(before, after)
    assert all(m.config is c for m, c in zip(modules, configs))
    assert not any("_vppo_counterfactual" in m.__dict__ for m in modules)
    # Left padding: padding queries attend to no key; they must not turn the sample's logits into NaN.
    assert plain.isfinite().all() and cf.isfinite().all()
    torch.testing.assert_close(plain[real], before[real], rtol=1e-4, atol=1e-4)
    image = batch["mm_token_type_ids"] == 1
    last = torch.where(image, torch.arange(image.shape[1]), -1).amax(-1, keepdim=True)
    before_image = torch.arange(image.shape[1]) < last
    torch.testing.assert_close(cf[before_image & real], before[before_image & real], rtol=1e-4, atol=1e-4)
    after_image = ~before_image & real & ~image
    assert (cf[after_image] - before[after_image]).abs().max() > 1e-3


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_counterfactual_attention_under_flash_attention_masks(qwen2, padding_side):
    # A flash-attention model builds a [batch, keys] padding mask (or None), not the 4-D causal one:
    # it broadcast against [batch, heads, queries, keys] (a crash for two rows, no causal mask for one).
    # Simulated on the CPU: SDPA attention with transformers' own flash-attention mask function.
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as error:
        pytest.skip(f"this transformers has no flash-attention mask function: {error}")
    model, processor = qwen2
    batch, _ = make_batch(processor, padding_side=padding_side)
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    padded = int((batch["attention_mask"] == 0).any(-1).nonzero()[0])  # a row with padding, alone
    one = {k: v[padded : padded + 1] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    one["pixel_values"] = batch["pixel_values"][sum(sizes[:padded]) : sum(sizes[: padded + 1])]
    one["image_grid_thw"] = batch["image_grid_thw"][padded : padded + 1]
    AttentionInterface.register("vppo_test_fa2_masks", sdpa_attention_forward)
    AttentionMaskInterface.register("vppo_test_fa2_masks", flash_attention_mask)
    original = model.config._attn_implementation
    for inputs in (batch, one):
        real = inputs["attention_mask"] == 1
        with torch.no_grad():
            before = model(**inputs).logits
            model.set_attn_implementation("vppo_test_fa2_masks")
            try:
                with counterfactual_attention(model, inputs, k=float("inf")):  # nothing salient: plain attention
                    plain = model(**inputs).logits
            finally:
                model.set_attn_implementation(original)
        assert plain.isfinite().all()
        torch.testing.assert_close(plain[real], before[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_counterfactual_attention_function_query_without_keys(mask_kind):
    """A query that may attend to no key (left padding) reads nothing, as in torch's SDPA: zeros, not NaN."""
    from vppo_core.integrations.views._counterfactual import _counterfactual_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=g, requires_grad=True) for _ in range(3))
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed[:, 0] = False  # position 0 is padding: no query attends to it, and it attends to nothing
    mask = allowed if mask_kind == "bool" else torch.zeros(4, 4).masked_fill(~allowed, float("-inf"))
    module = torch.nn.Module()
    no_image = torch.zeros(1, 4, dtype=torch.bool)
    module.__dict__["_vppo_counterfactual"] = (no_image, no_image, 2.0)
    out, weights = _counterfactual_forward(module, q, k, v, mask[None, None], scaling=1.0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)
    assert out.isfinite().all() and (weights[..., 0, :] == 0).all()
    torch.testing.assert_close(out[:, 1:], expected.transpose(1, 2)[:, 1:])
    out.backward(torch.randn(out.shape, generator=g))
    assert all(t.grad.isfinite().all() for t in (q, k, v))


def test_counterfactual_hook_restores_on_error(qwen2):
    model, processor = qwen2
    batch, _ = make_batch(processor)
    modules = [m for n, m in model.model.language_model.named_modules() if n.endswith("self_attn")]
    configs = [m.config for m in modules]
    with pytest.raises(RuntimeError, match="boom"), counterfactual_attention(model, batch):
        raise RuntimeError("boom")
    assert all(m.config is c for m, c in zip(modules, configs))
    short = {k: v[:, :5] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in batch.items()}
    with pytest.raises(ValueError, match="full forward passes only"), counterfactual_attention(model, short):
        model(**batch)


def test_visual_similarity_from_model_hidden_states(qwen2):
    from vppo_core.signals import visual_similarity

    model, processor = qwen2
    batch, mask = make_batch(processor)
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states  # embeddings + each layer
    image = batch["mm_token_type_ids"] == 1
    got = visual_similarity(states, image, mask)  # PEPO: pairwise, all layers
    last = visual_similarity(states, image, mask, layers="last", mode="prototype")  # VGPO
    for b, t in mask.nonzero().tolist():
        img = image[b].nonzero().squeeze(-1)
        pair = [
            torch.nn.functional.cosine_similarity(h[b, t - 1].double()[None], h[b, img].double()).mean() for h in states
        ]
        proto = torch.nn.functional.cosine_similarity(
            states[-1][b, t - 1].double(), states[-1][b, img].double().mean(0), 0
        )
        assert math.isclose(got[b, t].item(), sum(pair).item() / len(states), abs_tol=1e-5)
        assert math.isclose(last[b, t].item(), proto.item(), abs_tol=1e-5)
    assert (got[~mask] == 0).all()
