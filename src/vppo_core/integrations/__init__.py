"""Integrations with model libraries, each an optional extra; importing this package imports none of them.

- `vppo_core.integrations.transformers` (extra ``hf``): per-token log-probabilities and visual
  dependency from a Hugging Face vision-language model.
- `vppo_core.integrations.tiny_vlm` (extra ``hf``): tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models,
  tokenizer and processor built from configs, for tests, examples and the demo.
- `vppo_core.integrations.views` (extra ``hf``): view builders for the family (no image, diffusion
  noise, normalised-pixel noise, box fill, blinded attention, counterfactual attention).
- `vppo_core.integrations.trl` (extra ``trl``): `VPPOTrainer`, TRL's ``GRPOTrainer`` turned into VPPO.
"""
