"""VPPOTrainer (vppo_core.integrations.trl): TRL's GRPOTrainer turned into VPPO, on a tiny Qwen2-VL on the CPU.

The training test runs two optimisation steps of ``examples/trl_vppo.py``'s setup and checks, against
vppo_core computed by hand on the captured tensors: the dependency (at rollout time, with the rollout
weights), the TAS factors and shaped advantages, the TGF mask, the global token count, each
micro-batch's loss, and that the micro-batch losses of a step add up to VPPO's token mean over the
whole generation batch. Also: finite losses, parameters that change, logged diagnostics.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from .helpers import require_transformers

require_transformers()
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

import vppo_core as V  # noqa: E402
from vppo_core.integrations.transformers import token_dependency, token_logprobs  # noqa: E402
from vppo_core.integrations.trl import VPPOTrainer  # noqa: E402
from vppo_core.perturb import PixelLayout, blacken_patches_pixel_values  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_vppo.py"
K, NUM_GENERATIONS, PER_DEVICE, ACCUMULATION = 0.4, 4, 4, 2


def _example():
    spec = importlib.util.spec_from_file_location("trl_vppo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _sequences(batch, pixel_values=None):
    """Whole prompt + completion inputs and the response mask, for vppo_core's transformers integration."""
    width = batch["prompt_ids"].shape[1]
    mask = batch["completion_mask"]
    inputs = {
        "input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
        "attention_mask": torch.cat([batch["prompt_mask"], mask], dim=1),
        "pixel_values": batch["pixel_values"] if pixel_values is None else pixel_values,
        "image_grid_thw": batch["image_grid_thw"],
        "mm_token_type_ids": batch["mm_token_type_ids"],
    }
    response = torch.cat([torch.zeros_like(batch["prompt_mask"]), mask], dim=1).bool()
    return inputs, response, width


@pytest.mark.slow
@pytest.mark.parametrize(("dependency", "nll_coef"), [("kl", 0.0), ("sampled", 0.06)])
def test_vppo_trainer_steps_match_vppo_core(tmp_path, monkeypatch, dependency, nll_coef):
    example = _example()
    rollouts, losses, perturbed = [], [], []

    raw_advantages = []
    parent = trl.GRPOTrainer._generate_and_score_completions

    def record_raw(self, inputs):  # TRL's output, before VPPO touches it
        batch = parent(self, inputs)
        raw_advantages.append(batch["advantages"].clone())
        return batch

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", record_raw)

    def perturb(pixel_values, image_grid_thw, generator):  # the default perturbation, recorded
        layout = PixelLayout.from_processor(trainer.processing_class)
        out = blacken_patches_pixel_values(pixel_values, image_grid_thw, layout, generator=generator)
        perturbed.append(out)
        return out

    trainer = example.make_trainer(
        str(tmp_path), steps=2, per_device_batch=PER_DEVICE, accumulation=ACCUMULATION, k=K,
        dependency=dependency, nll_coef=nll_coef, perturb=perturb,
    )  # fmt: skip
    assert isinstance(trainer, VPPOTrainer)

    rollout_stage, loss_stage, logprob_pass = (
        trainer._generate_and_score_completions,
        trainer._compute_loss,
        trainer._get_per_token_logps_and_entropies,
    )
    current = {}

    def capture_rollout(inputs):
        batch = rollout_stage(inputs)
        # Hand computation with the weights that sampled the batch (nothing has been updated yet).
        seqs, response, width = _sequences(batch)
        with torch.no_grad():
            if dependency == "kl":
                dep = token_dependency(trainer.model, seqs, perturbed[-1], response).dependency[:, width:]
            else:
                pert, _, _ = _sequences(batch, perturbed[-1])
                real = token_logprobs(trainer.model, seqs, response)[:, width:]
                noimg = token_logprobs(trainer.model, pert, response)[:, width:]
                dep = V.sampled_visual_dependency(real, noimg, batch["completion_mask"])
        rollouts.append({"batch": batch, "dependency": dep, "raw": raw_advantages[-1]})
        return batch

    def capture_logprobs(*args, **kwargs):
        out = logprob_pass(*args, **kwargs)
        if torch.is_grad_enabled():
            current["logprobs"] = out[0].detach().clone()
        return out

    def capture_loss(model, inputs):
        loss = loss_stage(model, inputs)
        losses.append({"inputs": inputs, "logprobs": current.pop("logprobs"), "loss": loss.detach().clone()})
        return loss

    trainer._generate_and_score_completions = capture_rollout
    trainer._compute_loss = capture_loss
    trainer._get_per_token_logps_and_entropies = capture_logprobs

    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    # --- training happened ------------------------------------------------------------------------
    assert len(rollouts) == 2 and len(losses) == 2 * ACCUMULATION
    assert all(math.isfinite(float(item["loss"])) for item in losses)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert any(bool((r["raw"] != 0).any()) for r in rollouts), "no reward variance: the test would be vacuous"

    # --- per generation batch: dependency, TAS, TGF, global token count ----------------------------
    for rollout in rollouts:
        batch, raw = rollout["batch"], rollout["raw"]
        mask = batch["completion_mask"].bool()
        dep = batch["vppo_dependency"]
        torch.testing.assert_close(dep, rollout["dependency"], atol=1e-5, rtol=1e-4)
        assert float(dep[mask].min()) >= 0 and float(dep[~mask].abs().max()) == 0
        factors = V.advantage_factors(dep, mask, beta_min=0.9)
        torch.testing.assert_close(batch["vppo_tas_factors"], factors)
        torch.testing.assert_close(batch["advantages"], raw * factors)
        assert torch.equal(batch["vppo_token_mask"], V.token_filter_mask(dep, mask, k=K))
        assert float(batch["vppo_num_tokens"]) == float(mask.sum())

    # --- per micro-batch: the loss is vppo_loss on the same tensors ---------------------------------
    for item in losses:
        x = item["inputs"]
        old = x.get("old_per_token_logps", item["logprobs"])
        num_tokens = x["vppo_num_tokens"] * ACCUMULATION / trainer.args.steps_per_generation
        expected = V.vppo_loss(
            item["logprobs"], old, x["advantages"], x["completion_mask"], x["vppo_token_mask"],
            clip_low=0.2, clip_high=0.28, dual_clip=3.0, entropy_coef=nll_coef, num_tokens=num_tokens,
        )  # fmt: skip
        torch.testing.assert_close(item["loss"], expected.loss)

    # The micro-batches of one step add up to VPPO's token mean over the whole generation batch.
    for step in range(len(rollouts)):
        parts = losses[step * ACCUMULATION : (step + 1) * ACCUMULATION]
        cat = {key: torch.cat([p["inputs"][key] for p in parts]) for key in ("advantages", "completion_mask")}
        keep = torch.cat([p["inputs"]["vppo_token_mask"] for p in parts])
        logprobs = torch.cat([p["logprobs"] for p in parts])
        whole = V.vppo_loss(logprobs, logprobs, cat["advantages"], cat["completion_mask"], keep, entropy_coef=nll_coef)
        torch.testing.assert_close(sum(p["loss"] for p in parts), whole.loss, atol=1e-6, rtol=1e-5)

    # --- logged diagnostics -------------------------------------------------------------------------
    logged = [row for row in trainer.state.log_history if "vppo/kept_frac" in row]
    assert len(logged) == 2
    for row, rollout in zip(logged, rollouts):
        batch = rollout["batch"]
        kept = float(batch["vppo_token_mask"].sum()) / float(batch["completion_mask"].sum())
        assert row["vppo/kept_frac"] == pytest.approx(kept)
        assert K <= row["vppo/kept_frac"] <= 1
        assert row["vppo/tas_factor_min"] >= 0.9 - 1e-6
        assert row["vppo/tas_factor_mean"] == pytest.approx(1.0, abs=1e-5)  # mean-preserving TAS
        assert row["vppo/tas_factor_max"] >= 1.0
        assert row["vppo/dependency_mean"] >= 0
        for key in ("vppo/clip_frac", "vppo/dual_clip_frac", "vppo/nll", "vppo/approx_kl"):
            assert math.isfinite(row[key])

    # --- vLLM's importance-sampling correction: a weight on each kept token ------------------------
    x = dict(losses[0]["inputs"])
    ratio = torch.rand(x["completion_mask"].shape) + 0.5
    x["importance_sampling_ratio"] = ratio
    trainer.model.train()
    got = loss_stage(trainer.model, x)
    lp = current.pop("logprobs")
    expected = V.vppo_loss(
        lp, x.get("old_per_token_logps", lp), x["advantages"], x["completion_mask"], x["vppo_token_mask"] * ratio,
        clip_low=0.2, clip_high=0.28, dual_clip=3.0, entropy_coef=nll_coef,
        num_tokens=x["vppo_num_tokens"] * ACCUMULATION / trainer.args.steps_per_generation,
    )  # fmt: skip
    torch.testing.assert_close(got.detach(), expected.loss)


def _logged_nll(output_dir, accumulation):
    """One step on a generation batch of 8 completions split into ``accumulation`` micro-batches: the logged
    ``vppo/nll`` and, per loss call, the mean NLL of its valid completion tokens measured from TRL's pass."""
    trainer = _example().make_trainer(
        str(output_dir), steps=1, per_device_batch=8 // accumulation, accumulation=accumulation
    )
    per_call, logprob_pass = [], trainer._get_per_token_logps_and_entropies

    def capture(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = logprob_pass(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if torch.is_grad_enabled():  # the loss stage's pass
            valid = attention_mask[:, -logits_to_keep:].bool()
            per_call.append(float(-out[0].detach()[valid].mean()))
        return out

    trainer._get_per_token_logps_and_entropies = capture
    trainer.train()
    (row,) = [row for row in trainer.state.log_history if "vppo/nll" in row]
    return row["vppo/nll"], per_call


@pytest.mark.slow
def test_logged_nll_is_the_mean_nll_whatever_the_accumulation(tmp_path):
    """``vppo/nll`` is each micro-batch's mean NLL, not the loss term (which is divided by the accumulation)."""
    single, calls_1 = _logged_nll(tmp_path / "ga1", 1)
    double, calls_2 = _logged_nll(tmp_path / "ga2", 2)
    assert len(calls_1) == 1 and len(calls_2) == 2
    assert single == pytest.approx(calls_1[0], rel=1e-5)
    assert double == pytest.approx(sum(calls_2) / 2, rel=1e-5)
    # The same 8 completions; only how they are split into micro-batches (and so averaged) differs.
    assert double == pytest.approx(single, rel=1e-2)


@pytest.mark.parametrize(
    ("config", "vppo", "match"),
    [
        ({"loss_type": "grpo"}, {}, r"loss_type='grpo'"),
        ({"top_entropy_quantile": 0.2}, {}, r"top_entropy_quantile=0.2"),
        ({"entropy_coef": 0.01}, {}, r"entropy_coef=0.01 .*nll_coef"),
        ({}, {"k": 1.5}, r"k must be in"),
        ({}, {"dependency": "exact"}, r"dependency must be one of"),
        ({}, {"dual_clip": 1.0}, r"dual_clip must be > 1"),
        ({}, {"beta_min": 0.0}, r"beta_min must be > 0 .*got 0\.0"),
        ({}, {"beta_min": 1.2}, r"beta_min must be <= 1 with beta_max=None .*got 1\.2"),
        ({}, {"beta_max": 0.5}, r"beta_max must be >= beta_min \(= 0\.9\).*got 0\.5"),
        ({}, {"beta_max": float("inf")}, r"beta_max must be a finite number, got inf"),
        ({}, {"nll_coef": float("nan")}, r"nll_coef must be a finite number .*got nan"),
        ({"epsilon": -0.1}, {}, r"epsilon \(the lower clip range\) must be in \[0, 1\), got -0\.1"),
        ({"epsilon_high": -0.5}, {}, r"epsilon_high \(the upper clip range\) must be >= 0, got -0\.5"),
    ],
)
def test_vppo_trainer_rejects_unsupported_settings(tmp_path, config, vppo, match):
    with pytest.raises(ValueError, match=match):
        _trainer_with(tmp_path, config, vppo)


@pytest.mark.parametrize(
    ("vppo", "match"),
    [({"k": "0.4"}, r"k must be a number, got str '0\.4'"), ({"perturb": "blacken"}, r"perturb must be a callable")],
)
def test_vppo_trainer_rejects_wrong_types(tmp_path, vppo, match):
    with pytest.raises(TypeError, match=match):
        _trainer_with(tmp_path, {}, vppo)


def _trainer_with(tmp_path, config, vppo):
    from trl import GRPOConfig

    from vppo_core.integrations.tiny_vlm import tiny_processor, tiny_qwen_vl

    example = _example()
    processor = tiny_processor("qwen2_vl", words=example.WORDS)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        num_generations=2,
        **example.no_activation_checkpointing(),
        **config,
    )
    return VPPOTrainer(
        model=tiny_qwen_vl("qwen2_vl", processor.tokenizer),
        processing_class=processor,
        reward_funcs=example.colour_reward,
        train_dataset=example.tiny_dataset(2),
        args=args,
        **vppo,
    )


def _one_step_log(trainer):
    trainer.train()
    (row,) = [row for row in trainer.state.log_history if "vppo/dependency_mean" in row]
    return row


@pytest.mark.slow
@pytest.mark.parametrize("dependency", ["kl", "sampled"])
def test_dependency_passes_run_without_dropout(tmp_path, dependency):
    """With identical views the dependency is exactly 0 however much dropout the model has: both passes
    run in eval mode (they drew different dropout masks, and the noise moved the TAS factors to 0.9-1.1)."""
    identity = lambda pixel_values, grid, generator: pixel_values.clone()  # noqa: E731
    trainer = _example().make_trainer(str(tmp_path), steps=1, accumulation=1, perturb=identity, dependency=dependency)
    for module in trainer.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
    row = _one_step_log(trainer)
    assert row["vppo/dependency_mean"] == 0.0
    assert row["vppo/tas_factor_min"] == row["vppo/tas_factor_max"] == 1.0
    assert trainer.model.training  # each module's mode restored after the passes


@pytest.mark.slow
def test_exact_dependency_with_trl_fp32_lm_head(tmp_path):
    """TRL's ``cast_lm_head_to_fp32`` on a bf16 model: bf16 hidden states meet an fp32 head (it raised)."""
    from trl import GRPOConfig

    from vppo_core.integrations.tiny_vlm import SPECIAL_TOKENS, tiny_processor, tiny_qwen_vl

    example = _example()
    processor = tiny_processor("qwen2_vl", words=example.WORDS)
    suppress = processor.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS[3:7]))
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=4,
        generation_kwargs={"suppress_tokens": suppress},
        **example.no_activation_checkpointing(),
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        cast_lm_head_to_fp32=True,
    )
    trainer = VPPOTrainer(
        model=tiny_qwen_vl("qwen2_vl", processor.tokenizer, dtype=torch.bfloat16),
        processing_class=processor,
        reward_funcs=example.colour_reward,
        train_dataset=example.tiny_dataset(1),
        args=args,
    )
    row = _one_step_log(trainer)
    assert math.isfinite(row["vppo/dependency_mean"]) and row["vppo/dependency_mean"] >= 0
