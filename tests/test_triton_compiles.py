"""Every Triton kernel compiles for NVIDIA GPUs (sm_80, sm_90, sm_100) down to a cubin, with no GPU present.

The CPU interpreter (``TRITON_INTERPRET=1``, see ``test_kernels_triton.py``) checks what the kernels
compute, but it runs them in numpy and never through the GPU compiler. Compiling each kernel through
Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX, then ``ptxas``) for the GPUs the library targets
catches, on a CPU-only machine, what only the compiler rejects (its typing and layout rules,
unsupported operations, errors from ptxas), and ``ptxas -v`` shows that no kernel spills registers.
Signatures use 64-bit integers for the sizes and strides, as Triton specialises them for tensors with
more than 2^31 elements."""

import os
import re
import subprocess

import pytest

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("compiling needs the real @triton.jit functions, not the interpreter's", allow_module_level=True)
triton = pytest.importorskip("triton")
try:  # Triton's ahead-of-time compile API (3.x) and the ptxas it ships for NVIDIA GPUs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
except ImportError as err:  # pragma: no cover - other Triton builds or versions
    pytest.skip(f"this Triton has no NVIDIA ahead-of-time compiler ({err})", allow_module_level=True)

from vppo_core.kernels import _triton_kernels as T  # noqa: E402


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton uses for ``arch``: a tool with a ``path`` (3.4: one for every arch), or a
    (path, version) pair (3.3)."""
    try:
        tool = get_ptxas(arch)
    except TypeError:  # Triton 3.4
        tool = get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


# every kernel of the Triton backend, with the constexprs its launcher passes (DIV: KL, JSD, Hellinger)
KERNELS = {
    "fwd-kl": (T._fwd_kernel, {"DIV": T.DIV_KL, "BLOCK": 4096}),
    "fwd-jsd": (T._fwd_kernel, {"DIV": T.DIV_JSD, "BLOCK": 4096}),
    "fwd-hellinger": (T._fwd_kernel, {"DIV": T.DIV_HELLINGER, "BLOCK": 4096}),
    "bwd-kl": (T._bwd_kernel, {"DIV": T.DIV_KL, "BLOCK": 2048}),
    "bwd-jsd": (T._bwd_kernel, {"DIV": T.DIV_JSD, "BLOCK": 2048}),
    "bwd-hellinger": (T._bwd_kernel, {"DIV": T.DIV_HELLINGER, "BLOCK": 2048}),
    "entropy-fwd": (T._entropy_fwd_kernel, {"BLOCK": 4096}),
    "entropy-bwd": (T._entropy_bwd_kernel, {"BLOCK": 2048}),
    "joint-fwd": (T._joint_fwd_kernel, {"BLOCK": 4096}),
    "joint-bwd": (T._joint_bwd_kernel, {"BLOCK": 2048}),
}
# argument name -> Triton type; "in" is the logits' dtype (inputs and their gradients)
ROLES = {
    **dict.fromkeys(("X", "Y", "GX", "GY"), "in"),
    **{"OUT": "*fp32", "GRAD": "*fp32", "STATS": "*fp64", "inv_t": "fp32"},
}
CASES = [(name, dtype, 90) for name in KERNELS for dtype in ("fp32", "bf16", "fp16")]
CASES += [(name, "bf16", arch) for name in KERNELS for arch in (80, 100)]


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        else:
            role = ROLES.get(arg, "i64")  # sizes and strides
            sig[arg] = f"*{dtype}" if role == "in" else role
    return sig


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize(("name", "dtype", "arch"), CASES, ids=[f"{n}-{d}-sm{a}" for n, d, a in CASES])
def test_kernel_compiles_to_a_cubin_without_spills(name, dtype, arch, tmp_path):
    fn, constexprs = KERNELS[name]
    src = ASTSource(
        fn=fn,
        signature=signature(fn, dtype, constexprs),
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
    assert kernel.asm["cubin"], f"{name}: empty cubin"
    ptx = kernel.asm["ptx"]
    assert f".target sm_{arch}" in ptx
    # ptxas's own report, with the ptxas Triton uses for this GPU: the kernel keeps everything in registers
    ptx_file = tmp_path / f"{name}.ptx"
    ptx_file.write_text(ptx)
    gpu = re.search(r"\.target (sm_\w+)", ptx).group(1)
    report = subprocess.run(
        [_ptxas_path(arch), "-v", "--gpu-name", gpu, str(ptx_file), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
        check=True,
    )
    log = report.stdout + report.stderr
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log), log


VECTOR_CASES = [(name, dtype) for name in KERNELS for dtype in ("fp32", "bf16")]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize(("name", "dtype"), VECTOR_CASES, ids=[f"{n}-{d}" for n, d in VECTOR_CASES])
def test_logits_are_read_with_128_bit_loads_when_the_vocabulary_is_a_multiple_of_16(name, dtype):
    """At launch Triton marks 16-byte aligned pointers and integers divisible by 16 (``tt.divisibility``);
    with a vocabulary such as Qwen's 151 936 the rows are then read (and gradients written) 16 bytes at a time."""
    fn, constexprs = KERNELS[name]
    sig = signature(fn, dtype, constexprs)
    aligned = [i for i, a in enumerate(fn.arg_names) if sig[a].startswith("*") or (sig[a] == "i64" and a != "SEQ")]
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), f"{name}: no 128-bit loads"
    loads = re.findall(r"ld\.global[.\w]*", ptx)
    narrow = [op for op in loads if ".v" not in op and not op.endswith(".b64")]  # 16/32-bit scalar loads
    assert len(narrow) <= 3, f"{name}: {narrow} (only the row's upstream gradients may be scalar loads)"
    if "bwd" in name:
        assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), f"{name}: gradients not written 16 bytes at a time"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
@pytest.mark.parametrize("name", ["fwd-jsd", "bwd-jsd"])
def test_jsd_log_ratio_divides_with_correct_rounding(name):
    """``log(2p / (p + q))`` is exactly 0 where ``p == q`` only if ``2p / 2p`` is exactly 1: Triton's ``/``
    compiles to an approximate ``div.full.f32``, so the kernels use ``tl.div_rn`` (``div.rn.f32``)."""
    fn, constexprs = KERNELS[name]
    src = ASTSource(
        fn=fn,
        signature=signature(fn, "fp32", constexprs),
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx, re.findall(r"div\.[\w.]+", ptx)
