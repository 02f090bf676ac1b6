"""moecoder's few-row CPU kernels (few_rows.c): built with the system C compiler at first use, loaded
with ctypes, checked against PyTorch, and used only where they are measured faster.

Decode multiplies one or a few rows by every weight matrix, so its speed is how fast the weights
stream in. PyTorch's CPU bf16 kernel for that shape (no AMX) streams at about half the rate of its
fp32 kernel; the C kernel streams bf16 at about the fp32 rate, i.e. twice the weights per second.
A batched decode step's routed experts (a few rows for each of most experts) go to one fused call
per layer in bf16 or fp32, in place of a sort, ~10 PyTorch ops per expert segment and a scatter.

Nothing here is needed: without a C compiler, on a non-x86 machine, with `MOECODER_CPU_KERNELS=0`,
or if the built kernel disagrees with PyTorch or is not faster, `kernel()` returns None and the
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

SOURCE = Path(__file__).with_name("few_rows.c")
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
    """Compile few_rows.c into a cached shared library (or reuse it); return its path.

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
    lib = out_dir / f"few_rows-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".few_rows-", suffix=".so")
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


_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
DTYPES = tuple(_SUFFIX)


class Kernel:
    """The loaded library: `mm(x, w, bias)` for x [M, K] (M <= MAX_ROWS), w [N, K], and `moe_swiglu`
    for a few tokens' routed experts, in bf16 or fp32. `mm_min_rows` (the fewest rows per dtype) and
    `fast_moe` (the dtypes) say where `_load` measured them faster than PyTorch here."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        i64, p = ctypes.c_int64, ctypes.c_void_p
        self._gemm, self._moe = {}, {}
        for dtype, suffix in _SUFFIX.items():
            gemm, moe = getattr(self.lib, f"mc_gemm_{suffix}"), getattr(self.lib, f"mc_moe_swiglu_{suffix}")
            gemm.argtypes, gemm.restype = [p, i64, p, i64, p, p, i64, i64, i64, i64], None
            moe.argtypes, moe.restype = [p, i64, p, p, p, p, p, i64, i64, i64, i64, i64, i64], ctypes.c_int
            self._gemm[dtype], self._moe[dtype] = gemm, moe
        self.lib.mc_isa.restype = ctypes.c_char_p
        self.isa = self.lib.mc_isa().decode()
        self.mm_min_rows: dict[torch.dtype, int] = dict.fromkeys(DTYPES, 1)  # use `mm` from this many rows
        self.fast_moe: frozenset[torch.dtype] = frozenset(DTYPES)

    def takes(self, dtype: torch.dtype, rows: int) -> bool:
        """Is `mm` the faster product for `rows` rows in `dtype` here?"""
        return self.mm_min_rows.get(dtype, MAX_ROWS + 1) <= rows <= MAX_ROWS

    def mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T (+ bias) in x's dtype (bf16 or fp32), into `out` when given (rows may be strided,
        columns contiguous)."""
        M, K = x.shape
        N = w.shape[0]
        if w.shape[1] != K or (bias is not None and bias.shape != (N,)):
            raise ValueError(f"product shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)}")
        fn = self._gemm.get(x.dtype)
        if fn is None or w.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise ValueError(f"product dtypes: x {x.dtype}, w {w.dtype}; both bf16 or both fp32")
        if out is None:
            out = torch.empty(M, N, dtype=x.dtype)
        fn(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), None if bias is None else bias.data_ptr(),
           out.data_ptr(), out.stride(0), M, N, K)
        return out

    def moe_swiglu(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
        """A few tokens' routed SwiGLU experts in one call (see mc_moe_swiglu_* in few_rows.c): x [N, C]
        bf16 or fp32, w13 [E, 2F, C], w2 [E, C, F] contiguous, ids [N, K], weights [N, K] -> [N, C]."""
        N, C = x.shape
        K, Fh = ids.shape[1], w2.shape[2]
        E = w13.shape[0]
        fn = self._moe.get(x.dtype)
        if fn is None or w13.dtype != x.dtype or w2.dtype != x.dtype:
            raise ValueError(f"moe_swiglu dtypes: x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}; all bf16 or all fp32")
        if not (w13.is_contiguous() and w2.is_contiguous()) or x.stride(-1) != 1:
            raise ValueError("moe_swiglu needs contiguous expert weights and x rows")
        if w13.shape != (E, 2 * Fh, C) or w2.shape != (E, C, Fh) or ids.shape != (N, K) or weights.shape != (N, K):
            raise ValueError(f"moe_swiglu shapes do not match: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                             f"w2 {tuple(w2.shape)}, ids {tuple(ids.shape)}, weights {tuple(weights.shape)}")
        ids = ids.to(torch.int64).contiguous()
        wts = weights.to(x.dtype).contiguous()
        out = torch.empty(N, C, dtype=x.dtype)
        rc = fn(x.data_ptr(), x.stride(0), w13.data_ptr(), w2.data_ptr(), ids.data_ptr(), wts.data_ptr(),
                out.data_ptr(), C, N, K, C, Fh, E)
        if rc == -1:
            raise ValueError(f"moe_swiglu: an expert id is outside 0..{E - 1}")
        if rc:
            raise MemoryError(f"moe_swiglu: no memory for the scratch of {N} tokens x {K} experts")
        return out


def torch_moe_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """What `Kernel.moe_swiglu` computes, in PyTorch ops: each expert on the tokens that chose it."""
    out = torch.zeros_like(x)
    Fh = w2.shape[2]
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        h = F.linear(x[tok], w13[e])
        y = F.linear(F.silu(h[:, :Fh]) * h[:, Fh:], w2[e])
        out.index_add_(0, tok, y * weights[tok, slot, None].to(x.dtype))
    return out


def _agrees_with_torch(k: Kernel) -> bool:
    """Edge shapes (tails of every block size, K not a multiple of 32, strided rows, bias) against
    PyTorch's product in each dtype: both accumulate in fp32, so bf16 results may differ by the last
    bit of bf16 rounding after a different summation order, fp32 ones by summation order only."""
    g = torch.Generator().manual_seed(0)
    for M, N, K in ((1, 17, 33), (2, 9, 64), (3, 5, 100), (4, 20, 7), (5, 33, 130), (16, 40, 256)):
        for dtype in DTYPES:
            x = torch.randn(M, K + 3, generator=g).to(dtype)[:, :K]
            w = torch.randn(N, K, generator=g).to(dtype)
            b = torch.randn(N, generator=g).to(dtype)
            rtol, atol = (2**-7, 1e-3 * K**0.5) if dtype == torch.bfloat16 else (1e-5, 1e-5 * K**0.5)
            for bias in (None, b):
                got = k.mm(x, w, bias).float()
                want = x.float() @ w.float().t() + (0 if bias is None else bias.float())
                if not torch.allclose(got, want, rtol=rtol, atol=atol):
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


def _product_min_rows(k: Kernel) -> dict[torch.dtype, int]:
    """Per dtype, from how many rows the kernel's product beats PyTorch's by 15% on a decode-shaped
    product (a 4096 x 1024 weight; median of 7) at this process's thread count: 1 if it does at one
    row, 3 if only at four (fp32 here: MKL's matrix-vector kernel streams as fast as this one, its
    3-16-row kernel at half the rate), else not at all."""
    g = torch.Generator().manual_seed(0)
    rows = {}
    with torch.inference_mode():
        for dtype in DTYPES:
            w = torch.randn(4096, 1024, generator=g).to(dtype)
            for m, use_from in ((1, 1), (4, 3)):
                x = torch.randn(m, 1024, generator=g).to(dtype)
                ours = median_time(lambda x=x, w=w: k.mm(x, w), 7)
                if ours < 0.85 * median_time(lambda x=x, w=w: F.linear(x, w), 7):
                    rows[dtype] = use_from
                    break
    return rows


def _fast_moe(k: Kernel) -> frozenset[torch.dtype]:
    """The dtypes in which the fused experts call beats PyTorch's per-expert ops by 15% on a batched
    decode step's layer (8 tokens, top-2 of 8 experts of 256 -> 512; median of 5)."""
    g = torch.Generator().manual_seed(0)
    E, C, Fh, N = 8, 256, 512, 8
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(N)])
    wts = torch.rand(N, 2, generator=g).softmax(-1)
    fast = set()
    with torch.inference_mode():
        for dtype in DTYPES:
            x = torch.randn(N, C, generator=g).to(dtype)
            w13 = (torch.randn(E, 2 * Fh, C, generator=g) / C**0.5).to(dtype)
            w2 = (torch.randn(E, C, Fh, generator=g) / Fh**0.5).to(dtype)
            args = (x, w13, w2, ids, wts)
            ours = median_time(lambda a=args: k.moe_swiglu(*a), 5)
            if ours < 0.85 * median_time(lambda a=args: torch_moe_swiglu(*a), 5):
                fast.add(dtype)
    return frozenset(fast)


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
            log.info("CPU kernels unavailable, using PyTorch's: %s", e)
            return None
        if not _agrees_with_torch(k):
            log.warning("CPU kernels (%s) disagree with PyTorch; not used", k.isa)
            return None
        k.mm_min_rows, k.fast_moe = _product_min_rows(k), _fast_moe(k)
        if not (k.mm_min_rows or k.fast_moe):
            log.info("CPU kernels (%s) are not faster than PyTorch's here; not used", k.isa)
            return None
        log.info("CPU kernels in use (%s): products from rows %s, experts in %s", k.isa,
                 {str(d): r for d, r in k.mm_min_rows.items()}, sorted(map(str, k.fast_moe)))
        return k


def kernel() -> Kernel | None:
    """The kernel if it is built, correct and faster here at the current thread count, else None."""
    return _load(torch.get_num_threads())


def _inference_on_cpu(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.stride(-1) == 1 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def usable(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """Can this product (x rows flattened to `rows`) go to the kernel? Inference on CPU, few rows, a
    dtype the kernel is faster in, contiguous weight rows; eager only (torch.compile traces PyTorch
    ops; see the custom ops below)."""
    if rows > MAX_ROWS or w.dtype != x.dtype or w.stride(-1) != 1 or not _inference_on_cpu(x):
        return False
    k = kernel()
    return k is not None and k.takes(x.dtype, rows)


def moe_usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Can a few tokens' routed experts (x [N, C], N <= MAX_ROWS) go to `Kernel.moe_swiglu`?"""
    if x.shape[0] > MAX_ROWS or not (w13.dtype == w2.dtype == x.dtype) or not _inference_on_cpu(x) \
            or not (w13.is_contiguous() and w2.is_contiguous()):
        return False
    k = kernel()
    return k is not None and x.dtype in k.fast_moe


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
    return torch_moe_swiglu(x, w13, w2, ids, weights)


@bf16_moe_swiglu.register_fake
def _(x, w13, w2, ids, weights):
    return torch.empty_like(x)
