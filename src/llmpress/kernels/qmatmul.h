/* The matmul pieces decode.c shares with qmatmul.c. */
#ifndef LLMPRESS_QMATMUL_H
#define LLMPRESS_QMATMUL_H

#include "qdot.h"

enum { MAX_WEIGHTS = 8 };  /* weights fused into one call */
enum { ISA_AUTO = 0, ISA_PORTABLE = 1, ISA_AVX2 = 2 };

/* Negative return codes of the exported functions (kernels/cpu.py words them). */
enum KernelError {
    ERR_TYPE = -1,     /* a weight type without a kernel */
    ERR_SHAPE = -2,    /* a dimension that is not positive or not a multiple of the block */
    ERR_BUFFER = -3,   /* a buffer whose size does not match the shapes */
    ERR_THREADS = -4,  /* fewer than one thread */
    ERR_MEMORY = -5,   /* scratch space could not be allocated */
    ERR_ISA = -6,      /* this CPU or build lacks the instruction set asked for */
    ERR_HEADS = -7,    /* head counts or dims inconsistent */
    ERR_POSITION = -8, /* the position is outside the KV cache */
    ERR_ATTENTION = -9,  /* an attention setting out of range (query scale, soft-cap, window,
                            RoPE table) */
};

typedef struct { int8_t *q; float *d; int16_t *bsum; float *sum; } ActBuffer;
/* Quantized activation rows, in the two block sizes the kernels read, and a copy of the
 * float rows for F16/BF16 weights. */
typedef struct { ActBuffer by32, by256; float *floats; } Activations;

int64_t row_bytes(int type, int64_t K);
int qmatmul_check(int n_weights, const int *types, int64_t K, int64_t T);
int x8_aligned(int n_weights, const int *types, const int64_t *Ns);
int acts_alloc(Activations *a, int64_t K, int64_t T);
void acts_free(Activations *a);
void acts_quantize(Activations *a, int n_weights, const int *types, const float *x, int64_t K,
                   int64_t T);
void qmatmul_rows(int n_weights, const int *types, const uint8_t *const *ws,
                  const int64_t *Ns, const Activations *a, float *y, int64_t K, int64_t T);

#endif
