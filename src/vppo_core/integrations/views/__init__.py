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

from ._boxes import fill_boxes, fill_boxes_pixel_values
from ._counterfactual import counterfactual_attention, counterfactual_attention_output
from ._inputs import blind_image_inputs, move_response_values, no_image_inputs
from ._noise import (
    dvrp_noise_step,
    noisyrollout_noise_step,
    normalised_noise_pixel_values,
    vp_alpha_bar,
    vp_diffusion_noise,
    vp_diffusion_noise_pixel_values,
)

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
