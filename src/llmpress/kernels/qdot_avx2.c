/* AVX2 kernels: the same integer sums as qdot_portable.c, 32 codes at a time.
 *
 * Unsigned weight codes times signed activation codes, pairwise added to int16
 * (_mm256_maddubs_epi16: at most 2 * 63 * 127, no saturation), then times the 16-value
 * groups' integer scales and added to int32 (_mm256_madd_epi16); one float multiply-add
 * per block. Compiled for AVX2 whatever the build's -march, and only called when the CPU
 * has it (qmatmul.c checks at run time), so one build runs on every x86-64.
 */
#include "qdot.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

int avx2_compiled(void) { return 1; }

static inline float half(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return _cvtsh_ss(h); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline __m256i load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* A dot_fn from a kernel written for n_x activation rows (plus constant arguments),
 * specialized for one row (decode) and for a full group (prompts): each weight block is
 * unpacked once for all the rows. */
#define ROWS_DOT(NAME, ROWS, ...)                                                               \
    static void NAME(const uint8_t *row, const QRow *x, int n_x, int64_t nb, float *out) {    \
        if (n_x == 1) ROWS(row, x, 1, nb, out, ##__VA_ARGS__);                                  \
        else if (n_x == DOT_ROWS) ROWS(row, x, DOT_ROWS, nb, out, ##__VA_ARGS__);               \
        else ROWS(row, x, n_x, nb, out, ##__VA_ARGS__);                                         \
    }

/* 32 codes times 32 activation codes, each 16-value half times its own integer scale. */
static inline __m256i dot32(__m256i codes, const int8_t *x, int scale_a, int scale_b) {
    const __m256i scales = _mm256_set_m128i(_mm_set1_epi16((short)scale_b), _mm_set1_epi16((short)scale_a));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, load(x)), scales);
}

/* sum_g weights[g] * bsum[g] over a super-block's 16 groups. */
static inline int weighted_bsums(const int16_t *bsum, __m256i weights16) {
    return hsum_i32(_mm256_madd_epi16(load(bsum), weights16));
}

/* --- k-quants (activation blocks of 256) --- */

/* Q4_K/Q5_K's 8 scales and 8 mins (6 bits each, packed in 12 bytes, see k4_scale_min) as
 * bytes, unpacked four at a time in 32-bit words. */
static inline void k4_scales_mins(const uint8_t *packed, uint8_t scales[8], uint8_t mins[8]) {
    uint32_t u[3], out[4];
    memcpy(u, packed, 12);
    out[0] = u[0] & 0x3f3f3f3f;                                            /* scales 0-3 */
    out[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);      /* scales 4-7 */
    out[2] = u[1] & 0x3f3f3f3f;                                            /* mins 0-3 */
    out[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4); /* mins 4-7 */
    memcpy(scales, out, 8);
    memcpy(mins, out + 2, 8);
}

/* Each of 8 byte values twice, as 16 int16 (one per 16-value group of the activation sums). */
static inline __m256i pairs16(const uint8_t values[8]) {
    const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)values));
    return _mm256_set_m128i(_mm_unpackhi_epi16(v, v), _mm_unpacklo_epi16(v, v));
}

/* Q4_K, or Q5_K (fifth bits in qh), for one or several activation rows: several rows
 * (prompts) share each unpacked block, and a row's float operations are the same in
 * either case, so it gives the same bits alone or with others. Inlined with a constant
 * n_x, the per-row sums stay in registers. */
static inline __attribute__((always_inline)) void rows_k4(const uint8_t *row, const QRow *x,
                                                          const int n_x, int64_t nb, float *out,
                                                          const int fifth_bit) {
    const __m256i low4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    const int64_t block_bytes = fifth_bit ? 176 : 144;
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * block_bytes, *qs = blk + (fifth_bit ? 48 : 16);
        uint8_t sc[8], mn[8];
        k4_scales_mins(blk + 4, sc, mn);
        __m256i sum[DOT_ROWS];
        for (int r = 0; r < DOT_ROWS; r++) sum[r] = _mm256_setzero_si256();
        for (int p = 0; p < 4; p++) {
            const __m256i bytes = load(qs + 32 * p);
            __m256i lo = _mm256_and_si256(bytes, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            if (fifth_bit) {  /* bit j of qh[l] is the fifth bit of value l of sub-block j */
                const __m256i qh = load(blk + 16);
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * p), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * p + 1), one), 4));
            }
            const __m256i scale_lo = _mm256_set1_epi16(sc[2 * p]), scale_hi = _mm256_set1_epi16(sc[2 * p + 1]);
            for (int r = 0; r < n_x; r++) {
                const int8_t *q = x[r].q + b * 256 + 64 * p;
                const __m256i a = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(q)), scale_lo);
                const __m256i c = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(q + 32)), scale_hi);
                sum[r] = _mm256_add_epi32(sum[r], _mm256_add_epi32(a, c));
            }
        }
        const float d = half(blk), dmin = half(blk + 2);
        const __m256i mins = pairs16(mn);
        for (int r = 0; r < n_x; r++) {
            /* d * sum(scale * code * x) - dmin * sum(min * group sum of x), kept in lanes */
            const __m256 min_part = _mm256_cvtepi32_ps(_mm256_madd_epi16(load(x[r].bsum + b * 16), mins));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[r].d[b]), _mm256_cvtepi32_ps(sum[r]), acc[r]);
            acc[r] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * x[r].d[b]), min_part, acc[r]);
        }
    }
    for (int r = 0; r < n_x; r++) out[r] = hsum(acc[r]);
}

ROWS_DOT(dot_Q4_K_avx2, rows_k4, 0) ROWS_DOT(dot_Q5_K_avx2, rows_k4, 1)

/* Q6_K: codes 0..63 = 4 low bits (ql) | 2 high bits (qh), value d * scale * (code - 32).
 * Rows as Q4_K's: one row alone, or several sharing each unpacked block, with the same
 * float operations per row. */
static inline __attribute__((always_inline)) void rows_Q6_K(const uint8_t *row, const QRow *x,
                                                            const int n_x, int64_t nb, float *out) {
    const __m256i low4 = _mm256_set1_epi8(15), low2 = _mm256_set1_epi8(3);
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        __m256i sum[DOT_ROWS];
        for (int r = 0; r < DOT_ROWS; r++) sum[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = load(blk + 64 * h), ql1 = load(blk + 64 * h + 32);
            const __m256i qh = load(blk + 128 + 32 * h);
            const __m256i lows[4] = {_mm256_and_si256(ql0, low4), _mm256_and_si256(ql1, low4),
                                     _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                                     _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4)};
            for (int k = 0; k < 4; k++) {
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), low2);
                const __m256i codes = _mm256_or_si256(lows[k], _mm256_slli_epi16(high, 4));
                const int g = 8 * h + 2 * k;
                const __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
                for (int r = 0; r < n_x; r++) {
                    const __m256i part = _mm256_maddubs_epi16(codes, load(x[r].q + b * 256 + 128 * h + 32 * k));
                    sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(part, scales));
                }
            }
        }
        /* minus 32 * scale * (sum of the 16 activation codes), per group, in lanes */
        const __m256i scales16 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc)), 5);
        const float d = half(blk + 208);
        for (int r = 0; r < n_x; r++) {
            const __m256i offsets = _mm256_madd_epi16(load(x[r].bsum + b * 16), scales16);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[r].d[b]),
                                     _mm256_cvtepi32_ps(_mm256_sub_epi32(sum[r], offsets)), acc[r]);
        }
    }
    for (int r = 0; r < n_x; r++) out[r] = hsum(acc[r]);
}

ROWS_DOT(dot_Q6_K_avx2, rows_Q6_K)

/* Q3_K's 16 scales (qdot.h q3_k_scale) as int16, unpacked with vector shifts: the low
 * nibbles of bytes 0..7 are scales 0..7, their high nibbles 8..15; byte 8 + i % 4 holds
 * scale i's top two bits at bit 2 (i / 4). */
static inline __m256i q3_k_scales(const uint8_t *s) {
    uint32_t top;
    memcpy(&top, s + 8, 4);
    const __m128i packed = _mm_loadl_epi64((const __m128i *)s), low4 = _mm_set1_epi8(15);
    const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(packed, low4),
                                           _mm_and_si128(_mm_srli_epi16(packed, 4), low4));
    const __m128i high = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)top), _mm_setr_epi32(0, 2, 4, 6)),
                                       _mm_set1_epi8(3));
    const __m128i scales = _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(high, 4)), _mm_set1_epi8(32));
    return _mm256_cvtepi8_epi16(scales);
}

/* Q3_K: codes 0..7 = 2 low bits (qs) | 1 high bit (hmask), value d * scale * (code - 4). */
static inline __attribute__((always_inline)) void rows_Q3_K(const uint8_t *row, const QRow *x,
                                                            const int n_x, int64_t nb, float *out) {
    const __m256i low2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 110;
        int16_t sc[16];
        const __m256i scales = q3_k_scales(blk + 96);
        _mm256_storeu_si256((__m256i *)sc, scales);
        const __m256i hmask = load(blk);
        __m256i sum[DOT_ROWS];
        for (int r = 0; r < DOT_ROWS; r++) sum[r] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i qs = load(blk + 32 + 32 * (j / 4));
            const __m256i low = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * (j % 4)), low2);
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(hmask, j), one);
            const __m256i codes = _mm256_or_si256(low, _mm256_slli_epi16(high, 2));
            for (int r = 0; r < n_x; r++)
                sum[r] = _mm256_add_epi32(sum[r], dot32(codes, x[r].q + b * 256 + 32 * j, sc[2 * j], sc[2 * j + 1]));
        }
        for (int r = 0; r < n_x; r++) {
            const int offset = 4 * weighted_bsums(x[r].bsum + b * 16, scales);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half(blk + 108) * x[r].d[b]),
                                     _mm256_cvtepi32_ps(_mm256_sub_epi32(sum[r], _mm256_setr_epi32(offset, 0, 0, 0, 0, 0, 0, 0))),
                                     acc[r]);
        }
    }
    for (int r = 0; r < n_x; r++) out[r] = hsum(acc[r]);
}
ROWS_DOT(dot_Q3_K_avx2, rows_Q3_K)

/* Q2_K: 2-bit codes, value d * (sc & 15) * code - dmin * (sc >> 4), per 16 values. */
static inline __attribute__((always_inline)) void rows_Q2_K(const uint8_t *row, const QRow *x,
                                                            const int n_x, int64_t nb, float *out) {
    const __m256i low2 = _mm256_set1_epi8(3);
    __m256 acc[DOT_ROWS];
    float mins_total[DOT_ROWS] = {0};
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 84;
        const __m256i packed = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)blk));
        const __m256i mins16 = _mm256_srli_epi16(packed, 4);
        __m256i sum[DOT_ROWS];
        for (int r = 0; r < DOT_ROWS; r++) sum[r] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i qs = load(blk + 16 + 32 * (j / 4));
            const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * (j % 4)), low2);
            for (int r = 0; r < n_x; r++)
                sum[r] = _mm256_add_epi32(sum[r], dot32(codes, x[r].q + b * 256 + 32 * j, blk[2 * j] & 15, blk[2 * j + 1] & 15));
        }
        for (int r = 0; r < n_x; r++) {
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half(blk + 80) * x[r].d[b]), _mm256_cvtepi32_ps(sum[r]), acc[r]);
            mins_total[r] += half(blk + 82) * x[r].d[b] * (float)weighted_bsums(x[r].bsum + b * 16, mins16);
        }
    }
    for (int r = 0; r < n_x; r++) out[r] = hsum(acc[r]) - mins_total[r];
}
ROWS_DOT(dot_Q2_K_avx2, rows_Q2_K)

/* --- legacy types (activation blocks of 32): value = d * code + m --- */

static inline __m256i nibbles(const uint8_t *qs) {  /* 16 bytes -> 32 codes, low nibbles first */
    const __m128i bytes = _mm_loadu_si128((const __m128i *)qs), low4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
}

static inline __m256i fifth_bits(const uint8_t *qh_bytes) {  /* bit j of 32 -> 0x10 in byte j */
    uint32_t qh;
    memcpy(&qh, qh_bytes, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
}

/* IQ4_NL / IQ4_XS: the indices become signed table values by a byte shuffle. Signed
 * codes (these and Q8_0's): |value| times x carrying the value's sign keeps maddubs' first
 * operand unsigned. */
static inline __m256i iq4_values(const uint8_t *qs) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_VALUES));
    return _mm256_shuffle_epi8(table, nibbles(qs));
}

static inline __m256i signed_dot32(__m256i w, const int8_t *x) {  /* 8 int32 partial sums */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(load(x), w)),
                             _mm256_set1_epi16(1));
}

static inline __attribute__((always_inline)) void rows_IQ4_XS(const uint8_t *row, const QRow *x,
                                                              const int n_x, int64_t nb, float *out) {
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 136;
        __m256i sum[DOT_ROWS];
        for (int r = 0; r < DOT_ROWS; r++) sum[r] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i values = iq4_values(blk + 8 + 16 * j), scale = _mm256_set1_epi32(iq4_xs_scale(blk, j));
            for (int r = 0; r < n_x; r++)
                sum[r] = _mm256_add_epi32(sum[r], _mm256_mullo_epi32(signed_dot32(values, x[r].q + b * 256 + 32 * j), scale));
        }
        for (int r = 0; r < n_x; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(half(blk) * x[r].d[b]), _mm256_cvtepi32_ps(sum[r]), acc[r]);
    }
    for (int r = 0; r < n_x; r++) out[r] = hsum(acc[r]);
}
ROWS_DOT(dot_IQ4_XS_avx2, rows_IQ4_XS)

/* --- the grid i-quants: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S (qdot.h's IQ_GRIDS) ---
 * 32 values at a time: the grid entries gathered into one vector (unsigned, at most 62),
 * their signs moved onto the activations (_mm256_sign_epi8 with bytes of +1 / -1), then
 * maddubs and madd with the 16-value halves' odd scales 2s + 1, as for the k-quants. */
static inline __m256i iq_dot32(__m256i grid, __m256i signs, const int8_t *x, int scale_a, int scale_b) {
    const __m256i scales = _mm256_set_m128i(_mm_set1_epi16((short)scale_b), _mm_set1_epi16((short)scale_a));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(grid, _mm256_sign_epi8(load(x), signs)), scales);
}

/* Four 7-bit ksigns indices (bits 0, 7, 14, 21 of aux) as 32 bytes of +1 / -1. */
static inline __m256i iq_ksigns(uint32_t aux) {
    const uint64_t *s = IQ_GRIDS.signs;
    return _mm256_set_epi64x(s[(aux >> 21) & 127], s[(aux >> 14) & 127], s[(aux >> 7) & 127], s[aux & 127]);
}

/* 32 sign bits (bit j: value j is negative) as 32 bytes of +1 / -1. */
static inline __m256i iq_sign_bits(const uint8_t *bits) {
    uint32_t w;
    memcpy(&w, bits, 4);
    const __m256i byte_of_bit = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                  0x0101010101010101, 0);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    const __m256i spread = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)w), byte_of_bit), bit);
    return _mm256_or_si256(_mm256_cmpeq_epi8(spread, bit), _mm256_set1_epi8(1));
}

static float one_IQ2_XXS(const uint8_t *row, QRow x, int64_t nb) {
    const uint64_t *grid = IQ_GRIDS.iq2xxs;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 66;
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const uint8_t *idx = blk + 2 + 8 * g;
            uint32_t aux;
            memcpy(&aux, idx + 4, 4);
            const __m256i values = _mm256_set_epi64x(grid[idx[3]], grid[idx[2]], grid[idx[1]], grid[idx[0]]);
            const int scale = 2 * (int)(aux >> 28) + 1;
            sum = _mm256_add_epi32(sum, iq_dot32(values, iq_ksigns(aux), x.q + 256 * b + 32 * g, scale, scale));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * (half(blk) * 0.125f)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}

static float one_IQ2_XS(const uint8_t *row, QRow x, int64_t nb) {
    const uint64_t *grid = IQ_GRIDS.iq2xs, *signs = IQ_GRIDS.signs;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 74;
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            uint16_t qs[4];
            memcpy(qs, blk + 2 + 8 * g, 8);
            const __m256i values = _mm256_set_epi64x(grid[qs[3] & 511], grid[qs[2] & 511],
                                                     grid[qs[1] & 511], grid[qs[0] & 511]);
            const __m256i sign = _mm256_set_epi64x(signs[qs[3] >> 9], signs[qs[2] >> 9],
                                                   signs[qs[1] >> 9], signs[qs[0] >> 9]);
            const int s = blk[66 + g];
            sum = _mm256_add_epi32(sum, iq_dot32(values, sign, x.q + 256 * b + 32 * g,
                                                 2 * (s & 15) + 1, 2 * (s >> 4) + 1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * (half(blk) * 0.125f)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}

static float one_IQ2_S(const uint8_t *row, QRow x, int64_t nb) {
    const uint64_t *grid = IQ_GRIDS.iq2s;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 82;
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const uint8_t *i = blk + 2 + 4 * g;
            const int h = blk[66 + g];  /* bit pair e: the top bits of index e */
#define IQ2S_ENTRY(e) grid[i[e] | (((h >> (2 * (e))) & 3) << 8)]
            const __m256i values = _mm256_set_epi64x(IQ2S_ENTRY(3), IQ2S_ENTRY(2), IQ2S_ENTRY(1), IQ2S_ENTRY(0));
#undef IQ2S_ENTRY
            const int s = blk[74 + g];
            sum = _mm256_add_epi32(sum, iq_dot32(values, iq_sign_bits(blk + 34 + 4 * g), x.q + 256 * b + 32 * g,
                                                 2 * (s & 15) + 1, 2 * (s >> 4) + 1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * (half(blk) * 0.125f)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}

static float one_IQ3_XXS(const uint8_t *row, QRow x, int64_t nb) {
    const uint32_t *grid = IQ_GRIDS.iq3xxs;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 98;
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const uint8_t *i = blk + 2 + 8 * g;
            uint32_t aux;
            memcpy(&aux, blk + 66 + 4 * g, 4);
            const __m256i values = _mm256_set_epi32((int)grid[i[7]], (int)grid[i[6]], (int)grid[i[5]],
                                                    (int)grid[i[4]], (int)grid[i[3]], (int)grid[i[2]],
                                                    (int)grid[i[1]], (int)grid[i[0]]);
            const int scale = 2 * (int)(aux >> 28) + 1;
            sum = _mm256_add_epi32(sum, iq_dot32(values, iq_ksigns(aux), x.q + 256 * b + 32 * g, scale, scale));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * (half(blk) * 0.25f)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}

static float one_IQ3_S(const uint8_t *row, QRow x, int64_t nb) {
    const uint32_t *grid = IQ_GRIDS.iq3s;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 110;
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const uint8_t *i = blk + 2 + 8 * g;
            const int h = blk[66 + g];  /* bit e: the ninth bit of index e */
#define IQ3S_ENTRY(e) (int)grid[i[e] | (((h >> (e)) & 1) << 8)]
            const __m256i values = _mm256_set_epi32(IQ3S_ENTRY(7), IQ3S_ENTRY(6), IQ3S_ENTRY(5), IQ3S_ENTRY(4),
                                                    IQ3S_ENTRY(3), IQ3S_ENTRY(2), IQ3S_ENTRY(1), IQ3S_ENTRY(0));
#undef IQ3S_ENTRY
            const int scale = 2 * ((blk[106 + g / 2] >> (4 * (g % 2))) & 15) + 1;
            sum = _mm256_add_epi32(sum, iq_dot32(values, iq_sign_bits(blk + 74 + 4 * g),
                                                 x.q + 256 * b + 32 * g, scale, scale));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * half(blk)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}
/* IQ1_S: weights 8g +- 1 (g ternary, see qdot_portable.c), never zero: signed_dot32. */
static float one_IQ1_S(const uint8_t *row, QRow x, int64_t nb) {
    const uint64_t *grid = IQ_GRIDS.iq1s;  /* g + 1 */
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 50;
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const uint8_t *i = blk + 2 + 4 * g;
            uint16_t qh;
            memcpy(&qh, blk + 34 + 2 * g, 2);
#define IQ1S_ENTRY(e) grid[i[e] | (((qh >> (3 * (e))) & 7) << 8)]
            const __m256i g1 = _mm256_set_epi64x(IQ1S_ENTRY(3), IQ1S_ENTRY(2), IQ1S_ENTRY(1), IQ1S_ENTRY(0));
#undef IQ1S_ENTRY
            /* 8 (g + 1) - 8 +- 1; the shift stays inside each byte (g + 1 <= 2) */
            const __m256i w = _mm256_sub_epi8(_mm256_slli_epi16(g1, 3), _mm256_set1_epi8(qh & 0x8000 ? 9 : 7));
            const __m256i part = signed_dot32(w, x.q + 256 * b + 32 * g);
            sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(part, _mm256_set1_epi32(2 * ((qh >> 12) & 7) + 1)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * (half(blk) * 0.125f)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}
ROWS_FROM_ONE(dot_IQ1_S_avx2, one_IQ1_S)

/* IQ1_M: IQ1_S's weights with a delta sign per 8 and a scale per 16 values; d is spread
 * over the top nibbles of the four scale words. */
static float one_IQ1_M(const uint8_t *row, QRow x, int64_t nb) {
    const uint64_t *grid = IQ_GRIDS.iq1s;  /* g + 1 */
    const uint64_t plus = 0x0707070707070707ULL, minus = 0x0909090909090909ULL;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 56;
        uint16_t sc[4];
        memcpy(sc, blk + 48, 8);
        const uint16_t d_bits = (sc[0] >> 12) | ((sc[1] >> 8) & 0xF0) | ((sc[2] >> 4) & 0xF00) | (sc[3] & 0xF000);
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const uint8_t *i = blk + 4 * g;
            const int n[4] = {blk[32 + 2 * g] & 15, blk[32 + 2 * g] >> 4, blk[33 + 2 * g] & 15, blk[33 + 2 * g] >> 4};
#define IQ1M_ENTRY(e) grid[i[e] | ((n[e] & 7) << 8)]
#define IQ1M_OFFSET(e) (n[e] & 8 ? minus : plus)
            const __m256i g1 = _mm256_set_epi64x(IQ1M_ENTRY(3), IQ1M_ENTRY(2), IQ1M_ENTRY(1), IQ1M_ENTRY(0));
            const __m256i offsets = _mm256_set_epi64x(IQ1M_OFFSET(3), IQ1M_OFFSET(2), IQ1M_OFFSET(1), IQ1M_OFFSET(0));
#undef IQ1M_ENTRY
#undef IQ1M_OFFSET
            const __m256i part = signed_dot32(_mm256_sub_epi8(_mm256_slli_epi16(g1, 3), offsets), x.q + 256 * b + 32 * g);
            const int s_a = 2 * ((sc[g / 2] >> (6 * (g % 2))) & 7) + 1, s_b = 2 * ((sc[g / 2] >> (6 * (g % 2) + 3)) & 7) + 1;
            sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(part, _mm256_set_m128i(_mm_set1_epi32(s_b), _mm_set1_epi32(s_a))));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * (_cvtsh_ss(d_bits) * 0.125f)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}
ROWS_FROM_ONE(dot_IQ1_M_avx2, one_IQ1_M)

/* TQ2_0: 2-bit codes, weight code - 1 in {-1, 0, 1}: signed_dot32 (a zero weight zeroes x). */
static float one_TQ2_0(const uint8_t *row, QRow x, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 66;
        __m256i sum = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i bytes = load(blk + 32 * h);
            for (int k = 0; k < 4; k++) {
                const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * k), _mm256_set1_epi8(3));
                sum = _mm256_add_epi32(sum, signed_dot32(_mm256_sub_epi8(codes, _mm256_set1_epi8(1)),
                                                         x.q + 256 * b + 128 * h + 32 * k));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * half(blk + 64)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}
ROWS_FROM_ONE(dot_TQ2_0_avx2, one_TQ2_0)

/* TQ1_0: the base-3 bytes decoded in scalar code (qdot_portable.c), the dot in vectors. */
static float one_TQ1_0(const uint8_t *row, QRow x, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 54;
        int8_t w[256];
        tq1_0_weights(blk, w);
        __m256i sum = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) sum = _mm256_add_epi32(sum, signed_dot32(load(w + 32 * g), x.q + 256 * b + 32 * g));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x.d[b] * half(blk + 52)), _mm256_cvtepi32_ps(sum), acc);
    }
    return hsum(acc);
}
ROWS_FROM_ONE(dot_TQ1_0_avx2, one_TQ1_0)

ROWS_FROM_ONE(dot_IQ2_XXS_avx2, one_IQ2_XXS) ROWS_FROM_ONE(dot_IQ2_XS_avx2, one_IQ2_XS)
ROWS_FROM_ONE(dot_IQ2_S_avx2, one_IQ2_S)
ROWS_FROM_ONE(dot_IQ3_XXS_avx2, one_IQ3_XXS) ROWS_FROM_ONE(dot_IQ3_S_avx2, one_IQ3_S)

/* --- legacy types and IQ4_NL, eight weight rows at a time ---
 * Each weight row's integer block sum lands in its own lane (sum8), so the float work -
 * (d_w * d_x) * sum + m_w * (d_x * sum of x) - is one vector operation for 8 rows, and each
 * block's codes are unpacked once for all activation rows. */

static inline int legacy_bytes(const int type) {
    return type == Q4_0 || type == IQ4_NL ? 18 : type == Q4_1 ? 20 : type == Q5_0 ? 22
         : type == Q5_1 ? 24 : 34;
}

/* Codes as unsigned bytes, or (Q8_0, IQ4_NL) as signed bytes. */
static inline __m256i legacy_codes(const uint8_t *blk, const int type) {
    switch (type) {
    case Q4_0: return nibbles(blk + 2);
    case Q4_1: return nibbles(blk + 4);
    case Q5_0: return _mm256_or_si256(nibbles(blk + 6), fifth_bits(blk + 2));
    case Q5_1: return _mm256_or_si256(nibbles(blk + 8), fifth_bits(blk + 4));
    case Q8_0: return load(blk + 2);
    default: return iq4_values(blk + 2);
    }
}

/* The f16 at byte `offset` of 8 blocks, as 8 floats. */
static inline uint16_t u16(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return h; }
static inline __m256 halves8(const uint8_t *const blk[TILE_ROWS], int offset) {
    /* inserted lane by lane: a store of 8 halves and a wide load would stall */
    const __m128i h = _mm_setr_epi16((short)u16(blk[0] + offset), (short)u16(blk[1] + offset),
                                     (short)u16(blk[2] + offset), (short)u16(blk[3] + offset),
                                     (short)u16(blk[4] + offset), (short)u16(blk[5] + offset),
                                     (short)u16(blk[6] + offset), (short)u16(blk[7] + offset));
    return _mm256_cvtph_ps(h);
}

/* Lane i = the sum of v[i]'s eight int32. */
static inline __m256i sum8(const __m256i v[TILE_ROWS]) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

static inline __attribute__((always_inline)) void tile_legacy(
    const uint8_t *rows, int64_t stride, int n_w, const QRow *x, const int n_x, int64_t nb,
    float *out, int64_t out_stride, const int type) {
    const int bytes = legacy_bytes(type), is_signed = type == Q8_0 || type == IQ4_NL;
    const uint8_t *w[TILE_ROWS];
    for (int i = 0; i < TILE_ROWS; i++) w[i] = rows + (i < n_w ? i : 0) * stride;  /* spare lanes: row 0 */
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk[TILE_ROWS];
        __m256i codes[TILE_ROWS];
        for (int i = 0; i < TILE_ROWS; i++) {
            blk[i] = w[i] + b * bytes;
            codes[i] = legacy_codes(blk[i], type);
        }
        const __m256 d = halves8(blk, 0);
        /* value = d * code + m per block: m = -8d (Q4_0), -16d (Q5_0), stored (Q4_1/Q5_1) */
        const __m256 m = type == Q4_0 ? _mm256_mul_ps(d, _mm256_set1_ps(-8.0f))
                       : type == Q5_0 ? _mm256_mul_ps(d, _mm256_set1_ps(-16.0f))
                       : type == Q4_1 || type == Q5_1 ? halves8(blk, 2) : _mm256_setzero_ps();
        for (int r = 0; r < n_x; r++) {
            const __m256i xq = load(x[r].q + 32 * b);
            __m256i sums[TILE_ROWS];
            for (int i = 0; i < TILE_ROWS; i++)
                sums[i] = is_signed ? signed_dot32(codes[i], x[r].q + 32 * b)
                                    : _mm256_madd_epi16(_mm256_maddubs_epi16(codes[i], xq), _mm256_set1_epi16(1));
            const float dx = x[r].d[b];
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(dx)), _mm256_cvtepi32_ps(sum8(sums)), acc[r]);
            if (!is_signed) acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r].sum[b]), acc[r]);
        }
    }
    for (int r = 0; r < n_x; r++) {
        float lanes[TILE_ROWS];
        _mm256_storeu_ps(lanes, acc[r]);
        memcpy(out + r * out_stride, lanes, sizeof(float) * (size_t)n_w);
    }
}

/* A tile_fn from a kernel written for n_x activation rows (plus constant arguments),
 * specialized for one row (decode) and for a full group (prompts). */
#define ROWS_TILE(NAME, KERNEL, ...)                                                            \
    static void NAME(const uint8_t *rows, int64_t stride, int n_w, const QRow *x, int n_x,      \
                     int64_t nb, float *out, int64_t out_stride) {                              \
        if (n_x == 1) KERNEL(rows, stride, n_w, x, 1, nb, out, out_stride, ##__VA_ARGS__);      \
        else if (n_x == DOT_ROWS) KERNEL(rows, stride, n_w, x, DOT_ROWS, nb, out, out_stride, ##__VA_ARGS__); \
        else KERNEL(rows, stride, n_w, x, n_x, nb, out, out_stride, ##__VA_ARGS__);             \
    }
ROWS_TILE(tile_Q4_0_avx2, tile_legacy, Q4_0) ROWS_TILE(tile_Q4_1_avx2, tile_legacy, Q4_1)
ROWS_TILE(tile_Q5_0_avx2, tile_legacy, Q5_0) ROWS_TILE(tile_Q5_1_avx2, tile_legacy, Q5_1)
ROWS_TILE(tile_Q8_0_avx2, tile_legacy, Q8_0) ROWS_TILE(tile_IQ4_NL_avx2, tile_legacy, IQ4_NL)

/* --- Q4_K_X8 (qdot.h): 8 weight rows repacked, lane i of every sum is row i --- */

/* 8 bytes (one per row) as 8 int32 lanes, each holding the byte twice as int16: the
 * multiplier of a row's two int16 lanes in _mm256_madd_epi16. */
static inline __m256i per_row_pairs(const uint8_t *bytes) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    return _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
}

static inline __m256i broadcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

/* The block after next, asked for now: a group's blocks are one long stream that the
 * hardware prefetcher alone follows too late (Q6_K ffn_down one row: 1.5x faster). */
static inline void prefetch_block(const uint8_t *p, int bytes) {
    for (int line = 0; line < bytes; line += 64) _mm_prefetch((const char *)p + line, _MM_HINT_T0);
}

/* Q5_K_X8's fifth bits of quarter v (qdot.h) moved to bit 4 of each code byte: epi16
 * shifts are safe, the mask keeps bits that came from the same byte. */
static inline __m256i fifth_of(__m256i bits, int bit) {
    const __m256i b4 = _mm256_set1_epi8(0x10);
    return _mm256_and_si256(bit <= 4 ? _mm256_slli_epi16(bits, 4 - bit) : _mm256_srli_epi16(bits, bit - 4), b4);
}

/* Both repacked tiles keep few values live per step (codes of 8 values, one sum per
 * activation row), so that four activation rows fit the 16 vector registers. */
static inline __attribute__((always_inline)) void tile_k4x8(
    const uint8_t *rows, int64_t stride, int n_w, const QRow *x, const int n_x, int64_t nb, float *out, int64_t out_stride,
    const int fifth) {
    (void)stride; (void)n_w;  /* always a whole group of X8_ROWS */
    const __m256i low4 = _mm256_set1_epi8(15);
    const int bytes = fifth ? X8_BLOCK_Q5 : X8_BLOCK;
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = rows + b * bytes;
        prefetch_block(blk + 2 * bytes, bytes);
        __m256i sums[DOT_ROWS], mins[DOT_ROWS];
        for (int r = 0; r < DOT_ROWS; r++) sums[r] = mins[r] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const uint8_t *codes = blk + 160 + 128 * j;
            const __m256i scale = per_row_pairs(blk + 32 + 8 * j);
            const __m256i high = fifth ? load(blk + X8_BLOCK + 32 * j) : _mm256_setzero_si256();
            __m256i part[DOT_ROWS];
            for (int v = 0; v < 4; v++) {
                const __m256i packed = load(codes + 32 * v);
                __m256i lo = _mm256_and_si256(packed, low4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
                if (fifth) {
                    lo = _mm256_or_si256(lo, fifth_of(high, 2 * v));
                    hi = _mm256_or_si256(hi, fifth_of(high, 2 * v + 1));
                }
                for (int r = 0; r < n_x; r++) {
                    /* products summed in int16: 8 of at most 2 * 15 * 127 (4-bit codes), or
                     * 4 of 2 * 31 * 127 (5-bit codes: two partial sums per sub-block) */
                    const int8_t *q = x[r].q + 256 * b + 32 * j + 8 * v;
                    const __m256i pair = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(q)),
                                                          _mm256_maddubs_epi16(hi, broadcast4(q + 4)));
                    part[r] = v == 0 || (fifth && v == 2) ? pair : _mm256_add_epi16(part[r], pair);
                    if (v == 3 || (fifth && v == 1))
                        sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(part[r], scale));
                }
            }
        }
        for (int j = 0; j < 8; j++) {  /* the sub-blocks' two 16-value sums of x, times each row's min */
            const __m256i min = per_row_pairs(blk + 96 + 8 * j);
            for (int r = 0; r < n_x; r++) {
                const __m256i group_sums = _mm256_set1_epi32(*(const int32_t *)(x[r].bsum + 16 * b + 2 * j));
                mins[r] = _mm256_add_epi32(mins[r], _mm256_madd_epi16(group_sums, min));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
        for (int r = 0; r < n_x; r++) {
            const __m256 dx = _mm256_set1_ps(x[r].d[b]);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(sums[r]), acc[r]);
            acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(mins[r]), acc[r]);
        }
    }
    for (int r = 0; r < n_x; r++) _mm256_storeu_ps(out + r * out_stride, acc[r]);
}

ROWS_TILE(tile_Q4_K_X8_avx2, tile_k4x8, 0) ROWS_TILE(tile_Q5_K_X8_avx2, tile_k4x8, 1)

/* Q6_K_X8: codes = low nibbles | high bit pairs moved to bits 4-5 (epi16 shifts are safe:
 * the mask keeps each byte's own bits); two 16-value sub-blocks per 32 values, each with
 * its per-row scale; the codes' offset of 32 taken off through the activation sums. */
static inline __m256i q6_high(__m256i bits, int v) {
    const __m256i top2 = _mm256_set1_epi8(0x30);
    return _mm256_and_si256(v == 3 ? _mm256_srli_epi16(bits, 2) : _mm256_slli_epi16(bits, 4 - 2 * v), top2);
}

static inline __attribute__((always_inline)) void tile_q6x8(
    const uint8_t *rows, int64_t stride, int n_w, const QRow *x, const int n_x, int64_t nb, float *out, int64_t out_stride) {
    (void)stride; (void)n_w;  /* always a whole group of X8_ROWS */
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = rows + b * X8_BLOCK_Q6;
        prefetch_block(blk + 2 * X8_BLOCK_Q6, X8_BLOCK_Q6);
        __m256i sums[DOT_ROWS], offsets[DOT_ROWS];
        for (int r = 0; r < DOT_ROWS; r++) sums[r] = offsets[r] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const uint8_t *lows = blk + 144 + 128 * j;
            const __m256i high_a = load(blk + 1168 + 64 * j), high_b = load(blk + 1168 + 64 * j + 32);
            /* lane i: row i's (scale 2j, scale 2j+1); each duplicated for its sub-block */
            const __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 16 + 16 * j)));
            for (int v = 0; v < 4; v++) {
                const __m256i scale = v < 2 ? _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(scales, 0xa0), 0xa0)
                                            : _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(scales, 0xf5), 0xf5);
                const __m256i bytes = load(lows + 32 * v);
                const __m256i first = _mm256_or_si256(_mm256_and_si256(bytes, low4), q6_high(high_a, v));
                const __m256i second = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4),
                                                       q6_high(high_b, v));
                for (int r = 0; r < n_x; r++) {
                    /* two products per int16 lane: at most 2 * 2 * 63 * 127, below 2^15 */
                    const int8_t *q = x[r].q + 256 * b + 32 * j + 8 * v;
                    const __m256i pair = _mm256_add_epi16(_mm256_maddubs_epi16(first, broadcast4(q)),
                                                          _mm256_maddubs_epi16(second, broadcast4(q + 4)));
                    sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(pair, scale));
                }
            }
        }
        for (int j = 0; j < 8; j++) {  /* the codes' offset: 32 * scale * (sum of x) per sub-block */
            const __m256i scales = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 16 + 16 * j)));
            for (int r = 0; r < n_x; r++) {
                const __m256i group_sums = _mm256_set1_epi32(*(const int32_t *)(x[r].bsum + 16 * b + 2 * j));
                offsets[r] = _mm256_add_epi32(offsets[r], _mm256_madd_epi16(group_sums, scales));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        for (int r = 0; r < n_x; r++) {
            const __m256i total = _mm256_sub_epi32(sums[r], _mm256_slli_epi32(offsets[r], 5));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), _mm256_cvtepi32_ps(total), acc[r]);
        }
    }
    for (int r = 0; r < n_x; r++) _mm256_storeu_ps(out + r * out_stride, acc[r]);
}

ROWS_TILE(tile_Q6_K_X8_avx2, tile_q6x8)

/* Q4_0_X8 / Q4_1_X8 / Q5_0_X8 / Q5_1_X8: a 32-value block is one sub-block of Q4_K_X8's
 * (Q5_K_X8's) layout, with the legacy types' float steps (value = d * code + m, Q4_0's
 * m = -8 d, Q5_0's -16 d). */
static inline __attribute__((always_inline)) void tile_l4x8(
    const uint8_t *rows, int64_t stride, int n_w, const QRow *x, const int n_x, int64_t nb, float *out, int64_t out_stride,
    const int affine, const int fifth) {
    (void)stride; (void)n_w;  /* always a whole group of X8_ROWS */
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const int bytes = 8 * (18 + 2 * affine + 4 * fifth), head = affine ? 32 : 16;
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = rows + b * bytes;
        prefetch_block(blk + 4 * bytes, bytes);
        const __m256i high = fifth ? load(blk + head + 128) : _mm256_setzero_si256();
        __m256i part[DOT_ROWS], sums[DOT_ROWS];
        for (int v = 0; v < 4; v++) {
            const __m256i codes = load(blk + head + 32 * v);
            __m256i lo = _mm256_and_si256(codes, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4);
            if (fifth) {
                lo = _mm256_or_si256(lo, fifth_of(high, 2 * v));
                hi = _mm256_or_si256(hi, fifth_of(high, 2 * v + 1));
            }
            for (int r = 0; r < n_x; r++) {
                /* int16 sums of 8 products of 4-bit codes, or 4 of 5-bit ones (tile_k4x8) */
                const int8_t *q = x[r].q + 32 * b + 8 * v;
                const __m256i pair = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(q)),
                                                      _mm256_maddubs_epi16(hi, broadcast4(q + 4)));
                part[r] = v == 0 || (fifth && v == 2) ? pair : _mm256_add_epi16(part[r], pair);
                if (fifth && v == 1) sums[r] = _mm256_madd_epi16(part[r], ones);
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        const __m256 m = affine ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)))
                                : _mm256_mul_ps(d, _mm256_set1_ps(fifth ? -16.0f : -8.0f));
        for (int r = 0; r < n_x; r++) {
            __m256i sum = _mm256_madd_epi16(part[r], ones);
            if (fifth) sum = _mm256_add_epi32(sums[r], sum);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), _mm256_cvtepi32_ps(sum), acc[r]);
            acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r].sum[b]), acc[r]);
        }
    }
    for (int r = 0; r < n_x; r++) _mm256_storeu_ps(out + r * out_stride, acc[r]);
}

ROWS_TILE(tile_Q4_0_X8_avx2, tile_l4x8, 0, 0) ROWS_TILE(tile_Q4_1_X8_avx2, tile_l4x8, 1, 0)
ROWS_TILE(tile_Q5_0_X8_avx2, tile_l4x8, 0, 1) ROWS_TILE(tile_Q5_1_X8_avx2, tile_l4x8, 1, 1)

/* Q8_0_X8: signed codes times signed activations through maddubs' unsigned operand:
 * |w| * (x with w's sign); each pair of products (at most 2 * 127 * 127) goes to int32 at
 * once. */
static inline __attribute__((always_inline)) void tile_q8x8(
    const uint8_t *rows, int64_t stride, int n_w, const QRow *x, const int n_x, int64_t nb, float *out, int64_t out_stride) {
    (void)stride; (void)n_w;  /* always a whole group of X8_ROWS */
    const __m256i ones = _mm256_set1_epi16(1);
    enum { BYTES = 8 * 34 };
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = rows + b * BYTES;
        prefetch_block(blk + 3 * BYTES, BYTES);
        __m256i sums[DOT_ROWS];
        for (int v = 0; v < 8; v++) {
            const __m256i codes = load(blk + 16 + 32 * v), magnitudes = _mm256_abs_epi8(codes);
            for (int r = 0; r < n_x; r++) {
                const __m256i signed_x = _mm256_sign_epi8(broadcast4(x[r].q + 32 * b + 4 * v), codes);
                const __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, signed_x), ones);
                sums[r] = v == 0 ? sum : _mm256_add_epi32(sums[r], sum);
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        for (int r = 0; r < n_x; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), _mm256_cvtepi32_ps(sums[r]), acc[r]);
    }
    for (int r = 0; r < n_x; r++) _mm256_storeu_ps(out + r * out_stride, acc[r]);
}

ROWS_TILE(tile_Q8_0_X8_avx2, tile_q8x8)

const tile_fn avx2_tiles[N_TYPES] = {
    [Q4_0] = tile_Q4_0_avx2, [Q4_1] = tile_Q4_1_avx2, [Q5_0] = tile_Q5_0_avx2,
    [Q5_1] = tile_Q5_1_avx2, [Q8_0] = tile_Q8_0_avx2, [IQ4_NL] = tile_IQ4_NL_avx2,
    [Q4_K_X8] = tile_Q4_K_X8_avx2, [Q6_K_X8] = tile_Q6_K_X8_avx2,
    [Q4_0_X8] = tile_Q4_0_X8_avx2, [Q4_1_X8] = tile_Q4_1_X8_avx2, [Q5_K_X8] = tile_Q5_K_X8_avx2,
    [Q5_0_X8] = tile_Q5_0_X8_avx2, [Q5_1_X8] = tile_Q5_1_X8_avx2, [Q8_0_X8] = tile_Q8_0_X8_avx2,
};

/* --- F16 / BF16: 8 weights at a time widened to floats, times the float activations --- */
static inline __m256 widened(const uint8_t *p, const int type) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return type == F16 ? _mm256_cvtph_ps(h)
                       : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) void rows_float(
    const uint8_t *row, const QRow *x, const int n_x, int64_t nb, float *out, const int type) {
    __m256 acc[DOT_ROWS];
    for (int r = 0; r < DOT_ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < nb * 32; k += 8) {
        const __m256 w = widened(row + 2 * k, type);
        for (int r = 0; r < n_x; r++) acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[r].f + k), acc[r]);
    }
    for (int r = 0; r < n_x; r++) out[r] = hsum(acc[r]);
}

ROWS_DOT(dot_F16_avx2, rows_float, F16) ROWS_DOT(dot_BF16_avx2, rows_float, BF16)

/* The legacy types and IQ4_NL have tiles instead. */
const dot_fn avx2_dots[N_TYPES] = {
    [F16] = dot_F16_avx2, [BF16] = dot_BF16_avx2, [Q2_K] = dot_Q2_K_avx2, [Q3_K] = dot_Q3_K_avx2, [Q4_K] = dot_Q4_K_avx2,
    [Q5_K] = dot_Q5_K_avx2, [Q6_K] = dot_Q6_K_avx2, [IQ4_XS] = dot_IQ4_XS_avx2,
    [IQ2_XXS] = dot_IQ2_XXS_avx2, [IQ2_XS] = dot_IQ2_XS_avx2, [IQ3_XXS] = dot_IQ3_XXS_avx2,
    [IQ3_S] = dot_IQ3_S_avx2, [IQ2_S] = dot_IQ2_S_avx2, [IQ1_S] = dot_IQ1_S_avx2,
    [IQ1_M] = dot_IQ1_M_avx2, [TQ1_0] = dot_TQ1_0_avx2, [TQ2_0] = dot_TQ2_0_avx2,
};
#else
int avx2_compiled(void) { return 0; }
const dot_fn avx2_dots[N_TYPES] = {0};
const tile_fn avx2_tiles[N_TYPES] = {0};
#endif
