"""A user's training step that calls the public functions runs under torch.compile(fullgraph=True)."""

import pytest
import torch

import vppo_core as V


def user_step(lp, old, aug, adv_rewards, group_ids, mask):
    adv = V.grpo_advantages(adv_rewards, group_ids)
    dep = V.sampled_visual_dependency(old, aug, mask)
    keep = V.token_filter_mask(dep, mask, k=0.4)
    shaped = V.shape_advantages(adv, dep, mask)
    out = V.vppo_loss(lp, old, shaped, mask, keep, entropy_coef=0.06)
    return out.loss, out.kept_frac, V.advantage_factors(dep, mask, group_ids=group_ids)


@pytest.mark.slow
def test_fullgraph_compile_matches_eager():
    torch._dynamo.reset()
    B, T = 8, 12
    old = -torch.rand(B, T) * 3
    aug = old - torch.rand(B, T) ** 2
    lp = (old + 0.2 * torch.randn(B, T)).requires_grad_()
    rewards = (torch.rand(B) < 0.5).float()
    groups = torch.arange(B) // 4
    mask = torch.rand(B, T) < 0.8
    compiled = torch.compile(user_step, fullgraph=True)
    got = compiled(lp, old, aug, rewards, groups, mask)
    (grad_c,) = torch.autograd.grad(got[0], lp)
    want = user_step(lp, old, aug, rewards, groups, mask)
    (grad_e,) = torch.autograd.grad(want[0], lp)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-7)
