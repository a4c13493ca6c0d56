r"""VPPO in verl: a registered policy loss ``"vppo"`` and a ``"vppo_sync"`` trainer that feeds it.

Targets verl 0.9.1 (its default v1 trainer, ``trainer.use_v1=True``, with TransferQueue). Three pieces:

1. **Perturbed forward pass** (``VPPOTrainerSync._compute_old_log_prob``, on the driver, once per
   batch): after verl's own old-log-probability pass, the batch's ``multi_modal_inputs`` are
   replaced in TransferQueue by a copy whose ``pixel_values`` have random patches blackened
   (``perturb_multi_modal_inputs``), the actor's ``compute_log_prob`` runs again (the rollout
   policy, perturbed image), the real images are put back, and the per-token dependency (the
   VPPO-RL code's clamped $k_3$ on the sampled token, ``sampled_visual_dependency``) is stored as
   the batch field ``vppo_dependency``. verl's workers only return sampled-token log-probabilities,
   so the exact full-vocabulary KL is not available here.
2. **TAS and TGF** (``VPPOTrainerSync._compute_advantage``, on the driver, after verl's GRPO
   advantages): ``vppo_token_advantages`` folds both into the token-level advantages,
   $A'_{it} = \alpha_i \hat A_{it} m_{it}$. The driver holds the whole batch, so TAS's min, max and
   mean are global statistics with no collective. This is how the dependency reaches the loss:
   verl 0.9's ``ppo_loss`` hands a policy loss only ``old_log_prob``, ``log_prob``, ``advantages``,
   ``response_mask``, ``loss_agg_mode``, the actor config and ``rollout_is_weights`` (it selects
   those fields from the batch), and its advantage estimators only see rewards, the response mask
   and the group index. Folding the mask into the advantages is exact: a zero advantage makes the
   clipped surrogate (dual clip included) and its gradient exactly 0, and the token-mean
   denominator still counts every valid token, as VPPO's all-token denominator does.
3. **Policy loss** ``"vppo"`` (``compute_policy_loss_vppo``): ``vppo_core.vppo_loss`` on those
   advantages, with verl's clip settings (``clip_ratio_low/high``, dual clip ``clip_ratio_c``), its
   global-batch normalisation (``global_batch_info``: ``batch_num_tokens / dp_size``) and its
   rollout importance weights (a weight on each token's surrogate).

Launch (not run here: it needs GPUs, Ray and a VLM; see README.md)::

    PYTHONPATH=examples/verl:$PYTHONPATH python -m verl.trainer.main_ppo ... \
        trainer.v1.trainer_mode=vppo_sync actor_rollout_ref.actor.policy_loss.loss_mode=vppo \
        actor_rollout_ref.actor.clip_ratio_high=0.28 \
        +algorithm.vppo.k=0.4 +algorithm.vppo.beta_min=0.9 \
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=vppo_policy_loss.setup

The pure functions (``vppo_token_advantages``, ``compute_policy_loss_vppo``,
``perturb_multi_modal_inputs``) need only vppo_core; the registrations and the trainer are defined
only when verl (and TransferQueue) import.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

import vppo_core as V
from vppo_core.perturb import PixelLayout, blacken_patches_pixel_values

try:
    from verl.trainer.ppo.core_algos import register_policy_loss

    HAS_VERL = True
except ImportError:  # the pure functions below work without verl
    HAS_VERL = False

try:
    import transfer_queue as tq
    from omegaconf import open_dict
    from tensordict import TensorDict
    from verl.trainer.ppo.v1 import PPOTrainerSync, register_trainer
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import response_from_nested, response_to_nested

    HAS_VERL_V1 = True
except ImportError:
    HAS_VERL_V1 = False

__all__ = [
    "VPPOAdvantages",
    "compute_policy_loss_vppo",
    "perturb_multi_modal_inputs",
    "setup",
    "vppo_token_advantages",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class VPPOAdvantages(NamedTuple):
    """What ``vppo_token_advantages`` returns."""

    advantages: Tensor
    """``[batch, seq]`` token advantages $\\alpha_i \\hat A_{it} m_{it}$ (0 at filtered and padded tokens)."""
    factors: Tensor
    """``[batch]`` TAS factors $\\alpha_i$."""
    token_mask: Tensor
    """``[batch, seq]`` bool TGF mask $m_{it}$."""


def vppo_token_advantages(
    advantages: Tensor,
    dependency: Tensor,
    response_mask: Tensor,
    *,
    k: float = 0.4,
    beta_min: float = 0.9,
    beta_max: float | None = None,
) -> VPPOAdvantages:
    r"""TAS and TGF folded into token-level advantages: $A'_{it} = \alpha_i\,\hat A_{it}\,m_{it}$.

    $\alpha_i$ from ``vppo_core.advantage_factors`` (VPPO Eq. 5; ``beta_max=None`` is the VPPO-RL
    code's mean-preserving rule) and $m_{it}$ from ``vppo_core.token_filter_mask`` (top-``k`` tokens
    of each response by dependency). With these advantages and ``token_mask=None``,
    ``vppo_loss`` gives exactly the value and gradient of ``vppo_loss`` with ``α·Â`` and
    ``token_mask=m``: a zero advantage zeroes the clipped surrogate and its gradient.

    Shapes:
        - ``advantages``: ``[batch, seq]`` (verl's GRPO advantages) or ``[batch]``
        - ``dependency``, ``response_mask``: ``[batch, seq]``

    Args:
        advantages: GRPO advantages of the whole batch (verl computes them on the driver).
        dependency: Per-token visual dependency of the rollout policy.
        response_mask: Valid response tokens.
        k: TGF fraction kept per response, in $(0, 1]$.
        beta_min: Smallest TAS factor.
        beta_max: Largest TAS factor, or ``None`` for the mean-preserving rule.

    Returns:
        ``VPPOAdvantages``: the folded advantages, the factors and the mask.

    Example:
        >>> import torch
        >>> dep = torch.tensor([[0.1, 2.0, 0.3], [0.0, 0.1, 0.0]])
        >>> out = vppo_token_advantages(torch.tensor([[1.0] * 3, [-1.0] * 3]), dep, torch.ones(2, 3), k=0.5)
        >>> out.factors, out.advantages  # the last token of the second response is filtered out
        (tensor([1.1000, 0.9000]), tensor([[ 0.0000,  1.1000,  1.1000],
                [-0.9000, -0.9000, -0.0000]]))
    """
    mask = response_mask.bool()
    factors = V.advantage_factors(dependency, mask, beta_min=beta_min, beta_max=beta_max)
    keep = V.token_filter_mask(dependency, mask, k=k)
    adv = advantages.to(torch.promote_types(advantages.dtype, torch.float32))  # float32, or float64
    adv = adv if adv.ndim == 2 else adv.unsqueeze(-1).expand(mask.shape)
    return VPPOAdvantages(adv * factors.unsqueeze(-1) * keep, factors, keep)


def _option(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return default if value is None else value


def compute_policy_loss_vppo(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""verl policy loss ``"vppo"``: ``vppo_core.vppo_loss`` with verl's settings and normalisation.

    $$
    \mathcal L = \operatorname{agg}\big(w_t\,\ell_t(A'_t)\big), \qquad
    \operatorname{token-mean}: \frac{\sum_t w_t \ell_t}{N_{global}/\mathrm{dp}},
    $$

    with $\ell$ the clipped surrogate (``clip_ratio_low``, ``clip_ratio_high``, dual clip
    ``clip_ratio_c``), $A'$ the TAS/TGF token advantages of ``vppo_token_advantages``, $w$
    verl's ``rollout_is_weights`` (1 without them) and $N_{global}$ verl's ``batch_num_tokens`` (or
    ``global_batch_size`` for the ``seq-mean-*`` modes) over ``dp_size`` ranks, as verl's
    ``agg_loss`` divides. Same signature as verl 0.9's ``PolicyLossFn``; the value equals verl's
    ``"vanilla"`` loss on the same advantages, with vppo_core's handling of padding and NaN.

    Args:
        old_log_prob: ``[batch, seq]`` rollout-policy log-probabilities.
        log_prob: ``[batch, seq]`` current log-probabilities (with gradient).
        advantages: ``[batch, seq]`` advantages (for VPPO: from ``vppo_token_advantages``).
        response_mask: ``[batch, seq]`` valid response tokens.
        loss_agg_mode: ``"token-mean"`` (VPPO) or a ``seq-mean-*`` mode.
        config: verl's ``ActorConfig`` (or any object / mapping with ``clip_ratio``,
            ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``, ``global_batch_info``).
        rollout_is_weights: ``[batch, seq]`` importance weights from verl's rollout correction.

    Returns:
        ``(loss, metrics)``; metrics (detached 0-d tensors) use verl's names ``actor/pg_clipfrac``,
        ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``.

    Raises:
        ValueError: On ``loss_agg_mode="token-sum"`` or an unknown mode, or a ``loss_scale_factor``
            with ``seq-mean-token-sum-norm`` (vppo_core divides by the padded length).

    Example:
        >>> import torch
        >>> lp = torch.zeros(1, 3, requires_grad=True)
        >>> cfg = {"clip_ratio": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
        >>> loss, metrics = compute_policy_loss_vppo(torch.zeros(1, 3), lp, torch.tensor([[1.0, 0.0, 0.0]]),
        ...                                          torch.ones(1, 3), config=cfg)
        >>> loss  # -1/3: one kept token, all three in the denominator
        tensor(-0.3333, grad_fn=<DivBackward0>)
    """
    if loss_agg_mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg_mode must be one of {AGGREGATIONS} for the 'vppo' loss, got {loss_agg_mode!r}")
    config = {} if config is None else config
    clip = _option(config, "clip_ratio", 0.2)
    info = _option(config, "global_batch_info", {})
    if loss_agg_mode == "seq-mean-token-sum-norm" and info.get("loss_scale_factor") is not None:
        raise ValueError("loss_scale_factor is not supported by the 'vppo' loss; leave it None (padded length)")
    dp_size = info.get("dp_size") or 1
    counts: dict[str, Any] = {}
    if loss_agg_mode == "token-mean" and info.get("batch_num_tokens") is not None:
        counts["num_tokens"] = info["batch_num_tokens"] / dp_size
    elif loss_agg_mode != "token-mean" and info.get("global_batch_size") is not None:
        counts["num_sequences"] = info["global_batch_size"] / dp_size
    out = V.vppo_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        rollout_is_weights,
        clip_low=_option(config, "clip_ratio_low", clip),
        clip_high=_option(config, "clip_ratio_high", clip),
        dual_clip=_option(config, "clip_ratio_c", 3.0),
        agg=loss_agg_mode,
        **counts,
    )
    metrics = {
        "actor/pg_clipfrac": out.clip_frac,
        "actor/ppo_kl": out.approx_kl,
        "actor/pg_clipfrac_lower": out.dual_clip_frac,
    }
    return out.loss, metrics


def perturb_multi_modal_inputs(
    multi_modal_inputs: Sequence[Any],
    layout: PixelLayout,
    generator: torch.Generator,
    *,
    p: float = 0.5,
) -> list[Any]:
    """Copies of verl's per-sample ``multi_modal_inputs`` with random ViT patches of every image blackened.

    Each entry is a dict (or a tensordict ``NonTensorData`` holding one) with Qwen-VL
    ``pixel_values`` and ``image_grid_thw``; entries without images (``None``, or no
    ``image_grid_thw``) are returned as they are. Each patch is blackened with probability ``p``
    (VPPO: 0.5), a fresh draw per sample, from ``generator`` only (``blacken_patches_pixel_values``).
    The input dicts are not modified.

    Args:
        multi_modal_inputs: One entry per sample, as verl stores them.
        layout: The processor's layout, ``PixelLayout.from_processor(processor)``.
        generator: Random source.
        p: Probability that a patch is blackened.

    Returns:
        A list of new dicts (or the untouched entries).

    Example:
        >>> import torch
        >>> sample = {"pixel_values": torch.randn(16, 1176), "image_grid_thw": torch.tensor([[1, 4, 4]])}
        >>> out = perturb_multi_modal_inputs([sample, None], PixelLayout(), torch.Generator().manual_seed(0))
        >>> out[1] is None, out[0]["image_grid_thw"] is sample["image_grid_thw"], out[0] is sample
        (True, True, False)
    """
    perturbed = []
    for entry in multi_modal_inputs:
        inputs = entry if entry is None or isinstance(entry, Mapping) else entry.data  # NonTensorData
        if inputs is None or inputs.get("image_grid_thw") is None:
            perturbed.append(entry)
            continue
        pixels = blacken_patches_pixel_values(
            inputs["pixel_values"], inputs["image_grid_thw"], layout, generator=generator, p=p
        )
        perturbed.append({**inputs, "pixel_values": pixels})
    return perturbed


def setup() -> None:
    """Ray ``worker_process_setup_hook``: importing this module registers ``"vppo"`` (and ``"vppo_sync"``).

    verl looks the policy loss up in its worker processes and the trainer in its task runner, all Ray
    actors; pass ``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=vppo_policy_loss.setup``
    (with this folder on their ``PYTHONPATH``) so that each of them imports this module.
    """


if HAS_VERL:
    register_policy_loss("vppo")(compute_policy_loss_vppo)


if HAS_VERL_V1:

    @register_trainer("vppo_sync")
    class VPPOTrainerSync(PPOTrainerSync):
        """verl's synchronous v1 trainer plus VPPO's perturbed pass (old log-probs) and TAS/TGF (advantages).

        Settings from ``algorithm.vppo``: ``k`` (0.4), ``beta_min`` (0.9), ``beta_max`` (None: the
        mean-preserving rule), ``p`` (0.5), ``seed`` (0). Logs ``vppo/kept_frac``,
        ``vppo/dependency_mean`` and ``vppo/tas_factor_{min,mean,max}``.
        """

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            correction = (config.get("algorithm") or {}).get("rollout_correction") or {}
            if correction.get("bypass_mode", False):
                raise ValueError(
                    "algorithm.rollout_correction.bypass_mode=True takes the rollout engine's log-probabilities "
                    "as the old ones, so VPPO's dependency would compare the rollout engine (real image) with "
                    "the trainer's engine (perturbed image) and count their numerical difference as visual "
                    "dependency; run vppo_sync without bypass mode"
                )
            # verl selects this class by the name "vppo_sync", then compares trainer_mode with "sync"
            # for its synchronous replay buffer, batch size and checkpointing: run as "sync"
            with open_dict(config):
                config.trainer.v1.trainer_mode = "sync"
            super().__init__(config, *args, **kwargs)

        def _vppo(self, name: str, default: Any) -> Any:
            return (self.config.algorithm.get("vppo") or {}).get(name, default)

        def _compute_old_log_prob(self, batch, metrics):
            batch = super()._compute_old_log_prob(batch, metrics)  # real images: old_log_probs
            where = {"keys": batch.keys, "partition_id": batch.partition_id}
            if not hasattr(self, "_vppo_generator"):
                self._vppo_generator = torch.Generator().manual_seed(self._vppo("seed", 0))
            real = tq.kv_batch_get(**where, select_fields=["multi_modal_inputs"])
            layout = PixelLayout.from_processor(self.processor)
            perturbed = perturb_multi_modal_inputs(
                tu.get(real, "multi_modal_inputs"), layout, self._vppo_generator, p=self._vppo("p", 0.5)
            )
            tq.kv_batch_put(**where, fields=tu.get_tensordict({"multi_modal_inputs": perturbed}))
            try:
                # TransferQueue's put returns metadata without extra_info: the sampling temperature
                # verl set for the first pass must be given again (the engine reads it per micro-batch)
                batch.extra_info.update(
                    {
                        "calculate_entropy": False,
                        "compute_loss": False,
                        "temperature": self.config.actor_rollout_ref.rollout.temperature,
                    }
                )
                self.actor_rollout_wg.compute_log_prob(batch)  # rollout policy, perturbed images
                data = tq.kv_batch_get(**where, select_fields=["log_probs", "old_log_probs", "response_mask"])
            finally:
                tq.kv_batch_put(**where, fields=real)  # the real images back, for the update
            mask = data["response_mask"]
            noimg = response_from_nested(data["log_probs"], mask)
            padded = TensorDict(
                {"old": data["old_log_probs"], "noimg": noimg, "mask": mask}, batch_size=len(batch)
            ).to_padded_tensor()
            dependency = V.sampled_visual_dependency(padded["old"], padded["noimg"], padded["mask"])
            fields = TensorDict({"vppo_dependency": response_to_nested(dependency, mask)}, batch_size=len(batch))
            return tq.kv_batch_put(**where, fields=fields)

        def _compute_advantage(self, batch, metrics):
            batch = super()._compute_advantage(batch, metrics)  # verl's GRPO advantages
            where = {"keys": batch.keys, "partition_id": batch.partition_id}
            data = tq.kv_batch_get(**where, select_fields=["advantages", "vppo_dependency", "response_mask"])
            nested_mask = data["response_mask"]
            padded = data.to_padded_tensor()
            mask = padded["response_mask"].bool()
            out = vppo_token_advantages(
                padded["advantages"],
                padded["vppo_dependency"],
                mask,
                k=self._vppo("k", 0.4),
                beta_min=self._vppo("beta_min", 0.9),
                beta_max=self._vppo("beta_max", None),
            )
            valid = mask.any(-1)
            metrics.update(
                {
                    "vppo/kept_frac": (out.token_mask.sum() / mask.sum().clamp_min(1)).item(),
                    "vppo/dependency_mean": padded["vppo_dependency"][mask].mean().item(),
                    "vppo/tas_factor_min": out.factors[valid].min().item(),
                    "vppo/tas_factor_mean": out.factors[valid].mean().item(),
                    "vppo/tas_factor_max": out.factors[valid].max().item(),
                }
            )
            fields = TensorDict({"advantages": response_to_nested(out.advantages, nested_mask)}, batch_size=len(batch))
            return tq.kv_batch_put(**where, fields=fields)
