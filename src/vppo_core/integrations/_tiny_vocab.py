"""The tiny tokenizer's vocabulary and chat template (`vppo_core.integrations.tiny_vlm` re-exports them).

The order is the token ids' order: changing it changes every tiny model built from the tokenizer.
"""

#: The Qwen special tokens, in id order (ids 0..7 of every tiny tokenizer).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # padding (and Qwen's bos)
    "<|im_start|>",
    "<|im_end|>",  # end of a turn: the eos of generation
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)

#: Default word list: enough for synthetic visual QA about coloured shapes, digits and an answer format.
DEFAULT_WORDS: tuple[str, ...] = (
    # chat roles
    "system",
    "user",
    "assistant",
    # colours
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "grey",
    "gray",
    "pink",
    "brown",
    # shapes
    "circle",
    "circles",
    "square",
    "squares",
    "triangle",
    "triangles",
    "shape",
    "shapes",
    "star",
    "dot",
    "dots",
    # digits
    *(str(d) for d in range(10)),
    # question words
    "how",
    "many",
    "what",
    "which",
    "where",
    "colour",
    "color",
    "is",
    "are",
    "the",
    "a",
    "an",
    "of",
    "in",
    "on",
    "there",
    "image",
    "picture",
    "count",
    "number",
    "left",
    "right",
    "top",
    "bottom",
    "big",
    "small",
    "and",
    "or",
    "not",
    "yes",
    "no",
    "none",
    # answer format
    "answer",
    "think",
    "so",
    "i",
    "see",
    "<answer>",
    "</answer>",
    # punctuation
    "?",
    ":",
    ".",
    ",",
    "!",
)

#: A Qwen-style chat template: ``<|im_start|>role\n ... <|im_end|>\n`` with the image placeholder.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
