"""The CPU's native int8 kernel (native_kernels.c) and the torch operator that calls it (native_kernels_op.cpp),
`torch.ops.small_llama.int8_blocked_matmul(x, codes, scales)`, built on first use with the machine's compilers;
quantize.py's int8 layers call the operator for calls of a few rows (decode and verify steps, short prompts), eager
and compiled steps alike (a compiled step calls it between inductor's fused pieces).

Why: a decode step's speed is the rate its codes are read at. On 2 cores this kernel reads the blocked layout
(quantize.py: blocks of 32 output channels) 1.6-1.85x as fast as inductor's loop over it, about as fast as a loop
that only reads the bytes, and aten's `_weight_int8pack_mm` reads its (N, K) rows slower still (bench/RESULTS.md).
The operator is C++ because a call through Python (a Python-registered operator calling the kernel through ctypes)
cost ~5 us more, 61 times a step of AMD-Llama-135m.

Two builds into $XDG_CACHE_HOME/small-llama (default ~/.cache/small-llama), each under a name hashing what it is built
from, each written atomically (a killed build leaves nothing a later run would load):
- the kernel: `cc -O3 -march=native -fopenmp -shared -fPIC` ($CC for another compiler), for this CPU's model and flags;
- the operator: `c++ -O2 -std=c++20` ($CXX) against the headers and libraries of the installed torch (its wheel ships
  them: what torch.compile builds its CPU kernels with), once per torch and compiler; it loads once per process and
  runs the kernel `load` built last.
Where either is not built (a CPU without AVX-512 or AVX2, no compiler, a failed build), `load` says why and quantize.py
keeps aten's kernel: the same numbers, slower. OpenMP: the kernel runs on the runtime torch already loaded (libgomp,
the same soname), so its threads are torch's.
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
from typing import Optional, Sequence, Tuple

import torch

from utils import atomic_write

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
OPERATOR_SOURCE = Path(__file__).with_name("native_kernels_op.cpp")
OPERATOR_FLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC")
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


def build(source: Path, language: str, variable: str, default: str, flags: Sequence[str],
          libraries: Sequence[str] = (), built_for: str = "") -> Path:
    """The shared library `source` builds into with the compiler $`variable` (default `default`), from the cache
    when it holds one built from the same source, compiler version, flags and `built_for`; BuildFailed says why
    not (no compiler, a failed build, a cache that cannot be written)."""
    compiler = os.environ.get(variable, default)
    if shutil.which(compiler) is None:
        raise BuildFailed(f"no {language} compiler: {compiler!r} is not on PATH (set {variable} to one)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), version, *flags, *libraries, built_for]).encode())
    path = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            with atomic_write(path) as tmp:
                result = subprocess.run([compiler, *flags, str(source), "-o", str(tmp), *libraries],
                                        capture_output=True, text=True)
                if result.returncode:
                    lines = result.stderr.strip().splitlines() or ["no message"]
                    raise BuildFailed(f"{compiler} {' '.join(flags)} {source.name} failed: "
                                      + next((line for line in lines if "error" in line), lines[-1]))
    except OSError as error:  # an unwritable cache
        raise BuildFailed(f"{path}: {error}") from error
    return path


def open_library(path: Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path))
    except OSError as error:  # a library the system will not load (a noexec mount)
        raise BuildFailed(f"{path}: {error}") from error


@lru_cache(maxsize=None)
def load_operator() -> ctypes.CDLL:
    """Build and load native_kernels_op.cpp (once per process: a second library would register the operator
    twice), which registers torch.ops.small_llama.int8_blocked_matmul; BuildFailed says why not."""
    torch_dir = Path(torch.__file__).parent
    flags = (*OPERATOR_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
             f"-I{torch_dir / 'include'}")
    libraries = (f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu")
    path = build(OPERATOR_SOURCE, "C++", "CXX", "c++", flags, libraries, built_for=torch.__version__)
    library = open_library(path)  # loading it registers the operator; torch.ops records it as loaded, the same library
    torch.ops.load_library(path)
    library.small_llama_use_kernels.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    library.small_llama_use_kernels.restype = None
    return library


@lru_cache(maxsize=None)
def load() -> Tuple[Optional[ctypes.CDLL], str]:
    """(the built kernel library, "") once the operator runs it, or (None, why not: no AVX-512 or AVX2, no compiler,
    a failed build)."""
    signature = cpu_signature()
    flags = set(signature.split())
    if "avx512f" not in flags and not {"avx2", "fma"} <= flags:
        return None, "this CPU has neither AVX-512F nor AVX2 and FMA (Linux's cpuinfo flags): the kernel needs one"
    try:
        kernels = open_library(build(SOURCE, "C", "CC", "cc", FLAGS, built_for=signature))
        operator = load_operator()
    except BuildFailed as error:
        return None, str(error)
    operator.small_llama_use_kernels(ctypes.cast(kernels.int8_blocked_matmul, ctypes.c_void_p),
                                     ctypes.cast(kernels.int8_blocked_matmul_bf16, ctypes.c_void_p))
    return kernels, ""
