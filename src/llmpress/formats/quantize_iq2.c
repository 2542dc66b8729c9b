/* The 2-bit and 1-bit grid i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M: byte-identical
 * with ggml's quantize_iq2_xxs / _xs / _s and quantize_iq1_s / _m (ggml-quants.c).
 *
 * Each 8 weights are stored as an index into a fixed grid of 8-value patterns whose values
 * take three levels (0, 1, 2: the values 8/25/43 of the IQ2 grids, -1/0/1 of the IQ1 grid).
 * Quantizing rounds 8 weights to levels; when that pattern is not on the grid it takes the
 * best of the grid points nearest to it. Those neighbour lists are built once per grid from
 * the grid values the caller hands in (llmpress_quantize_set_iq2_grid; the grids themselves
 * are gguf-py's, never copied here), exactly as ggml's iq2xs_init_impl builds them: for each
 * pattern off the grid, the grid points at its `nwant` smallest distinct squared distances,
 * ordered by (distance, grid index).
 *
 * Same compile rules as quantize.c (quantize.h): no -ffast-math, no FMA contraction, every
 * float step the one ggml does in its order.
 */
#include <float.h>
#include <stdlib.h>

#include "quantize.h"

/* ------------------------------------------------------------------ grids and neighbours */

#define PATTERNS 6561 /* 8 levels 0..2: 3^8 patterns */
#define MAX_DIST2 33   /* squared level distance of 8 levels 0..2: at most 8 * 4 */

typedef struct {
    int size;               /* grid points */
    uint8_t (*levels)[8];   /* per grid point: its 8 levels, 0..2 */
    int32_t *map;           /* per pattern (pattern_of): the grid index, or -(1 + offset of
                               its neighbour list) */
    uint16_t *neighbours;   /* at an offset: a count, then that many grid indices */
} iq_grid;

/* One grid per ggml grid: IQ2_XXS (256), IQ2_XS (512), IQ2_S (1024), IQ1_S/IQ1_M (2048). */
enum { GRID_XXS, GRID_XS, GRID_S, GRID_IQ1, GRID_COUNT };
static iq_grid GRIDS[GRID_COUNT];

static int grid_slot(int type) {
    switch (type) {
        case T_IQ2_XXS: return GRID_XXS;
        case T_IQ2_XS: return GRID_XS;
        case T_IQ2_S: return GRID_S;
        case T_IQ1_S: case T_IQ1_M: return GRID_IQ1;
        default: return -1;
    }
}

static const int GRID_SIZES[GRID_COUNT] = {256, 512, 1024, 2048};
/* how many distinct distances the neighbour lists reach (ggml's nwant) */
static const int NEIGHBOUR_SHELLS[GRID_COUNT] = {2, 2, 1, 3};

/* 8 levels as one base-3 number, level i the digit of 3^i. (ggml packs them in 2 bits
 * each; base 3 keeps the map small enough to stay in cache.) */
static inline int pattern_of(const uint8_t *levels) {
    int u = 0;
    for (int i = 7; i >= 0; --i) u = 3 * u + levels[i];
    return u;
}

static inline int level_of(int u, int i) {
    for (; i > 0; --i) u /= 3;
    return u % 3;
}

/* The grid points of the `shells` smallest distances to pattern u, by (distance, index);
 * written to out (when not NULL), returns their count. */
static int nearest_grid_points(const iq_grid *g, int u, int shells, uint16_t *out) {
    int count[MAX_DIST2] = {0}, levels[8];
    uint8_t dist[2048];
    for (int i = 0; i < 8; ++i) levels[i] = level_of(u, i);
    for (int j = 0; j < g->size; ++j) {
        int d2 = 0;
        for (int i = 0; i < 8; ++i) {
            int diff = g->levels[j][i] - levels[i];
            d2 += diff * diff;
        }
        dist[j] = (uint8_t)d2;
        count[d2]++;
    }
    int n = 0, taken = 0;
    for (int d2 = 0; d2 < MAX_DIST2 && taken < shells; ++d2) {
        if (!count[d2]) continue;
        for (int j = 0; out && j < g->size; ++j) {
            if (dist[j] == d2) out[n++] = (uint16_t)j;
        }
        if (!out) n += count[d2];
        ++taken;
    }
    return n;
}

static void free_grid(iq_grid *g) {
    free(g->levels);
    free(g->map);
    free(g->neighbours);
    memset(g, 0, sizeof(*g));
}

static int build_grid(iq_grid *g, int slot, const uint8_t *levels) {
    const int size = GRID_SIZES[slot], shells = NEIGHBOUR_SHELLS[slot];
    g->size = size;
    g->levels = malloc((size_t)size * 8);
    g->map = malloc(PATTERNS * sizeof(int32_t));
    if (!g->levels || !g->map) return ERR_ARGS;
    memcpy(g->levels, levels, (size_t)size * 8);
    for (int u = 0; u < PATTERNS; ++u) g->map[u] = -1;
    for (int j = 0; j < size; ++j) g->map[pattern_of(g->levels[j])] = j;
    /* first pass: the list sizes, second: the lists */
    int64_t total = 0;
    for (int u = 0; u < PATTERNS; ++u) {
        if (g->map[u] >= 0) continue;
        int n = nearest_grid_points(g, u, shells, NULL);
        g->map[u] = -(int32_t)(1 + total);
        total += 1 + n;
    }
    g->neighbours = malloc((size_t)(total ? total : 1) * sizeof(uint16_t));
    if (!g->neighbours) return ERR_ARGS;
    for (int u = 0; u < PATTERNS; ++u) {
        if (g->map[u] >= 0) continue;
        uint16_t *list = g->neighbours + (-g->map[u] - 1);
        list[0] = (uint16_t)nearest_grid_points(g, u, shells, list + 1);
    }
    return OK;
}

/* Hand in the grid of `type` as levels 0..2 (grid_size x 8, in the grid's order) and build
 * its neighbour lists. Call once per grid before quantizing to the type, not concurrently
 * with a quantize call; a second call for a built grid does nothing. */
int llmpress_quantize_set_iq2_grid(int type, const uint8_t *levels, int grid_size) {
    int slot = grid_slot(type);
    if (slot < 0) return ERR_TYPE;
    if (!levels || grid_size != GRID_SIZES[slot]) return ERR_ARGS;
    if (GRIDS[slot].neighbours) return OK;
    for (int i = 0; i < grid_size * 8; ++i) if (levels[i] > 2) return ERR_ARGS;
    iq_grid g = {0};
    int status = build_grid(&g, slot, levels);
    if (status != OK) {
        free_grid(&g);
        return status;
    }
    for (int j = 0; j < grid_size; ++j) {  /* two grid points with one pattern: not a grid */
        if (g.map[pattern_of(g.levels[j])] != j) {
            free_grid(&g);
            return ERR_ARGS;
        }
    }
    GRIDS[slot] = g;
    return OK;
}

/* The checks llmpress_quantize runs before quantizing to one of these types. */
int iq2_prepare(int type, const float *imatrix) {
    int needs_imatrix = type == T_IQ2_XXS || type == T_IQ2_XS || type == T_IQ1_S;
    if (needs_imatrix && !imatrix) return ERR_NEEDS_IMATRIX;
    int slot = grid_slot(type);
    return slot >= 0 && GRIDS[slot].neighbours ? OK : ERR_NO_GRID;
}

/* The neighbour list of a pattern off the grid: a count, then grid indices. */
static inline const uint16_t *neighbours_of(const iq_grid *g, int u) {
    return g->neighbours + (-g->map[u] - 1);
}

/* The best neighbour of pattern u: the one minimising sum w (scale q - x)^2 in float32, in
 * ggml's order, where q = values[level] (the odd numbers 1, 3, 5 for the IQ2 grids, the
 * shifted ternary values for IQ1: ggml's iq2_find_best_neighbour / iq1_find_best_neighbour2).
 * The first of equal scores wins; L receives its levels. Four neighbours are scored at once,
 * one per vector lane, each lane summing in ggml's order. */
typedef float lanes4 __attribute__((vector_size(16)));

static int best_neighbour(const iq_grid *g, int u, const float *x, const float *w,
                          float scale, const float *values, int8_t *L) {
    const uint16_t *list = neighbours_of(g, u);
    const int count = list[0];
    float best = FLT_MAX;
    int best_index = list[1]; /* ggml asserts (IQ2) or reads past the row (IQ1) when no score
                                 is below FLT_MAX; only overflowing values get there */
    for (int j = 0; j < count; j += 4) {
        const uint8_t *levels[4];
        for (int k = 0; k < 4; ++k) levels[k] = g->levels[list[1 + MIN(j + k, count - 1)]];
        lanes4 d2 = {0, 0, 0, 0};
        for (int i = 0; i < 8; ++i) {
            lanes4 q = {values[levels[0][i]], values[levels[1][i]], values[levels[2][i]],
                        values[levels[3][i]]};
            lanes4 diff = scale * q - x[i];
            d2 += w[i] * diff * diff;
        }
        for (int k = 0; k < 4 && j + k < count; ++k) {
            if (d2[k] < best) {
                best = d2[k];
                best_index = list[1 + j + k];
            }
        }
    }
    for (int i = 0; i < 8; ++i) L[i] = (int8_t)g->levels[best_index][i];
    return best_index;
}

static const float ODD_LEVELS[3] = {1, 3, 5}; /* ggml's IQ2 grid holds 2 l + 1 */

/* ------------------------------------------------------------------ IQ2_XXS, IQ2_XS, IQ2_S */

/* A group ggml leaves out (all zero, or no scale found): its bytes stay zero and its scale
 * counts as 0. A group whose fitted scale is 0 is stored all the same. */
#define SKIPPED (-1.0f)

typedef struct {
    int group;        /* values per scale: 32 (XXS) or 16 */
    int grid_slot;
    float eps;        /* "all zero" threshold of the group maximum */
    int parity_signs; /* signs stored as 7 bits with an even count: flip the cheapest */
} iq2_variant;

static const iq2_variant IQ2_XXS_V = {32, GRID_XXS, GROUP_MAX_EPS, 1};
static const iq2_variant IQ2_XS_V = {16, GRID_XS, GROUP_MAX_EPS, 1};
static const iq2_variant IQ2_S_V = {16, GRID_S, 1e-8f, 0};

/* |x| into xval and the sign bits of each 8 values (quantize.h: split_signs_8). */
static void split_signs(const iq2_variant *v, const float *x, const float *weight, float *xval,
                        uint8_t *signs) {
    for (int k = 0; k < v->group / 8; ++k)
        signs[k] = split_signs_8(x + 8 * k, weight + 8 * k, xval + 8 * k, v->parity_signs);
}

/* Round 8 values to levels at inverse scale id (l = round((id x - 1) / 2) in 0..2) and snap
 * to the grid. Returns 1 when the rounded pattern was on the grid. */
static int snap_octet(const iq_grid *g, const float *xval, const float *waux, float id,
                      float scale, int8_t *L) {
    for (int i = 0; i < 8; ++i) {
        int l = nearest_int(0.5f * (id * xval[i] - 1));
        L[i] = (int8_t)MAX(0, MIN(2, l));
    }
    int u = pattern_of((const uint8_t *)L);
    if (g->map[u] >= 0) return 1;
    best_neighbour(g, u, xval, waux, scale, ODD_LEVELS, L);
    return 0;
}

/* sum w x q and sum w q^2 over the group, q = 2 L + 1 */
static void odd_level_sums(int n, const float *weight, const float *xval, const int8_t *L,
                           float *sumqx, float *sumq2) {
    float qx = 0, q2 = 0;
    for (int i = 0; i < n; ++i) {
        float w = weight[i];
        float q = (float)(2 * L[i] + 1);
        qx += w * xval[i] * q;
        q2 += w * q * q;
    }
    *sumqx = qx;
    *sumq2 = q2;
}

/* One group's scale (or SKIPPED) and levels L (on the grid); signs may be inverted. */
static float iq2_group(const iq2_variant *v, const iq_grid *g, const float *xval,
                       const float *weight, const float *waux, int8_t *L, uint8_t *signs) {
    const int n = v->group, octets = n / 8;
    int8_t Laux[32];
    int on_grid[4], on_grid_aux[4];
    float max = xval[0];
    for (int i = 1; i < n; ++i) max = MAX(max, xval[i]);
    memset(L, 0, n);
    if (max < v->eps) return SKIPPED;

    float scale, best = 0, reference;
    int steps;
    if (v->group == 32) { /* XXS starts from make_qp_quants' scale, searches +-0.6 */
        scale = make_qp_quants(32, 4, xval, (uint8_t *)L, weight);
        reference = scale * 3;
        if (reference <= 0) return SKIPPED;
        steps = 6;
    } else {
        scale = max / 5;
        reference = max;
        steps = 9;
    }
    for (int k = 0; k < octets; ++k) on_grid[k] = 1;
    for (int is = -steps; is <= steps; ++is) {
        float id = (5 + is * 0.1f) / reference;
        float this_scale = 1 / id;
        for (int k = 0; k < octets; ++k) {
            on_grid_aux[k] =
                snap_octet(g, xval + 8 * k, waux + 8 * k, id, this_scale, Laux + 8 * k);
        }
        float sumqx, sumq2;
        odd_level_sums(n, weight, xval, Laux, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            memcpy(L, Laux, n);
            for (int k = 0; k < octets; ++k) on_grid[k] = on_grid_aux[k];
        }
    }
    /* Re-round at the best scale: XXS all octets, the others those that were off the grid. */
    int redo = 0;
    for (int k = 0; k < octets; ++k) redo |= v->group == 32 || !on_grid[k];
    if (redo && scale > 0) {
        float id = 1 / scale;
        for (int k = 0; k < octets; ++k) {
            if (v->group == 32 || !on_grid[k]) {
                snap_octet(g, xval + 8 * k, waux + 8 * k, id, scale, L + 8 * k);
            }
        }
        float sumqx, sumq2;
        odd_level_sums(n, weight, xval, L, &sumqx, &sumq2);
        if (sumq2 > 0) scale = sumqx / sumq2;
    }
    if (scale < 0) { /* ggml: "should never happen"; flip so the stored scale is positive */
        scale = -scale;
        const int sign_bits = v->parity_signs ? 127 : 255;
        for (int k = 0; k < octets; ++k) signs[k] = (uint8_t)(~signs[k] & sign_bits);
    }
    return scale;
}

static inline int grid_index_of(const iq_grid *g, const int8_t *L) {
    int32_t index = g->map[pattern_of((const uint8_t *)L)];
    return index >= 0 ? index : 0; /* off the grid only for NaN scores, where ggml aborts */
}

/* The 4-bit group scale: l = round((s / d - 1) / 2) in 0..15 */
static inline int scale_nibble(float id, float scale, int max_level) {
    int l = nearest_int(0.5f * (id * scale - 1));
    return MAX(0, MIN(max_level, l));
}

/* The per-value weights of one group: qw sqrt(sigma2 + x^2), or without an imatrix
 * (IQ2_S only) sigma2 / 4 + x^2. */
static void group_weights(int n, const float *x, const float *qw, float sigma2, float *weight) {
    if (qw) {
        for (int i = 0; i < n; ++i) weight[i] = qw[i] * sqrtf(sigma2 + x[i] * x[i]);
    } else {
        for (int i = 0; i < n; ++i) weight[i] = 0.25f * sigma2 + x[i] * x[i];
    }
}

static void row_iq2(const iq2_variant *v, const float *x, uint8_t *y, int64_t n, const float *qw,
                    int type_size) {
    const iq_grid *g = &GRIDS[v->grid_slot];
    const int n_groups = QK_K / v->group, octets = v->group / 8;
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, y += type_size) {
        const float *xbl = x + QK_K * ibl;
        memset(y, 0, type_size);
        float sumx2 = sum_of_squares(QK_K, xbl);
        float sigma2 = v->grid_slot == GRID_S ? 2 * sumx2 / QK_K : sumx2 / QK_K;
        float scales[QK_K / 16], max_scale = 0;
        uint32_t words[16] = {0}; /* XXS: per group (grid bytes, signs | scale << 28) */
        for (int ib = 0; ib < n_groups; ++ib) {
            const float *xb = xbl + v->group * ib;
            float weight[32], waux[32], xval[32];
            int8_t L[32];
            uint8_t signs[4];
            const float *qwb = qw ? qw + QK_K * ibl + v->group * ib : NULL;
            group_weights(v->group, xb, qwb, sigma2, weight);
            for (int i = 0; i < v->group; ++i) waux[i] = sqrtf(weight[i]);
            split_signs(v, xb, weight, xval, signs);
            float scale = iq2_group(v, g, xval, weight, waux, L, signs);
            scales[ib] = scale == SKIPPED ? 0 : scale;
            if (scale == SKIPPED) continue;
            for (int k = 0; k < octets; ++k) {
                int index = grid_index_of(g, L + 8 * k), slot = octets * ib + k;
                if (v->grid_slot == GRID_XXS) {
                    words[2 * ib] |= (uint32_t)index << 8 * k;
                    words[2 * ib + 1] |= (uint32_t)signs[k] << 7 * k;
                } else if (v->grid_slot == GRID_XS) {
                    uint16_t packed = (uint16_t)(index | signs[k] << 9);
                    memcpy(y + 2 + 2 * slot, &packed, 2);
                } else {
                    y[2 + slot] = (uint8_t)(index & 255);
                    y[66 + slot / 4] |= (uint8_t)((index >> 8) << 2 * (slot % 4));
                    y[34 + slot] = signs[k];
                }
            }
            max_scale = MAX(max_scale, scale);
        }
        if (!max_scale) { /* ggml zeroes the indices of XXS and XS, not of S */
            if (v->grid_slot != GRID_S) memset(y, 0, type_size);
            continue;
        }
        float d = max_scale / 31;
        store_fp16(y, v->grid_slot == GRID_S ? d * 0.9875f : d);
        float id = 1 / d;
        if (v->grid_slot == GRID_XXS) {
            for (int ib = 0; ib < n_groups; ++ib) {
                words[2 * ib + 1] |= (uint32_t)scale_nibble(id, scales[ib], 15) << 28;
            }
            memcpy(y + 2, words, 64);
        } else {
            uint8_t *nibbles = y + (v->grid_slot == GRID_XS ? 66 : 74);
            for (int ib = 0; ib < n_groups; ++ib) {
                nibbles[ib / 2] |= (uint8_t)(scale_nibble(id, scales[ib], 15) << 4 * (ib % 2));
            }
        }
    }
}

void row_iq2_xxs(const float *x, uint8_t *y, int64_t n, const float *qw) {
    row_iq2(&IQ2_XXS_V, x, y, n, qw, 66);
}
void row_iq2_xs(const float *x, uint8_t *y, int64_t n, const float *qw) {
    row_iq2(&IQ2_XS_V, x, y, n, qw, 74);
}
void row_iq2_s(const float *x, uint8_t *y, int64_t n, const float *qw) {
    row_iq2(&IQ2_S_V, x, y, n, qw, 82);
}

/* ------------------------------------------------------------------ IQ1_S, IQ1_M */

#define IQ1_DELTA 0.125f
static const float SHIFT_UP[3] = {-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA};
static const float SHIFT_DOWN[3] = {-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA};

/* Indices 0..n-1 ordered by x ascending, ties by index: glibc's qsort (a merge sort for
 * arrays this small) is stable, and ggml sorts (value, index) pairs on the value alone. */
static void order_by_value(int n, const float *x, int *order) {
    for (int j = 0; j < n; ++j) {
        int i = j;
        while (i > 0 && x[order[i - 1]] > x[j]) {
            order[i] = order[i - 1];
            --i;
        }
        order[i] = j;
    }
}

/* Levels from the split points of the sorted order: 0 below i1, 1 up to i2, 2 after. */
static void levels_from_split(int n, const int *order, int i1, int i2, int8_t *L) {
    for (int j = 0; j < n; ++j) L[order[j]] = (int8_t)(j < i1 ? 0 : j < i2 ? 1 : 2);
}

/* Snap each 8 levels to the grid; values[k] are the ternary values of octet k. Returns 1
 * when all were on the grid. */
static int snap_iq1(const iq_grid *g, int octets, const float *xb, const float *weight,
                    float scale, const float *const *values, int8_t *L, uint16_t *index) {
    int all_on_grid = 1;
    for (int k = 0; k < octets; ++k) {
        int u = pattern_of((const uint8_t *)(L + 8 * k));
        int32_t found = g->map[u];
        if (found < 0) {
            all_on_grid = 0;
            found = best_neighbour(g, u, xb + 8 * k, weight + 8 * k, scale, values[k], L + 8 * k);
        }
        index[k] = (uint16_t)found;
    }
    return all_on_grid;
}

/* The least-squares scale of the snapped grid points, when positive. */
static float refit_iq1(const iq_grid *g, int octets, const float *xb, const float *weight,
                       const float *const *values, const uint16_t *index, float scale) {
    float sumqx = 0, sumq2 = 0;
    for (int k = 0; k < octets; ++k) {
        const uint8_t *levels = g->levels[index[k]];
        for (int j = 0; j < 8; ++j) {
            float w = weight[8 * k + j];
            float q = values[k][levels[j]];
            sumqx += w * q * xb[8 * k + j];
            sumq2 += w * q * q;
        }
    }
    return sumqx > 0 && sumq2 > 0 ? sumqx / sumq2 : scale;
}

/* IQ1_S group of 32: the exact weighted least-squares split into three levels, one shift
 * for the group. Returns the scale (or SKIPPED) and the shift (+1 / -1). */
static float iq1_s_group(const iq_grid *g, const float *xb, const float *weight, uint16_t *index,
                         int *shift) {
    const int n = 32;
    float max = fabsf(xb[0]);
    for (int i = 1; i < n; ++i) max = MAX(max, fabsf(xb[i]));
    *shift = 1;
    if (max < 1e-12f) return SKIPPED;
    int order[32];
    float sumx[33], sumw[33];
    order_by_value(n, xb, order);
    sumx[0] = sumw[0] = 0;
    for (int j = 0; j < n; ++j) {
        int i = order[j];
        sumx[j + 1] = sumx[j] + weight[i] * xb[i];
        sumw[j + 1] = sumw[j] + weight[i];
    }
    float best = -FLT_MAX, scale = max;
    int best1 = -1, best2 = -1, best_shift = 0;
    for (int i1 = 0; i1 <= n; ++i1) {
        for (int i2 = i1; i2 <= n; ++i2) {
            for (int s = 0; s < 2; ++s) {
                const float *v = s ? SHIFT_DOWN : SHIFT_UP;
                float sumqx = (sumx[i1] - sumx[0]) * v[0] + (sumx[i2] - sumx[i1]) * v[1] +
                              (sumx[n] - sumx[i2]) * v[2];
                float sumq2 = (sumw[i1] - sumw[0]) * v[0] * v[0] +
                              (sumw[i2] - sumw[i1]) * v[1] * v[1] +
                              (sumw[n] - sumw[i2]) * v[2] * v[2];
                if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
                    scale = sumqx / sumq2;
                    best = scale * sumqx;
                    best1 = i1, best2 = i2, best_shift = s ? -1 : 1;
                }
            }
        }
    }
    if (best1 < 0 || best2 < 0 || best_shift == 0) return SKIPPED;
    int8_t L[32];
    levels_from_split(n, order, best1, best2, L);
    if (scale < 0) {
        for (int j = 0; j < n; ++j) L[j] = (int8_t)(2 - L[j]);
        scale = -scale;
        best_shift = -best_shift;
    }
    const float *v = best_shift == 1 ? SHIFT_UP : SHIFT_DOWN;
    const float *values[4] = {v, v, v, v};
    if (!snap_iq1(g, 4, xb, weight, scale, values, L, index)) {
        scale = refit_iq1(g, 4, xb, weight, values, index, scale);
    }
    *shift = best_shift;
    return scale;
}

void row_iq1_s(const float *x, uint8_t *y, int64_t n, const float *qw) {
    const iq_grid *g = &GRIDS[GRID_IQ1];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, y += 50) {
        const float *xbl = x + QK_K * ibl;
        memset(y, 0, 50);
        float sigma2 = 2 * sum_of_squares(QK_K, xbl) / QK_K;
        float scales[8], max_scale = 0;
        int shifts[8];
        uint16_t qh[8] = {0};
        for (int ib = 0; ib < 8; ++ib) {
            const float *xb = xbl + 32 * ib;
            float weight[32];
            uint16_t index[4];
            group_weights(32, xb, qw + QK_K * ibl + 32 * ib, sigma2, weight);
            float scale = iq1_s_group(g, xb, weight, index, &shifts[ib]);
            scales[ib] = scale == SKIPPED ? 0 : scale;
            if (scale == SKIPPED) continue;
            for (int k = 0; k < 4; ++k) {
                y[2 + 4 * ib + k] = (uint8_t)(index[k] & 255);
                qh[ib] |= (uint16_t)((index[k] >> 8) << 3 * k);
            }
            max_scale = MAX(max_scale, scale);
        }
        memcpy(y + 34, qh, 16);
        if (!max_scale) continue;
        float d = max_scale / 15;
        store_fp16(y, d * 1.125f);
        float id = 1 / d;
        for (int ib = 0; ib < 8; ++ib) {
            int l = scale_nibble(id, scales[ib], 7);
            if (shifts[ib] == -1) l |= 8;
            qh[ib] |= (uint16_t)(l << 12);
        }
        memcpy(y + 34, qh, 16);
    }
}

/* IQ1_M group of 16: the split as IQ1_S, but each half of 8 picks its own shift (four
 * combinations, k = 2 (first half down) + (second half down)). */
static float iq1_m_group(const iq_grid *g, const float *xb, const float *weight, uint16_t *index,
                         int *combo) {
    const int n = 16;
    float max = fabsf(xb[0]);
    for (int i = 1; i < n; ++i) max = MAX(max, fabsf(xb[i]));
    *combo = 0;
    if (max < 1e-7f) return SKIPPED;
    int order[16];
    order_by_value(n, xb, order);
    /* prefix sums per half over the sorted order */
    float px[2][17], pw[2][17];
    px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0;
    for (int j = 0; j < n; ++j) {
        int i = order[j], h = i < 8 ? 0 : 1;
        px[h][j + 1] = px[h][j] + weight[i] * xb[i];
        px[1 - h][j + 1] = px[1 - h][j];
        pw[h][j + 1] = pw[h][j] + weight[i];
        pw[1 - h][j + 1] = pw[1 - h][j];
    }
    const float txs[2] = {px[0][n], px[1][n]}, tws[2] = {pw[0][n], pw[1][n]};
    const float up2 = SHIFT_UP[2], down2 = SHIFT_DOWN[2];
    const float up_c1 = SHIFT_UP[0] * SHIFT_UP[0] - SHIFT_UP[1] * SHIFT_UP[1];
    const float up_c2 = SHIFT_UP[1] * SHIFT_UP[1] - SHIFT_UP[2] * SHIFT_UP[2];
    const float down_c1 = SHIFT_DOWN[0] * SHIFT_DOWN[0] - SHIFT_DOWN[1] * SHIFT_DOWN[1];
    const float down_c2 = SHIFT_DOWN[1] * SHIFT_DOWN[1] - SHIFT_DOWN[2] * SHIFT_DOWN[2];
    float best = -FLT_MAX, scale = max;
    int best1 = -1, best2 = -1, best_combo = -1;
    for (int i1 = 0; i1 <= n; ++i1) {
        for (int i2 = i1; i2 <= n; ++i2) {
            float qx_up[2], qx_down[2], q2_up[2], q2_down[2];
            for (int h = 0; h < 2; ++h) {
                float sx = px[h][i1] + px[h][i2];
                qx_up[h] = txs[h] * up2 - sx;
                qx_down[h] = txs[h] * down2 - sx;
                q2_up[h] = tws[h] * up2 * up2 + pw[h][i1] * up_c1 + pw[h][i2] * up_c2;
                q2_down[h] = tws[h] * down2 * down2 + pw[h][i1] * down_c1 + pw[h][i2] * down_c2;
            }
            float sumqx[4] = {qx_up[0] + qx_up[1], qx_up[0] + qx_down[1],
                              qx_down[0] + qx_up[1], qx_down[0] + qx_down[1]};
            float sumq2[4] = {q2_up[0] + q2_up[1], q2_up[0] + q2_down[1],
                              q2_down[0] + q2_up[1], q2_down[0] + q2_down[1]};
            for (int k = 0; k < 4; ++k) {
                if (sumq2[k] > 0 && sumqx[k] * sumqx[k] > best * sumq2[k]) {
                    scale = sumqx[k] / sumq2[k];
                    best = scale * sumqx[k];
                    best1 = i1, best2 = i2, best_combo = k;
                }
            }
        }
    }
    if (best1 < 0 || best2 < 0 || best_combo < 0) return SKIPPED;
    int8_t L[16];
    levels_from_split(n, order, best1, best2, L);
    if (scale < 0) {
        for (int j = 0; j < n; ++j) L[j] = (int8_t)(2 - L[j]);
        scale = -scale;
        best_combo = 3 - best_combo;
    }
    const float *values[2] = {best_combo < 2 ? SHIFT_UP : SHIFT_DOWN,
                              best_combo % 2 == 0 ? SHIFT_UP : SHIFT_DOWN};
    if (!snap_iq1(g, 2, xb, weight, scale, values, L, index)) {
        scale = refit_iq1(g, 2, xb, weight, values, index, scale);
    }
    *combo = best_combo;
    return scale;
}

static void iq1_m_weights(const float *xb, const float *qw, float sigma2, float *weight) {
    if (qw) {
        for (int i = 0; i < 16; ++i) weight[i] = qw[i] * sqrtf(sigma2 + xb[i] * xb[i]);
    } else {
        for (int i = 0; i < 16; ++i) weight[i] = xb[i] * xb[i];
    }
}

void row_iq1_m(const float *x, uint8_t *y, int64_t n, const float *qw) {
    static const uint8_t COMBO_BITS[4] = {0x00, 0x80, 0x08, 0x88};
    const iq_grid *g = &GRIDS[GRID_IQ1];
    for (int64_t ibl = 0; ibl < n / QK_K; ++ibl, y += 56) {
        const float *xbl = x + QK_K * ibl;
        const float *qwbl = qw ? qw + QK_K * ibl : NULL;
        uint8_t *qs = y, *qh = y + 32;
        memset(y, 0, 56);
        float sigma2 = 2 * sum_of_squares(QK_K, xbl) / QK_K;
        float scales[16], max_scale = 0;
        int combos[16];
        for (int ib = 0; ib < 16; ++ib) {
            const float *xb = xbl + 16 * ib;
            float weight[16];
            uint16_t index[2];
            iq1_m_weights(xb, qwbl ? qwbl + 16 * ib : NULL, sigma2, weight);
            float scale = iq1_m_group(g, xb, weight, index, &combos[ib]);
            scales[ib] = scale == SKIPPED ? 0 : scale;
            if (scale == SKIPPED) continue;
            qs[2 * ib] = (uint8_t)(index[0] & 255);
            qs[2 * ib + 1] = (uint8_t)(index[1] & 255);
            qh[ib] = (uint8_t)((index[0] >> 8) | ((index[1] >> 8) << 4));
            max_scale = MAX(max_scale, scale);
        }
        if (!max_scale) continue;
        /* 3-bit group scales, then the super-scale refit over what is stored */
        uint16_t sc[4] = {0};
        float d = max_scale / 15, id = 1 / d;
        float sumqx = 0, sumq2 = 0;
        for (int ib = 0; ib < 16; ++ib) {
            int l = scale_nibble(id, scales[ib], 7);
            sc[ib / 4] |= (uint16_t)(l << 3 * (ib % 4));
            qh[ib] |= COMBO_BITS[combos[ib]];
            const float *xb = xbl + 16 * ib;
            float weight[16];
            iq1_m_weights(xb, qwbl ? qwbl + 16 * ib : NULL, sigma2, weight);
            for (int k = 0; k < 2; ++k) {
                int up = k == 0 ? combos[ib] < 2 : combos[ib] % 2 == 0;
                const float *v = up ? SHIFT_UP : SHIFT_DOWN;
                int index = qs[2 * ib + k] | ((qh[ib] >> 4 * k) & 7) << 8;
                const uint8_t *levels = g->levels[index];
                for (int j = 0; j < 8; ++j) {
                    float w = weight[8 * k + j];
                    float q = v[levels[j]] * (float)(2 * l + 1);
                    sumqx += w * q * xb[8 * k + j];
                    sumq2 += w * q * q;
                }
            }
        }
        if (sumq2 > 0) d = sumqx / sumq2;
        uint16_t dh = fp32_to_fp16(d * 1.1125f);
        sc[0] |= (uint16_t)((dh & 0x000f) << 12);
        sc[1] |= (uint16_t)((dh & 0x00f0) << 8);
        sc[2] |= (uint16_t)((dh & 0x0f00) << 4);
        sc[3] |= (uint16_t)(dh & 0xf000);
        memcpy(y + 48, sc, 8);
    }
}
