/* Few-row bf16 matrix products for CPU decode: y[M, N] = x[M, K] @ w[N, K]^T, M small (1-16).
 *
 * Decoding reads every weight once per step for one or a few rows, so the speed is how fast the
 * weights stream from memory. PyTorch's CPU bf16 kernel for this shape converts as it goes at
 * about half the bandwidth its fp32 kernel reaches; this one streams bf16 weights at the fp32
 * kernel's rate, i.e. twice the weights per second.
 *
 * Math: every product of two bf16 values is exact in fp32 and is accumulated in fp32; the output
 * is rounded once to bf16 (round to nearest even) as PyTorch's kernel does. Only the summation
 * order differs. With AVX512_BF16 the pairs go through VDPBF16PS (which flushes bf16 subnormals to
 * zero, as do most bf16 GEMM kernels); with AVX-512F only, bf16 is widened to fp32 and FMA'd; else
 * portable C.
 *
 * Built at first use by moecoder.kernels (cpu.py) with the system C compiler (-O3 -march=native)
 * and called through ctypes; strides are in elements and the innermost dimension is contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

#ifndef PF_BLOCKS
#define PF_BLOCKS 1 /* software prefetch distance, in blocks */
#endif
#define ACC 16 /* accumulators per block: rows x weight rows = 1 x 16, 2 x 8 or 4 x 4 */

#if defined(__AVX512F__)
/* out[j] = sum of the 16 lanes of v[j], j < 16: a transpose-and-add tree, 45 instructions for all
 * 16 sums where 16 separate horizontal reductions take about three times as many. */
static inline void reduce16(const __m512 *v, float *out) {
    __m512 s[8], u[4], w[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], a = v[2i], b = v[2i+1] */
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per lane: that lane's partial sums of v[4i..4i+3] */
        __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++) /* lanes: u[2i] lanes 0+1, 2+3, then u[2i+1]'s */
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
    /* lane j: the sums of v[4j..4j+3] */
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd)));
}
#endif

#if defined(__AVX512BF16__)
#define STEP 32 /* bf16 pairs per VDPBF16PS */
typedef __m512bh vec_t;
static inline vec_t load(const uint16_t *p, int64_t n) { /* n < STEP: zero-filled tail */
    return (vec_t)(n >= STEP ? _mm512_loadu_si512((const void *)p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p));
}
static inline __m512 fma_bf16(__m512 acc, vec_t a, vec_t b) { return _mm512_dpbf16_ps(acc, a, b); }
#elif defined(__AVX512F__)
#define STEP 16 /* bf16 widened to fp32 (a shift), then FMA */
typedef __m512 vec_t;
static inline vec_t load(const uint16_t *p, int64_t n) {
    __m256i h = _mm256_maskz_loadu_epi16(n >= STEP ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 fma_bf16(__m512 acc, vec_t a, vec_t b) { return _mm512_fmadd_ps(a, b, acc); }
#endif

#if defined(__AVX512F__)
/* out[m * NBW + n] = dot(x[m], w[n]) for MBX x rows and NBW weight rows (MBX * NBW == ACC). The
 * bounds are constants after inlining, so every accumulator lives in a register; each weight
 * vector is loaded once and used for every x row. */
static inline __attribute__((always_inline)) void block(const uint16_t *const *x, const uint16_t *const *w, int64_t K,
                                                        int64_t pf, float *out, const int MBX, const int NBW) {
    __m512 acc[ACC];
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += STEP) {
        vec_t wv[ACC];
        for (int n = 0; n < NBW; n++) {
            /* The next block's rows, PF_BLOCKS ahead: weights that are not in cache arrive in time. */
            _mm_prefetch((const char *)(w[n] + k + pf), _MM_HINT_T0);
            wv[n] = load(w[n] + k, K - k);
        }
        for (int m = 0; m < MBX; m++) {
            vec_t xv = load(x[m] + k, K - k);
            for (int n = 0; n < NBW; n++) acc[m * NBW + n] = fma_bf16(acc[m * NBW + n], xv, wv[n]);
        }
    }
    reduce16(acc, out);
}
#else
static inline void block(const uint16_t *const *x, const uint16_t *const *w, int64_t K, int64_t pf, float *out,
                         const int MBX, const int NBW) {
    (void)pf;
    for (int m = 0; m < MBX; m++)
        for (int n = 0; n < NBW; n++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += bf16_to_f32(x[m][k]) * bf16_to_f32(w[n][k]);
            out[m * NBW + n] = s;
        }
}
#endif

/* One pass over all N weight rows for rows m0..m0+mb-1 of x, MBX x rows at a time (mb <= MBX: a
 * partial block repeats its last row, computed but not stored, so the bounds stay constant). */
static inline __attribute__((always_inline)) void pass(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t ldw,
                                                       const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t mb,
                                                       int64_t N, int64_t K, const int MBX, const int NBW) {
    float out[ACC];
    const uint16_t *xr[ACC], *wr[ACC];
    for (int m = 0; m < MBX; m++) xr[m] = x + (m < mb ? m : mb - 1) * ldx;
    for (int64_t n0 = 0; n0 < N; n0 += NBW) {
        int nb = N - n0 < NBW ? (int)(N - n0) : NBW;
        for (int n = 0; n < NBW; n++) wr[n] = w + (n0 + (n < nb ? n : nb - 1)) * ldw;
        /* prefetch distance in elements: PF_BLOCKS blocks of NBW rows ahead, within the matrix */
        int64_t pf = n0 + (PF_BLOCKS + 1) * NBW <= N ? PF_BLOCKS * NBW * ldw : 0;
        block(xr, wr, K, pf, out, MBX, NBW);
        for (int m = 0; m < mb; m++)
            for (int n = 0; n < nb; n++) {
                float v = out[m * NBW + n];
                if (bias) v += bf16_to_f32(bias[n0 + n]);
                y[m * ldy + n0 + n] = f32_to_bf16(v);
            }
    }
}

/* y[m, n] = bf16(sum_k x[m, k] * w[n, k] (+ bias[n])); bias may be NULL. The weights are streamed
 * once per group of up to 4 x rows (1 row: 16 weight rows per block, 2: 8, 3-4: 4). */
void mc_gemm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t ldw, const uint16_t *bias, uint16_t *y,
                  int64_t ldy, int64_t M, int64_t N, int64_t K) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int64_t mb = M - m0 < 4 ? M - m0 : 4;
        const uint16_t *xm = x + m0 * ldx;
        uint16_t *ym = y + m0 * ldy;
        if (mb == 1)
            pass(xm, ldx, w, ldw, bias, ym, ldy, 1, N, K, 1, 16);
        else if (mb == 2)
            pass(xm, ldx, w, ldw, bias, ym, ldy, 2, N, K, 2, 8);
        else
            pass(xm, ldx, w, ldw, bias, ym, ldy, mb, N, K, 4, 4);
    }
}

static inline uint16_t bf16_mul(uint16_t a, uint16_t b) { return f32_to_bf16(bf16_to_f32(a) * bf16_to_f32(b)); }

/* A few tokens' routed SwiGLU experts, read in place, in one call (a decode step's MoE layer):
 *   out[n] = sum_k wts[n, k] * (w2[e] @ (silu(gate) * up)),  gate | up = w13[e] @ x[n],  e = ids[n, k]
 * with the bf16 roundings of the PyTorch ops it replaces: each product, silu, silu * up, the
 * weighting and each partial sum are rounded to bf16. w13 [E, 2F, C] (gate rows, then up rows),
 * w2 [E, C, F], wts bf16 [N, K]; scratch holds 3F + C bf16 values. Returns -1 (and computes nothing) if
 * an expert id is outside 0..E-1, else 0. */
int mc_moe_swiglu_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w13, const uint16_t *w2, const int64_t *ids,
                       const uint16_t *wts, uint16_t *out, int64_t ldo, int64_t N, int64_t K, int64_t C, int64_t F,
                       int64_t E, uint16_t *scratch) {
    uint16_t *h = scratch, *a = scratch + 2 * F, *y = scratch + 3 * F;
    for (int64_t i = 0; i < N * K; i++)
        if (ids[i] < 0 || ids[i] >= E) return -1; /* an expert id out of range: nothing is read */
    for (int64_t n = 0; n < N; n++) {
        uint16_t *o = out + n * ldo;
        for (int64_t k = 0; k < K; k++) {
            int64_t e = ids[n * K + k];
            mc_gemm_bf16(x + n * ldx, ldx, w13 + e * 2 * F * C, C, NULL, h, 2 * F, 1, 2 * F, C);
            for (int64_t f = 0; f < F; f++) {
                float g = bf16_to_f32(h[f]);
                a[f] = bf16_mul(f32_to_bf16(g / (1.0f + expf(-g))), h[F + f]);
            }
            mc_gemm_bf16(a, F, w2 + e * C * F, F, NULL, y, C, 1, C, F);
            uint16_t wt = wts[n * K + k];
            for (int64_t c = 0; c < C; c++) {
                uint16_t v = bf16_mul(y[c], wt);
                o[c] = k == 0 ? v : f32_to_bf16(bf16_to_f32(o[c]) + bf16_to_f32(v));
            }
        }
    }
    return 0;
}

/* Which code path this build took (for logs and tests). */
const char *mc_gemm_bf16_isa(void) {
#if defined(__AVX512BF16__)
    return "avx512_bf16";
#elif defined(__AVX512F__)
    return "avx512f";
#else
    return "portable";
#endif
}
