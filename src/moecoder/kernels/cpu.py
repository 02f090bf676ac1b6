"""The few-row bf16 CPU product (gemm_bf16.c): built with the system C compiler at first use, loaded
with ctypes, checked against PyTorch, and used only where it is measured faster.

Decode multiplies one or a few rows by every weight matrix, so its speed is how fast the weights
stream in. PyTorch's CPU bf16 kernel for that shape (no AMX) streams at about half the rate of its
fp32 kernel; the C kernel streams bf16 at about the fp32 rate, i.e. twice the weights per second.

Nothing here is needed: without a C compiler, on a non-x86 machine, with `MOECODER_CPU_KERNELS=0`,
or if the built kernel disagrees with PyTorch or is not faster, `gemm_bf16` returns None and the
caller uses PyTorch. The shared library is cached under `$MOECODER_CACHE` (default
`~/.cache/moecoder`), named by a hash of the source, the compiler and the CPU's flags, and written
atomically (temporary name, then rename), so concurrent first uses cannot see a partial file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemm_bf16.c")
MAX_ROWS = 16  # beyond this the products are compute-bound and BLAS (or the fp32 detour) wins
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("MOECODER_CACHE") or Path.home() / ".cache" / "moecoder") / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def build(out_dir: Path | None = None, march: str = "native") -> Path:
    """Compile gemm_bf16.c into a cached shared library (or reuse it); return its path.

    `march` is the compiler's -march (tests build the AVX-512F and portable paths with it).
    Raises RuntimeError naming the problem when there is no compiler or it fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"C compiler {cc} does not run: {e}") from e
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + version.encode() + _cpu_flags().encode() + march.encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"gemm_bf16-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".gemm_bf16-", suffix=".so")
    os.close(fd)
    try:
        cmd = [cc, "-O3", f"-march={march}", "-shared", "-fPIC", "-o", tmp, str(SOURCE), "-lm"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"{' '.join(cmd)} failed: {e}") from e
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class Kernel:
    """The loaded library: `mm(x, w, bias)` for bf16 x [M, K] (M <= MAX_ROWS), w [N, K]."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        i64, p = ctypes.c_int64, ctypes.c_void_p
        self.lib.mc_gemm_bf16.argtypes = [p, i64, p, i64, p, p, i64, i64, i64, i64]
        self.lib.mc_gemm_bf16.restype = None
        self.lib.mc_gemm_bf16_isa.restype = ctypes.c_char_p
        self.isa = self.lib.mc_gemm_bf16_isa().decode()
        self._fn = self.lib.mc_gemm_bf16
        self.lib.mc_moe_swiglu_bf16.argtypes = [p, i64, p, p, p, p, p, i64, i64, i64, i64, i64, i64, p]
        self.lib.mc_moe_swiglu_bf16.restype = ctypes.c_int
        self._moe = self.lib.mc_moe_swiglu_bf16

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T (+ bias) in bf16, into `out` when given (rows may be strided, columns contiguous)."""
        M, K = x.shape
        N = w.shape[0]
        if w.shape[1] != K or (bias is not None and bias.shape != (N,)):
            raise ValueError(f"bf16 product shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)}")
        if out is None:
            out = torch.empty(M, N, dtype=torch.bfloat16)
        self._fn(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), None if bias is None else bias.data_ptr(),
                 out.data_ptr(), out.stride(0), M, N, K)
        return out


    def moe_swiglu(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
        """Few tokens' routed SwiGLU experts in one call (see mc_moe_swiglu_bf16): x [N, C] bf16,
        w13 [E, 2F, C], w2 [E, C, F] contiguous, ids [N, K], weights [N, K] -> [N, C] bf16."""
        N, C = x.shape
        K, Fh = ids.shape[1], w2.shape[2]
        E = w13.shape[0]
        if not (w13.is_contiguous() and w2.is_contiguous()) or x.stride(-1) != 1:
            raise ValueError("moe_swiglu needs contiguous expert weights and x rows")
        if w13.shape != (E, 2 * Fh, C) or w2.shape != (E, C, Fh) or ids.shape != (N, K) or weights.shape != (N, K):
            raise ValueError(f"moe_swiglu shapes do not match: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                             f"w2 {tuple(w2.shape)}, ids {tuple(ids.shape)}, weights {tuple(weights.shape)}")
        ids = ids.to(torch.int64).contiguous()
        wts = weights.to(torch.bfloat16).contiguous()
        out = torch.empty(N, C, dtype=torch.bfloat16)
        scratch = torch.empty(3 * Fh + C, dtype=torch.bfloat16)
        if self._moe(x.data_ptr(), x.stride(0), w13.data_ptr(), w2.data_ptr(), ids.data_ptr(), wts.data_ptr(),
                     out.data_ptr(), C, N, K, C, Fh, E, scratch.data_ptr()):
            raise ValueError(f"moe_swiglu: an expert id is outside 0..{E - 1}")
        return out


def _agrees_with_torch(k: Kernel) -> bool:
    """Edge shapes (tails of every block size, K not a multiple of 32, strided rows, bias) against
    PyTorch's bf16 product: both accumulate exact products in fp32, so they may differ by the last
    bit of bf16 rounding after a different summation order, not more."""
    g = torch.Generator().manual_seed(0)
    for M, N, K in ((1, 17, 33), (2, 9, 64), (3, 5, 100), (4, 20, 7), (5, 33, 130), (16, 40, 256)):
        x = torch.randn(M, K + 3, generator=g).bfloat16()[:, :K]
        w = torch.randn(N, K, generator=g).bfloat16()
        b = torch.randn(N, generator=g).bfloat16()
        for bias in (None, b):
            got = k.mm(x, w, bias).float()
            want = (x.float() @ w.float().t() + (0 if bias is None else bias.float()))
            if not torch.allclose(got, want, rtol=2**-7, atol=1e-3 * K**0.5):
                return False
    return True


def median_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn after one warm-up call (for the kernel choices here
    and in model/linear.py, made once per process)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _faster_than_torch(k: Kernel) -> bool:
    """A decode-shaped product (one row, a 4096 x 1024 bf16 weight; median of 7) at this process's
    thread count: the kernel must win by 15%."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1024, generator=g).bfloat16()
    w = torch.randn(4096, 1024, generator=g).bfloat16()

    with torch.inference_mode():
        return median_time(lambda: k.mm(x, w), 7) < 0.85 * median_time(lambda: F.linear(x, w), 7)


@functools.cache
def _load(threads: int) -> Kernel | None:
    if os.environ.get("MOECODER_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    with _lock:
        try:
            try:
                k = Kernel(build())
            except OSError:  # a damaged cached library (the build is atomic, the disk may not be): rebuild once
                build().unlink(missing_ok=True)
                k = Kernel(build())
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log.info("bf16 CPU kernel unavailable, using PyTorch's: %s", e)
            return None
        if not _agrees_with_torch(k):
            log.warning("bf16 CPU kernel (%s) disagrees with PyTorch; not used", k.isa)
            return None
        if not _faster_than_torch(k):
            log.info("bf16 CPU kernel (%s) is not faster than PyTorch's here; not used", k.isa)
            return None
        log.info("bf16 CPU kernel in use (%s)", k.isa)
        return k


def kernel() -> Kernel | None:
    """The kernel if it is built, correct and faster here at the current thread count, else None."""
    return _load(torch.get_num_threads())


def usable(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """Can this product (x rows flattened to `rows`) go to the kernel? bf16 inference on CPU, few rows,
    contiguous weight rows; eager only (torch.compile traces PyTorch ops)."""
    return (
        rows <= MAX_ROWS
        and x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and w.stride(-1) == 1
        and x.stride(-1) == 1
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and kernel() is not None
    )


# --- torch.compile: the kernel as opaque custom ops (a compiled graph cannot trace a ctypes call) ---

READY: Kernel | None = None  # set by `prepare_for_compile`; read (not called) inside traced code


def prepare_for_compile() -> Kernel | None:
    """Load the kernel before tracing, so that traced code only reads the READY global."""
    global READY
    READY = kernel()
    return READY


@torch.library.custom_op("moecoder::bf16_mm", mutates_args=())
def bf16_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w.T (+ bias) by the kernel; M <= MAX_ROWS, bf16, CPU."""
    k = READY or kernel()
    return k.mm(x.contiguous(), w, bias) if k is not None else F.linear(x, w, bias)


@bf16_mm.register_fake
def _(x, w, bias=None):
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("moecoder::bf16_moe_swiglu", mutates_args=())
def bf16_moe_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[n, k] * w2[e] @ (silu(gate) * up), gate|up = w13[e] @ x[n], e = ids[n, k]: a few
    tokens' routed experts, read in place (no gathered weight copies), in one kernel call."""
    k = READY or kernel()
    if k is not None:
        return k.moe_swiglu(x, w13, w2, ids, weights)
    mm = F.linear
    out = torch.empty_like(x)
    Fh = w2.shape[2]
    for n, (es, ws) in enumerate(zip(ids.tolist(), weights.to(x.dtype).tolist())):
        xn, acc = x[n : n + 1], None
        for e, wt in zip(es, ws):
            h = mm(xn, w13[e])
            y = mm(F.silu(h[:, :Fh]) * h[:, Fh:], w2[e]) * wt
            acc = y if acc is None else acc + y
        out[n : n + 1] = acc
    return out


@bf16_moe_swiglu.register_fake
def _(x, w13, w2, ids, weights):
    return torch.empty_like(x)
