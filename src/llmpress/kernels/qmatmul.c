/* Matrix times a few activation rows, with the weights left in their GGUF block format.
 *
 *   y[t][n] = sum_k W[n][k] * x[t][k]      W: N rows of K values, packed as ggml blocks
 *
 * Activations stay float32 (unlike ggml, which quantizes them to 8 bits), so the result
 * differs from exact dequantize-then-multiply only in summation order. Each block's
 * scale and offset factor out of its inner dot product:
 *   sum_j (d*q_j + m) * x_j = d * sum_j q_j*x_j + m * sum_j x_j
 * and sum_j x_j per block is computed once per call (block_sums). k-quant super-blocks
 * (Q2_K to Q6_K: 256 values, sub-block scales) go 32 values at a time the same way: the
 * integer codes dotted with x, then scaled by their sub-block's scale (the portable
 * fallback dequantizes a whole super-block instead).
 * Rows of W are split across threads with OpenMP. Called from Python via ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <Python.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__F16C__)
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man) {  /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    } else bits = sign;
    float f; memcpy(&f, &bits, 4); return f;
}
#endif

static inline float read_half(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return half_to_float(h); }

/* Sum of every 32-value block of each activation row: sums[t][b]. */
void block_sums(const float *x, int64_t K, int64_t T, float *sums) {
    const int64_t nb = K / 32;
    for (int64_t t = 0; t < T; t++)
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + t * K + b * 32;
            float s = 0;
            for (int j = 0; j < 32; j++) s += xb[j];
            sums[t * nb + b] = s;
        }
}

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
       Q5_K = 13, Q6_K = 14 };
enum { MAX_ROWS = 16, MAX_WEIGHTS = 8 };  /* activation rows per pass over a weight row; fused weights */

static int64_t block_bytes(int type) {
    switch (type) {
    case Q4_0: return 18; case Q4_1: return 20; case Q5_0: return 22;
    case Q5_1: return 24; case Q8_0: return 34;
    case Q2_K: return 84; case Q3_K: return 110; case Q4_K: return 144; case Q5_K: return 176; case Q6_K: return 210;
    default: return 0;
    }
}

/* k-quants pack 256 values per super-block, the others 32 per block. */
static int is_k_quant(int type) { return type >= Q2_K && type <= Q6_K; }
static int64_t block_values(int type) { return is_k_quant(type) ? 256 : 32; }
static int64_t row_bytes(int type, int64_t K) { return K / block_values(type) * block_bytes(type); }

/* Q3_K's scale i (0..15): low 4 bits in byte i % 8 (nibble i / 8), high 2 bits in byte
 * 8 + i % 4 (pair i / 4), stored plus 32. */
static inline int q3_k_scale(const uint8_t *s, int i) {
    return (((s[i % 8] >> (4 * (i / 8))) & 15) | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32;
}

/* Q4_K/Q5_K's scale and min of sub-block j (0..7), 6 bits each in 12 bytes: sub-blocks 0-3
 * keep them in bytes j and j + 4; 4-7 take 4 low bits from byte j + 4 and the 2 high bits
 * from the tops of bytes j - 4 (scale) and j (min) (ggml's get_scale_min_k4). */
static inline void k4_scale_min(const uint8_t *s, int j, int *scale, int *min) {
    *scale = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *min = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
}

/* One k-quant super-block to 256 floats, as formats/kquants.py dequantizes it.
 * Q4_K/Q5_K: 8 sub-blocks of 32, value = d*scale_j*q - dmin*min_j with 6-bit scales and
 * mins packed in 12 bytes (k4_scale_min); Q5_K adds a fifth bit from qh.
 * Q6_K: 16 sub-blocks of 16 with int8 scales, value = d*scale*(q - 32), q from 4 low bits
 * in ql and 2 high bits in qh. Q3_K: 16 groups of 16 with signed 6-bit scales, value =
 * d*scale*(q - 4) with q's 2 low bits as in Q2_K and its third bit from hmask.
 * Q2_K: 16 groups of 16, value = d*(sc & 15)*q - dmin*(sc >> 4) with 2-bit q, four to a
 * byte (bit pair k of byte l is value 32k + l of its half). */
static void dequantize_k_block(int type, const uint8_t *b, float *w) {
    if (type == Q3_K) {
        const float d = read_half(b + 108);
        for (int i = 0; i < 256; i++) {
            const int half = i / 128, k = (i % 128) / 32, l = i % 32;
            const int low = (b[32 + half * 32 + l] >> (2 * k)) & 3, high = (b[l] >> (i / 32)) & 1;
            w[i] = d * (float)q3_k_scale(b + 96, i / 16) * (float)((low | (high << 2)) - 4);
        }
        return;
    }
    if (type == Q2_K) {
        const float d = read_half(b + 80), dmin = read_half(b + 82);
        for (int i = 0; i < 256; i++) {
            const int half = i / 128, k = (i % 128) / 32, l = i % 32, sc = b[i / 16];
            const int q = (b[16 + half * 32 + l] >> (2 * k)) & 3;
            w[i] = d * (float)(sc & 15) * (float)q - dmin * (float)(sc >> 4);
        }
        return;
    }
    if (type == Q6_K) {
        const float d = read_half(b + 208);
        const int8_t *scales = (const int8_t *)(b + 192);
        for (int half = 0; half < 2; half++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < 32; l++) {
                    const int i = half * 128 + k * 32 + l;
                    const int low = (b[half * 64 + (k & 1) * 32 + l] >> (4 * (k >> 1))) & 15;
                    const int high = (b[128 + half * 32 + l] >> (2 * k)) & 3;
                    w[i] = d * (float)scales[i / 16] * (float)((low | (high << 4)) - 32);
                }
        return;
    }
    const float d = read_half(b), dmin = read_half(b + 2);
    const uint8_t *qh = b + 16, *qs = b + (type == Q5_K ? 48 : 16);
    for (int j = 0; j < 8; j++) {
        int sc, mn;
        k4_scale_min(b + 4, j, &sc, &mn);
        const float scale = d * (float)sc, offset = dmin * (float)mn;
        for (int l = 0; l < 32; l++) {
            int q = (qs[(j / 2) * 32 + l] >> (4 * (j & 1))) & 15;
            if (type == Q5_K) q |= ((qh[l] >> j) & 1) << 4;
            w[j * 32 + l] = scale * (float)q - offset;
        }
    }
}

/* One k-quant weight row against T activation rows: each super-block dequantized once,
 * then a plain 256-wide dot product per activation row. */
static void row_times_k(int type, const uint8_t *row, const float *x, int64_t K, int64_t T,
                        float *out, int64_t out_stride) {
    const int64_t nb = K / 256, bb = block_bytes(type);
    float acc[MAX_ROWS], w[256];
    memset(acc, 0, sizeof(float) * (size_t)T);
    for (int64_t b = 0; b < nb; b++) {
        dequantize_k_block(type, row + b * bb, w);
        for (int64_t t = 0; t < T; t++) {
            const float *xb = x + t * K + b * 256;
            float sum = 0;
            for (int j = 0; j < 256; j++) sum += w[j] * xb[j];
            acc[t] += sum;
        }
    }
    for (int64_t t = 0; t < T; t++) out[t * out_stride] = acc[t];
}

/* Unpack one block's integer codes to floats: w[j] = q_j, with the block's scale d and
 * offset m returned so that value_j = d * q_j + m (Q4_0/Q5_0/Q8_0 fold their -8/-16/0
 * zero point into m = -8d, -16d, 0). Fixed 32-wide loops, which the compiler vectorizes. */
static inline void unpack_block(int type, const uint8_t *blk, float *w, float *d, float *m) {
    const uint8_t *qs;
    uint32_t qh = 0;
    switch (type) {
    case Q8_0:
        *d = read_half(blk); *m = 0;
        for (int j = 0; j < 32; j++) w[j] = (float)((const int8_t *)(blk + 2))[j];
        return;
    case Q4_0: *d = read_half(blk); *m = -8 * *d; qs = blk + 2; break;
    case Q4_1: *d = read_half(blk); *m = read_half(blk + 2); qs = blk + 4; break;
    case Q5_0: *d = read_half(blk); *m = -16 * *d; memcpy(&qh, blk + 2, 4); qs = blk + 6; break;
    default:   *d = read_half(blk); *m = read_half(blk + 2); memcpy(&qh, blk + 4, 4); qs = blk + 8; break;
    }
    for (int j = 0; j < 16; j++) {
        w[j] = (float)((qs[j] & 15) | (((qh >> j) & 1) << 4));
        w[j + 16] = (float)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
}

/* One weight row against T activation rows: 32-wide vector accumulators per row of x,
 * reduced once at the end; the offset terms m * sum(x_block) accumulate separately. */
static void row_times(int type, const uint8_t *row, const float *x, const float *sums,
                      int64_t K, int64_t T, float *out, int64_t out_stride) {
    const int64_t nb = K / 32, bb = block_bytes(type);
    float acc[MAX_ROWS][32], offset[MAX_ROWS];
    memset(acc, 0, sizeof(float) * 32 * (size_t)T);
    memset(offset, 0, sizeof(float) * (size_t)T);
    for (int64_t b = 0; b < nb; b++) {
        float w[32], d, m;
        unpack_block(type, row + b * bb, w, &d, &m);
        for (int j = 0; j < 32; j++) w[j] *= d;
        for (int64_t t = 0; t < T; t++) {
            const float *xb = x + t * K + b * 32;
            for (int j = 0; j < 32; j++) acc[t][j] += w[j] * xb[j];
            offset[t] += m * sums[t * nb + b];
        }
    }
    for (int64_t t = 0; t < T; t++) {
        float s = offset[t];
        for (int j = 0; j < 32; j++) s += acc[t][j];
        out[t * out_stride] = s;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* Hand-vectorized rows for the 32-value block types: a block's 32 codes become four
 * 8-float vectors, scaled by d, multiplied into four accumulators per activation row. */
static inline void unpack_block_avx2(int type, const uint8_t *blk, __m256 w[4], float *m) {
    const float d = read_half(blk);
    __m128i lo, hi;
    if (type == Q8_0) {
        *m = 0;
        const __m128i a = _mm_loadu_si128((const __m128i *)(blk + 2));
        const __m128i b = _mm_loadu_si128((const __m128i *)(blk + 18));
        const __m256 dv = _mm256_set1_ps(d);
        w[0] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)));
        w[1] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))));
        w[2] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
        w[3] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
        return;
    }
    const int five_bit = type == Q5_0 || type == Q5_1;
    const uint8_t *qs = blk + (type == Q4_0 ? 2 : type == Q4_1 ? 4 : type == Q5_0 ? 6 : 8);
    *m = type == Q4_0 ? -8 * d : type == Q5_0 ? -16 * d : read_half(blk + 2);
    const __m128i q = _mm_loadu_si128((const __m128i *)qs), low4 = _mm_set1_epi8(15);
    lo = _mm_and_si128(q, low4);
    hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
    __m256i codes[4] = {_mm256_cvtepu8_epi32(lo), _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                        _mm256_cvtepu8_epi32(hi), _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))};
    if (five_bit) {  /* bit j of qh is the fifth bit of value j: shift each lane by its j */
        uint32_t qh;
        memcpy(&qh, blk + (type == Q5_0 ? 2 : 4), 4);
        const __m256i bits = _mm256_set1_epi32((int)qh), one = _mm256_set1_epi32(1);
        __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (int k = 0; k < 4; k++) {
            const __m256i fifth = _mm256_and_si256(_mm256_srlv_epi32(bits, lane), one);
            codes[k] = _mm256_or_si256(codes[k], _mm256_slli_epi32(fifth, 4));
            lane = _mm256_add_epi32(lane, _mm256_set1_epi32(8));
        }
    }
    const __m256 dv = _mm256_set1_ps(d);
    for (int k = 0; k < 4; k++) w[k] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(codes[k]));
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void row_times_k_avx2(int type, const uint8_t *row, const float *x, const float *sums,
                             int64_t K, int64_t T, float *out, int64_t out_stride);

static int row_times_avx2(int type, const uint8_t *row, const float *x, const float *sums,
                          int64_t K, int64_t T, float *out, int64_t out_stride) {
    if (!block_bytes(type)) return 0;
    if (is_k_quant(type)) {
        row_times_k_avx2(type, row, x, sums, K, T, out, out_stride);
        return 1;
    }
    const int64_t nb = K / 32, bb = block_bytes(type);
    if (T == 1) {  /* the decode case: accumulators stay in registers */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        float offset = 0;
        for (int64_t b = 0; b < nb; b++) {
            __m256 w[4]; float m;
            unpack_block_avx2(type, row + b * bb, w, &m);
            const float *xb = x + b * 32;
            a0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), a0);
            a1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), a1);
            a2 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), a2);
            a3 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), a3);
            offset += m * sums[b];
        }
        out[0] = offset + hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        return 1;
    }
    __m256 acc[MAX_ROWS];
    float offset[MAX_ROWS];
    for (int64_t t = 0; t < T; t++) { acc[t] = _mm256_setzero_ps(); offset[t] = 0; }
    for (int64_t b = 0; b < nb; b++) {
        __m256 w[4]; float m;
        unpack_block_avx2(type, row + b * bb, w, &m);
        for (int64_t t = 0; t < T; t++) {
            const float *xb = x + t * K + b * 32;
            __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
            s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), s);
            s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), s);
            acc[t] = _mm256_add_ps(acc[t], _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), s));
            offset[t] += m * sums[t * nb + b];
        }
    }
    for (int64_t t = 0; t < T; t++) out[t * out_stride] = offset[t] + hsum256(acc[t]);
    return 1;
}
/* 32 bytes of codes (0..255 fit, but k-quants use 0..63) as four 8-float vectors; signed
 * when `offset` is non-zero (Q6_K's codes are q - 32). */
static inline void codes_to_floats(__m256i bytes, int offset, __m256 q[4]) {
    const __m128i lo = _mm256_castsi256_si128(bytes), hi = _mm256_extracti128_si256(bytes, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; k++) {
        __m256i v = _mm256_cvtepu8_epi32(parts[k]);
        if (offset) v = _mm256_sub_epi32(v, _mm256_set1_epi32(offset));
        q[k] = _mm256_cvtepi32_ps(v);
    }
}

/* k-quant rows: each 32-value piece of a super-block becomes four float vectors of its
 * integer codes, dotted with x, and scaled once: Q4_K/Q5_K subtract dmin*min times the
 * piece's sum of x (block_sums), Q6_K's two 16-value halves carry their own scales. */
static void row_times_k_avx2(int type, const uint8_t *row, const float *x, const float *sums,
                             int64_t K, int64_t T, float *out, int64_t out_stride) {
    const int64_t nb = K / 256, bb = block_bytes(type);
    const __m256i low4 = _mm256_set1_epi8(15), low2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc[MAX_ROWS];
    float offset[MAX_ROWS];
    for (int64_t t = 0; t < T; t++) { acc[t] = _mm256_setzero_ps(); offset[t] = 0; }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        for (int j = 0; j < 8; j++) {  /* the 32-value pieces */
            __m256 q[4];
            float scale_a, scale_b, piece_offset = 0;
            __m256 min_a = _mm256_setzero_ps(), min_b = min_a;  /* Q2_K's per-16 offsets */
            if (type == Q3_K) {
                const int half = j / 4, k = j % 4;
                const __m256i qs = _mm256_loadu_si256((const __m256i *)(blk + 32 + half * 32));
                const __m256i hm = _mm256_loadu_si256((const __m256i *)blk);
                const __m256i low = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * k), low2);
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(hm, j), one);
                codes_to_floats(_mm256_or_si256(low, _mm256_slli_epi16(high, 2)), 4, q);
                const float d = read_half(blk + 108);
                scale_a = d * (float)q3_k_scale(blk + 96, 2 * j);
                scale_b = d * (float)q3_k_scale(blk + 96, 2 * j + 1);
            } else if (type == Q2_K) {
                const int half = j / 4, k = j % 4, sa = blk[2 * j], sb = blk[2 * j + 1];
                const __m256i qs = _mm256_loadu_si256((const __m256i *)(blk + 16 + half * 32));
                codes_to_floats(_mm256_and_si256(_mm256_srli_epi16(qs, 2 * k), low2), 0, q);
                const float d = read_half(blk + 80), dmin = read_half(blk + 82);
                scale_a = d * (float)(sa & 15);
                scale_b = d * (float)(sb & 15);
                min_a = _mm256_set1_ps(dmin * (float)(sa >> 4));
                min_b = _mm256_set1_ps(dmin * (float)(sb >> 4));
            } else if (type == Q6_K) {
                const int half = j / 4, k = j % 4;
                const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + half * 64 + (k & 1) * 32));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + half * 32));
                const __m256i low = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (k >> 1)), low4);
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), low2);
                codes_to_floats(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), 32, q);
                const float d = read_half(blk + 208);
                const int8_t *sc = (const int8_t *)(blk + 192) + half * 8 + k * 2;
                scale_a = d * (float)sc[0];
                scale_b = d * (float)sc[1];
            } else {
                int sc, mn;
                k4_scale_min(blk + 4, j, &sc, &mn);
                const uint8_t *qs = blk + (type == Q5_K ? 48 : 16) + (j / 2) * 32;
                __m256i codes = _mm256_and_si256(
                    _mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)qs), 4 * (j & 1)), low4);
                if (type == Q5_K) {
                    const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
                    const __m256i fifth = _mm256_and_si256(_mm256_srli_epi16(qh, j), one);
                    codes = _mm256_or_si256(codes, _mm256_slli_epi16(fifth, 4));
                }
                codes_to_floats(codes, 0, q);
                scale_a = scale_b = read_half(blk) * (float)sc;
                piece_offset = read_half(blk + 2) * (float)mn;
            }
            const __m256 va = _mm256_set1_ps(scale_a), vb = _mm256_set1_ps(scale_b);
            for (int64_t t = 0; t < T; t++) {
                const float *xb = x + t * K + b * 256 + j * 32;
                const __m256 sa = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8),
                                                  _mm256_mul_ps(q[0], _mm256_loadu_ps(xb)));
                const __m256 sb2 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24),
                                                   _mm256_mul_ps(q[2], _mm256_loadu_ps(xb + 16)));
                acc[t] = _mm256_fmadd_ps(vb, sb2, _mm256_fmadd_ps(va, sa, acc[t]));
                if (type == Q2_K) {  /* minus min times each 16-value half's sum of x */
                    const __m256 xa = _mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8));
                    const __m256 xc = _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24));
                    acc[t] = _mm256_fnmadd_ps(min_b, xc, _mm256_fnmadd_ps(min_a, xa, acc[t]));
                }
                offset[t] -= piece_offset * sums[t * (K / 32) + b * 8 + j];
            }
        }
    }
    for (int64_t t = 0; t < T; t++) out[t * out_stride] = offset[t] + hsum256(acc[t]);
}
#else
static int row_times_avx2(int type, const uint8_t *row, const float *x, const float *sums,
                          int64_t K, int64_t T, float *out, int64_t out_stride) { return 0; }
#endif

/* Whether a matmul of these weights and shapes is supported: 0, or -1. */
int qmatmul_check(int n_weights, const int *types, int64_t K, int64_t T) {
    if (n_weights < 1 || n_weights > MAX_WEIGHTS || K % 32 || T < 1) return -1;
    for (int i = 0; i < n_weights; i++)
        if (!block_bytes(types[i]) || K % block_values(types[i])) return -1;
    return 0;
}

/* y (T, N_1 + ... + N_W) = x (T, K) @ [W_1; ...; W_W]^T, for a checked matmul, called by
 * every thread of an enclosing parallel region: each takes its share of the output rows
 * (an orphaned `omp for`, which ends in a barrier). sums: block_sums of x. */
void qmatmul_rows(int n_weights, const int *types, const uint8_t *const *ws,
                  const int64_t *Ns, const float *x, const float *sums, float *y, int64_t K,
                  int64_t T) {
    int64_t starts[MAX_WEIGHTS + 1];
    starts[0] = 0;
    for (int i = 0; i < n_weights; i++) starts[i + 1] = starts[i] + Ns[i];
    const int64_t total = starts[n_weights];
#pragma omp for schedule(static)
    for (int64_t n = 0; n < total; n++) {
        int i = 0;
        while (n >= starts[i + 1]) i++;
        const uint8_t *row = ws[i] + (n - starts[i]) * row_bytes(types[i], K);
        for (int64_t t = 0; t < T; t += MAX_ROWS) {  /* activation rows in chunks */
            const int64_t rows = T - t < MAX_ROWS ? T - t : MAX_ROWS;
            const float *xt = x + t * K, *st = sums + t * (K / 32);
            if (row_times_avx2(types[i], row, xt, st, K, rows, y + t * total + n, total))
                continue;
            if (is_k_quant(types[i]))
                row_times_k(types[i], row, xt, K, rows, y + t * total + n, total);
            else
                row_times(types[i], row, xt, st, K, rows, y + t * total + n, total);
        }
    }
}

/* The same as one call from Python: several weights that share one input (q/k/v,
 * gate/up) go in one call, so one thread team serves them all. Returns 0, or -1 for an
 * unsupported type or shape. */
int llmpress_qmatmul(int n_weights, const int *types, const uint8_t *const *ws,
                     const int64_t *Ns, const float *x, float *y, int64_t K, int64_t T,
                     int n_threads) {
    if (qmatmul_check(n_weights, types, K, T)) return -1;
    float *sums = malloc(sizeof(float) * (size_t)(T * (K / 32)));
    if (!sums) return -1;
    block_sums(x, K, T, sums);
#pragma omp parallel num_threads(n_threads)
    qmatmul_rows(n_weights, types, ws, Ns, x, sums, y, K, T);
    free(sums);
    return 0;
}

int llmpress_qmatmul_supports(int type) { return block_bytes(type) != 0; }

/* Built as a Python extension only so that pip compiles it; it is loaded with ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qmatmul", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__qmatmul(void) { return PyModule_Create(&module); }
