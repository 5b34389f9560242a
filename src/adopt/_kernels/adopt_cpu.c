/*
 * Fused ADOPT step on the CPU (see adopt_cpu.h).
 *
 * Work split: the elements of all tensors are laid end to end in one index space and cut
 * into one contiguous range per thread, so 200 tiny tensors keep every thread busy just
 * like one large tensor does; below ADOPT_MIN_PER_THREAD elements per thread no extra
 * thread is started (a fork/join costs more than it saves there).
 *
 * Vectorisation: the per-element loops are branch free (selects only) and marked
 * `omp simd`. The function that runs them is compiled three times with GCC's
 * target_clones (x86-64-v4 = AVX-512, x86-64-v3 = AVX2+FMA, baseline SSE2) when the build
 * enables ADOPT_TARGET_CLONES; the loader picks the widest one the running CPU supports,
 * so a wheel built anywhere is both portable and vectorised for the machine it runs on.
 * The build disables FP contraction so every clone rounds identically.
 */
#include "adopt_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(ADOPT_TARGET_CLONES)
#define ADOPT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ADOPT_CLONES
#endif

#define ADOPT_SIMD _Pragma("omp simd")

/* The element loops must be inlined into each target clone to be compiled for its ISA. */
#if defined(__GNUC__)
#define ADOPT_INLINE static inline __attribute__((always_inline))
#else
#define ADOPT_INLINE static inline
#endif

/* Fewest elements worth a thread of their own (about 1 MB of traffic in float32). */
#define ADOPT_MIN_PER_THREAD ((int64_t)1 << 15)
/* Thread ranges start on multiples of this many elements (whole cache lines). */
#define ADOPT_RANGE_ALIGN ((int64_t)64)

/* ---- 16-bit float conversions (round to nearest even) -------------------------------- */

ADOPT_INLINE float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

ADOPT_INLINE uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Select between two bit patterns; written as a conditional expression so that the
 * compiler emits a vector blend (-fno-trapping-math lets it if-convert these loops). */
ADOPT_INLINE uint32_t select_u32(int cond, uint32_t a, uint32_t b) { return cond ? a : b; }

ADOPT_INLINE float bf16_load(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

ADOPT_INLINE uint16_t bf16_store(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    /* NaN (which the rounding could turn into Inf) becomes a quiet NaN. */
    return (uint16_t)select_u32((u & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded);
}

ADOPT_INLINE float f16_load(uint16_t h) {
    /* Exponent and mantissa moved to their float32 positions. */
    const uint32_t em = ((uint32_t)h & 0x7FFFu) << 13;
    const uint32_t exp = em & 0x0F800000u;
    /* Normal numbers: rebias the exponent (15 -> 127); Inf / NaN: all-ones exponent. */
    uint32_t mag = em + (112u << 23);
    mag = select_u32(exp == 0x0F800000u, mag + (112u << 23), mag);
    /* Zero / subnormal: 2^-14 * (1 + mant / 2^10) - 2^-14 = mant * 2^-24, exactly. */
    const uint32_t tiny = f32_to_bits(bits_to_f32(em + (113u << 23)) - 0x1p-14f);
    mag = select_u32(exp == 0u, tiny, mag);
    return bits_to_f32((((uint32_t)h & 0x8000u) << 16) | mag);
}

ADOPT_INLINE uint16_t f16_store(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t a = u & 0x7FFFFFFFu;
    /* Normal range: round the 13 dropped bits to even, carries move into the exponent. */
    uint32_t mag = ((a + 0x0FFFu + ((a >> 13) & 1u)) >> 13) - (112u << 10);
    /* Below 2^-14 the half is subnormal with step 2^-24; adding 0.5f (whose ulp is 2^-24)
     * lets the FPU do the round-to-nearest-even, the mantissa is the bit difference. */
    mag = select_u32(a < 0x38800000u, f32_to_bits(bits_to_f32(a) + 0.5f) - 0x3F000000u, mag);
    /* 65520 = 0x477FF000 is the first value that rounds to infinity. */
    mag = select_u32(a >= 0x477FF000u, 0x7C00u, mag);
    /* NaN: a quiet NaN of the same sign. */
    mag = select_u32(a > 0x7F800000u, 0x7E00u, mag);
    return (uint16_t)(((u >> 16) & 0x8000u) | mag);
}

/* ---- stochastic rounding (the rule: adopt/_random.py) ------------------------------- */

#define ADOPT_GOLDEN 0x9E3779B9u

ADOPT_INLINE uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* The key of a tensor's step on the parameter stream (stream 0). */
ADOPT_INLINE uint32_t param_key(int64_t seed, uint32_t step) { return mix32(mix32((uint32_t)seed) ^ step); }

/* Elements whose draws one draws_of call computes (its buffer holds two more). */
#define ADOPT_DRAW_CHUNK 1024

/* The 16-bit draws of elements [start, start + n), n <= ADOPT_DRAW_CHUNK: one word per pair
 * k = i >> 1, its low half for even i, its high half for odd i. `key` already holds
 * key ^ mix32(hi(k)) (the range lies in one aligned span of 2^33 elements). Fills `buf` and
 * returns where element start's draw is in it. */
ADOPT_INLINE const uint16_t *draws_of(uint16_t *restrict buf, uint32_t key, int64_t start, int64_t n) {
    const int64_t odd = start & 1, pairs = (odd + n + 1) >> 1;
    uint32_t pair_g = (uint32_t)((uint64_t)start >> 1) * ADOPT_GOLDEN;
    _Pragma("omp simd linear(pair_g : ADOPT_GOLDEN)")
    for (int64_t q = 0; q < pairs; q++) {
        const uint32_t w = mix32(pair_g ^ key);
        buf[2 * q] = (uint16_t)w;
        buf[2 * q + 1] = (uint16_t)(w >> 16);
        pair_g += ADOPT_GOLDEN;
    }
    return buf + odd;
}

/* mix32 of the pair index's high part (hi(k) = i >> 33), folded into a key. */
ADOPT_INLINE uint32_t pair_high(int64_t index) { return mix32((uint32_t)((uint64_t)index >> 33)); }

/* The draw of one element, as draws_of computes it. */
ADOPT_INLINE uint32_t draw_at(uint32_t key, int64_t index) {
    const uint32_t word = mix32((uint32_t)((uint64_t)index >> 1) * ADOPT_GOLDEN ^ key);
    return (word >> ((index & 1) * 16)) & 0xFFFFu;
}

/* r: the element's 16-bit draw. */
ADOPT_INLINE uint16_t bf16_store_sr(float f, uint32_t r) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t up = (u + r) >> 16;
    return (uint16_t)select_u32((u & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, up);
}

ADOPT_INLINE uint16_t f16_store_sr(float f, uint32_t r) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t a = u & 0x7FFFFFFFu, sign = u & 0x80000000u;
    /* Normal half range: 13 dropped bits. */
    const uint32_t normal = ((a + (r & 0x1FFFu)) & ~0x1FFFu) | sign;
    /* Subnormal range: a fixed step of 2^-24, up with probability frac(|x| * 2^24). */
    const float scaled = bits_to_f32(a) * 0x1p24f;
    const float low = floorf(scaled);
    const float draw = (float)r * 0x1p-16f;
    const float sub = (low + (draw < scaled - low ? 1.0f : 0.0f)) * 0x1p-24f;
    const uint32_t y = select_u32(a < 0x38800000u, f32_to_bits(sub) | sign, normal);
    /* The result is a float16 value (or >= 65536, which becomes inf); NaN rounds to nearest. */
    return (uint16_t)select_u32(a > 0x7F800000u, f16_store(f), f16_store(bits_to_f32(y)));
}

ADOPT_INLINE float f32_load(float x) { return x; }
ADOPT_INLINE float f32_store(float x) { return x; }
ADOPT_INLINE double f64_load(double x) { return x; }
ADOPT_INLINE double f64_store(double x) { return x; }

/* ---- per-element loops -------------------------------------------------------------- */

typedef struct {
    float gscale, l2, decay, lr, b1c, b2, b2c, eps;
} coef_float;

typedef struct {
    double gscale, l2, decay, lr, b1c, b2, b2c, eps;
} coef_double;

/* Whether a and b have the same nonzero sign (an exact sign test: no product to underflow). */
#define ADOPT_AGREE(a, b) ((((a) > 0) & ((b) > 0)) | (((a) < 0) & ((b) < 0)))

/*
 * first_*:  the tensor's first step, v = g'^2 (p and m are left alone).
 * update_*: every later step, p written back to nearest; `clip` is +inf when clipping is
 * off, which leaves n as is. step_one_ is the rule for one element; with `sr_on` (16-bit
 * types only) p is written back with stochastic rounding from the stored m (the common step
 * of 16-bit tensors with it runs update_pairs_, below).
 * g' = g * gscale (+ l2 * p when L2 decay is on); gscale folds AMP unscaling and maximize.
 * `l2_on` is a compile-time constant at every call site of first_/update_, so each variant
 * of the common step is its own loop. With `nesterov` (a select per element, so the loop is
 * not duplicated for it) the update is lerp(m, n, 1 - beta1) instead of m.
 * A cautious step (adopt/_variants.py) takes two passes, since each tensor's weight w depends
 * on all of its elements: moment_* updates m (and v, unless Nesterov needs the old v in the
 * second pass: then v is stored back unchanged) and returns how many elements of the update
 * agree in sign with g'; apply_* then writes p with the update times w where they agree, 0
 * elsewhere. Both form the update from the stored m, so they count and mask the same
 * elements. Their other flags are selects, so a cautious step adds three loops per type.
 */
#define ADOPT_DEFINE_LOOPS(SUF, T, C, LOAD, STORE, STORE_SR, SQRT)                               \
    ADOPT_INLINE void first_##SUF(const T *restrict p, const T *restrict g, T *restrict v,       \
                                   int64_t n, const coef_##C *k, const int l2_on) {               \
        const C gs = k->gscale, l2 = k->l2;                                                       \
        ADOPT_SIMD                                                                                \
        for (int64_t i = 0; i < n; i++) {                                                         \
            C gi = LOAD(g[i]) * gs;                                                               \
            if (l2_on) gi = gi + l2 * LOAD(p[i]);                                                 \
            v[i] = STORE(gi * gi);                                                                \
        }                                                                                         \
    }                                                                                             \
    /* g' of an element whose parameter is p: unscaled, signed, with L2 decay when l2_on. */    \
    ADOPT_INLINE C grad_##SUF(const T g, const C p, const coef_##C *k, const int l2_on) {          \
        const C gi = LOAD(g) * k->gscale;                                                         \
        return l2_on ? gi + k->l2 * p : gi;                                                       \
    }                                                                                             \
    /* The normalised, clipped gradient of g' over v. */                                         \
    ADOPT_INLINE C normalised_##SUF(const C gi, const C vi, const coef_##C *k, const C clip) {    \
        C d = SQRT(vi);                                                                           \
        d = d < k->eps ? k->eps : d;                                                              \
        C u = gi / d;                                                                             \
        u = u < -clip ? -clip : u;                                                                \
        return u > clip ? clip : u;                                                               \
    }                                                                                             \
    /* p written back: to nearest, or (sr_on) stochastically with the element's draw. */       \
    ADOPT_INLINE T store_p_##SUF(const C x, const int sr_on, const uint32_t draw) {               \
        const T nearest = STORE(x);                                                               \
        return sr_on ? STORE_SR(x, draw) : nearest;                                               \
    }                                                                                             \
    /* One element of a later step: the new p, m and v of the stored p, g, m and v. */         \
    ADOPT_INLINE void step_one_##SUF(const T ps, const T gs, const T ms, const T vs,              \
                                     const coef_##C *k, const C clip, const int l2_on,            \
                                     const int sr_on, const int nesterov, const uint32_t draw,    \
                                     T *po, T *mo, T *vo) {                                       \
        const C pi = LOAD(ps);                                                                    \
        const C gi = grad_##SUF(gs, pi, k, l2_on);                                                \
        const C vi = LOAD(vs);                                                                    \
        const C u = normalised_##SUF(gi, vi, k, clip);                                            \
        C mi = LOAD(ms);                                                                          \
        mi = mi + k->b1c * (u - mi);                                                              \
        const T mn = STORE(mi);                                                                   \
        /* The update from the stored m with stochastic rounding, as the torch paths. */         \
        const C mu = sr_on ? LOAD(mn) : mi;                                                       \
        const C ahead = mu + k->b1c * (u - mu);                                                   \
        const C up = nesterov ? ahead : mu;                                                       \
        *po = store_p_##SUF(pi * k->decay - k->lr * up, sr_on, draw);                             \
        *mo = mn;                                                                                 \
        *vo = STORE(k->b2 * vi + k->b2c * (gi * gi));                                             \
    }                                                                                             \
    ADOPT_INLINE void update_##SUF(T *restrict p, const T *restrict g, T *restrict m,            \
                                    T *restrict v, int64_t n, const coef_##C *k, const C clip,   \
                                    const int l2_on, const int nesterov) {                        \
        ADOPT_SIMD                                                                                \
        for (int64_t i = 0; i < n; i++)                                                           \
            step_one_##SUF(p[i], g[i], m[i], v[i], k, clip, l2_on, 0, nesterov, 0u, &p[i], &m[i], \
                           &v[i]);                                                                \
    }                                                                                             \
    ADOPT_INLINE int64_t moment_##SUF(const T *restrict p, const T *restrict g, T *restrict m,   \
                                       T *restrict v, int64_t n, const coef_##C *k, const C clip, \
                                       const int l2_on, const int nesterov) {                     \
        const C gs = k->gscale, l2 = k->l2, b1c = k->b1c, b2 = k->b2, b2c = k->b2c;               \
        /* 32-bit lanes, as wide as the float lanes; n <= ADOPT_COUNT_PIECE. */                 \
        uint32_t kept = 0;                                                                        \
        _Pragma("omp simd reduction(+ : kept)")                                                   \
        for (int64_t i = 0; i < n; i++) {                                                         \
            const C gl = LOAD(g[i]) * gs;                                                         \
            const C gi = l2_on ? gl + l2 * LOAD(p[i]) : gl;                                       \
            const T vs = v[i];                                                                    \
            const C vi = LOAD(vs);                                                                \
            const C u = normalised_##SUF(gi, vi, k, clip);                                        \
            C mi = LOAD(m[i]);                                                                    \
            mi = mi + b1c * (u - mi);                                                             \
            const T ms = STORE(mi);                                                               \
            const C mu = LOAD(ms);                                                                \
            const C ahead = mu + b1c * (u - mu);                                                  \
            kept += (uint32_t)ADOPT_AGREE(nesterov ? ahead : mu, gi);                             \
            m[i] = ms;                                                                            \
            const T vn = STORE(b2 * vi + b2c * (gi * gi));                                        \
            v[i] = nesterov ? vs : vn;                                                            \
        }                                                                                         \
        return (int64_t)kept;                                                                     \
    }                                                                                             \
    ADOPT_INLINE void apply_##SUF(T *restrict p, const T *restrict g, const T *restrict m,       \
                                   T *restrict v, int64_t n, const coef_##C *k, const C clip,    \
                                   const C w, const int l2_on, const int sr_on,                   \
                                   const int nesterov, const uint16_t *restrict draws) {          \
        const C decay = k->decay, lr = k->lr, b1c = k->b1c, b2 = k->b2, b2c = k->b2c;             \
        ADOPT_SIMD                                                                                \
        for (int64_t i = 0; i < n; i++) {                                                         \
            const C pi = LOAD(p[i]);                                                              \
            const C gi = grad_##SUF(g[i], pi, k, l2_on);                                          \
            const C mu = LOAD(m[i]);                                                              \
            C up = mu;                                                                            \
            if (nesterov) {                                                                       \
                const C vi = LOAD(v[i]);                                                          \
                up = mu + b1c * (normalised_##SUF(gi, vi, k, clip) - mu);                         \
                v[i] = STORE(b2 * vi + b2c * (gi * gi));                                          \
            }                                                                                     \
            up = up * (ADOPT_AGREE(up, gi) ? w : (C)0);                                           \
            p[i] = store_p_##SUF(pi * decay - lr * up, sr_on, sr_on ? draws[i] : 0u);             \
        }                                                                                         \
    }

/* float32/float64 parameters are never rounded stochastically (sr_on is 0 for them). */
ADOPT_INLINE float f32_store_sr(float x, uint32_t r) { (void)r; return x; }
ADOPT_INLINE double f64_store_sr(double x, uint32_t r) { (void)r; return x; }

ADOPT_DEFINE_LOOPS(f32, float, float, f32_load, f32_store, f32_store_sr, sqrtf)
ADOPT_DEFINE_LOOPS(f64, double, double, f64_load, f64_store, f64_store_sr, sqrt)
ADOPT_DEFINE_LOOPS(f16, uint16_t, float, f16_load, f16_store, f16_store_sr, sqrtf)
ADOPT_DEFINE_LOOPS(bf16, uint16_t, float, bf16_load, bf16_store, bf16_store_sr, sqrtf)

/* A 32-bit lane of two 16-bit elements as loaded from memory, to and from the order with
 * the even element in the low half (its own inverse): as it is on little-endian hosts (every
 * platform torch runs on), the halves swapped where the compiler says big-endian. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define ADOPT_PAIR_LANE(x) ((uint32_t)(x) >> 16 | (uint32_t)(x) << 16)
#else
#define ADOPT_PAIR_LANE(x) ((uint32_t)(x))
#endif

/* A later step with stochastic rounding of 16-bit tensors over `pairs` pairs of elements
 * (elements 2q and 2q + 1 from the segment's start, which is an even element: pair index
 * first_pair + q), each pair as one 32-bit lane: the pair's word is computed once and its
 * halves round the two elements (the low half the even one), the 16-bit values are
 * unpacked and packed with shifts (lanes in ADOPT_PAIR_LANE order). Same arithmetic as
 * update_ element by element. */
#define ADOPT_DEFINE_PAIR_LOOP(SUF)                                                               \
    ADOPT_INLINE void update_pairs_##SUF(uint16_t *p, const uint16_t *g, uint16_t *m, uint16_t *v, \
                                         int64_t pairs, const coef_float *k, const float clip,    \
                                         const int l2_on, const int nesterov, const uint32_t key, \
                                         const int64_t first_pair) {                              \
        uint32_t pair_g = (uint32_t)first_pair * ADOPT_GOLDEN;                                    \
        _Pragma("omp simd linear(pair_g : ADOPT_GOLDEN)")                                         \
        for (int64_t q = 0; q < pairs; q++) {                                                     \
            uint32_t pw, gw, mw, vw;                                                              \
            memcpy(&pw, p + 2 * q, 4);                                                            \
            memcpy(&gw, g + 2 * q, 4);                                                            \
            memcpy(&mw, m + 2 * q, 4);                                                            \
            memcpy(&vw, v + 2 * q, 4);                                                            \
            pw = ADOPT_PAIR_LANE(pw);                                                             \
            gw = ADOPT_PAIR_LANE(gw);                                                             \
            mw = ADOPT_PAIR_LANE(mw);                                                             \
            vw = ADOPT_PAIR_LANE(vw);                                                             \
            const uint32_t word = mix32(pair_g ^ key);                                            \
            uint16_t p0, m0, v0, p1, m1, v1;                                                      \
            step_one_##SUF((uint16_t)pw, (uint16_t)gw, (uint16_t)mw, (uint16_t)vw, k, clip, l2_on, \
                           1, nesterov, word & 0xFFFFu, &p0, &m0, &v0);                           \
            step_one_##SUF((uint16_t)(pw >> 16), (uint16_t)(gw >> 16), (uint16_t)(mw >> 16),      \
                           (uint16_t)(vw >> 16), k, clip, l2_on, 1, nesterov, word >> 16, &p1,    \
                           &m1, &v1);                                                             \
            pw = ADOPT_PAIR_LANE((uint32_t)p0 | (uint32_t)p1 << 16);                              \
            mw = ADOPT_PAIR_LANE((uint32_t)m0 | (uint32_t)m1 << 16);                              \
            vw = ADOPT_PAIR_LANE((uint32_t)v0 | (uint32_t)v1 << 16);                              \
            memcpy(p + 2 * q, &pw, 4);                                                            \
            memcpy(m + 2 * q, &mw, 4);                                                            \
            memcpy(v + 2 * q, &vw, 4);                                                            \
            pair_g += ADOPT_GOLDEN;                                                               \
        }                                                                                         \
    }

/* The stochastic-rounding step of elements start .. start + n - 1 of a 16-bit tensor (one
 * piece: see ADOPT_SEGMENT): an odd first and an unpaired last element alone, the rest in
 * pairs. */
#define ADOPT_DEFINE_SR_STEP(SUF)                                                                 \
    ADOPT_DEFINE_PAIR_LOOP(SUF)                                                                   \
    ADOPT_INLINE void sr_step_##SUF(uint16_t *p, const uint16_t *g, uint16_t *m, uint16_t *v,     \
                                    int64_t n, const coef_float *k, const float clip,             \
                                    const int l2_on, const int nesterov, const uint32_t key,      \
                                    const int64_t start) {                                        \
        int64_t j = 0;                                                                            \
        if ((start & 1) && n > 0) {                                                               \
            step_one_##SUF(p[0], g[0], m[0], v[0], k, clip, l2_on, 1, nesterov, draw_at(key, start), \
                           p, m, v);                                                              \
            j = 1;                                                                                \
        }                                                                                         \
        const int64_t pairs = (n - j) >> 1;                                                       \
        if (l2_on)                                                                                \
            update_pairs_##SUF(p + j, g + j, m + j, v + j, pairs, k, clip, 1, nesterov, key,      \
                               (start + j) >> 1);                                                 \
        else                                                                                      \
            update_pairs_##SUF(p + j, g + j, m + j, v + j, pairs, k, clip, 0, nesterov, key,      \
                               (start + j) >> 1);                                                 \
        j += 2 * pairs;                                                                           \
        if (j < n)                                                                                \
            step_one_##SUF(p[j], g[j], m[j], v[j], k, clip, l2_on, 1, nesterov,                   \
                           draw_at(key, start + j), p + j, m + j, v + j);                         \
    }

ADOPT_DEFINE_SR_STEP(f16)
ADOPT_DEFINE_SR_STEP(bf16)
/* float32/float64 parameters are never rounded stochastically. */
#define ADOPT_NO_SR_STEP(...) ((void)0)

/* ---- one thread's share ------------------------------------------------------------- */

typedef struct {
    int64_t offset; /* first flat index of the tensor */
    double clip;    /* threshold (+inf: off) */
    int first;      /* step count was 0 */
    int sr;         /* stochastic rounding of p (16-bit types with seeds) */
    uint32_t key;   /* its key for this step */
    int64_t kept;   /* caution: elements whose update agrees with g' (summed over threads) */
    double weight;  /* caution: 1 / max(kept / numel, 1e-3), rounded in the compute type */
} tensor_info;

/* What one pass over a range does: the whole step, or a cautious step's first or second pass. */
typedef enum { PASS_STEP = 0, PASS_MOMENTS = 1, PASS_APPLY = 2 } pass_t;

/* Runs `pass` on elements [b, e) of tensor `i`; stochastic rounding only where SR_OK (16-bit
 * types), in pieces that do not cross a multiple of 2^32 elements (the pair index's high
 * part is folded into the key). Only these call sites expand the loops: one copy each. */
#define ADOPT_SEGMENT(SUF, T, C, K, SR_OK, SR_STEP)                                               \
    do {                                                                                          \
        T *p_ = (T *)a->p[i] + b, *m_ = (T *)a->m[i] + b, *v_ = (T *)a->v[i] + b;                 \
        const T *g_ = (const T *)a->g[i] + b;                                                     \
        const coef_##C *k_ = &K;                                                                  \
        const C clip_ = (C)info[i].clip, w_ = (C)info[i].weight;                                  \
        const int sr_ = SR_OK && info[i].sr;                                                      \
        if (info[i].first) {                                                                      \
            if (pass == PASS_APPLY) break;                                                        \
            if (l2_on) first_##SUF(p_, g_, v_, e - b, k_, 1);                                     \
            else first_##SUF(p_, g_, v_, e - b, k_, 0);                                           \
            break;                                                                                \
        }                                                                                         \
        for (int64_t s_ = b; s_ < e;) {                                                           \
            /* Pieces end at multiples of 2^32 (rounding) or after ADOPT_COUNT_PIECE (counts). */ \
            const int64_t stop_ = ((s_ >> 32) + 1) << 32;                                         \
            int64_t t_ = e < stop_ ? e : stop_;                                                   \
            if (t_ - s_ > ADOPT_COUNT_PIECE) t_ = s_ + ADOPT_COUNT_PIECE;                         \
            const uint32_t key_ = sr_ ? info[i].key ^ pair_high(s_) : 0u;                         \
            const int64_t o_ = s_ - b, n_ = t_ - s_;                                              \
            if (pass == PASS_MOMENTS) {                                                           \
                const int64_t kept_ = moment_##SUF(p_ + o_, g_ + o_, m_ + o_, v_ + o_, n_, k_,    \
                                                    clip_, l2_on, nesterov);                      \
                _Pragma("omp atomic")                                                             \
                info[i].kept += kept_;                                                            \
            } else if (SR_OK && sr_ && pass == PASS_STEP) {                                       \
                SR_STEP(p_ + o_, g_ + o_, m_ + o_, v_ + o_, n_, k_, clip_, l2_on, nesterov, key_, s_); \
            } else if (pass == PASS_APPLY) {                                                      \
                /* A cautious step's write-back, per chunk: the draws (with stochastic rounding; \
                 * otherwise zeros, never used), then the loop over the chunk. */               \
                uint16_t buf_[ADOPT_DRAW_CHUNK + 2] = {0};                                        \
                for (int64_t c_ = 0; c_ < n_; c_ += ADOPT_DRAW_CHUNK) {                           \
                    const int64_t cn_ = n_ - c_ < ADOPT_DRAW_CHUNK ? n_ - c_ : ADOPT_DRAW_CHUNK;  \
                    const uint16_t *dr_ = SR_OK && sr_ ? draws_of(buf_, key_, s_ + c_, cn_) : buf_; \
                    const int64_t x_ = o_ + c_;                                                   \
                    if (nesterov)                                                                 \
                        apply_##SUF(p_ + x_, g_ + x_, m_ + x_, v_ + x_, cn_, k_, clip_, w_, l2_on, \
                                    sr_, 1, dr_);                                                 \
                    else                                                                          \
                        apply_##SUF(p_ + x_, g_ + x_, m_ + x_, v_ + x_, cn_, k_, clip_, w_, l2_on, \
                                    sr_, 0, dr_);                                                 \
                }                                                                                 \
            } else if (l2_on) {                                                                   \
                update_##SUF(p_ + o_, g_ + o_, m_ + o_, v_ + o_, n_, k_, clip_, 1, nesterov);     \
            } else {                                                                              \
                update_##SUF(p_ + o_, g_ + o_, m_ + o_, v_ + o_, n_, k_, clip_, 0, nesterov);     \
            }                                                                                     \
            s_ = t_;                                                                              \
        }                                                                                         \
    } while (0)

/* Elements counted per moment_* call: its 32-bit count cannot wrap. */
#define ADOPT_COUNT_PIECE ((int64_t)1 << 31)

/* The step's coefficients in the compute types (shared by the full-precision and the
 * low-memory-state steps, so both round them alike). */
ADOPT_INLINE void step_coefs(const adopt_cpu_args *a, coef_double *kd, coef_float *kf) {
    /* Corrected weight decay: the decay's lr is lr * lr / lr_max (adopt/_variants.py). */
    const double decay_lr = a->lr_max > 0.0 ? a->lr * a->lr / a->lr_max : a->lr;
    double gscale = a->grad_scale != NULL ? 1.0 / (double)*a->grad_scale : 1.0;
    if (a->maximize) gscale = -gscale;
    const coef_double d = {
        .gscale = gscale,
        .l2 = a->weight_decay,
        .decay = a->decouple ? 1.0 - decay_lr * a->weight_decay : 1.0,
        .lr = a->lr,
        .b1c = 1.0 - a->beta1,
        .b2 = a->beta2,
        .b2c = 1.0 - a->beta2,
        .eps = a->eps,
    };
    const coef_float f = {
        .gscale = (float)d.gscale,
        .l2 = (float)d.l2,
        .decay = (float)d.decay,
        .lr = (float)d.lr,
        .b1c = (float)d.b1c,
        .b2 = (float)d.b2,
        .b2c = (float)d.b2c,
        .eps = (float)d.eps,
    };
    *kd = d;
    *kf = f;
}

/* One pass over the elements [lo, hi) of the index space; inlined into a function per pass,
 * so each compiles only its own loops. */
ADOPT_INLINE void range_pass(const adopt_cpu_args *a, tensor_info *info, int64_t lo, int64_t hi,
                             const pass_t pass) {
    const int64_t n = a->n_tensors;
    const int l2_on = a->weight_decay != 0.0 && !a->decouple;
    const int nesterov = a->nesterov != 0;
    coef_double kd;
    coef_float kf;
    step_coefs(a, &kd, &kf);

    /* Last tensor whose offset is <= lo. */
    int64_t left = 0, right = n - 1;
    while (left < right) {
        const int64_t mid = left + (right - left + 1) / 2;
        if (info[mid].offset <= lo) left = mid;
        else right = mid - 1;
    }
    for (int64_t i = left; i < n && info[i].offset < hi; i++) {
        const int64_t start = info[i].offset, stop = info[i + 1].offset;
        const int64_t b = (lo > start ? lo : start) - start;
        const int64_t e = (hi < stop ? hi : stop) - start;
        if (e <= b) continue;
        switch (a->dtype) {
        case ADOPT_F32: ADOPT_SEGMENT(f32, float, float, kf, 0, ADOPT_NO_SR_STEP); break;
        case ADOPT_F64: ADOPT_SEGMENT(f64, double, double, kd, 0, ADOPT_NO_SR_STEP); break;
        case ADOPT_F16: ADOPT_SEGMENT(f16, uint16_t, float, kf, 1, sr_step_f16); break;
        case ADOPT_BF16: ADOPT_SEGMENT(bf16, uint16_t, float, kf, 1, sr_step_bf16); break;
        }
    }
}

ADOPT_CLONES
static void step_range(const adopt_cpu_args *a, tensor_info *info, int64_t lo, int64_t hi) {
    range_pass(a, info, lo, hi, PASS_STEP);
}

/* A cautious step's two passes, cloned like the step itself (the baseline build of their
 * loops ran 3x slower than the AVX2 one). */
ADOPT_CLONES
static void moments_range(const adopt_cpu_args *a, tensor_info *info, int64_t lo, int64_t hi) {
    range_pass(a, info, lo, hi, PASS_MOMENTS);
}

ADOPT_CLONES
static void apply_range(const adopt_cpu_args *a, tensor_info *info, int64_t lo, int64_t hi) {
    range_pass(a, info, lo, hi, PASS_APPLY);
}

/* ---- entry point -------------------------------------------------------------------- */

/* Each updated tensor's caution weight from its count, rounded as adopt/_variants.py rounds
 * it: in float64 for float64 tensors, else in float32. */
static void caution_weights(const adopt_cpu_args *a, tensor_info *info) {
    for (int64_t i = 0; i < a->n_tensors; i++) {
        if (info[i].first) continue;
        if (a->dtype == ADOPT_F64) {
            const double kept = (double)info[i].kept / (double)a->numel[i];
            info[i].weight = 1.0 / (kept < 1e-3 ? 1e-3 : kept);
        } else {
            const float kept = (float)info[i].kept / (float)a->numel[i];
            info[i].weight = (double)(1.0f / (kept < 1e-3f ? 1e-3f : kept));
        }
    }
}

/*
 * Busy CPUs. The work is split statically, so a call lasts until its slowest thread is done;
 * when other processes occupy the cores, a thread that the OS has not scheduled yet holds the
 * whole call for a time slice (milliseconds, 30x a 1M-element step). A call therefore notes
 * how late its threads started; when one started more than ADOPT_LATE_START seconds after the
 * call, the following calls run on one thread for ADOPT_SERIAL_PERIOD seconds, and then try
 * the full team again. Results do not depend on the number of threads.
 */
#define ADOPT_LATE_START 1e-3
#define ADOPT_SERIAL_PERIOD 1.0
#define ADOPT_MAX_TEAM 256

#ifdef _OPENMP
static double serial_until = 0.0; /* omp_get_wtime() before which calls run serially */

static int contended_now(void) {
    double until;
#pragma omp atomic read
    until = serial_until;
    return omp_get_wtime() < until;
}
#endif

static int threads_for(int64_t total, int requested) {
    int64_t nt = requested;
#ifdef _OPENMP
    if (omp_in_parallel()) nt = 1;
#else
    nt = 1;
#endif
    const int64_t by_work = total / ADOPT_MIN_PER_THREAD;
    if (nt > by_work) nt = by_work;
    return nt < 1 ? 1 : (int)nt;
}

int adopt_cpu_step(const adopt_cpu_args *a) {
    const int64_t n = a->n_tensors;
    if (n <= 0) return 0;
    if (a->found_inf != NULL && *a->found_inf != 0.0f) return 0;

    tensor_info *info = (tensor_info *)malloc((size_t)(n + 1) * sizeof *info);
    if (info == NULL) return -1;
    int64_t total = 0;
    float last_s = -1.0f;
    double last_c = 0.0;
    const int sr = a->seed != NULL && (a->dtype == ADOPT_F16 || a->dtype == ADOPT_BF16);
    for (int64_t i = 0; i < n; i++) {
        const float s = *a->step[i];
        info[i].offset = total;
        info[i].first = s == 0.0f;
        info[i].sr = sr;
        info[i].key = sr ? param_key(*a->seed[i], (uint32_t)s) : 0u;
        info[i].kept = 0;
        info[i].weight = 0.0;
        switch (a->clip_mode) {
        case ADOPT_CLIP_TABLE: info[i].clip = a->clip_table[i]; break;
        case ADOPT_CLIP_POWER:
            if (s != last_s) {
                last_s = s;
                last_c = pow((double)s, a->clip_exponent);
            }
            info[i].clip = last_c;
            break;
        default: info[i].clip = INFINITY; break;
        }
        total += a->numel[i];
    }
    info[n].offset = total;
    info[n].clip = INFINITY;
    info[n].first = 0;
    info[n].sr = 0;
    info[n].key = 0u;
    info[n].kept = 0;
    info[n].weight = 0.0;

    int nt = threads_for(total, a->num_threads);
#ifdef _OPENMP
    if (nt > ADOPT_MAX_TEAM) nt = ADOPT_MAX_TEAM;
    if (nt > 1 && contended_now()) nt = 1;
#endif
    if (nt > 1) {
#ifdef _OPENMP
        double started[ADOPT_MAX_TEAM];
        const double call_start = omp_get_wtime();
        int team = 1;
#pragma omp parallel num_threads(nt)
        {
            const int64_t cnt = omp_get_num_threads(), tid = omp_get_thread_num();
            started[tid] = omp_get_wtime();
            if (tid == 0) team = (int)cnt;
            int64_t chunk = (total + cnt - 1) / cnt;
            chunk = (chunk + ADOPT_RANGE_ALIGN - 1) / ADOPT_RANGE_ALIGN * ADOPT_RANGE_ALIGN;
            const int64_t lo = tid * chunk < total ? tid * chunk : total;
            const int64_t hi = lo + chunk < total ? lo + chunk : total;
            if (lo < hi) (a->caution ? moments_range : step_range)(a, info, lo, hi);
            if (a->caution) { /* the same condition in every thread: all reach the barriers */
#pragma omp barrier
#pragma omp single
                caution_weights(a, info);
                if (lo < hi) apply_range(a, info, lo, hi);
            }
        }
        double latest = call_start;
        for (int t = 0; t < team; t++) latest = started[t] > latest ? started[t] : latest;
        if (latest - call_start > ADOPT_LATE_START) {
#pragma omp atomic write
            serial_until = omp_get_wtime() + ADOPT_SERIAL_PERIOD;
        }
#endif
    } else if (a->caution) {
        moments_range(a, info, 0, total);
        caution_weights(a, info);
        apply_range(a, info, 0, total);
    } else {
        step_range(a, info, 0, total);
    }
    for (int64_t i = 0; i < n; i++) *a->step[i] += 1.0f;
    free(info);
    return 0;
}

uint32_t adopt_random_draw(int64_t seed, uint32_t step, int64_t index) {
    return draw_at(param_key(seed, step) ^ pair_high(index), index);
}

uint16_t adopt_bf16_round_stochastic(float x, uint32_t r) { return bf16_store_sr(x, r); }

uint16_t adopt_f16_round_stochastic(float x, uint32_t r) { return f16_store_sr(x, r); }

int adopt_cpu_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ==== low-memory optimizer state: "bf16" and "8bit" moments (adopt/_state_formats.py) ====
 *
 * The work is cut into blocks of ADOPT_STATE_BLOCK elements (the 8-bit format's blocks; the
 * last block of a tensor may be shorter) and the blocks of all tensors into one contiguous
 * range per thread. Per block, one vectorised loop decodes m and v (bit arithmetic, no
 * table: the codes are small floats whose bits are the code shifted into place), applies
 * the full-precision rule exactly as update_/apply_ do it on float32 moments, writes the
 * parameter and keeps the new m and u = sqrt(v) in a stack buffer with their block maxima
 * (integer max of the magnitude bits: NaN above infinity); a second loop encodes them with
 * the block's power-of-two scale, on integer bits and exact float32 products (no division).
 * bf16 moments are rounded in the first loop. Results do not depend on the number of threads.
 */

#define ADOPT_STREAM_EXP_AVG_SQ 1u
#define ADOPT_STREAM_EXP_AVG 2u

/* _random.step_key: the key of a tensor's step on one stream. */
ADOPT_INLINE uint32_t stream_key(int64_t seed, uint32_t stream, uint32_t step) {
    return mix32(mix32((uint32_t)seed ^ (stream * ADOPT_GOLDEN)) ^ step);
}

/* value(code) at scale 1: m signed E3M4 (e = 0 is the subnormal range f * 2^-10), u unsigned
 * E4M4 (every code normal). Both exact. */
ADOPT_INLINE float dec_m8(uint32_t c) {
    const uint32_t q = c & 0x7Fu;
    const float sub = (float)(int32_t)q * 0x1p-10f; /* used for q < 16 only: q == f */
    const uint32_t mag = select_u32(q >= 16u, (q + (120u << 4)) << 19, f32_to_bits(sub));
    return bits_to_f32(mag | ((c & 0x80u) << 24));
}

ADOPT_INLINE float dec_u8(uint32_t c) { return bits_to_f32((c + (112u << 4)) << 19); }

/* The scale of a block from its largest magnitude's bits (NaN above infinity): NaN for a
 * non-finite block, 0 for an all-zero one (*field = 0: every code 0), else 2^(B - 127). */
static inline float state_scale(uint32_t amax, uint32_t b_min, uint32_t *field) {
    if (amax >= 0x7F800000u) {
        *field = 0;
        return bits_to_f32(0x7FC00000u);
    }
    if (amax == 0u) {
        *field = 0;
        return 0.0f;
    }
    uint32_t b = (amax + (1u << 19) - 1u) >> 23; /* rounded up to 4 mantissa bits */
    b = b < b_min ? b_min : b > 254u ? 254u : b;
    *field = b;
    return bits_to_f32(b << 23);
}

/* Codes of x (float32 bits) with random word r (the draw << 16) in a block whose code
 * exponent 0 has float32 exponent field o (m: B - 7, u: B - 15), as _state_formats.encode. */
ADOPT_INLINE uint32_t enc_u8(uint32_t x, uint32_t r, int32_t o) {
    const uint32_t a = x & 0x7FFFFFFFu;
    int32_t q = (int32_t)((a + (r >> 13)) >> 19) - o * 16;
    q = q < 0 ? 0 : q;
    return (uint32_t)(q > 255 ? 255 : q);
}

ADOPT_INLINE uint32_t enc_m8(uint32_t x, uint32_t r, int32_t o) {
    const uint32_t a = x & 0x7FFFFFFFu;
    const int32_t normal = (int32_t)((a + (r >> 13)) >> 19) - o * 16;
    const int32_t ex = (int32_t)(a >> 23);
    /* e <= 0 (ex <= o): the subnormal range, (F + (r >> (32 - d))) >> d with d = 20 - e.
     * That is floor(X + r / 2^32) for X = F / 2^d = |x| * 2^(130 - o), exact in float32
     * (<= 24 significant bits, >= 2^-32), so q = floor(X) + carry(frac(X) * 2^32 + r), an
     * integer below 2^32. d > 32 (max(ex, 1) < o - 12) rounds to 0. Masks, not ternaries,
     * select the result: GCC then vectorises the loop. Needs a valid block's o (4 ..= 247);
     * in a finite block |x| < 2^(o - 119), so the cap below only binds for the NaN and
     * infinite lanes of a non-finite block (codes then 0) and keeps the conversions in range. */
    const uint32_t top = (uint32_t)(o + 8) << 23;
    const uint32_t a_max = (top < 0x7F800000u ? top : 0x7F800000u) - 1u;
    const float xs = bits_to_f32(a < a_max ? a : a_max) * bits_to_f32((uint32_t)(257 - o) << 23);
    const int32_t whole = (int32_t)xs; /* xs >= 0: truncation is floor */
    const uint32_t frac = (uint32_t)((xs - (float)whole) * 0x1p32f);
    int32_t q = whole + (int32_t)(r > ~frac);
    q &= -(int32_t)((ex > 1 ? ex : 1) >= o - 12);
    const int32_t is_normal = -(int32_t)(ex > o);
    q = (normal & is_normal) | (q & ~is_normal);
    q = q < 127 ? q : 127;
    return (uint32_t)q | ((x >> 31) << 7);
}

/* One block's arguments for the cloned block workers. p_in/g_in: float32 values (the
 * tensor's own memory for float32 params, else a converted copy); p_out: where the new
 * parameter values go (float32: the tensor itself, in place; else a scratch buffer that a
 * store loop rounds into the tensor). */
typedef struct {
    const float *p_in, *g_in;
    float *p_out;
    void *m, *v;         /* the block's first m and v code (uint8) or bfloat16 element */
    float *m_scale, *v_scale; /* 8bit: the block's scales, read then overwritten */
    int64_t n;           /* elements of the block */
    int64_t start;       /* the block's first flat index (a multiple of ADOPT_STATE_BLOCK) */
    uint32_t mk, vk;     /* the moments' keys, the pair index's high part folded in */
    const coef_float *k;
    float clip, w;
    int first, caution, nesterov, l2_on;
} block_args;

/* The codes of a block's n new m and u values with their draws, in a block whose scales have
 * exponent fields fm and fu (state_scale). A zero or non-finite moment (field 0) writes code
 * 0; it encodes against B_min so that enc_m8 sees a valid exponent. */
ADOPT_INLINE void encode_codes(uint8_t *restrict mc, uint8_t *restrict vc, const float *m_new, const float *u_new,
                               const uint16_t *m_draw, const uint16_t *v_draw, const int64_t n, const uint32_t fm,
                               const uint32_t fu) {
    const int32_t om = (int32_t)(fm != 0 ? fm : 11u) - 7, ou = (int32_t)fu - 15;
    const uint32_t m_mask = fm != 0 ? 0xFFu : 0u, u_mask = fu != 0 ? 0xFFu : 0u; /* 0: every code 0 */
    ADOPT_SIMD
    for (int64_t j = 0; j < n; j++) {
        const uint32_t qm = enc_m8(f32_to_bits(m_new[j]), (uint32_t)m_draw[j] << 16, om);
        const uint32_t qu = enc_u8(f32_to_bits(u_new[j]), (uint32_t)v_draw[j] << 16, ou);
        mc[j] = (uint8_t)(qm & m_mask);
        vc[j] = (uint8_t)(qu & u_mask);
    }
}

/*
 * The rule on one block, as update_/apply_ compute it on float32 moments. fmt8 and
 * count_only are constants at each call site. count_only: a cautious step's first pass,
 * which only returns how many elements' updates agree in sign with g' and writes nothing;
 * otherwise the whole step (with caution: the update times the tensor's weight where they
 * agree, 0 elsewhere). A first step (s == 0) sets v = g'^2 and leaves m and p as they are;
 * both moments are encoded again in every case.
 */
ADOPT_INLINE uint32_t state_block(const block_args *c, const int fmt8, const int count_only, const int plain) {
    const float *restrict pin = c->p_in;
    const float *restrict gin = c->g_in;
    float *pout = c->p_out; /* may be p_in itself */
    uint8_t *restrict mc = (uint8_t *)c->m;
    uint8_t *restrict vc = (uint8_t *)c->v;
    uint16_t *restrict mb = (uint16_t *)c->m;
    uint16_t *restrict vb = (uint16_t *)c->v;
    const coef_float *k = c->k;
    const float gs = k->gscale, l2 = k->l2, decay = k->decay, lr = k->lr, b1c = k->b1c, b2 = k->b2,
                b2c = k->b2c, eps = k->eps;
    const float clip = c->clip, w = c->w;
    /* plain: the common step (no first step, caution, Nesterov or L2 decay) with those selects
     * compiled out: a quarter fewer instructions in a loop that is compute bound. */
    const int first = !plain && c->first, caution = !plain && c->caution;
    const int nesterov = !plain && c->nesterov, l2_on = !plain && c->l2_on;
    const uint32_t mk = c->mk, vk = c->vk;
    const int64_t n = c->n;
    const float ms_old = fmt8 ? *c->m_scale : 0.0f, vs_old = fmt8 ? *c->v_scale : 0.0f;
    float mnew[ADOPT_STATE_BLOCK], unew[ADOPT_STATE_BLOCK];
    /* 8bit: the codes decoded first, in a loop of their own (with the 8-bit loads in the
     * main loop GCC picks vectors of 8 bytes for all of it). */
    float mold[ADOPT_STATE_BLOCK], uold[ADOPT_STATE_BLOCK];
    /* The moments' draws, one word per two elements (bf16: used in the loop below). */
    uint16_t m_buf[ADOPT_STATE_BLOCK + 2], v_buf[ADOPT_STATE_BLOCK + 2];
    const uint16_t *m_draw = NULL, *v_draw = NULL;
    if (!count_only) {
        m_draw = draws_of(m_buf, mk, c->start, n);
        v_draw = draws_of(v_buf, vk, c->start, n);
    }
    if (fmt8) {
        ADOPT_SIMD
        for (int64_t j = 0; j < n; j++) {
            mold[j] = dec_m8(mc[j]) * ms_old;
            uold[j] = dec_u8(vc[j]) * vs_old;
        }
    }
    uint32_t am = 0, au = 0, kept = 0;
    _Pragma("omp simd reduction(max : am, au) reduction(+ : kept)")
    for (int64_t j = 0; j < n; j++) {
        const float pi = pin[j];
        const float gl = gin[j] * gs;
        const float gi = l2_on ? gl + l2 * pi : gl;
        float mi, vi, d;
        if (fmt8) {
            mi = mold[j];
            const float uo = uold[j];
            vi = uo * uo;
            d = vi == INFINITY ? INFINITY : uo; /* sqrtf(uo * uo), exactly */
        } else {
            mi = bf16_load(mb[j]);
            vi = bf16_load(vb[j]);
            d = sqrtf(vi);
        }
        d = d < eps ? eps : d;
        float nrm = gi / d;
        nrm = nrm < -clip ? -clip : nrm;
        nrm = nrm > clip ? clip : nrm;
        const float mn = mi + b1c * (nrm - mi);
        const float ahead = mn + b1c * (nrm - mn);
        float up = nesterov ? ahead : mn;
        const int agree = ADOPT_AGREE(up, gi);
        if (count_only) {
            kept += (uint32_t)agree;
        } else {
            up = caution ? up * (agree ? w : 0.0f) : up;
            const float pn = pi * decay - lr * up;
            const float vn = first ? gi * gi : b2 * vi + b2c * (gi * gi);
            const float mo = first ? mi : mn;
            pout[j] = first ? pi : pn;
            if (fmt8) {
                const float u = sqrtf(vn);
                mnew[j] = mo;
                unew[j] = u;
                const uint32_t mbits = f32_to_bits(mo) & 0x7FFFFFFFu, ubits = f32_to_bits(u) & 0x7FFFFFFFu;
                am = am > mbits ? am : mbits;
                au = au > ubits ? au : ubits;
            } else {
                mb[j] = bf16_store_sr(mo, m_draw[j]);
                vb[j] = bf16_store_sr(vn, v_draw[j]);
            }
        }
    }
    if (count_only || !fmt8) return kept;
    uint32_t fm, fu;
    *c->m_scale = state_scale(am, 11u, &fm); /* B_min: 2^3 + 4 - 1 (signed), 2^4 + 63 (squared) */
    *c->v_scale = state_scale(au, 79u, &fu);
    encode_codes(mc, vc, mnew, unew, m_draw, v_draw, n, fm, fu);
    return 0;
}

/* The block workers, each compiled for every instruction set (called once per block). */
ADOPT_CLONES static uint32_t block_step_8bit(const block_args *c) { return state_block(c, 1, 0, 0); }
ADOPT_CLONES static uint32_t block_step_bf16(const block_args *c) { return state_block(c, 0, 0, 0); }
ADOPT_CLONES static uint32_t block_plain_8bit(const block_args *c) { return state_block(c, 1, 0, 1); }
ADOPT_CLONES static uint32_t block_plain_bf16(const block_args *c) { return state_block(c, 0, 0, 1); }
ADOPT_CLONES static uint32_t block_count_8bit(const block_args *c) { return state_block(c, 1, 1, 0); }
ADOPT_CLONES static uint32_t block_count_bf16(const block_args *c) { return state_block(c, 0, 1, 0); }

/* The AVX-512 block workers of the common step (adopt_cpu_avx512.h), on x86-64 with GCC or
 * Clang; used on whole blocks when the CPU runs them, unless adopt_cpu_use_avx512(0). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(ADOPT_NO_AVX512)
#define ADOPT_HAVE_AVX512 1
#include "adopt_cpu_avx512.h"
#endif

static int avx512_wanted = 1;

int adopt_cpu_avx512_available(void) {
#ifdef ADOPT_HAVE_AVX512
    static int known = -1; /* computed once, by adopt_cpu_state_step before its threads start */
    if (known < 0) known = avx512_supported();
    return known;
#else
    return 0;
#endif
}

int adopt_cpu_use_avx512(int on) {
    const int previous = avx512_wanted;
    avx512_wanted = on != 0;
    return previous;
}

/* The worker for the whole blocks of a plain step. */
static uint32_t (*whole_block_worker(const int fmt8))(const block_args *) {
#ifdef ADOPT_HAVE_AVX512
    if (avx512_wanted && adopt_cpu_avx512_available()) return fmt8 ? block_plain_8bit_avx512 : block_plain_bf16_avx512;
#endif
    return fmt8 ? block_plain_8bit : block_plain_bf16;
}

/* 16-bit params and grads to float32 and back (nearest, or stochastic with the draws of
 * elements start .. start + n - 1 under `key`; n <= ADOPT_STATE_BLOCK). */
ADOPT_CLONES static void widen_bf16(const uint16_t *restrict src, float *restrict dst, int64_t n) {
    ADOPT_SIMD
    for (int64_t j = 0; j < n; j++) dst[j] = bf16_load(src[j]);
}

ADOPT_CLONES static void widen_f16(const uint16_t *restrict src, float *restrict dst, int64_t n) {
    ADOPT_SIMD
    for (int64_t j = 0; j < n; j++) dst[j] = f16_load(src[j]);
}

ADOPT_CLONES static void narrow_bf16(const float *restrict src, uint16_t *restrict dst, int64_t n, const int sr,
                                     uint32_t key, int64_t start) {
    if (!sr) {
        ADOPT_SIMD
        for (int64_t j = 0; j < n; j++) dst[j] = bf16_store(src[j]);
        return;
    }
    uint16_t buf[ADOPT_STATE_BLOCK + 2];
    const uint16_t *draw = draws_of(buf, key, start, n);
    ADOPT_SIMD
    for (int64_t j = 0; j < n; j++) dst[j] = bf16_store_sr(src[j], draw[j]);
}

ADOPT_CLONES static void narrow_f16(const float *restrict src, uint16_t *restrict dst, int64_t n, const int sr,
                                    uint32_t key, int64_t start) {
    if (!sr) {
        ADOPT_SIMD
        for (int64_t j = 0; j < n; j++) dst[j] = f16_store(src[j]);
        return;
    }
    uint16_t buf[ADOPT_STATE_BLOCK + 2];
    const uint16_t *draw = draws_of(buf, key, start, n);
    ADOPT_SIMD
    for (int64_t j = 0; j < n; j++) dst[j] = f16_store_sr(src[j], draw[j]);
}

typedef struct {
    int64_t offset;  /* first block of the tensor in the call's block index space */
    double clip;     /* threshold (+inf: off) */
    int first;       /* step count was 0 */
    uint32_t pkey, mkey, vkey; /* keys of the param (stochastic rounding), m and v */
    int64_t kept;    /* caution: elements whose update agrees with g' */
    float weight;    /* caution: 1 / max(kept / numel, 1e-3) */
} state_info;

/* Blocks [b, e) of tensor i: the step, or (count_only) the cautious step's counting pass;
 * returns the count. */
static int64_t state_blocks(const adopt_state_args *sa, const state_info *ti, int64_t i, int64_t b, int64_t e,
                            const coef_float *k, const int count_only) {
    const adopt_cpu_args *a = &sa->base;
    const int64_t numel = a->numel[i];
    const int fmt8 = sa->format == ADOPT_STATE_8BIT;
    const int wide = a->dtype == ADOPT_F32;
    const int sr = sa->param_sr != 0;
    const size_t msize = fmt8 ? 1 : 2;
    float p_buf[ADOPT_STATE_BLOCK], g_buf[ADOPT_STATE_BLOCK];
    block_args c;
    c.k = k;
    c.clip = (float)ti->clip;
    c.w = ti->weight;
    c.first = ti->first;
    c.caution = a->caution != 0;
    c.nesterov = a->nesterov != 0;
    c.l2_on = a->weight_decay != 0.0 && !a->decouple;
    const int plain = !c.first && !c.caution && !c.nesterov && !c.l2_on;
    uint32_t (*const worker)(const block_args *) =
        count_only ? (fmt8 ? block_count_8bit : block_count_bf16)
        : plain    ? (fmt8 ? block_plain_8bit : block_plain_bf16)
                   : (fmt8 ? block_step_8bit : block_step_bf16);
    uint32_t (*const whole)(const block_args *) = !count_only && plain ? whole_block_worker(fmt8) : worker;
    int64_t kept = 0;
    for (int64_t blk = b; blk < e; blk++) {
        const int64_t j0 = blk * ADOPT_STATE_BLOCK;
        const int64_t n = numel - j0 < ADOPT_STATE_BLOCK ? numel - j0 : ADOPT_STATE_BLOCK;
        /* Blocks never cross a multiple of 2^33 elements: the pair index's high part is per block. */
        const uint32_t hi = pair_high(j0);
        c.n = n;
        c.start = j0;
        c.mk = ti->mkey ^ hi;
        c.vk = ti->vkey ^ hi;
        c.m = (char *)a->m[i] + (size_t)j0 * msize;
        c.v = (char *)a->v[i] + (size_t)j0 * msize;
        c.m_scale = fmt8 ? sa->m_scale[i] + blk : NULL;
        c.v_scale = fmt8 ? sa->v_scale[i] + blk : NULL;
        if (wide) {
            c.p_in = (const float *)a->p[i] + j0;
            c.g_in = (const float *)a->g[i] + j0;
            c.p_out = (float *)a->p[i] + j0;
        } else {
            const uint16_t *ph = (const uint16_t *)a->p[i] + j0, *gh = (const uint16_t *)a->g[i] + j0;
            if (a->dtype == ADOPT_BF16) {
                widen_bf16(ph, p_buf, n);
                widen_bf16(gh, g_buf, n);
            } else {
                widen_f16(ph, p_buf, n);
                widen_f16(gh, g_buf, n);
            }
            c.p_in = p_buf;
            c.g_in = g_buf;
            c.p_out = p_buf;
        }
        kept += (n == ADOPT_STATE_BLOCK ? whole : worker)(&c);
        if (count_only || wide || ti->first) continue;
        uint16_t *ph = (uint16_t *)a->p[i] + j0;
        if (a->dtype == ADOPT_BF16) narrow_bf16(p_buf, ph, n, sr, ti->pkey ^ hi, j0);
        else narrow_f16(p_buf, ph, n, sr, ti->pkey ^ hi, j0);
    }
    return kept;
}

/* Blocks [lo, hi) of the call's block index space. */
static void state_range(const adopt_state_args *sa, state_info *info, int64_t lo, int64_t hi, const int count_only) {
    const adopt_cpu_args *a = &sa->base;
    const int64_t n = a->n_tensors;
    coef_double kd;
    coef_float kf;
    step_coefs(a, &kd, &kf);
    int64_t left = 0, right = n - 1;
    while (left < right) {
        const int64_t mid = left + (right - left + 1) / 2;
        if (info[mid].offset <= lo) left = mid;
        else right = mid - 1;
    }
    for (int64_t i = left; i < n && info[i].offset < hi; i++) {
        const int64_t start = info[i].offset, stop = info[i + 1].offset;
        const int64_t b = (lo > start ? lo : start) - start;
        const int64_t e = (hi < stop ? hi : stop) - start;
        if (e <= b || (count_only && info[i].first)) continue;
        const int64_t kept = state_blocks(sa, &info[i], i, b, e, &kf, count_only);
        if (count_only) {
            _Pragma("omp atomic")
            info[i].kept += kept;
        }
    }
}

static void state_step_range(const adopt_state_args *sa, state_info *info, int64_t lo, int64_t hi) {
    state_range(sa, info, lo, hi, 0);
}

static void state_count_range(const adopt_state_args *sa, state_info *info, int64_t lo, int64_t hi) {
    state_range(sa, info, lo, hi, 1);
}

static void state_caution_weights(const adopt_state_args *sa, state_info *info) {
    for (int64_t i = 0; i < sa->base.n_tensors; i++) {
        if (info[i].first) continue;
        const float kept = (float)info[i].kept / (float)sa->base.numel[i];
        info[i].weight = 1.0f / (kept < 1e-3f ? 1e-3f : kept);
    }
}

int adopt_cpu_state_step(const adopt_state_args *sa) {
    const adopt_cpu_args *a = &sa->base;
    const int64_t n = a->n_tensors;
    if (n <= 0) return 0;
    if (a->found_inf != NULL && *a->found_inf != 0.0f) return 0;
    if (a->dtype == ADOPT_F64 || a->seed == NULL) return -1;
    state_info *info = (state_info *)malloc((size_t)(n + 1) * sizeof *info);
    if (info == NULL) return -1;
    int64_t blocks = 0, total = 0;
    float last_s = -1.0f;
    double last_c = 0.0;
    const int sr = sa->param_sr != 0 && (a->dtype == ADOPT_F16 || a->dtype == ADOPT_BF16);
    for (int64_t i = 0; i < n; i++) {
        const float s = *a->step[i];
        const uint32_t su = (uint32_t)s;
        const int64_t seed = *a->seed[i];
        info[i].offset = blocks;
        info[i].first = s == 0.0f;
        info[i].pkey = sr ? param_key(seed, su) : 0u;
        info[i].mkey = stream_key(seed, ADOPT_STREAM_EXP_AVG, su);
        info[i].vkey = stream_key(seed, ADOPT_STREAM_EXP_AVG_SQ, su);
        info[i].kept = 0;
        info[i].weight = 0.0f;
        switch (a->clip_mode) {
        case ADOPT_CLIP_TABLE: info[i].clip = a->clip_table[i]; break;
        case ADOPT_CLIP_POWER:
            if (s != last_s) {
                last_s = s;
                last_c = pow((double)s, a->clip_exponent);
            }
            info[i].clip = last_c;
            break;
        default: info[i].clip = INFINITY; break;
        }
        blocks += (a->numel[i] + ADOPT_STATE_BLOCK - 1) / ADOPT_STATE_BLOCK;
        total += a->numel[i];
    }
    memset(&info[n], 0, sizeof info[n]);
    info[n].offset = blocks;
    info[n].clip = INFINITY;

    (void)adopt_cpu_avx512_available(); /* the CPU check, once, before any thread reads it */
    int nt = threads_for(total, a->num_threads);
#ifdef _OPENMP
    if (nt > ADOPT_MAX_TEAM) nt = ADOPT_MAX_TEAM;
    if (nt > 1 && contended_now()) nt = 1;
#endif
    if (nt > 1) {
#ifdef _OPENMP
        double started[ADOPT_MAX_TEAM];
        const double call_start = omp_get_wtime();
        int team = 1;
#pragma omp parallel num_threads(nt)
        {
            const int64_t cnt = omp_get_num_threads(), tid = omp_get_thread_num();
            started[tid] = omp_get_wtime();
            if (tid == 0) team = (int)cnt;
            const int64_t chunk = (blocks + cnt - 1) / cnt;
            const int64_t lo = tid * chunk < blocks ? tid * chunk : blocks;
            const int64_t hi = lo + chunk < blocks ? lo + chunk : blocks;
            if (a->caution) { /* the same condition in every thread: all reach the barriers */
                if (lo < hi) state_count_range(sa, info, lo, hi);
#pragma omp barrier
#pragma omp single
                state_caution_weights(sa, info);
            }
            if (lo < hi) state_step_range(sa, info, lo, hi);
        }
        double latest = call_start;
        for (int t = 0; t < team; t++) latest = started[t] > latest ? started[t] : latest;
        if (latest - call_start > ADOPT_LATE_START) {
#pragma omp atomic write
            serial_until = omp_get_wtime() + ADOPT_SERIAL_PERIOD;
        }
#endif
    } else {
        if (a->caution) {
            state_count_range(sa, info, 0, blocks);
            state_caution_weights(sa, info);
        }
        state_step_range(sa, info, 0, blocks);
    }
    for (int64_t i = 0; i < n; i++) *a->step[i] += 1.0f;
    free(info);
    return 0;
}
