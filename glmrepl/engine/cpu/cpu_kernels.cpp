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

#ifdef GLMREPL_AVX2
// Groups of a fixed G columns (32, 64 or 128; the row a whole number of them). The
// activations come rounded to 16-bit integers with one float scale per group (quantize16
// below), so a group's products are integer multiply-adds, 16 at a time (vpmaddwd), exact
// in 32-bit lanes, and one conversion to float and one multiply-add by the group's two
// scales per group. Widening every weight to float and multiplying in float, as the per-row
// loops above do, took about four times the instructions a value: the int4 loop ran at a
// fifth of the memory's speed on Zen 3 (benchmarks/kernel_speed.py). The rounding of the
// activations, at most 1/65534 of the group's largest, is far below the weights' own
// (1/254 of theirs for int8, 1/14 for int4).
static inline __m256i words16(const int8_t* p) {  // 16 signed bytes -> 16 int16 lanes
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
}
static inline __m256i load16(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// The integer sum of one int8 group's products, in 8 lanes.
template <int G>
static inline __m256i int8_group(const int8_t* w, const int16_t* x) {
    __m256i sum = _mm256_madd_epi16(words16(w), load16(x));
    for (int k = 16; k < G; k += 16) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(words16(w + k), load16(x + k)));
    return sum;
}

// The same for an int4 group of G values (G / 2 bytes): a byte's high nibble meets the even
// activation, its low nibble the odd one (both sign-extended in 16-bit lanes).
template <int G>
static inline __m256i int4_group(const int8_t* w, const int16_t* even, const int16_t* odd) {
    __m256i sum = _mm256_setzero_si256();
    for (int k = 0; k < G / 2; k += 16) {
        const __m256i b = words16(w + k);
        const __m256i high = _mm256_srai_epi16(b, 4), low = _mm256_srai_epi16(_mm256_slli_epi16(b, 12), 12);
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_madd_epi16(high, load16(even + k)),
                                                     _mm256_madd_epi16(low, load16(odd + k))));
    }
    return sum;
}

static inline __m256 scaled(__m256i sum, const float* s, __m256 total) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_broadcast_ss(s), total);
}

// A row: two groups at a time into two float totals, so that consecutive groups do not wait
// on one another's multiply-add; s holds the weight scale times the activation scale of each
// group, and the row is a whole, even or odd, number of groups.
template <int G>
static float int8_groups(const int8_t* w, const int16_t* x, const float* s, int64_t n) {
    __m256 t0 = _mm256_setzero_ps(), t1 = t0;
    int64_t j = 0, g = 0;
    for (; j + 2 * G <= n; j += 2 * G, g += 2) {
        t0 = scaled(int8_group<G>(w + j, x + j), s + g, t0);
        t1 = scaled(int8_group<G>(w + j + G, x + j + G), s + g + 1, t1);
    }
    if (j < n) t0 = scaled(int8_group<G>(w + j, x + j), s + g, t0);
    return sum8(_mm256_add_ps(t0, t1));
}

// The int4 layout, n bytes a row, G values (G / 2 bytes) a group.
template <int G>
static float int4_groups(const int8_t* w, const int16_t* even, const int16_t* odd, const float* s, int64_t n) {
    const int64_t bytes = G / 2;
    __m256 t0 = _mm256_setzero_ps(), t1 = t0;
    int64_t j = 0, g = 0;
    for (; j + 2 * bytes <= n; j += 2 * bytes, g += 2) {
        t0 = scaled(int4_group<G>(w + j, even + j, odd + j), s + g, t0);
        t1 = scaled(int4_group<G>(w + j + bytes, even + j + bytes, odd + j + bytes), s + g + 1, t1);
    }
    if (j < n) t0 = scaled(int4_group<G>(w + j, even + j, odd + j), s + g, t0);
    return sum8(_mm256_add_ps(t0, t1));
}
#endif

// x[0..n) as 16-bit integers q and one scale a group of `group`: x ~ q * scale. The scale
// maps the group's largest magnitude to 32767; a group of zeros gets scale 0.
static void quantize16(const float* x, int64_t n, int64_t group, int16_t* q, float* scales) {
    for (int64_t start = 0, g = 0; start < n; start += group, g++) {
        const int64_t end = start + group < n ? start + group : n;
        float largest = 0.f;
        for (int64_t j = start; j < end; j++) largest = std::max(largest, std::fabs(x[j]));
        const float scale = largest / 32767.f, inverse = largest > 0.f ? 32767.f / largest : 0.f;
        for (int64_t j = start; j < end; j++) q[j] = (int16_t)std::lrintf(x[j] * inverse);
        scales[g] = scale;
    }
}

// Groups the fixed-size loops take: scales widened to float32 once per row, on the stack.
// A row of one group is the per-row layout of ChatGLM's releases (or a row too short to
// matter): it keeps its activations in float32, as the released kernels do, so that its
// logits stay within 1e-4 of theirs.
static const int64_t MAX_FAST_GROUPS = 4096;

static bool fast_groups(int64_t group, int64_t values) {
#ifdef GLMREPL_AVX2
    return (group == 32 || group == 64 || group == 128) && values % group == 0 &&
           values / group <= MAX_FAST_GROUPS;
#else
    (void)group;
    (void)values;
    return false;
#endif
}

// A row's scales as float32: eight float16 at a time where F16C has them (a scalar
// conversion per group cost about as much as the group's own products at 32 columns).
static void widen_scales(const void* scales, int s_type, int64_t count, float* out) {
    int64_t g = 0;
#if defined(GLMREPL_AVX2) && defined(__F16C__)
    if (s_type == F16)
        for (; g + 8 <= count; g += 8)
            _mm256_storeu_ps(out + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)scales + g))));
#endif
    for (; g < count; g++) out[g] = load_one(scales, s_type, g);
}

// A row's weight scales times the activations' scales, group by group.
static void both_scales(const void* scales, int s_type, const float* x_scales, int64_t count, float* out) {
    widen_scales(scales, s_type, count, out);
    for (int64_t g = 0; g < count; g++) out[g] *= x_scales[g];
}

static bool known(int type);

// y = dequantized weight @ x for one token. w int8 [rows, cols]; scale [rows, groups] of
// s_type, groups = ceil(cols / group); x and y of x_type. Returns 0, or 1 for a type this
// build cannot read (the caller uses torch instead).
extern "C" int int8_gemv(const int8_t* w, const void* x, int x_type, const void* scale, int s_type, void* y,
                         int64_t rows, int64_t cols, int64_t group, int64_t threads) {
    if (!known(x_type) || !known(s_type) || group < 1) return 1;
    const int64_t groups = (cols + group - 1) / group;
    std::vector<float> vector(cols);
    for (int64_t j = 0; j < cols; j++) vector[j] = load_one(x, x_type, j);
    const int64_t s_size = s_type == F32 ? 4 : 2;
    const bool fast = groups > 1 && fast_groups(group, cols);
    std::vector<int16_t> rounded(fast ? cols : 0);
    std::vector<float> x_scales(fast ? groups : 0);
    if (fast) quantize16(vector.data(), cols, group, rounded.data(), x_scales.data());
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const void* row_scales = (const char*)scale + r * groups * s_size;
        const int8_t* row = w + r * cols;
        float v;
#ifdef GLMREPL_AVX2
        if (fast) {
            float s[MAX_FAST_GROUPS];
            both_scales(row_scales, s_type, x_scales.data(), groups, s);
            const int16_t* q = rounded.data();
            v = group == 32 ? int8_groups<32>(row, q, s, cols)
                : group == 64 ? int8_groups<64>(row, q, s, cols)
                              : int8_groups<128>(row, q, s, cols);
        } else
#endif
            v = int8_row(row, vector.data(), row_scales, s_type, cols, group);
        store_one(y, x_type, r, v);
    }
    return 0;
}

// The int4 layout: w [rows, stored] holds 2 * stored values a row; group counts values
// (even, so that a byte's two values share a group). The split of x into its even and
// odd values is made here, once per call, so that the weight is never re-interleaved.
extern "C" int int4_gemv(const int8_t* w, const void* x, int x_type, const void* scale, int s_type, void* y,
                         int64_t rows, int64_t stored, int64_t group, int64_t threads) {
    if (!known(x_type) || !known(s_type) || group < 2 || group % 2) return 1;
    const int64_t group_bytes = group / 2, groups = (stored + group_bytes - 1) / group_bytes;
    const int64_t s_size = s_type == F32 ? 4 : 2;
    const bool fast = groups > 1 && fast_groups(group, 2 * stored);
    // The float split serves the per-row loop; the group loops read the 16-bit one below.
    std::vector<float> even(fast ? 0 : stored), odd(fast ? 0 : stored);
    for (int64_t j = 0; !fast && j < stored; j++) {
        even[j] = load_one(x, x_type, 2 * j);
        odd[j] = load_one(x, x_type, 2 * j + 1);
    }
    std::vector<int16_t> rounded(fast ? 2 * stored : 0), even16(fast ? stored : 0), odd16(fast ? stored : 0);
    std::vector<float> x_scales(fast ? groups : 0);
    if (fast) {
        std::vector<float> values(2 * stored);
        for (int64_t j = 0; j < 2 * stored; j++) values[j] = load_one(x, x_type, j);
        quantize16(values.data(), 2 * stored, group, rounded.data(), x_scales.data());
        for (int64_t j = 0; j < stored; j++) even16[j] = rounded[2 * j], odd16[j] = rounded[2 * j + 1];
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * stored * 2 >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const void* row_scales = (const char*)scale + r * groups * s_size;
        const int8_t* row = w + r * stored;
        float v;
#ifdef GLMREPL_AVX2
        if (fast) {
            float s[MAX_FAST_GROUPS];
            both_scales(row_scales, s_type, x_scales.data(), groups, s);
            const int16_t *e = even16.data(), *o = odd16.data();
            v = group == 32 ? int4_groups<32>(row, e, o, s, stored)
                : group == 64 ? int4_groups<64>(row, e, o, s, stored)
                              : int4_groups<128>(row, e, o, s, stored);
        } else
#endif
            v = int4_row(row, even.data(), odd.data(), row_scales, s_type, stored, group_bytes);
        store_one(y, x_type, r, v);
    }
    return 0;
}

// The float kernels (float_gemv, float_gemm) follow in float_kernels.cpp.
