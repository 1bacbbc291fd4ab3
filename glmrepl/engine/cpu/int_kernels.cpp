// int8 / int4 weights times one activation vector in integers; follows cpu_kernels.cpp (its
// types, load_one/store_one, the per-row float loops and PARALLEL_WORK).
//
// The activations are rounded to 16-bit integers in blocks of A values (32, 64 or 128), one
// float scale a block (quantize16), so a block's products are integer multiply-adds, exact
// in 32-bit lanes, then one conversion to float and one multiply-add by the block's scale:
// the weight's scale for the block times the activations'. A block is the weight's group
// when the group is 32, 64 or 128 columns; for one scale a row (ChatGLM's releases) it is
// the widest of those that divides the row. Widening every weight to float and multiplying
// in float, as the per-row loops do, took about four times the instructions a value.
//
// 16-bit rather than 8-bit activations (as llama.cpp's Q8_0 blocks): each value is off by at
// most 1/65534 of its block's largest, far below the weights' own rounding (1/254 of theirs
// for int8, 1/14 for int4), so the logits stay within 1e-4 of the released float kernels';
// and with AVX-512 the 16-bit products already outrun the memory's speed.

#ifdef GLMREPL_AVX2
// Each pass asks for the weight bytes AHEAD of those it multiplies (software prefetch, which
// crosses into the next rows): without it the loops waited on the memory at every row's
// start and read about half as fast as the float32 loop (benchmarks/kernel_speed.py --int).
static const int64_t AHEAD = 2048;
static inline void ask_ahead(const int8_t* p, int64_t bytes) {
    for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch((const char*)p + AHEAD + k, _MM_HINT_T0);
}

static inline __m256i words16(const int8_t* p) {  // 16 signed bytes -> 16 int16 lanes
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
}
static inline __m256i load16(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

// The integer sum of one int8 block's products, in 8 lanes.
template <int A>
static inline __m256i int8_block(const int8_t* w, const int16_t* x) {
    __m256i sum = _mm256_madd_epi16(words16(w), load16(x));
    for (int k = 16; k < A; k += 16) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(words16(w + k), load16(x + k)));
    return sum;
}

// The same for an int4 block of A values (A / 2 bytes): a byte's high nibble meets the even
// activation, its low nibble the odd one (both sign-extended in 16-bit lanes).
template <int A>
static inline __m256i int4_block(const int8_t* w, const int16_t* even, const int16_t* odd) {
    __m256i sum = _mm256_setzero_si256();
    for (int k = 0; k < A / 2; k += 16) {
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

// A row: two blocks at a time into two float totals, so that consecutive blocks do not wait
// on one another's multiply-add; s holds each block's scale, and the row is a whole, even or
// odd, number of blocks.
template <int A>
static float int8_blocks(const int8_t* w, const int16_t* x, const float* s, int64_t n) {
    __m256 t0 = _mm256_setzero_ps(), t1 = t0;
    int64_t j = 0, b = 0;
    for (; j + 2 * A <= n; j += 2 * A, b += 2) {
        ask_ahead(w + j, 2 * A);
        t0 = scaled(int8_block<A>(w + j, x + j), s + b, t0);
        t1 = scaled(int8_block<A>(w + j + A, x + j + A), s + b + 1, t1);
    }
    if (j < n) t0 = scaled(int8_block<A>(w + j, x + j), s + b, t0);
    return sum8(_mm256_add_ps(t0, t1));
}

// The int4 layout, n bytes a row, A values (A / 2 bytes) a block.
template <int A>
static float int4_blocks(const int8_t* w, const int16_t* even, const int16_t* odd, const float* s, int64_t n) {
    const int64_t bytes = A / 2;
    __m256 t0 = _mm256_setzero_ps(), t1 = t0;
    int64_t j = 0, b = 0;
    for (; j + 2 * bytes <= n; j += 2 * bytes, b += 2) {
        ask_ahead(w + j, 2 * bytes);
        t0 = scaled(int4_block<A>(w + j, even + j, odd + j), s + b, t0);
        t1 = scaled(int4_block<A>(w + j + bytes, even + j + bytes, odd + j + bytes), s + b + 1, t1);
    }
    if (j < n) t0 = scaled(int4_block<A>(w + j, even + j, odd + j), s + b, t0);
    return sum8(_mm256_add_ps(t0, t1));
}
#endif

#if defined(GLMREPL_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define GLMREPL_INT512 1
// The same loops 32 16-bit lanes a register. With VNNI one instruction multiplies and adds
// into the 32-bit lanes (vpdpwssd); without, vpmaddwd and an addition. Each block sums into
// two registers, so that its multiply-adds do not all wait on one another.
static inline __m512i dot16(__m512i sum, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(sum, a, b);
#else
    return _mm512_add_epi32(sum, _mm512_madd_epi16(a, b));
#endif
}
static inline __m512i words32(const int8_t* p) {  // 32 signed bytes -> 32 int16 lanes
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p));
}
static inline __m512i load32(const int16_t* p) { return _mm512_loadu_si512((const void*)p); }

template <int A>  // A of 32, 64 or 128 values
static inline __m512i int8_block512(const int8_t* w, const int16_t* x) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0;
    int k = 0;
    for (; k + 64 <= A; k += 64) {
        s0 = dot16(s0, words32(w + k), load32(x + k));
        s1 = dot16(s1, words32(w + k + 32), load32(x + k + 32));
    }
    if (k < A) s0 = dot16(s0, words32(w + k), load32(x + k));
    return _mm512_add_epi32(s0, s1);
}

template <int A>  // A of 64 or 128 values: 32 or 64 bytes
static inline __m512i int4_block512(const int8_t* w, const int16_t* even, const int16_t* odd) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0;
    for (int k = 0; k < A / 2; k += 32) {
        const __m512i b = words32(w + k);
        s0 = dot16(s0, _mm512_srai_epi16(b, 4), load32(even + k));
        s1 = dot16(s1, _mm512_srai_epi16(_mm512_slli_epi16(b, 12), 12), load32(odd + k));
    }
    return _mm512_add_epi32(s0, s1);
}

static inline __m512 scaled512(__m512i sum, __m512 scale, __m512 total) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, total);
}

template <int A>
static float int8_blocks512(const int8_t* w, const int16_t* x, const float* s, int64_t n) {
    __m512 t0 = _mm512_setzero_ps(), t1 = t0;
    int64_t j = 0, b = 0;
    for (; j + 2 * A <= n; j += 2 * A, b += 2) {
        ask_ahead(w + j, 2 * A);
        t0 = scaled512(int8_block512<A>(w + j, x + j), _mm512_set1_ps(s[b]), t0);
        t1 = scaled512(int8_block512<A>(w + j + A, x + j + A), _mm512_set1_ps(s[b + 1]), t1);
    }
    if (j < n) t0 = scaled512(int8_block512<A>(w + j, x + j), _mm512_set1_ps(s[b]), t0);
    return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
}

// Two scales, the first for the low eight lanes (the first 16 bytes' products), the second
// for the high eight.
static inline __m512 two_scales(const float* s) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(s[0])),
                                               _mm256_castps_pd(_mm256_set1_ps(s[1])), 1));
}

template <int A>
static float int4_blocks512(const int8_t* w, const int16_t* even, const int16_t* odd, const float* s, int64_t n) {
    __m512 t0 = _mm512_setzero_ps(), t1 = t0;
    int64_t j = 0, b = 0;
    if (A == 32) {  // 16 bytes a block: a register holds two blocks, each its own half
        for (; j + 64 <= n; j += 64, b += 4) {
            ask_ahead(w + j, 64);
            t0 = scaled512(int4_block512<64>(w + j, even + j, odd + j), two_scales(s + b), t0);
            t1 = scaled512(int4_block512<64>(w + j + 32, even + j + 32, odd + j + 32), two_scales(s + b + 2), t1);
        }
        if (j + 32 <= n) {
            t0 = scaled512(int4_block512<64>(w + j, even + j, odd + j), two_scales(s + b), t0);
            j += 32, b += 2;
        }
        float rest = _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
        if (j < n) rest += sum8(scaled(int4_block<32>(w + j, even + j, odd + j), s + b, _mm256_setzero_ps()));
        return rest;
    }
    for (; j + A <= n; j += A, b += 2) {
        ask_ahead(w + j, A);
        t0 = scaled512(int4_block512<A>(w + j, even + j, odd + j), _mm512_set1_ps(s[b]), t0);
        t1 = scaled512(int4_block512<A>(w + j + A / 2, even + j + A / 2, odd + j + A / 2), _mm512_set1_ps(s[b + 1]), t1);
    }
    if (j < n) t0 = scaled512(int4_block512<A>(w + j, even + j, odd + j), _mm512_set1_ps(s[b]), t0);
    return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
}
#endif

// The integer loops for one row, AVX-512 where the build has it; block A values.
static float int8_row_blocks(int64_t A, const int8_t* w, const int16_t* x, const float* s, int64_t n) {
#if defined(GLMREPL_INT512)
    return A == 32 ? int8_blocks512<32>(w, x, s, n) : A == 64 ? int8_blocks512<64>(w, x, s, n) : int8_blocks512<128>(w, x, s, n);
#elif defined(GLMREPL_AVX2)
    return A == 32 ? int8_blocks<32>(w, x, s, n) : A == 64 ? int8_blocks<64>(w, x, s, n) : int8_blocks<128>(w, x, s, n);
#else
    (void)A, (void)w, (void)x, (void)s, (void)n;
    return 0.f;
#endif
}

static float int4_row_blocks(int64_t A, const int8_t* w, const int16_t* even, const int16_t* odd, const float* s,
                             int64_t n) {
#if defined(GLMREPL_INT512)
    return A == 32   ? int4_blocks512<32>(w, even, odd, s, n)
           : A == 64 ? int4_blocks512<64>(w, even, odd, s, n)
                     : int4_blocks512<128>(w, even, odd, s, n);
#elif defined(GLMREPL_AVX2)
    return A == 32 ? int4_blocks<32>(w, even, odd, s, n) : A == 64 ? int4_blocks<64>(w, even, odd, s, n)
                                                         : int4_blocks<128>(w, even, odd, s, n);
#else
    (void)A, (void)w, (void)even, (void)odd, (void)s, (void)n;
    return 0.f;
#endif
}

// x[0..n) as 16-bit integers q and one scale a block of A: x ~ q * scale. The scale maps the
// block's largest magnitude to 32767; a block of zeros gets scale 0.
static void quantize16(const float* x, int64_t n, int64_t A, int16_t* q, float* scales) {
    for (int64_t start = 0, b = 0; start < n; start += A, b++) {
        const int64_t end = start + A < n ? start + A : n;
        float largest = 0.f;
        for (int64_t j = start; j < end; j++) largest = std::max(largest, std::fabs(x[j]));
        const float scale = largest / 32767.f, inverse = largest > 0.f ? 32767.f / largest : 0.f;
        for (int64_t j = start; j < end; j++) q[j] = (int16_t)std::lrintf(x[j] * inverse);
        scales[b] = scale;
    }
}

// Rows longer than this many blocks keep the per-row float loops (the block scales live on
// the stack).
static const int64_t MAX_BLOCKS = 4096;

// The activation block for a row of `values` in groups of `group` (one group: the whole
// row): 0 when the integer loops cannot take it. A group of 32, 64 or 128 is its own block;
// a row of one group takes the widest block that divides it.
static int64_t block_size(int64_t group, int64_t values) {
#ifdef GLMREPL_AVX2
    if (group == 32 || group == 64 || group == 128)
        return values % group == 0 && values / group <= MAX_BLOCKS ? group : 0;
    if (group < values) return 0;
    for (int64_t A : {128, 64, 32})
        if (values % A == 0 && values / A <= MAX_BLOCKS) return A;
#else
    (void)group, (void)values;
#endif
    return 0;
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

// Each block's scale: its group's weight scale times the block's activation scale.
static void block_scales(const void* scales, int s_type, int64_t groups, const float* x_scales, int64_t blocks,
                         float* out) {
    if (groups == blocks) {
        widen_scales(scales, s_type, groups, out);
        for (int64_t b = 0; b < blocks; b++) out[b] *= x_scales[b];
    } else {  // one group a row
        const float s = load_one(scales, s_type, 0);
        for (int64_t b = 0; b < blocks; b++) out[b] = s * x_scales[b];
    }
}

static bool known(int type);

// y = dequantized weight @ x for one token. w int8 [rows, cols]; scale [rows, groups] of
// s_type, groups = ceil(cols / group); x and y of x_type. Returns 0, or 1 for a type this
// build cannot read (the caller uses torch instead).
extern "C" int int8_gemv(const int8_t* w, const void* x, int x_type, const void* scale, int s_type, void* y,
                         int64_t rows, int64_t cols, int64_t group, int64_t threads) {
    if (!known(x_type) || !known(s_type) || group < 1) return 1;
    const int64_t groups = (cols + group - 1) / group, A = block_size(group, cols), blocks = A ? cols / A : 0;
    std::vector<float> vector(cols);
    for (int64_t j = 0; j < cols; j++) vector[j] = load_one(x, x_type, j);
    const int64_t s_size = s_type == F32 ? 4 : 2;
    std::vector<int16_t> rounded(A ? cols : 0);
    std::vector<float> x_scales(blocks);
    if (A) quantize16(vector.data(), cols, A, rounded.data(), x_scales.data());
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const void* row_scales = (const char*)scale + r * groups * s_size;
        const int8_t* row = w + r * cols;
        float v;
        if (A) {
            float s[MAX_BLOCKS];
            block_scales(row_scales, s_type, groups, x_scales.data(), blocks, s);
            v = int8_row_blocks(A, row, rounded.data(), s, cols);
        } else {
            v = int8_row(row, vector.data(), row_scales, s_type, cols, group);
        }
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
    const int64_t A = block_size(group, 2 * stored), blocks = A ? 2 * stored / A : 0;
    std::vector<float> values(2 * stored);
    for (int64_t j = 0; j < 2 * stored; j++) values[j] = load_one(x, x_type, j);
    // The float split serves the per-row loop; the integer loops read the 16-bit one.
    std::vector<float> even(A ? 0 : stored), odd(A ? 0 : stored);
    for (int64_t j = 0; !A && j < stored; j++) even[j] = values[2 * j], odd[j] = values[2 * j + 1];
    std::vector<int16_t> rounded(A ? 2 * stored : 0), even16(A ? stored : 0), odd16(A ? stored : 0);
    std::vector<float> x_scales(blocks);
    if (A) {
        quantize16(values.data(), 2 * stored, A, rounded.data(), x_scales.data());
        for (int64_t j = 0; j < stored; j++) even16[j] = rounded[2 * j], odd16[j] = rounded[2 * j + 1];
    }
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * stored * 2 >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const void* row_scales = (const char*)scale + r * groups * s_size;
        const int8_t* row = w + r * stored;
        float v;
        if (A) {
            float s[MAX_BLOCKS];
            block_scales(row_scales, s_type, groups, x_scales.data(), blocks, s);
            v = int4_row_blocks(A, row, even16.data(), odd16.data(), s, stored);
        } else {
            v = int4_row(row, even.data(), odd.data(), row_scales, s_type, stored, group_bytes);
        }
        store_one(y, x_type, r, v);
    }
    return 0;
}

// ---- prompts: rows dequantized for torch's matmul -----------------------------------------
//
// A prompt multiplies every weight by many tokens, which a float matmul does best; the weight
// is dequantized a block of rows at a time into a buffer that stays in the cache. In torch
// that took several passes over the block (widen, unpack the nibbles, scale) and two half-width
// products for int4, about as long as the products themselves at 64 tokens.

#ifdef GLMREPL_INT512
// 16 int4 bytes into 32 floats in column order: each byte's high nibble, then its low one.
static inline void int4_values16(const int8_t* w, __m512 scale, float* out) {
    const __m512i b = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)w));
    const __m512 high = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(b, 4)), scale);
    const __m512 low = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28)), scale);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_ps(out, _mm512_permutex2var_ps(high, first, low));
    _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(high, second, low));
}
#endif

template <int BITS>
static void dequantize_row(const int8_t* w, const float* s, int64_t values, int64_t group, float* out) {
    for (int64_t g = 0, start = 0; start < values; g++, start += group) {
        const int64_t end = start + group < values ? start + group : values;
        const float scale = s[g];
        if (BITS == 8) {
            for (int64_t j = start; j < end; j++) out[j] = (float)w[j] * scale;
        } else {
            int64_t j = start;
#ifdef GLMREPL_INT512
            for (; j + 32 <= end; j += 32) int4_values16(w + j / 2, _mm512_set1_ps(scale), out + j);
#endif
            for (; j < end; j += 2) {
                const int8_t b = w[j / 2];
                out[j] = (float)(b >> 4) * scale;
                out[j + 1] = (float)((int8_t)(b << 4) >> 4) * scale;
            }
        }
    }
}

// Rows [first, first + count) of an int8 or int4 weight of `values` columns as float32, into
// out [count, values]. Returns 0, or 1 for what this build cannot read (the caller uses torch).
extern "C" int dequantize_rows(const int8_t* w, int bits, const void* scale, int s_type, float* out, int64_t first,
                               int64_t count, int64_t values, int64_t group, int64_t threads) {
    if (!known(s_type) || group < 1 || (bits != 8 && bits != 4) || (bits == 4 && (values % 2 || group % 2)))
        return 1;
    const int64_t stored = bits == 4 ? values / 2 : values, groups = (values + group - 1) / group;
    const int64_t s_size = s_type == F32 ? 4 : 2;
    #pragma omp parallel for num_threads(threads) schedule(static) if (count * values >= PARALLEL_WORK)
    for (int64_t r = 0; r < count; r++) {
        std::vector<float> s(groups);
        widen_scales((const char*)scale + (first + r) * groups * s_size, s_type, groups, s.data());
        const int8_t* row = w + (first + r) * stored;
        if (bits == 8)
            dequantize_row<8>(row, s.data(), values, group, out + r * values);
        else
            dequantize_row<4>(row, s.data(), values, group, out + r * values);
    }
    return 0;
}
