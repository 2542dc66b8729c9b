/* One decode step (a single new token) through every decoder layer in one call.
 *
 * Mirrors LlamaModel's layer (models/llama.py) operation for operation — RMSNorm, fused
 * q/k/v matmul (+ Qwen2 biases, Qwen3 q/k norms), RoPE, KV-cache append, grouped-query
 * attention, output projection, RMSNorm, SiLU-gated FFN — so that generating a token
 * costs one call from Python instead of ~30 small torch operations per layer, whose
 * fixed overheads otherwise exceed the matmuls themselves on a small model.
 * Matmuls use qmatmul.c's integer row kernels on activations quantized once per group. The whole step is one
 * OpenMP parallel region: matmul rows and attention heads are shared out among the
 * threads, the small vector work between them runs on one thread (`omp single`), and the
 * implicit barriers keep the order: one fork/join per token instead of one per matmul
 * (worth about 2% on the default model with 2 threads; the matmuls dominate).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    float *keys, *values;                   /* KV cache, (n_kv, max_tokens, head_dim) */
    int64_t cache_floats;                   /* size of keys and of values */
} DecodeLayer;

typedef struct {
    int64_t dim, head_dim, rope_dim, max_tokens;
    int64_t neox;  /* RoPE pairs (i, i + d/2) instead of (2i, 2i + 1) */
    float eps;
} DecodeShape;

/* The float loops below (norms, attention) get an AVX2 copy too, chosen at load (GCC's
 * ifunc), since the build targets plain x86-64. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
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

/* Softmax attention of each query head over positions 0..n_pos-1 of its KV head; heads
 * shared out among the threads. scores: n_heads * n_pos floats. */
VECTOR_CLONES static void attend(const float *q, const DecodeLayer *L, const DecodeShape *s, int64_t n_pos,
                   float *out, float *scores) {
    const int64_t hd = s->head_dim, group = L->n_heads / L->n_kv;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp for schedule(static)
    for (int64_t h = 0; h < L->n_heads; h++) {
        const float *qh = q + h * hd;
        const float *keys = L->keys + (h / group) * s->max_tokens * hd;
        const float *values = L->values + (h / group) * s->max_tokens * hd;
        float *p = scores + h * n_pos, best = -INFINITY, total = 0;
        for (int64_t t = 0; t < n_pos; t++) {
            float dot = 0;
            for (int64_t j = 0; j < hd; j++) dot += qh[j] * keys[t * hd + j];
            p[t] = dot * scale;
            best = p[t] > best ? p[t] : best;
        }
        for (int64_t t = 0; t < n_pos; t++) total += (p[t] = expf(p[t] - best));
        float *oh = out + h * hd;
        memset(oh, 0, sizeof(float) * (size_t)hd);
        for (int64_t t = 0; t < n_pos; t++) {
            const float w = p[t] / total;
            for (int64_t j = 0; j < hd; j++) oh[j] += w * values[t * hd + j];
        }
    }
}

static void add_bias(float *v, const float *bias, int64_t n) {
    if (bias) for (int64_t i = 0; i < n; i++) v[i] += bias[i];
}

/* Scratch space of one step, shared by the threads. */
typedef struct {
    float *xn, *qkv, *attn, *ffn, *scores;
    Activations acts;
} Work;

/* One layer, run by every thread of the region. */
static void layer_step(const DecodeLayer *L, const DecodeShape *s, float *x, int64_t pos,
                       const float *cos, const float *sin, Work *w) {
    const int64_t dim = s->dim, hd = s->head_dim;
    const int64_t nq = L->n_heads * hd, nkv = L->n_kv * hd;
    float *q = w->qkv, *k = w->qkv + nq, *v = w->qkv + nq + nkv;

#pragma omp single
    {
        rms_norm(x, L->attn_norm, dim, s->eps, w->xn);
        acts_quantize(&w->acts, 3, L->types + W_Q, w->xn, dim, 1);
    }
    const int64_t sizes_qkv[3] = {nq, nkv, nkv};
    qmatmul_rows(3, L->types + W_Q, L->weights + W_Q, sizes_qkv, &w->acts, w->qkv, dim, 1);
#pragma omp single
    {
        add_bias(q, L->q_bias, nq); add_bias(k, L->k_bias, nkv); add_bias(v, L->v_bias, nkv);
        if (L->q_norm) {
            for (int64_t h = 0; h < L->n_heads; h++) rms_norm(q + h * hd, L->q_norm, hd, s->eps, q + h * hd);
            for (int64_t h = 0; h < L->n_kv; h++) rms_norm(k + h * hd, L->k_norm, hd, s->eps, k + h * hd);
        }
        rope(q, L->n_heads, s, cos, sin);
        rope(k, L->n_kv, s, cos, sin);
        for (int64_t h = 0; h < L->n_kv; h++) {
            memcpy(L->keys + (h * s->max_tokens + pos) * hd, k + h * hd, sizeof(float) * (size_t)hd);
            memcpy(L->values + (h * s->max_tokens + pos) * hd, v + h * hd, sizeof(float) * (size_t)hd);
        }
    }
    attend(q, L, s, pos + 1, w->attn, w->scores);
#pragma omp single
    acts_quantize(&w->acts, 1, L->types + W_O, w->attn, nq, 1);
    qmatmul_rows(1, L->types + W_O, L->weights + W_O, &dim, &w->acts, w->xn, nq, 1);
#pragma omp single
    {
        for (int64_t i = 0; i < dim; i++) x[i] += w->xn[i];
        rms_norm(x, L->ffn_norm, dim, s->eps, w->xn);
        acts_quantize(&w->acts, 2, L->types + W_GATE, w->xn, dim, 1);
    }
    const int64_t sizes_ffn[2] = {L->ffn_dim, L->ffn_dim};
    qmatmul_rows(2, L->types + W_GATE, L->weights + W_GATE, sizes_ffn, &w->acts, w->ffn, dim, 1);
    float *gate = w->ffn, *up = w->ffn + L->ffn_dim;
#pragma omp single
    {
        for (int64_t i = 0; i < L->ffn_dim; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        acts_quantize(&w->acts, 1, L->types + W_DOWN, gate, L->ffn_dim, 1);
    }
    qmatmul_rows(1, L->types + W_DOWN, L->weights + W_DOWN, &dim, &w->acts, w->xn, L->ffn_dim, 1);
#pragma omp single
    for (int64_t i = 0; i < dim; i++) x[i] += w->xn[i];
}

/* 0 when the layer's description is consistent and its buffers are as large as its shapes
 * say, else a KernelError. */
static int check_layer(const DecodeLayer *L, const DecodeShape *s) {
    if (L->n_kv < 1 || L->n_heads < 1 || L->n_heads % L->n_kv || L->ffn_dim < 1) return ERR_HEADS;
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
    if (!L->attn_norm || !L->ffn_norm || !L->keys || !L->values || (!L->q_norm) != (!L->k_norm)
        || L->cache_floats != nkv * s->max_tokens)
        return ERR_BUFFER;
    return 0;
}

static int check_shape(const DecodeShape *s) {
    if (s->dim < 1 || s->head_dim < 1 || s->max_tokens < 1) return ERR_SHAPE;
    if (s->rope_dim < 2 || s->rope_dim > s->head_dim || s->rope_dim % 2) return ERR_HEADS;
    return 0;
}

/* x (dim): the new token's embedding, updated in place to the last layer's output.
 * pos: its position (the number of tokens already in the cache). cos/sin: rope_dim/2
 * angles for that position. Returns 0, or a KernelError if the description is
 * inconsistent (checked before any work, so x and the cache are then unchanged). */
int llmpress_decode(const DecodeShape *s, const DecodeLayer *layers, int64_t n_layers,
                    float *x, int64_t x_floats, int64_t pos, const float *cos,
                    const float *sin, int n_threads) {
    int status;
    if (!s || !layers || !x || !cos || !sin || n_layers < 1) return ERR_BUFFER;
    if ((status = check_shape(s))) return status;
    if (x_floats != s->dim) return ERR_BUFFER;
    if (n_threads < 1) return ERR_THREADS;
    if (pos < 0 || pos >= s->max_tokens) return ERR_POSITION;
    int64_t widest_q = 0, widest_kv = 0, widest_ffn = 0, most_heads = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const DecodeLayer *L = layers + l;
        if ((status = check_layer(L, s))) return status;
        widest_q = L->n_heads * s->head_dim > widest_q ? L->n_heads * s->head_dim : widest_q;
        widest_kv = L->n_kv * s->head_dim > widest_kv ? L->n_kv * s->head_dim : widest_kv;
        widest_ffn = L->ffn_dim > widest_ffn ? L->ffn_dim : widest_ffn;
        most_heads = L->n_heads > most_heads ? L->n_heads : most_heads;
    }
    int64_t widest_in = widest_ffn > widest_q ? widest_ffn : widest_q;
    widest_in = s->dim > widest_in ? s->dim : widest_in;
    const size_t n_floats = (size_t)(s->dim + widest_q + 2 * widest_kv + widest_q
                                     + 2 * widest_ffn + most_heads * (pos + 1));
    float *buffer = malloc(sizeof(float) * n_floats);
    Work w;
    if (!buffer || acts_alloc(&w.acts, widest_in, 1)) {
        free(buffer);
        return ERR_MEMORY;
    }
    w.xn = buffer;
    w.qkv = w.xn + s->dim;
    w.attn = w.qkv + widest_q + 2 * widest_kv;
    w.ffn = w.attn + widest_q;
    w.scores = w.ffn + 2 * widest_ffn;
#pragma omp parallel num_threads(n_threads)
    for (int64_t l = 0; l < n_layers; l++)
        layer_step(layers + l, s, x, pos, cos, sin, &w);
    acts_free(&w.acts);
    free(buffer);
    return 0;
}
