/* The CPU's int8 kernel for steps of a few rows (native_kernels.py builds and loads it; quantize.py calls it).

   y[m, n] = scales[n] * sum_k x[m, k] * code[n, k] for up to 8 rows m (a decode step, a speculative verify), with
   the codes in blocks of 32 output channels, (N / 32, K, 32): one block's codes for input k are 32 contiguous bytes,
   so each block is one stream. Per 16 codes: a sign-extending load, one conversion to float, and a fused
   multiply-add into each row (AVX-512), where aten's _weight_int8pack_mm streams its (N, K) rows at half this
   kernel's rate on 2 cores (bench/RESULTS.md). One row takes four inputs per iteration, each into its own
   accumulators, so that the multiply-adds do not wait on each other; more rows convert each code once for all of
   them. AVX-512 only (native_kernels.py builds it where the CPU has it). The blocks are shared among OpenMP threads
   (torch's own runtime, already loaded). */

#include <immintrin.h>
#include <stdint.h>

#ifndef __AVX512F__
#error "native_kernels.c needs AVX-512F (-march=native on a CPU that has it)"
#endif

#define BLOCK 32
#define MAX_ROWS 8

static inline __m512 codes16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static void one_row(const float *x, const int8_t *codes, const float *scales, float *y, int64_t K) {
    __m512 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        const int8_t *p = codes + k * BLOCK;
        for (int i = 0; i < 4; i++) {
            __m512 xk = _mm512_set1_ps(x[k + i]);
            acc[2 * i] = _mm512_fmadd_ps(codes16(p + i * BLOCK), xk, acc[2 * i]);
            acc[2 * i + 1] = _mm512_fmadd_ps(codes16(p + i * BLOCK + 16), xk, acc[2 * i + 1]);
        }
    }
    for (; k < K; k++) {
        __m512 xk = _mm512_set1_ps(x[k]);
        acc[0] = _mm512_fmadd_ps(codes16(codes + k * BLOCK), xk, acc[0]);
        acc[1] = _mm512_fmadd_ps(codes16(codes + k * BLOCK + 16), xk, acc[1]);
    }
    __m512 low = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[4], acc[6]));
    __m512 high = _mm512_add_ps(_mm512_add_ps(acc[1], acc[3]), _mm512_add_ps(acc[5], acc[7]));
    _mm512_storeu_ps(y, _mm512_mul_ps(low, _mm512_loadu_ps(scales)));
    _mm512_storeu_ps(y + 16, _mm512_mul_ps(high, _mm512_loadu_ps(scales + 16)));
}

/* M rows, M a constant where it is inlined: the accumulators stay in registers */
static inline __attribute__((always_inline)) void rows_of(int M, const float *x, const int8_t *codes,
                                                          const float *scales, float *y, int64_t N, int64_t K) {
    __m512 acc[MAX_ROWS][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 low = codes16(codes + k * BLOCK), high = codes16(codes + k * BLOCK + 16);
        for (int m = 0; m < M; m++) {
            __m512 xk = _mm512_set1_ps(x[m * K + k]);
            acc[m][0] = _mm512_fmadd_ps(low, xk, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(high, xk, acc[m][1]);
        }
    }
    for (int m = 0; m < M; m++) {
        _mm512_storeu_ps(y + m * N, _mm512_mul_ps(acc[m][0], _mm512_loadu_ps(scales)));
        _mm512_storeu_ps(y + m * N + 16, _mm512_mul_ps(acc[m][1], _mm512_loadu_ps(scales + 16)));
    }
}

#define ROWS(M) \
    static void rows_##M(const float *x, const int8_t *c, const float *s, float *y, int64_t N, int64_t K) { \
        rows_of(M, x, c, s, y, N, K); \
    }
ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
typedef void (*rows_kernel)(const float *, const int8_t *, const float *, float *, int64_t, int64_t);
static const rows_kernel ROWS_KERNELS[MAX_ROWS + 1] = {0, 0, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8};

static void block(const float *x, const int8_t *codes, const float *scales, float *y, int64_t M, int64_t N,
                  int64_t K) {
    if (M == 1)
        one_row(x, codes, scales, y, K);
    else
        ROWS_KERNELS[M](x, codes, scales, y, N, K);
}

/* x (M, K) float32 with 1 <= M <= 8, codes (N / 32, K, 32) int8, scales (N,) float32 -> y (M, N) float32; all
   contiguous. */
void int8_blocked_matmul(const float *x, const int8_t *codes, const float *scales, float *y, int64_t M, int64_t N,
                         int64_t K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < N / BLOCK; b++)
        block(x, codes + b * K * BLOCK, scales + b * BLOCK, y + b * BLOCK, M, N, K);
}
