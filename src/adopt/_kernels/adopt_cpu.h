/*
 * Fused ADOPT step on the CPU over raw pointers: every tensor of one dtype group is
 * updated in a single call and a single pass over memory (read p, g, m, v; write p, m, v).
 * No PyTorch headers: the caller passes data pointers, element counts and step pointers.
 */
#ifndef ADOPT_CPU_H
#define ADOPT_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Storage type of p, g, m and v (all four share it). */
typedef enum {
    ADOPT_F32 = 0,
    ADOPT_F64 = 1,
    ADOPT_F16 = 2,  /* math in float32, stored as IEEE half */
    ADOPT_BF16 = 3  /* math in float32, stored as bfloat16 */
} adopt_dtype;

/* How the clip threshold c(s) of each tensor is obtained. */
typedef enum {
    ADOPT_CLIP_NONE = 0,  /* no clamp */
    ADOPT_CLIP_TABLE = 1, /* clip_table[i] is tensor i's threshold */
    ADOPT_CLIP_POWER = 2  /* c = s ** clip_exponent, s = tensor i's step before this call */
} adopt_clip_mode;

typedef struct {
    int64_t n_tensors;
    void *const *p;          /* params, updated in place */
    void *const *g;          /* grads, read only */
    void *const *m;          /* exp_avg, updated in place */
    void *const *v;          /* exp_avg_sq, updated in place */
    const int64_t *numel;    /* elements per tensor (real elements for complex views) */
    float *const *step;      /* per-tensor step counters (float32), incremented */
    const int64_t *const *seed; /* per-tensor seeds: float16/bfloat16 params are written back
                                 * with stochastic rounding (adopt/_random.py); NULL: nearest */
    adopt_dtype dtype;
    adopt_clip_mode clip_mode;
    const double *clip_table; /* n_tensors entries, for ADOPT_CLIP_TABLE */
    double clip_exponent;    /* for ADOPT_CLIP_POWER */
    const float *grad_scale; /* AMP scale (gradients are divided by it) or NULL */
    const float *found_inf;  /* AMP flag or NULL; nonzero: the call changes nothing */
    double lr, beta1, beta2, weight_decay, eps;
    int decouple;            /* decoupled (AdamW-style) weight decay instead of L2 */
    int maximize;
    int nesterov;            /* update lerp(m, n, 1 - beta1) instead of m */
    int caution;             /* cautious update: sign-agreeing elements, rescaled per tensor */
    double lr_max;           /* > 0: corrected decoupled decay, lr * lr / lr_max; 0: off */
    int num_threads;         /* upper bound on OpenMP threads (<= 1: serial) */
} adopt_cpu_args;

/* Returns 0 on success (including a skipped step because of found_inf), -1 when the
 * per-call scratch table cannot be allocated (nothing has been modified then). */
int adopt_cpu_step(const adopt_cpu_args *args);

/* ---- low-memory optimizer state (state_precision "bf16" / "8bit") ----------------------
 * The moments are stored as bfloat16, or in 8 bits: uint8 codes (one per element) and one
 * float32 scale per block of ADOPT_STATE_BLOCK elements (adopt/_state_formats.py: m signed
 * E3M4, v as sqrt(v) in unsigned E4M4). A step decodes them to float32, applies exactly the
 * full-precision rule of adopt_cpu_step on float32 moments, and encodes both moments again
 * with stochastic rounding (streams 2 for m, 1 for v). */
#define ADOPT_STATE_BLOCK 256

typedef enum {
    ADOPT_STATE_BF16 = 0, /* m, v: bfloat16 tensors */
    ADOPT_STATE_8BIT = 1  /* m, v: uint8 codes; m_scale, v_scale: float32 block scales */
} adopt_state_format;

typedef struct {
    /* base.p/g: params and grads (base.dtype ADOPT_F32, ADOPT_F16 or ADOPT_BF16);
     * base.m/v: the moments' storage (codes or bfloat16); base.seed: required (the moments'
     * rounding keys); every other field as for adopt_cpu_step. */
    adopt_cpu_args base;
    adopt_state_format format;
    float *const *m_scale; /* 8bit: ceil(numel / 256) scales per tensor, updated */
    float *const *v_scale;
    int param_sr;          /* write 16-bit params with stochastic rounding (stream 0) */
} adopt_state_args;

/* Returns 0 (also for a step skipped because of found_inf) or -1 (nothing modified) when the
 * per-call table cannot be allocated. */
int adopt_cpu_state_step(const adopt_state_args *args);

/* Whether the AVX-512 version of the common low-memory-state step (adopt_cpu_avx512.h) is
 * compiled in and this CPU runs it; adopt_cpu_use_avx512(0) turns it off for the process
 * (the portable loops then run; the results are the same bits) and returns the previous
 * setting. For tests and benchmarks: not to be changed while a step runs. */
int adopt_cpu_avx512_available(void);
int adopt_cpu_use_avx512(int on);

/* Nonzero when the library was compiled with OpenMP. */
int adopt_cpu_has_openmp(void);

/* The 16-bit random draw of element `index` for a tensor with `seed` at step count `step`
 * (parameter stream), and the stochastic rounding of float32 `x` with draw `r` (< 2^16):
 * what the kernel uses, for tests. */
uint32_t adopt_random_draw(int64_t seed, uint32_t step, int64_t index);
uint16_t adopt_bf16_round_stochastic(float x, uint32_t r);
uint16_t adopt_f16_round_stochastic(float x, uint32_t r);

#ifdef __cplusplus
}
#endif

#endif /* ADOPT_CPU_H */
