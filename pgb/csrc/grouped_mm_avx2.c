/* Grouped (block-diagonal) matrix product for pgb's GroupedLinear on x86-64 CPUs with
 * AVX2 and FMA, parallel over blocks and row strips with OpenMP.
 *
 *   y[n, g*ob + j] = bias[g*ob + j] + sum_k x[n, g*ib + k] * w[slot[g]][k][j]
 *
 * x: n rows of stride ldx (floats), block-ordered input; w: (kept, ib, ob) contiguous;
 * bias: out = groups*ob floats or NULL; y: n rows of stride ldy. slot[g] is block g's
 * index in w, or -1 when the block is dropped (its outputs are the bias, or 0).
 * ob must be a multiple of 8.
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
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define ROWS 6          /* output rows per tile */
#define STRIP 96        /* rows per work item: a block's input strip stays in cache */

#define FMA16(r) { __m256 a = _mm256_broadcast_ss(ap[r] + k); \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0); c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1); }
#define FMA8(r) { __m256 a = _mm256_broadcast_ss(ap[r] + k); \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0); }

/* One tile: rows ap[0..5] (pointers into x at the block's first input), 16 columns of
 * b (row stride ldb), k = 0..kdim-1; stores the first `rows` rows into c. */
static void tile16(const float *const *ap, const float *b, ptrdiff_t ldb, int kdim,
                   const float *bias, float *c, ptrdiff_t ldc, int rows) {
    __m256 i0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    __m256 i1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    __m256 c00 = i0, c01 = i1, c10 = i0, c11 = i1, c20 = i0, c21 = i1,
           c30 = i0, c31 = i1, c40 = i0, c41 = i1, c50 = i0, c51 = i1;
    for (int k = 0; k < kdim; ++k) {
        __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
        FMA16(0) FMA16(1) FMA16(2) FMA16(3) FMA16(4) FMA16(5)
    }
    __m256 acc[2 * ROWS] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_ps(c + r * ldc, acc[2 * r]);
        _mm256_storeu_ps(c + r * ldc + 8, acc[2 * r + 1]);
    }
}

/* The same for the last 8 columns of a block whose width is 8 more than a multiple of 16. */
static void tile8(const float *const *ap, const float *b, ptrdiff_t ldb, int kdim,
                  const float *bias, float *c, ptrdiff_t ldc, int rows) {
    __m256 i0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    __m256 c00 = i0, c10 = i0, c20 = i0, c30 = i0, c40 = i0, c50 = i0;
    for (int k = 0; k < kdim; ++k) {
        __m256 b0 = _mm256_loadu_ps(b + k * ldb);
        FMA8(0) FMA8(1) FMA8(2) FMA8(3) FMA8(4) FMA8(5)
    }
    __m256 acc[ROWS] = {c00, c10, c20, c30, c40, c50};
    for (int r = 0; r < rows; ++r) _mm256_storeu_ps(c + r * ldc, acc[r]);
}

/* Returns 0, or 1 when the arguments are out of what the kernel handles (nothing done). */
int pgb_grouped_mm(const float *x, int64_t n, int64_t ldx, const float *w,
                   const float *bias, float *y, int64_t ldy, int groups, int ib, int ob,
                   const int32_t *slot, int threads) {
    if (n < 0 || groups < 1 || ib < 1 || ob < 8 || ob % 8 || threads < 1)
        return 1;
    int64_t strips = (n + STRIP - 1) / STRIP, items = strips * groups;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) {
        int g = (int)(item / strips);  /* neighbouring items share a block's weights */
        int64_t r0 = (item % strips) * STRIP;
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
        const float *wg = w + (int64_t)slot[g] * ib * ob, *xg = x + (int64_t)g * ib;
        for (int j = 0; j < ob; j += 16) {  /* a 16-column slice of w stays in L1 */
            for (int64_t r = r0; r < r1; r += ROWS) {
                int rows = r1 - r < ROWS ? (int)(r1 - r) : ROWS;
                const float *ap[ROWS];  /* a short last tile repeats its last row */
                for (int q = 0; q < ROWS; ++q)
                    ap[q] = xg + (r + (q < rows ? q : rows - 1)) * ldx;
                const float *bj = bg ? bg + j : NULL;
                if (ob - j >= 16)
                    tile16(ap, wg + j, ob, ib, bj, yg + r * ldy + j, ldy, rows);
                else
                    tile8(ap, wg + j, ob, ib, bj, yg + r * ldy + j, ldy, rows);
            }
        }
    }
    return 0;
}
