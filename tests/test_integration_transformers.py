"""vppo_core.integrations.transformers on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models built from configs.

Every model, tokenizer and processor goes through save_pretrained / from_pretrained (a tmp folder) first,
so the real loading code is exercised. The oracle is the plain recipe: two full forward passes to
[batch, seq, vocab] logits, log_softmax in float64, gather at the next token, and the float64 KL.
"""

import copy
import re

import pytest
import torch

from .helpers import require_transformers

transformers = require_transformers()
Image = pytest.importorskip("PIL.Image")

from vppo_core.integrations.tiny_vlm import (  # noqa: E402
    FAMILIES,
    TinyQwenVLProcessor,
    tiny_processor,
    tiny_qwen_vl,
)
from vppo_core.integrations.transformers import (  # noqa: E402
    TokenDependency,
    response_mask_from_prompt_lengths,
    rollout_inputs,
    token_dependency,
    token_logprobs,
)
from vppo_core.perturb import PixelLayout, blacken_patches_pixel_values  # noqa: E402

from .helpers import assert_inputs_unchanged  # noqa: E402

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
SAMPLES = [  # (question, response, image size in ViT patches (w, h))
    ("how many red circles ?", "i see 2 red circles so <answer> 2 </answer><|im_end|>", (4, 4)),
    ("what colour is the square ?", "<answer> blue </answer><|im_end|>", (6, 2)),
    ("is there a star ?", "no<|im_end|>", (2, 6)),
]


def random_image(width: int, height: int, seed: int) -> "Image.Image":
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)
    return Image.frombytes("RGB", (width, height), data.numpy().tobytes())


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(model, processor) of one family after a save_pretrained / from_pretrained round trip."""
    family = request.param
    processor = tiny_processor(family)
    # Qwen2-VL with tied embeddings, the others untied
    model = tiny_qwen_vl(family, processor.tokenizer, seed=1, tie_word_embeddings=family == "qwen2_vl")
    with torch.no_grad():  # larger weights than the default init, so the image matters visibly
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(6.0)
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    loaded_model = transformers.AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    loaded_processor = TinyQwenVLProcessor.from_pretrained(folder, local_files_only=True)
    assert type(loaded_model) is type(model)
    assert type(loaded_processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    for (name, a), b in zip(model.state_dict().items(), loaded_model.state_dict().values()):
        assert torch.equal(a, b), name
    tied = loaded_model.get_output_embeddings().weight is loaded_model.get_input_embeddings().weight
    assert tied == (family == "qwen2_vl")
    assert PixelLayout.from_processor(loaded_processor) == PixelLayout.from_processor(processor)
    return loaded_model, loaded_processor


def make_batch(
    processor: TinyQwenVLProcessor, side: str, samples: list = SAMPLES, first_seed: int = 0
) -> tuple[dict, torch.Tensor]:
    """Processor output for whole prompt + response texts, and the response mask from the prompt lengths."""
    patch = processor.image_processor.patch_size
    images = [random_image(w * patch, h * patch, seed=first_seed + i) for i, (_, _, (w, h)) in enumerate(samples)]
    prompts = [PROMPT.format(question=q) for q, _, _ in samples]
    processor.tokenizer.padding_side = side
    batch = processor(
        images=images, text=[p + r for p, (_, r, _) in zip(prompts, samples)], return_tensors="pt", padding=True
    )
    lengths = torch.tensor([len(processor(images=[im], text=[p])["input_ids"][0]) for im, p in zip(images, prompts)])
    return dict(batch), response_mask_from_prompt_lengths(batch["attention_mask"], lengths)


def perturb(batch: dict, processor: TinyQwenVLProcessor, seed: int = 0) -> torch.Tensor:
    layout = PixelLayout.from_processor(processor)
    g = torch.Generator().manual_seed(seed)
    return blacken_patches_pixel_values(batch["pixel_values"], batch["image_grid_thw"], layout, generator=g)


def oracle(model, batch: dict, perturbed: torch.Tensor, mask: torch.Tensor, temperature: float) -> TokenDependency:
    with torch.no_grad():
        x = model(**batch).logits.double() / temperature
        y = model(**{**batch, "pixel_values": perturbed}).logits.double() / temperature
    lx, ly = x.log_softmax(-1), y.log_softmax(-1)
    nxt = batch["input_ids"][:, 1:].unsqueeze(-1)
    kl = (lx.exp() * (lx - ly)).sum(-1)

    def align(v: torch.Tensor) -> torch.Tensor:  # position t-1 predicts token t
        out = torch.zeros(mask.shape, dtype=torch.float64)
        out[:, 1:] = v
        return torch.where(mask, out, 0.0)

    return TokenDependency(
        align(lx[:, :-1].gather(-1, nxt).squeeze(-1)),
        align(ly[:, :-1].gather(-1, nxt).squeeze(-1)),
        align(kl[:, :-1]),
    )


def assert_close_to(out: TokenDependency, ref: TokenDependency, atol: float) -> None:
    for name, a, b in zip(TokenDependency._fields, out, ref):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=0, msg=name)


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_dependency_matches_two_forward_oracle(loaded: tuple, side: str, temperature: float) -> None:
    model, processor = loaded
    batch, mask = make_batch(processor, side)
    assert int(mask.sum()) == 10 + 4 + 2  # response tokens, <|im_end|> included
    perturbed = perturb(batch, processor)
    before = {k: v.clone() for k, v in batch.items()}
    with torch.no_grad():
        out = assert_inputs_unchanged(token_dependency, model, batch, perturbed, mask, temperature=temperature)
    assert all(torch.equal(batch[k], v) for k, v in before.items())
    ref = oracle(model, batch, perturbed, mask, temperature)
    assert_close_to(out, ref, atol=2e-5)
    assert float(ref.dependency.max()) > 1e-3  # the test is not vacuous: the image matters
    assert bool((out.dependency >= 0).all()) and bool((out.logprobs <= 0).all())
    # the single-pass helper gives the same log-probabilities
    with torch.no_grad():
        lp = token_logprobs(model, batch, mask, temperature=temperature)
    torch.testing.assert_close(lp, out.logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(loaded: tuple, side: str) -> None:
    """Each row scored inside a padded batch equals the row scored alone (no padding at all)."""
    model, processor = loaded
    batch, mask = make_batch(processor, side)
    perturbed = perturb(batch, processor)
    with torch.no_grad():
        out = token_dependency(model, batch, perturbed, mask, temperature=0.8)
    sizes = batch["image_grid_thw"].prod(dim=1).tolist()
    start = 0
    for i, n in enumerate(sizes):
        alone, alone_mask = make_batch(processor, side, SAMPLES[i : i + 1], first_seed=i)
        rows = slice(start, start + n)
        assert torch.equal(alone["pixel_values"], batch["pixel_values"][rows])
        with torch.no_grad():
            single = token_dependency(model, alone, perturbed[rows], alone_mask, temperature=0.8)
        real = batch["attention_mask"][i].bool()
        for a, b in zip(single, out):
            torch.testing.assert_close(a[0], b[i][real], atol=2e-5, rtol=0)
        start += n


def test_gradient_flows_from_real_pass_only(loaded: tuple) -> None:
    model, processor = loaded
    batch, mask = make_batch(processor, "left")
    perturbed = perturb(batch, processor, seed=3)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))

    model.zero_grad()
    out = token_dependency(model, batch, perturbed, mask, temperature=0.7)
    assert out.logprobs.requires_grad
    assert not out.logprobs_perturbed.requires_grad and not out.dependency.requires_grad
    (out.logprobs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logits = model(**batch).logits.float() / 0.7
    lp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    (torch.where(mask[:, 1:], lp, 0.0) * weights[:, 1:]).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    assert grads.keys() == expected.keys()
    assert any("visual" in n for n in grads)  # the real image's vision tower gets gradient
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_unperturbed_image_gives_zero_dependency_and_empty_mask_works(loaded: tuple) -> None:
    model, processor = loaded
    batch, mask = make_batch(processor, "right")
    with torch.no_grad():
        out = token_dependency(model, batch, batch["pixel_values"].clone(), mask)
        empty = token_dependency(model, batch, batch["pixel_values"], torch.zeros_like(mask))
    torch.testing.assert_close(out.logprobs_perturbed, out.logprobs, atol=1e-6, rtol=0)
    assert float(out.dependency.abs().max()) < 1e-6
    assert all(t.shape == mask.shape and not t.any() for t in empty)


def test_missing_mm_token_type_ids_are_rebuilt(loaded: tuple) -> None:
    model, processor = loaded
    batch, mask = make_batch(processor, "left")
    perturbed = perturb(batch, processor)
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        a = token_dependency(model, batch, perturbed, mask)
        b = token_dependency(model, without, perturbed, mask)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_rollout_inputs_from_generate(loaded: tuple) -> None:
    model, processor = loaded
    patch = processor.image_processor.patch_size
    images = [random_image(4 * patch, 4 * patch, seed=s) for s in range(3)]
    processor.tokenizer.padding_side = "left"
    prompts = [PROMPT.format(question=q) for q in ("how many circles ?", "what colour ?", "is it red ?")]
    prompt_inputs = dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sequences = model.generate(**prompt_inputs, max_new_tokens=6, do_sample=True, temperature=0.9)
    inputs, mask = rollout_inputs(prompt_inputs, sequences, eos_token_id=processor.tokenizer.eos_token_id)
    width = prompt_inputs["input_ids"].shape[1]
    assert inputs["input_ids"] is sequences and not mask[:, :width].any() and mask[:, width].all()
    assert inputs["mm_token_type_ids"].shape == sequences.shape
    assert int(inputs["mm_token_type_ids"][:, width:].abs().sum()) == 0
    assert torch.equal(inputs["attention_mask"][:, width:].bool(), mask[:, width:])
    perturbed = blacken_patches_pixel_values(
        inputs["pixel_values"], inputs["image_grid_thw"], PixelLayout.from_processor(processor), generator=g
    )
    with torch.no_grad():
        out = token_dependency(model, inputs, perturbed, mask, temperature=0.9)
    assert_close_to(out, oracle(model, inputs, perturbed, mask, 0.9), atol=2e-5)


def test_biased_head_and_bf16(loaded: tuple) -> None:
    model, processor = loaded
    batch, mask = make_batch(processor, "right")
    perturbed = perturb(batch, processor)
    head = model.lm_head  # (tied for Qwen2-VL: swapping it only unties the forward, restored below)
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.randn(head.out_features, generator=torch.Generator().manual_seed(0)))
    try:
        model.lm_head = biased
        with torch.no_grad():
            out = token_dependency(model, batch, perturbed, mask, chunk_size=5)
        assert_close_to(out, oracle(model, batch, perturbed, mask, 1.0), atol=2e-5)
    finally:
        model.lm_head = head

    half = copy.deepcopy(model).to(torch.bfloat16)  # the fixture's model stays float32
    half_batch = {**batch, "pixel_values": batch["pixel_values"].bfloat16()}
    with torch.no_grad():
        out = token_dependency(half, half_batch, perturbed.bfloat16(), mask, temperature=0.7)
    # float32 results from bf16 logits: the oracle rounds its logits the same way, up to matmul order
    assert_close_to(out, oracle(half, half_batch, perturbed.bfloat16(), mask, 0.7), atol=3e-2)


def test_tiny_builders() -> None:
    state = torch.get_rng_state()
    a, b = tiny_qwen_vl("qwen2_5_vl", seed=3), tiny_qwen_vl("qwen2_5_vl", seed=3)
    assert torch.equal(state, torch.get_rng_state())  # seeded under fork_rng
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, tiny_qwen_vl("qwen2_5_vl", seed=4).lm_head.weight)
    tok = tiny_processor(words=("red", "blue", "?")).tokenizer
    assert len(tok) == 8 + 3
    assert tok.decode(tok("Red or BLUE?")["input_ids"]) == "red <unk> blue ?"
    with pytest.raises(ValueError, match="words must be non-empty strings without whitespace"):
        tiny_processor(words=("two words",))
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_qwen_vl("llava")


def test_response_mask_from_prompt_lengths() -> None:
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask_from_prompt_lengths(am, torch.tensor([1, 1, 5])), expected)
    assert torch.equal(response_mask_from_prompt_lengths(am.bool(), 1)[0], expected[0])
    with pytest.raises(ValueError, match="prompt_lengths must be integers >= 1"):
        response_mask_from_prompt_lengths(am, torch.tensor([0, 1, 1]))


def test_errors(loaded: tuple) -> None:
    model, processor = loaded
    batch, mask = make_batch(processor, "left")
    perturbed = perturb(batch, processor)
    bad = mask.clone()
    bad[:, 0] = True
    with pytest.raises(ValueError, match="response_mask marks position 0"):
        token_dependency(model, batch, perturbed, bad)
    right, right_mask = make_batch(processor, "right")
    with pytest.raises(ValueError, match="response_mask marks padding"):
        token_logprobs(model, right, right_mask | (right["attention_mask"] == 0))
    with pytest.raises(ValueError, match=r"response_mask must have the shape of inputs\['input_ids'\]"):
        token_logprobs(model, batch, mask[:, 1:])
    with pytest.raises(ValueError, match="perturbed_pixel_values must have the shape"):
        token_dependency(model, batch, perturbed[1:], mask)
    with pytest.raises(ValueError, match="inputs must contain the real 'pixel_values'"):
        token_dependency(model, {k: v for k, v in batch.items() if k != "pixel_values"}, perturbed, mask)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        token_logprobs(model, batch, mask, temperature=0.0)
    with pytest.raises(ValueError, match="sequences must start with prompt_inputs"):
        rollout_inputs(batch, torch.cat([batch["input_ids"].flip(1), batch["input_ids"]], dim=1), eos_token_id=2)


@pytest.mark.parametrize("version", ["5.10.0", "5.10.4", "5.24.0", "6.0.0.dev0", "5.10.0rc1"])
def test_transformers_version_check_accepts(version: str) -> None:
    from vppo_core.integrations.tiny_vlm import _check_transformers

    _check_transformers(version)


@pytest.mark.parametrize("version", ["5.9.0", "5.0.0", "4.57.6", "5.4.0.dev0"])
def test_transformers_version_check_names_what_it_found(version: str) -> None:
    from vppo_core.integrations.tiny_vlm import _check_transformers

    with pytest.raises(ImportError, match=rf"needs transformers >= 5\.10 .*got transformers {re.escape(version)}"):
        _check_transformers(version)


def test_processor_returns_mm_token_type_ids_unless_told_not_to() -> None:
    """The ids are asked for as a call argument too (transformers 5.10-5.17 read only that)."""
    processor = tiny_processor("qwen2_vl")
    patch = processor.image_processor.patch_size
    text = [PROMPT.format(question="what colour ?")]
    image = Image.new("RGB", (4 * patch, 4 * patch))
    out = processor(images=[image], text=text, return_tensors="pt")
    image_tokens = out["input_ids"] == processor.image_token_id
    assert image_tokens.sum() == 4 and torch.equal(out["mm_token_type_ids"] == 1, image_tokens)
    assert "mm_token_type_ids" not in processor(
        images=[image], text=text, return_tensors="pt", return_mm_token_type_ids=False
    )


# ------------------------------------------------------------------ the chunked head with gradient


def test_chunked_logprobs_with_grad_save_no_logits_for_the_backward():
    # logsumexp saves its input: without checkpointing, every chunk's [chunk, vocab] logits were
    # kept for the backward, so chunking saved no memory in the update (136 MiB saved here)
    from vppo_core.integrations.transformers import _logprobs

    tokens, hidden_size, vocab, chunk = 1024, 64, 32_768, 64  # all logits: 128 MiB; a chunk: 8 MiB
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=g) * 0.1)
    hidden = torch.randn(tokens, hidden_size, generator=g).requires_grad_()
    targets = torch.randint(vocab, (tokens,), generator=g)
    up = torch.randn(tokens, generator=g)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _logprobs(hidden, head, targets, 0.7, chunk)
    assert sum(saved.values()) < chunk * vocab * 4, f"{sum(saved.values()) / 2**20:.1f} MiB saved for the backward"
    (out * up).sum().backward()
    # the gradients (recomputed chunk by chunk) are those of the plain float64 formula
    h64, w64 = hidden.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    logits = h64 @ w64.T / 0.7
    ((logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)) * up.double()).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
