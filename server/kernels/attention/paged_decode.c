/* Paged decode attention on the CPU: one query token per sequence, keys read through block tables.
 *
 *   for each row r, query head h (kv head kh = h / (heads / kv_heads)):
 *       keys j < ctx[r] live at pool[tables[r, j / bs], j % bs, kh, :]
 *       out[r, h] = softmax_j(scale * q[r, h] . K[j]) @ V[j]
 *
 *   out, q: [n, heads, D] contiguous      k_pool, v_pool: [num_blocks, bs, kv_heads, D] contiguous (one layer)
 *   tables: [n, table_stride] int32       ctx: [n] int32 (1 <= ctx[r] <= table_stride * bs)
 *
 * Two entry points share one body: paged_decode_f32 (float32 storage) and paged_decode_bf16 (bfloat16 storage as
 * uint16 bit patterns, widened to float32 on load; all sums and the softmax in float32; out rounded to nearest even).
 *
 * Why it exists: the torch path must first gather every sequence's blocks into a contiguous copy (the pool is
 * shared, so a row's keys are not one view any more), then pay a few matmul/softmax dispatches per layer. Here each
 * (row, kv head) job streams its blocks once, straight from the pool, for all the query heads that share that kv
 * head (GQA: K/V are read once per group, never expanded). Online softmax, one rescale per block, float32 sums.
 *
 * Portable C with GCC/Clang vector extensions, compiled with -march=native (see lora_runs.c for the widths).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
typedef float vf_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(4)));
typedef uint16_t vh_unaligned __attribute__((vector_size(W * sizeof(uint16_t)), aligned(2)));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

#define MAX_BLOCK 256   /* positions per block */
#define MAX_GROUP_DIM 8192 /* query heads per kv head x head dim: the job's accumulator, on the stack */
/* Every routine that reads storage takes `bf` (0: float32, 1: bfloat16) and is always inlined with it a literal,
 * so each storage type gets its own branch-free copy of the loops. */
#define INLINE static inline __attribute__((always_inline))

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf v) { *(vf_unaligned *)p = v; }

/* W elements of storage from element i, as float32: a bfloat16 is the top half of the float32 with its value. */
INLINE vf loadv(const void *p, int64_t i, int bf) {
    if (!bf) return load((const float *)p + i);
    return (vf)(__builtin_convertvector(*(const vh_unaligned *)((const uint16_t *)p + i), vu) << 16);
}

INLINE float load1(const void *p, int64_t i, int bf) {
    if (!bf) return ((const float *)p)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* float32 -> bfloat16 bits rounded to nearest even, as torch converts (c10's round_to_nearest_even: NaN -> 0x7FC0,
 * overflow -> inf). */
static inline uint16_t to_bf16(float x) {
    if (x != x) return 0x7FC0;
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static inline float hsum(vf v) {
#if W == 16
    vf8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf8 h = v;
#endif
    vf4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* q . k[ko : ko + n] */
INLINE float dot(const float *q, const void *k, int64_t ko, int64_t n, int bf) {
    vf acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
        acc0 += load(q + i) * loadv(k, ko + i, bf);
        acc1 += load(q + i + W) * loadv(k, ko + i + W, bf);
    }
    for (; i + W <= n; i += W) acc0 += load(q + i) * loadv(k, ko + i, bf);
    float s = hsum(acc0 + acc1);
    for (; i < n; i++) s += q[i] * load1(k, ko + i, bf);
    return s;
}

/* exp(x) for x <= 0 (scores minus their running max), W lanes at once: Cephes' expf, 2^n * e^f with |f| <= ln2/2,
 * to about 1 ulp. Libm's scalar expf per score would cost as much as the dot products at head dim 64. */
static inline vf vexp(vf x) {
    const vf lo = (vf){0} - 87.0f;
    vi below = x < lo;
    x = (vf)(((vi)x & ~below) | ((vi)lo & below));
    vf fx = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(fx, vi);
    vf tf = __builtin_convertvector(n, vf);
    n += (vi)(tf > fx); /* truncation rounded a negative value up: floor is one less (the mask is -1) */
    tf = __builtin_convertvector(n, vf);
    x = x - tf * 0.693359375f + tf * 2.12194440e-4f;
    vf y = 1.9875691500e-4f * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    vi e = (n + 127) << 23;
    return y * (vf)e;
}

/* s[j] = scale * q . k_j for 4 keys at once (q's chunks loaded once for all four), k_j = k[ko + j * stride :]. */
INLINE void scores4(const float *q, const void *k, int64_t ko, int64_t stride, int64_t dim, float scale, float *s,
                    int bf) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t d = 0;
    for (; d + W <= dim; d += W) {
        const vf qv = load(q + d);
        a0 += qv * loadv(k, ko + d, bf);
        a1 += qv * loadv(k, ko + stride + d, bf);
        a2 += qv * loadv(k, ko + 2 * stride + d, bf);
        a3 += qv * loadv(k, ko + 3 * stride + d, bf);
    }
    float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (; d < dim; d++)
        for (int j = 0; j < 4; j++) r[j] += q[d] * load1(k, ko + j * stride + d, bf);
    for (int j = 0; j < 4; j++) s[j] = scale * r[j];
}

/* a[:dim] = a[:dim] * fix + sum_j p[j] * v_j[:dim] over n keys (v_j = v[vo + j * stride :]), in registers. */
INLINE void accumulate(float *a, float fix, const float *p, const void *v, int64_t vo, int64_t stride, int64_t n,
                       int64_t dim, int bf) {
    int64_t d = 0;
    for (; d + 2 * W <= dim; d += 2 * W) {
        vf a0 = load(a + d) * fix, a1 = load(a + d + W) * fix;
        for (int64_t j = 0; j < n; j++) {
            a0 += p[j] * loadv(v, vo + j * stride + d, bf);
            a1 += p[j] * loadv(v, vo + j * stride + d + W, bf);
        }
        store(a + d, a0);
        store(a + d + W, a1);
    }
    for (; d + W <= dim; d += W) {
        vf a0 = load(a + d) * fix;
        for (int64_t j = 0; j < n; j++) a0 += p[j] * loadv(v, vo + j * stride + d, bf);
        store(a + d, a0);
    }
    for (; d < dim; d++) {
        float x = a[d] * fix;
        for (int64_t j = 0; j < n; j++) x += p[j] * load1(v, vo + j * stride + d, bf);
        a[d] = x;
    }
}

/* One (row, kv head): the `group` query heads that share it (q and out from element qo), over the row's ctx keys,
 * one block at a time. */
INLINE void attend(
    void *out, const void *q, int64_t qo, const void *k_pool, const void *v_pool, const int32_t *table, int64_t ctx,
    int64_t kv_heads, int64_t kh, int64_t group, int64_t dim, int64_t bs, float scale, int bf) {
    float acc[MAX_GROUP_DIM]; /* [group, dim] */
    float m[group], l[group];
    const int64_t padded = (bs + 3) / 4 * 4 + W; /* room for whole groups of 4 keys and whole vectors */
    float s[padded];
    float q_wide[bf ? group * dim : 1]; /* a bfloat16 query, widened once for all keys */
    const float *qf = bf ? q_wide : (const float *)q + qo;
    for (int64_t i = 0; bf && i < group * dim; i++) q_wide[i] = load1(q, qo + i, bf);
    for (int64_t i = 0; i < group * dim; i++) acc[i] = 0.0f;
    for (int64_t g = 0; g < group; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const int64_t key_stride = kv_heads * dim, block_stride = bs * key_stride;
    const int64_t size = bf ? (int64_t)sizeof(uint16_t) : (int64_t)sizeof(float); /* bytes per element */
    for (int64_t start = 0, b = 0; start < ctx; start += bs, b++) {
        const int64_t valid = ctx - start < bs ? ctx - start : bs;
        const int64_t kb = (int64_t)table[b] * block_stride + kh * dim; /* this block's first key, in elements */
        if (start + bs < ctx) { /* blocks are scattered: the hardware prefetcher cannot guess the next one */
            const int64_t next = (int64_t)table[b + 1] * block_stride + kh * dim;
            for (int64_t j = 0; j < bs; j++)
                for (int64_t d = 0; d < dim; d += 64 / size) { /* one cache line */
                    __builtin_prefetch((const char *)k_pool + (next + j * key_stride + d) * size);
                    __builtin_prefetch((const char *)v_pool + (next + j * key_stride + d) * size);
                }
        }
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qf + g * dim;
            int64_t j = 0;
            for (; j + 4 <= valid; j += 4) scores4(qg, k_pool, kb + j * key_stride, key_stride, dim, scale, s + j, bf);
            for (; j < valid; j++) s[j] = scale * dot(qg, k_pool, kb + j * key_stride, dim, bf);
            float top = m[g];
            for (j = 0; j < valid; j++) top = s[j] > top ? s[j] : top;
            const float fix = expf(m[g] - top); /* 0 on the first block (m = -inf) */
            m[g] = top;
            vf sum = {0};
            const vf topv = (vf){0} + top;
            for (j = 0; j < valid; j += W) {
                vf p = vexp(load(s + j) - topv);
                for (int64_t lane = valid - j; lane < W; lane++) p[lane] = 0.0f; /* past the last key */
                store(s + j, p);
                sum += p;
            }
            l[g] = l[g] * fix + hsum(sum);
            accumulate(acc + g * dim, fix, s, v_pool, kb, key_stride, valid, dim, bf);
        }
    }
    for (int64_t g = 0; g < group; g++) {
        const float inv = 1.0f / l[g];
        for (int64_t d = 0; d < dim; d++) {
            const float x = acc[g * dim + d] * inv;
            if (bf)
                ((uint16_t *)out)[qo + g * dim + d] = to_bf16(x);
            else
                ((float *)out)[qo + g * dim + d] = x;
        }
    }
}

/* Returns 0, or -1 (and writes nothing) when an argument is out of range: a block id past num_blocks, a context
 * past the table, a shape the stack buffers cannot hold. Jobs are (row, kv head), shared out among num_threads
 * OpenMP threads (torch's own pool when built with torch's libgomp); each writes its own heads of out. */
static int paged_decode(
    void *out, const void *q, const void *k_pool, const void *v_pool, const int32_t *tables, int64_t table_stride,
    const int32_t *ctx, int64_t n_rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t bs, int64_t num_blocks,
    float scale, int num_threads, int bf) {
    if (n_rows < 0 || kv_heads < 1 || heads < kv_heads || heads % kv_heads != 0 || dim < 1) return -1;
    if (bs < 1 || bs > MAX_BLOCK || num_blocks < 1 || table_stride < 1) return -1;
    const int64_t group = heads / kv_heads;
    if (group * dim > MAX_GROUP_DIM) return -1;
    for (int64_t r = 0; r < n_rows; r++) { /* everything the jobs index is checked before any runs */
        if (ctx[r] < 1 || ctx[r] > table_stride * bs) return -1;
        for (int64_t b = 0; b < (ctx[r] + bs - 1) / bs; b++)
            if (tables[r * table_stride + b] < 0 || tables[r * table_stride + b] >= num_blocks) return -1;
    }
    const int64_t jobs = n_rows * kv_heads;
    if (num_threads < 1 || jobs < 2) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t job = 0; job < jobs; job++) {
        const int64_t r = job / kv_heads, kh = job % kv_heads, qo = (r * heads + kh * group) * dim;
        const int32_t *table = tables + r * table_stride;
        if (bf) /* a literal in each call: two specialised copies of the job */
            attend(out, q, qo, k_pool, v_pool, table, ctx[r], kv_heads, kh, group, dim, bs, scale, 1);
        else
            attend(out, q, qo, k_pool, v_pool, table, ctx[r], kv_heads, kh, group, dim, bs, scale, 0);
    }
    return 0;
}

int paged_decode_f32(
    float *out, const float *q, const float *k_pool, const float *v_pool, const int32_t *tables,
    int64_t table_stride, const int32_t *ctx, int64_t n_rows, int64_t heads, int64_t kv_heads, int64_t dim,
    int64_t bs, int64_t num_blocks, float scale, int num_threads) {
    return paged_decode(out, q, k_pool, v_pool, tables, table_stride, ctx, n_rows, heads, kv_heads, dim, bs,
                        num_blocks, scale, num_threads, 0);
}

int paged_decode_bf16(
    uint16_t *out, const uint16_t *q, const uint16_t *k_pool, const uint16_t *v_pool, const int32_t *tables,
    int64_t table_stride, const int32_t *ctx, int64_t n_rows, int64_t heads, int64_t kv_heads, int64_t dim,
    int64_t bs, int64_t num_blocks, float scale, int num_threads) {
    return paged_decode(out, q, k_pool, v_pool, tables, table_stride, ctx, n_rows, heads, kv_heads, dim, bs,
                        num_blocks, scale, num_threads, 1);
}
