/* Matrix times a few activation rows, with the weights left in their GGUF block format.
 *
 *   y[t][n] = sum_k W[n][k] * x[t][k]      W: N rows of K values, packed as ggml blocks
 *
 * Each activation row is quantized once per call to 8-bit blocks (qdot.h) and every
 * weight row is dotted with it in integers, as ggml does; the result differs from exact
 * dequantize-then-multiply by the activations' rounding (about 1/254 of each block's
 * largest value), the same noise as llama.cpp's. The kernels are picked at run time from
 * the CPU's features (or LLMPRESS_KERNEL_ISA through llmpress_set_isa). Rows of W are
 * split across threads with OpenMP. Called from Python via ctypes.
 *
 * Every exported function checks its arguments and returns a negative KernelError
 * instead of reading or writing outside the buffers it was given.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <Python.h>

#include "qmatmul.h"

/* --- the instruction set ---------------------------------------------------------- */

static const dot_fn *dots = portable_dots;
static const tile_fn *tiles = portable_tiles;
static int current_isa = ISA_PORTABLE;

static int cpu_has_avx2(void) {
#if defined(__x86_64__) || defined(__i386__)
    return avx2_compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* ISA_AUTO picks the best the CPU has. Returns 0, or ERR_ISA if this CPU or build cannot
 * run the one asked for. */
int llmpress_set_isa(int isa) {
    if (isa == ISA_AUTO) isa = cpu_has_avx2() ? ISA_AVX2 : ISA_PORTABLE;
    if (isa == ISA_AVX2 && cpu_has_avx2()) { dots = avx2_dots; tiles = avx2_tiles; }
    else if (isa == ISA_PORTABLE) { dots = portable_dots; tiles = portable_tiles; }
    else return ERR_ISA;
    current_isa = isa;
    return 0;
}

int llmpress_isa(void) { return current_isa; }

__attribute__((constructor)) static void pick_isa(void) { llmpress_set_isa(ISA_AUTO); }
int llmpress_cpu_has_isa(int isa) { return isa == ISA_PORTABLE || (isa == ISA_AVX2 && cpu_has_avx2()); }

/* --- shapes and activations --------------------------------------------------------- */

int64_t row_bytes(int type, int64_t K) { return K / qtype_block_values(type) * qtype_block_bytes(type); }

int qmatmul_check(int n_weights, const int *types, int64_t K, int64_t T) {
    if (n_weights < 1 || n_weights > MAX_WEIGHTS) return ERR_SHAPE;
    if (K <= 0 || T < 1) return ERR_SHAPE;
    for (int i = 0; i < n_weights; i++) {
        if (types[i] < 0 || types[i] >= N_TYPES || !qtype_block_bytes(types[i])) return ERR_TYPE;
        if (K % qtype_block_values(types[i])) return ERR_SHAPE;
    }
    return 0;
}

/* A repacked weight's rows come in groups of X8_ROWS that a tile never splits: its row
 * count and its first row in the call's concatenated output are multiples of X8_ROWS
 * (so are the tiles of ROW_TILE rows). */
int x8_aligned(int n_weights, const int *types, const int64_t *Ns) {
    int64_t start = 0;
    for (int i = 0; i < n_weights; i++) {
        if (is_repacked(types[i]) && (start % X8_ROWS || Ns[i] % X8_ROWS)) return 0;
        start += Ns[i];
    }
    return 1;
}

static int needs_block(int n_weights, const int *types, int64_t block) {
    for (int i = 0; i < n_weights; i++)
        if (qtype_act_block(types[i]) == block) return 1;
    return 0;
}

/* Room for T rows of K values in both block sizes (each filled only when needed). */
int acts_alloc(Activations *a, int64_t K, int64_t T) {
    memset(a, 0, sizeof(*a));
    a->by32.q = malloc((size_t)(K * T));
    a->by32.d = malloc(sizeof(float) * (size_t)(K * T / 32));
    a->by32.bsum = malloc(sizeof(int16_t) * (size_t)(K * T / 16));
    a->by32.sum = malloc(sizeof(float) * (size_t)(K * T / 32));
    a->by256.q = malloc((size_t)(K * T));
    a->by256.d = malloc(sizeof(float) * (size_t)(K * T / 32));  /* K may not divide by 256 */
    a->by256.bsum = malloc(sizeof(int16_t) * (size_t)(K * T / 16));
    a->floats = malloc(sizeof(float) * (size_t)(K * T));
    if (!a->by32.q || !a->by32.d || !a->by32.bsum || !a->by32.sum || !a->by256.q || !a->by256.d
        || !a->by256.bsum || !a->floats) {
        acts_free(a);
        return ERR_MEMORY;
    }
    return 0;
}

void acts_free(Activations *a) {
    free(a->by32.q); free(a->by32.d); free(a->by32.bsum); free(a->by32.sum);
    free(a->by256.q); free(a->by256.d); free(a->by256.bsum); free(a->floats);
    memset(a, 0, sizeof(*a));
}

/* Quantize x (T rows of K) in the block sizes these weights read, one row at a time so
 * that a row's codes never depend on the rows beside it. An orphaned `omp for`: inside a
 * parallel region the threads share the rows (ending in a barrier), outside it one
 * thread does them all. */
void acts_quantize(Activations *a, int n_weights, const int *types, const float *x, int64_t K,
                   int64_t T) {
    const int by32 = needs_block(n_weights, types, 32), by256 = needs_block(n_weights, types, 256);
    const int floats = needs_block(n_weights, types, 1);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        if (floats) memcpy(a->floats + t * K, x + t * K, sizeof(float) * (size_t)K);
        if (by32) {
            const int64_t first = t * (K / 32);
            quantize_rows(x + t * K, K, 1, 32, a->by32.q + t * K, a->by32.d + first,
                          a->by32.bsum + t * (K / 16));
            for (int64_t b = first; b < first + K / 32; b++)
                a->by32.sum[b] = a->by32.d[b] * (float)(a->by32.bsum[2 * b] + a->by32.bsum[2 * b + 1]);
        }
        if (by256)
            quantize_rows(x + t * K, K, 1, 256, a->by256.q + t * K, a->by256.d + t * (K / 256),
                          a->by256.bsum + t * (K / 16));
    }
}

static QRow act_row(const Activations *a, int type, int64_t K, int64_t t) {
    const int64_t block = qtype_act_block(type);
    if (block == 1) {
        QRow r = {NULL, NULL, NULL, NULL, a->floats + t * K};
        return r;
    }
    const ActBuffer *buf = block == 256 ? &a->by256 : &a->by32;
    QRow r = {buf->q + t * K, buf->d + t * (K / block), buf->bsum + t * (K / 16),
              block == 32 ? buf->sum + t * (K / 32) : NULL, NULL};
    return r;
}

/* --- the matmul ----------------------------------------------------------------------- */

enum { ROW_TILE = 16 };  /* weight rows per tile: 16 rows of 8960 Q6_K values fit in L2 */
_Static_assert(ROW_TILE % X8_ROWS == 0 && (int)TILE_ROWS == (int)X8_ROWS, "tiles hold whole repacked groups");

/* y (T, N_1 + ... + N_W) = x (T, K) @ [W_1; ...; W_W]^T for a checked matmul whose
 * activations are quantized, called by every thread of an enclosing parallel region:
 * each takes its share of the output rows (an orphaned `omp for`, ending in a barrier). */
void qmatmul_rows(int n_weights, const int *types, const uint8_t *const *ws,
                  const int64_t *Ns, const Activations *a, float *y, int64_t K, int64_t T) {
    int64_t starts[MAX_WEIGHTS + 1], strides[MAX_WEIGHTS];
    starts[0] = 0;
    for (int i = 0; i < n_weights; i++) {
        starts[i + 1] = starts[i] + Ns[i];
        strides[i] = row_bytes(types[i], K);
    }
    const int64_t total = starts[n_weights];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < total; tile += ROW_TILE) {
        /* a tile of weight rows (in cache) against the activation rows a few at a time,
         * so that long prompts read each activation row once per tile, not once per row */
        const int64_t tile_end = tile + ROW_TILE < total ? tile + ROW_TILE : total;
        for (int64_t t = 0; t < T; t += DOT_ROWS) {
            const int n_x = T - t < DOT_ROWS ? (int)(T - t) : DOT_ROWS;
            int64_t n = tile;
            while (n < tile_end) {
                int i = 0;
                while (n >= starts[i + 1]) i++;
                const int type = types[i];
                const int64_t nb = K / qtype_block_values(type);
                const uint8_t *w = ws[i] + (n - starts[i]) * strides[i];
                QRow xs[DOT_ROWS];
                for (int r = 0; r < n_x; r++) xs[r] = act_row(a, type, K, t + r);
                if (tiles[type]) {  /* up to TILE_ROWS rows of this weight at once */
                    int64_t n_w = tile_end < starts[i + 1] ? tile_end - n : starts[i + 1] - n;
                    if (n_w > TILE_ROWS) n_w = TILE_ROWS;
                    tiles[type](w, strides[i], (int)n_w, xs, n_x, nb, y + t * total + n, total);
                    n += n_w;
                } else {
                    float out[DOT_ROWS];
                    dots[type](w, xs, n_x, nb, out);
                    for (int r = 0; r < n_x; r++) y[(t + r) * total + n] = out[r];
                    n++;
                }
            }
        }
    }
}

/* Several weights that share one input (q/k/v, gate/up) go in one call: one activation
 * quantization and one thread team serve them all. w_bytes: each weight buffer's size;
 * x_floats, y_floats: the sizes of x and y. Returns 0 or a KernelError. */
int llmpress_qmatmul(int n_weights, const int *types, const uint8_t *const *ws,
                     const int64_t *Ns, const int64_t *w_bytes, const float *x,
                     int64_t x_floats, float *y, int64_t y_floats, int64_t K, int64_t T,
                     int n_threads) {
    int status = qmatmul_check(n_weights, types, K, T);
    if (status) return status;
    if (n_threads < 1) return ERR_THREADS;
    int64_t total = 0;
    for (int i = 0; i < n_weights; i++) {
        if (Ns[i] < 1 || !ws[i]) return ERR_SHAPE;
        if (w_bytes[i] != Ns[i] * row_bytes(types[i], K)) return ERR_BUFFER;
        total += Ns[i];
    }
    if (!x || !y || x_floats != K * T || y_floats != total * T) return ERR_BUFFER;
    if (!x8_aligned(n_weights, types, Ns)) return ERR_SHAPE;
    Activations a;
    if (acts_alloc(&a, K, T)) return ERR_MEMORY;
#pragma omp parallel num_threads(n_threads)
    {
        acts_quantize(&a, n_weights, types, x, K, T);
        qmatmul_rows(n_weights, types, ws, Ns, &a, y, K, T);
    }
    acts_free(&a);
    return 0;
}

/* A GGUF type with a kernel (the repacked layouts are llmpress's own, never a file's). */
int llmpress_qmatmul_supports(int type) {
    return type >= 0 && type < Q4_K_X8 && qtype_block_bytes(type) != 0;
}

/* The repacked layouts (qdot.h): the file type each comes from, and its repacker. */
static const struct {
    int from, to;
    void (*repack)(const uint8_t *src, uint8_t *dst, int64_t n_rows, int64_t K);
} REPACKS[] = {{Q4_K, Q4_K_X8, repack_q4_k_x8}, {Q6_K, Q6_K_X8, repack_q6_k_x8},
               {Q4_0, Q4_0_X8, repack_q4_0_x8}, {Q4_1, Q4_1_X8, repack_q4_1_x8},
               {Q5_K, Q5_K_X8, repack_q5_k_x8}, {Q5_0, Q5_0_X8, repack_q5_0_x8},
               {Q5_1, Q5_1_X8, repack_q5_1_x8}, {Q8_0, Q8_0_X8, repack_q8_0_x8}};

/* The index in REPACKS of this weight's layout, or -1 where it has none. */
static int find_repack(int type, int64_t N, int64_t K) {
    for (int i = 0; i < (int)(sizeof(REPACKS) / sizeof(REPACKS[0])); i++)
        if (REPACKS[i].from == type)  /* a type with a kernel: its block size is not 0 */
            return N >= X8_ROWS && N % X8_ROWS == 0 && K >= 1 && K % qtype_block_values(type) == 0 ? i : -1;
    return -1;
}

/* Weights of `type` (N rows of K) can be rearranged for faster tiles: the bytes the new
 * layout takes, or 0 where this type or shape has none. */
int64_t llmpress_repacked_bytes(int type, int64_t N, int64_t K) {
    const int i = find_repack(type, N, K);
    return i < 0 ? 0 : N * row_bytes(REPACKS[i].to, K);
}

/* Rearranges them into dst (llmpress_repacked_bytes of them): returns the new layout's
 * type id or a KernelError. */
int llmpress_repack(int type, const uint8_t *src, int64_t src_bytes, uint8_t *dst,
                    int64_t dst_bytes, int64_t N, int64_t K, int n_threads) {
    const int i = find_repack(type, N, K);
    if (i < 0) return ERR_TYPE;
    const int to = REPACKS[i].to;
    if (n_threads < 1) return ERR_THREADS;
    if (!src || !dst || src_bytes != N * row_bytes(type, K) || dst_bytes != N * row_bytes(to, K))
        return ERR_BUFFER;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t g = 0; g < N / X8_ROWS; g++)
        REPACKS[i].repack(src + g * X8_ROWS * row_bytes(type, K), dst + g * X8_ROWS * row_bytes(to, K), X8_ROWS, K);
    return to;
}
int64_t llmpress_row_bytes(int type, int64_t K) {
    return llmpress_qmatmul_supports(type) && K > 0 && K % qtype_block_values(type) == 0
        ? row_bytes(type, K) : -1;
}

/* Built as a Python extension only so that pip compiles it; it is loaded with ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qmatmul", NULL, -1, NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__qmatmul(void) { return PyModule_Create(&module); }
