/* The VQ decode in C (vqdm/kernels/cpu_native.py builds and loads it; the format: vqdm/vq_format.py).
 *
 *   out[i, 8j : 8j+8] = scales[i] * sum_m table[m, codes[i, j, m], :]
 *
 * codes [n, groups, k] uint8, table [k, cb_size, 8] fp32, scales [n] fp32, out [n, 8*groups] fp32 or
 * bf16 (rounded to nearest even once, from the fp32 sum, as torch's .to(bfloat16) rounds).
 * One group of 8 weights is one 256-bit vector: k loads, k-1 adds, a multiply and a store, with no
 * index tensor, offset pass or second scaling pass in between (what the embedding_bag decode pays).
 * Rows are split over OpenMP threads; libgomp resolves to the copy torch already loaded (same
 * soname), so both share one thread pool.
 *
 * stream != 0 writes with non-temporal stores (out must then be 32-byte aligned): for a weight much
 * bigger than the caches the GEMM reads it back from DRAM anyway, and streaming skips reading every
 * output line into the cache before overwriting it (cpu_native.STREAM_MIN_BYTES: when).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }

static inline v8f group_sum(const float *table, const uint8_t *c, int k, int64_t cb_size) {
    v8f acc = load8(table + (int64_t)c[0] * 8);
    for (int m = 1; m < k; ++m) acc += load8(table + ((int64_t)m * cb_size + c[m]) * 8);
    return acc;
}

#define DECODE_ROWS(K, STORE)                                                            \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                   \
    for (int64_t i = 0; i < n; ++i) {                                                    \
        const uint8_t *c = codes + i * groups * (K);                                     \
        const float si = scales[i];                                                      \
        for (int64_t j = 0; j < groups; ++j, c += (K)) {                                 \
            v8f w = group_sum(table, c, (K), cb_size) * si;                              \
            STORE                                                                        \
        }                                                                                \
    }

#define DISPATCH(STORE)                                      \
    switch (k) {                                             \
    case 2: DECODE_ROWS(2, STORE) break;                     \
    case 3: DECODE_ROWS(3, STORE) break;                     \
    case 4: DECODE_ROWS(4, STORE) break;                     \
    default: DECODE_ROWS(k, STORE) break;                    \
    }

#if defined(__AVX__)
#define STORE_F32(p, w) do { if (stream) _mm256_stream_ps((p), (__m256)(w)); else memcpy((p), &(w), 32); } while (0)
#define STORE_BF16(p, h) do { if (stream) _mm_stream_si128((__m128i *)(p), (__m128i)(h)); else memcpy((p), &(h), 16); } while (0)
#define FENCE() do { if (stream) _mm_sfence(); } while (0)
#else
#define STORE_F32(p, w) memcpy((p), &(w), 32)
#define STORE_BF16(p, h) memcpy((p), &(h), 16)
#define FENCE() do { } while (0)
#endif

void vq_decode_f32(const uint8_t *codes, const float *table, const float *scales, float *out,
                   int64_t n, int64_t groups, int64_t k, int64_t cb_size, int nthreads, int stream) {
    DISPATCH(STORE_F32(out + (i * groups + j) * 8, w);)
    FENCE();
}

void vq_decode_bf16(const uint8_t *codes, const float *table, const float *scales, uint16_t *out,
                    int64_t n, int64_t groups, int64_t k, int64_t cb_size, int nthreads, int stream) {
    DISPATCH(v8u u; memcpy(&u, &w, sizeof u); u = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
             v8h h = __builtin_convertvector(u, v8h); STORE_BF16(out + (i * groups + j) * 8, h);)
    FENCE();
}
