"""The test helpers themselves: a check that cannot fail is a defect."""

import pytest
import torch

from .helpers import assert_inputs_unchanged


def _scale_first(states, weights=None):
    states[0].mul_(2.0)
    return states[0]


def _bump(x, *, extra):
    extra["w"].add_(1.0)
    return x


def test_assert_inputs_unchanged_sees_tensors_inside_containers():
    with pytest.raises(AssertionError, match="modified in place"):
        assert_inputs_unchanged(_scale_first, (torch.ones(2), torch.ones(2)))
    with pytest.raises(AssertionError, match="modified in place"):
        assert_inputs_unchanged(_bump, torch.ones(1), extra={"w": torch.zeros(1)})
    nan = torch.tensor([float("nan"), 1.0])
    assert assert_inputs_unchanged(lambda t: t + 1, nan).isnan()[0]  # NaN-aware: an unchanged NaN passes
