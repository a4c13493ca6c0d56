"""The kernels under conditions a training loop meets: many input layouts in one process, a compiler
that fails in the backward, a second differentiation, and degenerate arguments.

- Layouts: the compiled functions are keyed on a canonical layout of the row views
  (`._compile._canonical`, `._compile._layout`), so ten layouts in both argument orders in a row never
  reach Dynamo's recompile limit (with one function for all layouts, the 9th graph raised
  ``FailOnRecompileLimitHit``).
- Backward fallback: with ``backend="auto"`` (and always for ``"cpu"``), a compile failure in the
  backward warns once and gives ``"torch"``'s gradients, as the forward does.
- First derivatives only: differentiating a gradient taken with ``create_graph=True`` raises instead of
  silently dropping the second-order term.
- Empty vocabularies and hidden states of the wrong rank raise a ``ValueError`` naming the argument.
"""

import re
import warnings
from collections.abc import Callable

import pytest
import torch

import vppo_core.kernels as K
from vppo_core import (
    token_entropy,
    visual_dependency,
    visual_dependency_and_entropies,
    visual_dependency_from_hidden,
)
from vppo_core.kernels import _compile, _cpu, _torch

needs_compile = pytest.mark.skipif(not _compile.usable(), reason="torch.compile is not usable here")
needs_cc = pytest.mark.skipif(not _cpu.available(), reason="no C compiler for the cpu backend")
V = 5000  # one block and a tail: the blocked graph, as in test_kernels_buffers


def oracle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 KL(softmax(x) || softmax(y)) per row, from the definition."""
    logp, logq = x.double().log_softmax(-1), y.double().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 2


# Layouts a training loop hands over: contiguous, sliced, strided, transposed, broadcast. They come to
# three compiled layouts (rows contiguous in both inputs, strided in x, strided in y; see
# `test_canonical_row_views` for the copies and views behind that). With one compiled function for
# all layouts, each of them was a new graph of it, and the 9th raised FailOnRecompileLimitHit.
LAYOUTS: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
    "contiguous": lambda: (randn(3, 7, V), randn(3, 7, V)),
    "x vocab-transposed": lambda: (randn(3, V, 7).transpose(1, 2), randn(3, 7, V)),
    "x vocab stride 2": lambda: (randn(3, 7, 2 * V)[..., ::2], randn(3, 7, V)),
    "x token stride 2": lambda: (randn(3, 14, V)[:, ::2], randn(3, 7, V)),
    "x batch stride 2": lambda: (randn(6, 7, V)[::2], randn(3, 7, V)),
    "x seq slice": lambda: (randn(3, 9, V)[:, 1:-1], randn(3, 7, V)),
    "y expanded": lambda: (randn(3, 7, V), randn(1, 1, V).expand(3, 7, V)),
    "x permuted": lambda: (randn(7, 3, V).transpose(0, 1), randn(3, 7, V)),
    "both seq slice": lambda: (randn(3, 9, V)[:, 1:-1], randn(3, 9, V)[:, :-2]),
    "contiguous, new length": lambda: (randn(2, 5, V), randn(2, 5, V)),
}


def check_layouts(backend: str) -> None:
    for name, make in LAYOUTS.items():
        x, y = make()
        for divergence in ("kl", "reverse_kl"):  # reverse_kl runs the kernel with the arguments swapped
            leaves = [t.detach().requires_grad_() for t in (x, y)]  # detach keeps the strides
            got = visual_dependency(*leaves, divergence=divergence, backend=backend)
            upstream = torch.randn(got.shape)
            grads = torch.autograd.grad((got * upstream).sum(), leaves)
            ref_leaves = [t.detach().double().requires_grad_() for t in (x, y)]
            ref = oracle(*(ref_leaves if divergence == "kl" else ref_leaves[::-1]))
            ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), ref_leaves)
            where = f"{backend} {name} {divergence}"
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=where)
            for g, r in zip(grads, ref_grads):
                assert g.shape == r.shape and g.dtype == torch.float32, where
                torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6, msg=where)


@pytest.mark.slow
@needs_compile
def test_many_layouts_and_argument_orders_in_a_row():
    """Ten layouts in both argument orders, forward and backward, on ``"compile"`` and then on
    ``"cpu"`` (whose backward is the same compiled pass): no recompile limit, no fallback, float64
    values and gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to "torch" would hide a failure
        check_layouts("compile")
        if _cpu.available():
            check_layouts("cpu")
    assert _compile.usable()


def test_canonical_row_views():
    """What the compiled functions see: unit vocabulary stride, rows contiguous or at a larger stride
    (read in place), one row with contiguous strides (a view); strided vocabularies and overlapping
    rows are copied."""
    base = torch.randn(4, 2 * V)
    cases = {  # view -> (copied, layout)
        "contiguous": (base[:, :V].contiguous(), False, "c"),
        "row slice": (base[:, :V], False, "s"),
        "one row": (base[1:2, V:], False, "c1"),
        "vocab stride 2": (base[:, ::2], True, "c"),
        "expanded": (base[:1, :V].expand(4, V), True, "c"),
    }
    for name, (t, copied, layout) in cases.items():
        got = _compile._canonical(t)
        assert torch.equal(got, t), name
        assert (got.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()) == copied, name
        assert got.stride(1) == 1 and got.stride(0) >= V, name
        assert _compile._layout(got) == layout, name


# ----------------------------------------------------------------------------- backward fallback


def _broken(*args: object, **kwargs: object) -> None:
    raise RuntimeError("simulated compiler failure")


def _fallback_cases() -> list[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]:
    return [
        ("kl", lambda a, b: visual_dependency(a, b, temperature=0.8)),
        ("jsd", lambda a, b: visual_dependency(a, b, temperature=0.8, divergence="jsd")),
        ("entropy", lambda a, b: token_entropy(a, temperature=0.8)),
        ("joint", lambda a, b: torch.stack(visual_dependency_and_entropies(a, b, temperature=0.8), -1)),
        ("hidden", lambda a, b: visual_dependency_from_hidden(a, b, HIDDEN_W, temperature=0.8, vocab_chunk_size=16)),
    ]


HIDDEN_W = torch.randn(40, 50, generator=torch.Generator().manual_seed(7)) * 0.3  # logits of size ~4


@pytest.mark.parametrize("forward_backend", ["compile"])  # ("cpu" compiles nothing: C forward and backward)
@pytest.mark.parametrize(("op", "fn"), _fallback_cases(), ids=[c[0] for c in _fallback_cases()])
def test_backward_falls_back_to_torch_when_compiling_fails(monkeypatch, forward_backend, op, fn):
    """``backend="auto"`` with the compiled forward working (here: the eager one standing in for it) and
    every compiled backward failing: one RuntimeWarning, ``"torch"``'s gradients, and no warning or
    compile attempt on the next call."""
    monkeypatch.setattr(K, "AUTO_COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_compile, "_state", {"broken": False})
    monkeypatch.setattr(_compile, "jsd_partial", _torch.jsd_partial_chunked)  # JSD's second sweep
    if forward_backend == "compile":
        monkeypatch.setattr(_cpu, "available", lambda: False)
        for name in ("forward", "entropy_forward", "joint_forward"):
            monkeypatch.setattr(_compile, name, getattr(_torch, name))
    calls = []

    def broken(*args: object) -> None:
        calls.append(1)
        _broken()

    for name in ("backward", "entropy_backward", "joint_backward"):
        monkeypatch.setattr(_compile, name, broken)
    g = torch.Generator().manual_seed(0)  # fixed data: the tolerance below is C vs eager rounding
    x, y = torch.randn(2, 3, 50, generator=g) * 2, torch.randn(2, 3, 50, generator=g) * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = []
        for _ in range(2):  # the second call must neither warn nor try to compile
            leaves = [t.detach().requires_grad_() for t in (x, y)]
            out = fn(*leaves)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            results.append(torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True))
    fallbacks = [
        w for w in caught if issubclass(w.category, RuntimeWarning) and "torch.compile failed" in str(w.message)
    ]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert "simulated compiler failure" in str(fallbacks[0].message)
    assert len(calls) == 1 and not _compile.usable()
    monkeypatch.setattr(K, "AUTO_COMPILE_MIN_ELEMENTS", 1 << 40)  # the reference: "torch" throughout
    leaves = [t.detach().requires_grad_() for t in (x, y)]
    out = fn(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    reference = torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True)
    for grads in results:
        for g, r in zip(grads, reference):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)  # C vs eager row sums


def test_explicit_compile_backend_raises_when_its_backward_fails(monkeypatch):
    """An explicit ``backend="compile"`` is not swapped for another backend, forward or backward."""
    monkeypatch.setattr(_compile, "_state", {"broken": False})
    monkeypatch.setattr(_compile, "forward", _torch.forward)
    monkeypatch.setattr(_compile, "backward", _broken)
    x = randn(2, 3, 50).requires_grad_()
    out = visual_dependency(x, randn(2, 3, 50), backend="compile")
    with pytest.raises(RuntimeError, match="simulated compiler failure"):
        out.sum().backward()


# ----------------------------------------------------------------------------- first derivatives only

SECOND_ORDER = r"first derivatives only.*create_graph=True"


def _second_order_cases() -> list:
    compile_marks = [pytest.mark.slow, needs_compile]
    return [
        pytest.param("torch", "kl", id="torch-kl"),
        pytest.param("compile", "kl", id="compile-kl", marks=compile_marks),
        pytest.param("cpu", "kl", id="cpu-kl", marks=[*compile_marks, needs_cc]),
        pytest.param("torch", "entropy", id="torch-entropy"),
        pytest.param("torch", "joint", id="torch-joint"),
        pytest.param("torch", "hidden", id="torch-hidden"),
    ]


@pytest.mark.parametrize(("backend", "op"), _second_order_cases())
def test_double_backward_raises(backend, op):
    """A gradient taken with ``create_graph=True`` is the ordinary gradient; differentiating it again
    raises, alone or summed with a term that has a second derivative (which used to hide the loss)."""
    x0, y = randn(2, 3, V if backend != "torch" else 64), randn(2, 3, V if backend != "torch" else 64)
    w = torch.randn(30, x0.shape[-1])

    def term(x: torch.Tensor) -> torch.Tensor:
        if op == "entropy":
            return token_entropy(x, backend=backend).sum()
        if op == "joint":
            return sum(t.sum() for t in visual_dependency_and_entropies(x, y, backend=backend))
        if op == "hidden":
            return visual_dependency_from_hidden(x, y, w, backend=backend, vocab_chunk_size=8).sum()
        return visual_dependency(x, y, backend=backend).sum()

    x = x0.clone().requires_grad_()
    (first,) = torch.autograd.grad(term(x), x)
    (g,) = torch.autograd.grad(term(x), x, create_graph=True)
    torch.testing.assert_close(g.detach(), first, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.grad((g * g).sum(), x)
    (g,) = torch.autograd.grad(term(x) + (x**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.grad((g * g).sum(), x)


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("backend", ["torch", "compile", "cpu", "auto"])
def test_empty_vocabulary_is_refused(backend):
    x = torch.randn(2, 3, 0)
    vocab = r"must have at least 1 vocabulary entry \(its last dimension\), got shape \(2, 3, 0\)"
    with pytest.raises(ValueError, match="logits_img " + vocab):
        visual_dependency(x, x, backend=backend)
    with pytest.raises(ValueError, match="logits_img " + vocab):
        visual_dependency_and_entropies(x, x, backend=backend)
    with pytest.raises(ValueError, match="logits " + vocab):
        token_entropy(x, backend=backend)
    with pytest.raises(ValueError, match=r"logits " + vocab.replace(r"\(2, 3, 0\)", r"\(3, 0\)")):
        token_entropy(x[0], backend=backend)
    h = torch.randn(2, 3, 8)
    with pytest.raises(
        ValueError,
        match=r"lm_head_weight must have at least 1 vocabulary entry \(its first dimension\), got shape \(0, 8\)",
    ):
        visual_dependency_from_hidden(h, h, torch.randn(0, 8), backend=backend)


@pytest.mark.parametrize("shape", [(8,), (1, 2, 3, 8)])
def test_hidden_states_of_the_wrong_rank_are_refused(shape):
    h, w = torch.randn(shape), torch.randn(40, 8)
    message = (
        f"hidden_img must be [batch, seq, hidden] or [tokens, hidden], got {len(shape)} dimensions (shape {shape})"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        visual_dependency_from_hidden(h, h, w)


def _backends_here() -> list[str]:
    return ["torch"] + (["cpu"] if _cpu.available() else []) + (["compile"] if _compile.usable() else [])


@pytest.mark.parametrize("backend", _backends_here())
def test_one_row_with_a_strided_vocabulary_is_read_where_it_is(backend):
    # "compile" gave a one-row [1, vocab] view its contiguous strides (as_strided) whatever the vocabulary
    # stride, reading the storage past the row: KL 1.0149 for 1.0055, gradients off by 100%
    g = torch.Generator().manual_seed(6)
    x_full, y_full = torch.randn(1, 1, 2000, generator=g), torch.randn(1, 1, 2000, generator=g)
    x, y = x_full[..., ::2].requires_grad_(), y_full[..., ::2]
    got = visual_dependency(x, y, backend=backend)
    (gx,) = torch.autograd.grad(got.sum(), x)
    xc = x.detach().contiguous().requires_grad_()
    ref = visual_dependency(xc, y.contiguous(), backend="torch")
    (gref,) = torch.autograd.grad(ref.sum(), xc)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        token_entropy(x.detach(), backend=backend), token_entropy(xc.detach(), backend="torch"), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", _backends_here())
def test_an_empty_batch_of_rows_that_do_not_flatten(backend):
    # "cpu" built one view per batch element: none for batch 0, and torch.cat([]) raised
    x_full = torch.randn(0, 5, 7, requires_grad=True)
    y_full = torch.randn(0, 5, 7)
    out = visual_dependency(x_full[:, :-1], y_full[:, :-1], backend=backend)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x_full.grad.shape == (0, 5, 7)
    assert token_entropy(x_full.detach()[:, :-1], backend=backend).shape == (0, 4)
