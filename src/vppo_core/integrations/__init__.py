"""Integrations with model libraries, each an optional extra; importing this package imports none of them.

- :mod:`vppo_core.integrations.transformers` (extra ``hf``): per-token log-probabilities and visual
  dependency from a Hugging Face vision-language model.
- :mod:`vppo_core.integrations.tiny_vlm` (extra ``hf``): tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models,
  tokenizer and processor built from configs, for tests, examples and the demo.
"""
