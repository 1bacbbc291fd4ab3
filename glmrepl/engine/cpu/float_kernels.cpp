// Float32 / bfloat16 / float16 weights times one activation vector (float_gemv) or a
// few (float_gemm, a step of batched decoding); follows cpu_kernels.cpp (its types,
// load_one/store_one and the PARALLEL_WORK threshold).
//
// The widest vectors the processor has are used: AVX-512 where the build targets it
// (16 floats a register, 32 registers), else AVX2 (8 floats, 16 registers). On an
// AVX-512 processor the 8-float loop left about a fifth of the one-token speed and a
// third of the few-token speed unused (benchmarks/kernel_speed.py prints both).

#if defined(__AVX512F__)
#define GLMREPL_FLOAT_VECTOR 1
using Vec = __m512;
static const int LANES = 16;
static inline Vec vec_zero() { return _mm512_setzero_ps(); }
static inline Vec vec_load(const float* p) { return _mm512_loadu_ps(p); }
static inline Vec vec_fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline Vec vec_add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
static inline float vec_sum(Vec v) { return _mm512_reduce_add_ps(v); }
static inline Vec vec_bf16(const uint16_t* p) {  // bfloat16 is the top half of a float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline Vec vec_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#elif defined(GLMREPL_AVX2)
#define GLMREPL_FLOAT_VECTOR 1
using Vec = __m256;
static const int LANES = 8;
static inline Vec vec_zero() { return _mm256_setzero_ps(); }
static inline Vec vec_load(const float* p) { return _mm256_loadu_ps(p); }
static inline Vec vec_fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline Vec vec_add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
static inline float vec_sum(Vec v) { return sum8(v); }
static inline Vec vec_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#ifdef __F16C__
static inline Vec vec_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
#endif
#endif

template <int T> struct Weights;
template <> struct Weights<F32> {
    using Element = float;
#ifdef GLMREPL_FLOAT_VECTOR
    static Vec lanes(const float* p) { return vec_load(p); }
#endif
};
template <> struct Weights<BF16> {
    using Element = uint16_t;
#ifdef GLMREPL_FLOAT_VECTOR
    static Vec lanes(const uint16_t* p) { return vec_bf16(p); }
#endif
};
template <> struct Weights<F16> {
    using Element = uint16_t;
#if defined(GLMREPL_FLOAT_VECTOR) && defined(__F16C__)
    static Vec lanes(const uint16_t* p) { return vec_f16(p); }
#endif
};

template <int T>
static float float_row(const typename Weights<T>::Element* w, const float* x, int64_t n) {
    int64_t j = 0;
    float acc = 0.f;
#ifdef GLMREPL_FLOAT_VECTOR
    Vec a0 = vec_zero(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 4 * LANES <= n; j += 4 * LANES) {
        a0 = vec_fma(Weights<T>::lanes(w + j), vec_load(x + j), a0);
        a1 = vec_fma(Weights<T>::lanes(w + j + LANES), vec_load(x + j + LANES), a1);
        a2 = vec_fma(Weights<T>::lanes(w + j + 2 * LANES), vec_load(x + j + 2 * LANES), a2);
        a3 = vec_fma(Weights<T>::lanes(w + j + 3 * LANES), vec_load(x + j + 3 * LANES), a3);
    }
    for (; j + LANES <= n; j += LANES) a0 = vec_fma(Weights<T>::lanes(w + j), vec_load(x + j), a0);
    acc = vec_sum(vec_add(vec_add(a0, a1), vec_add(a2, a3)));
#endif
    for (; j < n; j++) acc += load_one(w, T, j) * x[j];
    return acc;
}

template <int T>
static void float_rows(const void* weight, const float* x, const void* bias, void* y, int y_type,
                       int64_t rows, int64_t cols, int64_t threads) {
    const auto* w = (const typename Weights<T>::Element*)weight;
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_WORK)
    for (int64_t r = 0; r < rows; r++) {
        float acc = float_row<T>(w + r * cols, x, cols);
        if (bias) acc += load_one(bias, T, r);
        store_one(y, y_type, r, acc);
    }
}

static bool known(int type) {
#ifdef __F16C__
    return type == F32 || type == BF16 || type == F16;
#else
    return type == F32 || type == BF16;
#endif
}

template <int T>
static void float_tiles(const void* weight, const float* x, const void* bias, void* y, int y_type, int64_t m,
                        int64_t rows, int64_t cols, int64_t threads);  // below, with the few-token kernels

// y = weight @ x (+ bias). The weight [rows, cols] and bias have w_type; x and y
// have x_type. Returns 0, or 1 for a type this build cannot read (the caller
// uses torch instead).
extern "C" int float_gemv(const void* weight, int w_type, const void* x, int x_type, const void* bias, void* y,
                          int64_t rows, int64_t cols, int64_t threads) {
    if (!known(w_type) || !known(x_type)) return 1;
    std::vector<float> vector(cols);
    for (int64_t j = 0; j < cols; j++) vector[j] = load_one(x, x_type, j);
    // 16-bit weights go through the few-token tiles with one vector: each pass over a tile also
    // asks for the next tile's rows, so the memory keeps reading while the values are widened
    // (the one-row loop read bfloat16 at two thirds of the speed; float32 alike either way).
    switch (w_type) {
        case BF16: float_tiles<BF16>(weight, vector.data(), bias, y, x_type, 1, rows, cols, threads); break;
        case F16: float_tiles<F16>(weight, vector.data(), bias, y, x_type, 1, rows, cols, threads); break;
        default: float_rows<F32>(weight, vector.data(), bias, y, x_type, rows, cols, threads);
    }
    return 0;
}

// ---- a few tokens at once (batched decoding) --------------------------------
//
// A decoding step that serves several requests multiplies every weight by a few
// activation vectors, one per request. Each tile here reads TILE_ROWS weight rows
// once from memory and multiplies them with every vector, TILE_VECTORS at a time, while
// they are in the cache: a step of a few tokens costs about one reading of the weights
// plus the multiply-adds. The accumulators (rows x vectors) and the vectors' values must
// fit the registers: 6 x 2 with AVX2's 16 (each weight loaded serves 2 multiply-adds,
// each vector value 6; the fastest or close of the shapes tried on Zen 3), 4 x 4 with
// AVX-512's 32 (the fastest of 6 x 2, 4 x 4, 2 x 8, 3 x 8 and 8 x 2 on a Xeon).
//
// While a tile's later groups of vectors run from the cache, the memory would idle: each
// pass over the tile also asks for a share of the next tile's rows (software prefetch),
// so that the reading of the weights goes on under the multiply-adds.
#if defined(__AVX512F__)
static const int TILE_ROWS = 4;
static const int TILE_VECTORS = 4;
#else
static const int TILE_ROWS = 6;
static const int TILE_VECTORS = 2;
#endif
static const int64_t LINE = 64;
#ifdef GLMREPL_FLOAT_VECTOR
static const int64_t STEP_COLUMNS = LANES;  // the columns a step of float_tile's vector loop takes
#else
static const int64_t STEP_COLUMNS = 1;
#endif

// out[r * C + c] = weight row r . vector c, for R rows of w and C vectors of x (both n apart).
// ahead: bytes of the next tile to prefetch (nullptr for none), `lines` cache lines per step.
template <int T, int R, int C>
static void float_tile(const typename Weights<T>::Element* w, const float* x, int64_t n, float* out,
                       const char* ahead, int64_t lines) {
    int64_t j = 0;
    float sums[R][C] = {};
#ifdef GLMREPL_FLOAT_VECTOR
    Vec acc[R][C];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = vec_zero();
    for (; j + LANES <= n; j += LANES) {
        if (ahead) {
            for (int64_t l = 0; l < lines; l++) _mm_prefetch(ahead + l * LINE, _MM_HINT_T1);
            ahead += lines * LINE;
        }
        Vec vectors[C];
        for (int c = 0; c < C; c++) vectors[c] = vec_load(x + c * n + j);
        for (int r = 0; r < R; r++) {
            Vec weights = Weights<T>::lanes(w + r * n + j);
            for (int c = 0; c < C; c++) acc[r][c] = vec_fma(weights, vectors[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) sums[r][c] = vec_sum(acc[r][c]);
#endif
    for (; j < n; j++)
        for (int r = 0; r < R; r++) {
            float weight = load_one(w, T, r * n + j);
            for (int c = 0; c < C; c++) sums[r][c] += weight * x[c * n + j];
        }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[r * C + c] = sums[r][c];
}

// The tile for r rows (1 to TILE_ROWS) and c vectors (1 to TILE_VECTORS), chosen at run
// time: the tails of row and vector counts that are not multiples of the tile's.
template <int T, int R, int C = TILE_VECTORS>
static void any_vectors(const typename Weights<T>::Element* w, const float* x, int64_t n, int c, float* out,
                        const char* ahead, int64_t lines) {
    if constexpr (C > 1) {
        if (c < C) return any_vectors<T, R, C - 1>(w, x, n, c, out, ahead, lines);
    }
    float_tile<T, R, C>(w, x, n, out, ahead, lines);
}

template <int T, int R = TILE_ROWS>
static void any_tile(const typename Weights<T>::Element* w, const float* x, int64_t n, int r, int c, float* out,
                     const char* ahead, int64_t lines) {
    if constexpr (R > 1) {
        if (r < R) return any_tile<T, R - 1>(w, x, n, r, c, out, ahead, lines);
    }
    any_vectors<T, R>(w, x, n, c, out, ahead, lines);
}

// y[m, r] = x[m] . weight[r] (+ bias[r]) for m vectors, the rows shared among the threads.
template <int T>
static void float_tiles(const void* weight, const float* x, const void* bias, void* y, int y_type, int64_t m,
                        int64_t rows, int64_t cols, int64_t threads) {
    using Element = typename Weights<T>::Element;
    const auto* w = (const Element*)weight;
    const int64_t tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
    const int64_t passes = (m + TILE_VECTORS - 1) / TILE_VECTORS;
    // The next tile's bytes spread over every step of every pass (prefetching past the
    // weight's end, for the last tiles, is harmless: a prefetch never faults).
    const int64_t steps = passes * (cols / STEP_COLUMNS);
    const int64_t tile_bytes = (int64_t)TILE_ROWS * cols * (int64_t)sizeof(Element);
    const int64_t lines = steps ? (tile_bytes / LINE + steps - 1) / steps : 0;
    #pragma omp parallel for num_threads(threads) schedule(static) if (m * rows * cols >= PARALLEL_WORK)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t r0 = t * TILE_ROWS;
        const int R = rows - r0 < TILE_ROWS ? (int)(rows - r0) : TILE_ROWS;
        const bool last = t + 1 == tiles;
        for (int64_t c0 = 0; c0 < m; c0 += TILE_VECTORS) {
            const int C = m - c0 < TILE_VECTORS ? (int)(m - c0) : TILE_VECTORS;
            const int64_t pass = c0 / TILE_VECTORS;
            const char* ahead = last || !lines ? nullptr
                                               : (const char*)(w + (r0 + TILE_ROWS) * cols) +
                                                     pass * (cols / STEP_COLUMNS) * lines * LINE;
            float out[TILE_ROWS * TILE_VECTORS];
            any_tile<T>(w + r0 * cols, x + c0 * cols, cols, R, C, out, ahead, lines);
            for (int r = 0; r < R; r++) {
                const float b = bias ? load_one(bias, T, r0 + r) : 0.f;
                for (int c = 0; c < C; c++) store_one(y, y_type, (c0 + c) * rows + r0 + r, out[r * C + c] + b);
            }
        }
    }
}

// y = x @ weight.T (+ bias) for m vectors x [m, cols] (m small: a step of batched decoding);
// y is [m, rows]. Types and the return value as float_gemv's.
extern "C" int float_gemm(const void* weight, int w_type, const void* x, int x_type, const void* bias, void* y,
                          int64_t m, int64_t rows, int64_t cols, int64_t threads) {
    if (!known(w_type) || !known(x_type)) return 1;
    std::vector<float> vectors(m * cols);
    for (int64_t j = 0; j < m * cols; j++) vectors[j] = load_one(x, x_type, j);
    switch (w_type) {
        case BF16: float_tiles<BF16>(weight, vectors.data(), bias, y, x_type, m, rows, cols, threads); break;
        case F16: float_tiles<F16>(weight, vectors.data(), bias, y, x_type, m, rows, cols, threads); break;
        default: float_tiles<F32>(weight, vectors.data(), bias, y, x_type, m, rows, cols, threads);
    }
    return 0;
}
