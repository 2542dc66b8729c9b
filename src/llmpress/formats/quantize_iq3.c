/* Block quantizers for IQ3_XXS, IQ3_S (3-bit grid i-quants) and TQ1_0, TQ2_0 (ternary),
 * byte-identical with ggml's ggml_quantize_chunk. Compiled like quantize.c (no fast-math,
 * no FMA contraction); every float step below is ggml's, in ggml's order.
 *
 * The IQ3 types store, per 4 weights, an index into a grid of 4-level patterns (each
 * level one of 8). The grids are not in this file: Python hands gguf-py's copy over once,
 * through llmpress_quantize_set_iq3_grid, before any quantize call (formats/cquant.py),
 * and this file derives what the search needs from it: the level codes of each entry, a
 * map from any 4-level pattern to its entry, and for patterns off the grid the list of
 * nearest entries to try.
 */
#include <float.h>
#include <stdlib.h>

#include "quantize.h"

/* ------------------------------------------------------------------ the grids */

#define IQ3_LEVELS 8
#define IQ3_PATTERNS 4096 /* 4 levels of 3 bits */

typedef struct {
    int ready;                          /* set last, after everything below is built */
    int size;                           /* 256 entries (IQ3_XXS) or 512 (IQ3_S) */
    uint8_t codes[512][4];              /* level code (0..7) of each entry's 4 values */
    float odd[512][4];                  /* 2 * code + 1: the values ggml's search compares */
    int16_t entry_of[IQ3_PATTERNS];     /* pattern -> grid entry, -1 if off the grid */
    int32_t near_start[IQ3_PATTERNS];   /* off-grid pattern: its nearest entries are */
    uint16_t near_count[IQ3_PATTERNS];  /*   near_list[near_start ..+ near_count] */
    uint16_t *near_list;
} iq3_grid_t;

static iq3_grid_t IQ3_GRID_256, IQ3_GRID_512;

static inline int pattern_of(const int8_t *codes) {
    return codes[0] | codes[1] << 3 | codes[2] << 6 | codes[3] << 9;
}

/* Rank each grid value among the grid's distinct values: the level codes 0..7. */
static int grid_codes(iq3_grid_t *g, const uint8_t *values) {
    int seen[256] = {0};
    for (int i = 0; i < 4 * g->size; ++i) seen[values[i]] = 1;
    int rank[256], n_levels = 0;
    for (int v = 0; v < 256; ++v) rank[v] = seen[v] ? n_levels++ : -1;
    if (n_levels != IQ3_LEVELS) return ERR_ARGS;
    for (int j = 0; j < g->size; ++j) {
        for (int i = 0; i < 4; ++i) {
            g->codes[j][i] = (uint8_t)rank[values[4 * j + i]];
            g->odd[j][i] = 2 * g->codes[j][i] + 1;
        }
    }
    return OK;
}

/* Squared distances from `pattern` to every entry, in level units (ggml measures in
 * units of 2*level+1, a factor of 4 that orders them the same). */
static void distances_to(const iq3_grid_t *g, int pattern, int *d2) {
    for (int j = 0; j < g->size; ++j) {
        int sum = 0;
        for (int i = 0; i < 4; ++i) {
            int diff = g->codes[j][i] - ((pattern >> (3 * i)) & 7);
            sum += diff * diff;
        }
        d2[j] = sum;
    }
}

/* The entries at the `n_shells` smallest distinct distances, nearest shell first, by
 * entry number within a shell: the candidates ggml tries, in its order. Returns their
 * count, written to `out` (NULL: count only). */
static int nearest_entries(const iq3_grid_t *g, const int *d2, int n_shells, uint16_t *out) {
    int count = 0, shell = -1;
    for (int s = 0; s < n_shells; ++s) {
        int next = INT32_MAX;
        for (int j = 0; j < g->size; ++j) {
            if (d2[j] > shell && d2[j] < next) next = d2[j];
        }
        if (next == INT32_MAX) break;
        shell = next;
        for (int j = 0; j < g->size; ++j) {
            if (d2[j] != shell) continue;
            if (out) out[count] = (uint16_t)j;
            ++count;
        }
    }
    return count;
}

static int build_grid(iq3_grid_t *g, int size, const uint8_t *values) {
    g->size = size;
    if (grid_codes(g, values) != OK) return ERR_ARGS;
    for (int p = 0; p < IQ3_PATTERNS; ++p) g->entry_of[p] = -1;
    for (int j = 0; j < size; ++j) {
        int8_t codes[4] = {(int8_t)g->codes[j][0], (int8_t)g->codes[j][1],
                           (int8_t)g->codes[j][2], (int8_t)g->codes[j][3]};
        int p = pattern_of(codes);
        if (g->entry_of[p] >= 0) return ERR_ARGS; /* two entries with one pattern */
        g->entry_of[p] = (int16_t)j;
    }
    if (g->entry_of[0] < 0) return ERR_ARGS; /* the all-zero group stores pattern 0 */
    const int n_shells = size == 256 ? 2 : 3; /* ggml's choice per grid */
    int d2[512];
    int64_t total = 0;
    for (int p = 0; p < IQ3_PATTERNS; ++p) {
        if (g->entry_of[p] >= 0) continue;
        distances_to(g, p, d2);
        total += nearest_entries(g, d2, n_shells, NULL);
    }
    g->near_list = malloc((size_t)total * sizeof(uint16_t));
    if (!g->near_list) return ERR_ARGS;
    int32_t next = 0;
    for (int p = 0; p < IQ3_PATTERNS; ++p) {
        g->near_start[p] = next;
        g->near_count[p] = 0;
        if (g->entry_of[p] >= 0) continue;
        distances_to(g, p, d2);
        int n = nearest_entries(g, d2, n_shells, g->near_list + next);
        g->near_count[p] = (uint16_t)n;
        next += n;
    }
    return OK;
}

/* Hand over one grid: `values` is gguf-py's grid (size x 4 bytes, 8 distinct values),
 * size 256 (IQ3_XXS) or 512 (IQ3_S). Call once per grid, before quantizing, from one
 * thread; later calls for a built grid change nothing. */
int llmpress_quantize_set_iq3_grid(int size, const uint8_t *values) {
    if (!values || (size != 256 && size != 512)) return ERR_ARGS;
    iq3_grid_t *g = size == 256 ? &IQ3_GRID_256 : &IQ3_GRID_512;
    if (g->ready) return OK;
    free(g->near_list);
    g->near_list = NULL;
    int status = build_grid(g, size, values);
    if (status == OK) g->ready = 1;
    return status;
}

int llmpress_quantize_iq3_ready(void) { return IQ3_GRID_256.ready && IQ3_GRID_512.ready; }

/* Checked before any row: a row quantized without its grid would be all zeros. */
int iq3_prepare(int type, const float *imatrix) {
    (void)imatrix;
    return (type == T_IQ3_XXS ? IQ3_GRID_256.ready : IQ3_GRID_512.ready) ? OK : ERR_NO_GRID;
}

/* ------------------------------------------------------------------ IQ3 groups of 32 */

#define IQ3_TOP 15 /* 2*8-1: the largest odd level */

typedef float lanes_f __attribute__((vector_size(16))); /* 4 candidates side by side */

/* ggml's iq3_find_best_neighbour: the nearest entry (weighted) among an off-grid
 * pattern's candidates at `scale`, the first one on ties; writes its codes to L, returns
 * the entry. Four candidates are measured at once, each lane with ggml's own operations
 * in ggml's order (elementwise float ops round as the scalar ones do). */
static int best_near_entry(const iq3_grid_t *g, int pattern, const float *xval,
                           const float *weight, float scale, int8_t *L) {
    const uint16_t *candidates = g->near_list + g->near_start[pattern];
    const int count = g->near_count[pattern];
    float best_d2 = FLT_MAX;
    int best = candidates[0];
    for (int c = 0; c < count; c += 4) {
        int lane_entry[4];
        for (int l = 0; l < 4; ++l) lane_entry[l] = candidates[MIN(c + l, count - 1)];
        lanes_f d2 = {0, 0, 0, 0};
        for (int i = 0; i < 4; ++i) {
            lanes_f q = {g->odd[lane_entry[0]][i], g->odd[lane_entry[1]][i],
                         g->odd[lane_entry[2]][i], g->odd[lane_entry[3]][i]};
            lanes_f diff = scale * q - xval[i];
            d2 += weight[i] * diff * diff;
        }
        for (int l = 0; l < 4 && c + l < count; ++l) {
            if (d2[l] < best_d2) {
                best_d2 = d2[l];
                best = lane_entry[l];
            }
        }
    }
    for (int i = 0; i < 4; ++i) L[i] = (int8_t)g->codes[best][i];
    return best;
}

/* The level codes of 4 values at inverse scale `id`: the pattern, or on the grid. */
static inline int round_pattern(const float *xval, float id, int8_t *L) {
    for (int i = 0; i < 4; ++i) {
        int l = nearest_int(0.5f * (id * xval[i] - 1));
        L[i] = (int8_t)MAX(0, MIN(IQ3_LEVELS - 1, l));
    }
    return pattern_of(L);
}

/* Snap 4 values to the grid at (inverse) scale: 1 if they fell on it as rounded. */
static inline int snap_to_grid(const iq3_grid_t *g, const float *xval, const float *waux,
                               float id, float scale, int8_t *L) {
    int pattern = round_pattern(xval, id, L);
    if (g->entry_of[pattern] >= 0) return 1;
    best_near_entry(g, pattern, xval, waux, scale, L);
    return 0;
}

static inline void weighted_sums(const float *weight, const float *xval, const int8_t *L,
                                 float *sumqx, float *sumq2) {
    float qx = 0, q2 = 0;
    for (int i = 0; i < 32; ++i) {
        float w = weight[i];
        float q = 2 * L[i] + 1;
        qx += w * xval[i] * q;
        q2 += w * q * q;
    }
    *sumqx = qx;
    *sumq2 = q2;
}

typedef struct {
    const iq3_grid_t *grid;
    int steps;        /* scales tried: max / (15 + 0.2 s), s in -steps..steps */
    int even_signs;   /* IQ3_XXS: 7 sign bits per 8 values, the 8th implied by parity */
    float zero_below; /* a group whose largest |x| is under this (or 0) is stored as zero */
    int refine_all;   /* IQ3_S re-snaps every 4 values at the final scale, not just the
                       * ones that were off the grid */
} iq3_variant_t;

/* |x| into xval and the sign bits of each 8 values (quantize.h: split_signs_8). */
static void split_signs(const iq3_variant_t *v, const float *x, const float *weight,
                        float *xval, uint8_t *signs) {
    for (int k = 0; k < 4; ++k)
        signs[k] = split_signs_8(x + 8 * k, weight + 8 * k, xval + 8 * k, v->even_signs);
}

/* One group of 32: returns 0 if it is stored as zero, else 1 with its scale, 4 sign
 * bytes and 8 grid entries. */
static int iq3_group(const iq3_variant_t *v, const float *x, const float *weight,
                     float *scale_out, uint8_t *signs, int *entries) {
    const iq3_grid_t *g = v->grid;
    float xval[32], waux[32];
    int8_t L[32], trial[32];
    int on_grid[8], trial_on_grid[8];
    for (int i = 0; i < 32; ++i) waux[i] = sqrtf(weight[i]);
    split_signs(v, x, weight, xval, signs);
    float max = xval[0];
    for (int i = 1; i < 32; ++i) max = MAX(max, xval[i]);
    if (max < v->zero_below || max == 0) return 0;

    memset(L, 0, 32);
    for (int k = 0; k < 8; ++k) on_grid[k] = !v->refine_all;
    float best = 0, scale = max / IQ3_TOP;
    for (int s = -v->steps; s <= v->steps; ++s) {
        float id = (IQ3_TOP + s * 0.2f) / max;
        float this_scale = 1 / id;
        for (int k = 0; k < 8; ++k) {
            trial_on_grid[k] = snap_to_grid(g, xval + 4 * k, waux + 4 * k, id, this_scale,
                                            trial + 4 * k);
        }
        float sumqx, sumq2;
        weighted_sums(weight, xval, trial, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, trial, 32);
            memcpy(on_grid, trial_on_grid, sizeof(on_grid));
        }
    }

    int n_off = 0;
    for (int k = 0; k < 8; ++k) n_off += !on_grid[k];
    if (n_off > 0 && scale > 0) { /* re-snap at the chosen scale, then refit it */
        float id = 1 / scale;
        for (int k = 0; k < 8; ++k) {
            if (!v->refine_all && on_grid[k]) continue;
            snap_to_grid(g, xval + 4 * k, waux + 4 * k, id, scale, L + 4 * k);
        }
        float sumqx, sumq2;
        weighted_sums(weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    if (scale < 0) { /* negative importance weights: store |scale|, flip the signs */
        scale = -scale;
        for (int k = 0; k < 4; ++k) signs[k] = v->even_signs ? ~signs[k] & 127 : ~signs[k];
    }
    for (int k = 0; k < 8; ++k) {
        int entry = g->entry_of[pattern_of(L + 4 * k)];
        entries[k] = entry >= 0 ? entry : 0; /* always on the grid: ggml aborts otherwise */
    }
    *scale_out = scale;
    return 1;
}

/* Per-value weights of one group: the imatrix times sqrt(sigma2 + x^2), or x^2. */
static void iq3_weights(const float *x, const float *qw, float sigma2, float *weight) {
    for (int i = 0; i < 32; ++i) weight[i] = qw ? qw[i] * sqrtf(sigma2 + x[i] * x[i]) : x[i] * x[i];
}

/* The 4-bit group scale: l with d * (2l + 1) nearest the group's scale. */
static inline int group_scale_code(float id, float scale) {
    int l = nearest_int(0.5f * (id * scale - 1));
    return MAX(0, MIN(15, l));
}

static inline void put_u32_le(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> (8 * i));
}

/* One block of 256 through the group search: per group whether it is stored, its scale,
 * 4 sign bytes and 8 grid entries. */
typedef struct {
    int stored[8];
    float scale[8];
    uint8_t signs[8][4];
    int entries[8][8];
} iq3_block_t;

/* Fills `out` for the block at xb (importance qwb or NULL); returns the largest group
 * scale, 0 when no group is stored. */
static float iq3_block(const iq3_variant_t *v, const float *xb, const float *qwb,
                       iq3_block_t *out) {
    float sigma2 = 2 * sum_of_squares(QK_K, xb) / QK_K;
    float max_scale = 0;
    for (int ib = 0; ib < 8; ++ib) {
        float weight[32];
        iq3_weights(xb + 32 * ib, qwb ? qwb + 32 * ib : NULL, sigma2, weight);
        out->scale[ib] = 0;
        out->stored[ib] = iq3_group(v, xb + 32 * ib, weight, &out->scale[ib], out->signs[ib],
                                    out->entries[ib]);
        if (out->stored[ib]) max_scale = MAX(max_scale, out->scale[ib]);
    }
    return max_scale;
}

/* IQ3_XXS, 98 bytes per 256: d, 64 entries (8 bits), 8 u32 of four 7-bit sign indices
 * and the group's 4-bit scale. */
void row_iq3_xxs(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const iq3_variant_t v = {&IQ3_GRID_256, 15, 1, 1e-8f, 0};
    for (int64_t b = 0; b < n / QK_K; ++b, y += 98) {
        iq3_block_t block;
        float max_scale = iq3_block(&v, x + b * QK_K, qw ? qw + b * QK_K : NULL, &block);
        memset(y, 0, 98);
        if (!max_scale) continue; /* ggml clears the whole block then */
        float d = max_scale / 31;
        store_fp16(y, d * 1.0125f); /* ggml's fudge factor */
        float id = 1 / d;
        for (int ib = 0; ib < 8; ++ib) {
            uint32_t word = 0;
            if (block.stored[ib]) {
                const uint8_t *signs = block.signs[ib];
                for (int k = 0; k < 8; ++k) y[2 + 8 * ib + k] = (uint8_t)block.entries[ib][k];
                word = signs[0] | signs[1] << 7 | signs[2] << 14 | (uint32_t)signs[3] << 21;
            }
            word |= (uint32_t)group_scale_code(id, block.scale[ib]) << 28;
            put_u32_le(y + 66 + 4 * ib, word);
        }
    }
}

/* IQ3_S, 110 bytes per 256: d, 64 low bytes of 9-bit entries, 8 bytes of their top bits,
 * 32 sign bytes, 4 bytes of two 4-bit scales. */
void row_iq3_s(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const iq3_variant_t v = {&IQ3_GRID_512, 9, 0, 0.0f, 1};
    for (int64_t b = 0; b < n / QK_K; ++b, y += 110) {
        iq3_block_t block;
        float max_scale = iq3_block(&v, x + b * QK_K, qw ? qw + b * QK_K : NULL, &block);
        memset(y, 0, 110);
        /* ggml advances its entry and sign cursors only past groups it stores, so a zero
         * group shifts the later groups' bytes down (their top bits and scales stay in
         * place); kept for byte-identity. Unlike IQ3_XXS, the bytes stay when d is 0. */
        uint8_t *low = y + 2, *top = y + 66, *sign_bytes = y + 74;
        for (int ib = 0; ib < 8; ++ib) {
            if (!block.stored[ib]) continue;
            for (int k = 0; k < 8; ++k) {
                low[k] = (uint8_t)(block.entries[ib][k] & 255);
                top[ib] |= (uint8_t)((block.entries[ib][k] >> 8) << k);
            }
            memcpy(sign_bytes, block.signs[ib], 4);
            low += 8;
            sign_bytes += 4;
        }
        if (!max_scale) continue;
        float d = max_scale / 31;
        store_fp16(y, d * 1.033f); /* ggml's fudge factor */
        float id = 1 / d;
        for (int ib = 0; ib < 8; ib += 2) {
            y[106 + ib / 2] = (uint8_t)(group_scale_code(id, block.scale[ib]) |
                                        group_scale_code(id, block.scale[ib + 1]) << 4);
        }
    }
}

/* ------------------------------------------------------------------ ternary */

/* |x| max of a block, from 0 as ggml (MAX(amax, |x|)). */
static inline float block_abs_max(const float *x) {
    float amax = 0.0f;
    for (int i = 0; i < QK_K; ++i) amax = MAX(amax, fabsf(x[i]));
    return amax;
}

/* -1, 0, 1 at scale 1/id -> 0, 1, 2 (lroundf: halves away from zero, as ggml). */
static inline int trit(float x, float id) { return lroundf(x * id) + 1; }

/* `count` trits, x[0], x[stride], ..., as a byte: base-3 digits read as a fraction of
 * 3^5, rounded up to 256ths (the first trit most significant; a 4-trit byte is padded
 * with a zero last trit). uint8 arithmetic as ggml's. */
static inline uint8_t pack_trits(const float *x, int stride, int count, float id) {
    uint8_t q = 0;
    for (int n = 0; n < count; ++n) {
        q *= 3;
        q += trit(x[n * stride], id);
    }
    for (int n = count; n < 5; ++n) q *= 3;
    q = (uint8_t)(((uint16_t)q * 256 + (243 - 1)) / 243);
    return q;
}

/* TQ1_0, 54 bytes per 256: 32 bytes of 5 trits (values 0..159, stride 32), 16 of 5
 * (160..239, stride 16), 4 of 4 (240..255, stride 4), d last. */
void row_tq1_0(const float *x, uint8_t *y, int64_t n, const float *qw) {
    (void)qw;
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 54) {
        float d = block_abs_max(x);
        float id = d ? 1.0f / d : 0.0f;
        store_fp16(y + 52, d);
        for (int m = 0; m < 32; ++m) y[m] = pack_trits(x + m, 32, 5, id);
        for (int m = 0; m < 16; ++m) y[32 + m] = pack_trits(x + 160 + m, 16, 5, id);
        for (int m = 0; m < 4; ++m) y[48 + m] = pack_trits(x + 240 + m, 4, 4, id);
    }
}

/* TQ2_0, 66 bytes per 256: 64 bytes of four 2-bit codes (value j*128 + m + 32 n in byte
 * j*32 + m, bits 2n), d last. */
void row_tq2_0(const float *x, uint8_t *y, int64_t n, const float *qw) {
    (void)qw;
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 66) {
        float d = block_abs_max(x);
        float id = d ? 1.0f / d : 0.0f;
        store_fp16(y + 64, d);
        for (int j = 0; j < 2; ++j) {
            for (int m = 0; m < 32; ++m) {
                uint8_t q = 0;
                for (int k = 0; k < 4; ++k) {
                    q += (uint8_t)((trit(x[128 * j + m + 32 * k], id) & 3) << (2 * k));
                }
                y[32 * j + m] = q;
            }
        }
    }
}
