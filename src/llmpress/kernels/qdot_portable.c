/* Portable C kernels (any CPU) and the shared pieces: block sizes, half floats, and the
 * quantization of activation rows. See qdot.h for the scheme. */
#include <math.h>

#include "qdot.h"

float half_to_float(uint16_t h) {
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

int64_t qtype_block_bytes(int type) {
    switch (type) {
    case F16: case BF16: return 64;  /* counted in blocks of 32 values, as the legacy types */
    case Q4_0: return 18; case Q4_1: return 20; case Q5_0: return 22;
    case Q5_1: return 24; case Q8_0: return 34;
    case Q2_K: return 84; case Q3_K: return 110; case Q4_K: return 144; case Q5_K: return 176; case Q6_K: return 210;
    case IQ4_NL: return 18; case IQ4_XS: return 136;
    case IQ2_XXS: return IQ_GRIDS.ready ? 66 : 0; case IQ2_XS: return IQ_GRIDS.ready ? 74 : 0;
    case IQ3_XXS: return IQ_GRIDS.ready ? 98 : 0; case IQ3_S: return IQ_GRIDS.ready ? 110 : 0;
    case IQ2_S: return IQ_GRIDS.ready ? 82 : 0; case IQ1_S: return IQ_GRIDS.ready ? 50 : 0;
    case IQ1_M: return IQ_GRIDS.ready ? 56 : 0; case TQ1_0: return 54; case TQ2_0: return 66;
    case Q4_K_X8: return X8_BLOCK / X8_ROWS; case Q6_K_X8: return X8_BLOCK_Q6 / X8_ROWS;
    case Q4_0_X8: return 18; case Q4_1_X8: return 20; case Q5_K_X8: return X8_BLOCK_Q5 / X8_ROWS;
    case Q5_0_X8: return 22; case Q5_1_X8: return 24; case Q8_0_X8: return 34;
    default: return 0;
    }
}

static int is_k_quant(int type) {
    return (type >= Q2_K && type <= Q6_K) || type == IQ4_XS || type == IQ2_XXS || type == IQ2_XS
        || type == IQ2_S || type == IQ3_XXS || type == IQ3_S || type == IQ1_S || type == IQ1_M
        || type == TQ1_0 || type == TQ2_0 || type == Q4_K_X8 || type == Q6_K_X8 || type == Q5_K_X8;
}
int64_t qtype_block_values(int type) { return qtype_block_bytes(type) ? (is_k_quant(type) ? 256 : 32) : 0; }
int64_t qtype_act_block(int type) { return type == F16 || type == BF16 ? 1 : qtype_block_values(type); }

/* Symmetric 8-bit blocks: d = max|x| / 127, code = round(x / d). */
void quantize_rows(const float *x, int64_t K, int64_t T, int64_t block, int8_t *q, float *d,
                   int16_t *bsum) {
    for (int64_t b = 0; b < T * K / block; b++) {
        const float *xb = x + b * block;
        float amax = 0;
        for (int64_t j = 0; j < block; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float scale = amax / 127.0f, inverse = amax > 0 ? 127.0f / amax : 0.0f;
        d[b] = scale;
        for (int64_t g = 0; g < block / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) {
                const float v = xb[g * 16 + j] * inverse;
                const int c = (int)(v + (v >= 0 ? 0.5f : -0.5f));  /* round half away from 0 */
                q[b * block + g * 16 + j] = (int8_t)c;
                sum += c;
            }
            bsum[b * block / 16 + g] = (int16_t)sum;
        }
    }
}

/* One k-quant super-block as unsigned codes with integer scales and mins per 16 values:
 * value_i = d * scale[i/16] * code_i - dmin * min[i/16]. Q6_K's and Q3_K's signed codes
 * (code - 32, code - 4) become mins of 32 * scale and 4 * scale with dmin = d. */
static void unpack_k_block(int type, const uint8_t *b, uint8_t *codes, int *scale, int *min,
                           float *d, float *dmin) {
    if (type == Q6_K) {
        *d = *dmin = read_half(b + 208);
        for (int i = 0; i < 256; i++) {
            const int half = i / 128, k = (i % 128) / 32, l = i % 32;
            const int low = (b[half * 64 + (k & 1) * 32 + l] >> (4 * (k >> 1))) & 15;
            const int high = (b[128 + half * 32 + l] >> (2 * k)) & 3;
            codes[i] = (uint8_t)(low | (high << 4));
        }
        for (int g = 0; g < 16; g++) { scale[g] = ((const int8_t *)(b + 192))[g]; min[g] = 32 * scale[g]; }
    } else if (type == Q3_K) {
        *d = *dmin = read_half(b + 108);
        for (int i = 0; i < 256; i++) {
            const int half = i / 128, k = (i % 128) / 32, l = i % 32;
            const int low = (b[32 + half * 32 + l] >> (2 * k)) & 3, high = (b[l] >> (i / 32)) & 1;
            codes[i] = (uint8_t)(low | (high << 2));
        }
        for (int g = 0; g < 16; g++) { scale[g] = q3_k_scale(b + 96, g); min[g] = 4 * scale[g]; }
    } else if (type == Q2_K) {
        *d = read_half(b + 80); *dmin = read_half(b + 82);
        for (int i = 0; i < 256; i++) {
            const int half = i / 128, k = (i % 128) / 32, l = i % 32;
            codes[i] = (b[16 + half * 32 + l] >> (2 * k)) & 3;
        }
        for (int g = 0; g < 16; g++) { scale[g] = b[g] & 15; min[g] = b[g] >> 4; }
    } else {  /* Q4_K, Q5_K: 8 sub-blocks of 32 */
        *d = read_half(b); *dmin = read_half(b + 2);
        const uint8_t *qh = b + 16, *qs = b + (type == Q5_K ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int sc, mn;
            k4_scale_min(b + 4, j, &sc, &mn);
            scale[2 * j] = scale[2 * j + 1] = sc;
            min[2 * j] = min[2 * j + 1] = mn;
            for (int l = 0; l < 32; l++) {
                int c = (qs[(j / 2) * 32 + l] >> (4 * (j & 1))) & 15;
                if (type == Q5_K) c |= ((qh[l] >> j) & 1) << 4;
                codes[j * 32 + l] = (uint8_t)c;
            }
        }
    }
}

static float dot_k_portable(int type, const uint8_t *row, QRow x, int64_t nb) {
    const int64_t bb = qtype_block_bytes(type);
    float total = 0;
    for (int64_t b = 0; b < nb; b++) {
        uint8_t codes[256];
        int scale[16], min[16];
        float d, dmin;
        unpack_k_block(type, row + b * bb, codes, scale, min, &d, &dmin);
        const int8_t *q = x.q + b * 256;
        int32_t scaled = 0, mins = 0;
        for (int g = 0; g < 16; g++) {
            int32_t sum = 0;
            for (int j = 0; j < 16; j++) sum += codes[g * 16 + j] * q[g * 16 + j];
            scaled += scale[g] * sum;
            mins += min[g] * x.bsum[b * 16 + g];
        }
        total += x.d[b] * (d * (float)scaled - dmin * (float)mins);
    }
    return total;
}

/* One 32-value block as codes with value_i = d * code_i + m. */
static void unpack_block(int type, const uint8_t *blk, int *codes, float *d, float *m) {
    const uint8_t *qs;
    uint32_t qh = 0;
    *d = read_half(blk);
    switch (type) {
    case Q8_0:
        *m = 0;
        for (int j = 0; j < 32; j++) codes[j] = ((const int8_t *)(blk + 2))[j];
        return;
    case Q4_0: *m = -8 * *d; qs = blk + 2; break;
    case Q4_1: *m = read_half(blk + 2); qs = blk + 4; break;
    case Q5_0: *m = -16 * *d; memcpy(&qh, blk + 2, 4); qs = blk + 6; break;
    default:   *m = read_half(blk + 2); memcpy(&qh, blk + 4, 4); qs = blk + 8; break;
    }
    for (int j = 0; j < 16; j++) {
        codes[j] = (qs[j] & 15) | (((qh >> j) & 1) << 4);
        codes[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    }
}

static float dot_legacy_portable(int type, const uint8_t *row, QRow x, int64_t nb) {
    const int64_t bb = qtype_block_bytes(type);
    float total = 0;
    for (int64_t b = 0; b < nb; b++) {
        int codes[32];
        float d, m;
        unpack_block(type, row + b * bb, codes, &d, &m);
        int32_t sum = 0;
        for (int j = 0; j < 32; j++) sum += codes[j] * x.q[b * 32 + j];
        total += x.d[b] * (d * (float)sum + m * (float)(x.bsum[2 * b] + x.bsum[2 * b + 1]));
    }
    return total;
}

/* IQ4_NL: 32 signed table values per block, times d. */
static float one_IQ4_NL(const uint8_t *row, QRow x, int64_t nb) {
    float total = 0;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 18;
        const int8_t *q = x.q + b * 32;
        int32_t sum = 0;
        for (int j = 0; j < 16; j++)
            sum += IQ4_VALUES[blk[2 + j] & 15] * q[j] + IQ4_VALUES[blk[2 + j] >> 4] * q[j + 16];
        total += x.d[b] * read_half(blk) * (float)sum;
    }
    return total;
}

/* IQ4_XS: 8 sub-blocks of 32 table values, each with its integer scale, times d. */
static float one_IQ4_XS(const uint8_t *row, QRow x, int64_t nb) {
    float total = 0;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 136, *qs = blk + 8;
        const int8_t *q = x.q + b * 256;
        int32_t scaled = 0;
        for (int j = 0; j < 8; j++) {
            int32_t sum = 0;
            for (int l = 0; l < 16; l++)
                sum += IQ4_VALUES[qs[16 * j + l] & 15] * q[32 * j + l]
                     + IQ4_VALUES[qs[16 * j + l] >> 4] * q[32 * j + l + 16];
            scaled += iq4_xs_scale(blk, j) * sum;
        }
        total += x.d[b] * read_half(blk) * (float)scaled;
    }
    return total;
}
ROWS_FROM_ONE(dot_IQ4_NL_portable, one_IQ4_NL) ROWS_FROM_ONE(dot_IQ4_XS_portable, one_IQ4_XS)

/* --- the grid i-quants IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M; TQ2_0 --- */

IqGrids IQ_GRIDS;

/* Called once by kernels/cpu.py with gguf-py's tables, in this order and these sizes:
 * the grids of IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S (entries of 8 or 4 value
 * bytes) and ksigns (128 bytes, widened here to bytes of +1 / -1). Returns 0, or -3
 * (ERR_BUFFER) for a missing table or a size that does not match, leaving the tables as
 * they were. */
int llmpress_set_iq_grids(int n_tables, const uint8_t *const *tables, const int64_t *bytes) {
    void *grids[] = {IQ_GRIDS.iq2xxs, IQ_GRIDS.iq2xs, IQ_GRIDS.iq2s, IQ_GRIDS.iq3xxs,
                     IQ_GRIDS.iq3s, IQ_GRIDS.iq1s};
    const int64_t sizes[] = {sizeof IQ_GRIDS.iq2xxs, sizeof IQ_GRIDS.iq2xs, sizeof IQ_GRIDS.iq2s,
                             sizeof IQ_GRIDS.iq3xxs, sizeof IQ_GRIDS.iq3s, sizeof IQ_GRIDS.iq1s, 128};
    enum { N_GRIDS = sizeof grids / sizeof grids[0] };
    if (n_tables != N_GRIDS + 1 || !tables || !bytes) return -3;
    for (int i = 0; i <= N_GRIDS; i++)
        if (!tables[i] || bytes[i] != sizes[i]) return -3;
    for (int i = 0; i < N_GRIDS; i++) memcpy(grids[i], tables[i], (size_t)sizes[i]);
    const uint8_t *ksigns = tables[N_GRIDS];
    for (int i = 0; i < 128; i++) {
        int8_t *signs = (int8_t *)&IQ_GRIDS.signs[i];
        for (int j = 0; j < 8; j++) signs[j] = (ksigns[i] >> j) & 1 ? -1 : 1;
    }
    IQ_GRIDS.ready = 1;
    return 0;
}

static inline int grid_value(const void *entry, int j) { return ((const uint8_t *)entry)[j]; }
static inline int sign_of(uint32_t index, int j) { return ((const int8_t *)&IQ_GRIDS.signs[index & 127])[j]; }

/* One grid i-quant block as 256 signed integer values w and odd integer scales per 16
 * values: value_i = (d * factor) * scale[i / 16] * w_i, the returned float is d * factor.
 * IQ2_*: d * (0.5 + s) / 4 = d / 8 * (2s + 1); IQ3_XXS: d / 4 * (2s + 1); IQ3_S: d * (2s + 1);
 * IQ1_S, IQ1_M: d * (2s + 1) * (g +- 1/8) = d / 8 * (2s + 1) * (8g +- 1), g in -1, 0, 1;
 * TQ1_0, TQ2_0: d * (code - 1). */
void tq1_0_weights(const uint8_t *blk, int8_t *w) {
    /* A byte holds 5 (or 4) trits as a fixed-point fraction: digit k is the integer part
     * of 3 * (byte * 3^k mod 256) / 256. Bytes 0-31: values k * 32 + j; bytes 32-47:
     * 160 + k * 16 + j; bytes 48-51 (4 trits): 240 + k * 4 + j. */
    static const int pow3[5] = {1, 3, 9, 27, 81};
    for (int k = 0; k < 5; k++) {
        for (int j = 0; j < 32; j++) w[32 * k + j] = (int8_t)((((blk[j] * pow3[k]) & 255) * 3 >> 8) - 1);
        for (int j = 0; j < 16; j++) w[160 + 16 * k + j] = (int8_t)((((blk[32 + j] * pow3[k]) & 255) * 3 >> 8) - 1);
        if (k < 4)
            for (int j = 0; j < 4; j++) w[240 + 4 * k + j] = (int8_t)((((blk[48 + j] * pow3[k]) & 255) * 3 >> 8) - 1);
    }
}

static float unpack_iq_block(int type, const uint8_t *b, int8_t *w, int *scale) {
    if (type == TQ1_0) {
        tq1_0_weights(b, w);
        for (int g = 0; g < 16; g++) scale[g] = 1;
        return read_half(b + 52);
    }
    if (type == TQ2_0) {
        for (int i = 0; i < 256; i++) w[i] = (int8_t)(((b[32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3) - 1);
        for (int g = 0; g < 16; g++) scale[g] = 1;
        return read_half(b + 64);
    }
    if (type == IQ1_M) {
        uint16_t packed[4];
        memcpy(packed, b + 48, 8);
        const uint16_t d_bits = (packed[0] >> 12) | ((packed[1] >> 8) & 0xF0) | ((packed[2] >> 4) & 0xF00)
                              | (packed[3] & 0xF000);
        for (int h = 0; h < 16; h++) scale[h] = 2 * ((packed[h / 4] >> (3 * (h % 4))) & 7) + 1;
        for (int e = 0; e < 32; e++) {  /* grid entries of 8 */
            const int nibble = (b[32 + e / 2] >> (4 * (e % 2))) & 15, index = b[e] | ((nibble & 7) << 8);
            for (int j = 0; j < 8; j++)
                w[8 * e + j] = (int8_t)(8 * (grid_value(&IQ_GRIDS.iq1s[index], j) - 1) + (nibble & 8 ? -1 : 1));
        }
        return half_to_float(d_bits) * 0.125f;
    }
    const float d = read_half(b);
    for (int g = 0; g < 8; g++) {  /* groups of 32 values */
        int8_t *out = w + 32 * g;
        if (type == IQ2_XXS || type == IQ3_XXS) {
            const uint8_t *idx = b + 2 + 8 * g;  /* IQ2_XXS: 4 indices then the u32 below */
            uint32_t aux;
            memcpy(&aux, type == IQ2_XXS ? idx + 4 : b + 66 + 4 * g, 4);
            scale[2 * g] = scale[2 * g + 1] = 2 * (int)(aux >> 28) + 1;
            for (int i = 0; i < 32; i++) {
                const int v = type == IQ2_XXS ? grid_value(&IQ_GRIDS.iq2xxs[idx[i / 8]], i % 8)
                                              : grid_value(&IQ_GRIDS.iq3xxs[idx[i / 4]], i % 4);
                out[i] = (int8_t)(v * sign_of(aux >> (7 * (i / 8)), i % 8));
            }
        } else if (type == IQ2_XS) {
            scale[2 * g] = 2 * (b[66 + g] & 15) + 1;
            scale[2 * g + 1] = 2 * (b[66 + g] >> 4) + 1;
            for (int i = 0; i < 32; i++) {
                uint16_t qs;
                memcpy(&qs, b + 2 + 8 * g + 2 * (i / 8), 2);
                out[i] = (int8_t)(grid_value(&IQ_GRIDS.iq2xs[qs & 511], i % 8) * sign_of(qs >> 9, i % 8));
            }
        } else if (type == IQ1_S) {
            uint16_t qh;
            memcpy(&qh, b + 34 + 2 * g, 2);
            scale[2 * g] = scale[2 * g + 1] = 2 * ((qh >> 12) & 7) + 1;
            for (int i = 0; i < 32; i++) {
                const int e = 4 * g + i / 8, index = b[2 + e] | (((qh >> (3 * (i / 8))) & 7) << 8);
                out[i] = (int8_t)(8 * (grid_value(&IQ_GRIDS.iq1s[index], i % 8) - 1) + (qh & 0x8000 ? -1 : 1));
            }
        } else if (type == IQ2_S) {  /* 10-bit indices (qs + a qh bit pair), one sign bit per value */
            scale[2 * g] = 2 * (b[74 + g] & 15) + 1;
            scale[2 * g + 1] = 2 * (b[74 + g] >> 4) + 1;
            for (int i = 0; i < 32; i++) {
                const int e = 4 * g + i / 8, index = b[2 + e] | (((b[66 + g] >> (2 * (e % 4))) & 3) << 8);
                const int negative = (b[34 + 4 * g + i / 8] >> (i % 8)) & 1;
                out[i] = (int8_t)(negative ? -grid_value(&IQ_GRIDS.iq2s[index], i % 8)
                                           : grid_value(&IQ_GRIDS.iq2s[index], i % 8));
            }
        } else {  /* IQ3_S: 9-bit indices (qs + one qh bit), one sign bit per value */
            scale[2 * g] = scale[2 * g + 1] = 2 * ((b[106 + g / 2] >> (4 * (g % 2))) & 15) + 1;
            for (int i = 0; i < 32; i++) {
                const int e = 8 * g + i / 4, index = b[2 + e] | (((b[66 + g] >> (e % 8)) & 1) << 8);
                const int negative = (b[74 + 4 * g + i / 8] >> (i % 8)) & 1;
                out[i] = (int8_t)(negative ? -grid_value(&IQ_GRIDS.iq3s[index], i % 4)
                                           : grid_value(&IQ_GRIDS.iq3s[index], i % 4));
            }
        }
    }
    return type == IQ3_S ? d : d * (type == IQ3_XXS ? 0.25f : 0.125f);  /* IQ2_*, IQ1_S: d / 8 */
}

static float dot_iq_portable(int type, const uint8_t *row, QRow x, int64_t nb) {
    const int64_t bb = qtype_block_bytes(type);
    float total = 0;
    for (int64_t b = 0; b < nb; b++) {
        int8_t w[256];
        int scale[16];
        const float d = unpack_iq_block(type, row + b * bb, w, scale);
        const int8_t *q = x.q + b * 256;
        int32_t scaled = 0;
        for (int g = 0; g < 16; g++) {
            int32_t sum = 0;
            for (int j = 0; j < 16; j++) sum += w[16 * g + j] * q[16 * g + j];
            scaled += scale[g] * sum;
        }
        total += x.d[b] * (d * (float)scaled);
    }
    return total;
}

/* F16 / BF16 rows times float activations; in 8 lanes, summed as the AVX2 kernel sums
 * them, so the two paths differ only by fused multiply-add rounding. */
static float bf16_to_float(uint16_t h) { uint32_t bits = (uint32_t)h << 16; float f; memcpy(&f, &bits, 4); return f; }
static float dot_float_portable(int type, const uint8_t *row, QRow x, int64_t nb) {
    float lanes[8] = {0};
    for (int64_t k = 0; k < nb * 32; k++) {
        uint16_t h;
        memcpy(&h, row + 2 * k, 2);
        lanes[k % 8] += (type == F16 ? half_to_float(h) : bf16_to_float(h)) * x.f[k];
    }
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

#define PORTABLE(T, KIND) \
    static float one_##T(const uint8_t *row, QRow x, int64_t nb) { \
        return dot_##KIND##_portable(T, row, x, nb); } \
    ROWS_FROM_ONE(dot_##T##_portable, one_##T)
PORTABLE(F16, float) PORTABLE(BF16, float) PORTABLE(Q4_0, legacy) PORTABLE(Q4_1, legacy) PORTABLE(Q5_0, legacy) PORTABLE(Q5_1, legacy)
PORTABLE(Q8_0, legacy) PORTABLE(Q2_K, k) PORTABLE(Q3_K, k) PORTABLE(Q4_K, k) PORTABLE(Q5_K, k)
PORTABLE(Q6_K, k) PORTABLE(IQ2_XXS, iq) PORTABLE(IQ2_XS, iq) PORTABLE(IQ2_S, iq) PORTABLE(IQ3_XXS, iq)
PORTABLE(IQ3_S, iq) PORTABLE(IQ1_S, iq) PORTABLE(IQ1_M, iq) PORTABLE(TQ1_0, iq) PORTABLE(TQ2_0, iq)

/* --- Q4_K_X8 (qdot.h): the layout, and its tile in plain C --- */

/* Row i's codes of one block into a group block: each (j, v) quarter's byte 4 i + c packs
 * the codes of values 8 v + c and 8 v + 4 + c of sub-block j (qdot.h). */
static void interleave_nibbles(const uint8_t codes[256], int i, uint8_t *out) {
    for (int j = 0; j < 8; j++)
        for (int v = 0; v < 4; v++)
            for (int c = 0; c < 4; c++) {
                const uint8_t *p = codes + 32 * j + 8 * v + c;
                out[128 * j + 32 * v + 4 * i + c] = (uint8_t)((p[0] & 15) | (p[4] & 15) << 4);
            }
}

/* Q4_K (144-byte blocks) or Q5_K (176: fifth bits in qh) rows into X8 groups. */
static void repack_k4_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K, int fifth) {
    const int in_bytes = fifth ? 176 : 144, out_bytes = fifth ? X8_BLOCK_Q5 : X8_BLOCK;
    const int64_t nb = K / 256, row_bytes = nb * in_bytes;
    for (int64_t g = 0; g < n_rows / X8_ROWS; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *out = dst + (g * nb + b) * out_bytes;
            if (fifth) memset(out + X8_BLOCK, 0, 256);
            for (int i = 0; i < X8_ROWS; i++) {
                const uint8_t *blk = src + (g * X8_ROWS + i) * row_bytes + b * in_bytes;
                const uint8_t *qh = blk + 16, *qs = blk + (fifth ? 48 : 16);
                memcpy(out + 2 * i, blk, 2);
                memcpy(out + 16 + 2 * i, blk + 2, 2);
                uint8_t codes[256];
                for (int j = 0; j < 8; j++) {
                    int scale, min;
                    k4_scale_min(blk + 4, j, &scale, &min);
                    out[32 + 8 * j + i] = (uint8_t)scale;
                    out[96 + 8 * j + i] = (uint8_t)min;
                    for (int l = 0; l < 32; l++)
                        codes[32 * j + l] = (uint8_t)(((qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15)
                                                      | (fifth ? ((qh[l] >> j) & 1) << 4 : 0));
                }
                interleave_nibbles(codes, i, out + 160);
                for (int j = 0; fifth && j < 8; j++)
                    for (int v = 0; v < 4; v++)
                        for (int c = 0; c < 4; c++) {
                            const uint8_t *p = codes + 32 * j + 8 * v + c;
                            out[X8_BLOCK + 32 * j + 4 * i + c] |= (uint8_t)((p[0] >> 4) << (2 * v) | (p[4] >> 4) << (2 * v + 1));
                        }
            }
        }
    }
}
void repack_q4_k_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K) { repack_k4_x8(src, dst, n_rows, K, 0); }
void repack_q5_k_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K) { repack_k4_x8(src, dst, n_rows, K, 1); }

/* The repacked tiles' outer loop: every activation row against the 8 lanes of each block.
 * lane_sums gives lane i's integer sums over one block: sums[0] goes with the lane's d
 * (the f16 at blk + 2 i), sums[1] with its dmin (at blk + 16 + 2 i) when the type has one.
 * Lane i's float steps are the AVX2 tile's. Inlined, so each tile's lane_sums is too. */
typedef void x8_lane_sums_fn(const uint8_t *blk, int i, const int8_t *q, const int16_t *bsum,
                             int fifth, int32_t sums[2]);
static inline __attribute__((always_inline)) void tile_x8_portable(
        const uint8_t *rows, int block_bytes, const QRow *x, int n_x, int64_t nb, float *out,
        int64_t out_stride, x8_lane_sums_fn *lane_sums, int fifth, int has_dmin) {
    for (int r = 0; r < n_x; r++) {
        float acc[X8_ROWS] = {0};
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = rows + b * block_bytes;
            const int8_t *q = x[r].q + 256 * b;
            const int16_t *bsum = x[r].bsum + 16 * b;
            for (int i = 0; i < X8_ROWS; i++) {
                int32_t sums[2];
                lane_sums(blk, i, q, bsum, fifth, sums);
                acc[i] += read_half(blk + 2 * i) * x[r].d[b] * (float)sums[0];
                if (has_dmin) acc[i] -= read_half(blk + 16 + 2 * i) * x[r].d[b] * (float)sums[1];
            }
        }
        for (int i = 0; i < X8_ROWS; i++) out[r * out_stride + i] = acc[i];
    }
}

/* Q4_K / Q5_K (fifth): the scaled code sums and the min-weighted block sums. */
static inline void lane_sums_k4(const uint8_t *blk, int i, const int8_t *q, const int16_t *bsum,
                                int fifth, int32_t sums[2]) {
    int32_t scaled = 0, mins = 0;
    for (int j = 0; j < 8; j++) {
        int32_t sum = 0;
        for (int v = 0; v < 4; v++) {
            for (int c = 0; c < 4; c++) {
                const uint8_t byte = blk[160 + 128 * j + 32 * v + 4 * i + c];
                const uint8_t high = fifth ? blk[X8_BLOCK + 32 * j + 4 * i + c] : 0;
                const int first = (byte & 15) | ((high >> (2 * v)) & 1) << 4;
                const int second = (byte >> 4) | ((high >> (2 * v + 1)) & 1) << 4;
                sum += first * q[32 * j + 8 * v + c] + second * q[32 * j + 8 * v + 4 + c];
            }
        }
        scaled += blk[32 + 8 * j + i] * sum;
        mins += blk[96 + 8 * j + i] * (bsum[2 * j] + bsum[2 * j + 1]);
    }
    sums[0] = scaled;
    sums[1] = mins;
}

static void tile_Q4_K_X8_portable(const uint8_t *rows, int64_t stride, int n_w, const QRow *x,
                                  int n_x, int64_t nb, float *out, int64_t out_stride) {
    (void)stride; (void)n_w;  /* always a whole group of X8_ROWS */
    tile_x8_portable(rows, X8_BLOCK, x, n_x, nb, out, out_stride, lane_sums_k4, 0, 1);
}
static void tile_Q5_K_X8_portable(const uint8_t *rows, int64_t stride, int n_w, const QRow *x,
                                  int n_x, int64_t nb, float *out, int64_t out_stride) {
    (void)stride; (void)n_w;
    tile_x8_portable(rows, X8_BLOCK_Q5, x, n_x, nb, out, out_stride, lane_sums_k4, 1, 1);
}

void repack_q6_k_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K) {
    const int64_t nb = K / 256, row_bytes = nb * 210;
    for (int64_t g = 0; g < n_rows / X8_ROWS; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *out = dst + (g * nb + b) * X8_BLOCK_Q6;
            memset(out + 1168, 0, 512);
            for (int i = 0; i < X8_ROWS; i++) {
                const uint8_t *blk = src + (g * X8_ROWS + i) * row_bytes + b * 210;
                memcpy(out + 2 * i, blk + 208, 2);
                for (int j = 0; j < 8; j++) {
                    out[16 + 16 * j + 2 * i] = blk[192 + 2 * j];
                    out[16 + 16 * j + 2 * i + 1] = blk[192 + 2 * j + 1];
                }
                uint8_t codes[256];  /* ql's nibbles | qh's bit pairs, value i as in qdot.h */
                for (int half = 0; half < 2; half++)
                    for (int k = 0; k < 4; k++)
                        for (int l = 0; l < 32; l++)
                            codes[128 * half + 32 * k + l] = (uint8_t)(
                                ((blk[64 * half + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15)
                                | ((blk[128 + 32 * half + l] >> (2 * k)) & 3) << 4);
                interleave_nibbles(codes, i, out + 144);
                for (int j = 0; j < 8; j++)
                    for (int v = 0; v < 4; v++)
                        for (int c = 0; c < 4; c++) {
                            const uint8_t *p = codes + 32 * j + 8 * v + c;
                            out[1168 + 64 * j + 4 * i + c] |= (uint8_t)((p[0] >> 4) << (2 * v));
                            out[1168 + 64 * j + 32 + 4 * i + c] |= (uint8_t)((p[4] >> 4) << (2 * v));
                        }
            }
        }
    }
}

/* Q6_K: the signed-scale sums of the codes less 32 (bsum carries the 32s). */
static inline void lane_sums_q6(const uint8_t *blk, int i, const int8_t *q, const int16_t *bsum,
                                int fifth, int32_t sums[2]) {
    (void)fifth;
    int32_t total = 0;
    for (int j = 0; j < 8; j++) {
        for (int e = 0; e < 2; e++) {
            int32_t sum = 0;
            for (int v = 2 * e; v < 2 * e + 2; v++) {
                for (int c = 0; c < 4; c++) {
                    const uint8_t low = blk[144 + 128 * j + 32 * v + 4 * i + c];
                    const int high_a = (blk[1168 + 64 * j + 4 * i + c] >> (2 * v)) & 3;
                    const int high_b = (blk[1168 + 64 * j + 32 + 4 * i + c] >> (2 * v)) & 3;
                    sum += ((low & 15) | high_a << 4) * q[32 * j + 8 * v + c]
                         + ((low >> 4) | high_b << 4) * q[32 * j + 8 * v + 4 + c];
                }
            }
            const int scale = (int8_t)blk[16 + 16 * j + 2 * i + e];
            total += scale * (sum - 32 * bsum[2 * j + e]);
        }
    }
    sums[0] = total;
    sums[1] = 0;
}

static void tile_Q6_K_X8_portable(const uint8_t *rows, int64_t stride, int n_w, const QRow *x,
                                  int n_x, int64_t nb, float *out, int64_t out_stride) {
    (void)stride; (void)n_w;  /* always a whole group of X8_ROWS */
    tile_x8_portable(rows, X8_BLOCK_Q6, x, n_x, nb, out, out_stride, lane_sums_q6, 0, 0);
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 blocks: d (f16), for the affine ones m (f16), for Q5 the fifth
 * bits (u32, bit l of value l), then 16 bytes of nibbles (value l low, l + 16 high). */
static void repack_legacy_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K,
                             int affine, int fifth) {
    const int in_bytes = 18 + 2 * affine + 4 * fifth, head = affine ? 32 : 16;
    const int64_t nb = K / 32, row_bytes = nb * in_bytes;
    for (int64_t g = 0; g < n_rows / X8_ROWS; g++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *out = dst + (g * nb + b) * X8_ROWS * in_bytes;
            if (fifth) memset(out + head + 128, 0, 32);
            for (int i = 0; i < X8_ROWS; i++) {
                const uint8_t *blk = src + (g * X8_ROWS + i) * row_bytes + b * in_bytes;
                const uint8_t *qs = blk + in_bytes - 16;
                uint32_t qh = 0;
                if (fifth) memcpy(&qh, blk + 2 + 2 * affine, 4);
                memcpy(out + 2 * i, blk, 2);
                if (affine) memcpy(out + 16 + 2 * i, blk + 2, 2);
                uint8_t codes[32];
                for (int l = 0; l < 16; l++) { codes[l] = qs[l] & 15; codes[l + 16] = qs[l] >> 4; }
                for (int v = 0; v < 4; v++)
                    for (int c = 0; c < 4; c++) {
                        const int first = 8 * v + c, second = 8 * v + 4 + c;
                        out[head + 32 * v + 4 * i + c] = (uint8_t)(codes[first] | codes[second] << 4);
                        if (fifth)
                            out[head + 128 + 4 * i + c] |= (uint8_t)(((qh >> first) & 1) << (2 * v)
                                                                     | ((qh >> second) & 1) << (2 * v + 1));
                    }
            }
        }
    }
}
void repack_q4_0_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K) { repack_legacy_x8(src, dst, n_rows, K, 0, 0); }
void repack_q4_1_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K) { repack_legacy_x8(src, dst, n_rows, K, 1, 0); }
void repack_q5_0_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K) { repack_legacy_x8(src, dst, n_rows, K, 0, 1); }
void repack_q5_1_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K) { repack_legacy_x8(src, dst, n_rows, K, 1, 1); }

/* value = d * code + m per block (Q4_0: m = -8 d, Q5_0: m = -16 d); lane i's float steps
 * are the AVX2 tile's */
static void tile_legacy_x8_portable(const uint8_t *rows, const QRow *x, int n_x, int64_t nb,
                                    float *out, int64_t out_stride, int affine, int fifth) {
    const int bytes = 8 * (18 + 2 * affine + 4 * fifth), head = affine ? 32 : 16;
    for (int r = 0; r < n_x; r++) {
        float acc[X8_ROWS] = {0};
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = rows + b * bytes;
            const int8_t *q = x[r].q + 32 * b;
            for (int i = 0; i < X8_ROWS; i++) {
                int32_t sum = 0;
                for (int v = 0; v < 4; v++)
                    for (int c = 0; c < 4; c++) {
                        const uint8_t byte = blk[head + 32 * v + 4 * i + c];
                        const uint8_t high = fifth ? blk[head + 128 + 4 * i + c] : 0;
                        const int first = (byte & 15) | ((high >> (2 * v)) & 1) << 4;
                        const int second = (byte >> 4) | ((high >> (2 * v + 1)) & 1) << 4;
                        sum += first * q[8 * v + c] + second * q[8 * v + 4 + c];
                    }
                const float d = read_half(blk + 2 * i);
                const float m = affine ? read_half(blk + 16 + 2 * i) : d * (fifth ? -16.0f : -8.0f);
                acc[i] += d * x[r].d[b] * (float)sum;
                acc[i] += m * x[r].sum[b];
            }
        }
        for (int i = 0; i < X8_ROWS; i++) out[r * out_stride + i] = acc[i];
    }
}
#define LEGACY_X8_PORTABLE(NAME, AFFINE, FIFTH)                                                  \
    static void NAME(const uint8_t *rows, int64_t stride, int n_w, const QRow *x, int n_x,      \
                     int64_t nb, float *out, int64_t out_stride) {                              \
        (void)stride; (void)n_w;                                                                \
        tile_legacy_x8_portable(rows, x, n_x, nb, out, out_stride, AFFINE, FIFTH);              \
    }
LEGACY_X8_PORTABLE(tile_Q4_0_X8_portable, 0, 0) LEGACY_X8_PORTABLE(tile_Q4_1_X8_portable, 1, 0)
LEGACY_X8_PORTABLE(tile_Q5_0_X8_portable, 0, 1) LEGACY_X8_PORTABLE(tile_Q5_1_X8_portable, 1, 1)

/* Q8_0 blocks: d (f16), 32 signed codes. */
void repack_q8_0_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K) {
    const int64_t nb = K / 32, row_bytes = nb * 34;
    for (int64_t g = 0; g < n_rows / X8_ROWS; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *out = dst + (g * nb + b) * X8_ROWS * 34;
            for (int i = 0; i < X8_ROWS; i++) {
                const uint8_t *blk = src + (g * X8_ROWS + i) * row_bytes + b * 34;
                memcpy(out + 2 * i, blk, 2);
                for (int v = 0; v < 8; v++) memcpy(out + 16 + 32 * v + 4 * i, blk + 2 + 4 * v, 4);
            }
        }
}

static void tile_Q8_0_X8_portable(const uint8_t *rows, int64_t stride, int n_w, const QRow *x,
                                  int n_x, int64_t nb, float *out, int64_t out_stride) {
    (void)stride; (void)n_w;
    for (int r = 0; r < n_x; r++) {
        float acc[X8_ROWS] = {0};
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = rows + b * X8_ROWS * 34;
            const int8_t *q = x[r].q + 32 * b;
            for (int i = 0; i < X8_ROWS; i++) {
                int32_t sum = 0;
                for (int v = 0; v < 8; v++)
                    for (int c = 0; c < 4; c++) sum += (int8_t)blk[16 + 32 * v + 4 * i + c] * q[4 * v + c];
                acc[i] += read_half(blk + 2 * i) * x[r].d[b] * (float)sum;
            }
        }
        for (int i = 0; i < X8_ROWS; i++) out[r * out_stride + i] = acc[i];
    }
}

const tile_fn portable_tiles[N_TYPES] = {
    [Q4_K_X8] = tile_Q4_K_X8_portable, [Q6_K_X8] = tile_Q6_K_X8_portable,
    [Q4_0_X8] = tile_Q4_0_X8_portable, [Q4_1_X8] = tile_Q4_1_X8_portable,
    [Q5_K_X8] = tile_Q5_K_X8_portable, [Q5_0_X8] = tile_Q5_0_X8_portable,
    [Q5_1_X8] = tile_Q5_1_X8_portable, [Q8_0_X8] = tile_Q8_0_X8_portable,
};

const dot_fn portable_dots[N_TYPES] = {
    [F16] = dot_F16_portable, [BF16] = dot_BF16_portable,
    [Q4_0] = dot_Q4_0_portable, [Q4_1] = dot_Q4_1_portable, [Q5_0] = dot_Q5_0_portable,
    [Q5_1] = dot_Q5_1_portable, [Q8_0] = dot_Q8_0_portable, [Q2_K] = dot_Q2_K_portable,
    [Q3_K] = dot_Q3_K_portable, [Q4_K] = dot_Q4_K_portable, [Q5_K] = dot_Q5_K_portable,
    [Q6_K] = dot_Q6_K_portable, [IQ4_NL] = dot_IQ4_NL_portable, [IQ4_XS] = dot_IQ4_XS_portable,
    [IQ2_XXS] = dot_IQ2_XXS_portable, [IQ2_XS] = dot_IQ2_XS_portable, [IQ2_S] = dot_IQ2_S_portable,
    [IQ3_XXS] = dot_IQ3_XXS_portable, [IQ3_S] = dot_IQ3_S_portable, [IQ1_S] = dot_IQ1_S_portable,
    [IQ1_M] = dot_IQ1_M_portable, [TQ1_0] = dot_TQ1_0_portable, [TQ2_0] = dot_TQ2_0_portable,
};
