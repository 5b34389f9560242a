/*
 * AVX-512 versions of the common low-memory-state step of one whole block (included by
 * adopt_cpu.c after state_block; x86-64 with GCC or Clang).
 *
 * The common ("plain") step: not a tensor's first step, no caution, Nesterov or L2 decay,
 * a block of exactly ADOPT_STATE_BLOCK elements (every block but a tensor's last, shorter
 * one). state_block computes it with loops that GCC vectorises; these do the same
 * operations on the same values in the same order, 16 elements per instruction, so the
 * parameters, codes and scales are the same bits (tests/test_fused_state_cpu.py checks
 * both against its reference and against each other on extreme blocks). What they save is
 * instructions, which is what the step is bound by on the CPUs measured (BENCHMARKS.md):
 * the draws are hashed 16 words at a time straight into registers (no buffer), the codes
 * decoded and encoded with masks instead of selects, and the signed code's subnormal range
 * rounded as (floor(X * 2^16) + draw) >> 16 on the exact float32 X = |m| * 2^(130 - o) (one
 * conversion instead of a whole part and a fraction). A block whose m or u is all zero or
 * not finite (codes 0) is encoded by adopt_cpu.c's encode_codes.
 */
#include <immintrin.h>

#define ADOPT_AVX512 __attribute__((target("avx512f,avx512bw")))
#define ADOPT_AVX512_INLINE static inline __attribute__((target("avx512f,avx512bw"), always_inline))

/* mix32 of 16 words. */
ADOPT_AVX512_INLINE __m512i mix32_x16(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x7FEB352Du));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68Bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* The draws of both moments, 16 elements at a time from an even first element: lanes 0-7
 * hash the eight pairs under m's key, lanes 8-15 the same pairs under v's (draws_of). */
typedef struct {
    __m512i pair_g, keys;
} draws_x16;

ADOPT_AVX512_INLINE draws_x16 draws_x16_start(const block_args *c) {
    const __m512i lane = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i first = _mm512_set1_epi32((int)(uint32_t)((uint64_t)c->start >> 1));
    draws_x16 d;
    d.pair_g = _mm512_mullo_epi32(_mm512_add_epi32(lane, first), _mm512_set1_epi32((int)ADOPT_GOLDEN));
    d.keys = _mm512_inserti64x4(_mm512_set1_epi32((int)c->mk), _mm256_set1_epi32((int)c->vk), 1);
    return d;
}

/* The next 16 elements' m and v draws (zero-extended 16-bit values). */
ADOPT_AVX512_INLINE void draws_x16_next(draws_x16 *d, __m512i *m_draw, __m512i *v_draw) {
    const __m512i w = mix32_x16(_mm512_xor_si512(d->pair_g, d->keys));
    d->pair_g = _mm512_add_epi32(d->pair_g, _mm512_set1_epi32((int)(8u * ADOPT_GOLDEN)));
    /* Little-endian: the low half of pair k's word is element 2k's draw. */
    const __m512i m_idx = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i v_idx = _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16);
    *m_draw = _mm512_maskz_permutexvar_epi16(0x55555555u, m_idx, w);
    *v_draw = _mm512_maskz_permutexvar_epi16(0x55555555u, v_idx, w);
}

/* The block's coefficients, broadcast. */
typedef struct {
    __m512 gs, decay, lr, b1c, b2, b2c, eps, clip, neg_clip;
} coefs_x16;

ADOPT_AVX512_INLINE coefs_x16 coefs_x16_of(const block_args *c) {
    const coef_float *k = c->k;
    coefs_x16 r;
    r.gs = _mm512_set1_ps(k->gscale);
    r.decay = _mm512_set1_ps(k->decay);
    r.lr = _mm512_set1_ps(k->lr);
    r.b1c = _mm512_set1_ps(k->b1c);
    r.b2 = _mm512_set1_ps(k->b2);
    r.b2c = _mm512_set1_ps(k->b2c);
    r.eps = _mm512_set1_ps(k->eps);
    r.clip = _mm512_set1_ps(c->clip);
    r.neg_clip = _mm512_set1_ps(-c->clip);
    return r;
}

/* The rule on 16 elements, as state_block's loop (plain): the new m and v, p written.
 * max/min with the operands in this order are the loop's selects, NaN included. */
ADOPT_AVX512_INLINE void rule_x16(const coefs_x16 *k, const float *p_in, const float *g_in, float *p_out, __m512 mi,
                                  __m512 vi, __m512 d, __m512 *mn, __m512 *vn) {
    const __m512 pi = _mm512_loadu_ps(p_in);
    const __m512 gi = _mm512_mul_ps(_mm512_loadu_ps(g_in), k->gs);
    d = _mm512_max_ps(k->eps, d);
    __m512 nrm = _mm512_div_ps(gi, d);
    nrm = _mm512_min_ps(k->clip, _mm512_max_ps(k->neg_clip, nrm));
    *mn = _mm512_add_ps(mi, _mm512_mul_ps(k->b1c, _mm512_sub_ps(nrm, mi)));
    _mm512_storeu_ps(p_out, _mm512_sub_ps(_mm512_mul_ps(pi, k->decay), _mm512_mul_ps(k->lr, *mn)));
    *vn = _mm512_add_ps(_mm512_mul_ps(k->b2, vi), _mm512_mul_ps(k->b2c, _mm512_mul_ps(gi, gi)));
}

/* 16 m codes at scale 1 (dec_m8): bits 19-25 of the sign-extended code are q, bit 31 its
 * sign; the subnormal range (e == 0) is decoded as the normal value of q + 16 minus 2^-6. */
ADOPT_AVX512_INLINE __m512 dec_m8_x16(const uint8_t *src) {
    const __m512i t = _mm512_slli_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)), 19);
    const __mmask16 sub = _mm512_testn_epi32_mask(t, _mm512_set1_epi32(0x03800000));
    __m512i mag = _mm512_add_epi32(_mm512_and_si512(t, _mm512_set1_epi32(0x03F80000)), _mm512_set1_epi32(120 << 23));
    mag = _mm512_mask_add_epi32(mag, sub, mag, _mm512_set1_epi32(1 << 23));
    const __m512 f = _mm512_mask_sub_ps(_mm512_castsi512_ps(mag), sub, _mm512_castsi512_ps(mag), _mm512_set1_ps(0x1p-6f));
    /* f | (t & sign bit) */
    return _mm512_castsi512_ps(
        _mm512_ternarylogic_epi32(_mm512_castps_si512(f), t, _mm512_set1_epi32((int)0x80000000u), 0xF8));
}

/* 16 u codes at scale 1 (dec_u8). */
ADOPT_AVX512_INLINE __m512 dec_u8_x16(const uint8_t *src) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)src));
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(c, 19), _mm512_set1_epi32(112 << 23)));
}

/* The 8-bit block's first pass: decode, the rule, p written, the new m and u = sqrt(v)
 * kept with their largest magnitudes' bits. `squares_overflow`: whether a decoded u can
 * square to infinity (then d is infinity there, as sqrtf(u * u) is); a constant at both
 * call sites. */
ADOPT_AVX512_INLINE void pass_8bit_x16(const block_args *c, float *restrict m_new, float *restrict u_new,
                                       uint32_t *m_max, uint32_t *u_max, const int squares_overflow) {
    const coefs_x16 k = coefs_x16_of(c);
    const uint8_t *mc = (const uint8_t *)c->m, *vc = (const uint8_t *)c->v;
    const __m512 ms = _mm512_set1_ps(*c->m_scale), vs = _mm512_set1_ps(*c->v_scale);
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i am = _mm512_setzero_si512(), au = _mm512_setzero_si512();
    for (int j = 0; j < ADOPT_STATE_BLOCK; j += 16) {
        const __m512 mi = _mm512_mul_ps(dec_m8_x16(mc + j), ms);
        const __m512 uo = _mm512_mul_ps(dec_u8_x16(vc + j), vs);
        const __m512 vi = _mm512_mul_ps(uo, uo);
        const __m512 d = squares_overflow
                             ? _mm512_mask_mov_ps(uo, _mm512_cmp_ps_mask(vi, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ),
                                                  _mm512_set1_ps(INFINITY))
                             : uo;
        __m512 mn, vn;
        rule_x16(&k, c->p_in + j, c->g_in + j, c->p_out + j, mi, vi, d, &mn, &vn);
        const __m512 u = _mm512_sqrt_ps(vn);
        _mm512_store_ps(m_new + j, mn);
        _mm512_store_ps(u_new + j, u);
        am = _mm512_max_epu32(am, _mm512_and_si512(_mm512_castps_si512(mn), magnitude));
        au = _mm512_max_epu32(au, _mm512_castps_si512(u)); /* u >= +0 or NaN (which stays above inf) */
    }
    *m_max = (uint32_t)_mm512_reduce_max_epu32(am);
    *u_max = (uint32_t)_mm512_reduce_max_epu32(au);
}

/* state_block(c, 1, 0, 1) for a whole block. */
ADOPT_AVX512 static uint32_t block_plain_8bit_avx512(const block_args *c) {
    float m_new[ADOPT_STATE_BLOCK] __attribute__((aligned(64)));
    float u_new[ADOPT_STATE_BLOCK] __attribute__((aligned(64)));
    uint32_t am, au;
    /* A decoded u is below 2 * scale: its square is finite while the scale is <= 2^62. */
    if (*c->v_scale <= 0x1p62f) pass_8bit_x16(c, m_new, u_new, &am, &au, 0);
    else pass_8bit_x16(c, m_new, u_new, &am, &au, 1);
    uint8_t *restrict mc = (uint8_t *)c->m;
    uint8_t *restrict vc = (uint8_t *)c->v;
    uint32_t fm, fu;
    *c->m_scale = state_scale(am, 11u, &fm);
    *c->v_scale = state_scale(au, 79u, &fu);
    if (fm == 0 || fu == 0) { /* an all-zero or non-finite moment: as state_block encodes it */
        uint16_t m_buf[ADOPT_STATE_BLOCK + 2], v_buf[ADOPT_STATE_BLOCK + 2];
        encode_codes(mc, vc, m_new, u_new, draws_of(m_buf, c->mk, c->start, ADOPT_STATE_BLOCK),
                     draws_of(v_buf, c->vk, c->start, ADOPT_STATE_BLOCK), ADOPT_STATE_BLOCK, fm, fu);
        return 0;
    }
    /* Every value is finite here. enc_m8 and enc_u8 with r = draw << 16, rearranged:
     * ((A + (r >> 13)) >> 19) == ((A >> 3) + draw) >> 16 (exactly: draw is an integer), and
     * the subnormal range's floor(X + r / 2^32) == (floor(X * 2^16) + draw) >> 16. */
    const int32_t om = (int32_t)fm - 7, ou = (int32_t)fu - 15;
    const __m512i m_normal_at = _mm512_set1_epi32((om + 1) << 23);                  /* e >= 1 */
    const __m512i m_kept_at = _mm512_set1_epi32((om - 12 <= 1 ? 0 : om - 12) << 23); /* d <= 32 */
    const __m512i m_offset = _mm512_set1_epi32(om << 20), u_offset = _mm512_set1_epi32(ou << 4);
    const __m512 to_sub = _mm512_castsi512_ps(_mm512_set1_epi32((257 - om) << 23)); /* 2^(130 - o) */
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    draws_x16 draws = draws_x16_start(c);
    for (int j = 0; j < ADOPT_STATE_BLOCK; j += 16) {
        __m512i dm, dv;
        draws_x16_next(&draws, &dm, &dv);
        const __m512i x = _mm512_load_si512((const void *)(m_new + j));
        const __m512i a = _mm512_and_si512(x, magnitude);
        const __mmask16 normal = _mm512_cmpge_epu32_mask(a, m_normal_at);
        const __mmask16 kept = _mm512_cmpge_epu32_mask(a, m_kept_at);
        const __m512 xs = _mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(a), to_sub), _mm512_set1_ps(0x1p16f));
        __m512i y = _mm512_maskz_mov_epi32(kept, _mm512_cvttps_epu32(xs));
        y = _mm512_mask_mov_epi32(y, normal, _mm512_sub_epi32(_mm512_srli_epi32(a, 3), m_offset));
        __m512i qm = _mm512_min_epu32(_mm512_srli_epi32(_mm512_add_epi32(y, dm), 16), _mm512_set1_epi32(127));
        qm = _mm512_ternarylogic_epi32(qm, _mm512_srli_epi32(x, 24), _mm512_set1_epi32(0x80), 0xF8); /* | sign << 7 */
        _mm_storeu_si128((__m128i *)(mc + j), _mm512_cvtepi32_epi8(qm));
        const __m512i ua = _mm512_load_si512((const void *)(u_new + j)); /* u >= +0 */
        __m512i qu = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(_mm512_srli_epi32(ua, 3), dv), 16), u_offset);
        qu = _mm512_max_epi32(qu, _mm512_setzero_si512());
        _mm_storeu_si128((__m128i *)(vc + j), _mm512_cvtusepi32_epi8(qu)); /* min(q, 255) */
    }
    return 0;
}

/* bf16_store_sr of 16 values. */
ADOPT_AVX512_INLINE __m256i bf16_sr_x16(__m512 x, __m512i draw) {
    const __m512i u = _mm512_castps_si512(x);
    const __mmask16 nan =
        _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    const __m512i up = _mm512_srli_epi32(_mm512_add_epi32(u, draw), 16);
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(up, nan, _mm512_set1_epi32(0x7FC0)));
}

ADOPT_AVX512_INLINE __m512 bf16_load_x16(const uint16_t *src) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}

/* state_block(c, 0, 0, 1) for a whole block. */
ADOPT_AVX512 static uint32_t block_plain_bf16_avx512(const block_args *c) {
    const coefs_x16 k = coefs_x16_of(c);
    uint16_t *mb = (uint16_t *)c->m, *vb = (uint16_t *)c->v;
    draws_x16 draws = draws_x16_start(c);
    for (int j = 0; j < ADOPT_STATE_BLOCK; j += 16) {
        const __m512 mi = bf16_load_x16(mb + j), vi = bf16_load_x16(vb + j);
        __m512 mn, vn;
        rule_x16(&k, c->p_in + j, c->g_in + j, c->p_out + j, mi, vi, _mm512_sqrt_ps(vi), &mn, &vn);
        __m512i dm, dv;
        draws_x16_next(&draws, &dm, &dv);
        _mm256_storeu_si256((__m256i *)(mb + j), bf16_sr_x16(mn, dm));
        _mm256_storeu_si256((__m256i *)(vb + j), bf16_sr_x16(vn, dv));
    }
    return 0;
}

/* Whether this CPU (and its OS) runs AVX-512F and AVX-512BW code. */
static int avx512_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
