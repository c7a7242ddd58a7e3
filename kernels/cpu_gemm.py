"""moeray's own CPU GEMM for linear layers (kernels/cpu_gemm.cpp), built on first use.

Where the CPU has AVX-512 with bf16 dot products (AVX512_BF16: Intel Sapphire Rapids and later,
AMD Zen 4 and later) or, failing that, AVX2 with FMA (x86-64 CPUs since Haswell and Zen 1), the
packed CPU path (kernels/cpu_packed.py) multiplies with this kernel instead of oneDNN's: the same blocked-weight idea (reordered once, when loaded), with a one-row
loop that streams the weight at memory speed, which oneDNN's GEMV does not. Measured on the
2-core dev VM (AMD EPYC, 2026-12-01, 2 threads, weights cycled past the L3, us per call, oneDNN
packed vs this): bf16 expert w1 [2048, 512] at 1 row 89.6 vs 57.5, LM head [32000, 512] 1057 vs
692, w2 [512, 1024] 50.1 vs 24.5; fp32 w1 178 vs 123, LM head 2238 vs 1706; from 32 rows up both
are within a few per cent (this one 1.00-1.25x), and on one thread this one also beats MKL's GEMV
(fp32 w1 152 vs 194 us). Each output is summed by one thread in a fixed order, so results do
not depend on the thread count (shards and engines compute an expert's rows alike).

It is a torch C++ extension compiled with the machine's C++ compiler (torch.utils.cpp_extension,
~25 s once, into TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, in a directory named by a
hash of the source, the flags, torch and Python; later processes import the finished build
directly), so it needs g++ (11 or later for the AVX-512 build, whose AMX tiles need it) and
ninja; `make setup` builds it. The same source is compiled for
one instruction set or the other (ISAS; cpu_simd.h), whichever this CPU has, the best first.
When it cannot be had (another CPU, no compiler, a failed build: logged once, with the reason)
or MOERAY_KERNELS=onednn, the packed path keeps oneDNN's GEMM.

    isa() -> "avx512" | "avx2" | None   what this CPU runs the kernels with; isas(): all it runs
    amx() -> bool                       whether bf16 GEMMs run on AMX tiles (cpu_amx.h)
    available() -> bool                 whether linear() runs here (builds on the first call)
    build(isa) -> the extension module  compile now, whatever this CPU (container images)
    pack(w [N, K]) -> packed            the layout linear() reads (bf16: K even)
    linear(x [T, K], packed, N) -> [T, N]
    fused_moe(hidden, w1, w2, topk_weights, topk_ids) -> [T, D] f32   one MoE layer, one call
    decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale) -> [B, H, Dh]
    rms_norm(x, weight, eps), add_rms_norm(x, residual, weight, eps)  kernels.reference's, fused
    apply_rope(x [T, heads, Dh], cos, sin [T, Dh]) -> [T, heads, Dh]    bit for bit the reference
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from moeray.kernels import dispatch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
#: Compiled into the same extension: the paged decode attention, the row-wise ops (norms, rope),
#: and what all share.
SOURCES = tuple(
    SOURCE.with_name(n)
    for n in ("cpu_gemm.cpp", "cpu_attention.cpp", "cpu_rows.cpp", "cpu_simd.h", "cpu_amx.h")
)
#: The instruction sets the extension is compiled for, the best first: the CPU flags each needs
#: (as /proc/cpuinfo names them) and the compiler's.
ISAS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"),
        # AMX's flags let cpu_amx.h's tiles compile; they run only where the CPU has AMX
        [*(f"-mavx512{x}" for x in ("f", "bw", "vl", "dq", "bf16")), "-mamx-tile", "-mamx-bf16"],
    ),
    "avx2": (("avx2", "fma"), ["-mavx2", "-mfma"]),
}
#: -ffp-contract=off: fused_moe's combine multiplies and adds in two roundings, as the engine does
#: with the rows shards return (an implicit fused multiply-add would change the last bits).
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
#: A build takes ~25 s; a lock file older than this was left by a builder that was killed (torch's
#: cpp_extension would wait on it forever).
STALE_LOCK_S = 600.0


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def isas() -> list[str]:
    """The instruction sets of ISAS this CPU runs (Linux on x86-64), the best first."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return []
    flags = _cpu_flags()
    return [name for name, (needs, _) in ISAS.items() if flags.issuperset(needs)]


def isa() -> str | None:
    """The best of ISAS this CPU runs, or None."""
    return next(iter(isas()), None)


def _name_and_directory(isa: str) -> tuple[str, Path]:
    """The build's module name and directory, keyed by what goes into it (the source, the flags,
    torch and Python), so that checkouts and venvs share a build only when it is the same."""
    flags = [*CFLAGS, *ISAS[isa][1]]
    key = hashlib.sha256(
        "\0".join(
            [*(f.read_text() for f in SOURCES), *flags, torch.__version__, sys.version]
        ).encode()
    ).hexdigest()[:16]
    name = f"moeray_cpu_gemm_{isa}_{key}"
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return name, Path(base) / name


def build(isa: str) -> ModuleType:
    """Compiles the extension for `isa` (one of isas(): a build is imported once compiled, and
    one for an instruction set this CPU lacks would stop the process with SIGILL), or imports the
    finished build. Images build every ISA their build machine runs (helm/images/Dockerfile.cpu);
    a node whose CPU has a better one compiles it on its first start.

    A finished build is imported directly (milliseconds); otherwise torch's cpp_extension
    compiles it (~25 s) under its lock file in the build directory, which other processes
    wait on."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}")
    if isa not in isas():
        raise ValueError(f"isa {isa!r}: this CPU cannot run it (it runs {isas() or 'neither'})")
    name, directory = _name_and_directory(isa)
    library, lock = directory / f"{name}.so", directory / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:  # its builder was killed
            log.warning("removing a stale build lock %s", lock)
            lock.unlink()
    if library.exists() and not lock.exists():
        spec = importlib.util.spec_from_file_location(name, library)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(f) for f in SOURCES if f.suffix == ".cpp"],
        extra_cflags=[*CFLAGS, *ISAS[isa][1]],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


def _check_amx_env() -> None:
    """MOERAY_AMX, which the extension reads (cpu_amx.h): unset or 1 (tiles where the CPU has
    AMX) or 0 (the AVX-512 loop); anything else is refused here, naming the variable."""
    value = os.environ.get("MOERAY_AMX")
    if value not in (None, "0", "1"):
        raise ValueError(
            f"MOERAY_AMX must be 0 (no AMX tiles) or 1 (tiles where the CPU has AMX, the "
            f"default), got {value!r}"
        )


@functools.lru_cache(maxsize=1)
def _extension() -> ModuleType | None:
    _check_amx_env()
    best = isa()
    if best is None:
        log.info("moeray's CPU GEMM is off: the CPU has neither AVX512_BF16 nor AVX2 with FMA")
        return None
    try:
        return build(best)
    except Exception as e:  # no compiler, no ninja, a failed build: run on oneDNN instead
        log.warning("moeray's CPU GEMM could not be built (%s); using oneDNN's", e)
        return None


def available() -> bool:
    """Whether linear() runs in this process: not MOERAY_KERNELS=onednn (kernels/dispatch.py),
    this CPU, and built (the first call compiles it, or imports the finished build)."""
    return dispatch.cpu_gemm_wanted() and _extension() is not None


def amx() -> bool:
    """Whether bf16 GEMMs (K a multiple of 32) run on AMX tiles here
    (kernels/cpu_amx.h: the CPU has AMX-BF16, Linux grants the tile state, MOERAY_AMX != 0)."""
    ext = _extension() if dispatch.cpu_gemm_wanted() else None
    return ext is not None and bool(ext.amx())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """w [N, K] (bf16 or fp32, CPU; bf16 with K even) -> [ceil(N/16), K/P, 16, P] (P = 2 for
    bf16, 1 for fp32), the columns past N zero. Call once, where the weight is loaded."""
    ext = _extension()
    assert ext is not None, "check available() first"
    return ext.pack(weight.detach())


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [T, K] (the weight's dtype, any strides) -> x @ w.T [T, out_features]."""
    ext = _extension()
    assert ext is not None, "check available() first"
    return ext.linear(x, packed, out_features)


def fused_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    width: int,
) -> torch.Tensor:
    """kernels.reference.fused_moe's algorithm in one call: hidden [T, D] (the weights' dtype),
    w1 = torch.stack of pack(w1[e] [2F, D]) over experts, w2 likewise of [D, F], width = F,
    topk_weights [T, K] f32, topk_ids [T, K] (ids outside [0, E) skipped) -> [T, D] float32.

    The same grouping (experts ascending, each on its tokens in ascending order), GEMMs as
    linear(), the SwiGLU in fp32 (e^x within 2 ulp), each expert's weighted rows added into the
    fp32 sum in turn, product and sum rounded apart: what the Python loop over linear() did,
    without its ~12 torch ops per expert. A Mixtral-style layer (E 8, D 512, F 1024, fp32, 2
    threads, 2-core dev VM, 2026-12-01) at 8 / 25 tokens: 1567 / 1889 us before, 900 / 1254 us
    in one call, of which the GEMMs take 715 / 1104."""
    ext = _extension()
    assert ext is not None, "check available() first"
    return ext.fused_moe(hidden, w1, w2, topk_weights, topk_ids, width)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence over its paged K/V (kernels/cpu_attention.cpp): q [B, H, Dh],
    k_cache/v_cache [N, S, G, Dh] contiguous, block_tables [B, M] int64, context_lens [B] int64
    -> [B, H, Dh], softmax(q k^T * scale) v over positions 0..len-1, fp32 inside."""
    ext = _extension()
    assert ext is not None, "check available() first"
    return ext.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """kernels.reference.rms_norm in one pass per row (kernels/cpu_rows.cpp): x [..., D],
    weight [D], both fp32 or both bf16 -> [..., D]."""
    ext = _extension()
    assert ext is not None, "check available() first"
    return ext.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.reference.add_rms_norm in one pass per row: (rms_norm(x + residual), x +
    residual), the sum rounded to x's dtype first."""
    ext = _extension()
    assert ext is not None, "check available() first"
    normed, summed = ext.add_rms_norm(x, residual, weight, eps)
    return normed, summed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """kernels.reference.apply_rope in one pass (kernels/cpu_rows.cpp): x [T, heads, Dh] (the
    last dimension contiguous), cos/sin holding [T, Dh] in x's dtype -> [T, heads, Dh], equal to
    the reference bit for bit."""
    ext = _extension()
    assert ext is not None, "check available() first"
    return ext.apply_rope(x, cos, sin)
