/* The decoder layers of a Llama-family model for T new token rows in one call: a prompt's
 * prefill (T rows), each generated token (T = 1), and the rows of several sequences
 * decoded together (each row names its sequence's KV cache and its position) all take
 * the same path, so the weights are read once per call for every sequence in it.
 *
 * Mirrors LlamaModel's layer (models/llama.py) operation for operation: RMSNorm, fused
 * q/k/v matmul (+ Qwen2 biases, Qwen3 q/k norms), RoPE, KV-cache append, grouped-query
 * attention, output projection, RMSNorm, SiLU-gated FFN; and GemmaModel's
 * (models/gemma.py) with the optional pieces its block adds: RMSNorms after attention and
 * after the FFN, a GELU-gated FFN, sliding-window layers with their own RoPE table, the
 * query scale and soft-capped attention scores. One call from Python instead of
 * ~30 small torch operations per layer, whose fixed overheads otherwise exceed the
 * matmuls on a small model. Matmuls use qmatmul.c's integer kernels on activations
 * quantized once per row and group (q/k/v share one, gate/up share one). The whole call
 * is one OpenMP parallel region: rows, matmul tiles and (row, head) attention pairs are
 * shared out among the threads, and the implicit barriers of the `omp for` loops keep
 * the order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "qmatmul.h"

enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, N_WEIGHTS };

typedef struct {  /* one decoder layer, filled in from Python (kernels/decode.py) */
    int64_t n_heads, n_kv, ffn_dim;
    const float *attn_norm, *ffn_norm;
    const float *q_norm, *k_norm;           /* Qwen3, else NULL */
    const float *q_bias, *k_bias, *v_bias;  /* Qwen2, else NULL */
    int types[N_WEIGHTS];                   /* ggml type ids */
    const uint8_t *weights[N_WEIGHTS];
    int64_t weight_bytes[N_WEIGHTS];        /* each buffer's size, checked against the shapes */
    /* Gemma */
    const float *attn_post_norm, *ffn_post_norm;  /* norm attention's / the FFN's output
                                                     before the residual add; else NULL */
    int64_t window;    /* sliding window: a query sees its last `window` positions; 0 = all */
    int64_t rotation;  /* which of the call's RoPE tables this layer rotates by */
} DecodeLayer;

typedef struct {  /* one layer's KV cache of one sequence: (n_kv, max_tokens) rows of a head */
    void *keys, *values;
    int64_t max_tokens;
    int64_t key_bytes, value_bytes;  /* each buffer's size, checked against shape and type */
} LayerCache;

/* The KV cache's element types, ggml's ids: a row of head_dim values is head_dim floats or
 * halves, or head_dim / 32 blocks of Q8_0 (34 bytes) or Q4_0 (18 bytes). */
enum { CACHE_F32 = 0, CACHE_F16 = 1, CACHE_Q4_0 = 2, CACHE_Q8_0 = 8 };

/* formats/quantize.c's row quantizers (byte-identical with ggml's), handed over from
 * Python (formats/cquant.py) as that library is another one; importance is NULL here. */
typedef void (*row_quantizer)(const float *x, uint8_t *y, int64_t n, const float *importance);

typedef struct {
    int64_t dim, head_dim, rope_dim;
    int64_t neox;  /* RoPE pairs (i, i + d/2) instead of (2i, 2i + 1) */
    float eps;
    int64_t key_type, value_type;  /* CACHE_*: the cache's keys / values */
    row_quantizer quantize_q8_0, quantize_q4_0;  /* needed for quantized caches */
    /* A quantized cache keeps its rows rotated by the n x n Walsh-Hadamard matrix, in runs
     * of n (llama.cpp's attn_rot_k/_v; models/kv_cache.py picks n): keys and queries, and
     * values, the attention output rotated back. 0: not rotated. */
    int64_t key_rotation, value_rotation;
    float query_scale;  /* multiplies q.k; 0: 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar^-0.5) */
    float softcap;      /* attention scores become cap * tanh(score / cap) (Gemma 2); 0: none */
    int64_t gelu;       /* FFN gate: 1 GELU (tanh approximation, Gemma), 0 SiLU */
} DecodeShape;

/* An f16 KV cache: _Float16 converts with round-to-nearest-even, as torch's .half() does,
 * so the C path and the torch layers store the same bits. */
typedef _Float16 half_t;

/* The float loops below (norms, attention) get an AVX2 copy too, chosen at load (GCC's
 * ifunc, by CPU feature), since the build targets plain x86-64. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Reading an f16 cache: the baseline build converts each half in software (libgcc), 20x
 * slower than F16C's 8 at a time, so CPUs with AVX2 + FMA + F16C take these instead
 * (chosen at run time, as qmatmul.c's kernels are). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define F16C_PATH 1
static int use_f16c;
__attribute__((constructor)) static void pick_f16c(void) {
    use_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
               && __builtin_cpu_supports("f16c");
}

__attribute__((target("avx2,fma,f16c"))) static float dot_half_f16c(const float *q, const half_t *k,
                                                                     int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j),
                              _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + j))), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float sum = _mm_cvtss_f32(h);
    for (; j < n; j++) sum += q[j] * (float)k[j];
    return sum;
}

__attribute__((target("avx2,fma,f16c"))) static void add_scaled_half_f16c(float w, const half_t *v,
                                                                           float *out, int64_t n) {
    const __m256 weight = _mm256_set1_ps(w);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(out + j, _mm256_fmadd_ps(weight, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + j))),
                                                  _mm256_loadu_ps(out + j)));
    for (; j < n; j++) out[j] += w * (float)v[j];
}
#endif

VECTOR_CLONES static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float sum = 0;
    for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
    const float scale = 1.0f / sqrtf(sum / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* Rotate the first rope_dim values of each head by the position's angles. */
static void rope(float *v, int64_t n_heads, const DecodeShape *s, const float *cos,
                 const float *sin) {
    const int64_t half = s->rope_dim / 2;
    for (int64_t h = 0; h < n_heads; h++) {
        float *head = v + h * s->head_dim;
        for (int64_t i = 0; i < half; i++) {
            float *a = s->neox ? head + i : head + 2 * i;
            float *b = s->neox ? head + i + half : head + 2 * i + 1;
            const float x0 = *a, x1 = *b;
            *a = x0 * cos[i] - x1 * sin[i];
            *b = x0 * sin[i] + x1 * cos[i];
        }
    }
}

static float soft_cap(float score, float cap) {
    return cap > 0 ? cap * tanhf(score / cap) : score;
}

/* Bytes of one cache row of n values (n a multiple of 32 for the block types), 0 for a
 * type the cache cannot hold. */
static int64_t cache_row_bytes(int64_t type, int64_t n) {
    switch (type) {
    case CACHE_F32: return 4 * n;
    case CACHE_F16: return 2 * n;
    case CACHE_Q8_0: return n / 32 * 34;
    case CACHE_Q4_0: return n / 32 * 18;
    default: return 0;
    }
}

/* Each run of n values of x (n a power of two dividing len) times the orthonormal n x n
 * Walsh-Hadamard matrix, as ggml's fast transform does it (scale, then butterflies); the
 * matrix is its own inverse. */
static void rotate_runs(float *x, int64_t len, int64_t n) {
    const float scale = 1.0f / sqrtf((float)n);
    for (float *run = x; run < x + len; run += n) {
        for (int64_t j = 0; j < n; j++) run[j] *= scale;
        for (int64_t half = 1; half < n; half *= 2)
            for (int64_t i = 0; i < n; i += 2 * half)
                for (int64_t j = i; j < i + half; j++) {
                    const float u = run[j], v = run[j + half];
                    run[j] = u + v;
                    run[j + half] = u - v;
                }
    }
}

/* The f16 scales of Q8_0 / Q4_0 blocks as floats, by table: read for every key and value
 * row, where a call to a conversion function would cost more than the row's dot. */
static float half_table[1 << 16];
__attribute__((constructor)) static void fill_half_table(void) {
    for (uint32_t h = 0; h < (1u << 16); h++) half_table[h] = half_to_float((uint16_t)h);
}

static inline float block_scale(const uint8_t *block) {
    uint16_t h;
    memcpy(&h, block, sizeof h);
    return half_table[h];
}

/* Integer dots of a Q8_0 query with one Q8_0 / Q4_0 key row of nb blocks, scaled per
 * block by both blocks' scales: ggml's vec_dot_q8_0_q8_0 / vec_dot_q4_0_q8_0 (the dot of
 * llama.cpp's flash attention with a quantized K cache). */
VECTOR_CLONES static float dot_q8_0(const uint8_t *key, const uint8_t *query, int64_t nb) {
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, key += 34, query += 34) {
        const int8_t *k = (const int8_t *)(key + 2), *q = (const int8_t *)(query + 2);
        int32_t isum = 0;
        for (int j = 0; j < 32; j++) isum += k[j] * q[j];
        sum += block_scale(key) * block_scale(query) * (float)isum;
    }
    return sum;
}

VECTOR_CLONES static float dot_q4_0(const uint8_t *key, const uint8_t *query, int64_t nb) {
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, key += 18, query += 34) {
        const uint8_t *k = key + 2;  /* value j in the low nibble of byte j, j + 16 high */
        const int8_t *q = (const int8_t *)(query + 2);
        int32_t isum = 0;
        for (int j = 0; j < 16; j++)
            isum += ((k[j] & 15) - 8) * q[j] + ((k[j] >> 4) - 8) * q[j + 16];
        sum += block_scale(key) * block_scale(query) * (float)isum;
    }
    return sum;
}

/* The dot of query head qh with key row `row` of cache C; for a quantized K cache with
 * the query's Q8_0 blocks qq instead (as llama.cpp rounds the query). */
VECTOR_CLONES static float key_dot(const float *qh, const uint8_t *qq, const LayerCache *C,
                                   const DecodeShape *s, int64_t row) {
    const int64_t hd = s->head_dim;
    const uint8_t *key = (const uint8_t *)C->keys + row * cache_row_bytes(s->key_type, hd);
    float dot = 0;
    switch (s->key_type) {
    case CACHE_Q8_0: return dot_q8_0(key, qq, hd / 32);
    case CACHE_Q4_0: return dot_q4_0(key, qq, hd / 32);
    case CACHE_F16:
#ifdef F16C_PATH
        if (use_f16c) return dot_half_f16c(qh, (const half_t *)key, hd);
#endif
        for (int64_t j = 0; j < hd; j++) dot += qh[j] * (float)((const half_t *)key)[j];
        return dot;
    default:
        for (int64_t j = 0; j < hd; j++) dot += qh[j] * ((const float *)key)[j];
        return dot;
    }
}

/* out += w * value row `row` of cache C; a quantized row is dequantized first (as ggml's
 * flash attention does: d * code, then the multiply-add). */
VECTOR_CLONES static void add_value(float w, const LayerCache *C, const DecodeShape *s,
                                    int64_t row, float *out) {
    const int64_t hd = s->head_dim;
    const uint8_t *value = (const uint8_t *)C->values + row * cache_row_bytes(s->value_type, hd);
    switch (s->value_type) {
    case CACHE_Q8_0:
        for (int64_t b = 0; b < hd / 32; b++, value += 34, out += 32) {
            const float d = block_scale(value);
            const int8_t *q = (const int8_t *)(value + 2);
            for (int j = 0; j < 32; j++) out[j] += w * (d * (float)q[j]);
        }
        return;
    case CACHE_Q4_0:
        for (int64_t b = 0; b < hd / 32; b++, value += 18, out += 32) {
            const float d = block_scale(value);
            const uint8_t *q = value + 2;
            for (int j = 0; j < 16; j++) {
                out[j] += w * (d * (float)((q[j] & 15) - 8));
                out[j + 16] += w * (d * (float)((q[j] >> 4) - 8));
            }
        }
        return;
    case CACHE_F16:
#ifdef F16C_PATH
        if (use_f16c) { add_scaled_half_f16c(w, (const half_t *)value, out, hd); return; }
#endif
        for (int64_t j = 0; j < hd; j++) out[j] += w * (float)((const half_t *)value)[j];
        return;
    default:
        for (int64_t j = 0; j < hd; j++) out[j] += w * ((const float *)value)[j];
    }
}

/* Softmax attention of one query head h over positions from .. n_pos - 1 of its KV head
 * in cache C. scores: room for n_pos floats. */
VECTOR_CLONES static void attend_one(const float *qh, const DecodeLayer *L, const LayerCache *C,
                                     const DecodeShape *s, int64_t h, int64_t from, int64_t n_pos,
                                     float *oh, float *scores) {
    const int64_t hd = s->head_dim, kv = h / (L->n_heads / L->n_kv);
    const float scale = s->query_scale > 0 ? s->query_scale : 1.0f / sqrtf((float)hd);
    const int64_t first = kv * C->max_tokens;  /* this KV head's first row */
    uint8_t qq[cache_row_bytes(CACHE_Q8_0, hd) + 1];  /* the query as Q8_0 blocks */
    if (s->key_type == CACHE_Q8_0 || s->key_type == CACHE_Q4_0) {
        float rotated[hd];
        memcpy(rotated, qh, sizeof rotated);
        if (s->key_rotation) rotate_runs(rotated, hd, s->key_rotation);
        s->quantize_q8_0(rotated, qq, hd, NULL);
    }
    float best = -INFINITY, total = 0;
    for (int64_t t = from; t < n_pos; t++) {
        scores[t] = soft_cap(key_dot(qh, qq, C, s, first + t) * scale, s->softcap);
        best = scores[t] > best ? scores[t] : best;
    }
    for (int64_t t = from; t < n_pos; t++) total += (scores[t] = expf(scores[t] - best));
    memset(oh, 0, sizeof(float) * (size_t)hd);
    for (int64_t t = from; t < n_pos; t++) add_value(scores[t] / total, C, s, first + t, oh);
    if (s->value_rotation) rotate_runs(oh, hd, s->value_rotation);
}

/* Store the n values of v as row `row` of a cache buffer of the given type, rotated in
 * runs of `rotation` first if that is not 0. */
static void store(void *cache, int64_t type, int64_t rotation, int64_t row, const float *v,
                  int64_t n, const DecodeShape *s) {
    uint8_t *at = (uint8_t *)cache + row * cache_row_bytes(type, n);
    float rotated[rotation ? n : 1];
    if (rotation) {
        memcpy(rotated, v, sizeof(float) * (size_t)n);
        rotate_runs(rotated, n, rotation);
        v = rotated;
    }
    switch (type) {
    case CACHE_Q8_0: s->quantize_q8_0(v, at, n, NULL); return;
    case CACHE_Q4_0: s->quantize_q4_0(v, at, n, NULL); return;
    case CACHE_F16:
        for (int64_t j = 0; j < n; j++) ((half_t *)at)[j] = (half_t)v[j];
        return;
    default: memcpy(at, v, sizeof(float) * (size_t)n);
    }
}

/* The FFN's gated hidden values: act(gate) * up, act SiLU or GELU's tanh approximation
 * in torch's formula (F.gelu(approximate="tanh")). */
static void gated(const float *gate, const float *up, int64_t n, int gelu, float *out) {
    if (gelu) {
        const float beta = 0.7978845608f, kappa = 0.044715f;  /* sqrt(2 / pi), as torch's */
        for (int64_t i = 0; i < n; i++) {
            const float g = gate[i], inner = beta * (g + kappa * (g * g * g));
            out[i] = 0.5f * g * (1.0f + tanhf(inner)) * up[i];
        }
    } else {
        for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

static void add_bias(float *v, const float *bias, int64_t n) {
    if (bias) for (int64_t i = 0; i < n; i++) v[i] += bias[i];
}

static int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Scratch space of one call, shared by the threads; every buffer holds T rows. */
typedef struct {
    float *xn, *qkv, *attn, *ffn, *hidden, *scores;
    int64_t scores_per_thread;
    Activations acts;
} Work;

/* q/k/v of one row: biases, Qwen3's q/k norms, RoPE at the row's position, and the key
 * and value stored in its sequence's cache C. */
static void place_qkv(const DecodeLayer *L, const LayerCache *C, const DecodeShape *s, float *q,
                      float *k, const float *v, int64_t pos, const float *cos, const float *sin) {
    const int64_t hd = s->head_dim, nq = L->n_heads * hd, nkv = L->n_kv * hd;
    add_bias(q, L->q_bias, nq); add_bias(k, L->k_bias, nkv); add_bias((float *)v, L->v_bias, nkv);
    if (L->q_norm) {
        for (int64_t h = 0; h < L->n_heads; h++) rms_norm(q + h * hd, L->q_norm, hd, s->eps, q + h * hd);
        for (int64_t h = 0; h < L->n_kv; h++) rms_norm(k + h * hd, L->k_norm, hd, s->eps, k + h * hd);
    }
    rope(q, L->n_heads, s, cos, sin);
    rope(k, L->n_kv, s, cos, sin);
    for (int64_t h = 0; h < L->n_kv; h++) {
        store(C->keys, s->key_type, s->key_rotation, h * C->max_tokens + pos, k + h * hd, hd, s);
        store(C->values, s->value_type, s->value_rotation, h * C->max_tokens + pos, v + h * hd,
              hd, s);
    }
}

/* x += out, row by row (the residual), out first normed by `post` where given (Gemma);
 * with a norm weight, out then holds the normed x. */
static void add_rows(float *x, float *out, int64_t T, int64_t dim, const float *post,
                     const float *norm, float eps) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *xt = x + t * dim, *ot = out + t * dim;
        if (post) rms_norm(ot, post, dim, eps, ot);
        for (int64_t i = 0; i < dim; i++) xt[i] += ot[i];
        if (norm) rms_norm(xt, norm, dim, eps, ot);
    }
}

/* Which sequence each row belongs to and its position there. */
typedef struct {
    const int64_t *seq, *pos;
    const LayerCache *caches;  /* n_seqs x n_layers, sequence-major */
    int64_t n_layers;
} Rows;

static const LayerCache *row_cache(const Rows *R, int64_t l, int64_t t) {
    return R->caches + R->seq[t] * R->n_layers + l;
}

/* The first position a query at `pos` sees: 0, or in a sliding-window layer the earliest
 * of its last `window` positions (llama.cpp masks p1 - p0 >= n_swa). */
static int64_t first_visible(const DecodeLayer *L, int64_t pos) {
    return L->window && pos >= L->window ? pos - L->window + 1 : 0;
}

/* Layer l for T token rows, run by every thread of the region. Every row goes through
 * the same operations in the same order whatever T is, whichever rows share the call and
 * whichever thread takes it, so a token's result does not depend on how a prompt was
 * split into calls or on the other sequences batched with it: a prompt-cache hit, a
 * one-token step or a batched step gives the same bits as one long prefill. */
static void layer_rows(const DecodeLayer *L, int64_t l, const DecodeShape *s, float *x,
                       const Rows *R, int64_t T, const float *cos, const float *sin, Work *w) {
    const int64_t dim = s->dim, hd = s->head_dim, half = s->rope_dim / 2;
    const int64_t nq = L->n_heads * hd, nkv = L->n_kv * hd, nqkv = nq + 2 * nkv;
    const int64_t ffn = L->ffn_dim;
    cos += L->rotation * T * half;  /* this layer's table: (T, half) of the (tables, T, half) */
    sin += L->rotation * T * half;

#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) rms_norm(x + t * dim, L->attn_norm, dim, s->eps, w->xn + t * dim);
    acts_quantize(&w->acts, 3, L->types + W_Q, w->xn, dim, T);
    const int64_t sizes_qkv[3] = {nq, nkv, nkv};
    qmatmul_rows(3, L->types + W_Q, L->weights + W_Q, sizes_qkv, &w->acts, w->qkv, dim, T);
    /* every row's key and value are in the cache before any row attends (rows see the
     * keys of the rows before them) */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *q = w->qkv + t * nqkv;
        place_qkv(L, row_cache(R, l, t), s, q, q + nq, q + nq + nkv, R->pos[t], cos + t * half,
                  sin + t * half);
    }
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < L->n_heads; h++)
            attend_one(w->qkv + t * nqkv + h * hd, L, row_cache(R, l, t), s, h,
                       first_visible(L, R->pos[t]), R->pos[t] + 1, w->attn + t * nq + h * hd,
                       w->scores + thread_index() * w->scores_per_thread);
    acts_quantize(&w->acts, 1, L->types + W_O, w->attn, nq, T);
    qmatmul_rows(1, L->types + W_O, L->weights + W_O, &dim, &w->acts, w->xn, nq, T);
    add_rows(x, w->xn, T, dim, L->attn_post_norm, L->ffn_norm, s->eps);
    acts_quantize(&w->acts, 2, L->types + W_GATE, w->xn, dim, T);
    const int64_t sizes_ffn[2] = {ffn, ffn};
    qmatmul_rows(2, L->types + W_GATE, L->weights + W_GATE, sizes_ffn, &w->acts, w->ffn, dim, T);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *gate = w->ffn + t * 2 * ffn, *up = gate + ffn;
        gated(gate, up, ffn, (int)s->gelu, w->hidden + t * ffn);
    }
    acts_quantize(&w->acts, 1, L->types + W_DOWN, w->hidden, ffn, T);
    qmatmul_rows(1, L->types + W_DOWN, L->weights + W_DOWN, &dim, &w->acts, w->xn, ffn, T);
    add_rows(x, w->xn, T, dim, L->ffn_post_norm, NULL, s->eps);
}

/* 0 when the layer's description is consistent and its buffers are as large as its shapes
 * say, else a KernelError. */
static int check_layer(const DecodeLayer *L, const DecodeShape *s, int64_t n_rotations) {
    if (L->n_kv < 1 || L->n_heads < 1 || L->n_heads % L->n_kv || L->ffn_dim < 1) return ERR_HEADS;
    if (L->window < 0 || L->rotation < 0 || L->rotation >= n_rotations) return ERR_ATTENTION;
    const int64_t nq = L->n_heads * s->head_dim, nkv = L->n_kv * s->head_dim;
    int status;
    if ((status = qmatmul_check(3, L->types + W_Q, s->dim, 1))
        || (status = qmatmul_check(1, L->types + W_O, nq, 1))
        || (status = qmatmul_check(2, L->types + W_GATE, s->dim, 1))
        || (status = qmatmul_check(1, L->types + W_DOWN, L->ffn_dim, 1)))
        return status;
    /* rows and row length of q k v o gate up down */
    const int64_t rows[N_WEIGHTS] = {nq, nkv, nkv, s->dim, L->ffn_dim, L->ffn_dim, s->dim};
    const int64_t cols[N_WEIGHTS] = {s->dim, s->dim, s->dim, nq, s->dim, s->dim, L->ffn_dim};
    for (int i = 0; i < N_WEIGHTS; i++)
        if (!L->weights[i] || L->weight_bytes[i] != rows[i] * row_bytes(L->types[i], cols[i]))
            return ERR_BUFFER;
    if (!x8_aligned(3, L->types + W_Q, rows + W_Q) || !x8_aligned(1, L->types + W_O, rows + W_O)
        || !x8_aligned(2, L->types + W_GATE, rows + W_GATE) || !x8_aligned(1, L->types + W_DOWN, rows + W_DOWN))
        return ERR_SHAPE;
    if (!L->attn_norm || !L->ffn_norm || (!L->q_norm) != (!L->k_norm)) return ERR_BUFFER;
    return 0;
}

/* The cache types: known, and a quantized one with whole blocks and its quantizers; the
 * rotations: none, or for a quantized type a power of two that divides a head. */
static int check_cache_types(const DecodeShape *s) {
    const int64_t types[2] = {s->key_type, s->value_type};
    const int64_t rotations[2] = {s->key_rotation, s->value_rotation};
    for (int i = 0; i < 2; i++) {
        const int64_t n = rotations[i];
        const int quantized = types[i] == CACHE_Q8_0 || types[i] == CACHE_Q4_0;
        if (!cache_row_bytes(types[i], s->head_dim)) return ERR_TYPE;
        if (n < 0 || (n && (!quantized || n & (n - 1) || s->head_dim % n))) return ERR_SHAPE;
        if (quantized) {
            if (s->head_dim % 32) return ERR_SHAPE;
            /* a quantized K cache quantizes the query to Q8_0 too */
            if (!s->quantize_q8_0 || (types[i] == CACHE_Q4_0 && !s->quantize_q4_0)) return ERR_TYPE;
        }
    }
    return 0;
}

static int check_cache(const LayerCache *C, const DecodeLayer *L, const DecodeShape *s) {
    const int64_t rows = L->n_kv * C->max_tokens;
    const int status = check_cache_types(s);
    if (status) return status;
    if (C->max_tokens < 1 || !C->keys || !C->values
        || C->key_bytes != rows * cache_row_bytes(s->key_type, s->head_dim)
        || C->value_bytes != rows * cache_row_bytes(s->value_type, s->head_dim))
        return ERR_BUFFER;
    return 0;
}

/* Whether v is a finite number, by its bits: -ffast-math lets the compiler assume
 * isfinite() and NaN comparisons away. */
static int is_finite_bits(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

static int check_shape(const DecodeShape *s) {
    if (s->dim < 1 || s->head_dim < 1) return ERR_SHAPE;
    if (s->rope_dim < 2 || s->rope_dim > s->head_dim || s->rope_dim % 2) return ERR_HEADS;
    if (!is_finite_bits(s->query_scale) || s->query_scale < 0 || !is_finite_bits(s->softcap)
        || s->softcap < 0 || (s->gelu != 0 && s->gelu != 1))
        return ERR_ATTENTION;
    return 0;
}

/* x (T, dim): the new tokens' embeddings, updated in place to the last layer's output.
 * caches: n_seqs x n_layers KV caches (sequence-major); row t belongs to sequence
 * row_seq[t] at position row_pos[t] (the rows of one sequence in increasing positions,
 * the positions before its first row already in its cache). cos/sin: n_rotations RoPE
 * tables (n_rotations, T, rope_dim/2) of angles for the rows' positions, each layer
 * rotating by the one it names (Gemma's local layers have a base of their own). Returns
 * 0, or a KernelError if the description is inconsistent (checked before any work, so x
 * and the caches are then unchanged). */
int llmpress_forward(const DecodeShape *s, const DecodeLayer *layers, int64_t n_layers,
                     const LayerCache *caches, int64_t n_seqs, float *x, int64_t x_floats,
                     int64_t T, const int64_t *row_seq, const int64_t *row_pos, const float *cos,
                     const float *sin, int64_t n_rotations, int64_t angle_floats, int n_threads) {
    int status;
    if (!s || !layers || !caches || !x || !row_seq || !row_pos || !cos || !sin || n_layers < 1
        || n_seqs < 1 || n_rotations < 1)
        return ERR_BUFFER;
    if ((status = check_shape(s))) return status;
    if (T < 1 || x_floats != s->dim * T || angle_floats != n_rotations * (s->rope_dim / 2) * T)
        return ERR_BUFFER;
    if (n_threads < 1) return ERR_THREADS;
    int64_t widest_q = 0, widest_kv = 0, widest_ffn = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const DecodeLayer *L = layers + l;
        if ((status = check_layer(L, s, n_rotations))) return status;
        widest_q = L->n_heads * s->head_dim > widest_q ? L->n_heads * s->head_dim : widest_q;
        widest_kv = L->n_kv * s->head_dim > widest_kv ? L->n_kv * s->head_dim : widest_kv;
        widest_ffn = L->ffn_dim > widest_ffn ? L->ffn_dim : widest_ffn;
    }
    for (int64_t q = 0; q < n_seqs; q++)
        for (int64_t l = 0; l < n_layers; l++) {
            const LayerCache *C = caches + q * n_layers + l;
            if ((status = check_cache(C, layers + l, s))) return status;
            if (C->max_tokens != caches[q * n_layers].max_tokens) return ERR_BUFFER;
        }
    int64_t longest = 0;  /* positions one row attends to, at most */
    for (int64_t t = 0; t < T; t++) {
        if (row_seq[t] < 0 || row_seq[t] >= n_seqs) return ERR_BUFFER;
        if (row_pos[t] < 0 || row_pos[t] >= caches[row_seq[t] * n_layers].max_tokens)
            return ERR_POSITION;
        longest = row_pos[t] + 1 > longest ? row_pos[t] + 1 : longest;
    }
    int64_t widest_in = widest_ffn > widest_q ? widest_ffn : widest_q;
    widest_in = s->dim > widest_in ? s->dim : widest_in;
    Work w;
    w.scores_per_thread = longest;
    const int64_t row_floats = s->dim + (widest_q + 2 * widest_kv) + widest_q + 2 * widest_ffn
                               + widest_ffn;
    float *buffer = malloc(sizeof(float) * (size_t)(T * row_floats + n_threads * w.scores_per_thread));
    if (!buffer || acts_alloc(&w.acts, widest_in, T)) {
        free(buffer);
        return ERR_MEMORY;
    }
    w.xn = buffer;
    w.qkv = w.xn + T * s->dim;
    w.attn = w.qkv + T * (widest_q + 2 * widest_kv);
    w.ffn = w.attn + T * widest_q;
    w.hidden = w.ffn + T * 2 * widest_ffn;
    w.scores = w.hidden + T * widest_ffn;
    const Rows rows = {row_seq, row_pos, caches, n_layers};
#pragma omp parallel num_threads(n_threads)
    for (int64_t l = 0; l < n_layers; l++)
        layer_rows(layers + l, l, s, x, &rows, T, cos, sin, &w);
    acts_free(&w.acts);
    free(buffer);
    return 0;
}
