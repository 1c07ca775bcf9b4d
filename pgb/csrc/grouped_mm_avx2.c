/* Grouped (block-diagonal) matrix product for pgb's GroupedLinear on x86-64 CPUs with
 * AVX2 and FMA, parallel over blocks and row strips with OpenMP.
 *
 *   y[n, g*ob + j] = bias[g*ob + j] + sum_k x[n, g*ib + k] * w[slot[g]][k][j]
 *
 * x: n rows of stride ldx (floats), block-ordered input; w: (kept, ib, ob) contiguous;
 * bias: out = groups*ob floats or NULL; y: n rows of stride ldy. slot[g] is block g's
 * index in w, or -1 when the block is dropped (its outputs are the bias, or 0).
 * ob must be a multiple of 8. Optionally the input is gathered on the fly through a
 * column map (the layer's in_index), so the caller need not copy x into block order.
 *
 * Why a kernel of our own: at a few hundred tokens and G = 4..8 a block's product is
 * small (ib 48, ob 192 at G = 8 in MiniLM), and BLAS and oneDNN spend much of their time
 * packing operands and, for the batched form, in a separate transposing bias pass. Here
 * each 6 x 16 tile of the output is accumulated in 12 AVX registers straight from x and
 * w (no packing: w is already laid out row by row), starts from the bias and is stored
 * once into its place in y.
 *
 * Built by pgb/native.py with -O3 -mavx2 -mfma -fopenmp; it uses the OpenMP runtime
 * torch has loaded (same soname), so it shares torch's thread pool. */
#include <immintrin.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define ROWS 6          /* output rows per tile */
#define STRIP 96        /* rows per work item: a block's input strip stays in cache */

/* One tile: rows ap[0..5] (pointers into x), 16 columns of b (row stride ldb),
 * k = 0..kdim-1, reading input column COL(k) of each row; stores the first `rows` rows
 * into c. Two versions: inputs in place (COL(k) = k, ap at the block's first input) and
 * inputs gathered through a column map (COL(k) = col[k], ap at the row's start), which
 * spares the caller a gathered copy of x. */
#define FMA16(r, COL) { __m256 a = _mm256_broadcast_ss(ap[r] + COL); \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0); c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1); }
#define FMA8(r, COL) { __m256 a = _mm256_broadcast_ss(ap[r] + COL); \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0); }

#define DEFINE_TILES(NAME16, NAME8, COL)                                                  \
static void NAME16(const float *const *ap, const int32_t *col, const float *b,            \
                   ptrdiff_t ldb, int kdim, const float *bias, float *c, ptrdiff_t ldc,   \
                   int rows) {                                                            \
    (void)col;                                                                            \
    __m256 i0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();                      \
    __m256 i1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();                  \
    __m256 c00 = i0, c01 = i1, c10 = i0, c11 = i1, c20 = i0, c21 = i1,                    \
           c30 = i0, c31 = i1, c40 = i0, c41 = i1, c50 = i0, c51 = i1;                    \
    for (int k = 0; k < kdim; ++k) {                                                      \
        __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);  \
        FMA16(0, COL) FMA16(1, COL) FMA16(2, COL) FMA16(3, COL) FMA16(4, COL)             \
        FMA16(5, COL)                                                                     \
    }                                                                                     \
    __m256 acc[2 * ROWS] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};  \
    for (int r = 0; r < rows; ++r) {                                                      \
        _mm256_storeu_ps(c + r * ldc, acc[2 * r]);                                        \
        _mm256_storeu_ps(c + r * ldc + 8, acc[2 * r + 1]);                                \
    }                                                                                     \
}                                                                                         \
/* the last 8 columns of a block whose width is 8 more than a multiple of 16 */           \
static void NAME8(const float *const *ap, const int32_t *col, const float *b,             \
                  ptrdiff_t ldb, int kdim, const float *bias, float *c, ptrdiff_t ldc,    \
                  int rows) {                                                             \
    (void)col;                                                                            \
    __m256 i0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();                       \
    __m256 c00 = i0, c10 = i0, c20 = i0, c30 = i0, c40 = i0, c50 = i0;                    \
    for (int k = 0; k < kdim; ++k) {                                                      \
        __m256 b0 = _mm256_loadu_ps(b + k * ldb);                                         \
        FMA8(0, COL) FMA8(1, COL) FMA8(2, COL) FMA8(3, COL) FMA8(4, COL) FMA8(5, COL)     \
    }                                                                                     \
    __m256 acc[ROWS] = {c00, c10, c20, c30, c40, c50};                                    \
    for (int r = 0; r < rows; ++r) _mm256_storeu_ps(c + r * ldc, acc[r]);                 \
}

DEFINE_TILES(tile16, tile8, k)
DEFINE_TILES(tile16_gather, tile8_gather, col[k])

/* cols: NULL (x is in block order), or the input column each block-ordered input reads
 * (groups * ib entries, each in [0, ldx)): x[n, cols[i]] stands for block-ordered input i.
 * Returns 0, or 1 when the arguments are out of what the kernel handles (nothing done). */
int pgb_grouped_mm(const float *x, int64_t n, int64_t ldx, const float *w,
                   const float *bias, float *y, int64_t ldy, int groups, int ib, int ob,
                   const int32_t *slot, const int32_t *cols, int threads) {
    if (n < 0 || groups < 1 || ib < 1 || ob < 8 || ob % 8 || threads < 1)
        return 1;
    int64_t strips = (n + STRIP - 1) / STRIP, items = strips * groups;
    /* Few strips: neighbouring items share a block's weights, and every thread gets some
     * of each strip. Many strips (thousands of tokens, an output far larger than L2):
     * a thread's items run strip by strip through every block, so it writes whole
     * output rows, which the memory system takes 5-10% faster here. */
    int by_strip = strips >= 8 * (int64_t)threads;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) {
        int g = (int)(by_strip ? item % groups : item / strips);
        int64_t r0 = (by_strip ? item / groups : item % strips) * STRIP;
        int64_t r1 = r0 + STRIP < n ? r0 + STRIP : n;
        const float *bg = bias ? bias + (int64_t)g * ob : NULL;
        float *yg = y + (int64_t)g * ob;
        if (slot[g] < 0) {  /* dropped block: bias or 0 */
            for (int64_t r = r0; r < r1; ++r) {
                if (bg) memcpy(yg + r * ldy, bg, sizeof(float) * (size_t)ob);
                else memset(yg + r * ldy, 0, sizeof(float) * (size_t)ob);
            }
            continue;
        }
        const float *wg = w + (int64_t)slot[g] * ib * ob;
        const int32_t *cg = cols ? cols + (int64_t)g * ib : NULL;
        const float *xg = cols ? x : x + (int64_t)g * ib;  /* where a row's reads start */
        for (int j = 0; j < ob; j += 16) {  /* a 16-column slice of w stays in L1 */
            for (int64_t r = r0; r < r1; r += ROWS) {
                int rows = r1 - r < ROWS ? (int)(r1 - r) : ROWS;
                const float *ap[ROWS];  /* a short last tile repeats its last row */
                for (int q = 0; q < ROWS; ++q)
                    ap[q] = xg + (r + (q < rows ? q : rows - 1)) * ldx;
                const float *bj = bg ? bg + j : NULL;
                float *cj = yg + r * ldy + j;
                if (ob - j >= 16) {
                    if (cg) tile16_gather(ap, cg, wg + j, ob, ib, bj, cj, ldy, rows);
                    else tile16(ap, NULL, wg + j, ob, ib, bj, cj, ldy, rows);
                } else {
                    if (cg) tile8_gather(ap, cg, wg + j, ob, ib, bj, cj, ldy, rows);
                    else tile8(ap, NULL, wg + j, ob, ib, bj, cj, ldy, rows);
                }
            }
        }
    }
    return 0;
}

/* Column gather: out[r, j] = x[r, cols[j]] for r < n, j < k (x rows of stride ldx and
 * `width` columns, out rows of stride ldo); returns 2 for an index outside [0, width).
 * Four rows are taken at a time, so each index is read once per four rows and every
 * store lands in a row being written in order. Against torch's index_select along dim 1:
 * 2.3x faster on (2,000, 1,536) with a permutation of its columns, 1.8x on (2,000, 384),
 * 1.2x on (128, 384); 2 threads, benchmarks/results/gather_cols.md. */
int pgb_gather_cols(const float *x, int64_t n, int64_t ldx, int64_t width,
                    const int32_t *cols, int64_t k, float *out, int64_t ldo, int threads) {
    if (n < 0 || k < 0 || threads < 1)
        return 1;
    for (int64_t j = 0; j < k; ++j)  /* x has `width` columns: refuse an index outside */
        if (cols[j] < 0 || cols[j] >= width)
            return 2;
    int64_t quads = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads) if (n * k >= 16384)
    for (int64_t q = 0; q < quads; ++q) {
        int64_t r0 = q * 4;
        if (r0 + 4 <= n) {
            const float *x0 = x + r0 * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
            float *o0 = out + r0 * ldo, *o1 = o0 + ldo, *o2 = o1 + ldo, *o3 = o2 + ldo;
            for (int64_t j = 0; j < k; ++j) {
                int32_t c = cols[j];
                o0[j] = x0[c]; o1[j] = x1[c]; o2[j] = x2[c]; o3[j] = x3[c];
            }
        } else {
            for (int64_t r = r0; r < n; ++r)
                for (int64_t j = 0; j < k; ++j)
                    out[r * ldo + j] = x[r * ldx + cols[j]];
        }
    }
    return 0;
}

/* Dropout with a counter-based mask: element i is kept when hash(seed, i) >= threshold
 * (threshold = p * 2^32), y[i] = x[i] * scale if kept, else 0. The mask is a pure function
 * of (seed, i), so the backward pass recomputes it from the seed instead of storing it,
 * and the loop vectorises and runs on every thread, where torch's CPU dropout draws its
 * Bernoulli numbers one by one from a serial generator. The hash is two rounds of the
 * "lowbias32" integer finaliser (C. Wellons, hash-prospector), a bijection of 32-bit
 * words, over the element index mixed with the two halves of the seed; n < 2^32. */
static inline uint32_t pgb_mix32(uint32_t h) {
    h ^= h >> 16; h *= 0x7feb352dU; h ^= h >> 15; h *= 0x846ca68bU; h ^= h >> 16;
    return h;
}

static inline __m256i pgb_mix32x8(__m256i h) {
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7feb352d));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x846ca68bU));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

int pgb_dropout(const float *x, float *y, int64_t n, uint64_t seed, uint32_t threshold,
                float scale, int threads) {
    if (n < 0 || n > (int64_t)UINT32_MAX || threads < 1)
        return 1;
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const int64_t chunk = 16384, chunks = (n + chunk - 1) / chunk;
    #pragma omp parallel for schedule(static) num_threads(threads) if (n >= 65536)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t i = c * chunk, end = c + 1 < chunks ? i + chunk : n;
        /* 8 at a time: keep when h >= threshold, an unsigned compare done as a signed one
         * on both sides shifted by 2^31 */
        const __m256i vk0 = _mm256_set1_epi32((int)k0), vk1 = _mm256_set1_epi32((int)k1);
        const __m256i sign = _mm256_set1_epi32(INT32_MIN);
        const __m256i t = _mm256_xor_si256(_mm256_set1_epi32((int)threshold), sign);
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 vscale = _mm256_set1_ps(scale);
        for (; i + 8 <= end; i += 8) {
            __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)i), lane);
            __m256i h = pgb_mix32x8(_mm256_add_epi32(pgb_mix32x8(_mm256_xor_si256(idx, vk0)),
                                                     vk1));
            __m256i drop = _mm256_cmpgt_epi32(t, _mm256_xor_si256(h, sign));
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), vscale);
            _mm256_storeu_ps(y + i, _mm256_andnot_ps(_mm256_castsi256_ps(drop), v));
        }
        for (; i < end; ++i) {
            uint32_t h = pgb_mix32(pgb_mix32((uint32_t)i ^ k0) + k1);
            y[i] = h >= threshold ? x[i] * scale : 0.0f;
        }
    }
    return 0;
}
