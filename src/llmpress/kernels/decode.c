/* One decode step (a single new token) through every decoder layer in one call.
 *
 * Mirrors LlamaModel's layer (models/llama.py) operation for operation — RMSNorm, fused
 * q/k/v matmul (+ Qwen2 biases, Qwen3 q/k norms), RoPE, KV-cache append, grouped-query
 * attention, output projection, RMSNorm, SiLU-gated FFN — so that generating a token
 * costs one call from Python instead of ~30 small torch operations per layer, whose
 * fixed overheads otherwise exceed the matmuls themselves on a small model.
 * Matmuls use llmpress_qmatmul (qmatmul.c); activations stay float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int llmpress_qmatmul(int n_weights, const int *types, const uint8_t *const *ws,
                     const int64_t *Ns, const float *x, float *y, int64_t K, int64_t T,
                     int n_threads);

enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, N_WEIGHTS };

typedef struct {  /* one decoder layer, filled in from Python (kernels/decode.py) */
    int64_t n_heads, n_kv, ffn_dim;
    const float *attn_norm, *ffn_norm;
    const float *q_norm, *k_norm;           /* Qwen3, else NULL */
    const float *q_bias, *k_bias, *v_bias;  /* Qwen2, else NULL */
    int types[N_WEIGHTS];                   /* ggml type ids */
    const uint8_t *weights[N_WEIGHTS];
    float *keys, *values;                   /* KV cache, (n_kv, max_tokens, head_dim) */
} DecodeLayer;

typedef struct {
    int64_t dim, head_dim, rope_dim, max_tokens;
    int64_t neox;  /* RoPE pairs (i, i + d/2) instead of (2i, 2i + 1) */
    float eps;
} DecodeShape;

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
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

/* Softmax attention of each query head over positions 0..n_pos-1 of its KV head. */
static void attend(const float *q, const DecodeLayer *L, const DecodeShape *s, int64_t n_pos,
                   float *out, int n_threads) {
    const int64_t hd = s->head_dim, group = L->n_heads / L->n_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    float *scores = malloc(sizeof(float) * (size_t)(L->n_heads * n_pos));
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_pos >= 256)
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
    free(scores);
}

static void add_bias(float *v, const float *bias, int64_t n) {
    if (bias) for (int64_t i = 0; i < n; i++) v[i] += bias[i];
}

static int layer_step(const DecodeLayer *L, const DecodeShape *s, float *x, int64_t pos,
                      const float *cos, const float *sin, float *work, int n_threads) {
    const int64_t dim = s->dim, hd = s->head_dim;
    const int64_t nq = L->n_heads * hd, nkv = L->n_kv * hd;
    float *xn = work, *qkv = xn + dim, *attn = qkv + nq + 2 * nkv, *ffn = attn + nq;

    rms_norm(x, L->attn_norm, dim, s->eps, xn);
    const int64_t sizes_qkv[3] = {nq, nkv, nkv};
    if (llmpress_qmatmul(3, L->types + W_Q, L->weights + W_Q, sizes_qkv, xn, qkv, dim, 1,
                         n_threads)) return -1;
    float *q = qkv, *k = qkv + nq, *v = qkv + nq + nkv;
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
    attend(q, L, s, pos + 1, attn, n_threads);
    if (llmpress_qmatmul(1, L->types + W_O, L->weights + W_O, &dim, attn, xn, nq, 1,
                         n_threads)) return -1;
    for (int64_t i = 0; i < dim; i++) x[i] += xn[i];

    rms_norm(x, L->ffn_norm, dim, s->eps, xn);
    const int64_t sizes_ffn[2] = {L->ffn_dim, L->ffn_dim};
    if (llmpress_qmatmul(2, L->types + W_GATE, L->weights + W_GATE, sizes_ffn, xn, ffn, dim, 1,
                         n_threads)) return -1;
    float *gate = ffn, *up = ffn + L->ffn_dim;
    for (int64_t i = 0; i < L->ffn_dim; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    if (llmpress_qmatmul(1, L->types + W_DOWN, L->weights + W_DOWN, &dim, gate, xn, L->ffn_dim,
                         1, n_threads)) return -1;
    for (int64_t i = 0; i < dim; i++) x[i] += xn[i];
    return 0;
}

/* x (dim): the new token's embedding, updated in place to the last layer's output.
 * pos: its position (the number of tokens already in the cache). cos/sin: rope_dim/2
 * angles for that position. Returns 0, or -1 if a matmul refused its type or shape. */
int llmpress_decode(const DecodeShape *s, const DecodeLayer *layers, int64_t n_layers,
                    float *x, int64_t pos, const float *cos, const float *sin, int n_threads) {
    int64_t widest = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const DecodeLayer *L = layers + l;
        const int64_t need = 2 * (L->n_heads + L->n_kv) * s->head_dim + 2 * L->ffn_dim;
        widest = need > widest ? need : widest;
    }
    float *work = malloc(sizeof(float) * (size_t)(s->dim + widest));
    if (!work) return -1;
    int status = 0;
    for (int64_t l = 0; l < n_layers && !status; l++)
        status = layer_step(layers + l, s, x, pos, cos, sin, work, n_threads);
    free(work);
    return status;
}
