/* The torch operator small_llama::int8_blocked_matmul(x, codes, scales) -> y, which calls native_kernels.c's int8
   kernel (native_kernels.py builds both libraries and hands this one the kernel's entry points).

   In C++ so that a call costs what an aten operator's does: an operator implemented in Python (through ctypes) cost
   ~5 us more per call, 0.3 ms of AMD-Llama-135m's 4.5 ms compiled int8 decode step (61 calls; bench/RESULTS.md).
   Built without -march flags: it checks the tensors and calls the kernel built for this CPU, so one build serves
   any CPU for a given torch. */

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>

namespace {

using FloatKernel = void (*)(const float *, const int8_t *, const float *, float *, int64_t, int64_t, int64_t, int);
using Bf16Kernel = int (*)(const uint16_t *, const int8_t *, const float *, float *, int64_t, int64_t, int64_t, int);

constexpr int64_t BLOCK = 32;  // output channels per block of the codes (native_kernels.c)
std::atomic<FloatKernel> float_kernel{nullptr};
std::atomic<Bf16Kernel> bf16_kernel{nullptr};

void check(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "small_llama::int8_blocked_matmul: x ", x.sizes(), " ", x.scalar_type(),
                ": expected float32 or bf16 rows (M, K)");
    TORCH_CHECK(codes.dim() == 3 && codes.size(1) == x.size(1) && codes.size(2) == BLOCK &&
                    codes.scalar_type() == at::kChar && codes.is_contiguous(),
                "small_llama::int8_blocked_matmul: codes ", codes.sizes(), " ", codes.scalar_type(),
                ": expected contiguous int8 (N / ", BLOCK, ", ", x.size(1), ", ", BLOCK, ")");
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == codes.size(0) * BLOCK && scales.scalar_type() == at::kFloat,
                "small_llama::int8_blocked_matmul: scales ", scales.sizes(), " ", scales.scalar_type(),
                ": expected float32 (", codes.size(0) * BLOCK, ",)");
}

at::Tensor int8_blocked_matmul(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales) {
    check(x, codes, scales);
    FloatKernel float_rows = float_kernel.load();
    Bf16Kernel bf16_rows = bf16_kernel.load();
    TORCH_CHECK(float_rows && bf16_rows,
                "small_llama::int8_blocked_matmul: no kernel loaded (native_kernels.load() builds and loads it)");
    const at::Tensor rows = x.contiguous(), scale = scales.contiguous();  // named: the kernel reads their memory
    const int64_t M = rows.size(0), K = rows.size(1), N = scale.size(0);
    at::Tensor y = at::empty({M, N}, rows.options().dtype(at::kFloat));
    if (rows.scalar_type() == at::kFloat) {
        float_rows(rows.data_ptr<float>(), codes.data_ptr<int8_t>(), scale.data_ptr<float>(), y.data_ptr<float>(), M,
                   N, K, at::get_num_threads());
    } else {
        const int failed = bf16_rows(reinterpret_cast<const uint16_t *>(rows.const_data_ptr()),
                                     codes.data_ptr<int8_t>(), scale.data_ptr<float>(), y.data_ptr<float>(), M, N,
                                     K, at::get_num_threads());
        TORCH_CHECK(!failed, "small_llama::int8_blocked_matmul: no memory to widen ", M, " x ", K,
                    " bf16 rows to float32");
    }
    return y;
}

// The result as a compiler traces it: (M, N) float32, with symbolic sizes where the rows are dynamic
at::Tensor int8_blocked_matmul_shape(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales) {
    return at::empty_symint({x.sym_size(0), scales.sym_size(0)}, x.options().dtype(at::kFloat));
}

}  // namespace

extern "C" void small_llama_use_kernels(FloatKernel float_rows, Bf16Kernel bf16_rows) {
    float_kernel.store(float_rows);
    bf16_kernel.store(bf16_rows);
}

TORCH_LIBRARY(small_llama, m) { m.def("int8_blocked_matmul(Tensor x, Tensor codes, Tensor scales) -> Tensor"); }
TORCH_LIBRARY_IMPL(small_llama, CPU, m) { m.impl("int8_blocked_matmul", &int8_blocked_matmul); }
TORCH_LIBRARY_IMPL(small_llama, Meta, m) { m.impl("int8_blocked_matmul", &int8_blocked_matmul_shape); }
