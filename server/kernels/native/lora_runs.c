/* The batched LoRA add for float32 on the CPU, every run of one wrapped linear in one call.
 *
 *   for each run (slot, start, end), for t in [start, end), with (o, r) = table[slot]:
 *       y[t, :] += scales[slot] * (x[t, :] @ a[o : o + r, :].T) @ b[o : o + r, :]
 *
 *   y: [T, out] row stride ldy     x: [T, in] row stride ldx       (T = n_tokens)
 *   a: [N, in] contiguous          b: [N, out] contiguous          (the adapter pool: N = n_rows rank rows)
 *   table: [S+1, 2] int32 (offset, rank) of each slot's rows in the pool (S+1 = n_entries)
 *   scales: [S+1] float32          runs: [n_runs, 3] int32 (slot, start, end)
 *
 * Why it exists: on CPU the per-run torch matmuls are tiny GEMMs ([rows, in] x [in, 16], [rows, 16] x [16, out])
 * whose cost is dispatch, not arithmetic; one call per linear does all runs without leaving C. Rows are taken in
 * blocks of four: the block's x @ A.T goes into a small buffer (already scaled), then is expanded into y at once,
 * so A and B are read once per block from cache and y is written once per block.
 *
 * Portable C with GCC/Clang vector extensions: compiled with -march=native, a 16-float vector is one AVX-512
 * register, two AVX2 registers, or four NEON registers. Summation order differs from a GEMM library's, so results
 * match a reference to float32 rounding, not bit for bit.
 */
#include <stdint.h>
#include <stdlib.h>

/* The vector width follows the target's registers: the 4x4 block of accumulators below must fit in them (16
 * AVX-512 registers of 16 floats; with 16-float vectors on AVX2 each takes two of its 16 registers and the block
 * spills to the stack, measured 5-10x slower than the torch op there). */
#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef float vf_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(4)));

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf v) { *(vf_unaligned *)p = v; }

typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

/* Tree sum of the W lanes (a lane-by-lane loop would be W dependent scalar adds per dot product). */
static inline float hsum(vf v) {
#if W == 16
    vf8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf8 h = v;
#endif
    vf4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* xa[t * rank + j] = scale * dot(x[t], a[j]) for the TB rows of the block and the ranks j0 .. j0+JB. */
static inline __attribute__((always_inline)) void shrink_block(
    const float *x, int64_t ldx, const float *a, int64_t in, int j0, float scale, float *xa, int rank,
    const int TB, const int JB) {
    vf acc[4][4] = {{{0}}};
    int64_t k = 0;
    for (; k + W <= in; k += W) {
        vf xv[4], av[4];
        for (int t = 0; t < TB; t++) xv[t] = load(x + t * ldx + k);
        for (int j = 0; j < JB; j++) av[j] = load(a + (j0 + j) * in + k);
        for (int t = 0; t < TB; t++)
            for (int j = 0; j < JB; j++) acc[t][j] += xv[t] * av[j];
    }
    for (int t = 0; t < TB; t++) {
        for (int j = 0; j < JB; j++) {
            float s = hsum(acc[t][j]);
            for (int64_t kk = k; kk < in; kk++) s += x[t * ldx + kk] * a[(j0 + j) * in + kk];
            xa[t * rank + j0 + j] = scale * s;
        }
    }
}

static inline __attribute__((always_inline)) void shrink_rows(
    const float *x, int64_t ldx, const float *a, int64_t in, int rank, float scale, float *xa, const int TB) {
    int j0 = 0;
    for (; j0 + 4 <= rank; j0 += 4) shrink_block(x, ldx, a, in, j0, scale, xa, rank, TB, 4);
    for (; j0 < rank; j0++) shrink_block(x, ldx, a, in, j0, scale, xa, rank, TB, 1);
}

/* y[t] += xa[t] @ b for the TB rows of the block: 2 vectors of output columns per pass, accumulated in registers. */
static inline __attribute__((always_inline)) void expand_rows(
    float *y, int64_t ldy, const float *xa, int rank, const float *b, int64_t out, const int TB) {
    int64_t o = 0;
    for (; o + 2 * W <= out; o += 2 * W) {
        vf acc[4][2];
        for (int t = 0; t < TB; t++) {
            acc[t][0] = load(y + t * ldy + o);
            acc[t][1] = load(y + t * ldy + o + W);
        }
        for (int j = 0; j < rank; j++) {
            vf b0 = load(b + j * out + o), b1 = load(b + j * out + o + W);
            for (int t = 0; t < TB; t++) {
                float c = xa[t * rank + j];
                acc[t][0] += c * b0;
                acc[t][1] += c * b1;
            }
        }
        for (int t = 0; t < TB; t++) {
            store(y + t * ldy + o, acc[t][0]);
            store(y + t * ldy + o + W, acc[t][1]);
        }
    }
    for (; o < out; o++) {
        for (int t = 0; t < TB; t++) {
            float s = 0.0f;
            for (int j = 0; j < rank; j++) s += xa[t * rank + j] * b[j * out + o];
            y[t * ldy + o] += s;
        }
    }
}

static inline __attribute__((always_inline)) void block(
    float *y, int64_t ldy, const float *x, int64_t ldx, const float *a, const float *b, int64_t in, int64_t out,
    int rank, float scale, float *xa, const int TB) {
    shrink_rows(x, ldx, a, in, rank, scale, xa, TB);
    expand_rows(y, ldy, xa, rank, b, out, TB);
}

/* One block of up to four rows of one run (arguments already checked). */
static void run_block(
    float *y, int64_t ldy, const float *x, int64_t ldx, int64_t in, int64_t out, const float *a, const float *b,
    const int32_t *table, const float *scales, int slot, int t, int rows, float *xa) {
    int rank = table[2 * slot + 1];
    if (rank == 0) return;
    float scale = scales[slot];
    int64_t offset = table[2 * slot];
    const float *as = a + offset * in, *bs = b + offset * out;
    y += t * ldy;
    x += t * ldx;
    switch (rows) {
        case 4: block(y, ldy, x, ldx, as, bs, in, out, rank, scale, xa, 4); break;
        case 3: block(y, ldy, x, ldx, as, bs, in, out, rank, scale, xa, 3); break;
        case 2: block(y, ldy, x, ldx, as, bs, in, out, rank, scale, xa, 2); break;
        case 1: block(y, ldy, x, ldx, as, bs, in, out, rank, scale, xa, 1); break;
        default: break;
    }
}

/* Returns 0, or -1 (and writes nothing) when an argument is out of range: a slot past ``n_entries``, a run past
 * ``n_tokens``, a used slot's rows outside the pool's ``n_rows`` or a rank above 1024.
 * Blocks of four rows are independent (each writes its own rows of y), so with OpenMP they are shared out among
 * ``num_threads`` threads; built with torch's bundled libgomp, that is torch's own thread pool.
 * The argument types are declared in build.py (ctypes): the pool's n_rows and the slot table take the places of the
 * stacked layout's max_rank and rank table, with the same types. */
int lora_add_runs_f32(
    float *y, int64_t ldy, const float *x, int64_t ldx, int64_t n_tokens, int64_t in, int64_t out,
    const float *a, const float *b, int64_t n_entries, int64_t n_rows, const int32_t *table, const float *scales,
    const int32_t *runs, int64_t n_runs, int num_threads) {
    if (in < 1 || out < 1 || ldx < in || ldy < out || n_tokens < 0 || n_entries < 1) return -1;
    if (n_rows < 1 || n_runs < 0 || n_runs > (1 << 20)) return -1;
    int64_t n_blocks = 0;
    int max_rank = 0; /* of the slots these runs use: the size of each thread's block buffer */
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
#pragma omp parallel num_threads(num_threads)
    {
        float xa[4 * max_rank]; /* one block's x @ A.T, scaled */
#pragma omp for schedule(static)
        for (int64_t k = 0; k < n_blocks; k++) {
            const int32_t *run = runs + 3 * blocks[2 * k];
            int t = blocks[2 * k + 1], rows = run[2] - t < 4 ? run[2] - t : 4;
            run_block(y, ldy, x, ldx, in, out, a, b, table, scales, run[0], t, rows, xa);
        }
    }
    free(blocks);
    return 0;
}
