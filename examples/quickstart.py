"""The core API on random tensors: dependency -> TAS -> TGF -> VPPO loss, in one GRPO-style step.

Run: python examples/quickstart.py
"""

import torch

import vppo_core as V


def main() -> None:
    torch.manual_seed(0)
    prompts, group, seq, vocab = 4, 8, 48, 1_000  # 4 prompts x 8 rollouts, 48 response tokens
    batch = prompts * group

    # What a rollout gives you: logits with the real and with the perturbed image, the sampled tokens'
    # log-probabilities under the old policy, a verifiable reward per response, a response mask.
    logits_img = torch.randn(batch, seq, vocab) * 2
    visual = torch.rand(batch, seq, 1) ** 8 * 4  # a few tokens depend strongly on the image
    logits_noimg = logits_img + visual * torch.randn(batch, seq, vocab)
    lengths = torch.randint(seq // 2, seq + 1, (batch,))
    mask = torch.arange(seq) < lengths[:, None]
    tokens = torch.distributions.Categorical(logits=logits_img).sample()
    old_logprobs = torch.log_softmax(logits_img, -1).gather(-1, tokens[..., None]).squeeze(-1)
    rewards = (torch.rand(batch) < 0.4).float()
    group_ids = torch.arange(batch) // group

    # 1. token visual dependency: exact KL over the vocabulary (or the reference code's k3 estimate)
    dep = V.visual_dependency(logits_img, logits_noimg, mask)
    logprobs_noimg = torch.log_softmax(logits_noimg, -1).gather(-1, tokens[..., None]).squeeze(-1)
    dep_k3 = V.sampled_visual_dependency(old_logprobs, logprobs_noimg, mask)

    # 2. GRPO advantages, then Trajectory-level Advantage Shaping
    adv = V.grpo_advantages(rewards, group_ids)
    factors = V.advantage_factors(dep, mask, beta_min=0.9)
    shaped = V.shape_advantages(adv, dep, mask, beta_min=0.9)

    # 3. Token-level Gradient Filtering
    keep = V.token_filter_mask(dep, mask, k=0.4)

    # 4. The clipped surrogate on the kept tokens, all-token denominator
    logprobs = (old_logprobs + 0.05 * torch.randn(batch, seq)).requires_grad_()
    out = V.vppo_loss(logprobs, old_logprobs, shaped, mask, keep, entropy_coef=0.06)
    out.loss.backward()

    valid = dep[mask]
    top = valid.sort(descending=True).values
    share = top[: max(1, int(0.2 * len(top)))].sum() / top.sum()
    print(f"tokens: {int(mask.sum())} valid of {batch * seq}")
    print(f"exact dependency: mean {valid.mean():.4f}, median {valid.median():.4f}, max {valid.max():.4f}")
    print(f"top-20% of tokens carry {100 * share:.1f}% of the total dependency")
    print(f"k3 estimate vs exact: mean {dep_k3[mask].mean():.4f} vs {valid.mean():.4f}")
    print(f"TAS factors: min {factors.min():.3f}, max {factors.max():.3f}, mean {factors.mean():.3f}")
    print(f"TGF kept {out.kept_frac:.1%} of valid tokens")
    print(f"loss {out.loss:.4f}  (pg {out.pg_loss:.4f}, nll {out.entropy_loss:.4f}, clip frac {out.clip_frac:.3f})")
    # Without the NLL term (which counts every valid token), only the kept tokens get a gradient.
    (pg_grad,) = torch.autograd.grad(V.vppo_loss(logprobs, old_logprobs, shaped, mask, keep).loss, logprobs)
    print(f"tokens with a policy-gradient signal: {int((pg_grad != 0).sum())} (kept tokens: {int(keep.sum())})")


if __name__ == "__main__":
    main()
