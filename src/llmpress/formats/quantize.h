/* What the block quantizer files share: ggml's type numbers, the status codes, and the
 * float primitives whose exact rounding the byte-identity with ggml depends on.
 * quantize.c holds the legacy and k-quant types and the entry point; the i-quant
 * quantizers live in files of their own and register in quantize.c's FORMATS table.
 * Every file including this one is compiled like quantize.c (no -ffast-math, no FMA).
 */
#ifndef LLMPRESS_QUANTIZE_H
#define LLMPRESS_QUANTIZE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* GGML type numbers (ggml.h enum ggml_type) */
enum {
    T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
    T_IQ4_NL = 20, T_IQ4_XS = 23,
    T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ1_S = 19, T_IQ2_S = 22, T_IQ1_M = 29,
    T_IQ3_XXS = 18, T_IQ3_S = 21, T_TQ1_0 = 34, T_TQ2_0 = 35,
};

/* status codes (mirrored in formats/cquant.py) */
enum {
    OK = 0,
    ERR_TYPE = -1,       /* type not handled here */
    ERR_ROW = -2,        /* row length not a multiple of the block */
    ERR_ARGS = -3,       /* NULL pointer or negative size */
    ERR_NONFINITE = -4,  /* a NaN or infinity in the values (row in *bad_row) */
    ERR_IMATRIX = -5,    /* a NaN or infinity in the importance weights */
    ERR_NEEDS_IMATRIX = -6, /* the type cannot be quantized without importance weights */
    ERR_NO_GRID = -7,    /* the i-quant grid was not handed in (llmpress_quantize_set_*) */
};

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define MIN(a, b) ((a) < (b) ? (a) : (b))

static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1, 13, 25, 38, 53, 69, 89, 113};

/* ------------------------------------------------------------------ float primitives */

/* ggml's nearest_int: add 1.5*2^23, read the low mantissa bits (ties to even). */
static inline int nearest_int(float v) {
    float shifted = v + 12582912.f;
    int32_t bits;
    memcpy(&bits, &shifted, 4);
    return (bits & 0x007fffff) - 0x00400000;
}

/* float32 -> IEEE half, round to nearest even; NaN -> 0x7e00 (as ggml). */
static inline uint16_t fp32_to_fp16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    uint32_t magnitude = bits & 0x7fffffff;
    if (magnitude > 0x7f800000) return sign | 0x7e00;
    if (magnitude >= 0x477ff000) return sign | 0x7c00; /* 65520 and up round to inf */
    if (magnitude >= 0x38800000) {                      /* a normal half */
        uint32_t half = ((magnitude >> 23) - 112) << 10 | ((magnitude >> 13) & 0x3ff);
        uint32_t rest = magnitude & 0x1fff;
        if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++; /* may carry into exp */
        return sign | (uint16_t)half;
    }
    /* subnormal half: units of 2^-24; scaling by 2^24 is exact, the add rounds to even */
    float units = fabsf(f) * 16777216.f;
    float rounded = (units + 8388608.f) - 8388608.f;
    return sign | (uint16_t)rounded;
}

static inline float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float value;
    if (exp == 0) {
        value = (float)man * 5.9604644775390625e-8f; /* man * 2^-24, exact */
    } else {
        uint32_t bits = exp == 0x1f ? 0x7f800000 | (man << 13) : ((exp + 112) << 23) | (man << 13);
        memcpy(&value, &bits, 4);
    }
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits |= sign;
    memcpy(&value, &bits, 4);
    return value;
}

static inline void store_fp16(uint8_t *p, float v) {
    uint16_t h = fp32_to_fp16(v);
    memcpy(p, &h, 2);
}

static inline float load_fp16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return fp16_to_fp32(h);
}

/* Round the value through fp16 as stored: returns the float32 ggml reads back. */
static inline float stored_fp16(uint8_t *p, float v) {
    store_fp16(p, v);
    return load_fp16(p);
}

/* The value of largest magnitude, the first one on ties (`if (ax > amax)` from 0). */
static inline float first_abs_max(int n, const float *x, float *amax_out) {
    float amax = 0, max = 0;
    for (int i = 0; i < n; ++i) {
        float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    *amax_out = amax;
    return max;
}

/* sum of x*x in index order from 0 */
static inline float sum_of_squares(int64_t n, const float *x) {
    float s = 0;
    for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
    return s;
}

/* The grid i-quants' signs of 8 values: |x| into xval, the sign bits returned. With
 * parity (ggml's 7 stored bits, the 8th implied) an odd count of negatives flips the value
 * of least w x^2 back: its sign is then wrong, and stored as such. */
static inline uint8_t split_signs_8(const float *x, const float *weight, float *xval, int parity) {
    int negatives = 0;
    uint8_t s = 0;
    for (int i = 0; i < 8; ++i) {
        if (x[i] >= 0) {
            xval[i] = x[i];
        } else {
            xval[i] = -x[i];
            ++negatives;
            s |= (uint8_t)(1 << i);
        }
    }
    if (parity && negatives % 2) {
        int cheapest = 0;
        float least = weight[0] * x[0] * x[0];
        for (int i = 1; i < 8; ++i) {
            float cost = weight[i] * x[i] * x[i];
            if (cost < least) {
                least = cost;
                cheapest = i;
            }
        }
        xval[cheapest] = -xval[cheapest];
        s ^= (uint8_t)(1 << cheapest);
    }
    return parity ? (uint8_t)(s & 127) : s;
}

typedef void (*row_quantizer)(const float *x, uint8_t *y, int64_t n, const float *qw);
/* checked before quantizing rows of a type: OK, or why not (ERR_NEEDS_IMATRIX, ...) */
typedef int (*quantize_check)(int type, const float *imatrix);

/* quantize.c */
float make_qp_quants(int n, int nmax, const float *x, uint8_t *L, const float *w);

/* quantize_iq2.c */
void row_iq2_xxs(const float *x, uint8_t *y, int64_t n, const float *qw);
void row_iq2_xs(const float *x, uint8_t *y, int64_t n, const float *qw);
void row_iq2_s(const float *x, uint8_t *y, int64_t n, const float *qw);
void row_iq1_s(const float *x, uint8_t *y, int64_t n, const float *qw);
void row_iq1_m(const float *x, uint8_t *y, int64_t n, const float *qw);
int iq2_prepare(int type, const float *imatrix);

/* quantize_iq3.c (the IQ3 grids must be handed over first: llmpress_quantize_set_iq3_grid) */
void row_iq3_xxs(const float *x, uint8_t *y, int64_t n, const float *qw);
void row_iq3_s(const float *x, uint8_t *y, int64_t n, const float *qw);
void row_tq1_0(const float *x, uint8_t *y, int64_t n, const float *qw);
void row_tq2_0(const float *x, uint8_t *y, int64_t n, const float *qw);
int iq3_prepare(int type, const float *imatrix);

#endif
