"""The CPU's native int8 kernel (native_kernels.c), built on first use with the machine's C compiler and called by
quantize.py's int8 layers for calls of a few rows (decode and verify steps, short prompts) as the torch operator
`torch.ops.small_llama.int8_blocked_matmul`, eager and compiled steps alike; its CPU kernel calls the library through
ctypes.

Why: a decode step's speed is the rate its codes are read at. On 2 cores this kernel reads the blocked layout
(quantize.py: blocks of 32 output channels) 1.6-1.85x as fast as inductor's loop over it, about as fast as a loop
that only reads the bytes, and aten's `_weight_int8pack_mm` reads its (N, K) rows slower still (bench/RESULTS.md).
Registered at torch.library's low level, a call costs ~2.5 us more than the bare ctypes call (a
`torch.library.custom_op` cost ~15 us, more than the kernel saved in a compiled step); a compiled step calls it
between inductor's fused pieces.

The build: `cc -O3 -march=native -fopenmp -shared -fPIC` ($CC for another compiler) into $XDG_CACHE_HOME/small-llama
(default ~/.cache/small-llama), under a name hashing the source, the compiler's version, the flags and this CPU's
model and flags (the build is for the CPU it runs on); written atomically, so a killed build leaves nothing a later
run would load. Where it is not built (a CPU without AVX-512 or AVX2, no compiler, a failed build), `load` says why and
quantize.py keeps aten's kernel: the same numbers, slower. OpenMP: the kernel runs on the runtime torch already
loaded (libgomp, the same soname), so its threads are torch's.
"""

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import torch

from utils import atomic_write

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BLOCK = 32  # output channels per block of the codes' layout


class BuildFailed(Exception):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "small-llama"


def cpu_signature() -> str:
    """This CPU's model and flags (Linux's cpuinfo; elsewhere the platform's name): -march=native builds for them."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(re.findall(r"^(?:model name|flags)\s*:.*$", cpuinfo, re.M)[:2])


@lru_cache(maxsize=None)
def load() -> Tuple[Optional[ctypes.CDLL], str]:
    """(the built library, "") or (None, why it is not built: no AVX-512 or AVX2, no compiler, a failed build)."""
    signature = cpu_signature()
    flags = set(signature.split())
    if "avx512f" not in flags and not {"avx2", "fma"} <= flags:
        return None, "this CPU has neither AVX-512F nor AVX2 and FMA (Linux's cpuinfo flags): the kernel needs one"
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None, f"no C compiler: {compiler!r} is not on PATH (set CC to one)"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), signature]).encode())
    path = cache_dir() / f"native_kernels-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            with atomic_write(path) as tmp:
                result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True,
                                        text=True)
                if result.returncode:
                    raise BuildFailed(f"{compiler} {' '.join(FLAGS)} {SOURCE.name} failed: "
                                      + (result.stderr.strip().splitlines() or ["no message"])[-1])
        library = ctypes.CDLL(str(path))
    except BuildFailed as error:
        return None, str(error)
    except OSError as error:  # an unwritable cache, a library the system will not load (a noexec mount)
        return None, f"{path}: {error}"
    library.int8_blocked_matmul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    library.int8_blocked_matmul.restype = None
    library.int8_blocked_matmul_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    library.int8_blocked_matmul_bf16.restype = ctypes.c_int
    return library, ""


def run(library: ctypes.CDLL, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 or bf16, codes (N / 32, K, 32) int8, scales (N,) float32 -> (M, N) float32, on torch's
    threads."""
    x, scales = x.contiguous(), scales.contiguous()  # named: the library reads their memory
    M, K = x.shape
    if M < 1 or x.dtype not in (torch.float32, torch.bfloat16) or scales.dtype != torch.float32:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype}, scales {scales.dtype}: expected float32 or bf16 rows and "
                         "float32 scales")
    if codes.shape[1:] != (K, BLOCK) or codes.dtype != torch.int8 or not codes.is_contiguous():
        raise ValueError(f"codes {tuple(codes.shape)} {codes.dtype}: expected contiguous int8 (N / {BLOCK}, {K}, "
                         f"{BLOCK})")
    if scales.numel() != codes.size(0) * BLOCK:
        raise ValueError(f"{scales.numel()} scales for {codes.size(0) * BLOCK} output channels")
    y = torch.empty(M, codes.size(0) * BLOCK)
    arguments = (x.data_ptr(), codes.data_ptr(), scales.data_ptr(), y.data_ptr(), M, y.size(1), K,
                 torch.get_num_threads())
    if x.dtype == torch.float32:
        library.int8_blocked_matmul(*arguments)
    elif library.int8_blocked_matmul_bf16(*arguments):
        raise MemoryError(f"native_kernels: no memory to widen {M} x {K} bf16 rows to float32")
    return y


def int8_blocked_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The operator's CPU kernel: `run` on the built library."""
    library, missing = load()
    if library is None:
        raise RuntimeError(f"small_llama::int8_blocked_matmul: the native int8 kernel is not built: {missing}")
    return run(library, x, codes, scales)


def int8_blocked_matmul_shape(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The operator's result as a compiler traces it: (M, N) float32."""
    return x.new_empty(x.size(0), scales.size(0), dtype=torch.float32)


# `run` as a torch operator, torch.ops.small_llama.int8_blocked_matmul(x, codes, scales), so that a compiled step
# calls the C kernel too: registered at this low level, a call costs ~2.5 us over the bare ctypes call (a
# torch.library.custom_op cost ~15 us, more than the kernel saved: bench/RESULTS.md)
OPERATORS = torch.library.Library("small_llama", "DEF")
OPERATORS.define("int8_blocked_matmul(Tensor x, Tensor codes, Tensor scales) -> Tensor")
OPERATORS.impl("int8_blocked_matmul", int8_blocked_matmul, "CPU")
OPERATORS.impl("int8_blocked_matmul", int8_blocked_matmul_shape, "Meta")
