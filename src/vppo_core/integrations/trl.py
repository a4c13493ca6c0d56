r"""VPPO inside TRL's ``GRPOTrainer``: `VPPOTrainer`, a subclass that swaps in VPPO's blocks.

`VPPOTrainer` keeps everything TRL does (sampling, rewards, GRPO advantages, batching,
gradient accumulation, logging, vLLM or ``generate``) and changes two stages:

1. **Per generation batch** (TRL's ``_generate_and_score_completions``, once per
   ``steps_per_generation * num_iterations`` steps, under ``no_grad``, with the policy that sampled
   the completions): perturb the images (random patch blackening by default), run the model on
   the real and the perturbed images, get each completion token's visual dependency $S_t$
   (``vppo_core.integrations.transformers.token_dependency``: the exact KL of VPPO's Eq. 3; or the
   VPPO-RL code's sampled $k_3$ estimate), then

   - TAS: multiply TRL's advantages by [`advantage_factors`][vppo_core.advantage_factors]. Its min, max and mean are
     **batch-level statistics**: they are taken over this generation batch, and with several
     processes over the *global* generation batch (``process_group="world"``: every rank's
     completions), so the factors do not depend on how TRL shards the batch;
   - TGF: [`token_filter_mask`][vppo_core.token_filter_mask] keeps each completion's top-``k`` tokens by $S_t$;
   - the loss denominator: [`loss_denominators`][vppo_core.loss_denominators] counts the valid tokens of the
     global generation batch (divided by the number of processes, which DDP/FSDP/DeepSpeed average).

   These go into the batch TRL buffers (keys ``vppo_dependency``, ``vppo_token_mask``,
   ``vppo_tas_factors``, ``vppo_num_tokens``; ``advantages`` is replaced by the shaped one), and TRL
   shuffles and splits them into micro-batches with the rest.
2. **Per micro-batch** (TRL's ``_compute_loss``): the current log-probabilities from TRL's own
   forward pass, then [`vppo_loss`][vppo_core.vppo_loss] with the TGF mask and
   ``num_tokens`` = the global count times ``gradient_accumulation_steps / steps_per_generation``,
   which is TRL's ``loss_type="dapo"`` normalisation: with one optimizer step per generation batch
   (``steps_per_generation == gradient_accumulation_steps``, TRL's default) the micro-batch losses of
   the step add up to VPPO's token mean over all valid tokens of the step (kept or not), on one
   process or many; with more steps per generation batch each step divides by the batch's average
   count per step, as TRL's ``"dapo"`` does.

The dependency is computed with the rollout (old) policy once per generation batch, as in the paper
and the VPPO-RL code, not per micro-batch with the current policy.

Written against TRL 1.16 (``trl>=1.16,<2``; tested with 1.16.0 and transformers 5.24). It relies on
these ``GRPOTrainer`` internals, which a TRL release may change:

- ``_generate_and_score_completions(inputs) -> dict`` returns ``prompt_ids``, ``prompt_mask``,
  ``completion_ids``, ``completion_mask`` (right-padded), optional ``tool_mask``, ``advantages``
  ``[batch]`` (this process's slice), optional ``old_per_token_logps`` / ``ref_per_token_logps`` /
  ``importance_sampling_ratio``, and the vision inputs (``pixel_values``, ``image_grid_thw``,
  ``num_images``, ``mm_token_type_ids``, ...); ``_prepare_inputs`` shuffles and splits every
  ``[batch, ...]`` tensor of that dict and passes 0-d tensors through unchanged;
- ``_compute_loss(model, inputs)`` returns the micro-batch loss already scaled for gradient
  accumulation (``loss_is_scaled_for_ga = True``);
- ``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)``
  returns ``[batch, completion]`` log-probabilities at the sampling temperature;
- ``self._metrics[mode]`` (lists of floats averaged by ``log``), ``epsilon_low``, ``epsilon_high``,
  ``beta``, ``temperature``, ``accelerator``, ``current_gradient_accumulation_steps``.

Not supported (the constructor raises): ``loss_type`` other than ``"dapo"``, sequence-level
importance sampling, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, ``delta``, TRL's
entropy bonus (use ``nll_coef``), a MoE router auxiliary loss, and ``beta > 0`` with
``use_bias_correction_kl`` (``True`` by default in TRL: set it to ``False`` for a KL term). vLLM's
importance-sampling correction is applied as a weight on each kept token, as TRL applies it to each
token.

With ``dependency="kl"`` the scoring pass reads the output embedding directly, so it needs the full
parameters on each process (single device, DDP, DeepSpeed ZeRO-1/2); with FSDP or ZeRO-3 use
``dependency="sampled"``, which runs TRL's own forward pass. The ``"kl"`` pass runs in the model's own
dtype, outside the autocast that TRL's passes run under (``GRPOConfig`` defaults to ``bf16=True``).

Requires the ``trl`` extra (``trl``, with ``transformers``). Without TRL this module still imports,
and constructing `VPPOTrainer` raises ``ImportError``.
"""

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor

from .._checks import check_choice, check_fraction
from ..advantages import _check_betas, advantage_factors
from ..dependency import sampled_visual_dependency
from ..distributed import loss_denominators
from ..loss import LossOutput, vppo_loss
from ..masking import token_filter_mask
from ..perturb import PixelLayout, blacken_patches_pixel_values
from .transformers import token_dependency

try:
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer

    _TRL_IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # keep the module importable (docs, doctest collection) without TRL
    GRPOTrainer = object  # type: ignore[assignment,misc]
    _TRL_IMPORT_ERROR = error

__all__ = ["Perturbation", "VPPOTrainer"]

Perturbation = Callable[[Tensor, "Tensor | None", torch.Generator], Tensor]
"""``perturb(pixel_values, image_grid_thw, generator) -> perturbed pixel_values`` (same shape)."""

# The vision inputs TRL passes to `_get_per_token_logps_and_entropies` (TRL 1.16).
_VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode (no dropout) inside, each module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _loss_mask(batch: dict[str, Any]) -> Tensor:
    mask = batch["completion_mask"]
    return mask if "tool_mask" not in batch else mask * batch["tool_mask"]


def _row_chunks(batch: dict[str, Any], perturbed: Tensor, size: int) -> Iterator[tuple[slice, dict[str, Any], Tensor]]:
    """Split a Qwen-style batch into chunks of ``size`` rows, each with its rows' images (real and perturbed)."""
    grid = batch["image_grid_thw"]
    image_start = [0, *itertools.accumulate(batch["num_images"])]
    patch_start = [0, *itertools.accumulate(grid.prod(-1).tolist())]
    n = batch["prompt_ids"].shape[0]
    for s in range(0, n, size):
        rows = slice(s, min(s + size, n))
        images = slice(image_start[rows.start], image_start[rows.stop])
        patches = slice(patch_start[images.start], patch_start[images.stop])
        chunk = {
            "input_ids": torch.cat([batch["prompt_ids"][rows], batch["completion_ids"][rows]], dim=1),
            "attention_mask": torch.cat([batch["prompt_mask"][rows], batch["completion_mask"][rows]], dim=1),
            "pixel_values": batch["pixel_values"][patches],
            "image_grid_thw": grid[images],
        }
        if batch.get("mm_token_type_ids") is not None:
            chunk["mm_token_type_ids"] = batch["mm_token_type_ids"][rows]
        yield rows, chunk, perturbed[patches]


def _check_vppo_settings(
    k: float,
    beta_min: float,
    beta_max: float | None,
    dual_clip: float | None,
    nll_coef: float,
    dependency: str,
    perturb: Any,
) -> None:
    """VPPOTrainer's own settings, checked before TRL builds anything (the same rules as the blocks)."""
    numbers = {"k": k, "beta_min": beta_min, "beta_max": beta_max, "dual_clip": dual_clip, "nll_coef": nll_coef}
    for name, value in numbers.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    check_fraction("k", k)
    _check_betas(beta_min, beta_max)
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {dual_clip!r}")
    if not math.isfinite(nll_coef):
        raise ValueError(f"nll_coef must be a finite number (0 turns the NLL term off), got {nll_coef!r}")
    check_choice("dependency", dependency, ("kl", "sampled"))
    if perturb is not None and not callable(perturb):
        raise TypeError(
            f"perturb must be a callable perturb(pixel_values, image_grid_thw, generator) or None, "
            f"got {type(perturb).__name__}"
        )


class VPPOTrainer(GRPOTrainer):
    r"""TRL's ``GRPOTrainer`` with VPPO's perturbed pass, TAS, TGF and [`vppo_loss`][vppo_core.vppo_loss].

    Takes every ``GRPOTrainer`` argument (model, reward functions, ``GRPOConfig``, datasets,
    processor, ...) and VPPO's settings as keywords. The policy gradient is VPPO's Eq. 6
    (Huang et al., 2025, arXiv:2510.09285) as the VPPO-RL code trains it:

    $$
    \mathcal L = \frac{1}{N}\sum_{i,t} m_{it}\,\ell_{it}(\alpha_i \hat A_i)
      + \beta\,\frac1N\sum_{i,t}\widehat{\mathrm{KL}}_{it}
      + c_{nll}\,\frac1N\sum_{i,t} -\log\pi(o_{it}),
    $$

    with $\hat A_i$ TRL's group-normalised advantage, $\alpha_i$ the TAS factor, $m_{it}$ the TGF
    mask, $\ell$ the clipped surrogate (TRL's ``epsilon`` / ``epsilon_high``, dual clip
    ``dual_clip``) and $N$ the valid tokens of the global generation batch per optimizer step. See the
    module notes for where each piece is computed, which TRL internals it uses, and $N$ when
    ``steps_per_generation != gradient_accumulation_steps``.

    Logged (``trainer.state.log_history``; global over processes): ``vppo/kept_frac``,
    ``vppo/dependency_mean``, ``vppo/tas_factor_min``, ``vppo/tas_factor_mean``,
    ``vppo/tas_factor_max`` per generation batch; ``vppo/clip_frac``, ``vppo/dual_clip_frac``,
    ``vppo/nll`` (the mean $-\log\pi(o_{it})$ over the valid tokens, whatever ``nll_coef``),
    ``vppo/approx_kl`` per micro-batch: means over the micro-batch's valid tokens, so they do not
    depend on ``gradient_accumulation_steps`` and train and eval (``eval_vppo/...``) compare.

    Args:
        *args: ``GRPOTrainer``'s positional arguments.
        k: TGF fraction of each completion's tokens that carry gradient, in $(0, 1]$ (paper: 0.4).
        beta_min: Smallest TAS factor, $> 0$, and $\le 1$ with ``beta_max=None`` (paper: 0.9).
        beta_max: Largest TAS factor ($\ge$ ``beta_min``), or ``None`` for the mean-preserving rule
            of the VPPO-RL code.
        dual_clip: Dual-clip constant $c > 1$ for negative advantages, or ``None`` (VPPO-RL: 3).
        nll_coef: Coefficient of the sampled-token NLL term, finite (VPPO-RL's runs: 0.06; 0 = TRL's
            GRPO).
        dependency: ``"kl"`` (exact KL over the vocabulary, the paper) or ``"sampled"`` (the
            clamped $k_3$ estimate on the sampled token, the VPPO-RL code; any model wrapping).
        perturb: ``perturb(pixel_values, image_grid_thw, generator)``; default: blacken each ViT
            patch with probability 0.5 (``blacken_patches_pixel_values``, Qwen-VL layouts).
        **kwargs: ``GRPOTrainer``'s keyword arguments.

    Raises:
        ImportError: If TRL is not installed.
        ValueError: On a bad VPPO setting (``k`` outside $(0, 1]$, ``beta_min <= 0``,
            ``beta_max < beta_min``, ``beta_min > 1`` with ``beta_max=None``, ``dual_clip <= 1``, a
            non-finite number, an unknown ``dependency``), a bad clip range in the ``GRPOConfig``
            (``epsilon`` outside $[0, 1)$, ``epsilon_high < 0``), or a ``GRPOConfig`` setting VPPO
            does not support (each named in the message).
        TypeError: If a VPPO setting is not a number, or ``perturb`` is not callable.

    Example:
        ```python
        from trl import GRPOConfig
        from vppo_core.integrations.trl import VPPOTrainer

        trainer = VPPOTrainer(
            model=model,                      # a Qwen-VL *ForConditionalGeneration
            processing_class=processor,
            reward_funcs=reward,              # reward(completions, **columns) -> list[float]
            train_dataset=dataset,            # "prompt" (conversational) and "image" columns
            args=GRPOConfig(output_dir="out", num_generations=8, epsilon_high=0.28),
            k=0.4,
        )
        trainer.train()
        ```
    """

    def __init__(
        self,
        *args: Any,
        k: float = 0.4,
        beta_min: float = 0.9,
        beta_max: float | None = None,
        dual_clip: float | None = 3.0,
        nll_coef: float = 0.0,
        dependency: Literal["kl", "sampled"] = "kl",
        perturb: Perturbation | None = None,
        **kwargs: Any,
    ) -> None:
        if _TRL_IMPORT_ERROR is not None:
            raise ImportError(
                "VPPOTrainer needs TRL: pip install 'vppo_core[trl]' (or 'trl>=1.16,<2')"
            ) from _TRL_IMPORT_ERROR
        _check_vppo_settings(k, beta_min, beta_max, dual_clip, nll_coef, dependency, perturb)
        super().__init__(*args, **kwargs)
        self._check_supported()
        self.vppo_k, self.vppo_beta_min, self.vppo_beta_max = k, beta_min, beta_max
        self.vppo_dual_clip, self.vppo_nll_coef, self.vppo_dependency = dual_clip, nll_coef, dependency
        self.perturb = self._blacken if perturb is None else perturb
        self.perturb_generator = torch.Generator().manual_seed(self.args.seed + self.accelerator.process_index)

    def _check_supported(self) -> None:
        args = self.args
        unsupported = [
            ("loss_type", args.loss_type, args.loss_type == "dapo", "VPPO's token mean is TRL's 'dapo'"),
            (
                "importance_sampling_level",
                args.importance_sampling_level,
                args.importance_sampling_level == "token",
                "",
            ),
            ("top_entropy_quantile", args.top_entropy_quantile, args.top_entropy_quantile == 1.0, "TGF selects tokens"),
            ("off_policy_mask_threshold", args.off_policy_mask_threshold, args.off_policy_mask_threshold is None, ""),
            ("delta", args.delta, args.delta is None, ""),
            ("entropy_coef", args.entropy_coef, args.entropy_coef == 0.0, "use VPPOTrainer(nll_coef=...)"),
            ("use_adaptive_entropy", args.use_adaptive_entropy, not args.use_adaptive_entropy, ""),
            ("router_aux_loss_coef", self.router_aux_loss_coef, not self.aux_loss_enabled, "MoE aux loss"),
            (
                "use_bias_correction_kl",
                args.use_bias_correction_kl,
                args.beta == 0.0 or not args.use_bias_correction_kl,
                "vppo_loss's KL term is the plain k3 estimate; set it to False with beta > 0",
            ),
        ]
        for name, value, ok, hint in unsupported:
            if not ok:
                raise ValueError(f"VPPOTrainer does not support {name}={value!r}" + (f" ({hint})" if hint else ""))
        # The clip range vppo_loss will get: checked now, not at the first loss.
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ValueError(f"GRPOConfig epsilon (the lower clip range) must be in [0, 1), got {self.epsilon_low!r}")
        if not self.epsilon_high >= 0.0:
            raise ValueError(f"GRPOConfig epsilon_high (the upper clip range) must be >= 0, got {self.epsilon_high!r}")

    # ------------------------------------------------------------------ stage 1: per generation batch

    def _blacken(self, pixel_values: Tensor, image_grid_thw: Tensor | None, generator: torch.Generator) -> Tensor:
        if image_grid_thw is None:
            raise ValueError(
                "the default perturbation needs Qwen-style 'image_grid_thw' inputs; "
                "pass VPPOTrainer(perturb=...) for this model's pixel_values layout"
            )
        return blacken_patches_pixel_values(
            pixel_values, image_grid_thw, self._pixel_layout, generator=generator, p=0.5
        )

    @functools.cached_property
    def _pixel_layout(self) -> PixelLayout:
        """The processor's layout, read (and checked on an image) once."""
        return PixelLayout.from_processor(self.processing_class)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super()._generate_and_score_completions(inputs)
        if batch.get("pixel_values") is None:
            raise ValueError("VPPOTrainer needs an image in every generation batch (got no 'pixel_values')")
        mask = _loss_mask(batch)
        group = "world" if self.accelerator.num_processes > 1 else None
        with torch.no_grad():
            perturbed = self.perturb(batch["pixel_values"], batch.get("image_grid_thw"), self.perturb_generator)
            dependency = self._token_dependency(batch, perturbed, mask)
            factors = advantage_factors(
                dependency, mask, beta_min=self.vppo_beta_min, beta_max=self.vppo_beta_max, process_group=group
            )
            keep = token_filter_mask(dependency, mask, k=self.vppo_k)
            num_tokens = loss_denominators(mask, process_group=group).num_tokens
        batch["advantages"] = batch["advantages"] * factors.to(batch["advantages"].dtype)
        batch.update(
            vppo_dependency=dependency, vppo_token_mask=keep, vppo_tas_factors=factors, vppo_num_tokens=num_tokens
        )
        self._log_rollout(dependency, factors, keep, mask)
        return batch

    def _token_dependency(self, batch: dict[str, Any], perturbed: Tensor, mask: Tensor) -> Tensor:
        """$S_t$ of every completion token, ``[batch, completion]``, with the current (= rollout) weights.

        Both views' passes run with dropout off (every module in eval mode, restored afterwards): with
        dropout (e.g. a LoRA adapter's) the two passes would draw different masks, and that noise would
        count as visual dependency in TAS and TGF.
        """
        mode = "train" if self.model.training else "eval"
        size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        with _eval_mode(self.model):
            return self._token_dependency_eval(batch, perturbed, mask, size)

    def _token_dependency_eval(self, batch: dict[str, Any], perturbed: Tensor, mask: Tensor, size: int) -> Tensor:
        if self.vppo_dependency == "sampled":
            # TRL's rollout-policy pass, when it made one without dropout (else it drew dropout masks)
            real = batch.get("old_per_token_logps") if getattr(self.args, "disable_dropout", False) else None
            if real is None:
                real = self._logprobs(batch, batch["pixel_values"], size)
            return sampled_visual_dependency(real, self._logprobs(batch, perturbed, size), mask)
        if batch.get("image_grid_thw") is None:
            raise ValueError("dependency='kl' supports Qwen-style inputs with 'image_grid_thw'; use 'sampled'")
        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if is_peft_model(model) else model
        width = batch["prompt_ids"].shape[1]
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for rows, chunk, chunk_perturbed in _row_chunks(batch, perturbed, size):
            response = torch.cat([torch.zeros_like(batch["prompt_mask"][rows]), mask[rows]], dim=1).bool()
            scored = token_dependency(model, chunk, chunk_perturbed, response, temperature=self.temperature)
            out[rows] = scored.dependency[:, width:].float()
        return out

    def _logprobs(self, batch: dict[str, Any], pixel_values: Tensor, size: int) -> Tensor:
        """TRL's forward pass for the completion tokens' log-probabilities, with the given images."""
        vision = {key: batch.get(key) for key in _VISION_KEYS} | {"pixel_values": pixel_values}
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].shape[1]
        return self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, width, batch_size=size, **vision
        )[0]

    def _log_rollout(self, dependency: Tensor, factors: Tensor, keep: Tensor, mask: Tensor) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        valid = mask.bool()
        counts = torch.stack([torch.where(valid, dependency, 0.0).sum(), keep.sum(), valid.sum()]).float()
        dep_sum, kept, total = self.accelerator.reduce(counts, reduction="sum").tolist()
        metrics["vppo/dependency_mean"].append(dep_sum / max(total, 1.0))
        metrics["vppo/kept_frac"].append(kept / max(total, 1.0))
        trajectory_factors = torch.where(valid.any(-1), factors, float("nan"))  # NaN: no valid token, or padding
        padded = self.accelerator.pad_across_processes(trajectory_factors, pad_index=float("nan"))
        gathered = self.accelerator.gather(padded)
        gathered = gathered[~gathered.isnan()]
        if gathered.numel():
            metrics["vppo/tas_factor_min"].append(gathered.min().item())
            metrics["vppo/tas_factor_mean"].append(gathered.mean().item())
            metrics["vppo/tas_factor_max"].append(gathered.max().item())

    # ------------------------------------------------------------------ stage 2: per micro-batch

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        vision = {key: inputs.get(key) for key in _VISION_KEYS}
        logprobs, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.shape[1], **vision
        )
        old = inputs.get("old_per_token_logps")
        token_mask = inputs["vppo_token_mask"]
        if "importance_sampling_ratio" in inputs:  # vLLM's correction, a weight on each kept token as in TRL
            token_mask = token_mask * inputs["importance_sampling_ratio"]
        out = vppo_loss(
            logprobs,
            logprobs.detach() if old is None else old,
            inputs["advantages"],
            _loss_mask(inputs),
            token_mask,
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            dual_clip=self.vppo_dual_clip,
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            kl_coef=self.beta,
            entropy_coef=self.vppo_nll_coef,
            num_tokens=self._num_tokens(inputs),
        )
        self._log_loss(out, logprobs, _loss_mask(inputs))
        return out.loss

    def _num_tokens(self, inputs: dict[str, Any]) -> Tensor:
        """TRL's 'dapo' normaliser: the generation batch's global count, rescaled to one accumulation window."""
        num_tokens = inputs["vppo_num_tokens"]
        if self.model.training:
            num_tokens = num_tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return num_tokens

    def _log_loss(self, out: LossOutput, logprobs: Tensor, mask: Tensor) -> None:
        metrics = self._metrics["train" if self.model.training else "eval"]
        # The mean NLL of this micro-batch's valid tokens. Not `out.entropy_loss`: that term is divided by
        # the step's rescaled global count (its share of the step's loss), not by this call's tokens.
        valid = mask.bool()
        nll = torch.where(valid, -logprobs.detach(), 0.0).sum() / valid.sum().clamp_min(1)
        values = torch.stack([out.clip_frac, out.dual_clip_frac, nll.to(out.clip_frac.dtype), out.approx_kl]).float()
        means = self.accelerator.gather(values.unsqueeze(0)).mean(0).tolist()
        for name, value in zip(("clip_frac", "dual_clip_frac", "nll", "approx_kl"), means):
            metrics[f"vppo/{name}"].append(value)
