// One decoding step of a Llama-style decoder layer for one token, in one call (see decode_step.py).
//
// Built together with cpu_kernels.cpp (this text follows it): the projections are its
// matrix-vector kernels. A step of transformers' layer is some thirty torch operations
// around the seven products, each a few microseconds of dispatch on vectors of a few
// thousand values: with int4 weights that was a third of a 0.5B model's step on two cores.
// Here the norms, the rotary embedding, the cache write, the attention over the cached
// positions and the gated activation are plain loops over float32 values, in the order
// transformers computes them (llama/qwen2/mistral modeling code).
#include <cmath>
#include <vector>

struct GlmLinear {
    int32_t kind;    // 0: float weight of w_type, 1: int8, 2: int4 (quant.py's layouts)
    int32_t w_type;  // kind 0: the weight's type (F32/BF16/F16)
    int32_t s_type;  // kinds 1 and 2: the scales' type
    int32_t unused;
    const void* weight;
    const void* scale;
    const float* bias;  // float32 or null
    int64_t rows;       // outputs
    int64_t stored;     // the weight's stored columns: values (float, int8) or bytes (int4)
    int64_t group;      // kinds 1 and 2: values a scale
};

struct GlmLayer {
    GlmLinear q, k, v, o, gate, up, down;
    const float* norm_in;
    const float* norm_post;
    float eps_in, eps_post, scaling, unused;
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
};

// y = linear(x) for one token, both float32; nonzero when a kernel cannot read a type.
static int glm_linear(const GlmLinear& L, const float* x, float* y, int64_t threads) {
    int failed;
    if (L.kind == 0)
        failed = float_gemv(L.weight, L.w_type, x, F32, nullptr, y, L.rows, L.stored, threads);
    else if (L.kind == 1)
        failed = int8_gemv((const int8_t*)L.weight, x, F32, L.scale, L.s_type, y, L.rows, L.stored, L.group, threads);
    else
        failed = int4_gemv((const int8_t*)L.weight, x, F32, L.scale, L.s_type, y, L.rows, L.stored, L.group, threads);
    if (!failed && L.bias)
        for (int64_t i = 0; i < L.rows; i++) y[i] += L.bias[i];
    return failed;
}

// weight * (x * rsqrt(mean(x^2) + eps)), as the RMSNorm modules compute it in float32.
static void glm_rms_norm(const float* x, const float* weight, float eps, float* out, int64_t n) {
    float squares = 0.f;
    for (int64_t i = 0; i < n; i++) squares += x[i] * x[i];
    const float inverse = 1.f / std::sqrt(squares / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inverse);
}

// x * cos + rotate_half(x) * sin for each head: rotate_half(x) is (-x2, x1) of its halves.
static void glm_rope(float* x, int64_t heads, int64_t dim, const float* cos, const float* sin) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float* v = x + h * dim;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

#ifdef GLMREPL_AVX2
// exp of 8 floats: 2^n * exp(r), x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor
// polynomial to r^7 (relative error about 2e-7, float32's own rounding); inputs are clamped
// to where float32 neither overflows nor underflows to a denormal.
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), x));
    __m256 p = _mm256_set1_ps(1.f / 5040.f);
    const float terms[] = {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};
    for (float c : terms) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
#endif

// gate = silu(gate) * up = gate / (1 + exp(-gate)) * up, eight at a time where AVX2 is.
static void glm_silu_times(float* gate, const float* up, int64_t n) {
    int64_t i = 0;
#ifdef GLMREPL_AVX2
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

static inline float glm_dot(const float* a, const float* b, int64_t n) {
    int64_t i = 0;
    float dot = 0.f;
#ifdef GLMREPL_AVX2
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    dot = sum8(_mm256_add_ps(s0, s1));
#endif
    for (; i < n; i++) dot += a[i] * b[i];
    return dot;
}

// Softmax attention of one query head over n positions: key(t) and value(t) point at
// position t's head_dim values.
template <class Key, class Value>
static void glm_attend(const float* query, int64_t n, int64_t dim, float scaling, Key key, Value value, float* out) {
    std::vector<float> scores(n);
    float largest = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        scores[t] = glm_dot(query, key(t), dim) * scaling;
        largest = std::max(largest, scores[t]);
    }
    float total = 0.f;
    for (int64_t t = 0; t < n; t++) total += (scores[t] = std::exp(scores[t] - largest));
    for (int64_t i = 0; i < dim; i++) out[i] = 0.f;
    for (int64_t t = 0; t < n; t++) {
        const float p = scores[t] / total;
        const float* v = value(t);
        for (int64_t i = 0; i < dim; i++) out[i] += p * v[i];
    }
}

// Softmax attention of each query head over positions 0..n-1 of its key/value head; the
// caches are [kv_heads, capacity, dim], query heads share a kv head in consecutive runs.
static void glm_attention(const GlmLayer* L, const float* q, const float* keys, const float* values,
                          int64_t capacity, int64_t n, float* out, int64_t threads) {
    const int64_t dim = L->head_dim, per_kv = L->heads / L->kv_heads;
    #pragma omp parallel for num_threads(threads) schedule(static) if (L->heads * n * dim >= PARALLEL_WORK)
    for (int64_t h = 0; h < L->heads; h++) {
        const float* K = keys + (h / per_kv) * capacity * dim;
        const float* V = values + (h / per_kv) * capacity * dim;
        glm_attend(
            q + h * dim, n, dim, L->scaling, [&](int64_t t) { return K + t * dim; },
            [&](int64_t t) { return V + t * dim; }, out + h * dim);
    }
}

// The layer for the token at `position`: x (hidden float32 values) is updated in place, the
// token's key and value are written at `position` of the caches, and attention reads
// positions 0..position. cos and sin hold head_dim values for the position (the model's own
// rotary embedding, its scaling included). Returns 0, or 1 when a kernel could not run.
extern "C" int glm_decode_layer(const GlmLayer* L, float* x, const float* cos, const float* sin, float* keys,
                                float* values, int64_t capacity, int64_t position, int64_t threads) {
    const int64_t hidden = L->hidden, dim = L->head_dim, kv = L->kv_heads * dim;
    std::vector<float> h(hidden), q(L->heads * dim), k(kv), v(kv), attended(L->heads * dim), out(hidden);
    glm_rms_norm(x, L->norm_in, L->eps_in, h.data(), hidden);
    if (glm_linear(L->q, h.data(), q.data(), threads) || glm_linear(L->k, h.data(), k.data(), threads) ||
        glm_linear(L->v, h.data(), v.data(), threads))
        return 1;
    glm_rope(q.data(), L->heads, dim, cos, sin);
    glm_rope(k.data(), L->kv_heads, dim, cos, sin);
    for (int64_t head = 0; head < L->kv_heads; head++)
        for (int64_t i = 0; i < dim; i++) {
            keys[(head * capacity + position) * dim + i] = k[head * dim + i];
            values[(head * capacity + position) * dim + i] = v[head * dim + i];
        }
    glm_attention(L, q.data(), keys, values, capacity, position + 1, attended.data(), threads);
    if (glm_linear(L->o, attended.data(), out.data(), threads)) return 1;
    for (int64_t i = 0; i < hidden; i++) x[i] += out[i];
    glm_rms_norm(x, L->norm_post, L->eps_post, h.data(), hidden);
    std::vector<float> gate(L->intermediate), up(L->intermediate);
    if (glm_linear(L->gate, h.data(), gate.data(), threads) || glm_linear(L->up, h.data(), up.data(), threads))
        return 1;
    glm_silu_times(gate.data(), up.data(), L->intermediate);
    if (glm_linear(L->down, gate.data(), out.data(), threads)) return 1;
    for (int64_t i = 0; i < hidden; i++) x[i] += out[i];
    return 0;
}

// y = linear(x) for m tokens x [m, stored] into y [m, rows]: each weight row is read once for
// all of them. Float weights only (nonzero otherwise, or when the kernel cannot read a type).
static int glm_linear_rows(const GlmLinear& L, const float* x, int64_t m, float* y, int64_t threads) {
    if (L.kind != 0 || float_gemm(L.weight, L.w_type, x, F32, nullptr, y, m, L.rows, L.stored, threads)) return 1;
    if (L.bias)
        for (int64_t r = 0; r < m; r++)
            for (int64_t i = 0; i < L.rows; i++) y[r * L.rows + i] += L.bias[i];
    return 0;
}

// Attention of each row's query heads over the cache slots that row reads: the slots of row r
// are read_slots[begins[r] .. ends[r]), each slot one position of [kv_heads, dim] values.
static void glm_attention_rows(const GlmLayer* L, const float* q, const float* keys, const float* values,
                               const int64_t* read_slots, const int64_t* begins, const int64_t* ends, int64_t m,
                               float* out, int64_t threads) {
    const int64_t dim = L->head_dim, per_kv = L->heads / L->kv_heads, slot = L->kv_heads * dim;
    int64_t positions = 0;
    for (int64_t r = 0; r < m; r++) positions += ends[r] - begins[r];
    const int64_t pairs = m * L->heads, work = L->heads * dim * positions;
    #pragma omp parallel for num_threads(threads) schedule(static) if (work >= PARALLEL_WORK)
    for (int64_t pair = 0; pair < pairs; pair++) {
        const int64_t r = pair / L->heads, h = pair % L->heads, offset = (h / per_kv) * dim;
        const int64_t* slots = read_slots + begins[r];
        glm_attend(
            q + pair * dim, ends[r] - begins[r], dim, L->scaling,
            [&](int64_t t) { return keys + slots[t] * slot + offset; },
            [&](int64_t t) { return values + slots[t] * slot + offset; }, out + pair * dim);
    }
}

// The layer for m tokens of a batch's step (each the next of its sequence, or a few tokens of
// a prompt): x [m, hidden] is updated in place; row r's key and value go to cache slot
// write_slots[r] (keys and values are [slots, kv_heads, dim]), all rows' before any attention,
// and row r attends to the slots listed for it (glm_attention_rows), its own and those of the
// positions before it. cos and sin are [m, head_dim], one position a row. Returns 0, or 1
// when a projection is not one the float kernel reads.
extern "C" int glm_decode_rows(const GlmLayer* L, float* x, int64_t m, const float* cos, const float* sin,
                               float* keys, float* values, const int64_t* write_slots, const int64_t* read_slots,
                               const int64_t* begins, const int64_t* ends, int64_t threads) {
    const int64_t hidden = L->hidden, dim = L->head_dim, kv = L->kv_heads * dim, qd = L->heads * dim;
    std::vector<float> h(m * hidden), q(m * qd), k(m * kv), v(m * kv), attended(m * qd), out(m * hidden);
    for (int64_t r = 0; r < m; r++) glm_rms_norm(x + r * hidden, L->norm_in, L->eps_in, h.data() + r * hidden, hidden);
    if (glm_linear_rows(L->q, h.data(), m, q.data(), threads) || glm_linear_rows(L->k, h.data(), m, k.data(), threads) ||
        glm_linear_rows(L->v, h.data(), m, v.data(), threads))
        return 1;
    for (int64_t r = 0; r < m; r++) {
        glm_rope(q.data() + r * qd, L->heads, dim, cos + r * dim, sin + r * dim);
        glm_rope(k.data() + r * kv, L->kv_heads, dim, cos + r * dim, sin + r * dim);
        std::copy(k.begin() + r * kv, k.begin() + (r + 1) * kv, keys + write_slots[r] * kv);
        std::copy(v.begin() + r * kv, v.begin() + (r + 1) * kv, values + write_slots[r] * kv);
    }
    glm_attention_rows(L, q.data(), keys, values, read_slots, begins, ends, m, attended.data(), threads);
    if (glm_linear_rows(L->o, attended.data(), m, out.data(), threads)) return 1;
    for (int64_t i = 0; i < m * hidden; i++) x[i] += out[i];
    for (int64_t r = 0; r < m; r++) glm_rms_norm(x + r * hidden, L->norm_post, L->eps_post, h.data() + r * hidden, hidden);
    std::vector<float> gate(m * L->intermediate), up(m * L->intermediate);
    if (glm_linear_rows(L->gate, h.data(), m, gate.data(), threads) ||
        glm_linear_rows(L->up, h.data(), m, up.data(), threads))
        return 1;
    glm_silu_times(gate.data(), up.data(), m * L->intermediate);
    if (glm_linear_rows(L->down, gate.data(), m, out.data(), threads)) return 1;
    for (int64_t i = 0; i < m * hidden; i++) x[i] += out[i];
    return 0;
}
