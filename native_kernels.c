/* The CPU's int8 kernel for calls of a few rows (native_kernels.py builds and loads it; the torch operator of
   native_kernels_op.cpp calls it).

   y[m, n] = scales[n] * sum_k x[m, k] * code[n, k] for a few rows m (a decode step, a speculative verify, a short
   prompt), x float32 or bf16, with the codes in blocks of 32 output channels, (N / 32, K, 32): one block's codes for
   input k are 32 contiguous bytes, so each block is one stream. One row: per 16 codes a sign-extending load, one
   conversion to float and a fused multiply-add (AVX-512; on a CPU without it, AVX2 and FMA: the same loops on two
   8-wide registers for each 16-wide one), four inputs per iteration into separate accumulators so
   that the multiply-adds do not wait on each other; it reads the codes about as fast as a loop that only reads them,
   where aten's _weight_int8pack_mm streams its (N, K) rows at half that rate on 2 cores (bench/RESULTS.md). More
   rows, up to 8 at a time, convert each code once for all of them; with bf16 rows on a CPU with AVX512_BF16, the
   codes of inputs k and k + 1 are interleaved, converted to bf16 (exact: |code| <= 127) and multiplied into each row
   two inputs per instruction (vdpbf16ps: 1.6-1.9x the float32 multiply-adds at 5-8 rows, measured). The blocks are
   shared among OpenMP threads (torch's own runtime, already loaded). */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32
#define MAX_ROWS 8

/* 16 floats: one AVX-512 register, or two AVX2 ones (a CPU without AVX-512: the same loops, twice the instructions) */
#if defined(__AVX512F__)
typedef __m512 vec16;
static inline vec16 vzero(void) { return _mm512_setzero_ps(); }
static inline vec16 vset1(float value) { return _mm512_set1_ps(value); }
static inline vec16 vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec16 v) { _mm512_storeu_ps(p, v); }
static inline vec16 vadd(vec16 a, vec16 b) { return _mm512_add_ps(a, b); }
static inline vec16 vmul(vec16 a, vec16 b) { return _mm512_mul_ps(a, b); }
static inline vec16 vfmadd(vec16 a, vec16 b, vec16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec16 codes16(const int8_t *p) {  /* 16 codes: a sign-extending load, one conversion */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef struct { __m256 low, high; } vec16;
static inline vec16 vzero(void) { return (vec16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vec16 vset1(float value) { return (vec16){_mm256_set1_ps(value), _mm256_set1_ps(value)}; }
static inline vec16 vload(const float *p) { return (vec16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void vstore(float *p, vec16 v) { _mm256_storeu_ps(p, v.low); _mm256_storeu_ps(p + 8, v.high); }
static inline vec16 vadd(vec16 a, vec16 b) {
    return (vec16){_mm256_add_ps(a.low, b.low), _mm256_add_ps(a.high, b.high)};
}
static inline vec16 vmul(vec16 a, vec16 b) {
    return (vec16){_mm256_mul_ps(a.low, b.low), _mm256_mul_ps(a.high, b.high)};
}
static inline vec16 vfmadd(vec16 a, vec16 b, vec16 c) {
    return (vec16){_mm256_fmadd_ps(a.low, b.low, c.low), _mm256_fmadd_ps(a.high, b.high, c.high)};
}
static inline __m256 codes8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec16 codes16(const int8_t *p) { return (vec16){codes8(p), codes8(p + 8)}; }
#else
#error "native_kernels.c needs AVX-512F, or AVX2 and FMA (-march=native on a CPU that has them)"
#endif

static inline float bf16_value(uint16_t bits) {
    uint32_t word = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &word, sizeof value);
    return value;
}

/* x is float32 (xf) or bf16 (xb), the other NULL: inlined with a constant NULL, the test leaves the loop */
static inline __attribute__((always_inline)) float x_at(const float *xf, const uint16_t *xb, int64_t i) {
    return xb ? bf16_value(xb[i]) : xf[i];
}

static inline __attribute__((always_inline)) void one_row(const float *xf, const uint16_t *xb, const int8_t *codes,
                                                          const float *scales, float *y, int64_t K) {
    vec16 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = vzero();
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        const int8_t *p = codes + k * BLOCK;
        for (int i = 0; i < 4; i++) {
            vec16 xk = vset1(x_at(xf, xb, k + i));
            acc[2 * i] = vfmadd(codes16(p + i * BLOCK), xk, acc[2 * i]);
            acc[2 * i + 1] = vfmadd(codes16(p + i * BLOCK + 16), xk, acc[2 * i + 1]);
        }
    }
    for (; k < K; k++) {
        vec16 xk = vset1(x_at(xf, xb, k));
        acc[0] = vfmadd(codes16(codes + k * BLOCK), xk, acc[0]);
        acc[1] = vfmadd(codes16(codes + k * BLOCK + 16), xk, acc[1]);
    }
    vec16 low = vadd(vadd(acc[0], acc[2]), vadd(acc[4], acc[6]));
    vec16 high = vadd(vadd(acc[1], acc[3]), vadd(acc[5], acc[7]));
    vstore(y, vmul(low, vload(scales)));
    vstore(y + 16, vmul(high, vload(scales + 16)));
}

static inline void store_rows(int M, vec16 acc[][2], const float *scales, float *y, int64_t N) {
    for (int m = 0; m < M; m++) {
        vstore(y + m * N, vmul(acc[m][0], vload(scales)));
        vstore(y + m * N + 16, vmul(acc[m][1], vload(scales + 16)));
    }
}

/* M float32 rows, M a constant where it is inlined: the accumulators stay in registers */
static inline __attribute__((always_inline)) void rows_of(int M, const float *x, const int8_t *codes,
                                                          const float *scales, float *y, int64_t N, int64_t K) {
    vec16 acc[MAX_ROWS][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = vzero();
    for (int64_t k = 0; k < K; k++) {
        vec16 low = codes16(codes + k * BLOCK), high = codes16(codes + k * BLOCK + 16);
        for (int m = 0; m < M; m++) {
            vec16 xk = vset1(x[m * K + k]);
            acc[m][0] = vfmadd(low, xk, acc[m][0]);
            acc[m][1] = vfmadd(high, xk, acc[m][1]);
        }
    }
    store_rows(M, acc, scales, y, N);
}

#ifdef __AVX512BF16__
/* 16 output channels' codes for inputs k (a) and k + 1 (b) as bf16 pairs (k, k + 1) per channel */
static inline __m512bh code_pairs(__m128i a, __m128i b) {
    __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi8(a, b)));   /* channels 0-7 */
    __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpackhi_epi8(a, b)));  /* channels 8-15 */
    return _mm512_cvtne2ps_pbh(high, low);
}

/* M bf16 rows, two inputs per vdpbf16ps; an odd K's last input is paired with a zero */
static inline __attribute__((always_inline)) void bf16_rows_of(int M, const uint16_t *x, const int8_t *codes,
                                                               const float *scales, float *y, int64_t N, int64_t K) {
    __m512 acc[MAX_ROWS][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        const int8_t *p = codes + k * BLOCK;
        int pair = k + 1 < K;
        __m128i zero = _mm_setzero_si128();
        __m128i next_low = pair ? _mm_loadu_si128((const __m128i *)(p + BLOCK)) : zero;
        __m128i next_high = pair ? _mm_loadu_si128((const __m128i *)(p + BLOCK + 16)) : zero;
        __m512bh low = code_pairs(_mm_loadu_si128((const __m128i *)p), next_low);
        __m512bh high = code_pairs(_mm_loadu_si128((const __m128i *)(p + 16)), next_high);
        for (int m = 0; m < M; m++) {
            uint32_t inputs = x[m * K + k] | (pair ? (uint32_t)x[m * K + k + 1] << 16 : 0);
            __m512bh xk = (__m512bh)_mm512_set1_epi32((int32_t)inputs);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], low, xk);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], high, xk);
        }
    }
    store_rows(M, acc, scales, y, N);
}
#endif

typedef void (*float_rows)(const float *, const int8_t *, const float *, float *, int64_t, int64_t);
typedef void (*bf16_rows)(const uint16_t *, const int8_t *, const float *, float *, int64_t, int64_t);
#define ROWS(M) \
    static void rows_##M(const float *x, const int8_t *c, const float *s, float *y, int64_t N, int64_t K) { \
        rows_of(M, x, c, s, y, N, K); \
    }
ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
static const float_rows FLOAT_ROWS[MAX_ROWS + 1] = {0, 0, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8};
#ifdef __AVX512BF16__
#define BF16_ROWS(M) \
    static void bf16_rows_##M(const uint16_t *x, const int8_t *c, const float *s, float *y, int64_t N, int64_t K) { \
        bf16_rows_of(M, x, c, s, y, N, K); \
    }
BF16_ROWS(2) BF16_ROWS(3) BF16_ROWS(4) BF16_ROWS(5) BF16_ROWS(6) BF16_ROWS(7) BF16_ROWS(8)
static const bf16_rows BF16_ROWS_KERNELS[MAX_ROWS + 1] = {
    0, 0, bf16_rows_2, bf16_rows_3, bf16_rows_4, bf16_rows_5, bf16_rows_6, bf16_rows_7, bf16_rows_8};
#endif

/* One block of 32 output channels for all M rows, 8 at a time: the block's codes (K x 32 bytes) are read from memory
   for the first 8 rows and from the cache for the others. x is float32 (xf) or bf16 (xb). */
static void block(const float *xf, const uint16_t *xb, const int8_t *codes, const float *scales, float *y, int64_t M,
                  int64_t N, int64_t K) {
    for (int64_t m = 0; m < M; m += MAX_ROWS) {
        int64_t rows = M - m < MAX_ROWS ? M - m : MAX_ROWS;
        if (rows == 1 && xb)
            one_row(NULL, xb + m * K, codes, scales, y + m * N, K);
        else if (rows == 1)
            one_row(xf + m * K, NULL, codes, scales, y + m * N, K);
#ifdef __AVX512BF16__
        else if (xb)
            BF16_ROWS_KERNELS[rows](xb + m * K, codes, scales, y + m * N, N, K);
#endif
        else
            FLOAT_ROWS[rows](xf + m * K, codes, scales, y + m * N, N, K);
    }
}

static void blocks(const float *xf, const uint16_t *xb, const int8_t *codes, const float *scales, float *y,
                   int64_t M, int64_t N, int64_t K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < N / BLOCK; b++)
        block(xf, xb, codes + b * K * BLOCK, scales + b * BLOCK, y + b * BLOCK, M, N, K);
}

/* x (M, K) float32, codes (N / 32, K, 32) int8, scales (N,) float32 -> y (M, N) float32; all contiguous. */
void int8_blocked_matmul(const float *x, const int8_t *codes, const float *scales, float *y, int64_t M, int64_t N,
                         int64_t K, int threads) {
    blocks(x, NULL, codes, scales, y, M, N, K, threads);
}

/* The same with x (M, K) bf16 (its bits as uint16). Without AVX512_BF16, rows of more than one are widened to
   float32 first. Returns 0, or -1 where that copy could not be allocated. */
int int8_blocked_matmul_bf16(const uint16_t *x, const int8_t *codes, const float *scales, float *y, int64_t M,
                             int64_t N, int64_t K, int threads) {
#ifdef __AVX512BF16__
    blocks(NULL, x, codes, scales, y, M, N, K, threads);
#else
    if (M == 1) {
        blocks(NULL, x, codes, scales, y, M, N, K, threads);
        return 0;
    }
    float *wide = malloc((size_t)(M * K) * sizeof *wide);
    if (!wide) return -1;
    for (int64_t i = 0; i < M * K; i++) wide[i] = bf16_value(x[i]);
    blocks(wide, NULL, codes, scales, y, M, N, K, threads);
    free(wide);
#endif
    return 0;
}
