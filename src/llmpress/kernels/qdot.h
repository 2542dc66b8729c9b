/* Integer dot products of one packed weight row with one 8-bit activation row.
 *
 * An activation row of K floats is quantized once per matmul to int8 codes in blocks
 * (256 values for the k-quant weight types, 32 for the legacy ones), each block with a
 * float scale d (value ~= d * code) and the integer sum of every 16 codes (bsum), which
 * turns a weight's zero point or min into one multiply per 16 or 32 values. Every weight
 * type's dot is then: integer codes times integer codes, summed exactly in int32, scaled
 * once per block in float. The portable C and AVX2 kernels compute the same integer sums,
 * so they differ only in the order of their float additions.
 */
#ifndef LLMPRESS_QDOT_H
#define LLMPRESS_QDOT_H

#include <stdint.h>
#include <string.h>

enum { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
       Q5_K = 13, Q6_K = 14, IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20,
       IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23, IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35,
       /* llmpress's own: types repacked 8 rows at a time (below), never in a file */
       Q4_K_X8 = 64, Q6_K_X8 = 65, Q4_0_X8 = 66, Q4_1_X8 = 67, Q5_K_X8 = 68, Q5_0_X8 = 69,
       Q5_1_X8 = 70, Q8_0_X8 = 71,
       N_TYPES = 72 };

/* The grids of IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S and IQ1_S (IQ1_M's too): each entry's
 * 8 (IQ2, IQ1) or 4 (IQ3) values as consecutive bytes, IQ1's ternary -1/0/1 stored plus
 * one. They are gguf-py's tables (the project's one copy), handed over once by
 * kernels/cpu.py through llmpress_set_iq_grids; until then the grid types report no
 * kernel (TQ1_0 and TQ2_0 need no table). `signs` is ggml's ksigns (7 sign bits + parity)
 * as 8 bytes of +1 / -1. */
typedef struct {
    uint64_t iq2xxs[256], iq2xs[512], iq2s[1024], iq1s[2048], signs[128];
    uint32_t iq3xxs[256], iq3s[512];
    int ready;
} IqGrids;
extern IqGrids IQ_GRIDS;

/* TQ1_0's 256 weights (-1, 0, 1) of one block, decoded from its base-3 bytes (both ISAs). */
void tq1_0_weights(const uint8_t *blk, int8_t *w);

/* IQ4_NL / IQ4_XS: 4-bit indices into this signed table (ggml's kvalues_iq4nl). */
static const int8_t IQ4_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                      1, 13, 25, 38, 53, 69, 89, 113};

/* IQ4_XS's 6-bit scale of sub-block j (0..7), stored plus 32: 4 low bits in nibble j % 2
 * of scales_l[j / 2], 2 high bits in bit pair j of the little-endian u16 scales_h. */
static inline int iq4_xs_scale(const uint8_t *blk, int j) {
    const int high = ((blk[2] | (blk[3] << 8)) >> (2 * j)) & 3;
    return (((blk[4 + j / 2] >> (4 * (j % 2))) & 15) | (high << 4)) - 32;
}

/* One quantized activation row: K codes, K / block scales, K / 16 sums of codes, and for
 * blocks of 32 each block's value sum d * (sum of codes) as a float (NULL for 256). F16
 * and BF16 weights read the row's K floats `f` instead (the other fields NULL): their
 * values are not integer codes. */
typedef struct {
    const int8_t *q;
    const float *d;
    const int16_t *bsum;
    const float *sum;
    const float *f;
} QRow;

/* out[r] = sum_k W[k] * x[r][k] for one weight row of nb blocks and n_x <= DOT_ROWS
 * activation rows (several rows share each unpacked weight block: prompt processing). */
enum { DOT_ROWS = 4 };
typedef void (*dot_fn)(const uint8_t *row, const QRow *x, int n_x, int64_t nb, float *out);

/* out[r * out_stride + i] = sum_k W_i[k] * x[r][k] for n_w <= TILE_ROWS weight rows
 * (row i at rows + i * stride) and n_x <= DOT_ROWS activation rows: each weight row's
 * result in its own float lane, so a lane's operations do not depend on n_w or n_x. */
enum { TILE_ROWS = 8 };
typedef void (*tile_fn)(const uint8_t *rows, int64_t stride, int n_w, const QRow *x, int n_x,
                        int64_t nb, float *out, int64_t out_stride);

/* A multi-row dot from a one-row one, for types without a dedicated multi-row kernel. */
#define ROWS_FROM_ONE(NAME, ONE)                                                       \
    static void NAME(const uint8_t *row, const QRow *x, int n_x, int64_t nb, float *out) { \
        for (int r = 0; r < n_x; r++) out[r] = ONE(row, x[r], nb);                       \
    }

/* Q4_K_X8: the blocks of 8 consecutive Q4_K rows interleaved, made once at load
 * (repack_q4_k_x8) so that one 32-byte load holds codes of all 8 rows and each int32 lane
 * of a sum is one weight row: no horizontal sums, and each activation byte is read once
 * for 8 rows. Per 256-value block of the group (X8_BLOCK bytes = 8 x 148):
 *   [0, 16)     d of rows 0..7 (f16)          [16, 32)  dmin of rows 0..7 (f16)
 *   [32, 96)    scale of sub-block j, row i: byte 32 + 8 j + i (6 bits)
 *   [96, 160)   min of sub-block j, row i:   byte 96 + 8 j + i (6 bits)
 *   [160, 1184) codes: sub-block j (32 values), quarter v (8 values): 32 bytes at
 *               160 + 128 j + 32 v; byte 4 i + c holds row i's code of value 8 v + c in
 *               its low nibble and of value 8 v + 4 + c in its high nibble. */
enum { X8_ROWS = 8, X8_BLOCK = 1184 };
void repack_q4_k_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);

/* Q5_K_X8: Q4_K_X8's block, then the codes' fifth bits: 32 bytes per sub-block j at
 * 1184 + 32 j; byte 4 i + c holds in bit 2 v the fifth bit of value 8 v + c and in bit
 * 2 v + 1 that of value 8 v + 4 + c (X8_BLOCK_Q5 = 8 x 180 bytes). */
enum { X8_BLOCK_Q5 = 1440 };
void repack_q5_k_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);

/* Q6_K_X8: the same for Q6_K (value d * scale * (code - 32), 6-bit codes, a signed scale
 * per 16 values). Per 256-value block of the group (X8_BLOCK_Q6 = 8 x 210 bytes):
 *   [0, 16)       d of rows 0..7 (f16)
 *   [16, 144)     scales: byte 16 + 16 j + 2 i + e = scale of 16-value sub-block 2 j + e
 *                 of row i (int8)
 *   [144, 1168)   the codes' low 4 bits, laid out as Q4_K_X8's codes
 *   [1168, 1680)  their high 2 bits: 64 bytes per 32 values j at 1168 + 64 j; byte 4 i + c
 *                 holds in bits 2 v, 2 v + 1 the high bits of value 8 v + c, byte
 *                 32 + 4 i + c those of value 8 v + 4 + c. */
enum { X8_BLOCK_Q6 = 1680 };
void repack_q6_k_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);

/* Q4_0_X8, Q4_1_X8, Q5_0_X8, Q5_1_X8: the same for the 32-value legacy blocks. Per block
 * of the group (8 x the file's block bytes): d of rows 0..7 (f16); for Q4_1/Q5_1 then m of
 * rows 0..7 (f16); then 128 bytes of codes laid out as one sub-block of Q4_K_X8's; for
 * Q5_0/Q5_1 then 32 bytes of fifth bits laid out as one sub-block of Q5_K_X8's. */
void repack_q4_0_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);
void repack_q4_1_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);
void repack_q5_0_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);
void repack_q5_1_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);

/* Q8_0_X8: per block of the group (8 x 34 bytes): d of rows 0..7 (f16), then the signed
 * codes: 32 bytes at 16 + 32 v (v = 0..7), byte 4 i + c = row i's code of value 4 v + c. */
void repack_q8_0_x8(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);

static inline int is_repacked(int type) { return type >= Q4_K_X8 && type <= Q8_0_X8; }

/* Bytes per block, values per block (0 for a type without a kernel). */
int64_t qtype_block_bytes(int type);
int64_t qtype_block_values(int type);
/* Activation block size this type's kernel wants (256 or 32; 1: the floats, unquantized). */
int64_t qtype_act_block(int type);

/* The portable kernels, and the AVX2 ones (NULL entries where not compiled in). */
extern const dot_fn portable_dots[N_TYPES];
extern const tile_fn portable_tiles[N_TYPES];
extern const dot_fn avx2_dots[N_TYPES];
/* Tiles of several weight rows (NULL for types that only have dots). */
extern const tile_fn avx2_tiles[N_TYPES];
int avx2_compiled(void);

/* Quantize T rows of K floats to blocks of `block` codes. */
void quantize_rows(const float *x, int64_t K, int64_t T, int64_t block, int8_t *q, float *d,
                   int16_t *bsum);

float half_to_float(uint16_t h);
static inline float read_half(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return half_to_float(h); }

/* Q3_K's scale i (0..15): low 4 bits in byte i % 8 (nibble i / 8), high 2 bits in byte
 * 8 + i % 4 (pair i / 4), stored plus 32. */
static inline int q3_k_scale(const uint8_t *s, int i) {
    return (((s[i % 8] >> (4 * (i / 8))) & 15) | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32;
}

/* Q4_K/Q5_K's scale and min of sub-block j (0..7), 6 bits each in 12 bytes: sub-blocks 0-3
 * keep them in bytes j and j + 4; 4-7 take 4 low bits from byte j + 4 and the 2 high bits
 * from the tops of bytes j - 4 (scale) and j (min). */
static inline void k4_scale_min(const uint8_t *s, int j, int *scale, int *min) {
    *scale = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *min = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
}

#endif
