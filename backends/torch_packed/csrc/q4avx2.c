/* int4 x fp32 linear layer for x86-64 with AVX2 + FMA; backends/torch_packed/native.py compiles and loads it.
 *
 *     out[m, n] = bias[n] + sum_k x[m, k] * (u[n, k] - z[n, g]) * s[n, g],      g = k / group
 *
 * Layout "q4" of the 4-bit storage codes u (K rounded up to k16, a multiple of 16; rows in blocks of 4, the
 * last block holding the N % 4 remaining rows if any): block b (rows 4b .. 4b + R - 1) starts at byte
 * 4b * k16 / 2; in it, the 16-column chunk c of row r is the 8 bytes at (c * R + r) * 8, byte j holding
 * u[16c + j] in its low nibble and u[16c + 8 + j] in its high nibble. One widening 8-byte load (8 int32
 * lanes) gives columns 16c .. 16c + 7 (`& 15`) and 16c + 8 .. 16c + 15 (`>> 4`) with no other shuffle, and
 * a block of 4 rows is one sequential stream (the hardware prefetcher follows it; we prefetch ahead too,
 * which made streaming from DRAM as fast as running from cache: 4 separate row streams were ~1.6x slower).
 *
 * s: fp32 scales [N, k16 / group] (any sign); z: uint8 zero points of the same shape, or NULL for symmetric
 * codes (z = 8, u = q + 8). group: a multiple of 16 that divides k16 (per channel: group = k16).
 * x: fp32 [M, k16] (padding columns zero), out: fp32 [M, N], bias: fp32 [N] or NULL.
 *
 * M <= DIRECT_M (decode, small batches): codes are widened and multiplied unscaled; per (input row, output
 * row, group) the dot product is scaled once, the zero point entering as z * s * sum(x over the group), so
 * the inner loop is one load, and/shift, two int->float conversions and 2 * MB FMAs per 16 codes, for 4
 * (or 2) output rows and MB input rows at once. Larger M: a 4-row x KC-column tile is dequantized exactly as
 * fake-quant does it ((u - z) * s, one rounding) into an L1 buffer and multiplied with 3 input rows at a
 * time. fp32 throughout: the results differ from dequantize + fp32 matmul only by summation order.
 * Threads: OpenMP over blocks of output rows, `threads` of them (the caller passes torch's thread count),
 * handed out dynamically in runs of CHUNK blocks.
 *
 * The same library holds i8_linear, the W8A8 kernel (int8 x int8 -> int32, then fp32 scales; see its comment
 * further down), and three small fp32 ops of the decode step that replace chains of torch ops bit for bit
 * (token_quant: per-token symmetric int quantization; rms_norm_f32; rope_f32; see the comment at the end),
 * and the store / load of a low-bit K/V cache (kv_store, kv_load; the comment before them, at the end),
 * and lut_linear, the codebook (table lookup) linear layer (its comment, near the end), and attention_f32, the
 * decode step's attention for a few query rows (its comment, at the very end).
 */
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <time.h>

#define INLINE static inline __attribute__((always_inline))
/* The cache level the int4 kernels' weight-stream prefetches fill (q4_linear, q4_linear_a8 / _i8): L2 (T1). A
 * decode step at model size streams weights that are in no cache; a T0 prefetch (into L1) holds one of L1's few
 * line-fill buffers per line for the whole trip from DRAM, a T1 prefetch only L2's larger queue, so more lines are
 * in flight. Cold stream of every linear of a 0.5 B decode step at M = 1, one thread (scratch measurement,
 * 2026-12-06, Intel Xeon): q4a8 69% -> 89% of the read bandwidth, q4 (exact) 49% -> 56%; the int8 kernels measured
 * better with T0 (i8 87% vs 81%, w8 84% vs 82%) and keep it. Weights already in L1/L2 (small models) lose a
 * little: the demand load then hits L2 instead of L1 (q4a8 -12% at 2048x2048 in cache). tools/bench_size.py has
 * the model numbers. */
#ifndef QP_HINT
#define QP_HINT _MM_HINT_T1
#endif
#define RB 4                   /* output rows per block (the layout's block) */
#define KC 256                 /* columns per dequantized tile */
#define MC 32                  /* input rows per pass over the weights in the tile path (x block stays in L2) */
#define DIRECT_M 4             /* M up to which the direct path runs (the tile path is faster beyond) */
#define PREFETCH 1024          /* bytes ahead of the current chunk */
#define PARALLEL_MIN (1 << 17) /* multiply-adds below which one thread beats forking */
#define CHUNK 16               /* the smallest run of row blocks a thread takes (guided: each thread first
                                  takes a long contiguous run, which streams best from memory, then shorter
                                  ones, so that a thread the OS preempts holds the others up less: cold 0.5 B
                                  shapes at 2 threads, q4a8, scratch A/B against dynamic runs of 16 blocks:
                                  5632x2048 25.3 -> 29-32 GB/s, 32000x2048 20.9 -> 23.3, 512x2048 28 -> 30) */

int q4_abi_version(void) { return 11; }

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

INLINE __m256i load_codes(const uint8_t *p) { /* 8 bytes -> 8 int32 lanes */
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* ------------------------------------------------------------------------------------------- direct */

/* sum_g s[g] * z[g] * xs[g] (z NULL: z = 8) over the `groups` groups of one output row */
INLINE float zero_term(const float *s, const uint8_t *z, const float *xs, int64_t groups) {
    float t = 0.f;
    int64_t g = 0;
    if (!z) {
        __m256 a = _mm256_setzero_ps();
        for (; g + 8 <= groups; g += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(s + g), _mm256_loadu_ps(xs + g), a);
        t = hsum(a);
    }
    for (; g < groups; g++) t += s[g] * xs[g] * (z ? (float)z[g] : 1.f);
    return z ? t : 8.f * t;
}

/* R output rows (row r: codes at w + 8r, chunk stride cs bytes; scales s + r * groups) x MB input rows
 * (x + m * ldx, group sums xsum + m * groups) -> out[m * ldo + r].
 * Per group, each 8-lane dot product is folded to 4 lanes and scaled into a 4-lane total: the horizontal
 * sums wait until the end (a 4-row hadd reduction per group cost ~15% of the g128 time); the zero-point
 * term sum_g s z sum(x over g) is subtracted at the end too. */
INLINE void direct(const int R, const int MB, const float *x, int64_t ldx, const float *xsum,
                   const uint8_t *w, int64_t cs, const float *s, const uint8_t *z, int64_t groups,
                   int64_t gchunks, const float *bias, float *out, int64_t ldo) {
    const __m256i mask = _mm256_set1_epi32(15);
    __m256 acc[4][RB];
    __m128 tot[4][RB];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) tot[m][r] = _mm_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
        for (int64_t c = g * gchunks; c < (g + 1) * gchunks; c++) {
            const uint8_t *wc = w + c * cs;
            _mm_prefetch((const char *)(wc + PREFETCH), QP_HINT);
            __m256 lo[RB], hi[RB];
            for (int r = 0; r < R; r++) {
                const __m256i v = load_codes(wc + 8 * r);
                lo[r] = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
                hi[r] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
            }
            for (int m = 0; m < MB; m++) {
                const __m256 xl = _mm256_loadu_ps(x + m * ldx + 16 * c);
                const __m256 xh = _mm256_loadu_ps(x + m * ldx + 16 * c + 8);
                for (int r = 0; r < R; r++)
                    acc[m][r] = _mm256_fmadd_ps(hi[r], xh, _mm256_fmadd_ps(lo[r], xl, acc[m][r]));
            }
        }
        for (int r = 0; r < R; r++) {
            const __m128 sv = _mm_broadcast_ss(s + r * groups + g);
            for (int m = 0; m < MB; m++) {
                const __m256 a = acc[m][r];
                tot[m][r] = _mm_fmadd_ps(_mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)), sv,
                                         tot[m][r]);
            }
        }
    }
    for (int m = 0; m < MB; m++) {
        float res[RB];
        if (R == RB) {
            _mm_storeu_ps(res, _mm_hadd_ps(_mm_hadd_ps(tot[m][0], tot[m][1]), _mm_hadd_ps(tot[m][2], tot[m][3])));
        } else {
            for (int r = 0; r < R; r++) {
                const __m128 t = _mm_hadd_ps(tot[m][r], tot[m][r]);
                res[r] = _mm_cvtss_f32(_mm_hadd_ps(t, t));
            }
        }
        for (int r = 0; r < R; r++) {
            const float zt = zero_term(s + r * groups, z ? z + r * groups : NULL, xsum + m * groups, groups);
            out[m * ldo + r] = res[r] - zt + (bias ? bias[r] : 0.f);
        }
    }
}

/* One layout block (R rows from n0) against input rows [0, M): up to 4 input rows per pass. */
static void direct_block(const float *x, int64_t mrows, int64_t k16, const float *xsum, const uint8_t *w,
                         int64_t n, int64_t n0, int R, const float *s, const uint8_t *z, int64_t groups,
                         int64_t gchunks, const float *bias, float *out) {
    const uint8_t *wb = w + n0 * (k16 / 2);
    const float *sb = s + n0 * groups, *bb = bias ? bias + n0 : NULL;
    const uint8_t *zb = z ? z + n0 * groups : NULL;
    const int64_t cs = 8 * R;
    if (R < RB) { /* the last, partial block: one row at a time */
        for (int r = 0; r < R; r++)
            for (int64_t m = 0; m < mrows; m++)
                direct(1, 1, x + m * k16, k16, xsum + m * groups, wb + 8 * r, cs, sb + r * groups,
                       zb ? zb + r * groups : NULL, groups, gchunks, bb ? bb + r : NULL, out + m * n + n0 + r, n);
        return;
    }
    int64_t m = 0;
    if (mrows == 1) {
        direct(4, 1, x, k16, xsum, wb, cs, sb, zb, groups, gchunks, bb, out + n0, n);
        return;
    }
    for (; m + 4 <= mrows; m += 4)  /* 4 input rows x 2 output rows: 8 accumulators */
        for (int h = 0; h < 2; h++)
            direct(2, 4, x + m * k16, k16, xsum + m * groups, wb + 16 * h, cs, sb + 2 * h * groups,
                   zb ? zb + 2 * h * groups : NULL, groups, gchunks, bb ? bb + 2 * h : NULL,
                   out + m * n + n0 + 2 * h, n);
    for (; m + 2 <= mrows; m += 2)
        direct(4, 2, x + m * k16, k16, xsum + m * groups, wb, cs, sb, zb, groups, gchunks, bb, out + m * n + n0, n);
    for (; m < mrows; m++)
        direct(4, 1, x + m * k16, k16, xsum + m * groups, wb, cs, sb, zb, groups, gchunks, bb, out + m * n + n0, n);
}

static int direct_all(const float *x, int64_t mrows, int64_t k16, const uint8_t *w, int64_t n, const float *s,
                      const uint8_t *z, int64_t group, const float *bias, float *out, int threads) {
    const int64_t groups = k16 / group, gchunks = group / 16, blocks = (n + RB - 1) / RB;
    float *xsum = malloc(sizeof(float) * mrows * groups);
    if (!xsum) return -1;
    for (int64_t m = 0; m < mrows; m++)
        for (int64_t g = 0; g < groups; g++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = g * group; k < (g + 1) * group; k += 8)
                a = _mm256_add_ps(a, _mm256_loadu_ps(x + m * k16 + k));
            xsum[m * groups + g] = hsum(a);
        }
    const int parallel = threads > 1 && mrows * n * k16 >= PARALLEL_MIN;
    #pragma omp parallel for schedule(guided, CHUNK) num_threads(threads) if (parallel)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * RB;
        direct_block(x, mrows, k16, xsum, w, n, n0, n - n0 < RB ? (int)(n - n0) : RB, s, z, groups, gchunks, bias,
                     out);
    }
    free(xsum);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- tile */

/* Dequantize R rows (row r: codes at w + 8r, chunk stride cs) x columns [k0, k0 + kc) into wt[r * KC + j]. */
INLINE void dequant_tile(const int R, const uint8_t *w, int64_t cs, const float *s, const uint8_t *z,
                         int64_t groups, int64_t gchunks, int64_t k0, int64_t kc, float *wt) {
    const __m256i mask = _mm256_set1_epi32(15);
    for (int64_t c = 0; c < kc / 16; c++) {
        const int64_t chunk = k0 / 16 + c, g = chunk / gchunks;
        for (int r = 0; r < R; r++) {
            const __m256 sv = _mm256_set1_ps(s[r * groups + g]);
            const __m256 zv = _mm256_set1_ps(z ? (float)z[r * groups + g] : 8.f);
            const __m256i v = load_codes(w + chunk * cs + 8 * r);
            const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
            const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
            _mm256_store_ps(wt + r * KC + 16 * c, _mm256_mul_ps(_mm256_sub_ps(lo, zv), sv));
            _mm256_store_ps(wt + r * KC + 16 * c + 8, _mm256_mul_ps(_mm256_sub_ps(hi, zv), sv));
        }
    }
}

/* acc[m * RB + r] (8 partial sums) += x[m, 0 : kc] . wt[r] for MB input rows and R weight rows. */
INLINE void tile_mul(const int MB, const int R, const float *x, int64_t ldx, const float *wt, int64_t kc,
                     __m256 *acc) {
    __m256 c[3][RB];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) c[m][r] = acc[m * RB + r];
    for (int64_t k = 0; k < kc; k += 8) {
        __m256 wv[RB];
        for (int r = 0; r < R; r++) wv[r] = _mm256_load_ps(wt + r * KC + k);
        for (int m = 0; m < MB; m++) {
            const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
            for (int r = 0; r < R; r++) c[m][r] = _mm256_fmadd_ps(xv, wv[r], c[m][r]);
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) acc[m * RB + r] = c[m][r];
}

INLINE void tile_rows(const int R, const float *x, int64_t mrows, int64_t k16, const uint8_t *w, int64_t cs,
                      int64_t n, const float *s, const uint8_t *z, int64_t groups, int64_t gchunks,
                      const float *bias, float *out, float *wt, __m256 *acc) {
    for (int64_t i = 0; i < mrows * RB; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < k16; k0 += KC) {
        const int64_t kc = k16 - k0 < KC ? k16 - k0 : KC;
        dequant_tile(R, w, cs, s, z, groups, gchunks, k0, kc, wt);
        int64_t m = 0;
        for (; m + 3 <= mrows; m += 3) tile_mul(3, R, x + m * k16 + k0, k16, wt, kc, acc + m * RB);
        if (mrows - m == 2) tile_mul(2, R, x + m * k16 + k0, k16, wt, kc, acc + m * RB);
        if (mrows - m == 1) tile_mul(1, R, x + m * k16 + k0, k16, wt, kc, acc + m * RB);
    }
    for (int64_t m = 0; m < mrows; m++)
        for (int r = 0; r < R; r++) out[m * n + r] = hsum(acc[m * RB + r]) + (bias ? bias[r] : 0.f);
}

static int tile_all(const float *x, int64_t mrows, int64_t k16, const uint8_t *w, int64_t n, const float *s,
                    const uint8_t *z, int64_t group, const float *bias, float *out, int threads) {
    const int64_t groups = k16 / group, gchunks = group / 16, blocks = (n + RB - 1) / RB;
    int failed = 0;
    const int parallel = threads > 1 && mrows * n * k16 >= PARALLEL_MIN;
    #pragma omp parallel num_threads(threads) if (parallel)
    {
        float *wt = aligned_alloc(32, sizeof(float) * RB * KC);
        __m256 *acc = aligned_alloc(32, sizeof(__m256) * RB * MC);
        if (!wt || !acc) {
            #pragma omp atomic write
            failed = 1;
        }
        for (int64_t m0 = 0; m0 < mrows; m0 += MC) {
            const int64_t mr = mrows - m0 < MC ? mrows - m0 : MC;
            #pragma omp for schedule(dynamic, CHUNK)
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t n0 = b * RB;
                const int R = n - n0 < RB ? (int)(n - n0) : RB;
                const uint8_t *wb = w + n0 * (k16 / 2);
                if (!wt || !acc) continue;
                if (R == RB) {
                    tile_rows(RB, x + m0 * k16, mr, k16, wb, 8 * RB, n, s + n0 * groups, z ? z + n0 * groups : NULL,
                              groups, gchunks, bias ? bias + n0 : NULL, out + m0 * n + n0, wt, acc);
                } else {
                    for (int r = 0; r < R; r++)
                        tile_rows(1, x + m0 * k16, mr, k16, wb + 8 * r, 8 * R, n, s + (n0 + r) * groups,
                                  z ? z + (n0 + r) * groups : NULL, groups, gchunks, bias ? bias + n0 + r : NULL,
                                  out + m0 * n + n0 + r, wt, acc);
                }
            }
        }
        free(wt);
        free(acc);
    }
    return failed ? -1 : 0;
}

/* The entry point. Returns 0, or -1 on bad arguments or a failed allocation (out is then undefined). */
int q4_linear(const float *x, int64_t m, int64_t k16, const uint8_t *w, int64_t n, const float *s,
              const uint8_t *z, int64_t group, const float *bias, float *out, int threads) {
    if (m < 0 || n < 0 || k16 <= 0 || k16 % 16 || group <= 0 || group % 16 || k16 % group) return -1;
    if (m == 0 || n == 0) return 0;
    if (threads < 1) threads = 1;
    if (m <= DIRECT_M) return direct_all(x, m, k16, w, n, s, z, group, bias, out, threads);
    return tile_all(x, m, k16, w, n, s, z, group, bias, out, threads);
}

/* For tests and tuning: force one path (0: direct, 1: tile). */
int q4_linear_path(int path, const float *x, int64_t m, int64_t k16, const uint8_t *w, int64_t n, const float *s,
                   const uint8_t *z, int64_t group, const float *bias, float *out, int threads) {
    if (m < 0 || n < 0 || k16 <= 0 || k16 % 16 || group <= 0 || group % 16 || k16 % group) return -1;
    if (m == 0 || n == 0) return 0;
    if (threads < 1) threads = 1;
    return path ? tile_all(x, m, k16, w, n, s, z, group, bias, out, threads)
                : direct_all(x, m, k16, w, n, s, z, group, bias, out, threads);
}

/* ------------------------------------------------------------------------- int8-activation direct path
 *
 * q4_linear_a8: the same product with the input rounded to int8 first, in blocks of XB columns of a token
 * (q4_a8_block: XB = 128, or 64, 32, 16 where the weight group, k16 for per-channel weights, is not a multiple of
 * 128; a block never straddles two groups):
 *
 *     sx = max|x_b| / 127,  xq = rint(x / sx) (0 where sx = 0),  x^ = sx * xq,
 *     out[m, n] = bias[n] + sum_g s[n, g] * (sum_{k in g} x^_k u[n, k] - z[n, g] sum_{k in g} x^_k)
 *
 * i.e. exactly q4_linear on x^ up to fp32 summation order (the approximation is x -> x^ alone; tests compare
 * against dequantize + fp32 matmul on x^, computed in torch with the same IEEE division and round-half-even).
 * Why: the exact path spends ~7 vector ops per 8 code bytes on widening, converting and multiplying (it runs
 * at about 40% of DRAM read bandwidth for one thread); here 32 code bytes (16 codes of 4 rows: one load) take
 * an and, a shift, an and and two vpmaddubsw (u8 code x s8 input: |sum| <= 2 * 15 * 128, no saturation, and
 * two chunks still fit int16), the int32 widening, conversion and one FMA coming once per XB-column block.
 * The input's 8-byte halves are broadcast to the 4 rows of a block straight from memory (vpbroadcastq).
 * Why blocks of 128 rather than 32 (the choice until ABI 10): the float work per block is a third of the ops
 * per weight byte at 32, under a tenth at 128, and the 512-bit kernel then streams cold weights at 1.06-1.08x
 * (1 thread) and 1.13x (2 threads) the speed of the 32-column 256-bit one (0.5 B model shapes, scratch A/B);
 * the input rounding error grows with the block's range (the bound below is per block), and what it costs in
 * perplexity is measured by tools/kernel_accuracy.py (docs/benchmarks.md). The same trade llama.cpp (Q8
 * activations; its K-quants in blocks of 256) and onnxruntime's MatMulNBits at accuracy level 4 (blocks of the
 * weight block length) make; kernels.py registers it as an approximate kernel (exact=False), chosen by
 * measurement like the bf16 ones.
 */
#define A8_MAXM 4
#define A8_MAXCB 8             /* chunks (16 columns) per input block: xb <= 128 */
#ifndef A8_PREFETCH
#define A8_PREFETCH 8192      /* bytes ahead, one prefetch per 64-byte line. Chosen by a scratch sweep
                                  (1 KB, as the exact path, was slower than 8 KB at M = 1); what a tool
                                  measures: docs/benchmarks.md's linear table (python tools/bench.py) */
#endif

INLINE float hmax_abs(const float *x, int64_t n) {     /* n: a multiple of 8 */
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 a = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [m, k16] -> xq int8 [m, k16], sx [m, k16 / xb], xs [m, groups] (sum of x^ over each weight group) */
static void a8_quantize(const float *x, int64_t m, int64_t k16, int64_t xb, int64_t group, int8_t *xq, float *sx,
                        float *xs) {
    const int64_t nb = k16 / xb, groups = k16 / group, per = group / xb;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t g = 0; g < groups; g++) xs[i * groups + g] = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const float *xp = x + i * k16 + b * xb;
            int8_t *qp = xq + i * k16 + b * xb;
            const float a = hmax_abs(xp, xb), s = a / 127.f;
            int32_t isum = 0;
            if (s > 0.f) {
                const __m256 sv = _mm256_set1_ps(s);
                for (int64_t j = 0; j < xb; j += 8) {
                    const __m256i q = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xp + j), sv));
                    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                    _mm_storel_epi64((__m128i *)(qp + j), _mm_packs_epi16(w16, w16));
                    isum += hsum_i32(q);
                }
            } else {
                memset(qp, 0, (size_t)xb);
            }
            sx[i * nb + b] = s;
            xs[i * groups + b / per] += s * (float)isum;
        }
    }
}

INLINE __m256i bcast8(const int8_t *p) {
    int64_t v;
    memcpy(&v, p, 8);
    return _mm256_set1_epi64x(v);
}

/* RB = 4 output rows (one layout block: chunk c at w + c * 32) x MB input rows; DOT(lo, hi, xp, CB) gives the
 * 8 int32 lanes (lanes 2r, 2r + 1: row r) of one XB-column block. Defined once per instruction set (below). */
#define A8_DIRECT(NAME, ATTR, DOT)                                                                              \
ATTR INLINE void NAME(const int MB, const int CB, const int8_t *xq, int64_t k16, const float *sx, int64_t nb,   \
                      const float *xs, const uint8_t *w, const float *s, const uint8_t *z, int64_t groups,       \
                      int64_t gblocks, const float *bias, float *out, int64_t ldo) {                            \
    const __m256i m4 = _mm256_set1_epi8(15);                                                                    \
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);                                              \
    __m256 acc[A8_MAXM];                                                                                        \
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();                                                  \
    for (int64_t g = 0; g < groups; g++) {                                                                      \
        const __m256 sw = _mm256_permutevar8x32_ps(                                                             \
            _mm256_castps128_ps256(_mm_setr_ps(s[g], s[groups + g], s[2 * groups + g], s[3 * groups + g])), dup); \
        for (int64_t bb = 0; bb < gblocks; bb++) {                                                              \
            const int64_t b = g * gblocks + bb, c0 = b * CB;                                                    \
            __m256i lo[A8_MAXCB], hi[A8_MAXCB];                                                                 \
            for (int cc = 0; cc < CB; cc++) {                                                                   \
                const uint8_t *wc = w + (c0 + cc) * 32;                                                         \
                if (!((c0 + cc) & 1)) _mm_prefetch((const char *)(wc + A8_PREFETCH), QP_HINT);              \
                const __m256i v = _mm256_loadu_si256((const __m256i *)wc);                                      \
                lo[cc] = _mm256_and_si256(v, m4);                                                               \
                hi[cc] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);                                         \
            }                                                                                                   \
            for (int m = 0; m < MB; m++)                                                                        \
                acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(lo, hi, xq + m * k16 + 16 * c0, CB)),           \
                                         _mm256_mul_ps(sw, _mm256_broadcast_ss(sx + m * nb + b)), acc[m]);      \
        }                                                                                                       \
    }                                                                                                           \
    for (int m = 0; m < MB; m++) {                                                                              \
        float res[8];                                                                                           \
        _mm256_storeu_ps(res, acc[m]);                                                                          \
        for (int r = 0; r < RB; r++) {                                                                          \
            const float zt = zero_term(s + r * groups, z ? z + r * groups : NULL, xs + m * groups, groups);     \
            out[m * ldo + r] = (res[2 * r] + res[2 * r + 1]) - zt + (bias ? bias[r] : 0.f);                     \
        }                                                                                                       \
    }                                                                                                           \
}

/* One full layout block against every input row, A8_MAXM at a time (MB and CB constants for the compiler: CB is
 * xb / 16, one of 1, 2, 4, 8). */
#define A8_MB(DIRECT, MBV, CBV) DIRECT(MBV, CBV, xi, k16, sxi, nb, xsi, w, s, z, groups, gblocks, bias, oi, ldo)
#define A8_CB(DIRECT, CBV)                                                                                      \
    do {                                                                                                        \
        if (mb == 1) A8_MB(DIRECT, 1, CBV);                                                                     \
        else if (mb == 2) A8_MB(DIRECT, 2, CBV);                                                                \
        else if (mb == 3) A8_MB(DIRECT, 3, CBV);                                                                \
        else A8_MB(DIRECT, 4, CBV);                                                                             \
    } while (0)
#define A8_BLOCK(NAME, ATTR, DIRECT)                                                                            \
ATTR static void NAME(const int CB, const int8_t *xq, int64_t m, int64_t k16, const float *sx, int64_t nb,      \
                      const float *xs, const uint8_t *w, const float *s, const uint8_t *z, int64_t groups,       \
                      int64_t gblocks, const float *bias, float *out, int64_t ldo) {                            \
    for (int64_t i = 0; i < m; i += A8_MAXM) {                                                                  \
        const int mb = m - i < A8_MAXM ? (int)(m - i) : A8_MAXM;                                                \
        const int8_t *xi = xq + i * k16;                                                                        \
        const float *sxi = sx + i * nb, *xsi = xs + i * groups;                                                 \
        float *oi = out + i * ldo;                                                                              \
        if (CB == 8) A8_CB(DIRECT, 8);                                                                          \
        else if (CB == 4) A8_CB(DIRECT, 4);                                                                     \
        else if (CB == 2) A8_CB(DIRECT, 2);                                                                     \
        else A8_CB(DIRECT, 1);                                                                                  \
    }                                                                                                           \
}

/* AVX2: vpmaddubsw (u8 code x s8 input -> s16 pairs, |pair| <= 3840: two chunks' lo + hi still fit int16),
 * then vpmaddwd with ones to int32, per two chunks. */
INLINE __m256i a8_dot_avx2(const __m256i *lo, const __m256i *hi, const int8_t *xp, const int CB) {
    __m256i acc = _mm256_setzero_si256();
    for (int c = 0; c < CB; c += 2) {
        const int8_t *x = xp + 16 * c;
        __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo[c], bcast8(x)),
                                     _mm256_maddubs_epi16(hi[c], bcast8(x + 8)));
        if (c + 1 < CB)
            t = _mm256_add_epi16(t, _mm256_add_epi16(_mm256_maddubs_epi16(lo[c + 1], bcast8(x + 16)),
                                                     _mm256_maddubs_epi16(hi[c + 1], bcast8(x + 24))));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(t, _mm256_set1_epi16(1)));
    }
    return acc;
}
A8_DIRECT(a8_direct_avx2, , a8_dot_avx2)
A8_BLOCK(a8_block_avx2, , a8_direct_avx2)

/* VNNI (vpdpbusd: u8 x s8, four products summed into each int32 lane in one instruction), where the compiler
 * knows the instruction sets and the CPU has them (checked with cpuid at run time): the VEX form (AVX-VNNI) or
 * the EVEX one on 256-bit registers (AVX512-VNNI + VL). The same integers as vpmaddubsw here (no saturation). */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define A8_VNNI 1
#define T_AVXVNNI __attribute__((target("avxvnni")))
#define T_AVX512VNNI __attribute__((target("avx512vnni,avx512vl")))
#define A8_DOT_VNNI(NAME, ATTR, DPBUSD)                                                                         \
ATTR INLINE __m256i NAME(const __m256i *lo, const __m256i *hi, const int8_t *xp, const int CB) {                 \
    __m256i t0 = DPBUSD(_mm256_setzero_si256(), lo[0], bcast8(xp));                                             \
    __m256i t1 = DPBUSD(_mm256_setzero_si256(), hi[0], bcast8(xp + 8));                                         \
    for (int c = 1; c < CB; c++) {                                                                              \
        t0 = DPBUSD(t0, lo[c], bcast8(xp + 16 * c));                                                            \
        t1 = DPBUSD(t1, hi[c], bcast8(xp + 16 * c + 8));                                                        \
    }                                                                                                           \
    return _mm256_add_epi32(t0, t1);                                                                            \
}
A8_DOT_VNNI(a8_dot_avxvnni, T_AVXVNNI, _mm256_dpbusd_avx_epi32)
A8_DOT_VNNI(a8_dot_avx512vnni, T_AVX512VNNI, _mm256_dpbusd_epi32)
A8_DIRECT(a8_direct_avxvnni, T_AVXVNNI, a8_dot_avxvnni)
A8_BLOCK(a8_block_avxvnni, T_AVXVNNI, a8_direct_avxvnni)
A8_DIRECT(a8_direct_avx512vnni, T_AVX512VNNI, a8_dot_avx512vnni)
A8_BLOCK(a8_block_avx512vnni, T_AVX512VNNI, a8_direct_avx512vnni)

/* The 512-bit kernel's input: per 32-column block of xq (k16 % 32 == 0), its qwords 0, 2 under the two chunks'
 * rows (4 copies each) then qwords 1, 3: 128 bytes, so that the kernel's inner loop loads them as they are. */
static void a8_expand(const int8_t *xq, int64_t m, int64_t k16, int8_t *xe) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t b = 0; b < k16 / 32; b++) {
            const int8_t *q = xq + i * k16 + 32 * b;
            int8_t *e = xe + i * 4 * k16 + 128 * b;
            for (int r = 0; r < 4; r++) {
                memcpy(e + 8 * r, q, 8), memcpy(e + 32 + 8 * r, q + 16, 8);
                memcpy(e + 64 + 8 * r, q + 8, 8), memcpy(e + 96 + 8 * r, q + 24, 8);
            }
        }
}

/* AVX-512 on 512-bit registers (AVX512-VNNI + BW), input blocks of 32, 64 or 128 columns (P = xb / 32 pairs of
 * chunks): one load takes a pair (4 rows x 32 columns), one and / shift / and unpacks it, and two vpdpbusd
 * multiply it with the pair's input as a8_expand lays it out (qwords 0, 2 under the two chunks' rows, then qwords
 * 1, 3), so the input needs no shuffle in the loop. The int32 sums run over the whole block, then one conversion
 * and one FMA per block. Per 64 weight bytes: 3 logic ops, 2 vpdpbusd and 3 / P float ops, against 6, 4 and 3 / P
 * on 256-bit registers. */
#define T_AVX512W __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl")))
T_AVX512W INLINE void a8_direct_512(const int MB, const int P, const int8_t *xe, int64_t k16, const float *sx,
                                    int64_t nb, const float *xs, const uint8_t *w, const float *s, const uint8_t *z,
                                    int64_t groups, int64_t gblocks, const float *bias, float *out, int64_t ldo) {
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3);
    __m512 acc[A8_MAXM];
    for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const __m512 sw = _mm512_permutexvar_ps(
            dup, _mm512_castps128_ps512(_mm_setr_ps(s[g], s[groups + g], s[2 * groups + g], s[3 * groups + g])));
        for (int64_t bb = 0; bb < gblocks; bb++) {
            const int64_t b = g * gblocks + bb;
            if (MB == 1) {                    /* one input row: each pair multiplied as soon as it is loaded */
                const int8_t *xp = xe + 128 * P * b;
                __m512i t0 = _mm512_setzero_si512(), t1 = _mm512_setzero_si512();
                /* not unrolled: the unrolled loop (4 prefetches, then the loads) streamed cold weights ~8% slower
                 * in a scratch A/B on this Xeon */
                _Pragma("GCC unroll 1") for (int p = 0; p < P; p++) {
                    const uint8_t *wc = w + (b * P + p) * 64;
                    _mm_prefetch((const char *)(wc + A8_PREFETCH), QP_HINT);
                    __m512i v = _mm512_loadu_si512((const void *)wc);
                    __asm__("" : "+v"(v));        /* one load per line: else the and and the shift each load it */
                    t0 = _mm512_dpbusd_epi32(t0, _mm512_and_si512(v, m4),
                                             _mm512_loadu_si512((const void *)(xp + 128 * p)));
                    t1 = _mm512_dpbusd_epi32(t1, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
                                             _mm512_loadu_si512((const void *)(xp + 128 * p + 64)));
                }
                acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)),
                                         _mm512_mul_ps(sw, _mm512_set1_ps(sx[b])), acc[0]);
                continue;
            }
            __m512i lo[A8_MAXCB / 2], hi[A8_MAXCB / 2];
            for (int p = 0; p < P; p++) {
                const uint8_t *wc = w + (b * P + p) * 64;
                _mm_prefetch((const char *)(wc + A8_PREFETCH), QP_HINT);
                __m512i v = _mm512_loadu_si512((const void *)wc);
                __asm__("" : "+v"(v));
                lo[p] = _mm512_and_si512(v, m4);
                hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
            for (int m = 0; m < MB; m++) {
                const int8_t *xp = xe + m * 4 * k16 + 128 * P * b;
                __m512i t0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], _mm512_loadu_si512((const void *)xp));
                __m512i t1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0],
                                                 _mm512_loadu_si512((const void *)(xp + 64)));
                for (int p = 1; p < P; p++) {
                    t0 = _mm512_dpbusd_epi32(t0, lo[p], _mm512_loadu_si512((const void *)(xp + 128 * p)));
                    t1 = _mm512_dpbusd_epi32(t1, hi[p], _mm512_loadu_si512((const void *)(xp + 128 * p + 64)));
                }
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)),
                                         _mm512_mul_ps(sw, _mm512_set1_ps(sx[m * nb + b])), acc[m]);
            }
        }
    }
    for (int m = 0; m < MB; m++) {
        float res[16];
        _mm512_storeu_ps(res, acc[m]);
        for (int r = 0; r < RB; r++) {
            const float zt = zero_term(s + r * groups, z ? z + r * groups : NULL, xs + m * groups, groups);
            out[m * ldo + r] = ((res[2 * r] + res[2 * r + 1]) + (res[8 + 2 * r] + res[9 + 2 * r])) - zt +
                               (bias ? bias[r] : 0.f);
        }
    }
}

/* A8_BLOCK's loop for the 512-bit kernel; CB (= 2P) is 2, 4 or 8 here (a8_run checks), xq the expanded input */
#define A8_MB512(MBV, PV) a8_direct_512(MBV, PV, xi, k16, sxi, nb, xsi, w, s, z, groups, gblocks, bias, oi, ldo)
#define A8_P512(PV)                                                                                             \
    do {                                                                                                        \
        if (mb == 1) A8_MB512(1, PV);                                                                           \
        else if (mb == 2) A8_MB512(2, PV);                                                                      \
        else if (mb == 3) A8_MB512(3, PV);                                                                      \
        else A8_MB512(4, PV);                                                                                   \
    } while (0)
T_AVX512W static void a8_block_512(const int CB, const int8_t *xq, int64_t m, int64_t k16, const float *sx,
                                   int64_t nb, const float *xs, const uint8_t *w, const float *s, const uint8_t *z,
                                   int64_t groups, int64_t gblocks, const float *bias, float *out, int64_t ldo) {
    for (int64_t i = 0; i < m; i += A8_MAXM) {
        const int mb = m - i < A8_MAXM ? (int)(m - i) : A8_MAXM;
        const int8_t *xi = xq + i * 4 * k16;
        const float *sxi = sx + i * nb, *xsi = xs + i * groups;
        float *oi = out + i * ldo;
        if (CB == 8) A8_P512(4);
        else if (CB == 4) A8_P512(2);
        else A8_P512(1);
    }
}
#endif

/* AVX512-VNNI + VL usable (the OS saves the AVX-512 state too: XCR0 bits 1, 2, 5..7) */
static int a8_isa_avx512(void) {
#if A8_VNNI
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((c >> 11) & 1) || !((b >> 31) & 1)) return 0;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6) == 0xe6;
#else
    return 0;
#endif
}

/* AVX512F + BW usable as well (the 512-bit kernel's and / shift on zmm registers). Asked of cpuid once per process:
 * in a VM cpuid traps to the hypervisor (~35 us a call here, more than a decode GEMV's own work at small sizes). */
static int avx512w_cached = -1;
static int a8_isa_avx512w(void) {
    int v = __atomic_load_n(&avx512w_cached, __ATOMIC_RELAXED);
    if (v >= 0) return v;
#if A8_VNNI
    unsigned a, b, c, d;
    v = a8_isa_avx512() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((b >> 16) & 1) && ((b >> 30) & 1);
#else
    v = 0;
#endif
    __atomic_store_n(&avx512w_cached, v, __ATOMIC_RELAXED);
    return v;
}

/* 0: AVX2, 1: AVX-VNNI, 2: AVX512-VNNI (+VL) on 256-bit registers, 3: AVX512-VNNI (+BW) on 512-bit registers
 * (input blocks of 32 columns or more; the 256-bit AVX512-VNNI kernel for blocks of 16), as far as the compiler
 * and the CPU both have them. The best: 3, else 1, else 2, else 0. */
static int a8_isa(void) {
#if A8_VNNI
    unsigned a, b, c, d;
    if (a8_isa_avx512w()) return 3;
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1)) return 1;
    if (a8_isa_avx512()) return 2;
#endif
    return 0;
}

typedef void (*a8_block_fn)(const int, const int8_t *, int64_t, int64_t, const float *, int64_t, const float *,
                            const uint8_t *, const float *, const uint8_t *, int64_t, int64_t, const float *,
                            float *, int64_t);

/* The last, partial layout block (R < 4 rows, chunk stride 8R): scalar, the same sums. */
static void a8_rows(int R, const int8_t *xq, int64_t mrows, int64_t k16, const float *sx, int64_t nb,
                    const float *xs, int64_t xb, const uint8_t *w, const float *s, const uint8_t *z, int64_t groups,
                    const float *bias, float *out, int64_t ldo) {
    const int64_t per = (k16 / groups) / xb;
    for (int r = 0; r < R; r++)
        for (int64_t m = 0; m < mrows; m++) {
            float tot = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t isum = 0;
                for (int64_t k = b * xb; k < (b + 1) * xb; k++) {
                    const uint8_t byte = w[(k / 16) * 8 * R + 8 * r + (k % 16) % 8];
                    const int u = (k % 16) < 8 ? (byte & 15) : (byte >> 4);
                    isum += u * xq[m * k16 + k];
                }
                tot += (float)isum * (s[r * groups + b / per] * sx[m * nb + b]);
            }
            const float zt = zero_term(s + r * groups, z ? z + r * groups : NULL, xs + m * groups, groups);
            out[m * ldo + r] = tot - zt + (bias ? bias[r] : 0.f);
        }
}

/* The product on prepared inputs: xq int8 [m, k16], sx [m, k16 / xb] block scales, xs [m, groups] sums of x^ */
static void a8_run(int isa, const int8_t *xq, const float *sx, const float *xs, int64_t xb, int64_t m, int64_t k16,
                   const uint8_t *w, int64_t n, const float *s, const uint8_t *z, int64_t group, const float *bias,
                   float *out, int threads) {
    a8_block_fn block = a8_block_avx2;
    const int64_t nb = k16 / xb, groups = k16 / group, gblocks = group / xb;
    const int CB = (int)(xb / 16);
    int8_t *xe = NULL;
    const int8_t *xk = xq;                               /* the block kernel's input */
#if A8_VNNI
    if (isa == 1) block = a8_block_avxvnni;
    else if (isa >= 2) block = a8_block_avx512vnni;
    /* 64-byte aligned: the kernel loads it in whole cache lines (a split load costs about a tenth of the speed) */
    if (isa == 3 && CB >= 2 && (xe = aligned_alloc(64, (size_t)(4 * m * k16))) != NULL) {   /* no memory: 256-bit */
        a8_expand(xq, m, k16, xe);
        block = a8_block_512;
        xk = xe;
    }
#endif
    const int64_t blocks = (n + RB - 1) / RB;
    const int parallel = threads > 1 && m * n * k16 >= PARALLEL_MIN;
    #pragma omp parallel for schedule(guided, CHUNK) num_threads(threads) if (parallel)
    for (int64_t bl = 0; bl < blocks; bl++) {
        const int64_t n0 = bl * RB;
        const int R = n - n0 < RB ? (int)(n - n0) : RB;
        const uint8_t *wb = w + n0 * (k16 / 2);
        const float *sb = s + n0 * groups, *bb = bias ? bias + n0 : NULL;
        const uint8_t *zb = z ? z + n0 * groups : NULL;
        if (R < RB) a8_rows(R, xq, m, k16, sx, nb, xs, xb, wb, sb, zb, groups, bb, out + n0, n);
        else block(CB, xk, m, k16, sx, nb, xs, wb, sb, zb, groups, gblocks, bb, out + n0, n);
    }
    free(xe);
}

static int q4_args_bad(int64_t m, int64_t n, int64_t k16, int64_t group) {
    return m < 0 || n < 0 || k16 <= 0 || k16 % 16 || group <= 0 || group % 16 || k16 % group;
}

/* --------------------------------------------------------------------------------- dequantize rows
 *
 * q4_dequant: rows [n0, n1) of the q4 layout as fp32, out[(i - n0) * ldo + j] = (u[i, j] - z[i, g]) * s[i, g]
 * (z = 8 without zero points; g = j / group) for j < kp, the columns the caller multiplies (kp <= k16: the
 * weight's own K padded to whole groups; the columns up to k16 are never written). One rounding per value, as
 * fake-quant (and PackedLinear.dequantize) does it: (u - z) is exact in fp32, so the values equal torch's bit
 * for bit. The kernels.py ``q4deq`` kernel runs this on tiles of rows that stay in L2 and multiplies each with
 * torch's fp32 matmul (MKL / oneDNN): the prefill path, where the matmul's register blocking beats our own.
 * Per layout block of 4 rows (the last one may hold fewer), 16 columns at a time: one 8-byte load per row, and,
 * shift, two conversions, a subtract and a multiply per 8 values. n0: a multiple of 4 (a block boundary).
 * Threads: OpenMP over blocks when the range is large enough to pay for the fork. Returns 0, or -1 on bad
 * arguments (out untouched).
 */
INLINE void deq_store(float *o, __m256 v, int64_t j, int64_t kp) {   /* values j .. j + 7, those below kp */
    if (j + 8 <= kp) {
        _mm256_storeu_ps(o + j, v);
    } else if (j < kp) {
        float t[8];
        _mm256_storeu_ps(t, v);
        memcpy(o + j, t, sizeof(float) * (size_t)(kp - j));
    }
}

int q4_dequant(const uint8_t *w, int64_t n, int64_t k16, const float *s, const uint8_t *z, int64_t group,
               int64_t n0, int64_t n1, int64_t kp, float *out, int64_t ldo, int threads) {
    if (q4_args_bad(0, n, k16, group) || n0 < 0 || n0 % RB || n1 < n0 || n1 > n || kp <= 0 || kp > k16 || ldo < kp)
        return -1;
    if (n1 == n0) return 0;
    if (threads < 1) threads = 1;
    const int64_t groups = k16 / group, gchunks = group / 16, chunks = (kp + 15) / 16;
    const int64_t b0 = n0 / RB, b1 = (n1 + RB - 1) / RB;
    const int parallel = threads > 1 && (n1 - n0) * kp >= PARALLEL_MIN;
    const __m256i mask = _mm256_set1_epi32(15);
    #pragma omp parallel for schedule(dynamic, CHUNK) num_threads(threads) if (parallel)
    for (int64_t b = b0; b < b1; b++) {
        const int64_t r0 = b * RB, R = n - r0 < RB ? n - r0 : RB, cs = 8 * R;
        const int64_t ra = r0 > n0 ? r0 : n0, rb = r0 + R < n1 ? r0 + R : n1;   /* rows of the block we write */
        const uint8_t *wb = w + r0 * (k16 / 2);
        for (int64_t i = ra; i < rb; i++) {
            const int64_t r = i - r0;
            float *o = out + (i - n0) * ldo;
            for (int64_t g = 0; g * gchunks < chunks; g++) {
                const __m256 sv = _mm256_set1_ps(s[i * groups + g]);
                const __m256 zv = _mm256_set1_ps(z ? (float)z[i * groups + g] : 8.f);
                const int64_t c1 = (g + 1) * gchunks < chunks ? (g + 1) * gchunks : chunks;
                for (int64_t c = g * gchunks; c < c1; c++) {
                    const __m256i v = load_codes(wb + c * cs + 8 * r);
                    const __m256 lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), zv), sv);
                    const __m256 hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), zv), sv);
                    if (16 * c + 16 <= kp) {
                        _mm256_storeu_ps(o + 16 * c, lo);
                        _mm256_storeu_ps(o + 16 * c + 8, hi);
                    } else {
                        deq_store(o, lo, 16 * c, kp);
                        deq_store(o, hi, 16 * c + 8, kp);
                    }
                }
            }
        }
    }
    return 0;
}

/* The input block of q4_linear_a8 / _i8 for weight groups of `group` columns (a multiple of 16; k16 for per-channel
 * weights): the largest of 128, 64, 32, 16 that divides it, so that a block never straddles two weight groups. */
int64_t q4_a8_block(int64_t group) {
    return group % 128 == 0 ? 128 : group % 64 == 0 ? 64 : group % 32 == 0 ? 32 : 16;
}

/* The prepared input of a8_run: int8 codes [m, k16], block scales [m, nb], group sums of x^ [m, groups]. */
typedef struct {
    int8_t *xq;
    float *sx, *xs;
    int64_t xb, nb, groups;
} A8Input;

static void a8_input_free(A8Input *in) { free(in->xq), free(in->sx), free(in->xs); }

static int a8_input(A8Input *in, int64_t m, int64_t k16, int64_t group) {
    in->xb = q4_a8_block(group), in->nb = k16 / in->xb, in->groups = k16 / group;
    in->xq = malloc((size_t)(m * k16));
    in->sx = malloc(sizeof(float) * m * in->nb), in->xs = malloc(sizeof(float) * m * in->groups);
    if (!in->xq || !in->sx || !in->xs) {
        a8_input_free(in);
        return -1;
    }
    return 0;
}

static int a8_all(int isa, const float *x, int64_t m, int64_t k16, const uint8_t *w, int64_t n, const float *s,
                  const uint8_t *z, int64_t group, const float *bias, float *out, int threads) {
    if (q4_args_bad(m, n, k16, group)) return -1;
    if (m == 0 || n == 0) return 0;
    if (threads < 1) threads = 1;
    A8Input in;
    if (a8_input(&in, m, k16, group)) return -1;
    a8_quantize(x, m, k16, in.xb, group, in.xq, in.sx, in.xs);
    a8_run(isa, in.xq, in.sx, in.xs, in.xb, m, k16, w, n, s, z, group, bias, out, threads);
    a8_input_free(&in);
    return 0;
}

static int a8_isa_cached = -1;

/* The entry point (same arguments as q4_linear): the fastest instruction set this CPU has. Returns 0, or -1 on
 * bad arguments or a failed allocation (out is then undefined). */
int q4_linear_a8(const float *x, int64_t m, int64_t k16, const uint8_t *w, int64_t n, const float *s,
                 const uint8_t *z, int64_t group, const float *bias, float *out, int threads) {
    int isa = __atomic_load_n(&a8_isa_cached, __ATOMIC_RELAXED);
    if (isa < 0) __atomic_store_n(&a8_isa_cached, isa = a8_isa(), __ATOMIC_RELAXED);
    return a8_all(isa, x, m, k16, w, n, s, z, group, bias, out, threads);
}

/* For tests: the instruction sets this library and CPU can run (bit i: isa i of a8_isa), and one forced. */
static int a8_isas_cached = -1;
int q4_a8_isas(void) {
    int v = __atomic_load_n(&a8_isas_cached, __ATOMIC_RELAXED);
    if (v >= 0) return v;
#if A8_VNNI
    unsigned a, b, c, d;
    const int avxvnni = __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1);
#else
    const int avxvnni = 0;
#endif
    v = 1 | (avxvnni ? 2 : 0) | (a8_isa_avx512() ? 4 : 0) | (a8_isa_avx512w() ? 8 : 0);
    __atomic_store_n(&a8_isas_cached, v, __ATOMIC_RELAXED);
    return v;
}

int q4_linear_a8_isa(int isa, const float *x, int64_t m, int64_t k16, const uint8_t *w, int64_t n, const float *s,
                     const uint8_t *z, int64_t group, const float *bias, float *out, int threads) {
    if (isa < 0 || isa > 3 || !((q4_a8_isas() >> isa) & 1)) return -2;
    return a8_all(isa, x, m, k16, w, n, s, z, group, bias, out, threads);
}

/* q4_linear_i8: W4A8 on the input's own int8 codes, exact. a: int8 codes [m, k] (symmetric, one scale sa[i] per
 * input row, e.g. the dynamic per-token quantizer's), x^ = sa * a. The codes are the block codes of
 * q4_linear_a8 with one scale for every block of a row, so the same kernels compute
 * out[i, n] = bias[n] + sa[i] * sum_g s[n, g] * (sum_{k in g} a_k u[n, k] - z[n, g] sum_{k in g} a_k):
 * integer sums exact, the fake-quant graph's x^ W^T up to fp32 summation order. k16: the layout's padded K. */
int q4_linear_i8(const int8_t *a, const float *sa, int64_t m, int64_t k, int64_t k16, const uint8_t *w, int64_t n,
                 const float *s, const uint8_t *z, int64_t group, const float *bias, float *out, int threads) {
    if (q4_args_bad(m, n, k16, group) || k <= 0 || k > k16) return -1;
    if (m == 0 || n == 0) return 0;
    if (threads < 1) threads = 1;
    int isa = __atomic_load_n(&a8_isa_cached, __ATOMIC_RELAXED);
    if (isa < 0) __atomic_store_n(&a8_isa_cached, isa = a8_isa(), __ATOMIC_RELAXED);
    A8Input in;
    if (a8_input(&in, m, k16, group)) return -1;
    const int64_t xb = in.xb, nb = in.nb, groups = in.groups;
    int8_t *xq = in.xq;
    float *sx = in.sx, *xs = in.xs;
    for (int64_t i = 0; i < m; i++) {
        memcpy(xq + i * k16, a + i * k, (size_t)k);
        memset(xq + i * k16 + k, 0, (size_t)(k16 - k));
        for (int64_t b = 0; b < nb; b++) sx[i * nb + b] = sa[i];
        for (int64_t g = 0; g < groups; g++) {
            int32_t t = 0;
            for (int64_t j = g * group; j < (g + 1) * group; j++) t += xq[i * k16 + j];
            xs[i * groups + g] = sa[i] * (float)t;
        }
    }
    a8_run(isa, xq, sx, xs, xb, m, k16, w, n, s, z, group, bias, out, threads);
    a8_input_free(&in);
    return 0;
}

/* ------------------------------------------------------------------------------------------ int8 x int8
 *
 *     out[m, n] = (float)(sum_k a[m, k] * w[n, k]) * sa[m] * ws[n]  (+ bias[n])
 *
 * a: int8 codes [M, K] (dynamic per-token input codes), w: int8 codes [N, K] (the module's int8 weight layout,
 * K contiguous: no repacking, no second copy), sa: fp32 [M], ws: fp32 [N], bias: fp32 [N] or NULL.
 * The dot products are exact int32 sums (|a w| <= 2^14, K < 2^17) for every int8 code, -128 included.
 *
 * Without VNNI the int8 multiply on AVX2 is either vpmaddubsw (u8 x s8 -> s16 pairs, saturating; the
 * llama.cpp sign trick |a| x sign(w, a) avoids the saturation but needs a vpsignb per (a, w) pair and is
 * wrong for a = w = -128) or vpmaddwd on int16 (s16 x s16 -> s32 pairs, never saturates). Both cost two
 * multiply uops per 32 products; vpmaddwd needs no sign fix-up and measured 1.3-1.4x faster here (AMD EPYC,
 * 2 x 4 tile: 35 ms vs 45 ms for 120 x 4096 x 4096), so: the input is widened once to int16 (zero-padded to
 * k16 columns, a multiple of 16), each 16-code weight chunk is widened with one vpmovsxbw and multiplied with
 * MR = 2 input rows at once, for NR = 4 weight rows (8 int32 accumulators). The weight rows of a block stay
 * in L1 while the int16 input streams by (cache-blocking K measured no faster). Columns beyond the last
 * whole 16 are summed in scalar code (weight rows are not padded). Threads: OpenMP over blocks of 4 output
 * columns (weight rows), dynamic in runs of CHUNK.
 * With AVX512-VNNI (+BW) the same sums come from vpdpbusd instead (i8_tile_512 below): 64 products per
 * instruction on the input made unsigned. Cold 0.5 B model shapes at M = 1 (scratch A/B, Intel Xeon): 1 thread
 * 11.9 -> 13.2 GB/s, 2 threads 22.0 -> 25.6 GB/s, given the rows' code sums (i8_linear_ws); in L2 1.9x.
 */
#define I8_NR 4
#define I8_MR 2
#ifndef I8_PREFETCH
#define I8_PREFETCH 6144      /* bytes ahead in each weight row, once per 64-byte line. Chosen by a scratch
                                  sweep at M = 1 on a cold stream of every linear of a 0.5 B decode step
                                  (2026-12-06, Intel Xeon; three runs): 2 KB (the earlier choice, from an
                                  in-cache sweep) 72-82% of the read bandwidth, 4 KB 64%, 6 KB 96-99%, 8 KB
                                  80-90%, 12-16 KB 88-93%; what a tool measures: tools/bench_size.py's W8A8 row */
#endif

/* acc[m * I8_NR + r] = a[m] . w[r] over the first kv columns (a multiple of 16), mr input rows, nr weight rows */
INLINE void i8_tile(const int mr, const int nr, const int16_t *a, int64_t lda, const int8_t *w, int64_t ldw,
                    int64_t kv, int32_t *acc) {
    __m256i c[I8_MR][I8_NR];
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) c[m][r] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kv; k += 16) {
        __m256i wv[I8_NR];
        if (!(k & 63))
            for (int r = 0; r < nr; r++) _mm_prefetch((const char *)(w + r * ldw + k + I8_PREFETCH), _MM_HINT_T0);
        for (int r = 0; r < nr; r++) wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + r * ldw + k)));
        for (int m = 0; m < mr; m++) {
            const __m256i av = _mm256_loadu_si256((const __m256i *)(a + m * lda + k));
            for (int r = 0; r < nr; r++) c[m][r] = _mm256_add_epi32(c[m][r], _mm256_madd_epi16(av, wv[r]));
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) acc[m * I8_NR + r] = hsum_i32(c[m][r]);
}

/* out = (float)acc * sa * ws (+ bias), rounded step by step as torch does it (no fused multiply-add) */
#if defined(__clang__)
static void i8_store(const int32_t *acc, int mr, int nr, const float *sa, const float *ws, const float *bias,
                     float *out, int64_t ldo) {
#pragma clang fp contract(off)
#else
__attribute__((optimize("fp-contract=off")))
static void i8_store(const int32_t *acc, int mr, int nr, const float *sa, const float *ws, const float *bias,
                     float *out, int64_t ldo) {
#endif
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++) {
            float y = (float)acc[m * I8_NR + r] * sa[m];
            y = y * ws[r];
            out[m * ldo + r] = bias ? y + bias[r] : y;
        }
}

static void i8_block(const int nr, const int8_t *a8, const int16_t *a, int64_t mrows, int64_t k, int64_t k16,
                     const int8_t *w, const float *sa, const float *ws, const float *bias, float *out, int64_t n) {
    const int64_t kv = k & ~(int64_t)15;
    int32_t acc[I8_MR * I8_NR];
    for (int64_t m = 0; m < mrows; m += I8_MR) {
        const int mr = mrows - m < I8_MR ? (int)(mrows - m) : I8_MR;
        if (mr == I8_MR && nr == I8_NR) i8_tile(I8_MR, I8_NR, a + m * k16, k16, w, k, kv, acc);
        else if (mr == 1 && nr == I8_NR) i8_tile(1, I8_NR, a + m * k16, k16, w, k, kv, acc);
        else
            for (int i = 0; i < mr; i++)
                for (int r = 0; r < nr; r++) i8_tile(1, 1, a + (m + i) * k16, k16, w + r * k, k, kv, acc + i * I8_NR + r);
        if (kv < k)
            for (int i = 0; i < mr; i++)
                for (int r = 0; r < nr; r++) {
                    int32_t t = 0;
                    for (int64_t j = kv; j < k; j++) t += (int32_t)a8[(m + i) * k + j] * (int32_t)w[r * k + j];
                    acc[i * I8_NR + r] += t;
                }
        i8_store(acc, mr, nr, sa + m, ws, bias, out + m * n, n);
    }
}

#if A8_VNNI
/* AVX512-VNNI (+BW) on 512-bit registers: vpdpbusd multiplies u8 x s8 and sums four products into an int32 lane,
 * 64 products per instruction (vpmaddwd on int16 above: 16, after a widening per 16 weight codes). The input is
 * made unsigned, u = a + 128 (u8, once per call), and sum_k a w = sum_k u w - 128 sum_k w, the second sum by a
 * vpdpbusd of the constant 128 with the same weight vector: both exact in int32 for K <= I8_VNNI_MAXK (|u w| <=
 * 255 * 128). NR = 4 weight rows x MR = 2 input rows per pass; the last partial 64 columns through a masked load
 * (zero codes beyond K: no padding of the weights). The same int32 sums as i8_tile, so the same outputs. */
#define I8_VNNI_MAXK 65536
T_AVX512W INLINE void i8_tile_512(const int mr, const int nr, const uint8_t *u, int64_t ldu, const int8_t *w,
                                  int64_t ldw, int64_t k, const int32_t *wsum, int32_t *acc) {
    __m512i c[I8_MR][I8_NR], cw[I8_NR];
    const __m512i c128 = _mm512_set1_epi8((char)128);
    for (int r = 0; r < nr; r++) {
        cw[r] = _mm512_setzero_si512();
        for (int m = 0; m < mr; m++) c[m][r] = _mm512_setzero_si512();
    }
    int64_t j = 0;
    for (; j + 64 <= k; j += 64) {
        __m512i wv[I8_NR];
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)(w + r * ldw + j + I8_PREFETCH), _MM_HINT_T0);
            wv[r] = _mm512_loadu_si512((const void *)(w + r * ldw + j));
            if (!wsum) cw[r] = _mm512_dpbusd_epi32(cw[r], c128, wv[r]);
        }
        for (int m = 0; m < mr; m++) {
            const __m512i uv = _mm512_loadu_si512((const void *)(u + m * ldu + j));
            for (int r = 0; r < nr; r++) c[m][r] = _mm512_dpbusd_epi32(c[m][r], uv, wv[r]);
        }
    }
    if (j < k) {
        const __mmask64 tail = (__mmask64)((1ULL << (k - j)) - 1);   /* k - j < 64 */
        __m512i wv[I8_NR];
        for (int r = 0; r < nr; r++) {
            wv[r] = _mm512_maskz_loadu_epi8(tail, (const void *)(w + r * ldw + j));
            if (!wsum) cw[r] = _mm512_dpbusd_epi32(cw[r], c128, wv[r]);
        }
        for (int m = 0; m < mr; m++) {
            const __m512i uv = _mm512_loadu_si512((const void *)(u + m * ldu + j));
            for (int r = 0; r < nr; r++) c[m][r] = _mm512_dpbusd_epi32(c[m][r], uv, wv[r]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int r = 0; r < nr; r++)
            acc[m * I8_NR + r] = wsum ? _mm512_reduce_add_epi32(c[m][r]) - 128 * wsum[r]
                                      : _mm512_reduce_add_epi32(_mm512_sub_epi32(c[m][r], cw[r]));
}

T_AVX512W static void i8_block_512(const int nr, const uint8_t *u, int64_t ldu, int64_t mrows, int64_t k,
                                   const int8_t *w, const int32_t *wsum, const float *sa, const float *ws,
                                   const float *bias, float *out, int64_t n) {
    int32_t acc[I8_MR * I8_NR];
    for (int64_t m = 0; m < mrows; m += I8_MR) {
        const int mr = mrows - m < I8_MR ? (int)(mrows - m) : I8_MR;
        const uint8_t *um = u + m * ldu;
        if (mr == I8_MR && nr == I8_NR) i8_tile_512(I8_MR, I8_NR, um, ldu, w, k, k, wsum, acc);
        else if (mr == 1 && nr == I8_NR) i8_tile_512(1, I8_NR, um, ldu, w, k, k, wsum, acc);
        else
            for (int i = 0; i < mr; i++)
                for (int r = 0; r < nr; r++)
                    i8_tile_512(1, 1, um + i * ldu, ldu, w + r * k, k, k, wsum ? wsum + r : NULL, acc + i * I8_NR + r);
        i8_store(acc, mr, nr, sa + m, ws, bias, out + m * n, n);
    }
}
#endif

/* isa 0: vpmaddwd on int16 (AVX2), 1: vpdpbusd on 512-bit registers (AVX512-VNNI + BW), where K allows */
static int i8_all(int isa, const int8_t *a8, int64_t m, int64_t k, const int8_t *w, int64_t n, const float *sa,
                  const float *ws, const float *bias, float *out, int threads, const int32_t *wsum) {
    if (m < 0 || n < 0 || k <= 0) return -1;
    if (m == 0 || n == 0) return 0;
    if (threads < 1) threads = 1;
    const int64_t blocks = (n + I8_NR - 1) / I8_NR;
    const int parallel = threads > 1 && m * n * k >= PARALLEL_MIN;
#if A8_VNNI
    if (isa == 1 && k <= I8_VNNI_MAXK) {
        const int64_t ldu = (k + 63) & ~(int64_t)63;
        uint8_t *u = aligned_alloc(64, (size_t)(m * ldu));
        if (!u) return -1;
        for (int64_t i = 0; i < m; i++) {
            for (int64_t j = 0; j < k; j++) u[i * ldu + j] = (uint8_t)((int)a8[i * k + j] + 128);
            memset(u + i * ldu + k, 0, (size_t)(ldu - k));
        }
        #pragma omp parallel for schedule(guided, CHUNK) num_threads(threads) if (parallel)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * I8_NR;
            i8_block_512(n - n0 < I8_NR ? (int)(n - n0) : I8_NR, u, ldu, m, k, w + n0 * k, wsum ? wsum + n0 : NULL,
                         sa, ws + n0, bias ? bias + n0 : NULL, out + n0, n);
        }
        free(u);
        return 0;
    }
#else
    (void)isa, (void)wsum;
#endif
    const int64_t k16 = (k + 15) & ~(int64_t)15;
    int16_t *a = aligned_alloc(32, sizeof(int16_t) * m * k16);
    if (!a) return -1;
    for (int64_t i = 0; i < m; i++) {
        int64_t j = 0;
        for (; j + 16 <= k; j += 16)
            _mm256_store_si256((__m256i *)(a + i * k16 + j),
                               _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a8 + i * k + j))));
        for (; j < k; j++) a[i * k16 + j] = a8[i * k + j];
        for (; j < k16; j++) a[i * k16 + j] = 0;
    }
    #pragma omp parallel for schedule(guided, CHUNK) num_threads(threads) if (parallel)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * I8_NR;
        i8_block(n - n0 < I8_NR ? (int)(n - n0) : I8_NR, a8, a, m, k, k16, w + n0 * k, sa, ws + n0,
                 bias ? bias + n0 : NULL, out + n0, n);
    }
    free(a);
    return 0;
}

/* The W8A8 entry point: the fastest instruction set this CPU has. Returns 0, or -1 on bad arguments or a failed
 * allocation (out is then undefined). */
int i8_linear(const int8_t *a8, int64_t m, int64_t k, const int8_t *w, int64_t n, const float *sa, const float *ws,
              const float *bias, float *out, int threads) {
    return i8_all(a8_isa_avx512w(), a8, m, k, w, n, sa, ws, bias, out, threads, NULL);
}

/* i8_linear with the weight rows' code sums given (wsum int32 [N], sum_k w[n, k]: PackedLinear's colsum): the
 * AVX512-VNNI path then needs one vpdpbusd per 64 weight codes and input row instead of two at M = 1. */
int i8_linear_ws(const int8_t *a8, int64_t m, int64_t k, const int8_t *w, int64_t n, const float *sa,
                 const float *ws, const float *bias, float *out, int threads, const int32_t *wsum) {
    return i8_all(a8_isa_avx512w(), a8, m, k, w, n, sa, ws, bias, out, threads, wsum);
}

/* The 512-bit VNNI kernels run here (AVX512-VNNI + BW, and a compiler that has them): i8_linear's isa 1 and
 * w8_linear_a8 (kernels.py offers q8a8 only where this is 1). */
int q4_vnni512(void) { return a8_isa_avx512w(); }

/* For tests: i8_linear on one instruction set (0, or 1 where q4_vnni512; -2 otherwise). */
int i8_linear_isa(int isa, const int8_t *a8, int64_t m, int64_t k, const int8_t *w, int64_t n, const float *sa,
                  const float *ws, const float *bias, float *out, int threads) {
    if (isa < 0 || isa > 1 || (isa == 1 && !a8_isa_avx512w())) return -2;
    return i8_all(isa, a8, m, k, w, n, sa, ws, bias, out, threads, NULL);
}

/* ------------------------------------------------------------------------------ int8 weights x fp32
 *
 *     out[m, n] = ((sum_k x[m, k] * c[n, k]) - zc[n] * sum_k x[m, k]) * ws[n]  (+ bias[n])
 *
 * w8_linear: weight-only int8 (W8A16): c int8 codes [N, K] (the module's int8 layout, per-channel scales ws fp32
 * [N], c-space zero points zc int32 [N] or NULL for symmetric codes: value = (c - zc) * ws), x fp32 [M, K]. The
 * products and sums in fp32 FMA; the scale applied once per dot product and the zero point through the input's
 * row sum (the reassociation q4_linear's direct path makes): the fake-quant graph's x W^T up to fp32 rounding
 * order. Per 8 codes of a weight row: one sign-extending load (vpmovsxbd), one conversion, then an FMA per input
 * row; W8_RB = 4 weight rows (4 streams; each line prefetched at the same columns of the next block's rows, which a
 * scratch sweep at M = 1 on 4096x4096, 2048x5632, 5632x2048 had at 86-97% of read bandwidth, vs 55-88% for 2 KB
 * ahead and 79-96% two blocks ahead) x 1 or 2 input rows at a time
 * (M = 1: two accumulators per row, so the FMA chains do not wait on each other). A decode step reads each weight
 * byte once: the point is to run at the memory's read bandwidth (torch's int8pack kernel rounds to bf16, and the
 * dequant fallback writes fp32 tiles). Larger M re-reads each block of 4 rows from L1 per pair of input rows.
 * Threads: OpenMP over blocks of 4 weight rows, dynamic in runs of CHUNK.
 */
#define W8_RB 4
#ifndef W8_PF_BLOCKS
#define W8_PF_BLOCKS 1        /* blocks ahead where W8_PREFETCH is 0 */
#endif
#ifndef W8_PREFETCH
#define W8_PREFETCH 0         /* bytes ahead in each weight row, once per 64-byte line; 0: the same columns of the
                                 next block's rows (W8_RB rows ahead) */
#endif

/* res[m * W8_RB + r] = x[m] . c[r] over k columns, MB input rows (ldx apart), R weight rows (ldw apart) */
INLINE void w8_dots(const int MB, const int R, const float *x, int64_t ldx, int64_t k, const int8_t *w, int64_t ldw,
                    float *res) {
    const int NA = MB == 1 ? 2 : 1;
    __m256 acc[2][W8_RB][2];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++)
            for (int a = 0; a < NA; a++) acc[m][r][a] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
        if (!(j & 63))
            for (int r = 0; r < R; r++)
                _mm_prefetch((const char *)(w + r * ldw + j + (W8_PREFETCH ? W8_PREFETCH : W8_PF_BLOCKS * W8_RB * ldw)),
                             _MM_HINT_T0);
        for (int q = 0; q < 4; q++) {
            __m256 wv[W8_RB];
            for (int r = 0; r < R; r++)
                wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * ldw + j + 8 * q))));
            for (int m = 0; m < MB; m++) {
                const __m256 xv = _mm256_loadu_ps(x + m * ldx + j + 8 * q);
                for (int r = 0; r < R; r++) acc[m][r][q % NA] = _mm256_fmadd_ps(wv[r], xv, acc[m][r][q % NA]);
            }
        }
    }
    for (; j + 8 <= k; j += 8)
        for (int r = 0; r < R; r++) {
            const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * ldw + j))));
            for (int m = 0; m < MB; m++)
                acc[m][r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + j), acc[m][r][0]);
        }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            float t = hsum(NA == 2 ? _mm256_add_ps(acc[m][r][0], acc[m][r][1]) : acc[m][r][0]);
            for (int64_t i = j; i < k; i++) t += x[m * ldx + i] * (float)w[r * ldw + i];
            res[m * W8_RB + r] = t;
        }
}

/* The W8 kernels' outputs from their dot products res[mm * W8_RB + r] (mb input rows from i, R weight rows from
 * n0; xs, ws, bias, out already offset to them): the zero point through the input's row sum, the row scale,
 * the bias, in that order (w8_linear, w8_linear_a8). */
INLINE void w8_store(const float *res, int mb, int R, const int32_t *zc, const float *xs, const float *ws,
                     const float *bias, float *out, int64_t ldo, int64_t n0) {
    for (int mm = 0; mm < mb; mm++)
        for (int r = 0; r < R; r++) {
            float y = res[mm * W8_RB + r];
            if (zc) y -= (float)zc[n0 + r] * xs[mm];
            y *= ws[r];
            out[mm * ldo + r] = bias ? y + bias[r] : y;
        }
}

int w8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const float *ws, const int32_t *zc,
              const float *bias, float *out, int threads) {
    if (m < 0 || n < 0 || k <= 0) return -1;
    if (m == 0 || n == 0) return 0;
    if (threads < 1) threads = 1;
    float *xs = NULL;
    if (zc) {                                          /* row sums of x, for the zero points */
        xs = malloc(sizeof(float) * m);
        if (!xs) return -1;
        for (int64_t i = 0; i < m; i++) {
            __m256 a = _mm256_setzero_ps();
            int64_t j = 0;
            for (; j + 8 <= k; j += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(x + i * k + j));
            float t = hsum(a);
            for (; j < k; j++) t += x[i * k + j];
            xs[i] = t;
        }
    }
    const int64_t blocks = (n + W8_RB - 1) / W8_RB;
    const int parallel = threads > 1 && m * n * k >= PARALLEL_MIN;
    #pragma omp parallel for schedule(guided, CHUNK) num_threads(threads) if (parallel)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * W8_RB;
        const int R = n - n0 < W8_RB ? (int)(n - n0) : W8_RB;
        for (int64_t i = 0; i < m; i += 2) {
            const int mb = m - i < 2 ? 1 : 2;
            float res[2 * W8_RB];
            const float *xi = x + i * k;
            if (R == W8_RB) {
                if (mb == 1) w8_dots(1, W8_RB, xi, k, k, w + n0 * k, k, res);
                else w8_dots(2, W8_RB, xi, k, k, w + n0 * k, k, res);
            } else {
                for (int r = 0; r < R; r++) {
                    float one[2 * W8_RB];
                    if (mb == 1) w8_dots(1, 1, xi, k, k, w + (n0 + r) * k, k, one);
                    else w8_dots(2, 1, xi, k, k, w + (n0 + r) * k, k, one);
                    res[r] = one[0];
                    res[W8_RB + r] = one[W8_RB];
                }
            }
            w8_store(res, mb, R, zc, xs + i, ws + n0, bias ? bias + n0 : NULL, out + i * n + n0, n, n0);
        }
    }
    free(xs);
    return 0;
}

/* ------------------------------------------------------------------------- int8 weights x int8-rounded input
 *
 * w8_linear_a8: w8_linear's product with the input rounded to int8 first, in blocks of W8A8_XB = 128 columns of a
 * token (the last block of a row may be shorter), as q4_linear_a8 does for int4 weights:
 *
 *     sx = max|x_b| / 127,  xq = rint(x / sx) (0 where sx = 0),  x^ = sx * xq,
 *     out[m, n] = ((sum_k x^_k c[n, k]) - zc[n] * sum_k x^_k) * ws[n]  (+ bias[n])
 *
 * i.e. exactly w8_linear on x^ up to fp32 summation order. AVX512-VNNI (+BW) only: vpdpbusd takes the weight codes
 * as its unsigned operand, u = c + 128 (one xor of the sign bit per 64 codes), and the input codes as the signed
 * one, so sum_b c xq = sum_b u xq - 128 sum_b xq, the last sum once per block of the input (int32, exact):
 * about 3.5 vector ops per 64 weight bytes against 12 for w8_linear's conversions and FMAs on 512-bit registers,
 * so a decode GEMV streams the weights near the memory's read bandwidth (cold 0.5 B shapes at M = 1, scratch A/B
 * against w8_linear: 1 thread 10.8 -> 12.1 GB/s, 2 threads 19.4 -> 23.9 GB/s; in L2 2.1x). 4 weight rows x up
 * to 2 input rows per pass; the columns past the last whole 64 through masked loads. Returns -2 where the CPU or
 * the compiler lacks the instructions (kernels.py offers the kernel only where q4_vnni512() is 1).
 */
#define W8A8_XB 128

/* x [m, k] -> xq int8 [m, kb] (kb = k rounded up to W8A8_XB, zero-padded), sx [m, nb], qs [m, nb] (sum of the
 * block's codes), xs [m] (sum of x^ over the row) */
static void w8a8_quantize(const float *x, int64_t m, int64_t k, int64_t kb, int8_t *xq, float *sx, int32_t *qs,
                          float *xs) {
    const int64_t nb = kb / W8A8_XB;
    for (int64_t i = 0; i < m; i++) {
        float rowsum = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t j0 = b * W8A8_XB, len = k - j0 < W8A8_XB ? k - j0 : W8A8_XB;
            const float *xp = x + i * k + j0;
            int8_t *qp = xq + i * kb + j0;
            const int64_t len8 = len & ~(int64_t)7;
            float a = len8 ? hmax_abs(xp, len8) : 0.f;
            for (int64_t j = len8; j < len; j++) a = fmaxf(a, fabsf(xp[j]));
            const float sc = a / 127.f;
            int32_t isum = 0;
            memset(qp, 0, W8A8_XB);
            if (sc > 0.f) {                             /* x / sc rounded half to even (MXCSR's default mode) */
                const __m256 sv = _mm256_set1_ps(sc);
                for (int64_t j = 0; j < len8; j += 8) {
                    const __m256i q = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(xp + j), sv));
                    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                    _mm_storel_epi64((__m128i *)(qp + j), _mm_packs_epi16(w16, w16));
                    isum += hsum_i32(q);
                }
                for (int64_t j = len8; j < len; j++) {
                    const int q = _mm_cvtss_si32(_mm_set_ss(xp[j] / sc));
                    qp[j] = (int8_t)q;
                    isum += q;
                }
            }
            sx[i * nb + b] = sc, qs[i * nb + b] = isum;
            rowsum += sc * (float)isum;
        }
        xs[i] = rowsum;
    }
}

#if A8_VNNI
/* acc[m * W8_RB + r] = sum_b sx[m, b] * (sum_{k in b} xq[m, k] c[r, k]) for MB input rows, 4 weight rows */
T_AVX512W INLINE void w8a8_dots(const int MB, const int8_t *xq, int64_t kb, const float *sx, const int32_t *qs,
                                int64_t k, const int8_t *w, int64_t ldw, float *res) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int64_t nb = kb / W8A8_XB;
    __m512 acc[2][W8_RB];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < W8_RB; r++) acc[m][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t j = b * W8A8_XB;
        __m512i u0[W8_RB], u1[W8_RB];
        if (j + W8A8_XB <= k) {
            for (int r = 0; r < W8_RB; r++) {
                const int8_t *wr = w + r * ldw + j;
                _mm_prefetch((const char *)(wr + W8_PF_BLOCKS * W8_RB * ldw), _MM_HINT_T0);
                _mm_prefetch((const char *)(wr + 64 + W8_PF_BLOCKS * W8_RB * ldw), _MM_HINT_T0);
                u0[r] = _mm512_xor_si512(_mm512_loadu_si512((const void *)wr), flip);
                u1[r] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr + 64)), flip);
            }
        } else {                                     /* the last, partial block: codes past k read as 0 */
            const int64_t n0 = k - j, n1 = n0 > 64 ? n0 - 64 : 0;
            const __mmask64 m0 = n0 >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n0) - 1);
            const __mmask64 m1 = n1 >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n1) - 1);
            for (int r = 0; r < W8_RB; r++) {
                const int8_t *wr = w + r * ldw + j;
                u0[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m0, (const void *)wr), flip);
                u1[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m1, (const void *)(wr + 64)), flip);
            }
        }
        for (int m = 0; m < MB; m++) {
            const int8_t *xp = xq + m * kb + j;
            const __m512i x0 = _mm512_loadu_si512((const void *)xp), x1 = _mm512_loadu_si512((const void *)(xp + 64));
            const __m512i corr = _mm512_set1_epi32(128 * qs[m * nb + b]);   /* 128 sum xq, on lane 0 only below */
            const __m512 sc = _mm512_set1_ps(sx[m * nb + b]);
            for (int r = 0; r < W8_RB; r++) {
                __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0[r], x0);
                t = _mm512_dpbusd_epi32(t, u1[r], x1);
                t = _mm512_mask_sub_epi32(t, 1, t, corr);                    /* the lanes' sum loses 128 sum xq */
                acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sc, acc[m][r]);
            }
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < W8_RB; r++) res[m * W8_RB + r] = _mm512_reduce_add_ps(acc[m][r]);
}
T_AVX512W static void w8a8_dots_1(const int8_t *xq, int64_t kb, const float *sx, const int32_t *qs, int64_t k,
                                  const int8_t *w, int64_t ldw, float *res) {
    w8a8_dots(1, xq, kb, sx, qs, k, w, ldw, res);
}
T_AVX512W static void w8a8_dots_2(const int8_t *xq, int64_t kb, const float *sx, const int32_t *qs, int64_t k,
                                  const int8_t *w, int64_t ldw, float *res) {
    w8a8_dots(2, xq, kb, sx, qs, k, w, ldw, res);
}
#endif

int w8_linear_a8(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const float *ws, const int32_t *zc,
                 const float *bias, float *out, int threads) {
    if (m < 0 || n < 0 || k <= 0) return -1;
    if (!a8_isa_avx512w()) return -2;
#if A8_VNNI
    if (m == 0 || n == 0) return 0;
    if (threads < 1) threads = 1;
    const int64_t kb = (k + W8A8_XB - 1) / W8A8_XB * W8A8_XB, nb = kb / W8A8_XB;
    int8_t *xq = aligned_alloc(64, (size_t)(m * kb));
    float *sx = malloc(sizeof(float) * m * nb), *xs = malloc(sizeof(float) * m);
    int32_t *qs = malloc(sizeof(int32_t) * m * nb);
    if (!xq || !sx || !xs || !qs) {
        free(xq), free(sx), free(xs), free(qs);
        return -1;
    }
    w8a8_quantize(x, m, k, kb, xq, sx, qs, xs);
    const int64_t blocks = (n + W8_RB - 1) / W8_RB;
    const int parallel = threads > 1 && m * n * k >= PARALLEL_MIN;
    #pragma omp parallel for schedule(guided, CHUNK) num_threads(threads) if (parallel)
    for (int64_t bl = 0; bl < blocks; bl++) {
        const int64_t n0 = bl * W8_RB;
        const int R = n - n0 < W8_RB ? (int)(n - n0) : W8_RB;
        for (int64_t i = 0; i < m; i += 2) {
            const int mb = m - i < 2 ? 1 : 2;
            float res[2 * W8_RB];
            if (R == W8_RB) {
                if (mb == 1) w8a8_dots_1(xq + i * kb, kb, sx + i * nb, qs + i * nb, k, w + n0 * k, k, res);
                else w8a8_dots_2(xq + i * kb, kb, sx + i * nb, qs + i * nb, k, w + n0 * k, k, res);
            } else {                                   /* the last R < 4 rows: scalar, the same sums */
                for (int mm = 0; mm < mb; mm++)
                    for (int r = 0; r < R; r++) {
                        float t = 0.f;
                        for (int64_t b = 0; b < nb; b++) {
                            int32_t isum = 0;
                            for (int64_t j = b * W8A8_XB; j < k && j < (b + 1) * W8A8_XB; j++)
                                isum += (int32_t)w[(n0 + r) * k + j] * (int32_t)xq[(i + mm) * kb + j];
                            t += (float)isum * sx[(i + mm) * nb + b];
                        }
                        res[mm * W8_RB + r] = t;
                    }
            }
            w8_store(res, mb, R, zc, xs + i, ws + n0, bias ? bias + n0 : NULL, out + i * n + n0, n, n0);
        }
    }
    free(xq), free(sx), free(xs), free(qs);
    return 0;
#else
    (void)x, (void)w, (void)ws, (void)zc, (void)bias, (void)out, (void)threads;
    return -2;
#endif
}

/* ------------------------------------------------------------------------------------ small fp32 ops
 *
 * Three ops of a decode step that are a handful of torch ops each (and at small widths cost far more in
 * dispatch than in arithmetic). Each computes exactly the float operations of its torch reference, in the
 * same order, so the results are bit for bit torch's (rms_norm_f32: up to the summation order of the mean):
 *
 *     token_quant    per row of x [M, K]: s = max(max|x| / qmax, 1e-12) (SCALE_FLOOR), q = clamp(rint(x / s),
 *                    qmin, qmax) (IEEE division, round half to even), as qpass.primitives.quant.token_scale
 *                    then (x / s).round_().clamp_(qmin, qmax); writes the int8 codes q and/or the fake-quant
 *                    values q * s, and s. A row holding inf or NaN gets s = NaN: codes 0, values NaN (as
 *                    fake_quantize_dynamic makes such a token all NaN).
 *     rms_norm_f32   out = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) per row (HF LlamaRMSNorm in fp32; the sum
 *                    of squares in double, the mean rounded to float).
 *     rope_f32       out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[d/2:], x[:d/2]).
 *
 * No fused multiply-add anywhere in them (the file is built with -mfma, and GCC contracts even separate
 * _mm256_mul_ps / _mm256_add_ps intrinsics): fp-contract is off for these functions, as for i8_store. Tails
 * (row lengths not a multiple of 8) use masked loads and stores, so there is no scalar libm call either.
 */
#if defined(__clang__)
#define NO_FMA
#define NO_FMA_BODY _Pragma("clang fp contract(off)")
#else
#define NO_FMA __attribute__((optimize("fp-contract=off")))
#define NO_FMA_BODY
#endif

/* lanes [0, n) set, n in 0..8: the mask of a row's last, partial 8 columns */
INLINE __m256i tail_mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 integer-valued floats in [-128, 127] -> 8 int8 in the low 8 bytes */
INLINE __m128i to_i8(__m256 q) {
    const __m256i v = _mm256_cvtps_epi32(q);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_packs_epi16(w, w);
}

/* Per-token symmetric int quantization of x [m, k] (contiguous) to codes in [qmin, qmax] (an int format of
 * at most 8 bits: qmin = -2^(b-1), qmax = 2^(b-1) - 1). codes: int8 [m, k] or NULL; fq: fp32 [m, k] (q * s)
 * or NULL; scales: fp32 [m]. Returns 0, or -1 on bad arguments. */
NO_FMA int token_quant(const float *x, int64_t m, int64_t k, int qmin, int qmax, int8_t *codes, float *fq,
                       float *scales) {
    NO_FMA_BODY
    if (m < 0 || k <= 0 || qmin < -128 || qmin >= 0 || qmax <= 0 || qmax > 127 || !scales) return -1;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
    const __m256 lo = _mm256_set1_ps((float)qmin), hi = _mm256_set1_ps((float)qmax);
    const int64_t kv = k & ~(int64_t)7;
    const __m256i tail = tail_mask(k - kv);
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * k;
        __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int64_t j = 0; j < kv; j += 8) {
            const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xr + j), absmask);
            amax = _mm256_max_ps(amax, a);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));            /* inf or NaN */
        }
        if (kv < k) {                                                                /* masked lanes read 0 */
            const __m256 a = _mm256_and_ps(_mm256_maskload_ps(xr + kv, tail), absmask);
            amax = _mm256_max_ps(amax, a);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
        }
        if (_mm256_movemask_ps(bad)) {                       /* a non-finite token: NaN scale, NaN values */
            scales[i] = NAN;
            if (codes) memset(codes + i * k, 0, (size_t)k);
            if (fq)
                for (int64_t j = 0; j < k; j++) fq[i * k + j] = NAN;
            continue;
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h) / (float)qmax;
        if (s < 1e-12f) s = 1e-12f;                                                 /* SCALE_FLOOR */
        scales[i] = s;
        const __m256 sv = _mm256_set1_ps(s);
        for (int64_t j = 0; j < kv; j += 8) {
            const __m256 q = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(
                _mm256_div_ps(_mm256_loadu_ps(xr + j), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
            if (fq) _mm256_storeu_ps(fq + i * k + j, _mm256_mul_ps(q, sv));
            if (codes) _mm_storel_epi64((__m128i *)(codes + i * k + j), to_i8(q));
        }
        if (kv < k) {
            const __m256 q = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(
                _mm256_div_ps(_mm256_maskload_ps(xr + kv, tail), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
            if (fq) _mm256_maskstore_ps(fq + i * k + kv, tail, _mm256_mul_ps(q, sv));
            if (codes) {
                int8_t c[16];
                _mm_storeu_si128((__m128i *)c, to_i8(q));
                memcpy(codes + i * k + kv, c, (size_t)(k - kv));
            }
        }
    }
    return 0;
}

/* RMSNorm of x [m, d] (contiguous) with weight w [d]: out [m, d]. Returns 0, or -1 on bad arguments. */
NO_FMA int rms_norm_f32(const float *x, int64_t m, int64_t d, const float *w, float eps, float *out) {
    NO_FMA_BODY
    if (m < 0 || d <= 0) return -1;
    const int64_t dv = d & ~(int64_t)7;
    const __m256i tail = tail_mask(d - dv);
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * d;
        float *o = out + i * d;
        __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();   /* float squares are exact in double */
        for (int64_t j = 0; j < d; j += 8) {                          /* j == dv < d: the masked tail */
            const __m256 v = j < dv ? _mm256_loadu_ps(xr + j) : _mm256_maskload_ps(xr + j, tail);
            const __m256d l = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            const __m256d u = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            a0 = _mm256_add_pd(a0, _mm256_mul_pd(l, l));
            a1 = _mm256_add_pd(a1, _mm256_mul_pd(u, u));
        }
        a0 = _mm256_add_pd(a0, a1);
        const __m128d t = _mm_add_pd(_mm256_castpd256_pd128(a0), _mm256_extractf128_pd(a0, 1));
        const float mean = (float)(_mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t))) / (double)d);
        const float r = 1.f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(mean + eps)));
        const __m256 rv = _mm256_set1_ps(r);
        for (int64_t j = 0; j < dv; j += 8)
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_mul_ps(_mm256_loadu_ps(xr + j), rv)));
        if (dv < d)
            _mm256_maskstore_ps(o + dv, tail, _mm256_mul_ps(_mm256_maskload_ps(w + dv, tail),
                                                            _mm256_mul_ps(_mm256_maskload_ps(xr + dv, tail), rv)));
    }
    return 0;
}

/* Rotary embedding of x [b, h, t, d] (element strides sb, sh, st; the last dim contiguous; d even) with
 * cos, sin [b, t, d] (contiguous): out [b, t, h, d] (contiguous). Returns 0, or -1 on bad arguments. */
NO_FMA int rope_f32(const float *x, int64_t b, int64_t h, int64_t t, int64_t d, int64_t sb, int64_t sh,
                    int64_t st, const float *cos, const float *sin, float *out) {
    NO_FMA_BODY
    if (b < 0 || h < 0 || t < 0 || d <= 0 || d % 2) return -1;
    const int64_t half = d / 2, hv = half & ~(int64_t)7;
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t bi = 0; bi < b; bi++)
        for (int64_t ti = 0; ti < t; ti++) {
            const float *c = cos + (bi * t + ti) * d, *s = sin + (bi * t + ti) * d;
            for (int64_t hi = 0; hi < h; hi++) {
                const float *xr = x + bi * sb + hi * sh + ti * st;
                float *o = out + ((bi * t + ti) * h + hi) * d;
                for (int64_t j = 0; j < hv; j += 8) {
                    const __m256 x1 = _mm256_loadu_ps(xr + j), x2 = _mm256_loadu_ps(xr + half + j);
                    const __m256 r1 = _mm256_mul_ps(_mm256_xor_ps(x2, sign), _mm256_loadu_ps(s + j));  /* -x2 s */
                    const __m256 r2 = _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + j));
                    _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + j)), r1));
                    _mm256_storeu_ps(o + half + j, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + j)), r2));
                }
                for (int64_t j = hv; j < half; j++) {
                    const float x1 = xr[j], x2 = xr[half + j];
                    o[j] = x1 * c[j] + (-x2) * s[j];
                    o[half + j] = x2 * c[half + j] + x1 * s[half + j];
                }
            }
        }
    return 0;
}

/* ---------------------------------------------------------------------------------- low-bit K/V cache
 *
 * The common formats of backends/torch_packed/kv.py (PackedKVCache): dynamic symmetric int4 or int8, one scale
 * per (batch, head, slot), i.e. block [1, 1, 1, -1], or one per (batch, slot) over all heads (block
 * [1, -1, 1, -1], "shared", LLM-QAT's per-token KV). The cache of shape [B, H, max_len, D] is held as
 *
 *     scales  fp32 [B, H, max_len]            (the module's `scale` buffer [B, H, max_len, 1]; shared: [B, max_len])
 *     codes   uint8 [B, H, max_len, W]        bits 8: W = D, the int8 code q as a byte;
 *                                             bits 4: W = D / 2 (D even), u = q + 8, byte j = u[2j] | u[2j+1] << 4
 *
 * kv_store  quantizes each row of k [B, H, T, D] as token_quant does (s = max(max|x| / qmax, 1e-12),
 *           q = clamp(rint(x / s), qmin, qmax); shared: max over the row in every head) and writes s and the
 *           codes at slot pos[t]. A row (shared: a token) holding inf or
 *           NaN gets codes q = 0 and the scale torch's `x.abs().amax() / qmax` gives it: NaN if it holds a
 *           NaN, else inf (it dequantizes to NaN either way: 0 * inf); so the bytes stored are those of the
 *           torch path (kv.py), up to the NaN's payload. Every position is checked (0 <= p < max_len) before
 *           anything is written: -1 if one is not, the cache untouched.
 * kv_load   out [B * H, n, D] (contiguous) = (float)q * s for the first n slots: one fp32 multiply per value,
 *           bit for bit torch's `q * s` (int8 codes times the fp32 scale, promoted).
 * One thread (a decode step writes a row or a few and reads a few thousand values per head).
 */

/* 8 int8 codes q in [-8, 7] (the low 8 bytes) -> their 4 packed storage bytes (u = q + 8, the first code of a
 * pair in the low nibble) in the low 32 bits */
INLINE int32_t pack_nibbles(__m128i q) {
    const __m128i u = _mm_add_epi8(q, _mm_set1_epi8(8));
    const __m128i v = _mm_and_si128(_mm_or_si128(u, _mm_srli_epi16(u, 4)), _mm_set1_epi16(0x00ff));
    return _mm_cvtsi128_si32(_mm_packus_epi16(v, v));
}

/* max |x| over the d values of a row (0 for d = 0); *bad |= whether one is inf or NaN, *nan |= whether one is NaN */
INLINE float kv_row_amax(const float *xr, int64_t d, int64_t dv, __m256i tail, int *bad, int *nan) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
    __m256 amax = _mm256_setzero_ps(), nf = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) {                              /* j == dv < d: the masked tail (0s) */
        const __m256 a = _mm256_and_ps(j < dv ? _mm256_loadu_ps(xr + j) : _mm256_maskload_ps(xr + j, tail), absmask);
        amax = _mm256_max_ps(amax, a);
        nf = _mm256_or_ps(nf, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));                   /* inf or NaN */
    }
    if (_mm256_movemask_ps(nf)) {
        *bad = 1;
        for (int64_t j = 0; j < d; j++) *nan |= xr[j] != xr[j];
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* the codes of one row with scale s into c (bits 8: d bytes; bits 4: d / 2 bytes) */
INLINE void kv_row_codes(const float *xr, int64_t d, int64_t dv, __m256i tail, float s, int bits, uint8_t *c) {
    const int qmax = (1 << (bits - 1)) - 1;
    const __m256 lo = _mm256_set1_ps((float)(-qmax - 1)), hi = _mm256_set1_ps((float)qmax), sv = _mm256_set1_ps(s);
    for (int64_t j = 0; j < d; j += 8) {
        const __m256 x = j < dv ? _mm256_loadu_ps(xr + j) : _mm256_maskload_ps(xr + j, tail);
        const __m128i q = to_i8(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_round_ps(
            _mm256_div_ps(x, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))));
        const int64_t n = j < dv ? 8 : d - dv;                          /* columns of this step */
        if (bits == 8) {
            if (n == 8) _mm_storel_epi64((__m128i *)(c + j), q);
            else {
                int8_t tmp[16];
                _mm_storeu_si128((__m128i *)tmp, q);
                memcpy(c + j, tmp, (size_t)n);
            }
        } else {
            const int32_t p = pack_nibbles(q);
            memcpy(c + j / 2, &p, (size_t)(n / 2));                   /* little endian: bytes in order */
        }
    }
}

/* Write rows of k [b, h, t, d] (element strides sb, sh, st; the last dim contiguous) at slots pos[0 .. t) of a
 * cache with max_len slots: codes [b, h, max_len, W] and scales [b, h, max_len] (shared = 0: a scale per token
 * and head) or [b, max_len] (shared = 1: one scale per token over all heads, block [1, -1, 1, -1]).
 * bits: 4 (d even) or 8. Returns 0; -1 if a position is out of range (nothing written); -2 on other bad
 * arguments. */
NO_FMA int kv_store(const float *k, int64_t b, int64_t h, int64_t t, int64_t d, int64_t sb, int64_t sh,
                    int64_t st, const int64_t *pos, int64_t max_len, int bits, int shared, uint8_t *codes,
                    float *scales) {
    NO_FMA_BODY
    if (b < 0 || h < 0 || t < 0 || d <= 0 || max_len < 0 || (bits != 4 && bits != 8) || (bits == 4 && d % 2))
        return -2;
    for (int64_t ti = 0; ti < t; ti++)
        if (pos[ti] < 0 || pos[ti] >= max_len) return -1;
    const float qmax = (float)((1 << (bits - 1)) - 1);
    const int64_t w = bits == 8 ? d : d / 2, dv = d & ~(int64_t)7, groups = shared ? 1 : h, per = shared ? h : 1;
    const __m256i tail = tail_mask(d - dv);
    for (int64_t bi = 0; bi < b; bi++)
        for (int64_t gi = 0; gi < groups; gi++)            /* a group: the heads that share one scale */
            for (int64_t ti = 0; ti < t; ti++) {
                int bad = 0, nan = 0;
                float amax = 0.f;
                for (int64_t hi_ = gi * per; hi_ < (gi + 1) * per; hi_++) {
                    const float a = kv_row_amax(k + bi * sb + hi_ * sh + ti * st, d, dv, tail, &bad, &nan);
                    amax = a > amax ? a : amax;
                }
                float s = amax / qmax;
                if (s < 1e-12f) s = 1e-12f;                                              /* SCALE_FLOOR */
                if (bad) s = nan ? NAN : INFINITY;   /* codes 0, scale NaN (a NaN) or inf: as torch stores them */
                scales[(bi * groups + gi) * max_len + pos[ti]] = s;
                for (int64_t hi_ = gi * per; hi_ < (gi + 1) * per; hi_++) {
                    uint8_t *c = codes + ((bi * h + hi_) * max_len + pos[ti]) * w;
                    if (bad) memset(c, bits == 8 ? 0 : 0x88, (size_t)w);
                    else kv_row_codes(k + bi * sb + hi_ * sh + ti * st, d, dv, tail, s, bits, c);
                }
            }
    return 0;
}

/* The first n slots of a cache (codes [bh, max_len, W], scales [bh / per, max_len]: `per` consecutive heads
 * share a scale, as above) dequantized: out [bh, n, d] = (float)q * s. Returns 0, or -1 on bad arguments. */
NO_FMA int kv_load(const uint8_t *codes, const float *scales, int64_t bh, int64_t max_len, int64_t n, int64_t d,
                   int bits, int64_t per, float *out) {
    NO_FMA_BODY
    if (bh < 0 || max_len < 0 || n < 0 || n > max_len || d <= 0 || (bits != 4 && bits != 8) || (bits == 4 && d % 2)
        || per < 1)
        return -1;
    const int64_t w = bits == 8 ? d : d / 2;
    const int64_t step = bits == 8 ? 8 : 16, dv = d - d % step;
    const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    for (int64_t i = 0; i < bh; i++)
        for (int64_t p = 0; p < n; p++) {
            const uint8_t *c = codes + (i * max_len + p) * w;
            const float s = scales[(i / per) * max_len + p];
            const __m256 sv = _mm256_set1_ps(s);
            float *o = out + (i * n + p) * d;
            if (bits == 8) {
                for (int64_t j = 0; j < dv; j += 8) {
                    const __m128i v = _mm_loadl_epi64((const __m128i *)(c + j));
                    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                    _mm256_storeu_ps(o + j, _mm256_mul_ps(q, sv));
                }
                for (int64_t j = dv; j < d; j++) o[j] = (float)(int8_t)c[j] * s;
            } else {
                for (int64_t j = 0; j < dv; j += 16) {                 /* 8 bytes: columns j .. j + 15 */
                    const __m128i v = _mm_loadl_epi64((const __m128i *)(c + j / 2));
                    const __m128i u = _mm_unpacklo_epi8(_mm_and_si128(v, low),
                                                        _mm_and_si128(_mm_srli_epi16(v, 4), low));
                    const __m128i q = _mm_sub_epi8(u, eight);
                    _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), sv));
                    _mm256_storeu_ps(o + j + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                        _mm_srli_si128(q, 8))), sv));
                }
                for (int64_t j = dv; j < d; j += 2) {
                    const uint8_t v = c[j / 2];
                    o[j] = (float)((int)(v & 15) - 8) * s;
                    o[j + 1] = (float)((int)(v >> 4) - 8) * s;
                }
            }
        }
    return 0;
}

/* ------------------------------------------------------------------------------ codebook (table lookup) linear
 *
 *     out[m, n] = bias[n] + sum_k x[m, k] * T[min(n / bn, sn - 1), min(k / bk, sk - 1)][code[n, k]]
 *                         + sum_{j = rowptr[n]}^{rowptr[n + 1] - 1} v[j] * x[m, idx[j] - n * K]
 *
 * The codes as CodebookLinear stores them (codebook.py; packing.py's layouts), read in place, no second copy:
 *   layout 0 (dense, bits 1, 2, 4): row n at w + n * ceil(K * bits / 8), 8 / bits codes per byte, the first in
 *            the low bits; (dense3, bits 3): row n at w + n * 3 ceil(K / 8), 8 codes per 3 bytes (a little-endian
 *            24-bit word, code i at bit 3i);
 *   layout 1 (bit planes, bits 1..4): plane p of row n at w + (p * N + n) * ceil(K / 8), bit i of byte c holding
 *            bit p of the code of column 8c + i.
 * T: fp32 tables [sn, sk, W] (W = 8 for bits <= 3, 16 for 4 bits; entries past 2^bits are never read) with the
 * scale folded in by the caller (and rounded to the model's dtype), so every weight is the reference decode's
 * value exactly; bn: output rows per table row, bk: columns per table group (a multiple of 8 when sk > 1).
 * rowptr (int64 [N + 1]), idx (int32 flat indices into [N, K], sorted), v (fp32): the sparse side channel, or
 * NULL. x: fp32 [M, K]; out: fp32 [M, N]; bias: fp32 [N] or NULL.
 *
 * Per 8 codes (a chunk): their bytes (one 1-, 2- or 4-byte load; for dense3 and bit planes, the bytes of 8 chunks
 * at a time: lut_dense3_8, lut_planes8), a variable shift (and a mask, or for bit planes a multiply that gathers
 * the planes' bits: lut_codes, lut_plane_idx) give 8 int32 indices; _mm256_permutevar8x32_ps on the table held in
 * a register gives the 8 weights (16 entries: two permutes and a blend on bit 3 of the index), FMA'd into up to
 * LUT_MB input rows at once: for M <= LUT_MB a row's codes are read and decoded once (for larger M again per block
 * of LUT_MB input rows, from L1). 1-2 input rows keep four accumulators each, 3-4 two (at M = 1 one chain is
 * FMA-latency-bound: four made it 1.2x faster). Columns past the last whole 8 and the sparse values are summed in
 * scalar code. fp32 throughout: the result differs from decode + fp32 matmul only by summation order (a sparse
 * value is added as v * x rather than into the weight first).
 * Threads: OpenMP over output rows, dynamic in runs of LUT_ROWS.
 */
#define LUT_MB 8
#define LUT_ROWS 16

INLINE uint32_t lut_ld(const uint8_t *p, int bytes) {  /* little-endian; 3 bytes combined in registers (a
                                                          3-byte memcpy into a word stalls store forwarding) */
    if (bytes == 3) {
        uint16_t lo;
        memcpy(&lo, p, 2);
        return (uint32_t)lo | (uint32_t)p[2] << 16;
    }
    if (bytes == 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        return v;
    }
    if (bytes == 2) {
        uint16_t v;
        memcpy(&v, p, 2);
        return v;
    }
    return p[0];
}

/* the 8 codes of chunk c (columns 8c .. 8c + 7) of a row as int32 lanes; bits above the code's may be set
 * where the lookup ignores them (4-bit dense: permute reads bits 0-2, the blend bit 3 alone). Bit planes: the
 * bytes of the planes combine into v = b0 | b1 << 8 | ..., lane i shifts v right by i and keeps bits 0, 8, 16,
 * 24; one multiply by sum_p 2^(S - 7p) (S = 7 (bits - 1)) moves bit 8p to S + p with no carries, so a shift
 * by S leaves the code (zeros above it up to bit 7). */
INLINE __m256i lut_codes(const int layout, const int bits, const uint8_t *row, int64_t pstride, int64_t c,
                         __m256i shifts) {
    if (layout == 0) {
        const __m256i t = _mm256_srlv_epi32(_mm256_set1_epi32((int)lut_ld(row + c * bits, bits)), shifts);
        return bits >= 3 ? t : _mm256_and_si256(t, _mm256_set1_epi32((1 << bits) - 1));
    }
    uint32_t v = row[c];
    for (int p = 1; p < bits; p++) v |= (uint32_t)row[p * pstride + c] << (8 * p);
    if (bits == 1) return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)v), shifts), _mm256_set1_epi32(1));
    const int sh = 7 * (bits - 1);
    int mul = 0;
    for (int p = 0; p < bits; p++) mul |= 1 << (sh - 7 * p);
    const __m256i t = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)v), shifts),
                                       _mm256_set1_epi32(0x01010101));
    return _mm256_srli_epi32(_mm256_mullo_epi32(t, _mm256_set1_epi32(mul)), sh);
}

INLINE int lut_code1(const int layout, const int bits, const uint8_t *row, int64_t pstride, int64_t k) {
    if (layout == 0 && bits == 3) return (int)(lut_ld(row + 3 * (k / 8), 3) >> (3 * (k % 8))) & 7;
    if (layout == 0) return (row[k * bits / 8] >> ((k * bits) % 8)) & ((1 << bits) - 1);
    int u = 0;
    for (int p = 0; p < bits; p++) u |= ((row[p * pstride + k / 8] >> (k % 8)) & 1) << p;
    return u;
}

/* Bit planes, 8 chunks at once: lane j of the result is v_j = b0_j | b1_j << 8 | ... (bytes c + j of the
 * planes) from one 8-byte load per plane and two rounds of unpacks; lut_plane_idx takes chunk j from it. */
INLINE __m256i lut_planes8(const int bits, const uint8_t *row, int64_t pstride, int64_t c) {
    const __m128i z = _mm_setzero_si128();
    const __m128i b0 = _mm_loadl_epi64((const __m128i *)(row + c));
    const __m128i b1 = bits > 1 ? _mm_loadl_epi64((const __m128i *)(row + pstride + c)) : z;
    const __m128i b2 = bits > 2 ? _mm_loadl_epi64((const __m128i *)(row + 2 * pstride + c)) : z;
    const __m128i b3 = bits > 3 ? _mm_loadl_epi64((const __m128i *)(row + 3 * pstride + c)) : z;
    const __m128i a = _mm_unpacklo_epi8(b0, b1), b = _mm_unpacklo_epi8(b2, b3);
    return _mm256_set_m128i(_mm_unpackhi_epi16(a, b), _mm_unpacklo_epi16(a, b));
}

/* dense3, 8 chunks at once (24 bytes, two in-bounds 16-byte loads: bytes 0..15 and 8..23): lane j of the result
 * holds the 3 bytes of chunk j (its 24-bit word) in its low bytes */
INLINE __m256i lut_dense3_8(const uint8_t *p) {
    const __m256i v = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + 8)), _mm_loadu_si128((const __m128i *)p));
    const __m256i shuf = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                          4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    return _mm256_shuffle_epi8(v, shuf);
}

INLINE __m256i lut_plane_idx(const int bits, __m256i v8, int j, __m256i shifts) {
    const int sh = 7 * (bits - 1);
    int mul = 0;
    for (int p = 0; p < bits; p++) mul |= 1 << (sh - 7 * p);
    const __m256i t = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(v8, _mm256_set1_epi32(j)),
                                                         shifts), _mm256_set1_epi32(0x01010101));
    return _mm256_srli_epi32(_mm256_mullo_epi32(t, _mm256_set1_epi32(mul)), sh);
}

INLINE __m256 lut_lookup(const int bits, __m256 t0, __m256 t1, __m256i idx) {
    const __m256 w = _mm256_permutevar8x32_ps(t0, idx);
    if (bits < 4) return w;
    return _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(t1, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* res[m] = sum_k x[m * ldx + k] * weight(row, k) over all K columns, for MB input rows. NA accumulators per input
 * row (chunk c goes to accumulator c % NA): the FMA chains are independent enough to hide the FMA latency (one
 * chain at M = 1 is latency-bound at one chunk per 4 cycles). */
#define LUT_FMA(u, w, c)                                                                                      \
    for (int m = 0; m < MB; m++) a[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + 8 * (c)), a[u][m]);

INLINE void lut_row(const int layout, const int bits, const int MB, const float *x, int64_t ldx, int64_t k,
                    const uint8_t *row, int64_t pstride, const float *tab, int64_t sk, int64_t bk, float *res) {
    const int W = bits == 4 ? 16 : 8;
    const int NA = MB <= 2 ? 4 : MB <= 4 ? 2 : 1;          /* accumulators per input row: NA * MB <= 8 */
    const __m256i shifts = layout == 0 ? _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                            _mm256_set1_epi32(bits))
                                       : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 a[4][LUT_MB];
    for (int u = 0; u < NA; u++)
        for (int m = 0; m < MB; m++) a[u][m] = _mm256_setzero_ps();
    const int64_t chunks = k / 8;
    const int64_t gch = sk > 1 ? bk / 8 : chunks;              /* chunks per table group */
    for (int64_t g = 0, c0 = 0; c0 < chunks; g++, c0 += gch) {
        const int64_t c1 = c0 + gch < chunks ? c0 + gch : chunks;
        const float *t = tab + (g < sk ? g : sk - 1) * W;
        const __m256 t0 = _mm256_loadu_ps(t), t1 = bits == 4 ? _mm256_loadu_ps(t + 8) : t0;
        int64_t c = c0;
        if ((layout == 0 && bits == 3) || (layout == 1 && bits > 1)) {   /* 8 chunks per round of loads */
            for (; c + 8 <= c1; c += 8) {
                const __m256i v8 = layout == 0 ? lut_dense3_8(row + 3 * c) : lut_planes8(bits, row, pstride, c);
                for (int j = 0; j < 8; j++) {
                    const __m256i idx = layout == 0
                        ? _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(v8, _mm256_set1_epi32(j)), shifts)
                        : lut_plane_idx(bits, v8, j, shifts);
                    const __m256 w = lut_lookup(bits, t0, t1, idx);
                    LUT_FMA(j % NA, w, c + j)
                }
            }
        }
        for (; c + NA <= c1; c += NA)
            for (int u = 0; u < NA; u++) {
                const __m256 w = lut_lookup(bits, t0, t1, lut_codes(layout, bits, row, pstride, c + u, shifts));
                LUT_FMA(u, w, c + u)
            }
        for (; c < c1; c++) {
            const __m256 w = lut_lookup(bits, t0, t1, lut_codes(layout, bits, row, pstride, c, shifts));
            LUT_FMA(0, w, c)
        }
    }
    for (int m = 0; m < MB; m++) {
        __m256 sum = a[0][m];
        for (int u = 1; u < NA; u++) sum = _mm256_add_ps(sum, a[u][m]);
        res[m] = hsum(sum);
    }
    for (int64_t j = chunks * 8; j < k; j++) {                  /* the last K % 8 columns */
        const int64_t g = sk > 1 ? j / bk : 0;
        const float wv = tab[(g < sk ? g : sk - 1) * W + lut_code1(layout, bits, row, pstride, j)];
        for (int m = 0; m < MB; m++) res[m] += wv * x[m * ldx + j];
    }
}

#define LUT_ROW_MB(L, B)                                                                                        \
    static void lut_row_##L##_##B(int mb, const float *x, int64_t ldx, int64_t k, const uint8_t *row,          \
                                  int64_t pstride, const float *tab, int64_t sk, int64_t bk, float *res) {     \
        switch (mb) {                                                                                           \
        case 1: lut_row(L, B, 1, x, ldx, k, row, pstride, tab, sk, bk, res); break;                            \
        case 2: lut_row(L, B, 2, x, ldx, k, row, pstride, tab, sk, bk, res); break;                            \
        case 3: lut_row(L, B, 3, x, ldx, k, row, pstride, tab, sk, bk, res); break;                            \
        case 4: lut_row(L, B, 4, x, ldx, k, row, pstride, tab, sk, bk, res); break;                            \
        case 5: lut_row(L, B, 5, x, ldx, k, row, pstride, tab, sk, bk, res); break;                            \
        case 6: lut_row(L, B, 6, x, ldx, k, row, pstride, tab, sk, bk, res); break;                            \
        case 7: lut_row(L, B, 7, x, ldx, k, row, pstride, tab, sk, bk, res); break;                            \
        default: lut_row(L, B, 8, x, ldx, k, row, pstride, tab, sk, bk, res); break;                           \
        }                                                                                                       \
    }
LUT_ROW_MB(0, 1)
LUT_ROW_MB(0, 2)
LUT_ROW_MB(0, 3)
LUT_ROW_MB(0, 4)
LUT_ROW_MB(1, 1)
LUT_ROW_MB(1, 2)
LUT_ROW_MB(1, 3)
LUT_ROW_MB(1, 4)

typedef void (*lut_row_fn)(int, const float *, int64_t, int64_t, const uint8_t *, int64_t, const float *, int64_t,
                           int64_t, float *);

/* The entry point. Returns 0, or -1 on bad arguments (out is then untouched). */
int lut_linear(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int layout, int bits,
               const float *tab, int64_t sn, int64_t sk, int64_t bn, int64_t bk, const int64_t *rowptr,
               const int32_t *idx, const float *val, const float *bias, float *out, int threads) {
    lut_row_fn fn = NULL;
    if (layout == 0) fn = bits == 1 ? lut_row_0_1 : bits == 2 ? lut_row_0_2 : bits == 3 ? lut_row_0_3
                                 : bits == 4 ? lut_row_0_4 : NULL;
    else if (layout == 1) fn = bits == 1 ? lut_row_1_1 : bits == 2 ? lut_row_1_2 : bits == 3 ? lut_row_1_3
                                 : bits == 4 ? lut_row_1_4 : NULL;
    if (!fn || m < 0 || n < 0 || k <= 0 || sn < 1 || sk < 1 || bn < 1 || bk < 1 || (sk > 1 && bk % 8)) return -1;
    if (m == 0 || n == 0) return 0;
    if (threads < 1) threads = 1;
    const int W = bits == 4 ? 16 : 8;
    const int64_t stride = layout == 0 ? (bits == 3 ? 3 * ((k + 7) / 8) : (k * bits + 7) / 8) : (k + 7) / 8;
    const int64_t pstride = n * stride;
    const int parallel = threads > 1 && m * n * k >= PARALLEL_MIN;
    #pragma omp parallel for schedule(dynamic, LUT_ROWS) num_threads(threads) if (parallel)
    for (int64_t r = 0; r < n; r++) {
        const int64_t tr = r / bn < sn ? r / bn : sn - 1;
        const float *tab_r = tab + tr * sk * W;
        float res[LUT_MB];
        for (int64_t m0 = 0; m0 < m; m0 += LUT_MB) {
            const int mb = m - m0 < LUT_MB ? (int)(m - m0) : LUT_MB;
            const float *xm = x + m0 * k;
            fn(mb, xm, k, k, w + r * stride, pstride, tab_r, sk, bk, res);
            if (rowptr)
                for (int64_t j = rowptr[r]; j < rowptr[r + 1]; j++) {
                    const int64_t col = (int64_t)idx[j] - r * k;
                    for (int i = 0; i < mb; i++) res[i] += val[j] * xm[i * k + col];
                }
            for (int i = 0; i < mb; i++) out[(m0 + i) * n + r] = res[i] + (bias ? bias[r] : 0.f);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ attention (decode)
 * attention_f32: out = softmax(q k^T * scale + mask) v for a few query rows against n keys: the decode step's
 * attention, for which torch's scaled_dot_product_attention runs a flash kernel blocked for long query runs.
 * Grouped query heads: hq = g * hkv, query head h reads K/V
 * head h / g, and the g query rows of one K/V head are scored together, so each key row is read once for all g.
 *   q    [b, hq, t, d]   strides (qsb, qsh, qst) in elements, the last dim contiguous
 *   k    [b, hkv, n, d]  strides (ksb, ksh, ksn), last dim contiguous (a slice of a static cache is fine)
 *   v    [b, hkv, n, dv] strides (vsb, vsh, vsn), last dim contiguous
 *   mask NULL, or additive fp32 [b, hq, t, n] with strides (msb, msh, mst) (0 where it broadcasts), last dim
 *        contiguous
 *   out  [b, hq, t, dv] contiguous
 * Per query row: s_j = (q . k_j) * scale + mask_j (the dot product in fp32 with fused multiply-adds, 8 lanes then
 * summed), p_j = exp(s_j - max_j s_j) (a polynomial exp, within a few ulp of expf), out = (sum_j p_j v_j) / sum_j
 * p_j, in key order. So it equals the torch expression up to fp32 rounding (tests: rtol 1e-5), not bit for bit.
 * A row whose keys are all masked (-inf) is NaN, as softmax makes it. OpenMP over (batch, K/V head, query
 * position) when the work is large enough. Returns -1 for inconsistent sizes or no memory. */

INLINE __m256 exp256(__m256 x) {          /* Cephes' expf, 8 lanes: x clamped to [-88.38, 88.38] */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    const __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#define ATT_PF_KEYS 16            /* key rows ahead of the scoring that are prefetched */
#define ATT_G 16                  /* query heads per K/V head handled at once (more: in several passes) */

/* 8 sums at once: lane i of the result is the sum of the 8 lanes of a[i] */
INLINE __m256 hsum8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

INLINE float dot_f32(const float *a, const float *b, int64_t d, __m256i dmask) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 8), _mm256_loadu_ps(b + c + 8), acc1);
    }
    for (; c + 8 <= d; c += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc0);
    if (c < d) acc1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + c, dmask), _mm256_maskload_ps(b + c, dmask), acc1);
    return hsum(_mm256_add_ps(acc0, acc1));
}

/* p v for one row: o[0:w] = inv * sum_j p_j v_j[c0:c0+w], W columns (a multiple of 8) in registers */
#define ATT_PV(W)                                                                                               \
    do {                                                                                                        \
        __m256 a[W / 8];                                                                                        \
        for (int u = 0; u < W / 8; u++) a[u] = _mm256_setzero_ps();                                             \
        for (int64_t jj = 0; jj < n; jj++) {                                                                    \
            const float *vj = v + jj * vsn + c;                                                                 \
            const __m256 p = _mm256_set1_ps(sr[jj]);                                                            \
            for (int u = 0; u < W / 8; u++) a[u] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * u), a[u]);       \
        }                                                                                                       \
        for (int u = 0; u < W / 8; u++) _mm256_storeu_ps(o + c + 8 * u, _mm256_mul_ps(a[u], inv));             \
    } while (0)

static void att_rows(int g, const float *const *qr, const float *const *mr, int64_t d, int64_t dv,
                     const float *k, int64_t ksn, const float *v, int64_t vsn, int64_t n, float scale,
                     float *const *orow, float *s) {
    const __m256i dmask = tail_mask(d & 7), vmask = tail_mask(dv & 7);
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < ATT_PF_KEYS && j < n; j++)
        for (int64_t c = 0; c < d * 4; c += 64) _mm_prefetch((const char *)(k + j * ksn) + c, _MM_HINT_T1);
    int64_t j0 = 0;
    for (; j0 + 8 <= n; j0 += 8) {                 /* scores, 8 keys at a time: 8 independent FMA chains per row */
        /* A decode step streams the weights between two attention calls, so the K/V rows come from DRAM in short
         * runs (one head's rows at a time) that the hardware prefetcher is slow to pick up: the K rows
         * ATT_PF_KEYS ahead and the V rows of these keys (read after the softmax) are prefetched here. */
        for (int u = 0; u < 8; u++) {
            const char *kp = (const char *)(k + (j0 + ATT_PF_KEYS + u) * ksn), *vp = (const char *)(v + (j0 + u) * vsn);
            for (int64_t c = 0; c < d * 4; c += 64)
                if (j0 + ATT_PF_KEYS + u < n) _mm_prefetch(kp + c, _MM_HINT_T1);
            for (int64_t c = 0; c < dv * 4; c += 64) _mm_prefetch(vp + c, _MM_HINT_T1);
        }
        for (int r = 0; r < g; r++) {
            __m256 a[8];
            for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + 8 <= d; c += 8) {
                const __m256 x = _mm256_loadu_ps(qr[r] + c);
                for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(x, _mm256_loadu_ps(k + (j0 + u) * ksn + c), a[u]);
            }
            if (c < d) {
                const __m256 x = _mm256_maskload_ps(qr[r] + c, dmask);
                for (int u = 0; u < 8; u++)
                    a[u] = _mm256_fmadd_ps(x, _mm256_maskload_ps(k + (j0 + u) * ksn + c, dmask), a[u]);
            }
            __m256 sc = _mm256_mul_ps(hsum8(a), vscale);
            if (mr[r]) sc = _mm256_add_ps(sc, _mm256_loadu_ps(mr[r] + j0));
            _mm256_storeu_ps(s + r * n + j0, sc);
        }
    }
    for (; j0 < n; j0++)
        for (int r = 0; r < g; r++)
            s[r * n + j0] = dot_f32(qr[r], k + j0 * ksn, d, dmask) * scale + (mr[r] ? mr[r][j0] : 0.0f);
    for (int r = 0; r < g; r++) {
        float *sr = s + r * n, *o = orow[r];
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) mx = sr[j] > mx ? sr[j] : mx;
        if (!(mx > -INFINITY)) {                                  /* every key masked (or NaN scores) */
            for (int64_t c = 0; c < dv; c++) o[c] = NAN;
            continue;
        }
        const __m256 vm = _mm256_set1_ps(mx);
        __m256 sum8 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + j), vm));
            _mm256_storeu_ps(sr + j, e);
            sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum(sum8);
        for (; j < n; j++) {
            float e[8];
            _mm256_storeu_ps(e, exp256(_mm256_set1_ps(sr[j] - mx)));
            sr[j] = e[0];
            sum += e[0];
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        int64_t c = 0;
        for (; c + 64 <= dv; c += 64) ATT_PV(64);
        for (; c + 16 <= dv; c += 16) ATT_PV(16);
        for (; c < dv; c += 8) {
            const __m256i lm = c + 8 <= dv ? _mm256_set1_epi32(-1) : vmask;
            __m256 a = _mm256_setzero_ps();
            for (int64_t jj = 0; jj < n; jj++)
                a = _mm256_fmadd_ps(_mm256_set1_ps(sr[jj]), _mm256_maskload_ps(v + jj * vsn + c, lm), a);
            _mm256_maskstore_ps(o + c, lm, _mm256_mul_ps(a, inv));
        }
    }
}

int attention_f32(const float *q, int64_t b, int64_t hq, int64_t t, int64_t d, int64_t qsb, int64_t qsh,
                  int64_t qst, const float *k, int64_t hkv, int64_t n, int64_t ksb, int64_t ksh, int64_t ksn,
                  const float *v, int64_t dv, int64_t vsb, int64_t vsh, int64_t vsn, const float *mask,
                  int64_t msb, int64_t msh, int64_t mst, float scale, float *out, int threads) {
    if (b < 0 || hq < 1 || hkv < 1 || hq % hkv || t < 0 || d < 1 || dv < 1 || n < 1) return -1;
    if (b == 0 || t == 0) return 0;
    const int64_t g = hq / hkv, tasks = b * hkv * t;
    const int parallel = threads > 1 && tasks > 1 && b * hq * t * n * (d + dv) >= PARALLEL_MIN;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (parallel)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t bi = task / (hkv * t), kh = task / t % hkv, ti = task % t;
        const int gc = g < ATT_G ? (int)g : ATT_G;
        float *s = (float *)malloc(sizeof(float) * gc * n);
        if (!s) {
            failed = 1;
            continue;
        }
        for (int64_t h0 = 0; h0 < g; h0 += ATT_G) {
            const int gr = g - h0 < ATT_G ? (int)(g - h0) : ATT_G;
            const float *qr[ATT_G], *mr[ATT_G];
            float *orow[ATT_G];
            for (int r = 0; r < gr; r++) {
                const int64_t h = kh * g + h0 + r;
                qr[r] = q + bi * qsb + h * qsh + ti * qst;
                mr[r] = mask ? mask + bi * msb + h * msh + ti * mst : NULL;
                orow[r] = out + ((bi * hq + h) * t + ti) * dv;
            }
            att_rows(gr, qr, mr, d, dv, k + bi * ksb + kh * ksh, ksn, v + bi * vsb + kh * vsh, vsn, n, scale, orow, s);
        }
        free(s);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------- decode tape
 *
 * A recorded run of a decode step's ops (segments.py compiles it from the FX graph): one call runs every
 * kernel of the run in order, with no Python, op dispatch or allocation between them. The program is a flat
 * int64 array of instructions [op, words, fields...] (words: the fields' count, checked). A pointer field is
 * two words, (slot, byte offset): slots[slot] + offset, or NULL for slot -1; the slots are set by the caller
 * (the segment's buffers, the graph's tensors of this call). An int field TAPE_DYN is the call's `dyn` (the
 * number of written cache slots, n_keys); a float field is a double's bits. Each instruction calls the same
 * kernel the op would, with the same arguments, so the results are the op's (silu: the polynomial exp, not
 * torch's; within a few ulp). Returns 0, or 1 + the index of the first instruction that failed (bad program
 * or a kernel's error: nothing after it ran). times: NULL, or one double per instruction to which each adds the
 * seconds it took (Segment.profile). */

#define TAPE_DYN (-((int64_t)1 << 62))
enum { T_Q4 = 1, T_Q4I8, T_W8, T_I8, T_RMS, T_ROPE, T_ATT, T_ADD, T_MUL, T_SILU, T_SILU_MUL, T_ROWCOPY,
       T_KVSTORE, T_COPY, T_KVLOAD, T_FQ, T_EW, T_ARANGE, T_GATHER };

static const int tape_words[] = {0, 17, 23, 16, 21, 9, 15, 30, 7, 7, 5, 7, 17, 18, 5, 12, 10, 27, 5, 10};

INLINE void *tape_ptr(void *const *slots, const int64_t *f) {
    return f[0] < 0 ? NULL : (void *)((char *)slots[f[0]] + f[1]);
}

INLINE int64_t tape_int(int64_t v, int64_t dyn) { return v == TAPE_DYN ? dyn : v; }

INLINE double tape_float(int64_t v) {
    double d;
    memcpy(&d, &v, sizeof d);
    return d;
}

INLINE __m256 silu256(__m256 x) {
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

static void tape_silu(const float *a, const float *b, float *out, int64_t count) {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 y = silu256(_mm256_loadu_ps(a + i));
        if (b) y = _mm256_mul_ps(y, _mm256_loadu_ps(b + i));
        _mm256_storeu_ps(out + i, y);
    }
    if (i < count) {
        const __m256i tail = tail_mask(count - i);
        __m256 y = silu256(_mm256_maskload_ps(a + i, tail));
        if (b) y = _mm256_mul_ps(y, _mm256_maskload_ps(b + i, tail));
        _mm256_maskstore_ps(out + i, tail, y);
    }
}

/* out[b, h, idx[t], :d] = src[b, h, t, :d] (index_copy_ along dim 2 of a [B, H, L, D] cache; the last dims
 * contiguous). -1 if an index is outside [0, L). */
static int tape_rowcopy(float *dst, const float *src, const int64_t *idx, int64_t nb, int64_t nh, int64_t nt,
                        int64_t d, int64_t dsb, int64_t dsh, int64_t dsl, int64_t len, int64_t ssb, int64_t ssh,
                        int64_t sst) {
    for (int64_t t = 0; t < nt; t++)
        if (idx[t] < 0 || idx[t] >= len) return -1;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t t = 0; t < nt; t++)
                memcpy(dst + b * dsb + h * dsh + idx[t] * dsl, src + b * ssb + h * ssh + t * sst, sizeof(float) * d);
    return 0;
}

static double tape_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The small ops of a step's prologue (positions, the causal mask, the rotary tables) and any elementwise op
 * the fast fp32 instructions do not cover: out = f(a, b) over up to 4 dims with strides (0 where a or b is
 * broadcast), dtypes fp32 / int64 / bool. Where fp32 takes part, the operands (a scalar too) are rounded to
 * fp32 first, as torch computes; then combined in double and rounded once to the output type: the IEEE result
 * of + - * / on fp32 (and exact on int64 below 2^53); cos / sin are
 * libm's, within an ulp of torch's vectorized ones. */
enum { EW_COPY, EW_ADD, EW_SUB, EW_MUL, EW_DIV, EW_LE, EW_LT, EW_GE, EW_GT, EW_EQ, EW_NE, EW_COS, EW_SIN, EW_NEG,
       EW_MASK, EW_NOT };
enum { DT_F32, DT_I64, DT_BOOL };

INLINE double ew_ld(const char *p, int dt, int64_t i) {
    return dt == DT_F32 ? (double)((const float *)p)[i] : dt == DT_I64 ? (double)((const int64_t *)p)[i]
                                                                       : (double)((const uint8_t *)p)[i];
}

static int tape_ew(int op, int dta, int dtb, int dto, const int64_t *size, const char *a, const int64_t *sa,
                   const char *b, const int64_t *sb, double scalar, char *out, const int64_t *so) {
    if (op < EW_COPY || op > EW_NOT || dta < 0 || dta > 2 || dtb < 0 || dtb > 2 || dto < 0 || dto > 2 || !a || !out)
        return -1;
    const int f32 = dta == DT_F32 || (b && dtb == DT_F32) || dto == DT_F32;
    for (int64_t i0 = 0; i0 < size[0]; i0++)
        for (int64_t i1 = 0; i1 < size[1]; i1++)
            for (int64_t i2 = 0; i2 < size[2]; i2++)
                for (int64_t i3 = 0; i3 < size[3]; i3++) {
                    double x = ew_ld(a, dta, i0 * sa[0] + i1 * sa[1] + i2 * sa[2] + i3 * sa[3]);
                    double y = b ? ew_ld(b, dtb, i0 * sb[0] + i1 * sb[1] + i2 * sb[2] + i3 * sb[3]) : scalar;
                    if (f32) x = (float)x, y = (float)y;      /* torch computes in fp32: operands rounded first */
                    double r;
                    switch (op) {
                    case EW_ADD: r = x + y; break;
                    case EW_SUB: r = x - y; break;
                    case EW_MUL: r = x * y; break;
                    case EW_DIV: r = x / y; break;
                    case EW_LE: r = x <= y; break;
                    case EW_LT: r = x < y; break;
                    case EW_GE: r = x >= y; break;
                    case EW_GT: r = x > y; break;
                    case EW_EQ: r = x == y; break;
                    case EW_NE: r = x != y; break;
                    case EW_COS: r = cosf((float)x); break;
                    case EW_SIN: r = sinf((float)x); break;
                    case EW_NEG: r = -x; break;
                    case EW_MASK: r = x != 0. ? 0. : -INFINITY; break;     /* allowed -> 0, masked -> -inf */
                    case EW_NOT: r = x == 0.; break;
                    default: r = x;
                    }
                    const int64_t o = i0 * so[0] + i1 * so[1] + i2 * so[2] + i3 * so[3];
                    if (dto == DT_F32) ((float *)out)[o] = (float)r;
                    else if (dto == DT_I64) ((int64_t *)out)[o] = (int64_t)r;
                    else ((uint8_t *)out)[o] = r != 0.;
                }
    return 0;
}

int tape_run(const int64_t *prog, int64_t len, void *const *slots, int64_t dyn, int threads, double *times) {
    int64_t pc = 0, ins = 0;
    double t0 = times ? tape_now() : 0.;
    for (; pc < len; ins++) {
        const int64_t op = prog[pc], words = pc + 1 < len ? prog[pc + 1] : -1;
        if (op < T_Q4 || op > T_GATHER || words != tape_words[op] || pc + 2 + words > len) return (int)(ins + 1);
        const int64_t *f = prog + pc + 2;
#define P(i) tape_ptr(slots, f + (i))
#define N(i) tape_int(f[i], dyn)
        int rc = 0;
        switch (op) {
        case T_Q4:      /* x, m, k16, w, n, s, z, group, bias, out, a8 */
            rc = (f[16] ? q4_linear_a8 : q4_linear)(P(0), N(2), N(3), P(4), N(6), P(7), P(9), N(11), P(12), P(14),
                                                     threads);
            break;
        case T_Q4I8:    /* x, m, k, k16, w, n, s, z, group, bias, out, qmin, qmax, codes, scales */
            rc = token_quant(P(0), N(2), N(3), (int)f[17], (int)f[18], P(19), NULL, P(21));
            if (!rc) rc = q4_linear_i8(P(19), P(21), N(2), N(3), N(4), P(5), N(7), P(8), P(10), N(12), P(13), P(15),
                                       threads);
            break;
        case T_W8:      /* x, m, k, w, n, ws, zc, bias, out, a8 (an input fake quant: a T_FQ before it) */
            rc = (f[15] ? w8_linear_a8 : w8_linear)(P(0), N(2), N(3), P(4), N(6), P(7), P(9), P(11), P(13), threads);
            break;
        case T_I8:      /* x, m, k, w, n, ws, bias, out, wsum, qmin, qmax, codes, scales */
            rc = token_quant(P(0), N(2), N(3), (int)f[15], (int)f[16], P(17), NULL, P(19));
            if (!rc) rc = i8_linear_ws(P(17), N(2), N(3), P(4), N(6), P(19), P(7), P(9), P(11), threads, P(13));
            break;
        case T_RMS:     /* x, m, d, w, eps, out */
            rc = rms_norm_f32(P(0), N(2), N(3), P(4), (float)tape_float(f[6]), P(7));
            break;
        case T_ROPE:    /* x, b, h, t, d, sb, sh, st, cos, sin, out */
            rc = rope_f32(P(0), N(2), N(3), N(4), N(5), N(6), N(7), N(8), P(9), P(11), P(13));
            break;
        case T_ATT:     /* q, b, hq, t, d, qsb, qsh, qst, k, hkv, n, ksb, ksh, ksn, v, dv, vsb, vsh, vsn, mask,
                           msb, msh, mst, scale, out */
            rc = attention_f32(P(0), N(2), N(3), N(4), N(5), N(6), N(7), N(8), P(9), N(11), N(12), N(13), N(14),
                               N(15), P(16), N(18), N(19), N(20), N(21), P(22), N(24), N(25), N(26),
                               (float)tape_float(f[27]), P(28), threads);
            break;
        case T_ADD: case T_MUL: {   /* a, b, out, count */
            const float *a = P(0), *b = P(2);
            float *o = P(4);
            const int64_t c = N(6);
            if (op == T_ADD) for (int64_t i = 0; i < c; i++) o[i] = a[i] + b[i];
            else for (int64_t i = 0; i < c; i++) o[i] = a[i] * b[i];
            break;
        }
        case T_SILU:    /* a, out, count */
            tape_silu(P(0), NULL, P(2), N(4));
            break;
        case T_SILU_MUL:    /* a, b, out, count: silu(a) * b */
            tape_silu(P(0), P(2), P(4), N(6));
            break;
        case T_ROWCOPY:     /* dst, src, idx, b, h, t, d, dsb, dsh, dsl, len, ssb, ssh, sst */
            rc = tape_rowcopy(P(0), P(2), P(4), N(6), N(7), N(8), N(9), N(10), N(11), N(12), N(13), N(14), N(15),
                              N(16));
            break;
        case T_KVSTORE:     /* k, b, h, t, d, sb, sh, st, pos, max_len, bits, shared, codes, scales */
            rc = kv_store(P(0), N(2), N(3), N(4), N(5), N(6), N(7), N(8), P(9), N(11), (int)f[12], (int)f[13],
                          P(14), P(16));
            break;
        case T_COPY:        /* dst, src, bytes */
            memcpy(P(0), P(2), (size_t)N(4));
            break;
        case T_FQ:          /* x, m, k, qmin, qmax, out, scales: token_quant's fake-quant values */
            rc = token_quant(P(0), N(2), N(3), (int)f[4], (int)f[5], NULL, P(6), P(8));
            break;
        case T_EW:          /* op, dta, dtb, dto, size[4], a, sa[4], b, sb[4], scalar, out, so[4] */
            rc = tape_ew((int)f[0], (int)f[1], (int)f[2], (int)f[3], (int64_t[]){N(4), N(5), N(6), N(7)}, P(8),
                         (int64_t[]){N(10), N(11), N(12), N(13)}, P(14), (int64_t[]){N(16), N(17), N(18), N(19)},
                         tape_float(f[20]), P(21), (int64_t[]){N(23), N(24), N(25), N(26)});
            break;
        case T_ARANGE: {    /* out, dtype, start, count: out[i] = start + i */
            const int64_t start = N(3), count = N(4);
            if (f[2] == DT_I64) for (int64_t i = 0; i < count; i++) ((int64_t *)P(0))[i] = start + i;
            else if (f[2] == DT_F32) for (int64_t i = 0; i < count; i++) ((float *)P(0))[i] = (float)(start + i);
            else rc = -1;
            break;
        }
        case T_GATHER: {    /* out, table, ids, count, d, rows, row stride: out[j, :d] = table[ids[j], :d] (fp32) */
            const int64_t *ids = P(4), count = N(6), d = N(7), rows = N(8), stride = N(9);
            const float *table = P(2);
            float *out = P(0);
            for (int64_t j = 0; j < count && !rc; j++) {
                if (ids[j] < 0 || ids[j] >= rows) rc = -1;
                else memcpy(out + j * d, table + ids[j] * stride, sizeof(float) * d);
            }
            break;
        }
        case T_KVLOAD: {    /* codes, scales, bh, max_len, n, d, bits, per, out: kv_load, each head's n rows at
                               the start of its max_len slots of out [bh, max_len, d] (strides independent of n) */
            const int64_t bh = N(4), ml = N(5), n = N(6), d = N(7), bits = f[8], per = N(9);
            const uint8_t *codes = P(0);
            const float *scales = P(2);
            float *out = P(10);
            const int64_t w = bits == 8 ? d : d / 2;
            for (int64_t i = 0; i < bh && !rc && per > 0; i++)
                rc = kv_load(codes + i * ml * w, scales + (i / per) * ml, 1, ml, n, d, (int)bits, 1, out + i * ml * d);
            if (per < 1) rc = -1;
            break;
        }
        }
#undef P
#undef N
        if (rc) return (int)(ins + 1);
        if (times) {                        /* profiling: seconds per instruction, added up over calls */
            const double t1 = tape_now();
            times[ins] += t1 - t0;
            t0 = t1;
        }
        pc += 2 + words;
    }
    return 0;
}
