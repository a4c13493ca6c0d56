"""The verl recipe's pure functions (examples/verl/vppo_policy_loss.py), with or without verl installed.

- Folding TGF into the advantages (``vppo_token_advantages``) gives exactly VPPO's loss and gradient.
- The registered loss (``compute_policy_loss_vppo``) is ``vppo_loss`` with verl's settings and its
  global normalisation (``batch_num_tokens / dp_size``), rollout weights and metric names.
- The perturbation of verl's per-sample ``multi_modal_inputs`` is the library's patch blackening.
- With verl importable: ``"vppo"`` is registered and equals verl's ``"vanilla"`` loss on the same inputs.
"""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vppo_core as V
from vppo_core.perturb import PixelLayout, blacken_patches_pixel_values

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "verl" / "vppo_policy_loss.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("vppo_policy_loss", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


def _batch(b=8, t=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[-1] = 0  # a response with no valid token
    mask = torch.arange(t) < lengths[:, None]
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    lp = (old + torch.randn(b, t, generator=g, dtype=dtype)).requires_grad_()  # ratios clip both ways
    adv = torch.randn(b, generator=g, dtype=dtype)[:, None] * mask  # verl: token-level, 0 at padding
    dep = torch.rand(b, t, generator=g, dtype=dtype) ** 4 * mask
    return lp, old, adv, mask, dep


def test_folded_advantages_give_vppo_loss_and_gradient_exactly():
    lp, old, adv, mask, dep = _batch()
    out = recipe.vppo_token_advantages(adv, dep, mask, k=0.4, beta_min=0.9)
    factors = V.advantage_factors(dep, mask, beta_min=0.9)
    keep = V.token_filter_mask(dep, mask, k=0.4)
    assert torch.equal(out.factors, factors) and torch.equal(out.token_mask, keep)
    assert bool((out.advantages[~keep] == 0).all())

    folded = V.vppo_loss(lp, old, out.advantages, mask, dual_clip=3.0)
    (g_folded,) = torch.autograd.grad(folded.loss, lp)
    reference = V.vppo_loss(lp, old, adv[:, 0] * factors, mask, keep, dual_clip=3.0)
    (g_reference,) = torch.autograd.grad(reference.loss, lp)
    assert folded.dual_clip_frac > 0 and folded.clip_frac > 0  # the clips are exercised
    torch.testing.assert_close(folded.loss, reference.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_folded, g_reference, rtol=1e-12, atol=1e-12)


def test_per_trajectory_advantages_are_broadcast():
    _, _, adv, mask, dep = _batch()
    token_level = recipe.vppo_token_advantages(adv, dep, mask).advantages
    per_trajectory = recipe.vppo_token_advantages(adv[:, 0], dep, mask).advantages
    torch.testing.assert_close(token_level, per_trajectory.to(token_level.dtype))


@pytest.mark.parametrize("as_mapping", [False, True])
def test_policy_loss_is_vppo_loss_with_verl_normalisation(as_mapping):
    lp, old, adv, mask, _ = _batch(seed=1)
    weights = torch.rand(mask.shape, dtype=lp.dtype) + 0.5
    settings = {
        "clip_ratio": 0.2,
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 3.0,
        "global_batch_info": {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 12},
    }
    config = settings if as_mapping else SimpleNamespace(**settings)
    loss, metrics = recipe.compute_policy_loss_vppo(old, lp, adv, mask, "token-mean", config, weights)
    expected = V.vppo_loss(lp, old, adv, mask, weights, clip_low=0.2, clip_high=0.28, dual_clip=3.0, num_tokens=20)
    torch.testing.assert_close(loss, expected.loss)
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert all(not m.requires_grad for m in metrics.values())
    torch.testing.assert_close(metrics["actor/pg_clipfrac"], expected.clip_frac)

    loss, _ = recipe.compute_policy_loss_vppo(old, lp, adv, mask, "seq-mean-token-mean", config)
    expected = V.vppo_loss(
        lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean", num_sequences=6
    )
    torch.testing.assert_close(loss, expected.loss)


def test_policy_loss_defaults_and_errors():
    lp, old, adv, mask, _ = _batch(seed=2)
    loss, _ = recipe.compute_policy_loss_vppo(old, lp, adv, mask)  # no config: PPO clip 0.2, dual clip 3
    torch.testing.assert_close(loss, V.vppo_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2).loss)
    with pytest.raises(ValueError, match=r"loss_agg_mode must be one of .* got 'token-sum'"):
        recipe.compute_policy_loss_vppo(old, lp, adv, mask, "token-sum")
    config = {"global_batch_info": {"loss_scale_factor": 4}}
    with pytest.raises(ValueError, match="loss_scale_factor"):
        recipe.compute_policy_loss_vppo(old, lp, adv, mask, "seq-mean-token-sum-norm", config)


def test_perturb_multi_modal_inputs_blackens_each_sample_like_the_library():
    g = torch.Generator().manual_seed(3)
    samples = [
        {"pixel_values": torch.randn(16, 1176), "image_grid_thw": torch.tensor([[1, 4, 4]]), "images_seqlens": 4},
        None,
        {"input_ids_only": True},
        SimpleNamespace(data={"pixel_values": torch.randn(32, 1176), "image_grid_thw": torch.tensor([[1, 4, 4]] * 2)}),
    ]
    originals = [samples[0]["pixel_values"].clone(), samples[3].data["pixel_values"].clone()]
    out = recipe.perturb_multi_modal_inputs(samples, PixelLayout(), torch.Generator().manual_seed(7))
    assert out[1] is None and out[2] is samples[2]
    assert out[0]["images_seqlens"] == 4 and out[0]["image_grid_thw"] is samples[0]["image_grid_thw"]
    assert torch.equal(samples[0]["pixel_values"], originals[0])  # inputs untouched
    assert torch.equal(samples[3].data["pixel_values"], originals[1])
    same = torch.Generator().manual_seed(7)  # the same draws, sample after sample
    for got, sample in ((out[0], samples[0]), (out[3], samples[3].data)):
        want = blacken_patches_pixel_values(
            sample["pixel_values"], sample["image_grid_thw"], PixelLayout(), generator=same
        )
        assert torch.equal(got["pixel_values"], want)
    assert not torch.equal(out[0]["pixel_values"], originals[0])
    del g


def test_registered_in_verl_and_equal_to_vanilla():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig

    assert core_algos.get_policy_loss_fn("vppo") is recipe.compute_policy_loss_vppo
    lp, old, adv, mask, dep = _batch(seed=4, dtype=torch.float32)
    folded = recipe.vppo_token_advantages(adv, dep, mask).advantages
    config = ActorConfig(strategy="fsdp", rollout_n=1, clip_ratio_high=0.28, ppo_micro_batch_size_per_gpu=1)
    config.global_batch_info.update(dp_size=2, batch_num_tokens=int(mask.sum()) * 2)
    ours, _ = core_algos.get_policy_loss_fn("vppo")(old, lp, folded, mask, "token-mean", config)
    vanilla, _ = core_algos.compute_policy_loss_vanilla(old, lp, folded, mask, "token-mean", config)
    torch.testing.assert_close(ours, vanilla)
    torch.testing.assert_close(*(torch.autograd.grad(x, lp)[0] for x in (ours, vanilla)))


class _FakeTransferQueue:
    """In-memory stand-in for TransferQueue's kv_batch_get/kv_batch_put (per-sample fields, as verl stores them)."""

    def __init__(self):
        self.store = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        from tensordict import NonTensorStack
        from transfer_queue import KVBatchMeta

        for name in [] if fields is None else fields.keys():
            value = fields.get(name)
            items = value.tolist() if isinstance(value, NonTensorStack) else list(value.unbind(0))
            for key, item in zip(keys, items):
                self.store.setdefault(key, {})[name] = item
        return KVBatchMeta(keys=list(keys), tags=[{} for _ in keys], partition_id=partition_id)

    def kv_batch_get(self, keys, partition_id, select_fields):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        rows = [{f: self.store[k][f] for f in select_fields if f in self.store[k]} for k in keys]
        return list_of_dict_to_tensordict(rows)


def test_vppo_sync_trainer_glue_with_verl_and_a_fake_transfer_queue(monkeypatch):
    """verl's own _compute_old_log_prob/_compute_advantage under the recipe's overrides; TQ and the actor faked."""
    pytest.importorskip("transfer_queue")
    trainer_base = pytest.importorskip("verl.trainer.ppo.v1.trainer_base")
    from omegaconf import OmegaConf
    from verl.utils import tensordict_utils as tu
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    assert recipe.HAS_VERL_V1
    fake = _FakeTransferQueue()
    monkeypatch.setattr(recipe, "tq", fake)
    monkeypatch.setattr(trainer_base, "tq", fake)
    g = torch.Generator().manual_seed(0)
    rows, keys = [], []
    for i in range(4):  # two prompts x two responses; rewards 1, 0 in each group
        prompt, response = 3 + i % 2, 2 + i
        image = {"pixel_values": torch.randn(16, 1176, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}
        rows.append(
            {
                "input_ids": torch.randint(0, 50, (prompt + response,), generator=g),
                "response_mask": torch.ones(response, dtype=torch.int64),
                "multi_modal_inputs": image,
                "uid": f"p{i // 2}",
                "rm_scores": torch.cat([torch.zeros(response - 1), torch.tensor([float(i % 2 == 0)])]),
            }
        )
        keys.append(f"p{i // 2}_{i % 2}_0")  # verl's {uid}_{session}_{index}
    batch = fake.kv_batch_put(keys, "train", list_of_dict_to_tensordict(rows))
    seen = []

    def compute_log_prob(meta):  # log pi(o_t) = -0.01 t - mean(relu(pixels)): depends on the image
        # verl's engine reads the temperature from every micro-batch (a KeyError without it)
        assert meta.extra_info.get("temperature") == 0.7, meta.extra_info
        data = fake.kv_batch_get(meta.keys, meta.partition_id, ["input_ids", "multi_modal_inputs"])
        images = tu.get(data, "multi_modal_inputs")
        seen.append([m["pixel_values"] for m in images])
        logps = [
            -0.01 * torch.arange(len(ids)) - m["pixel_values"].relu().mean()
            for ids, m in zip(data["input_ids"].unbind(), images)
        ]
        nested = torch.nested.as_nested_tensor(logps, layout=torch.jagged)
        fields = tu.get_tensordict(
            {
                "log_probs": nested,
                "entropy": torch.nested.as_nested_tensor([x * 0 + 1 for x in logps], layout=torch.jagged),
            }
        )
        fake.kv_batch_put(meta.keys, meta.partition_id, fields)
        return meta

    trainer = object.__new__(recipe.VPPOTrainerSync)
    trainer.config = OmegaConf.create(
        {
            "algorithm": {
                "vppo": {"k": 0.5},
                "adv_estimator": "grpo",
                "use_kl_in_reward": False,
                "gamma": 1.0,
                "lam": 1.0,
            },
            "actor_rollout_ref": {
                "actor": {"loss_agg_mode": "token-mean", "loss_scale_factor": None},
                "rollout": {"calculate_log_probs": False, "temperature": 0.7, "n": 2},
            },
        }
    )
    trainer.processor = SimpleNamespace(image_processor=PixelLayout())
    trainer.actor_rollout_wg = SimpleNamespace(compute_log_prob=compute_log_prob)
    metrics = {}
    batch = trainer._compute_advantage(trainer._compute_old_log_prob(batch, metrics), metrics)

    assert len(seen) == 2 and not torch.equal(seen[0][0], seen[1][0])  # the second pass saw perturbed images
    for row, key in zip(rows, keys):  # the real images are back for the update
        assert torch.equal(
            fake.store[key]["multi_modal_inputs"]["pixel_values"], row["multi_modal_inputs"]["pixel_values"]
        )
    out = fake.kv_batch_get(keys, "train", ["old_log_probs", "vppo_dependency", "advantages", "response_mask"])
    out = out.to_padded_tensor()
    mask = out["response_mask"].bool()
    shift = torch.stack([p.relu().mean() - q.relu().mean() for p, q in zip(seen[1], seen[0])])  # log pi(I) - log pi(I')
    want = V.sampled_visual_dependency(torch.zeros(mask.shape), -shift[:, None].expand(mask.shape), mask)
    torch.testing.assert_close(out["vppo_dependency"], want)
    keep = V.token_filter_mask(out["vppo_dependency"], mask, k=0.5)
    assert bool((out["advantages"][~keep] == 0).all()) and bool((out["advantages"][keep] != 0).all())
    assert metrics["vppo/kept_frac"] == pytest.approx(float(keep.sum() / mask.sum()))
    assert metrics["vppo/tas_factor_mean"] == pytest.approx(1.0) and metrics["vppo/tas_factor_min"] >= 0.9 - 1e-6


def test_vppo_sync_trainer_runs_as_verl_sync_mode(monkeypatch):
    """verl finds the class by its name "vppo_sync", then compares trainer_mode with "sync" (replay
    buffer, batch size, TransferQueue checkpoints); under the name it took the asynchronous paths."""
    pytest.importorskip("transfer_queue")
    pytest.importorskip("verl.trainer.ppo.v1.trainer_base")
    from omegaconf import OmegaConf

    seen = []
    monkeypatch.setattr(
        recipe.PPOTrainerSync, "__init__", lambda self, config: seen.append(config.trainer.v1.trainer_mode)
    )
    config = OmegaConf.create({"trainer": {"v1": {"trainer_mode": "vppo_sync"}}})
    OmegaConf.set_struct(config, True)  # as Hydra hands it over
    recipe.VPPOTrainerSync(config)
    assert seen == ["sync"]
    bypass = OmegaConf.create(
        {"trainer": {"v1": {"trainer_mode": "vppo_sync"}}, "algorithm": {"rollout_correction": {"bypass_mode": True}}}
    )
    with pytest.raises(ValueError, match="bypass_mode=True takes the rollout engine's log-probabilities"):
        recipe.VPPOTrainerSync(bypass)
