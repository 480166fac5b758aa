/* The batched LoRA add for bfloat16 on the CPU, every run of one wrapped linear in one call: the same semantics,
 * layouts and argument checks as lora_runs.c (the float32 kernel, left as it is), with every tensor stored as
 * bfloat16 bit patterns (uint16) except the int32 tables.
 *
 *   for each run (slot, start, end), for t in [start, end), with (o, r) = table[slot]:
 *       y[t, :] += scales[slot] * (x[t, :] @ a[o : o + r, :].T) @ b[o : o + r, :]
 *
 *   y: [T, out] row stride ldy     x: [T, in] row stride ldx       (T = n_tokens), bfloat16
 *   a: [N, in], b: [N, out] contiguous bfloat16 (the adapter pool)   scales: [S+1] bfloat16
 *   table: [S+1, 2] int32 (offset, rank)                              runs: [n_runs, 3] int32 (slot, start, end)
 *
 * Accuracy: every product and sum in float32; x @ A.T stays float32 (it is not rounded to bfloat16 between the two
 * products, as a pair of bfloat16 matmuls would), and each y element is rounded to bfloat16 once, to nearest even.
 *
 * Two builds of the shrink (x @ A.T, a dot product over `in` per row and rank), chosen by the compiler's flags
 * (-march=native): where the CPU has AVX512-BF16 (__AVX512BF16__), _mm512_dpbf16_ps multiplies 32 bfloat16 pairs per
 * instruction into float32 accumulators; elsewhere bfloat16 is widened to float32 by a 16-bit shift (a bfloat16 is
 * the top half of the float32 of the same value: each block's rows of x once into a per-thread buffer, A's rows as
 * they are loaded) and multiplied with the float32 vector code, within 1.07-1.15x of the float32 kernel's time on
 * AVX2 (docs/benchmarks.md). The expand ((xA.T) @ B, a float32 scalar times a B row) widens B the same way in both
 * builds: dpbf16 would need B's rows interleaved in pairs and x @ A.T rounded to bfloat16.
 */
#include <stdint.h>
#include <stdlib.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define W 16
#else
#define W 8 /* AVX2: the 4x4 block of accumulators must fit the 16 registers (see lora_runs.c) */
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef float vf_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint16_t vh_unaligned __attribute__((vector_size(W * sizeof(uint16_t)), aligned(2)));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
#define INLINE static inline __attribute__((always_inline))

/* W bfloat16 from p, as float32. */
INLINE vf loadv(const uint16_t *p) { return (vf)(__builtin_convertvector(*(const vh_unaligned *)p, vu) << 16); }

INLINE float load1(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

/* float32 -> bfloat16 rounded to nearest even, as torch converts (NaN -> 0x7FC0, overflow -> inf). */
INLINE vh storev_bits(vf v) {
    vu bits = (vu)v;
    vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    vu nan = (vu)(v != v); /* all ones in NaN lanes */
    return __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), vh);
}
INLINE void storev(uint16_t *p, vf v) { *(vh_unaligned *)p = storev_bits(v); }

INLINE uint16_t to_bf16(float x) {
    if (x != x) return 0x7FC0;
    union { float f; uint32_t u; } v = {.f = x};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

INLINE float hsum(vf v) {
#if W == 16
    vf8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf8 h = v;
#endif
    vf4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* xa[t * rank + j] = scale * dot(x[t], a[j]) for the TB rows of the block and the ranks j0 .. j0+JB.
 * x: the block's rows as stored (bfloat16, row stride ldx), read by the dpbf16 path; xf: the same rows widened to
 * float32 (row stride in), read by the fallback. */
INLINE void shrink_block(const uint16_t *x, int64_t ldx, const float *xf, const uint16_t *a, int64_t in, int j0,
                         float scale, float *xa, int rank, const int TB, const int JB) {
#if defined(__AVX512BF16__)
    (void)xf;
    __m512 acc[4][4];
    for (int t = 0; t < TB; t++)
        for (int j = 0; j < JB; j++) acc[t][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 32) { /* 32 bfloat16 pairs per dpbf16; the tail by a zero-filling masked load */
        __mmask32 m = in - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (in - k)) - 1u);
        __m512bh xv[4], av[4];
        for (int t = 0; t < TB; t++) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * ldx + k);
        for (int j = 0; j < JB; j++) av[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, a + (j0 + j) * in + k);
        for (int t = 0; t < TB; t++)
            for (int j = 0; j < JB; j++) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], xv[t], av[j]);
    }
    for (int t = 0; t < TB; t++)
        for (int j = 0; j < JB; j++) xa[t * rank + j0 + j] = scale * _mm512_reduce_add_ps(acc[t][j]);
#else
    (void)x, (void)ldx;
    vf acc[4][4] = {{{0}}};
    int64_t k = 0;
    for (; k + W <= in; k += W) {
        vf xv[4], av[4];
        for (int t = 0; t < TB; t++) xv[t] = *(const vf_unaligned *)(xf + t * in + k);
        for (int j = 0; j < JB; j++) av[j] = loadv(a + (j0 + j) * in + k);
        for (int t = 0; t < TB; t++)
            for (int j = 0; j < JB; j++) acc[t][j] += xv[t] * av[j];
    }
    for (int t = 0; t < TB; t++) {
        for (int j = 0; j < JB; j++) {
            float s = hsum(acc[t][j]);
            for (int64_t kk = k; kk < in; kk++) s += xf[t * in + kk] * load1(a[(j0 + j) * in + kk]);
            xa[t * rank + j0 + j] = scale * s;
        }
    }
#endif
}

INLINE void shrink_rows(const uint16_t *x, int64_t ldx, float *xf, const uint16_t *a, int64_t in, int rank,
                        float scale, float *xa, const int TB) {
#if !defined(__AVX512BF16__)
    /* Widen the block's rows once: the shrink reads each of them rank / 4 times (up to 3.5x slower on AVX2 when
     * every read widened again, in a quick check). */
    for (int t = 0; t < TB; t++) {
        int64_t k = 0;
        for (; k + W <= in; k += W) *(vf_unaligned *)(xf + t * in + k) = loadv(x + t * ldx + k);
        for (; k < in; k++) xf[t * in + k] = load1(x[t * ldx + k]);
    }
#endif
    int j0 = 0;
    for (; j0 + 4 <= rank; j0 += 4) shrink_block(x, ldx, xf, a, in, j0, scale, xa, rank, TB, 4);
    for (; j0 < rank; j0++) shrink_block(x, ldx, xf, a, in, j0, scale, xa, rank, TB, 1);
}

/* y[t] += xa[t] @ b for the TB rows of the block, 2 vectors of columns per pass in float32, y rounded once. */
INLINE void expand_rows(uint16_t *y, int64_t ldy, const float *xa, int rank, const uint16_t *b, int64_t out,
                        const int TB) {
    int64_t o = 0;
    for (; o + 2 * W <= out; o += 2 * W) {
        vf acc[4][2];
        for (int t = 0; t < TB; t++) {
            acc[t][0] = loadv(y + t * ldy + o);
            acc[t][1] = loadv(y + t * ldy + o + W);
        }
        for (int j = 0; j < rank; j++) {
            vf b0 = loadv(b + j * out + o), b1 = loadv(b + j * out + o + W);
            for (int t = 0; t < TB; t++) {
                float c = xa[t * rank + j];
                acc[t][0] += c * b0;
                acc[t][1] += c * b1;
            }
        }
        for (int t = 0; t < TB; t++) {
            storev(y + t * ldy + o, acc[t][0]);
            storev(y + t * ldy + o + W, acc[t][1]);
        }
    }
    for (; o < out; o++) {
        for (int t = 0; t < TB; t++) {
            float s = load1(y[t * ldy + o]);
            for (int j = 0; j < rank; j++) s += xa[t * rank + j] * load1(b[j * out + o]);
            y[t * ldy + o] = to_bf16(s);
        }
    }
}

INLINE void block(uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, float *xf, const uint16_t *a,
                  const uint16_t *b, int64_t in, int64_t out, int rank, float scale, float *xa, const int TB) {
    shrink_rows(x, ldx, xf, a, in, rank, scale, xa, TB);
    expand_rows(y, ldy, xa, rank, b, out, TB);
}

static void run_block(uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, int64_t in, int64_t out,
                      const uint16_t *a, const uint16_t *b, const int32_t *table, const uint16_t *scales, int slot,
                      int t, int rows, float *xa, float *xf) {
    int rank = table[2 * slot + 1];
    if (rank == 0) return;
    float scale = load1(scales[slot]);
    int64_t offset = table[2 * slot];
    const uint16_t *as = a + offset * in, *bs = b + offset * out;
    y += t * ldy;
    x += t * ldx;
    switch (rows) {
        case 4: block(y, ldy, x, ldx, xf, as, bs, in, out, rank, scale, xa, 4); break;
        case 3: block(y, ldy, x, ldx, xf, as, bs, in, out, rank, scale, xa, 3); break;
        case 2: block(y, ldy, x, ldx, xf, as, bs, in, out, rank, scale, xa, 2); break;
        case 1: block(y, ldy, x, ldx, xf, as, bs, in, out, rank, scale, xa, 1); break;
        default: break;
    }
}

/* 1 where this build's shrink uses AVX512-BF16 dot products, 0 for the widening fallback (for the startup log). */
int lora_bf16_uses_dpbf16(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

/* Returns 0, or -1 (and writes nothing) when an argument is out of range, as lora_add_runs_f32. */
int lora_add_runs_bf16(
    uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, int64_t n_tokens, int64_t in, int64_t out,
    const uint16_t *a, const uint16_t *b, int64_t n_entries, int64_t n_rows, const int32_t *table,
    const uint16_t *scales, const int32_t *runs, int64_t n_runs, int num_threads) {
    if (in < 1 || out < 1 || ldx < in || ldy < out || n_tokens < 0 || n_entries < 1) return -1;
    if (n_rows < 1 || n_runs < 0 || n_runs > (1 << 20)) return -1;
    int64_t n_blocks = 0;
    int max_rank = 0;
    for (int64_t i = 0; i < n_runs; i++) { /* everything the blocks index is checked before any is run */
        int64_t slot = runs[3 * i], start = runs[3 * i + 1], end = runs[3 * i + 2];
        if (slot < 0 || slot >= n_entries || start < 0 || end < start || end > n_tokens) return -1;
        int64_t offset = table[2 * slot], rank = table[2 * slot + 1];
        if (rank < 0 || rank > 1024 || (rank > 0 && (offset < 0 || offset + rank > n_rows))) return -1;
        if (rank > max_rank) max_rank = (int)rank;
        n_blocks += (end - start + 3) / 4;
    }
    if (n_blocks == 0 || max_rank == 0) return 0;
    int32_t *blocks = malloc(sizeof(int32_t) * 2 * n_blocks); /* (run, first row) of each block */
    if (blocks == NULL) return -1;
    for (int64_t i = 0, k = 0; i < n_runs; i++)
        for (int32_t t = runs[3 * i + 1]; t < runs[3 * i + 2]; t += 4, k++) {
            blocks[2 * k] = (int32_t)i;
            blocks[2 * k + 1] = t;
        }
    if (num_threads < 1 || n_blocks < 2) num_threads = 1;
#if defined(__AVX512BF16__)
    float *widened = NULL; /* dpbf16 reads x as stored */
#else
    /* Each thread's block rows of x widened to float32 (on the heap: in may be large for a thread's stack). */
    float *widened = malloc(sizeof(float) * 4 * in * num_threads);
    if (widened == NULL) {
        free(blocks);
        return -1;
    }
#endif
#pragma omp parallel num_threads(num_threads)
    {
        float xa[4 * max_rank]; /* one block's x @ A.T, scaled, float32 */
#if defined(_OPENMP) && !defined(__AVX512BF16__)
        float *xf = widened + 4 * in * omp_get_thread_num();
#else
        float *xf = widened;
#endif
#pragma omp for schedule(static)
        for (int64_t k = 0; k < n_blocks; k++) {
            const int32_t *run = runs + 3 * blocks[2 * k];
            int t = blocks[2 * k + 1], rows = run[2] - t < 4 ? run[2] - t : 4;
            run_block(y, ldy, x, ldx, in, out, a, b, table, scales, run[0], t, rows, xa, xf);
        }
    }
    free(widened);
    free(blocks);
    return 0;
}
