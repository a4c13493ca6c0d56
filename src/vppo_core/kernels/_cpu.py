"""``"cpu"`` backend: hand-vectorised C kernels for the forward row statistics and the backward, built
at first use.

``torch.compile`` on the CPU leaves the forward compute-bound on the exponentials (Inductor's
``exp2`` is a general-purpose vector routine) and reads the next block only when it gets to it. The
kernel in ``_cpu_kernel.c`` does the same single read of each input as the compiled one (blocks
of 2048 entries, float32 block sums merged into float64 row sums), with two changes that matter on
a CPU: ``2^t`` from a 16-entry table and a cubic (AVX-512; a degree-6 polynomial elsewhere), and a
software prefetch of the next block while the current one is computed, so that the memory stream
and the arithmetic overlap. Rows are split over ``torch.get_num_threads()`` threads.

Build. The first call compiles the C file with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``; ``-O3 -march=native``, retried without ``-march=native`` if that fails) into
``$VPPO_CORE_CACHE_DIR`` (default ``~/.cache/vppo_core``, or a per-user folder in the temporary
directory when that is not writable), keyed by the source, the flags, the
compiler and the CPU model and flags, so a shared home directory never hands one machine another's
instructions. The build is about a second; later processes load the cached library.

Layers. The forward kernel is the custom op ``vppo_core::cpu_row_stats`` (opaque to a caller's
``torch.compile``); the float64 finalisation is `._rows`'s (``finish_*``, shared with `._compile`),
so both backends turn the same sums into values and saved statistics. The backward of the KL,
Hellinger, JSD, entropy and joint quantities is the custom op ``vppo_core::cpu_row_grads``: one read
of each input, one write of each gradient, from float32 row constants formed here in torch exactly as
`._torch`'s backward forms its own (`_constants`), so the two differ only in the exponential (and the
JSD's logarithm) and the order of a few float32 operations. The JSD's second forward sweep (its sums
once the lse's are known) is the custom op ``vppo_core::cpu_jsd_sums``, so no quantity of this backend
needs ``torch.compile``.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from . import _rows, _torch

LOG2E = 1.4426950408889634  # for the custom ops' bodies (run eagerly); traced code writes a literal
NCOL = 7  # columns of the kernel's per-row output
MODES = {"kl": 0, "jsd": 0, "hellinger": 1, "entropy": 2, "joint": 3}  # the forward's row statistics
GRAD_MODES = {"kl": 0, "hellinger": 1, "entropy": 2, "joint": 3, "jsd": 4, "jsd_sums": 5}  # the backward's
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SOURCE = Path(__file__).with_name("_cpu_kernel.c")
_FLAGS = ["-O3", "-std=c11", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-pthread"]

NO_COMPILER = "the cpu backend needs a C compiler (cc, gcc or clang, or $CC)"
BUILD_TIMEOUT_S = 300  # a compiler that hangs fails the build instead of the first call

#: ``"portable"``: build the portable C loops instead of the AVX-512 ones (tests use it to check both).
_state = {"portable": False}


def compiler() -> str | None:
    """The C compiler command the build uses (``$CC`` may hold arguments, e.g. ``ccache gcc``), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        words = shlex.split(name) if name else []
        if words and shutil.which(words[0]):
            return name
    return None


def _machine() -> str:
    """CPU model and feature flags (``/proc/cpuinfo``), or the platform's description elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    """``$VPPO_CORE_CACHE_DIR``, else ``~/.cache/vppo_core`` (``$XDG_CACHE_HOME``), else, if that cannot
    be created or written (a read-only home), a per-user folder in the temporary directory."""
    if os.environ.get("VPPO_CORE_CACHE_DIR"):
        return Path(os.environ["VPPO_CORE_CACHE_DIR"])
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vppo_core"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    shared = Path(tempfile.gettempdir()) / f"vppo_core-{user}"
    if _private(shared):
        return shared
    return _own_temporary_dir()  # someone else's, or open to others: a library planted there would load


@functools.cache
def _own_temporary_dir() -> Path:
    """A fresh private folder (``mkdtemp``, mode 0700), one per process."""
    return Path(tempfile.mkdtemp(prefix="vppo_core-"))


def _private(folder: Path) -> bool:
    """Create ``folder`` (mode 0700) if missing; whether it is a directory that this user owns and that
    nobody else can write (always true where there are no POSIX owners)."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return False
    if not hasattr(os, "getuid"):
        return True
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build(cc: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [*shlex.split(cc), *flags, str(_SOURCE), "-o", str(out), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"building the cpu kernel failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders never load a half-written file


@functools.cache
def library(portable: bool = False) -> ctypes.CDLL:
    """Build (or load from the cache) and load the kernel library; raises RuntimeError if it cannot."""
    cc = compiler()
    if cc is None:
        raise RuntimeError(NO_COMPILER)
    version = subprocess.run(
        [*shlex.split(cc), "--version"], capture_output=True, text=True, check=False, timeout=BUILD_TIMEOUT_S
    ).stdout
    extra = ["-DVPPO_PORTABLE"] if portable else []
    errors = []
    for arch in (["-march=native"], []):
        flags = [*_FLAGS, *arch, *extra]
        key = hashlib.sha256("\0".join([_SOURCE.read_text(), *flags, version, _machine()]).encode()).hexdigest()
        target = _cache_dir() / f"cpu_kernel_{key[:24]}.so"
        try:
            if not target.exists():
                _build(cc, flags, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
            errors.append(str(err))
    else:
        raise RuntimeError("; ".join(errors))
    fn = lib.vppo_cpu_row_stats
    fn.restype = ctypes.c_int
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # x, y, rows, vocab, stride_x, stride_y, dtype, mode, c, out, threads
    fn.argtypes = [pointer, pointer, i64, i64, i64, i64, i32, i32, ctypes.c_double, pointer, i32]
    grads = lib.vppo_cpu_row_grads
    grads.restype = ctypes.c_int
    # x, y, gx, gy, batch, seq, vocab, x strides (batch, seq), y strides, dtype, mode, c, 1/T, consts, sums,
    # threads
    f64 = ctypes.c_double
    grads.argtypes = [pointer] * 4 + [i64] * 7 + [i32, i32, f64, f64, pointer, pointer, i32]
    lib.vppo_cpu_simd_width.restype = ctypes.c_int
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel does not build or load here (the compiler's message), or None if it does (the
    first call builds it)."""
    try:
        library(_state["portable"])
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None


def available() -> bool:
    """Whether the kernel builds and loads here (the first call builds it)."""
    return unavailable_reason() is None


def simd_width() -> int:
    """Floats per vector of the loaded kernel: 16 (AVX-512) or 1 (the portable loops)."""
    return int(library(_state["portable"]).vppo_cpu_simd_width())


# ----------------------------------------------------------------------------- the custom op


@torch.library.custom_op("vppo_core::cpu_row_stats", mutates_args=())
def row_stats(x: Tensor, y: Tensor, mode: int, inv_t: Tensor) -> Tensor:
    """``[rows, 7]`` float64 row maxima and sums (see ``_cpu_kernel.c``) of ``[rows, vocab]`` CPU logits
    with unit stride along the vocabulary (any row stride); ``y`` is ignored for the entropy (mode 2).

    ``inv_t`` (``1/T``) is a 0-d tensor, so that a new temperature does not recompile a caller's graph.
    """
    out = torch.empty((x.shape[0], NCOL), dtype=torch.float64)
    if x.shape[0] == 0:
        return out
    library(_state["portable"]).vppo_cpu_row_stats(
        x.data_ptr(),
        y.data_ptr(),
        x.shape[0],
        x.shape[1],
        x.stride(0),
        y.stride(0),
        DTYPES[x.dtype],
        mode,
        LOG2E * float(inv_t),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


@row_stats.register_fake
def _(x: Tensor, y: Tensor, mode: int, inv_t: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], NCOL), dtype=torch.float64)


def _stats(op: str, inputs: tuple[Tensor, ...], inv_t: Tensor) -> Tensor:
    """``[batch, seq, 7]`` kernel output for ``[batch, seq, vocab]`` inputs (row views, no copy)."""
    lead = inputs[0].shape[:-1]
    parts = []
    for rows in _rows.row_views(*(_rows.unit_vocab_stride(t) for t in inputs)):
        parts.append(row_stats(rows[0], rows[-1], MODES[op], inv_t))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.view(*lead, NCOL)


def _inv_t(temperature: float) -> Tensor:
    return torch.tensor(1.0 / temperature, dtype=torch.float64)


# ----------------------------------------------------------------------------- forward and backward


def forward(x: Tensor, y: Tensor, temperature: float, divergence: str = "kl") -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (value ``[batch, seq]``, stats ``[batch, seq, 4]``), as `._compile.forward`."""
    inv_t = _inv_t(temperature)
    s = _stats(divergence, (x, y), inv_t).unbind(-1)
    if divergence == "hellinger":
        return _rows.finish_divergence(divergence, _rows.finish_hellinger(*s[:5], inv_t), torch.float32)
    lse_x, lse_y, a_x = _rows.finish_lse(*s[:5], inv_t)
    if divergence == "kl":
        return _rows.finish_divergence(divergence, (lse_x, lse_y, a_x), torch.float32)
    sums = _jsd_sums(x, y, lse_x, lse_y, temperature)
    return _rows.finish_jsd(lse_x, lse_y, sums[..., 0], sums[..., 1], torch.float32)


def entropy_forward(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (entropy ``[batch, seq]``, stats ``[batch, seq, 2]``)."""
    inv_t = _inv_t(temperature)
    s = _stats("entropy", (x,), inv_t).unbind(-1)
    return _rows.finish_entropy(s[0], s[1], s[2], inv_t, torch.float32)


def joint_forward(x: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``[batch, seq, vocab]`` -> (values ``[batch, seq, 3]`` = (KL, H(p), H(q)), stats ``[batch, seq, 5]``)."""
    inv_t = _inv_t(temperature)
    s = _stats("joint", (x, y), inv_t).unbind(-1)
    return _rows.finish_joint(s, inv_t, torch.float32)


# ----------------------------------------------------------------------------- the backward op

GCOL = 16  # columns of the kernel's per-row constants (see ``_cpu_kernel.c``)
G_KX, G_RX, G_KY, G_RY, G_G, G_RS, G_AM, G_KAX, G_RAX, G_GHX, G_KAY, G_RAY, G_GHY, G_AY = range(14)
G_BC = G_AM


def _grad_shapes(x: Tensor, y: Tensor, mode: int, need: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the op's two outputs: the input's, or ``(0,)`` where that gradient is not computed."""
    need_y = need & 2 and mode != GRAD_MODES["entropy"]
    return (tuple(x.shape) if need & 1 else (0,)), (tuple(y.shape) if need_y else (0,))


def _row_grads_call(
    x: Tensor,
    y: Tensor,
    gx: Tensor | None,
    gy: Tensor | None,
    mode: int,
    inv_t: Tensor,
    consts: Tensor,
    sums: Tensor | None,
) -> None:
    """``vppo_cpu_row_grads`` on ``[batch, seq, vocab]`` inputs: gradients into ``gx``/``gy`` (``None`` or
    empty: not computed), or, for the JSD's sweep, the row sums into ``sums``."""
    library(_state["portable"]).vppo_cpu_row_grads(
        x.data_ptr(),
        y.data_ptr(),
        gx.data_ptr() if gx is not None and gx.numel() else None,
        gy.data_ptr() if gy is not None and gy.numel() else None,
        x.shape[0],
        x.shape[1],
        x.shape[2],
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        DTYPES[x.dtype],
        mode,
        LOG2E * float(inv_t),
        float(inv_t),
        consts.data_ptr(),
        sums.data_ptr() if sums is not None else None,
        torch.get_num_threads(),
    )


@torch.library.custom_op("vppo_core::cpu_row_grads", mutates_args=())
def row_grads(x: Tensor, y: Tensor, consts: Tensor, mode: int, inv_t: Tensor, need: int = 3) -> tuple[Tensor, Tensor]:
    """Gradients (contiguous, in the inputs' dtype) of ``[batch, seq, vocab]`` CPU logits with unit stride
    along the vocabulary, from float32 row constants ``[batch * seq, 16]`` (see `_constants`). ``need``:
    bit 0 for ``x``'s gradient, bit 1 for ``y``'s; a gradient not needed (and ``y``'s for the entropy,
    mode 2, where ``y`` is ignored) is an empty tensor, neither computed nor allocated."""
    shape_x, shape_y = _grad_shapes(x, y, mode, need)
    gx, gy = torch.empty(shape_x, dtype=x.dtype), torch.empty(shape_y, dtype=y.dtype)
    if gx.numel() == 0 and gy.numel() == 0:
        return gx, gy
    _row_grads_call(x, y, gx, gy, mode, inv_t, consts, None)
    return gx, gy


@row_grads.register_fake
def _(x: Tensor, y: Tensor, consts: Tensor, mode: int, inv_t: Tensor, need: int = 3) -> tuple[Tensor, Tensor]:
    shape_x, shape_y = _grad_shapes(x, y, mode, need)
    return x.new_empty(shape_x), y.new_empty(shape_y)


@torch.library.custom_op("vppo_core::cpu_jsd_sums", mutates_args=())
def jsd_sums(x: Tensor, y: Tensor, consts: Tensor, inv_t: Tensor) -> Tensor:
    """The JSD's second sweep: float64 ``[batch * seq, 2]`` = ``(sum_j p_j log(p_j/m_j), sum_j q_j log(q_j/m_j))``
    of ``[batch, seq, vocab]`` CPU logits (unit vocabulary stride), ``p`` and ``q`` from the row constants
    (`_probability_constants` of the full-row lse's in columns ``G_KX``..``G_RY``)."""
    out = torch.empty((x.shape[0] * x.shape[1], 2), dtype=torch.float64)
    if out.numel() == 0 or x.shape[2] == 0:
        return out.zero_()
    _row_grads_call(x, y, None, None, GRAD_MODES["jsd_sums"], inv_t, consts, out)
    return out


@jsd_sums.register_fake
def _(x: Tensor, y: Tensor, consts: Tensor, inv_t: Tensor) -> Tensor:
    return x.new_empty((x.shape[0] * x.shape[1], 2), dtype=torch.float64)


def _split(centre: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """``(k, rest)`` of a float64 row constant in scaled units, as `._torch._centred` splits it:
    ``x/T - centre = (x - k)/T - rest`` with ``k = centre T`` in float32 (exact near ``x = k``) and a
    float64 remainder (0 where the centre is not finite)."""
    return _torch._split(centre, inv_t, torch.float32)


def _probability_constants(lse: Tensor, inv_t: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(k, r, rest)`` with ``p_j = 2^{(x_j - k) c - r}``, ``c = log2(e)/T`` (`._torch._probs` in base 2),
    and the float64 remainder ``rest = r / log2(e)`` in natural units."""
    k, rest = _split(lse, inv_t)
    return k, rest * 1.4426950408889634, rest  # log2(e): a literal in traced code (_compile_cores' note)


def _constants(columns: dict[int, Tensor], like: Tensor) -> Tensor:
    """float32 ``[rows, 16]`` row constants from ``{column: [batch, seq] tensor}`` (the others 0)."""
    zero = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    cols = [columns[i].float() if i in columns else zero for i in range(GCOL)]
    return torch.stack(cols, -1).reshape(-1, GCOL)


def _kl_columns(lse_x: Tensor, lse_y: Tensor, a_x: Tensor, g: Tensor, inv_t: float) -> dict[int, Tensor]:
    """``dx_j = g p_j (log(p_j/q_j) - KL)/T`` and ``dy_j = g (q_j - p_j)/T``, formed as `._torch.chunk_grads`
    forms them: ``log(p_j/q_j) = ((x_j - k_x) - (y_j - k_y))/T - (r_x - r_y)`` (`._torch._log_ratio`) and
    the KL ``a_x - (lse_x - lse_y)`` in float64."""
    return {**_pq_columns(lse_x, lse_y, inv_t), G_G: g, G_AM: a_x - (lse_x - lse_y)}


def _pq_columns(lse_x: Tensor, lse_y: Tensor, inv_t: float) -> dict[int, Tensor]:
    """The constants of ``p`` and ``q`` (`_probability_constants`) and the remainders' difference
    ``r_x - r_y`` of the KL's log-ratio (read in the KL and joint modes only)."""
    kx, rx, rest_x = _probability_constants(lse_x, inv_t)
    ky, ry, rest_y = _probability_constants(lse_y, inv_t)
    return {G_KX: kx, G_RX: rx, G_KY: ky, G_RY: ry, G_RS: rest_x - rest_y}


def _jsd_sums(x: Tensor, y: Tensor, lse_x: Tensor, lse_y: Tensor, temperature: float) -> Tensor:
    """float64 ``[batch, seq, 2]``: the JSD's ``(a_x, a_y)`` of ``[batch, seq, vocab]`` logits (`jsd_sums`)."""
    consts = _constants(_pq_columns(lse_x, lse_y, 1.0 / temperature), lse_x).contiguous()
    x, y = _rows.unit_vocab_stride(x), _rows.unit_vocab_stride(y)
    return jsd_sums(x, y, consts, _inv_t(temperature)).view(*lse_x.shape, 2)


def jsd_partial(x: Tensor, y: Tensor, lse_x: Tensor, lse_y: Tensor, inv_t: float) -> tuple[Tensor, Tensor]:
    """`._torch.jsd_partial` with the C kernel: the JSD's sums over ``[rows, vocab]`` logits (a vocabulary
    slice, for the logit-free path) given the full rows' lse's, float64."""
    sums = _jsd_sums(x.unsqueeze(0), y.unsqueeze(0), lse_x.unsqueeze(0), lse_y.unsqueeze(0), 1.0 / inv_t)[0]
    return sums[:, 0], sums[:, 1]


def _scaled(grad: Tensor, inv_t: float) -> Tensor:
    """The upstream gradient over ``T`` in float32, as the other backends form it."""
    return grad.float() * inv_t


def _run(
    x: Tensor, y: Tensor, consts: Tensor, mode: int, temperature: float, needs: tuple[bool, bool] = (True, True)
) -> tuple[Tensor, Tensor]:
    x, y = _rows.unit_vocab_stride(x), _rows.unit_vocab_stride(y)
    return row_grads(x, y, consts.contiguous(), mode, _inv_t(temperature), int(needs[0]) | int(needs[1]) << 1)


def backward(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    stats: Tensor,
    temperature: float,
    divergence: str = "kl",
    needs: tuple[bool, bool] = (True, True),
) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``[batch, seq, vocab]`` ``x`` and ``y`` (KL, JSD or Hellinger). ``needs`` (the
    autograd Function's ``needs_input_grad``): a gradient not needed is an empty tensor, so
    differentiating one input writes, and maps, one gradient."""
    inv_t = 1.0 / temperature
    lse_x, lse_y, a_x, a_y = stats.unbind(-1)
    g = _scaled(grad, inv_t)
    if divergence == "jsd":
        columns = {**_pq_columns(lse_x, lse_y, inv_t), G_G: g, G_AM: a_x, G_AY: a_y}
    elif divergence == "hellinger":
        bc = torch.exp(a_x - 0.5 * (lse_x + lse_y))  # a_x holds lse((x + y)/2)
        columns = {**_pq_columns(lse_x, lse_y, inv_t), G_G: g, G_BC: bc}
    else:
        columns = _kl_columns(lse_x, lse_y, a_x, g, inv_t)
    return _run(x, y, _constants(columns, grad), GRAD_MODES[divergence], temperature, needs)


def entropy_backward(grad: Tensor, x: Tensor, stats: Tensor, temperature: float) -> Tensor:
    """Gradient of ``sum(grad * H)``: ``dx_j = -g p_j (x_j - a)/T`` (`._torch.entropy_chunk_grad`)."""
    inv_t = 1.0 / temperature
    lse, a = stats.unbind(-1)
    kx, rx, _ = _probability_constants(lse, inv_t)
    ka, ra = _split(a, inv_t)
    columns = {G_KX: kx, G_RX: rx, G_G: _scaled(grad, inv_t), G_KAX: ka, G_RAX: ra}
    return _run(x, x, _constants(columns, grad), GRAD_MODES["entropy"], temperature)[0]


def joint_backward(
    grad: Tensor, x: Tensor, y: Tensor, stats: Tensor, temperature: float, needs: tuple[bool, bool] = (True, True)
) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * (KL, H(p), H(q)))``: the KL's and both entropies' in one pass (``needs``:
    as in `backward`)."""
    inv_t = 1.0 / temperature
    lse_x, lse_y, a_x, b_x, b_y = stats.unbind(-1)
    columns = _kl_columns(lse_x, lse_y, a_x, _scaled(grad[..., 0], inv_t), inv_t)
    kax, rax = _split(b_x, inv_t)
    kay, ray = _split(b_y, inv_t)
    columns |= {G_KAX: kax, G_RAX: rax, G_GHX: _scaled(grad[..., 1], inv_t)}
    columns |= {G_KAY: kay, G_RAY: ray, G_GHY: _scaled(grad[..., 2], inv_t)}
    return _run(x, y, _constants(columns, lse_x), GRAD_MODES["joint"], temperature, needs)
