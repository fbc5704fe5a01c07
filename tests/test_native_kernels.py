"""native_kernels: the C int8 kernel, through its C++ torch operator, against a float64 matmul of the weights its
codes stand for, for float32 and bf16 rows (1 to 21 of them: each row count's loop, then 8 at a time), input widths
its 4-wide and 2-wide loops do not divide, and builds without bf16 instructions and without AVX-512 (AVX2); bad
tensors refused by name; a CPU with neither said; the builds cached by content and written atomically; a missing or
failing compiler (C or C++), or a cache it cannot write, said in one line, never a half-written library."""

import pytest
import torch

import native_kernels
from quantize import QuantizedLinear, dequantize

needs_simd = pytest.mark.skipif(native_kernels.load()[0] is None and "AVX2" in native_kernels.load()[1],
                                reason="this CPU has neither AVX-512F nor AVX2 and FMA, which the kernel needs")


@pytest.fixture
def fresh_builds(tmp_path, monkeypatch):
    """An empty build cache and no remembered build, before and after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_kernels.load.cache_clear()
    yield tmp_path / "small-llama"
    native_kernels.load.cache_clear()


@needs_simd
def test_the_kernel_computes_the_matmul_of_the_dequantized_weights():
    library, why = native_kernels.load()
    assert library is not None, why  # a CPU with AVX-512 or AVX2 and a C compiler builds it
    torch.manual_seed(0)
    # K = 69: tails for the 4-wide loop of one row and the 2-wide loop of bf16 pairs
    module = QuantizedLinear.from_linear(torch.nn.Linear(69, 96, bias=False), "int8", None)
    weight = dequantize(module, torch.float64)
    assert module.prepare(torch.float32) == "cpu_int8_native" and module.codes.shape == (3, 69, 32)
    check_rows(module, weight, K=69)
    x = torch.randn(2, 69)
    matmul = torch.ops.small_llama.int8_blocked_matmul
    for bad, message in (((x.double(), module.codes, module.scales), "x \\[2, 69\\] Double: expected float32 or bf16"),
                         ((x[:, :68], module.codes, module.scales), "codes \\[3, 69, 32\\] Char: expected contiguous"),
                         ((x, module.codes, module.scales[:64]), "scales \\[64\\] Float: expected float32 \\(96,\\)")):
        with pytest.raises(RuntimeError, match=message):
            matmul(*bad)


def check_rows(module: QuantizedLinear, weight: torch.Tensor, K: int) -> None:
    """float32 and bf16 rows through the torch operator: one row's loop, each row count's up to 8, then 8 at a time
    and what is left (17 = 8 + 8 + 1, 21 = 8 + 8 + 5), against float64 on the same (bf16-rounded) inputs; a
    non-contiguous x (a column slice) too."""
    for dtype in (torch.float32, torch.bfloat16):
        for rows in [*range(1, 10), 17, 21]:
            x = torch.randn(rows, K + 3)[:, 3:].to(dtype)
            expected = x.double() @ weight.T
            got = torch.ops.small_llama.int8_blocked_matmul(x, module.codes, module.scales)
            assert got.dtype == torch.float32
            assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-6, (dtype, rows)


@needs_simd
def test_built_for_a_cpu_without_bf16_instructions_bf16_rows_are_widened_to_float32(fresh_builds, monkeypatch):
    """Without AVX512_BF16 (here: compiled without it) the bf16 rows take the float32 loops, with the same results."""
    monkeypatch.setattr(native_kernels, "FLAGS", (*native_kernels.FLAGS, "-mno-avx512bf16"))
    library, why = native_kernels.load()
    assert library is not None, why
    torch.manual_seed(0)
    module = QuantizedLinear.from_linear(torch.nn.Linear(65, 64, bias=False), "int8", None)  # odd K: a lone input
    module.prepare(torch.float32)
    check_rows(module, dequantize(module, torch.float64), K=65)


@needs_simd
def test_built_for_a_cpu_with_avx2_only_the_8_wide_loops_compute_the_same(fresh_builds, monkeypatch):
    """Without AVX-512 (here: compiled without it) the same loops run on pairs of AVX2 registers."""
    monkeypatch.setattr(native_kernels, "FLAGS", (*native_kernels.FLAGS, "-mno-avx512f"))
    monkeypatch.setattr(native_kernels, "cpu_signature", lambda: "flags\t\t: fpu sse2 avx avx2 fma")
    library, why = native_kernels.load()
    assert library is not None, why
    torch.manual_seed(0)
    module = QuantizedLinear.from_linear(torch.nn.Linear(65, 64, bias=False), "int8", None)
    module.prepare(torch.float32)
    check_rows(module, dequantize(module, torch.float64), K=65)


def test_a_cpu_without_avx2_gets_no_build_and_says_why(fresh_builds, monkeypatch):
    monkeypatch.setattr(native_kernels, "cpu_signature", lambda: "flags\t\t: fpu sse2 avx")
    library, why = native_kernels.load()
    assert library is None and why.startswith("this CPU has neither AVX-512F nor AVX2 and FMA")
    assert not fresh_builds.exists()


@needs_simd
def test_a_build_is_cached_by_content_and_a_failed_one_leaves_nothing(fresh_builds, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    library, why = native_kernels.load()
    assert library is None and why.startswith("false -O3 -march=native") and "native_kernels.c failed" in why
    assert not fresh_builds.exists() or not any(fresh_builds.iterdir())  # no library, no temporary file
    native_kernels.load.cache_clear()
    monkeypatch.setenv("CC", "no-such-compiler")
    assert native_kernels.load() == (None, "no C compiler: 'no-such-compiler' is not on PATH (set CC to one)")
    native_kernels.load.cache_clear()
    monkeypatch.delenv("CC")
    assert native_kernels.load()[0] is not None
    [built] = fresh_builds.glob("native_kernels-*.so")  # the operator's library loads once per process (not here)
    stamp = built.stat().st_mtime_ns
    native_kernels.load.cache_clear()  # a new process, as far as the cache goes: the same file, not rebuilt
    assert native_kernels.load()[0] is not None and [built] == list(fresh_builds.glob("native_kernels-*.so"))
    assert built.stat().st_mtime_ns == stamp


@needs_simd
def test_a_missing_or_failing_cpp_compiler_is_said_and_keeps_the_kernel_unused(fresh_builds, monkeypatch):
    """The operator's C++ build fails as the kernel's does (the operator builds once per process, so its build is
    called directly here); `load` passes the reason on."""
    def build_operator():
        native_kernels.build(native_kernels.OPERATOR_SOURCE, "C++", "CXX", "c++", native_kernels.OPERATOR_FLAGS)

    monkeypatch.setenv("CXX", "false")
    with pytest.raises(native_kernels.BuildFailed, match=r"^false -O2 -std=c\+\+20 .* native_kernels_op.cpp failed"):
        build_operator()
    assert not fresh_builds.exists() or not any(fresh_builds.iterdir())
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(native_kernels.BuildFailed, match=r"^no C\+\+ compiler: 'no-such-compiler' is not on PATH "
                                                        r"\(set CXX to one\)$"):
        build_operator()

    def failed():
        raise native_kernels.BuildFailed("no C++ compiler: 'no-such-compiler' is not on PATH (set CXX to one)")

    monkeypatch.setattr(native_kernels, "load_operator", failed)
    assert native_kernels.load() == (None, "no C++ compiler: 'no-such-compiler' is not on PATH (set CXX to one)")


@needs_simd
def test_a_cache_that_cannot_be_written_is_said_not_raised(fresh_builds, monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))  # its small-llama folder cannot be made
    library, why = native_kernels.load()
    assert library is None and why.startswith(str(tmp_path / "a_file" / "small-llama"))
