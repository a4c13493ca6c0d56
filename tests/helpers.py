"""Test helpers: input-purity checks and random batches."""

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def clone_all(values: Iterable[Any]) -> list[Any]:
    return [v.detach().clone() if isinstance(v, Tensor) else v for v in values]


def _bits(t: Tensor) -> Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def assert_inputs_unchanged(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and assert that no tensor argument was modified in place (NaN-aware, bitwise),
    including tensors inside tuples, lists and dicts (e.g. a model's per-layer hidden states)."""
    leaves, _ = tree_flatten((args, kwargs))
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    before = clone_all(tensors)
    out = fn(*args, **kwargs)
    for i, (a, b) in enumerate(zip(tensors, before)):
        assert torch.equal(_bits(a), _bits(b)), f"input tensor {i} (in argument order) was modified in place"
    return out


def random_mask(batch: int, seq: int, *, p_empty_row: float = 0.2, left_pad: bool = False) -> Tensor:
    """Right- (or left-) padded response mask with random lengths; some rows may be empty."""
    lengths = torch.randint(0, seq + 1, (batch,))
    lengths[torch.rand(batch) < p_empty_row] = 0
    if batch:
        lengths[0] = seq  # at least one full row
    pos = torch.arange(seq)
    if left_pad:
        return pos.unsqueeze(0) >= (seq - lengths).unsqueeze(1)
    return pos.unsqueeze(0) < lengths.unsqueeze(1)


class LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op produces (to pin 'no float32 copy of the logits')."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def hf_skip_reason() -> str | None:
    """Why the tiny Hugging Face models cannot run here (transformers missing, not running with this
    torch, or older than ``integrations.tiny_vlm`` needs), or None where they can.

    Below torch 2.6 it answers before importing transformers. There transformers 5 runs without torch,
    and its alias modules (``*_fast``, whose every attribute lookup imports a model module) raise
    ``ModuleNotFoundError`` for torchvision when pickle searches the loaded modules for a name; torch
    2.5's FX graph cache pickles such names, so every later compile in the process would fail.
    """
    if torch.torch_version.TorchVersion(torch.__version__) < "2.6":
        return f"transformers 5 needs torch >= 2.6, got torch {torch.__version__}"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    import transformers

    if not transformers.utils.is_torch_available():
        return f"transformers {transformers.__version__} does not run with torch {torch.__version__}"
    try:
        import vppo_core.integrations.tiny_vlm  # noqa: F401  (checks the transformers version)
    except ImportError as e:
        return str(e)
    return None


def require_transformers() -> ModuleType:
    """``transformers``, or a module-level skip saying why the tiny models cannot run (`hf_skip_reason`)."""
    reason = hf_skip_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
    import transformers

    return transformers


# Before torch 2.8, destroying a gloo group holds the GIL while it joins the group's threads, and a
# thread may need the GIL to free the last tensor of a finished collective: the teardown deadlocks
# now and then (fixed by pytorch/pytorch#154976, which releases the GIL there).
_GLOO_TEARDOWN_CAN_HANG = torch.torch_version.TorchVersion(torch.__version__) < "2.8"


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str) -> Iterator[None]:
    """A gloo process group for one spawned test worker, torn down when the block ends.

    Where the teardown can deadlock (torch < 2.8), a worker whose block succeeded waits for the
    others at a barrier and leaves with ``os._exit(0)`` instead (its results are already written).
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    if _GLOO_TEARDOWN_CAN_HANG:
        dist.barrier()
        os._exit(0)
    dist.destroy_process_group()
