"""grpo_advantages, trajectory_dependency, advantage_factors and shape_advantages."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vppo_core import advantage_factors, grpo_advantages, shape_advantages, trajectory_dependency

from .helpers import assert_inputs_unchanged, random_mask
from .oracles import factors_oracle, grpo_oracle, trajectory_oracle

# ----------------------------------------------------------------------------- GRPO advantages


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool])
def test_grpo_matches_oracle(scale, dtype):
    groups = torch.tensor([10, -3, 10, 7, -3, 7, 7, 10, 99, 99])  # arbitrary, non-contiguous ids
    rewards = torch.randint(0, 2, (10,)) if dtype in (torch.int64, torch.bool) else torch.randn(10)
    rewards = rewards.to(dtype)
    got = assert_inputs_unchanged(grpo_advantages, rewards, groups, scale=scale)
    expected = grpo_oracle(rewards.double().tolist(), groups.tolist(), scale=scale)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_grpo_equal_rewards_give_zero_and_binary_rewards():
    adv = grpo_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1, 1, 1]))
    assert torch.equal(adv[:2], torch.zeros(2))
    # one success among four: unbiased std = 0.5, advantage 1.5 and -0.5
    torch.testing.assert_close(adv[2:], torch.tensor([-0.5, 1.5, -0.5, -0.5]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["std", "none"])
def test_grpo_equal_fractional_rewards_give_exactly_zero(scale):
    # the reference reward 0.9 acc + 0.1 format makes all-0.1 and all-0.9 groups common; a float32
    # group mean of them is off by a few ulps, which std + eps (std ~ 0) turned into advantages of
    # up to 0.35, one sign for the whole group
    for value in (0.1, 0.9, 0.3):
        for size in (16, 64):
            rewards = torch.cat([torch.full((size,), value), torch.tensor([0.0, 1.0])])
            ids = torch.cat([torch.zeros(size, dtype=torch.long), torch.ones(2, dtype=torch.long)])
            adv = grpo_advantages(rewards, ids, scale=scale)
            assert torch.equal(adv[:size], torch.zeros(size)), (value, size, adv[:size].abs().max())
            assert adv[size:].abs().min() >= 0.5 - 1e-6  # the other group keeps its advantages


@given(st.lists(st.floats(-100, 100), min_size=2, max_size=24), st.integers(1, 6), st.integers(0, 2**16))
def test_grpo_property_group_means_are_zero(rewards, n_groups, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_groups, (len(rewards),), generator=g)
    ids[: 2 * n_groups] = torch.arange(2 * n_groups)[: len(rewards)] % n_groups  # no group of one
    counts = torch.bincount(ids)
    if (counts == 1).any():
        return
    adv = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), ids, scale="none")
    for gid in ids.unique():
        assert abs(adv[ids == gid].sum().item()) < 1e-9 * (1 + sum(abs(r) for r in rewards))


def test_grpo_group_of_one_is_an_error():
    with pytest.raises(ValueError, match=r"groups of one member: \[5\]"):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([3, 3, 5]))


def test_grpo_nan_reward_poisons_only_its_group():
    adv = grpo_advantages(torch.tensor([1.0, float("nan"), 1.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    assert adv[:2].isnan().all() and torch.isfinite(adv[2:]).all()


def test_grpo_errors():
    with pytest.raises(TypeError, match="scale"):
        grpo_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), scale="mad")
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        grpo_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), eps=-1.0)
    with pytest.raises(TypeError):  # float group ids
        grpo_advantages(torch.zeros(2), torch.zeros(2))
    with pytest.raises(TypeError):  # length mismatch
        grpo_advantages(torch.zeros(2), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- trajectory dependency


def test_trajectory_dependency_matches_oracle_and_ignores_padding():
    dep = torch.rand(6, 9)
    mask = random_mask(6, 9)
    dep_nan = dep.masked_fill(~mask, float("nan"))
    got = assert_inputs_unchanged(trajectory_dependency, dep_nan, mask)
    torch.testing.assert_close(got.double(), torch.tensor(trajectory_oracle(dep, mask), dtype=torch.float64))
    assert torch.equal(got[~mask.any(-1)], torch.zeros(int((~mask.any(-1)).sum())))


# ----------------------------------------------------------------------------- TAS factors


@pytest.mark.parametrize("beta", [(0.9, None), (0.8, 1.2), (0.5, None), (1.0, 1.0)])
@pytest.mark.parametrize("grouped", [False, True])
def test_factors_match_oracle(beta, grouped):
    dep = torch.rand(12, 7) ** 3
    mask = random_mask(12, 7)
    ids = torch.tensor([4, 4, 4, 1, 1, 1, 9, 9, 9, 2, 2, 2]) if grouped else None
    got = assert_inputs_unchanged(advantage_factors, dep, mask, beta_min=beta[0], beta_max=beta[1], group_ids=ids)
    expected = factors_oracle(dep, mask, beta[0], beta[1], ids.tolist() if grouped else None)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grouped", [False, True])
def test_factors_micro_batch_mean_matches_oracle(grouped):
    # the VPPO-RL code: min/max over the mini-batch (or group), the dynamic rule's mean per micro-batch
    g = torch.Generator().manual_seed(7)
    dep = torch.rand(12, 7, generator=g, dtype=torch.float64) ** 3
    mask = random_mask(12, 7)
    mask[1] = False  # an empty trajectory inside a micro-batch
    dep[6:8] = 0.0  # a micro-batch whose trajectories all sit at the minimum: mean 0, factor beta_min
    ids = torch.tensor([4, 4, 4, 1, 1, 1, 9, 9, 9, 2, 2, 2]) if grouped else None
    micro = torch.tensor([3, 3, 0, 0, 5, 5, 1, 1, 7, 7, 2, 2])
    got = assert_inputs_unchanged(advantage_factors, dep, mask, group_ids=ids, micro_batch_ids=micro)
    expected = factors_oracle(dep, mask, 0.9, None, ids.tolist() if grouped else None, micro.tolist())
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=1e-7)
    if not grouped:
        at_min = got[6:8][mask[6:8].any(-1)]
        assert at_min.numel() and torch.equal(at_min, torch.full_like(at_min, 0.9))
    # one micro-batch holding everything is the batch-wide rule
    same = advantage_factors(dep, mask, group_ids=ids, micro_batch_ids=torch.zeros(12, dtype=torch.long))
    torch.testing.assert_close(same, advantage_factors(dep, mask, group_ids=ids), rtol=0, atol=1e-12)
    # shape_advantages forwards the ids
    adv = torch.randn(12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(shape_advantages(adv, dep, mask, group_ids=ids, micro_batch_ids=micro), adv * got)


def test_factors_micro_batch_mean_is_one_per_micro_batch():
    g = torch.Generator().manual_seed(3)
    dep = torch.rand(16, 5, generator=g) ** 2
    mask = torch.rand(16, 5, generator=g) < 0.8
    mask[:, 0] = True
    micro = torch.arange(16) // 4
    factors = advantage_factors(dep, mask, micro_batch_ids=micro)
    for m in range(4):
        assert abs(factors[micro == m].mean().item() - 1.0) < 1e-6
    assert abs(factors.mean().item() - 1.0) < 1e-6  # equal-size micro-batches: the batch mean too
    assert not torch.allclose(factors, advantage_factors(dep, mask))
    with pytest.raises(ValueError, match=r"micro_batch_ids only applies to .*beta_max=None.*got beta_max=1.2"):
        advantage_factors(dep, mask, beta_max=1.2, micro_batch_ids=micro)
    nan = dep.clone()
    nan[2, 0] = float("nan")  # NaN in a valid token poisons the whole batch, as without micro-batches
    assert advantage_factors(nan, mask, micro_batch_ids=micro).isnan().all()


def test_factors_edge_cases():
    mask = torch.ones(3, 4, dtype=torch.bool)
    # all scores equal: factor 1 everywhere
    assert torch.equal(advantage_factors(torch.full((3, 4), 0.3), mask), torch.ones(3))
    # range below 1e-6: factor 1
    dep = torch.zeros(3, 4, dtype=torch.float64)
    dep[0] = 5e-7
    assert torch.equal(advantage_factors(dep, mask), torch.ones(3, dtype=torch.float64))
    # a single valid trajectory: factor 1; trajectories with no valid token: factor 1
    one = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(advantage_factors(torch.rand(3, 4), one), torch.ones(3))
    # empty batch
    assert advantage_factors(torch.rand(0, 4), torch.ones(0, 4)).shape == (0,)
    # a group with one valid trajectory keeps factor 1 while the other group is shaped
    dep = torch.tensor([[0.0], [1.0], [0.5], [0.7]])
    f = advantage_factors(dep, torch.ones(4, 1), group_ids=torch.tensor([0, 0, 1, 1]), beta_min=0.8, beta_max=1.2)
    torch.testing.assert_close(f, torch.tensor([0.8, 1.2, 0.8, 1.2]))
    f = advantage_factors(
        dep, torch.tensor([[1], [1], [1], [0]]), group_ids=torch.tensor([0, 0, 1, 1]), beta_min=0.8, beta_max=1.2
    )
    torch.testing.assert_close(f, torch.tensor([0.8, 1.2, 1.0, 1.0]))


def test_factors_nan_propagates_to_the_batch():
    dep = torch.rand(4, 3)
    dep[1, 0] = float("nan")
    assert advantage_factors(dep, torch.ones(4, 3)).isnan().all()
    # ... but NaN in padding is never read
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 0] = False
    assert torch.isfinite(advantage_factors(dep, mask)).all()


def test_factors_carry_no_gradient():
    dep = torch.rand(4, 3, requires_grad=True)
    assert not advantage_factors(dep, torch.ones(4, 3)).requires_grad


@given(
    batch=st.integers(1, 16),
    seq=st.integers(1, 8),
    beta_min=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    grouped=st.booleans(),
)
def test_property_mean_preserving_and_sign_preserving(batch, seq, beta_min, seed, grouped):
    g = torch.Generator().manual_seed(seed)
    dep = torch.rand(batch, seq, generator=g, dtype=torch.float64) ** 4
    mask = torch.rand(batch, seq, generator=g) < 0.7
    ids = torch.randint(0, 3, (batch,), generator=g) if grouped else None
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    factors = advantage_factors(dep, mask, beta_min=beta_min, group_ids=ids)
    valid = mask.any(-1)
    for gid in ids.unique() if grouped else [None]:
        members = valid & (ids == gid) if grouped else valid
        if members.any():
            assert abs(factors[members].mean().item() - 1.0) < 1e-9  # factors average to 1 per scope
    assert (factors >= beta_min - 1e-12).all()
    shaped = shape_advantages(adv, dep, mask, beta_min=beta_min, group_ids=ids)
    assert torch.equal(torch.sign(shaped), torch.sign(adv))  # never flips a sign


def test_shape_advantages_trajectory_and_token_level():
    dep = torch.rand(5, 6)
    mask = random_mask(5, 6)
    adv = torch.randn(5)
    factors = advantage_factors(dep, mask, beta_min=0.9, beta_max=1.1)
    got = assert_inputs_unchanged(shape_advantages, adv, dep, mask, beta_min=0.9, beta_max=1.1)
    torch.testing.assert_close(got, adv * factors)
    tok = adv.unsqueeze(-1).expand(5, 6).contiguous()
    torch.testing.assert_close(shape_advantages(tok, dep, mask, beta_min=0.9, beta_max=1.1), tok * factors[:, None])
    # gradients flow through the advantages unchanged (factors are constants)
    adv.requires_grad_()
    shape_advantages(adv, dep, mask).sum().backward()
    torch.testing.assert_close(adv.grad, advantage_factors(dep, mask))


def test_shape_errors():
    dep, mask = torch.rand(3, 4), torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"beta_min must be > 0 .*got 0"):
        shape_advantages(torch.ones(3), dep, mask, beta_min=0.0)
    for name, bad in (("beta_max", float("inf")), ("beta_min", float("nan")), ("beta_max", float("nan"))):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number, got {bad!r}"):
            shape_advantages(torch.ones(3), dep, mask, **{name: bad})
    with pytest.raises(ValueError, match=r"beta_max must be >= beta_min \(= 0.9\).*got 0.5"):
        shape_advantages(torch.ones(3), dep, mask, beta_max=0.5)
    with pytest.raises(ValueError, match=r"beta_min must be <= 1 with beta_max=None .*got 1.5"):
        shape_advantages(torch.ones(3), dep, mask, beta_min=1.5)
    with pytest.raises(ValueError, match=r"advantages must be \[batch\] or \[batch, seq\]"):
        shape_advantages(torch.ones(3, 5), dep, mask)
    with pytest.raises(TypeError):
        shape_advantages(torch.ones(4), dep, mask)
    assert math.isfinite(shape_advantages(torch.ones(3), dep, mask, beta_min=1.0).sum().item())
