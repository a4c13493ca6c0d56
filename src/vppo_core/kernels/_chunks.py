"""Row chunking shared by the eager, chunked vocabulary kernels (divergences, entropy, Hellinger, ...).

Inputs are ``[batch, seq, vocab]`` with any strides; rows are processed ``chunk_rows`` at a time so
that float32 temporaries exist for one chunk only, and a slice such as ``logits[:, -R - 1 : -1]`` is
read in place.
"""

from collections.abc import Iterator

import torch
from torch import Tensor

# Float32 bytes of one upcast chunk buffer; a handful of such buffers are live at once. Small enough to
# stay below glibc's mmap threshold (32 MiB at most): larger temporaries are mapped and unmapped by
# every op, and the page faults then cost more than the arithmetic (2-3x slower at vocab 151 936).
CHUNK_BYTES = 8 * 2**20


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one float32 chunk buffer holds about ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 inputs (oracles, gradcheck), float32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def flatten_if_free(t: Tensor) -> Tensor:
    """``[B, S, V]`` -> ``[1, B*S, V]`` when that is a view (longer chunks, fewer Python steps).

    Decided from the strides, not by trying ``view``: Dynamo cannot trace an ``except RuntimeError``,
    so sliced logits (``logits[:, :-1]``) failed inside a caller's ``torch.compile``.
    """
    if t.shape[0] == 1 or t.shape[1] == 1 or t.stride(0) == t.shape[1] * t.stride(1):
        return t.view(1, -1, t.shape[-1])
    return t


def row_chunks(shape: torch.Size, chunk_rows: int) -> Iterator[tuple[int, slice]]:
    """``(batch index, seq slice)`` of every chunk of a ``[batch, seq, ...]`` shape."""
    for b in range(shape[0]):
        for s in range(0, shape[1], chunk_rows):
            yield b, slice(s, s + chunk_rows)
