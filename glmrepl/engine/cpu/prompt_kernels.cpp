// Prompts through int8 / int4 weights with one scale a row (ChatGLM's releases): many tokens
// times every weight, in 8-bit integer products; follows int_kernels.cpp (its types, helpers).
//
// A prompt is bound by multiply-adds, not by reading the weights. On an AVX-512 core torch's
// float32 matmul does 32 of them a cycle (two FMA ports); VNNI's vpdpbusd does 64 8-bit
// products an instruction at up to two a cycle, while 16-bit ones (vpdpwssd, the decode
// kernels' numbers) go at one a cycle, no faster than the floats.
//
// The activations keep the decode kernels' precision all the same: each is rounded to a
// 16-bit integer q (one float scale per block of up to 1024 values, the block's largest
// magnitude mapped to 32767), and q + 32768 is multiplied as its two unsigned bytes, hi and
// lo: two vpdpbusd passes (unsigned bytes times the weights' signed ones), exact in 32-bit
// lanes. The offset adds 32768 * (the block's weight sum) to each product, so each row's
// block sum starts at minus that (the weight sum is taken while the block is copied, below).
//
// Blocking: the products run over up to 256 tokens at a time (their activations stay in L2)
// and, within those, over panels of 32 weight rows. Each panel's block of 1024 values is
// copied side by side (rows 4 KB apart would share the L1 cache's sets; int4 is unpacked to
// a byte a value here, as 16 v, its even values first, then its odd ones, as the activations
// are laid out), then tiles of 4 rows by 4 tokens run over it from L1. Each tile's 16-lane
// float sums live in a buffer per thread until the row's end.

#if defined(GLMREPL_INT512) && defined(__AVX512VNNI__)
#define GLMREPL_PROMPT_VNNI 1
static const int64_t PROMPT_BLOCK = 1024;  // activation values a scale
static const int64_t PANEL = 32;          // weight rows a panel

// The tokens' activations as two byte planes and their blocks' scales (int4: each block's
// even values, then its odd ones).
struct PromptActs {
    int64_t values, blocks, stride;  // stride: a token's bytes in a plane, values and a pad
    std::vector<uint8_t> hi, lo;
    std::vector<float> hi_scales;  // [tokens, blocks]: 256 * the block's scale
    std::vector<float> lo_scales;  // [tokens, blocks]: the block's scale
};

// acc += the products of a's unsigned bytes and b's signed ones, in place: through the
// intrinsic, GCC copied every accumulator to another register at each step.
static inline void dot_bytes(__m512i& acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
}

// v in lane 0, zeros elsewhere (from a register: a masked load of a value just stored waits for
// the store to reach the cache).
static inline __m512i lane0(int32_t v) { return _mm512_inserti32x4(_mm512_setzero_si512(), _mm_cvtsi32_si128(v), 0); }

// 16 values' q + 32768 as bytes into the two planes.
static inline void store_planes(__m512i q, uint8_t* hi, uint8_t* lo) {
    const __m512i u = _mm512_add_epi32(q, _mm512_set1_epi32(32768));
    _mm_storeu_si128((__m128i*)hi, _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8)));
    _mm_storeu_si128((__m128i*)lo, _mm512_cvtepi32_epi8(_mm512_and_si512(u, _mm512_set1_epi32(255))));
}

static void round_token(const float* x, int bits, PromptActs& a, int64_t token) {
    uint8_t* hi = a.hi.data() + token * a.stride;
    uint8_t* lo = a.lo.data() + token * a.stride;
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t b = 0, start = 0; start < a.values; b++, start += PROMPT_BLOCK) {
        const int64_t end = std::min(a.values, start + PROMPT_BLOCK), half = (end - start) / 2;
        __m512 largest = _mm512_setzero_ps();
        for (int64_t j = start; j < end; j += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
        const float top = _mm512_reduce_max_ps(largest);
        const __m512 inverse = _mm512_set1_ps(top > 0.f ? 32767.f / top : 0.f);
        for (int64_t j = start; j < end; j += 32) {  // to nearest, ties to even
            const __m512i first = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), inverse));
            const __m512i second = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j + 16), inverse));
            if (bits == 8) {
                store_planes(first, hi + j, lo + j);
                store_planes(second, hi + j + 16, lo + j + 16);
            } else {  // values j..j+31: 16 even ones to the block's first half, 16 odd ones to its second
                const int64_t at = start + (j - start) / 2;
                store_planes(_mm512_permutex2var_epi32(first, even, second), hi + at, lo + at);
                store_planes(_mm512_permutex2var_epi32(first, odd, second), hi + at + half, lo + at + half);
            }
        }
        const int64_t i = token * a.blocks + b;
        const float scale = (bits == 4 ? 1.f / 16.f : 1.f) * top / 32767.f;  // int4 weights read as 16 v
        a.hi_scales[i] = 256.f * scale;
        a.lo_scales[i] = scale;
    }
}

// A row's block of `length` values as signed bytes side by side, from `bytes` stored ones (int4:
// its high nibbles, the even values, then its low ones, each as 16 v); returns the block's
// sum times -128 (the hi pass's start).
template <int BITS>
static int32_t copy_block(const int8_t* row, int64_t length, int8_t* out) {
    const __m512i ones = _mm512_set1_epi8(1), top = _mm512_set1_epi8((char)0xf0);
    __m512i sum = _mm512_setzero_si512();
    if (BITS == 8) {
        for (int64_t k = 0; k < length; k += 64) {
            const __m512i v = _mm512_loadu_si512(row + k);
            _mm512_storeu_si512(out + k, v);
            dot_bytes(sum, ones, v);
        }
    } else {
        for (int64_t k = 0; k < length / 2; k += 64) {
            const __m512i v = _mm512_loadu_si512(row + k);
            const __m512i high = _mm512_and_si512(v, top), low = _mm512_and_si512(_mm512_slli_epi16(v, 4), top);
            _mm512_storeu_si512(out + k, high);
            _mm512_storeu_si512(out + length / 2 + k, low);
            dot_bytes(sum, ones, high);
            dot_bytes(sum, ones, low);
        }
    }
    return -128 * _mm512_reduce_add_epi32(sum);
}

// One pass over a block for 4 weight rows (w, `length` bytes apart) by 4 tokens' planes:
// acc[4 * i + j] += row i's bytes times token j's. The four tokens' activations stay in
// registers while the rows pass one at a time: 8 loads for 16 products.
static inline void block_pass(const int8_t* w, int64_t length, const uint8_t* const* plane, __m512i* acc) {
    // Named, not an array: GCC kept an array of accumulators on the stack.
    __m512i a00 = acc[0], a01 = acc[1], a02 = acc[2], a03 = acc[3], a10 = acc[4], a11 = acc[5], a12 = acc[6],
            a13 = acc[7], a20 = acc[8], a21 = acc[9], a22 = acc[10], a23 = acc[11], a30 = acc[12], a31 = acc[13],
            a32 = acc[14], a33 = acc[15];
    const uint8_t *p0 = plane[0], *p1 = plane[1], *p2 = plane[2], *p3 = plane[3];
    for (int64_t k = 0; k < length; k += 64) {
        const __m512i t0 = _mm512_loadu_si512(p0 + k), t1 = _mm512_loadu_si512(p1 + k),
                      t2 = _mm512_loadu_si512(p2 + k), t3 = _mm512_loadu_si512(p3 + k);
        __m512i x = _mm512_loadu_si512(w + k);
        dot_bytes(a00, t0, x), dot_bytes(a01, t1, x), dot_bytes(a02, t2, x), dot_bytes(a03, t3, x);
        x = _mm512_loadu_si512(w + length + k);
        dot_bytes(a10, t0, x), dot_bytes(a11, t1, x), dot_bytes(a12, t2, x), dot_bytes(a13, t3, x);
        x = _mm512_loadu_si512(w + 2 * length + k);
        dot_bytes(a20, t0, x), dot_bytes(a21, t1, x), dot_bytes(a22, t2, x), dot_bytes(a23, t3, x);
        x = _mm512_loadu_si512(w + 3 * length + k);
        dot_bytes(a30, t0, x), dot_bytes(a31, t1, x), dot_bytes(a32, t2, x), dot_bytes(a33, t3, x);
    }
    acc[0] = a00, acc[1] = a01, acc[2] = a02, acc[3] = a03, acc[4] = a10, acc[5] = a11, acc[6] = a12, acc[7] = a13;
    acc[8] = a20, acc[9] = a21, acc[10] = a22, acc[11] = a23, acc[12] = a30, acc[13] = a31, acc[14] = a32, acc[15] = a33;
}

// sums[(4 * i + j) * 16 ...] += row i's and token j's products over one block, scaled.
static inline void block_tile(const int8_t* w, int64_t length, const uint8_t* const* hi, const uint8_t* const* lo,
                              const int32_t* starts, const float* hs, const float* ls, float* sums) {
    __m512i high[16], low[16];
    for (int n = 0; n < 16; n++) high[n] = lane0(starts[n / 4]), low[n] = _mm512_setzero_si512();
    block_pass(w, length, hi, high);
    block_pass(w, length, lo, low);
    for (int n = 0; n < 16; n++) {
        float* sum = sums + n * 16;
        const __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(high[n]), _mm512_set1_ps(hs[n % 4]), _mm512_loadu_ps(sum));
        _mm512_storeu_ps(sum, _mm512_fmadd_ps(_mm512_cvtepi32_ps(low[n]), _mm512_set1_ps(ls[n % 4]), s));
    }
}

// Per thread: the panel's block side by side, its rows' starts, and the tiles' sums.
struct PanelBuffers {
    std::vector<int8_t> block;
    std::vector<int32_t> starts;
    std::vector<float> sums;
};

// out[t, r] for tokens [first, last) and rows [row, row + count), count at most PANEL. Groups
// of fewer than 4 tokens or rows repeat their last one (computed, not written).
template <int BITS>
static void prompt_panel(const int8_t* w, int64_t stored, const PromptActs& a, int64_t first, int64_t last,
                         int64_t row, int64_t count, const float* row_scales, float* out, int64_t rows,
                         PanelBuffers& buffers) {
    const int64_t quads = (last - first + 3) / 4, count4 = (count + 3) / 4 * 4;
    buffers.block.resize(count4 * PROMPT_BLOCK);
    buffers.starts.resize(count4);
    buffers.sums.assign(quads * count4 * 4 * 16, 0.f);  // [token quad][row][token][16 lanes]
    for (int64_t b = 0; b < a.blocks; b++) {
        const int64_t start = b * PROMPT_BLOCK, length = std::min(a.values - start, PROMPT_BLOCK);
        const int64_t byte = BITS == 8 ? start : start / 2;
        for (int64_t r = 0; r < count4; r++)
            buffers.starts[r] = copy_block<BITS>(w + (row + std::min(r, count - 1)) * stored + byte, length,
                                                 buffers.block.data() + r * length);
        if (b + 1 < a.blocks)  // the next block's rows, from memory while this one's products run
            for (int64_t r = 0; r < count; r++)
                for (int64_t k = 0; k < (BITS == 8 ? length : length / 2); k += 64)
                    _mm_prefetch((const char*)w + (row + r) * stored + byte + (BITS == 8 ? length : length / 2) + k,
                                 _MM_HINT_T1);
        for (int64_t q = 0; q < quads; q++) {
            const uint8_t *hi[4], *lo[4];
            float hs[4], ls[4];
            for (int64_t j = 0; j < 4; j++) {
                const int64_t t = std::min(first + 4 * q + j, last - 1), i = t * a.blocks + b;
                hi[j] = a.hi.data() + t * a.stride + start, lo[j] = a.lo.data() + t * a.stride + start;
                hs[j] = a.hi_scales[i], ls[j] = a.lo_scales[i];
            }
            for (int64_t r = 0; r < count4; r += 4)
                block_tile(buffers.block.data() + r * length, length, hi, lo, buffers.starts.data() + r, hs, ls,
                           buffers.sums.data() + (q * count4 + r) * 4 * 16);
        }
    }
    for (int64_t t = first; t < last; t++) {
        const int64_t q = (t - first) / 4, j = (t - first) % 4;
        for (int64_t r = 0; r < count; r++)
            out[t * rows + row + r] =
                _mm512_reduce_add_ps(_mm512_loadu_ps(buffers.sums.data() + ((q * count4 + r) * 4 + j) * 16)) *
                row_scales[row + r];
    }
}
#endif

// out [tokens, rows] = x [tokens, values] (float32) @ dequantized weight.T, for an int8 or int4
// weight with one scale a row (scale [rows] of s_type). Returns 0, or 1 when this build or
// shape cannot (no VNNI, a row not whole chunks of 128 values): the caller dequantizes instead.
extern "C" int prompt_gemm(const int8_t* w, int bits, const void* scale, int s_type, const float* x, float* out,
                           int64_t tokens, int64_t rows, int64_t values, int64_t threads) {
#ifdef GLMREPL_PROMPT_VNNI
    if (!known(s_type) || (bits != 8 && bits != 4) || values % 128 || tokens < 1) return 1;
    const int64_t stored = bits == 4 ? values / 2 : values, blocks = (values + PROMPT_BLOCK - 1) / PROMPT_BLOCK;
    // values is a multiple of 128: the pad makes a token's stride an odd number of cache lines.
    const int64_t stride = values + 64;
    PromptActs a{values, blocks, stride, std::vector<uint8_t>(tokens * stride), std::vector<uint8_t>(tokens * stride),
                 std::vector<float>(tokens * blocks), std::vector<float>(tokens * blocks)};
    std::vector<float> row_scales(rows);
    for (int64_t r = 0; r < rows; r++) row_scales[r] = load_one(scale, s_type, r);
    // The tokens a pass: their two planes stay within about 1 MB of L2; the weights are read
    // from memory once a pass.
    const int64_t tile = std::max<int64_t>(4, std::min<int64_t>(256, (512 * 1024 / stride) / 4 * 4));
    const int64_t panels = (rows + PANEL - 1) / PANEL;
    #pragma omp parallel num_threads(threads) if (tokens * rows * values >= PARALLEL_WORK)
    {
        PanelBuffers buffers;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; t++) round_token(x + t * values, bits, a, t);
        for (int64_t first = 0; first < tokens; first += tile) {
            const int64_t last = std::min(tokens, first + tile);
            #pragma omp for schedule(static)
            for (int64_t p = 0; p < panels; p++) {
                const int64_t row = p * PANEL, count = std::min(PANEL, rows - row);
                if (bits == 8)
                    prompt_panel<8>(w, stored, a, first, last, row, count, row_scales.data(), out, rows, buffers);
                else
                    prompt_panel<4>(w, stored, a, first, last, row, count, row_scales.data(), out, rows, buffers);
            }
        }
    }
    return 0;
#else
    (void)w, (void)bits, (void)scale, (void)s_type, (void)x, (void)out, (void)tokens, (void)rows, (void)values;
    (void)threads;
    return 1;
#endif
}
