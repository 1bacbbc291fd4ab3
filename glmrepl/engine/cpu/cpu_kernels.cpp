// Matrix-vector kernels for decoding one token (and a few at once) on the CPU; see cpu_kernels.py.
//
// One token multiplies every weight by one activation vector, so decoding is
// bound by reading the weights: each kernel reads its weight once, widens it to
// float32 in registers and accumulates with four independent accumulators (the
// additions do not wait on each other). The activation vector is small and is
// read from cache for every row.
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
// Products smaller than this many multiply-adds run on the calling thread alone: waking the
// other threads costs more than it saves, and the woken threads spin-wait afterwards, taking
// cores from everything else on the machine (the chat, the terminal) for no gain.
static const int64_t PARALLEL_WORK = 1 << 16;

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GLMREPL_AVX2 1
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
static inline __m256 bytes8(const int8_t* p) {  // 8 signed bytes -> 8 int32 lanes, as float
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#endif

// ---- float32 / bfloat16 / float16 weights -----------------------------------

enum Type { F32 = 0, BF16 = 1, F16 = 2 };  // the codes cpu_kernels.py passes

static inline float from_bf16(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float load_one(const void* p, int type, int64_t i) {
    switch (type) {
        case BF16: return from_bf16(((const uint16_t*)p)[i]);
#ifdef __F16C__
        case F16: return _cvtsh_ss(((const uint16_t*)p)[i]);
#endif
        default: return ((const float*)p)[i];
    }
}

static inline void store_one(void* p, int type, int64_t i, float v) {
    switch (type) {
        case BF16: ((uint16_t*)p)[i] = to_bf16(v); break;
#ifdef __F16C__
        case F16: ((uint16_t*)p)[i] = _cvtss_sh(v, 0); break;  // 0: round to nearest even
#endif
        default: ((float*)p)[i] = v;
    }
}

// ---- int8 / int4 (glmrepl.engine.quant's layout) ---------------------------
//
// Each row's scales are one per group of `group` input columns (the last group may be
// shorter); the per-row layout of ChatGLM's releases is one group as wide as the row.
// Within a group the products are summed in 8 float lanes, then the lanes are scaled
// once: one extra multiply-add per group rather than a multiply per weight, and no
// horizontal sum until the row's end.

#ifdef GLMREPL_AVX2
// The products of w[j..end) and x[j..end) in 8 lanes, 32 at a time; j is left at the tail.
static inline __m256 int8_span(const int8_t* w, const float* x, int64_t& j, int64_t end) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 32 <= end; j += 32) {
        a0 = _mm256_fmadd_ps(bytes8(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(bytes8(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(bytes8(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(bytes8(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
    return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}

// The same for packed int4 bytes w[j..end): high nibbles times even, low nibbles times odd.
static inline __m256 int4_span(const int8_t* w, const float* even, const float* odd, int64_t& j, int64_t end) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 16 <= end; j += 16) {
        __m256i b0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + j)));
        __m256i b1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + j + 8)));
        // Sign-extended bytes: >> 4 is the high nibble, << 28 >> 28 the low one, both signed.
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(b0, 4)), _mm256_loadu_ps(even + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b0, 28), 28)),
                             _mm256_loadu_ps(odd + j), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(b1, 4)), _mm256_loadu_ps(even + j + 8), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b1, 28), 28)),
                             _mm256_loadu_ps(odd + j + 8), a3);
    }
    return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}
#endif

// One row: n values in groups of `group`, scales[g] of s_type for group g.
static float int8_row(const int8_t* w, const float* x, const void* scales, int s_type, int64_t n, int64_t group) {
    float acc = 0.f;
#ifdef GLMREPL_AVX2
    __m256 total = _mm256_setzero_ps();
#endif
    for (int64_t g = 0, start = 0; start < n; g++, start += group) {
        const int64_t end = start + group < n ? start + group : n;
        const float s = load_one(scales, s_type, g);
        int64_t j = start;
#ifdef GLMREPL_AVX2
        total = _mm256_fmadd_ps(int8_span(w, x, j, end), _mm256_set1_ps(s), total);
#endif
        float rest = 0.f;
        for (; j < end; j++) rest += (float)w[j] * x[j];
        acc += rest * s;
    }
#ifdef GLMREPL_AVX2
    acc += sum8(total);
#endif
    return acc;
}

// One int4 row: n packed bytes (2n values), groups of `group_bytes` bytes.
static float int4_row(const int8_t* w, const float* even, const float* odd, const void* scales, int s_type,
                      int64_t n, int64_t group_bytes) {
    float acc = 0.f;
#ifdef GLMREPL_AVX2
    __m256 total = _mm256_setzero_ps();
#endif
    for (int64_t g = 0, start = 0; start < n; g++, start += group_bytes) {
        const int64_t end = start + group_bytes < n ? start + group_bytes : n;
        const float s = load_one(scales, s_type, g);
        int64_t j = start;
#ifdef GLMREPL_AVX2
        total = _mm256_fmadd_ps(int4_span(w, even, odd, j, end), _mm256_set1_ps(s), total);
#endif
        float rest = 0.f;
        for (; j < end; j++) {
            int8_t b = w[j];
            rest += (float)(b >> 4) * even[j] + (float)((int8_t)(b << 4) >> 4) * odd[j];
        }
        acc += rest * s;
    }
#ifdef GLMREPL_AVX2
    acc += sum8(total);
#endif
    return acc;
}

// The integer loops (int8_gemv, int4_gemv) follow in int_kernels.cpp, the float kernels
// (float_gemv, float_gemm) in float_kernels.cpp.
