"""Tiny Qwen-VL models, tokenizer and processor built from configs: no download, CPU-friendly.

Everything here is built locally, from configuration objects, so tests, examples and the demo run
offline in seconds. The models are real ``transformers`` architectures (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL ``*ForConditionalGeneration``: vision tower, merger, M-RoPE decoder) at toy width (text
hidden 64, 2 layers; vision depth 2), with random weights. The tokenizer is a word-level
``tokenizers`` model over a small English vocabulary that can express a synthetic visual-QA task
("how many red shapes ?", "what colour is the circle ?", "answer : 3"), plus the Qwen special tokens.
The processor pairs it with ``Qwen2VLImageProcessorPil`` (needs only Pillow, not torchvision) and
expands each ``<|image_pad|>`` into one token per merged vision patch, as Qwen's processors do.

Requires the ``hf`` extra (``transformers`` 5.10 or newer, ``tokenizers``, ``pillow``); with an older
transformers the import raises ``ImportError`` naming the version found.

Example:
    >>> from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl
    >>> processor = tiny_processor("qwen2_vl")
    >>> model = tiny_qwen_vl("qwen2_vl", processor.tokenizer)
    >>> model.config.text_config.hidden_size
    64
"""

import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
import transformers
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

TRANSFORMERS_MIN = (5, 10)


def _check_transformers(version: str) -> None:
    """Raise ``ImportError`` if transformers ``version`` is older than the tiny processor needs."""
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release < TRANSFORMERS_MIN:
        need = ".".join(map(str, TRANSFORMERS_MIN))
        raise ImportError(
            f"vppo_core.integrations.tiny_vlm needs transformers >= {need} (its processor expands image "
            f"placeholders through ProcessorMixin.replace_image_token, added in {need}, and uses the Pillow "
            f"Qwen2-VL image processor), got transformers {version}; pip install 'transformers>={need}'"
        )


_check_transformers(transformers.__version__)

from transformers import (  # noqa: E402  (after the version check, which names what is missing)
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from ._tiny_vocab import DEFAULT_WORDS, SPECIAL_TOKENS, TINY_CHAT_TEMPLATE  # noqa: E402

__all__ = [
    "DEFAULT_WORDS",
    "FAMILIES",
    "SPECIAL_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "Family",
    "TinyQwenVLProcessor",
    "tiny_image_processor",
    "tiny_processor",
    "tiny_qwen_vl",
    "tiny_qwen_vl_config",
    "tiny_tokenizer",
]

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FAMILIES: tuple[Family, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# The family's real ViT patch and normalisation (Qwen3-VL: 16 px, mean = std = 0.5).
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"patch_size": 14, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
    "qwen2_5_vl": {"patch_size": 14, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
    "qwen3_vl": {"patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))}; got {family!r}")


def tiny_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` plus the Qwen special tokens.

    Text is lower-cased, split on whitespace and punctuation, and numbers are split into single
    digits; a word outside the list becomes ``<unk>``. Ids: the `SPECIAL_TOKENS` first
    (``<|endoftext|>`` = 0 is the padding token, ``<|im_end|>`` = 2 the eos), then ``words`` in order
    (duplicates dropped). Decoding joins tokens with spaces. Padding side is ``"left"`` (what
    ``generate`` wants); set ``tokenizer.padding_side = "right"`` for training batches if you prefer.

    Args:
        words: The vocabulary besides the special tokens, each a lower-case word, a digit or a
            punctuation mark (a string the pre-tokenizer keeps whole).

    Returns:
        A ``PreTrainedTokenizerFast``, saveable with ``save_pretrained`` and loadable with
        ``AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: If a word is empty, contains whitespace, or is a special token.

    Example:
        >>> tok = tiny_tokenizer()
        >>> tok.decode(tok("How many red shapes? answer: 12")["input_ids"])
        'how many red shapes ? answer : 1 2'
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not word or any(c.isspace() for c in word) or word in SPECIAL_TOKENS:
            raise ValueError(f"words must be non-empty strings without whitespace and not special tokens, got {word!r}")
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            # "<answer>"-style tags whole, then single digits, single punctuation marks, letter runs
            pre_tokenizers.Split(Regex(r"</?\w+>|\d|[^\w\s]|[^\W\d]+"), behavior="isolated"),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token=None,
        padding_side="left",
    )
    # Special tokens are matched before normalisation and pre-tokenisation, and never split.
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:7])})
    return tokenizer


def tiny_image_processor(
    family: Family = "qwen2_vl", *, min_pixels: int | None = None, max_pixels: int = 112 * 112
) -> Qwen2VLImageProcessorPil:
    """The family's image processor (Pillow backend) with small pixel limits.

    Qwen2-VL and Qwen2.5-VL: 14 px patches, CLIP mean/std; Qwen3-VL: 16 px patches, mean = std = 0.5;
    all merge 2x2 patches into one token and repeat each image twice along time (temporal patch 2).
    Images are resized (bicubic) so both sides are multiples of ``2 * patch`` and the area lies in
    ``[min_pixels, max_pixels]``; an image that already satisfies this keeps its size.

    Args:
        family: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``.
        min_pixels: Smallest image area after resizing; default one merged token, ``(2 * patch)**2``.
        max_pixels: Largest image area after resizing (default 112 x 112: at most 16 or 12 tokens).

    Returns:
        A ``Qwen2VLImageProcessorPil``.

    Example:
        >>> tiny_image_processor("qwen3_vl").patch_size
        16
    """
    _check_family(family)
    vision = _VISION_DEFAULTS[family]
    factor = 2 * vision["patch_size"]
    return Qwen2VLImageProcessorPil(
        patch_size=vision["patch_size"],
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(vision["image_mean"]),
        image_std=list(vision["image_std"]),
        size={"shortest_edge": factor * factor if min_pixels is None else min_pixels, "longest_edge": max_pixels},
    )


class TinyQwenVLProcessor(ProcessorMixin):
    """A Qwen-VL processor for images only: an image processor, a tokenizer and a chat template.

    Calling it with ``images=`` and ``text=`` (each text holding one ``<|image_pad|>`` per image)
    expands every ``<|image_pad|>`` into ``t*h*w / merge**2`` copies and returns ``input_ids``,
    ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids`` (0 text,
    1 image), which transformers 5 needs for Qwen-VL M-RoPE. ``Qwen2VLProcessor`` itself cannot be
    built without a video processor, which needs torchvision; this class is otherwise the same.
    ``save_pretrained`` / ``TinyQwenVLProcessor.from_pretrained`` round-trip.
    """

    return_mm_token_type_ids = True

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        # The class attribute above is how transformers >= 5.2x turns the ids on; earlier 5.x releases
        # (5.17, and 5.10 which verl pins) read only a call argument, and their models then refuse an
        # image batch without the ids. Passing the argument works with both.
        kwargs.setdefault("return_mm_token_type_ids", True)
        return super().__call__(images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        merge_length = self.image_processor.merge_size**2
        num_image_tokens = int(image_inputs["image_grid_thw"][image_idx].prod()) // merge_length
        return self.image_token * num_image_tokens

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "mm_token_type_ids"]


def tiny_processor(
    family: Family = "qwen2_vl",
    *,
    words: Sequence[str] = DEFAULT_WORDS,
    min_pixels: int | None = None,
    max_pixels: int = 112 * 112,
) -> TinyQwenVLProcessor:
    """A processor for a tiny Qwen-VL model: `tiny_image_processor` + `tiny_tokenizer`.

    Args:
        family: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"`` (sets patch size and normalisation).
        words: The tokenizer's vocabulary besides the special tokens.
        min_pixels: See `tiny_image_processor`.
        max_pixels: See `tiny_image_processor`.

    Returns:
        A `TinyQwenVLProcessor` with `TINY_CHAT_TEMPLATE`.

    Example:
        >>> from PIL import Image
        >>> processor = tiny_processor("qwen2_vl")
        >>> text = "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>how many circles ?<|im_end|>\\n"
        >>> batch = processor(images=[Image.new("RGB", (56, 56))], text=[text], return_tensors="pt")
        >>> batch["pixel_values"].shape, batch["image_grid_thw"].tolist()
        (torch.Size([16, 1176]), [[1, 4, 4]])
        >>> int(batch["mm_token_type_ids"].sum())  # 4 x 4 patches merged 2 x 2
        4
    """
    return TinyQwenVLProcessor(
        image_processor=tiny_image_processor(family, min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tiny_tokenizer(words),
        chat_template=TINY_CHAT_TEMPLATE,
    )


def tiny_qwen_vl_config(
    family: Family,
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_depth: int = 2,
    tie_word_embeddings: bool = False,
) -> PretrainedConfig:
    """The configuration of a tiny Qwen-VL model whose vocabulary and special ids match ``tokenizer``.

    Text: ``hidden_size`` wide (64), ``num_layers`` layers, attention heads of 16 (``hidden_size // 16``
    of them; 2 KV heads, 1 if the head count is odd), MLP ``2 * hidden_size``, M-RoPE sections
    ``[2, 3, 3]`` (interleaved for Qwen3-VL). Vision: ``vision_depth`` blocks, width 32, 2 heads, the
    family's patch size (14; Qwen3-VL 16), 2x2 merge to the text width; Qwen2.5-VL adds window
    attention (window 56, last block full), Qwen3-VL 64 learned position embeddings and a deepstack
    tap at block 0.

    Args:
        family: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``.
        tokenizer: Supplies ``vocab_size`` and the image / video / vision-start / vision-end /
            pad / eos ids.
        hidden_size: Text width, a positive multiple of 16 (M-RoPE sections ``[2, 3, 3]`` fix the
            head size at 16).
        num_layers: Text decoder layers.
        vision_depth: Vision transformer blocks.
        tie_word_embeddings: Share the input embedding and the output projection.

    Returns:
        A ``Qwen2VLConfig``, ``Qwen2_5_VLConfig`` or ``Qwen3VLConfig``.

    Raises:
        ValueError: If ``family`` is unknown or ``hidden_size`` is not a positive multiple of 16.

    Example:
        >>> config = tiny_qwen_vl_config("qwen3_vl", tiny_tokenizer(), hidden_size=128)
        >>> config.text_config.num_attention_heads, config.text_config.head_dim
        (8, 16)
    """
    _check_family(family)
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 16 or hidden_size % 16:
        raise ValueError(
            "hidden_size must be a positive multiple of 16 (heads of 16 fit mrope_section [2, 3, 3]), "
            f"got {hidden_size!r}"
        )
    heads = hidden_size // 16
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2 if heads % 2 == 0 else 1,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": tie_word_embeddings,
    }
    special = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": tie_word_embeddings,
    }
    if family == "qwen2_vl":
        vision = {
            "depth": vision_depth,
            "embed_dim": 32,
            "hidden_size": hidden_size,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
        }
        return Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    if family == "qwen2_5_vl":
        vision = {
            "depth": vision_depth,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": hidden_size,
            "num_heads": 2,
            "patch_size": 14,
            "window_size": 56,
            "fullatt_block_indexes": [vision_depth - 1],
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    text["head_dim"] = 16
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = {
        "depth": vision_depth,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": hidden_size,
        "num_heads": 2,
        "patch_size": 16,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, **special)


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}


def tiny_qwen_vl(
    family: Family,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_depth: int = 2,
) -> PreTrainedModel:
    """A randomly initialised tiny Qwen-VL ``*ForConditionalGeneration`` (~0.2 M parameters by default).

    Initialisation is reproducible: it runs under ``torch.random.fork_rng`` seeded with ``seed``,
    so the caller's global RNG state is untouched. The generation config gets the tokenizer's eos
    (``<|im_end|>``) and pad (``<|endoftext|>``) ids, and suppresses the vision tokens
    (``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``): a random model
    would otherwise sample them, and a response holding an ``<|image_pad|>`` cannot be scored (the
    model would look for one more image). The model is returned in ``eval()`` mode
    (there is no dropout at this size; call ``train()`` if you rely on the flag).

    Args:
        family: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``.
        tokenizer: The tokenizer the model will read (default `tiny_tokenizer`).
        seed: Seed of the weight initialisation.
        dtype: Parameter dtype (float32 or bfloat16 are tested).
        tie_word_embeddings: Share the input embedding and the output projection.
        hidden_size: Text width, a positive multiple of 16.
        num_layers: Text decoder layers.
        vision_depth: Vision transformer blocks.

    Returns:
        The model, on the CPU.

    Example:
        >>> model = tiny_qwen_vl("qwen2_5_vl")
        >>> type(model).__name__
        'Qwen2_5_VLForConditionalGeneration'
    """
    tokenizer = tiny_tokenizer() if tokenizer is None else tokenizer
    config = tiny_qwen_vl_config(
        family,
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        vision_depth=vision_depth,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family](config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.pad_token_id
    # A sampled image placeholder would make the next forward expect another image.
    model.generation_config.suppress_tokens = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[3:7]]
    return model.to(dtype).eval()
