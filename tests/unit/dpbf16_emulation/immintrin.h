/* A stand-in for <immintrin.h> that emulates, in plain C, the few AVX512-BF16 intrinsics lora_runs_bf16.c uses, so
 * its dpbf16 path can be compiled (with -D__AVX512BF16__ -I<this folder>) and tested on a CPU without the
 * instructions (tests/unit/test_native_bf16_dpbf16.py). Semantics as Intel documents them: VDPBF16PS adds to each
 * float32 lane i the products of the bfloat16 pairs 2i and 2i+1 (the emulation sums in float32; the hardware
 * flushes denormals, which the tests' values never produce). */
#include <stdint.h>
#include <string.h>

typedef float __m512 __attribute__((vector_size(64)));
typedef long long __m512i __attribute__((vector_size(64)));
typedef short __m512bh __attribute__((vector_size(64)));
typedef uint32_t __mmask32;

static inline __m512 _mm512_setzero_ps(void) { return (__m512){0}; }

static inline __m512i _mm512_maskz_loadu_epi16(__mmask32 m, const void *p) {
    uint16_t h[32];
    for (int i = 0; i < 32; i++) h[i] = (m >> i) & 1u ? ((const uint16_t *)p)[i] : 0; /* masked lanes: not read */
    __m512i r;
    memcpy(&r, h, sizeof r);
    return r;
}

static inline float emu_bf16_to_f32(short h) {
    uint32_t u = (uint32_t)(uint16_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __m512 _mm512_dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
    for (int i = 0; i < 16; i++)
        acc[i] += emu_bf16_to_f32(a[2 * i]) * emu_bf16_to_f32(b[2 * i]) +
                  emu_bf16_to_f32(a[2 * i + 1]) * emu_bf16_to_f32(b[2 * i + 1]);
    return acc;
}

static inline float _mm512_reduce_add_ps(__m512 v) {
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}
