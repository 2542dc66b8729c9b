/* The block quantizers in C: byte-identical with ggml's ggml_quantize_chunk.
 *
 *   llmpress_quantize(type, src, dst, nrows, n_per_row, imatrix, n_threads) -> status
 *
 * src is nrows x n_per_row float32, dst receives nrows x row_bytes; imatrix (NULL for
 * none) is one importance weight per column. Rows are split across OpenMP threads; every
 * row is independent, so the bytes do not depend on the thread count.
 *
 * Bit-exactness with ggml (ggml-quants.c, built for baseline x86-64): every float step is
 * the same float32 operation in the same order, sums over a group run in index order from
 * 0.0f. This file must be compiled WITHOUT -ffast-math and with -ffp-contract=off (no
 * fused multiply-adds). Where a search is vectorized it is vectorized ACROSS independent
 * groups ("lanes"): each lane still does its own group's operations in ggml's order.
 *
 * The Python ports in legacy.py / kquant_quantize.py are the readable reference; this is
 * the fast path. Arguments are checked here too: a bad call returns a negative status,
 * never crashes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <Python.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "quantize.h"

/* ------------------------------------------------------------------ scale searches */

/* make_qx_quants with rmse_type 1: levels L in 0..2*nmax-1, weight qw or x^2. */
static float make_qx_quants(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float amax;
    float max = first_abs_max(n, x, &amax);
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, n);
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = MAX(-nmax, MIN(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)(l + nmax);
        float w = qw ? qw[i] : x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = MAX(-nmax, MIN(nmax - 1, nearest_int(iscale * x[i])));
            float w = qw ? qw[i] : x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                L[i] = (int8_t)(nmax + MAX(-nmax, MIN(nmax - 1, nearest_int(iscale * x[i]))));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* make_qkx2_quants / make_qkx3_quants with explicit weights (they are the same then,
 * except for the degenerate test: qkx2 asks max == min, qkx3 max <= min; the two differ
 * only when max < min, i.e. never for finite x). Levels 0..nmax; *the_min = -min. */
static float make_qkx_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                             float *the_min, float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t Laux[32];
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max <= min) {
        memset(L, 0, n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)MAX(0, MIN(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = MAX(0, MIN(nmax, nearest_int(iscale * (x[i] - min))));
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                error += weights[i] * diff;
            }
            if (error < best_error) {
                memcpy(L, Laux, n);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* make_qp_quants: non-negative values (group scales or mins) to levels 0..nmax. */
float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *w) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = MAX(max, x[i]);
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, n);
        return 0.f;
    }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        float diff = x[i] - scale * L[i];
        best_mse += w[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        float iscale_is = (0.1f * is + nmax) / max;
        float scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            int l = MIN(nmax, nearest_int(iscale_is * x[i]));
            float diff = x[i] - scale_is * l;
            mse += w[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = MIN(nmax, nearest_int(iscale * x[i]));
        L[i] = (uint8_t)l;
        sumlx += w[i] * x[i] * l;
        suml2 += w[i] * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            float slx = sumlx - w[i] * x[i] * L[i];
            float sl2 = suml2 - w[i] * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                int new_l = MIN(nmax, nearest_int(x[i] * sl2 / slx));
                if (new_l != L[i]) {
                    slx += w[i] * x[i] * new_l;
                    sl2 += w[i] * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* best_index_int8 over the IQ4 levels: nearest level, ties to the upper one. */
static inline int best_index_iq4(float x) {
    if (x <= IQ4_LEVELS[0]) return 0;
    if (x >= IQ4_LEVELS[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (x < IQ4_LEVELS[mid]) hi = mid; else lo = mid;
    }
    return x - IQ4_LEVELS[hi - 1] < IQ4_LEVELS[hi] - x ? hi - 1 : hi;
}

/* ------------------------------------------------------------------ the searches, in lanes
 *
 * The same searches for LANES independent groups at once (GCC/Clang vector extensions,
 * 16-byte vectors: native SSE2 on baseline x86-64, NEON on ARM; wider vectors would be
 * split element by element on baseline x86-64), laid out position-major: x[i] holds
 * value i of the LANES groups. Each lane does exactly its group's scalar operations in
 * ggml's order (add, mul, div are IEEE in every lane); only groups are interleaved.
 * Branches become per-lane selects; a lane whose group ggml returns early from (all
 * zero, flat) runs the search on meaningless values and is overwritten at the end with
 * what ggml's early return gives. */
#define LANES 4
typedef float lanes_f __attribute__((vector_size(16)));
typedef int32_t lanes_i __attribute__((vector_size(16)));

static inline lanes_f select_f(lanes_i mask, lanes_f a, lanes_f b) {
    return (lanes_f)((mask & (lanes_i)a) | (~mask & (lanes_i)b));
}
static inline lanes_i select_i(lanes_i mask, lanes_i a, lanes_i b) { return (mask & a) | (~mask & b); }
static inline lanes_f abs_f(lanes_f a) { return (lanes_f)((lanes_i)a & 0x7fffffff); }
static inline lanes_f to_float(lanes_i a) { return __builtin_convertvector(a, lanes_f); }
static inline lanes_i clamp_i(lanes_i l, int lo, int hi) {
    l = select_i(l < lo, (lanes_i){0} + lo, l);
    return select_i(l > hi, (lanes_i){0} + hi, l);
}
/* nearest_int in every lane (the same magic-number bits) */
static inline lanes_i nearest_int_lanes(lanes_f v) {
    lanes_f shifted = v + 12582912.f;
    return ((lanes_i)shifted & 0x007fffff) - 0x00400000;
}
static inline int any_lane(lanes_i mask) {
    int any = 0;
    for (int g = 0; g < LANES; ++g) any |= mask[g];
    return any != 0;
}

/* The first value of largest magnitude per lane (`if (ax > amax)` from amax = 0). */
static inline void first_abs_max_lanes(int n, const lanes_f *x, lanes_f *amax, lanes_f *max) {
    lanes_f a = {0}, m = {0};
    for (int i = 0; i < n; ++i) {
        lanes_f ax = abs_f(x[i]);
        lanes_i larger = ax > a;
        a = select_f(larger, ax, a);
        m = select_f(larger, x[i], m);
    }
    *amax = a;
    *max = m;
}

/* make_qx_quants (rmse_type 1) for LANES groups of n; w: the weights (x^2 when ggml has none).
 * L: levels 0..2*nmax-1. */
static void make_qx_quants_lanes(int n, int nmax, const lanes_f *x, const lanes_f *w,
                                 lanes_i *L, lanes_f *scale_out) {
    lanes_f amax, max, scale = {0}, best = {0};
    lanes_i candidate[32];
    first_abs_max_lanes(n, x, &amax, &max);
    for (int step = 0; step <= 18; ++step) {
        /* step 0: -nmax/max; then is = -9..-1, 1..9: -(nmax + 0.1f*is)/max */
        const int is = step <= 9 ? step - 10 : step - 9;
        const lanes_f iscale = step == 0 ? (float)-nmax / max : -(nmax + 0.1f * is) / max;
        lanes_f sumlx = {0}, suml2 = {0};
        for (int i = 0; i < n; ++i) {
            lanes_i l = clamp_i(nearest_int_lanes(iscale * x[i]), -nmax, nmax - 1);
            lanes_f lf = to_float(l);
            candidate[i] = l + nmax;
            sumlx += w[i] * x[i] * lf;
            suml2 += w[i] * lf * lf;
        }
        lanes_i better;
        if (step == 0) {
            scale = select_f(suml2 != 0, sumlx / suml2, (lanes_f){0});
            best = scale * sumlx;
            better = (lanes_i){0} - 1;
        } else {
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2);
            scale = select_f(better, sumlx / suml2, scale);
            best = select_f(better, scale * sumlx, best);
        }
        for (int i = 0; i < n; ++i) L[i] = select_i(better, candidate[i], L[i]);
    }
    lanes_i zero = amax < GROUP_MAX_EPS;
    *scale_out = select_f(zero, (lanes_f){0}, scale);
    for (int i = 0; i < n; ++i) L[i] = select_i(zero, (lanes_i){0}, L[i]);
}

/* make_qkx2/3_quants for LANES groups of n with explicit weights: levels 0..nmax in L,
 * the_min = -min. */
static void make_qkx_quants_lanes(int n, int nmax, const lanes_f *x, const lanes_f *w,
                                  lanes_i *L, lanes_f *scale_out, lanes_f *the_min_out,
                                  float rmin, float rdelta, int nstep, int use_mad) {
    const lanes_f zero = {0};
    lanes_f min = x[0], max = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    lanes_i candidate[32];
    for (int i = 1; i < n; ++i) {
        min = select_f(x[i] < min, x[i], min);
        max = select_f(x[i] > max, x[i], max);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    min = select_f(min > 0, zero, min);
    const lanes_f first_min = min;
    lanes_f iscale = (float)nmax / (max - min);
    lanes_f scale = 1 / iscale, best = zero;
    for (int i = 0; i < n; ++i) {
        L[i] = clamp_i(nearest_int_lanes(iscale * (x[i] - min)), 0, nmax);
        lanes_f diff = scale * to_float(L[i]) + min - x[i];
        diff = use_mad ? abs_f(diff) : diff * diff;
        best += w[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        lanes_f sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < n; ++i) {
            lanes_i l = clamp_i(nearest_int_lanes(iscale * (x[i] - min)), 0, nmax);
            lanes_f lf = to_float(l);
            candidate[i] = l;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        lanes_f D = sum_w * sum_l2 - sum_l * sum_l;
        lanes_f this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        lanes_f this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        lanes_i clamp = this_min > 0;
        this_min = select_f(clamp, zero, this_min);
        this_scale = select_f(clamp, sum_xl / sum_l2, this_scale);
        lanes_f error = zero;
        for (int i = 0; i < n; ++i) {
            lanes_f diff = this_scale * to_float(candidate[i]) + this_min - x[i];
            diff = use_mad ? abs_f(diff) : diff * diff;
            error += w[i] * diff;
        }
        lanes_i better = (D > 0) & (error < best);
        best = select_f(better, error, best);
        scale = select_f(better, this_scale, scale);
        min = select_f(better, this_min, min);
        for (int i = 0; i < n; ++i) L[i] = select_i(better, candidate[i], L[i]);
    }
    lanes_i flat = max <= first_min;
    *scale_out = select_f(flat, zero, scale);
    *the_min_out = select_f(flat, -first_min, -min);
    for (int i = 0; i < n; ++i) L[i] = select_i(flat, (lanes_i){0}, L[i]);
}

/* make_q3_quants(do_rmse = true) for LANES groups of n (weight x^2): levels + nmax in L.
 * A pass that changes nothing in a lane leaves it as it was, so passes beyond ggml's
 * early break change nothing. */
static void make_q3_quants_lanes(int n, int nmax, const lanes_f *x, lanes_i *L, lanes_f *scale_out) {
    lanes_f amax, max, sumlx = {0}, suml2 = {0};
    first_abs_max_lanes(n, x, &amax, &max);
    const lanes_f iscale = (float)-nmax / max;
    for (int i = 0; i < n; ++i) {
        L[i] = clamp_i(nearest_int_lanes(iscale * x[i]), -nmax, nmax - 1);
        lanes_f w = x[i] * x[i], lf = to_float(L[i]);
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    for (int itry = 0; itry < 5; ++itry) {
        lanes_i changed = {0};
        for (int i = 0; i < n; ++i) {
            lanes_f w = x[i] * x[i], old = to_float(L[i]);
            lanes_f slx = sumlx - w * x[i] * old;
            lanes_f sl2 = suml2 - w * old * old;
            lanes_i new_l = clamp_i(nearest_int_lanes(x[i] * sl2 / slx), -nmax, nmax - 1);
            lanes_f nf = to_float(new_l);
            lanes_f slx_new = slx + w * x[i] * nf;
            lanes_f sl2_new = sl2 + w * nf * nf;
            lanes_i accept = (slx > 0) & (new_l != L[i]) & (sl2_new > 0) &
                             (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new);
            L[i] = select_i(accept, new_l, L[i]);
            sumlx = select_f(accept, slx_new, sumlx);
            suml2 = select_f(accept, sl2_new, suml2);
            changed |= accept;
        }
        if (!any_lane(changed)) break;
    }
    lanes_i zero = amax < GROUP_MAX_EPS;
    lanes_f scale = select_f(suml2 > 0, sumlx / suml2, (lanes_f){0});
    *scale_out = select_f(zero, (lanes_f){0}, scale);
    for (int i = 0; i < n; ++i) L[i] = select_i(zero, (lanes_i){0}, L[i] + nmax);
}

/* LANES groups of `size` values starting at group `first`, position-major. */
static inline void gather_lanes(const float *x, int size, int first, lanes_f *out) {
    for (int g = 0; g < LANES; ++g) {
        for (int i = 0; i < size; ++i) out[i][g] = x[(first + g) * size + i];
    }
}

static inline void scatter_levels(const lanes_i *L, int size, int first, uint8_t *out) {
    for (int g = 0; g < LANES; ++g) {
        for (int i = 0; i < size; ++i) out[(first + g) * size + i] = (uint8_t)L[i][g];
    }
}

static inline void scatter_floats(lanes_f v, float *out) {
    for (int g = 0; g < LANES; ++g) out[g] = v[g];
}

/* ------------------------------------------------------------------ packing helpers */

/* 32 levels 0..15 -> 16 bytes: byte j = L[j] | L[j + 16] << 4 */
static inline void pack_nibbles_32(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4));
}

/* the fifth bits of 32 levels as a little-endian u32 */
static inline void pack_fifth_bits_32(const uint8_t *L, uint8_t *qh_bytes) {
    uint32_t qh = 0;
    for (int j = 0; j < 32; ++j) qh |= (uint32_t)((L[j] & 0x10u) >> 4) << j;
    qh_bytes[0] = (uint8_t)qh; qh_bytes[1] = (uint8_t)(qh >> 8);
    qh_bytes[2] = (uint8_t)(qh >> 16); qh_bytes[3] = (uint8_t)(qh >> 24);
}

/* Q2_K/Q3_K 2-bit packing: byte l of each 128-half holds l, l+32, l+64, l+96 */
static inline void pack_2bit_256(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                      (L[j + l + 96] << 6));
        }
    }
}

/* the Q4_K/Q5_K 12 scale bytes from 8 six-bit scales and mins (uint8 wrap as ggml) */
static inline void pack_scale_min_k4(const uint8_t *ls, const uint8_t *lm, uint8_t *s) {
    for (int j = 0; j < 8; ++j) {
        if (j < 4) {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
            s[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
            s[j - 0] |= (uint8_t)((lm[j] >> 4) << 6);
        }
    }
}

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* ------------------------------------------------------------------ 32-value types */

/* The imatrix path of the legacy types for `count` (1 or LANES) consecutive 32-value
 * blocks: weights qw*sqrt(sigma2 + x^2), then make_qx_quants (nmax 8/16: Q4_0/Q5_0) or
 * make_qkx3_quants (nmax 15/31: Q4_1/Q5_1). L gets count*32 levels, d the scales and
 * m the stored minimums (-the_min). */
static void legacy_weighted_blocks(const float *x, const float *qw, float sigma2, int nmax,
                                   int affine, int count, uint8_t *L, float *d, float *m) {
    float weights[LANES * 32], the_min[LANES] = {0};
    for (int j = 0; j < count * 32; ++j) weights[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
    if (count == LANES) {
        lanes_f xt[32], wt[32], scale, min_lanes = {0};
        lanes_i Lt[32];
        gather_lanes(x, 32, 0, xt);
        gather_lanes(weights, 32, 0, wt);
        if (affine) {
            make_qkx_quants_lanes(32, nmax, xt, wt, Lt, &scale, &min_lanes, -0.9f, 0.05f, 36, 0);
        } else {
            make_qx_quants_lanes(32, nmax, xt, wt, Lt, &scale);
        }
        scatter_levels(Lt, 32, 0, L);
        scatter_floats(scale, d);
        scatter_floats(min_lanes, the_min);
    } else if (affine) {
        d[0] = make_qkx_quants(32, nmax, x, weights, L, &the_min[0], -0.9f, 0.05f, 36, 0);
    } else {
        d[0] = make_qx_quants(32, nmax, x, (int8_t *)L, weights);
    }
    for (int k = 0; k < count; ++k) m[k] = affine ? -the_min[k] : 0.f;
}

/* Levels 0..2^bits-1 and the fp16 fields (d, and m for affine types) of one block without
 * an imatrix: quantize_row_q{4,5}_{0,1}_ref. */
static void legacy_plain_block(const float *x, int nmax, int affine, uint8_t *L, uint8_t *head) {
    if (!affine) { /* d = max / -nmax: Q4_0 -8, Q5_0 -16 */
        float amax;
        const float d = first_abs_max(32, x, &amax) / -nmax;
        const float id = d ? 1.0f / d : 0.0f;
        const float offset = nmax + 0.5f; /* 8.5f or 16.5f, exact */
        store_fp16(head, d);
        for (int j = 0; j < 32; ++j) L[j] = (uint8_t)MIN(2 * nmax - 1, (int8_t)(x[j] * id + offset));
        return;
    }
    float min = INFINITY, max = -INFINITY;
    for (int j = 0; j < 32; ++j) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / nmax;
    const float id = d ? 1.0f / d : 0.0f;
    store_fp16(head, d);
    store_fp16(head + 2, min);
    for (int j = 0; j < 32; ++j) {
        int q = (int)((x[j] - min) * id + 0.5f);
        L[j] = (uint8_t)(nmax == 15 ? MIN(15, (int8_t)q) : q); /* Q5_1 has no MIN */
    }
}

/* One row of a legacy type; qw (NULL: none) is the row's importance. Q4_0/Q5_0 are
 * symmetric (nmax 8/16), Q4_1/Q5_1 affine (nmax 15/31). */
static void row_legacy(const float *x, uint8_t *y, int64_t n, const float *qw, int nmax,
                       int affine) {
    const int five_bits = nmax == 16 || nmax == 31;
    const int head = affine ? 4 : 2; /* fp16 d (and m) */
    const int type_size = head + (five_bits ? 4 : 0) + 16;
    const int64_t nb = n / 32;
    const float sigma2 = qw ? sum_of_squares(n, x) / n : 0;
    for (int64_t ib = 0; ib < nb;) {
        const int count = qw && nb - ib >= LANES ? LANES : 1;
        uint8_t L[LANES * 32];
        float d[LANES], m[LANES];
        if (qw) {
            legacy_weighted_blocks(x + 32 * ib, qw + 32 * ib, sigma2, nmax, affine, count, L, d, m);
        }
        for (int k = 0; k < count; ++k, ++ib) {
            uint8_t *block = y + ib * type_size, *levels = L + 32 * k;
            if (qw) {
                store_fp16(block, d[k]);
                if (affine) store_fp16(block + 2, m[k]);
            } else {
                legacy_plain_block(x + 32 * ib, nmax, affine, levels, block);
            }
            if (five_bits) pack_fifth_bits_32(levels, block + head);
            pack_nibbles_32(levels, block + head + (five_bits ? 4 : 0));
        }
    }
}

static void row_q4_0(const float *x, uint8_t *y, int64_t n, const float *qw) {
    row_legacy(x, y, n, qw, 8, 0);
}

static void row_q5_0(const float *x, uint8_t *y, int64_t n, const float *qw) {
    row_legacy(x, y, n, qw, 16, 0);
}

static void row_q4_1(const float *x, uint8_t *y, int64_t n, const float *qw) {
    row_legacy(x, y, n, qw, 15, 1);
}

static void row_q5_1(const float *x, uint8_t *y, int64_t n, const float *qw) {
    row_legacy(x, y, n, qw, 31, 1);
}

/* C's roundf (halves away from zero) for |v| < 2^31, without the libm call: the
 * fraction a - trunc(a) is exact, so comparing it with 0.5 is too. */
static inline float round_half_away(float v) {
    float a = fabsf(v);
    float whole = (float)(int32_t)a;
    return copysignf(whole + (a - whole >= 0.5f ? 1.f : 0.f), v);
}

/* Q8_0: ggml ignores the importance */
static void row_q8_0(const float *x, uint8_t *y, int64_t n, const float *qw) {
    (void)qw;
    for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, y += 34) {
        float amax = 0;
        for (int j = 0; j < 32; ++j) amax = MAX(amax, fabsf(x[j]));
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        store_fp16(y, d);
        for (int j = 0; j < 32; ++j) y[2 + j] = (uint8_t)(int8_t)round_half_away(x[j] * id);
    }
}

/* ------------------------------------------------------------------ k-quants */

/* The 16 groups of 16 of a super-block through the symmetric search (make_qx_quants),
 * LANES at a time; weights per value (x^2 when ggml uses none). */
static void search_symmetric_16(const float *x, const float *weights, int nmax, uint8_t *L,
                                float *scales) {
    for (int first = 0; first < 16; first += LANES) {
        lanes_f xt[16], wt[16], scale;
        lanes_i Lt[16];
        gather_lanes(x, 16, first, xt);
        gather_lanes(weights, 16, first, wt);
        make_qx_quants_lanes(16, nmax, xt, wt, Lt, &scale);
        scatter_levels(Lt, 16, first, L);
        scatter_floats(scale, scales + first);
    }
}

/* The 16 groups of 16 of a Q2_K super-block through make_qkx*_quants (nmax 3). */
static void search_affine_16(const float *x, const float *weights, uint8_t *L, float *scales,
                             float *mins, float rmin, float rdelta, int nstep, int use_mad) {
    for (int first = 0; first < 16; first += LANES) {
        lanes_f xt[16], wt[16], scale, min;
        lanes_i Lt[16];
        gather_lanes(x, 16, first, xt);
        gather_lanes(weights, 16, first, wt);
        make_qkx_quants_lanes(16, 3, xt, wt, Lt, &scale, &min, rmin, rdelta, nstep, use_mad);
        scatter_levels(Lt, 16, first, L);
        scatter_floats(scale, scales + first);
        scatter_floats(min, mins + first);
    }
}

/* The 8 groups of 32 of a Q4_K/Q5_K super-block through make_qkx*_quants. */
static void search_affine_32(const float *x, const float *weights, int nmax, uint8_t *L,
                             float *scales, float *mins, float rmin, float rdelta, int nstep) {
    for (int first = 0; first < 8; first += LANES) {
        lanes_f xt[32], wt[32], scale, min;
        lanes_i Lt[32];
        gather_lanes(x, 32, first, xt);
        gather_lanes(weights, 32, first, wt);
        make_qkx_quants_lanes(32, nmax, xt, wt, Lt, &scale, &min, rmin, rdelta, nstep, 0);
        scatter_levels(Lt, 32, first, L);
        scatter_floats(scale, scales + first);
        scatter_floats(min, mins + first);
    }
}

/* The final pass of every k-quant: levels from the stored group scale (and offset);
 * groups whose scale is 0 keep the search's levels. */
static inline void requantize_group(const float *x, uint8_t *L, int n, float d, float offset,
                                    int lo, int hi) {
    if (!d) return;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int((x[i] + offset) / d);
        L[i] = (uint8_t)(MAX(lo, MIN(hi, l)) - lo);
    }
}

static void row_q2_k(const float *x, uint8_t *y, int64_t n, const float *qw) {
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 84) {
        uint8_t L[QK_K], *scales_q = y;
        float scales[16], mins[16], weights[QK_K];
        memset(scales_q, 0, 16);
        float dm, mm;
        if (qw) {
            const float sigma2 = sum_of_squares(QK_K, x) / QK_K;
            float sw[16];
            uint8_t Ls[16], Lm[16];
            for (int j = 0; j < 16; ++j) {
                const float *w = qw + QK_K * ib + 16 * j;
                float *weight = weights + 16 * j;
                for (int l = 0; l < 16; ++l) weight[l] = w[l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
                sw[j] = 0;
                for (int l = 0; l < 16; ++l) sw[j] += weight[l];
            }
            search_affine_16(x, weights, L, scales, mins, -0.9f, 0.05f, 36, 0);
            dm = make_qp_quants(16, 15, scales, Ls, sw);
            mm = make_qp_quants(16, 15, mins, Lm, sw);
            for (int j = 0; j < 16; ++j) scales_q[j] = (uint8_t)(Ls[j] | (Lm[j] << 4));
        } else {
            float max_scale = 0, max_min = 0;
            for (int l = 0; l < QK_K; ++l) weights[l] = fabsf(x[l]);
            search_affine_16(x, weights, L, scales, mins, -0.5f, 0.1f, 15, 1);
            for (int j = 0; j < 16; ++j) {
                if (scales[j] > max_scale) max_scale = scales[j];
                if (mins[j] > max_min) max_min = mins[j];
            }
            dm = 0.f;
            if (max_scale > 0) {
                float iscale = 15.f / max_scale;
                for (int j = 0; j < 16; ++j) scales_q[j] = (uint8_t)nearest_int(iscale * scales[j]);
                dm = max_scale / 15.f;
            }
            mm = 0.f;
            if (max_min > 0) {
                float iscale = 15.f / max_min;
                for (int j = 0; j < 16; ++j) scales_q[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
                mm = max_min / 15.f;
            }
        }
        dm = stored_fp16(y + 80, dm);
        mm = stored_fp16(y + 82, mm);
        for (int j = 0; j < 16; ++j) {
            const float d = dm * (scales_q[j] & 0xF);
            const float m = mm * (scales_q[j] >> 4);
            requantize_group(x + 16 * j, L + 16 * j, 16, d, m, 0, 3);
        }
        pack_2bit_256(L, y + 16);
    }
}

/* The signed 6-bit Q3_K group scale j from its 12 scale bytes. */
static inline int q3_scale(const uint8_t *s, int j) {
    int8_t sc = (int8_t)(j < 8 ? s[j] & 0xF : s[j - 8] >> 4);
    return (int8_t)((sc | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
}

static inline void put_q3_scale(uint8_t *s, int j, int l) {
    if (j < 8) s[j] = (uint8_t)(l & 0xF);
    else s[j - 8] |= (uint8_t)((l & 0xF) << 4);
    l >>= 4;
    s[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
}

static void row_q3_k(const float *x, uint8_t *y, int64_t n, const float *qw) {
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 110) {
        int8_t L[QK_K];
        float scales[16];
        uint8_t *hmask = y, *qs = y + 32, *s = y + 96;
        memset(s, 0, 12);
        float d_block = 0.f;
        if (qw) {
            const float sigma2 = 2 * sum_of_squares(QK_K, x) / QK_K;
            float weights[QK_K], sw[16];
            int8_t Ls[16];
            for (int j = 0; j < 16; ++j) {
                const float *w = qw + QK_K * ib + 16 * j;
                float *weight = weights + 16 * j;
                for (int l = 0; l < 16; ++l) weight[l] = w[l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
                float sumw = 0;
                for (int l = 0; l < 16; ++l) sumw += weight[l];
                sw[j] = sumw;
            }
            search_symmetric_16(x, weights, 4, (uint8_t *)L, scales);
            d_block = make_qx_quants(16, 32, scales, Ls, sw);
            for (int j = 0; j < 16; ++j) put_q3_scale(s, j, Ls[j]);
        } else {
            float amax;
            for (int first = 0; first < 16; first += LANES) {
                lanes_f xt[16], scale;
                lanes_i Lt[16];
                gather_lanes(x, 16, first, xt);
                make_q3_quants_lanes(16, 4, xt, Lt, &scale);
                scatter_levels(Lt, 16, first, (uint8_t *)L);
                scatter_floats(scale, scales + first);
            }
            float max_scale = first_abs_max(16, scales, &amax);
            if (max_scale) {
                float iscale = -32.f / max_scale;
                for (int j = 0; j < 16; ++j) {
                    int8_t l = (int8_t)nearest_int(iscale * scales[j]);
                    put_q3_scale(s, j, MAX(-32, MIN(31, l)) + 32);
                }
                d_block = 1 / iscale;
            }
        }
        const float d_all = stored_fp16(y + 108, d_block);
        for (int j = 0; j < 16; ++j) {
            requantize_group(x + 16 * j, (uint8_t *)L + 16 * j, 16, d_all * q3_scale(s, j), 0.f, -4, 3);
        }
        memset(hmask, 0, 32);
        for (int j = 0; j < QK_K; ++j) {
            if (L[j] > 3) {
                hmask[j % 32] |= (uint8_t)(1 << (j / 32));
                L[j] -= 4;
            }
        }
        pack_2bit_256((const uint8_t *)L, qs);
    }
}

/* Q4_K and Q5_K: 8 groups of 32, affine levels 0..nmax, 6-bit scales and mins. */
static void affine_k4_block(const float *x, const float *qw, int nmax, uint8_t *head, uint8_t *L) {
    float scales[8], mins[8], weights[QK_K];
    uint8_t ls[8], lm[8];
    float d_block, m_block;
    if (qw) {
        const float sigma2 = 2 * sum_of_squares(QK_K, x) / QK_K;
        float sw[8];
        for (int j = 0; j < 8; ++j) {
            float *weight = weights + 32 * j;
            for (int l = 0; l < 32; ++l) weight[l] = qw[32 * j + l] * sqrtf(sigma2 + x[32 * j + l] * x[32 * j + l]);
            float sumw = 0;
            for (int l = 0; l < 32; ++l) sumw += weight[l];
            sw[j] = sumw;
        }
        search_affine_32(x, weights, nmax, L, scales, mins, -0.9f, 0.05f, 36);
        d_block = make_qp_quants(8, 63, scales, ls, sw);
        m_block = make_qp_quants(8, 63, mins, lm, sw);
        if (nmax == 31) { /* only ggml's Q5_K impl clamps */
            for (int j = 0; j < 8; ++j) { ls[j] = MIN(63, ls[j]); lm[j] = MIN(63, lm[j]); }
        }
    } else {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; ++j) {
            float av_x = sqrtf(sum_of_squares(32, x + 32 * j) / 32);
            for (int l = 0; l < 32; ++l) weights[32 * j + l] = av_x + fabsf(x[32 * j + l]);
        }
        search_affine_32(x, weights, nmax, L, scales, mins, nmax == 15 ? -1.f : -0.5f, 0.1f,
                         nmax == 15 ? 20 : 15);
        for (int j = 0; j < 8; ++j) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < 8; ++j) {
            ls[j] = MIN(63, (uint8_t)nearest_int(inv_scale * scales[j]));
            lm[j] = MIN(63, (uint8_t)nearest_int(inv_min * mins[j]));
        }
        d_block = max_scale / 63.f;
        m_block = max_min / 63.f;
    }
    memset(head + 4, 0, 12);
    pack_scale_min_k4(ls, lm, head + 4);
    const float d_all = stored_fp16(head, d_block);
    const float m_all = stored_fp16(head + 2, m_block);
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        scale_min_k4(j, head + 4, &sc, &m);
        requantize_group(x + 32 * j, L + 32 * j, 32, d_all * sc, m_all * m, 0, nmax);
    }
}

static void row_q4_k(const float *x, uint8_t *y, int64_t n, const float *qw) {
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 144) {
        uint8_t L[QK_K];
        affine_k4_block(x, qw ? qw + QK_K * ib : NULL, 15, y, L);
        uint8_t *q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32) {
            for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
        }
    }
}

static void row_q5_k(const float *x, uint8_t *y, int64_t n, const float *qw) {
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 176) {
        uint8_t L[QK_K];
        affine_k4_block(x, qw ? qw + QK_K * ib : NULL, 31, y, L);
        uint8_t *qh = y + 16, *ql = y + 48;
        memset(qh, 0, 32);
        uint8_t m1 = 1, m2 = 2;
        for (int j0 = 0; j0 < QK_K; j0 += 64, ql += 32) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[j0 + j], l2 = L[j0 + j + 32];
                if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
                if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    }
}

static void row_q6_k(const float *x, uint8_t *y, int64_t n, const float *qw) {
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 210) {
        int8_t L[QK_K];
        float scales[16], max_abs_scale;
        float weights[QK_K];
        for (int l = 0; l < QK_K; ++l) weights[l] = qw ? qw[QK_K * ib + l] : x[l] * x[l];
        search_symmetric_16(x, weights, 32, (uint8_t *)L, scales);
        float max_scale = first_abs_max(16, scales, &max_abs_scale);
        if (max_abs_scale < GROUP_MAX_EPS) {
            memset(y, 0, 210);
            continue;
        }
        float iscale = -128.f / max_scale;
        const float d_all = stored_fp16(y + 208, 1 / iscale);
        int8_t *qscale = (int8_t *)(y + 192);
        for (int j = 0; j < 16; ++j) qscale[j] = (int8_t)MIN(127, nearest_int(iscale * scales[j]));
        for (int j = 0; j < 16; ++j) {
            requantize_group(x + 16 * j, (uint8_t *)L + 16 * j, 16, d_all * qscale[j], 0.f, -32, 31);
        }
        uint8_t *ql = y, *qh = y + 128;
        const uint8_t *U = (const uint8_t *)L;
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                ql[l] = (uint8_t)((U[j + l] & 0xF) | ((U[j + l + 64] & 0xF) << 4));
                ql[l + 32] = (uint8_t)((U[j + l + 32] & 0xF) | ((U[j + l + 96] & 0xF) << 4));
                qh[l] = (uint8_t)((U[j + l] >> 4) | ((U[j + l + 32] >> 4) << 2) |
                                  ((U[j + l + 64] >> 4) << 4) | ((U[j + l + 96] >> 4) << 6));
            }
        }
    }
}

/* ------------------------------------------------------------------ IQ4_NL / IQ4_XS */

/* The per-32 scale search of quantize_row_iq4_nl_impl (ntry 7), weights given. */
static float iq4_group_scale(const float *x, const float *weight) {
    float amax;
    float max = first_abs_max(32, x, &amax);
    if (amax < GROUP_MAX_EPS) return 0;
    float d = -max / IQ4_LEVELS[0];
    float id = 1 / d;
    float sumqx = 0, sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
        float q = IQ4_LEVELS[best_index_iq4(id * x[j])];
        sumqx += weight[j] * q * x[j];
        sumq2 += weight[j] * q * q;
    }
    d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
    float best = d * sumqx;
    for (int itry = -7; itry <= 7; ++itry) {
        id = (itry + IQ4_LEVELS[0]) / max;
        sumqx = sumq2 = 0;
        for (int j = 0; j < 32; ++j) {
            float q = IQ4_LEVELS[best_index_iq4(id * x[j])];
            sumqx += weight[j] * q * x[j];
            sumq2 += weight[j] * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

/* weights of the IQ4 search for `size` values: x^2, or qw*sqrt(sigma2 + x^2) */
static void iq4_weights(const float *x, const float *qw, int size, float sigma2, float *weight) {
    for (int j = 0; j < size; ++j) weight[j] = qw ? qw[j] * sqrtf(sigma2 + x[j] * x[j]) : x[j] * x[j];
}

static void row_iq4_nl(const float *x, uint8_t *y, int64_t n, const float *qw) {
    for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, y += 18) {
        float weight[32];
        uint8_t L[32];
        float sigma2 = sum_of_squares(32, x) * (2.f / 32);
        iq4_weights(x, qw ? qw + 32 * ib : NULL, 32, sigma2, weight);
        float scale = iq4_group_scale(x, weight);
        store_fp16(y, scale);
        float id = scale ? 1 / scale : 0;
        for (int j = 0; j < 32; ++j) L[j] = (uint8_t)best_index_iq4(id * x[j]);
        pack_nibbles_32(L, y + 2);
    }
}

static void row_iq4_xs(const float *x, uint8_t *y, int64_t n, const float *qw) {
    for (int64_t ib = 0; ib < n / QK_K; ++ib, x += QK_K, y += 136) {
        float weight[32], scales[8], amax;
        uint8_t L[QK_K];
        float sigma2 = sum_of_squares(QK_K, x) * (2.f / QK_K);
        for (int j = 0; j < 8; ++j) {
            iq4_weights(x + 32 * j, qw ? qw + QK_K * ib + 32 * j : NULL, 32, sigma2, weight);
            scales[j] = iq4_group_scale(x + 32 * j, weight);
        }
        float max_scale = first_abs_max(8, scales, &amax);
        float d = -max_scale / 32;
        store_fp16(y, d);
        float id = d ? 1 / d : 0.f;
        uint16_t scales_h = 0;
        uint8_t *scales_l = y + 4;
        for (int j = 0; j < 8; ++j) {
            int l = MAX(-32, MIN(31, nearest_int(id * scales[j])));
            float dl = d * l;
            float idl = dl ? 1 / dl : 0.f;
            for (int k = 0; k < 32; ++k) L[32 * j + k] = (uint8_t)best_index_iq4(idl * x[32 * j + k]);
            l += 32;
            if (j % 2 == 0) scales_l[j / 2] = (uint8_t)(l & 0xF);
            else scales_l[j / 2] |= (uint8_t)((l & 0xF) << 4);
            scales_h |= (uint16_t)((l >> 4) << (2 * j));
        }
        memcpy(y + 2, &scales_h, 2);
        for (int j = 0; j < 8; ++j) pack_nibbles_32(L + 32 * j, y + 8 + 16 * j);
    }
}

/* ------------------------------------------------------------------ entry point */

typedef struct {
    int type;
    int block_size;
    int type_size;
    row_quantizer quantize_row;
    int ns_per_value; /* rough single-core cost (with an imatrix for the legacy types) */
    quantize_check check; /* NULL: nothing to check */
} format_t;

static const format_t FORMATS[] = {
    {T_Q4_0, 32, 18, row_q4_0, 30},     {T_Q4_1, 32, 20, row_q4_1, 40},
    {T_Q5_0, 32, 22, row_q5_0, 30},     {T_Q5_1, 32, 24, row_q5_1, 40},
    {T_Q8_0, 32, 34, row_q8_0, 6},      {T_Q2_K, 256, 84, row_q2_k, 40},
    {T_Q3_K, 256, 110, row_q3_k, 25},   {T_Q4_K, 256, 144, row_q4_k, 45},
    {T_Q5_K, 256, 176, row_q5_k, 45},   {T_Q6_K, 256, 210, row_q6_k, 35},
    {T_IQ4_NL, 32, 18, row_iq4_nl, 100}, {T_IQ4_XS, 256, 136, row_iq4_xs, 100},
    {T_IQ2_XXS, 256, 66, row_iq2_xxs, 1100, iq2_prepare},
    {T_IQ2_XS, 256, 74, row_iq2_xs, 2000, iq2_prepare},
    {T_IQ2_S, 256, 82, row_iq2_s, 850, iq2_prepare},
    {T_IQ1_S, 256, 50, row_iq1_s, 500, iq2_prepare},
    {T_IQ1_M, 256, 56, row_iq1_m, 500, iq2_prepare},
    {T_IQ3_XXS, 256, 98, row_iq3_xxs, 600, iq3_prepare}, {T_IQ3_S, 256, 110, row_iq3_s, 400, iq3_prepare},
    {T_TQ1_0, 256, 54, row_tq1_0, 6},      {T_TQ2_0, 256, 66, row_tq2_0, 6},
};

/* Threads for a call: starting and joining a parallel region costs tens of microseconds
 * on a quiet machine and milliseconds on a busy one, so calls under ~2 ms of work stay on
 * the calling thread. */
static int threads_for(const format_t *fmt, int64_t n_values, int with_imatrix, int n_threads) {
    int64_t ns = fmt->ns_per_value;
    if (fmt->block_size == 32 && fmt->type != T_IQ4_NL && !with_imatrix) ns = 3; /* plain legacy */
    return n_values * ns < 2000000 ? 1 : n_threads;
}

static const format_t *find_format(int type) {
    for (size_t i = 0; i < sizeof(FORMATS) / sizeof(FORMATS[0]); ++i) {
        if (FORMATS[i].type == type) return &FORMATS[i];
    }
    return NULL;
}

int llmpress_quantize_supports(int type) { return find_format(type) != NULL; }

/* The row quantizer of a type (NULL if none), for C code in other libraries that stores
 * ggml blocks itself: the fused decoder's quantized KV cache (kernels/decode.c). Called
 * with the importance NULL; it checks nothing (the caller's rows are whole blocks). */
row_quantizer llmpress_quantize_row_function(int type) {
    const format_t *fmt = find_format(type);
    return fmt ? fmt->quantize_row : NULL;
}

static int all_finite(const float *x, int64_t n) {
    int finite = 1;
    for (int64_t i = 0; i < n; ++i) finite &= isfinite(x[i]) != 0;
    return finite;
}

/* Quantize nrows rows; on ERR_NONFINITE *bad_row is the first row holding a NaN/inf. */
int llmpress_quantize(int type, const float *src, uint8_t *dst, int64_t nrows, int64_t n_per_row,
                      const float *imatrix, int n_threads, int64_t *bad_row) {
    const format_t *fmt = find_format(type);
    if (!fmt) return ERR_TYPE;
    if (!src || !dst || !bad_row || nrows < 0 || n_per_row <= 0) return ERR_ARGS;
    if (n_per_row % fmt->block_size) return ERR_ROW;
    *bad_row = -1;
    if (fmt->check) {
        int status = fmt->check(type, imatrix);
        if (status != OK) return status;
    }
    if (imatrix) {
        for (int64_t i = 0; i < n_per_row; ++i) {
            if (!isfinite(imatrix[i])) return ERR_IMATRIX;
        }
    }
    const int64_t row_bytes = n_per_row / fmt->block_size * fmt->type_size;
    int64_t first_bad = nrows;
#ifdef _OPENMP
    if (n_threads <= 0) n_threads = omp_get_max_threads();
    n_threads = threads_for(fmt, nrows * n_per_row, imatrix != NULL, n_threads);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) reduction(min:first_bad)
#else
    (void)n_threads;
#endif
    for (int64_t r = 0; r < nrows; ++r) {
        const float *x = src + r * n_per_row;
        if (!all_finite(x, n_per_row)) {
            if (r < first_bad) first_bad = r;
            continue;
        }
        fmt->quantize_row(x, dst + r * row_bytes, n_per_row, imatrix);
    }
    if (first_bad < nrows) {
        *bad_row = first_bad;
        return ERR_NONFINITE;
    }
    return OK;
}

/* Importable as a module too (setuptools builds it as an extension); Python calls the
 * functions above through ctypes, which releases the GIL for the call. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quantize", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__quantize(void) { return PyModule_Create(&module); }
