/* Few-row matrix products for CPU decode, bf16 and fp32: y[M, N] = x[M, K] @ w[N, K]^T, M small
 * (1-16), and a decode step's routed SwiGLU experts in one call.
 *
 * Decoding reads every weight once per step for one or a few rows, so the speed is how fast the
 * weights stream from memory. PyTorch's CPU bf16 kernel for this shape converts as it goes at
 * about half the bandwidth its fp32 kernel reaches; this one streams bf16 weights at the fp32
 * kernel's rate, i.e. twice the weights per second. For a batched decode step's experts (a few
 * rows each for most experts) the fused call replaces about ten PyTorch ops per expert segment
 * and the sort, gather and scatter around them.
 *
 * Math (bf16): every product of two bf16 values is exact in fp32 and is accumulated in fp32; the
 * output is rounded once to bf16 (round to nearest even) as PyTorch's kernel does. Only the
 * summation order differs. With AVX512_BF16 the pairs go through VDPBF16PS (which flushes bf16
 * subnormals to zero, as do most bf16 GEMM kernels); with AVX-512F only, bf16 is widened to fp32
 * and FMA'd; else portable C. fp32 is FMA'd in fp32 (AVX-512F) or plain C.
 *
 * Built at first use by moecoder.kernels (cpu.py) with the system C compiler (-O3 -march=native)
 * and called through ctypes; strides are in elements and the innermost dimension is contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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
#define ACC 16 /* accumulators per block: rows x weight rows = 1 x 16, 2 x 8, 4 x 4 or 8 x 2 */

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
static inline __m512 load_f32(const float *p, int64_t n) { /* n < 16: zero-filled tail */
    return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}

/* out[m * NBW + n] = dot(x[m], w[n]) for MBX x rows and NBW weight rows (MBX * NBW == ACC). The
 * bounds are constants after inlining, so every accumulator lives in a register; each weight
 * vector is loaded once and used for every x row. One cache line of each weight row per step. */
#define DEFINE_BLOCK(NAME, T, STEP_, VEC, LOAD, FMA)                                                                    \
    /* One step along K: n_left >= STEP_ (a constant after inlining) loads whole vectors, unchecked. */             \
    static inline __attribute__((always_inline)) void NAME##_step(const T *const *x, const T *const *w, int64_t k,    \
                                                                  int64_t n_left, int64_t pf, __m512 *acc,          \
                                                                  const int MBX, const int NBW) {                   \
        VEC wv[ACC];                                                                                                   \
        for (int n = 0; n < NBW; n++) {                                                                                \
            /* The next block's rows, PF_BLOCKS ahead: weights that are not in cache arrive in time. */                \
            _mm_prefetch((const char *)(w[n] + k + pf), _MM_HINT_T0);                                                  \
            wv[n] = LOAD(w[n] + k, n_left);                                                                            \
        }                                                                                                              \
        for (int m = 0; m < MBX; m++) {                                                                                \
            VEC xv = LOAD(x[m] + k, n_left);                                                                           \
            for (int n = 0; n < NBW; n++) acc[m * NBW + n] = FMA(acc[m * NBW + n], xv, wv[n]);                         \
        }                                                                                                              \
    }                                                                                                                  \
    static inline __attribute__((always_inline)) void NAME(const T *const *x, const T *const *w, int64_t K,           \
                                                           int64_t pf, float *out, const int MBX, const int NBW) {    \
        __m512 acc[ACC];                                                                                               \
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_setzero_ps();                                                    \
        int64_t k = 0;                                                                                                 \
        for (; k + STEP_ <= K; k += STEP_) NAME##_step(x, w, k, STEP_, pf, acc, MBX, NBW);                             \
        if (k < K) NAME##_step(x, w, k, K - k, pf, acc, MBX, NBW); /* the tail, zero-filled */                         \
        reduce16(acc, out);                                                                                            \
    }
static inline __m512 fma_f32(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
DEFINE_BLOCK(block_bf16, uint16_t, STEP, vec_t, load, fma_bf16)
DEFINE_BLOCK(block_f32, float, 16, __m512, load_f32, fma_f32)
#else
#define DEFINE_BLOCK(NAME, T, TO_F32)                                                                                  \
    static inline void NAME(const T *const *x, const T *const *w, int64_t K, int64_t pf, float *out, const int MBX,    \
                            const int NBW) {                                                                           \
        (void)pf;                                                                                                      \
        for (int m = 0; m < MBX; m++)                                                                                  \
            for (int n = 0; n < NBW; n++) {                                                                            \
                float s = 0.0f;                                                                                        \
                for (int64_t k = 0; k < K; k++) s += TO_F32(x[m][k]) * TO_F32(w[n][k]);                                \
                out[m * NBW + n] = s;                                                                                  \
            }                                                                                                          \
    }
static inline float f32_id(float f) { return f; }
DEFINE_BLOCK(block_bf16, uint16_t, bf16_to_f32)
DEFINE_BLOCK(block_f32, float, f32_id)
#endif

static inline float f32_to_f32(float f) { return f; }

/* y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), rounded to T once; bias may be NULL. The weights
 * are streamed once per group of up to 8 x rows (1 row: 16 weight rows per block, 2: 8, 3-4: 4,
 * 5-8: 2).
 * Within a group a partial block repeats its last row, computed but not stored, so the bounds
 * stay constant. */
#define DEFINE_GEMM(SUFFIX, T, BLOCK, TO_F32, FROM_F32)                                                                \
    static inline __attribute__((always_inline)) void pass_##SUFFIX(                                                   \
        const T *x, int64_t ldx, const T *w, int64_t ldw, const T *bias, T *y, int64_t ldy, int64_t mb, int64_t N,     \
        int64_t K, const int MBX, const int NBW) {                                                                     \
        float out[ACC];                                                                                                \
        const T *xr[ACC], *wr[ACC];                                                                                    \
        for (int m = 0; m < MBX; m++) xr[m] = x + (m < mb ? m : mb - 1) * ldx;                                         \
        for (int64_t n0 = 0; n0 < N; n0 += NBW) {                                                                      \
            int nb = N - n0 < NBW ? (int)(N - n0) : NBW;                                                               \
            for (int n = 0; n < NBW; n++) wr[n] = w + (n0 + (n < nb ? n : nb - 1)) * ldw;                              \
            /* prefetch distance in elements: PF_BLOCKS blocks of NBW rows ahead, within the matrix */                 \
            int64_t pf = n0 + (PF_BLOCKS + 1) * NBW <= N ? PF_BLOCKS * NBW * ldw : 0;                                  \
            BLOCK(xr, wr, K, pf, out, MBX, NBW);                                                                       \
            for (int m = 0; m < mb; m++)                                                                               \
                for (int n = 0; n < nb; n++) {                                                                         \
                    float v = out[m * NBW + n];                                                                        \
                    if (bias) v += TO_F32(bias[n0 + n]);                                                               \
                    y[m * ldy + n0 + n] = FROM_F32(v);                                                                 \
                }                                                                                                      \
        }                                                                                                              \
    }                                                                                                                  \
    void mc_gemm_##SUFFIX(const T *x, int64_t ldx, const T *w, int64_t ldw, const T *bias, T *y, int64_t ldy,         \
                          int64_t M, int64_t N, int64_t K) {                                                           \
        for (int64_t m0 = 0; m0 < M; m0 += 8) {                                                                        \
            int64_t mb = M - m0 < 8 ? M - m0 : 8;                                                                      \
            const T *xm = x + m0 * ldx;                                                                                \
            T *ym = y + m0 * ldy;                                                                                      \
            if (mb == 1)                                                                                               \
                pass_##SUFFIX(xm, ldx, w, ldw, bias, ym, ldy, 1, N, K, 1, 16);                                         \
            else if (mb == 2)                                                                                          \
                pass_##SUFFIX(xm, ldx, w, ldw, bias, ym, ldy, 2, N, K, 2, 8);                                          \
            else if (mb <= 4)                                                                                          \
                pass_##SUFFIX(xm, ldx, w, ldw, bias, ym, ldy, mb, N, K, 4, 4);                                         \
            else                                                                                                       \
                pass_##SUFFIX(xm, ldx, w, ldw, bias, ym, ldy, mb, N, K, 8, 2);                                         \
        }                                                                                                              \
    }
DEFINE_GEMM(bf16, uint16_t, block_bf16, bf16_to_f32, f32_to_bf16)
DEFINE_GEMM(f32, float, block_f32, f32_to_f32, f32_to_f32)

/* The elementwise steps of a routed expert, with the roundings of the PyTorch ops they replace:
 * in bf16 each op's result (silu, silu * up, the weighting, each partial sum) is rounded to bf16. */
static inline uint16_t bf16_mul(uint16_t a, uint16_t b) { return f32_to_bf16(bf16_to_f32(a) * bf16_to_f32(b)); }
static inline uint16_t bf16_add(uint16_t a, uint16_t b) { return f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b)); }
static inline uint16_t bf16_swiglu(uint16_t gate, uint16_t up) {
    float g = bf16_to_f32(gate);
    return bf16_mul(f32_to_bf16(g / (1.0f + expf(-g))), up);
}
static inline float f32_mul(float a, float b) { return a * b; }
static inline float f32_add(float a, float b) { return a + b; }
static inline float f32_swiglu(float g, float up) { return g / (1.0f + expf(-g)) * up; }

/* The routed SwiGLU experts of a few tokens (a decode step's MoE layer), weights read in place:
 *   out[n] = sum_k wts[n, k] * (w2[e] @ (silu(gate) * up)),  gate | up = w13[e] @ x[n],  e = ids[n, k]
 * w13 [E, 2F, C] (gate rows, then up rows), w2 [E, C, F], ids and wts [N, K]. The (token, expert)
 * pairs are grouped by expert (stable counting sort), so an expert chosen by several tokens is
 * streamed once per 8 of them, as a batched step's expert segments are; each token's sum runs in
 * expert order, as the sorted dispatch's index_add does. Returns -1 (nothing read) if an expert id
 * is outside 0..E-1, -2 if scratch memory cannot be allocated, else 0. */
#define DEFINE_MOE(SUFFIX, T, SWIGLU, MUL, ADD)                                                                        \
    int mc_moe_swiglu_##SUFFIX(const T *x, int64_t ldx, const T *w13, const T *w2, const int64_t *ids, const T *wts,  \
                               T *out, int64_t ldo, int64_t N, int64_t K, int64_t C, int64_t F, int64_t E) {          \
        int64_t NK = N * K, rows = 0, *start, *order;                                                                  \
        for (int64_t i = 0; i < NK; i++)                                                                               \
            if (ids[i] < 0 || ids[i] >= E) return -1; /* an expert id out of range: nothing is read */                 \
        start = calloc((size_t)E + 1, sizeof(int64_t));                                                                \
        order = malloc(((size_t)NK + 1) * sizeof(int64_t));                                                           \
        unsigned char *seen = calloc((size_t)N + 1, 1);                                                                \
        T *xs = NULL;                                                                                                  \
        if (start && order && seen) {                                                                                  \
            for (int64_t i = 0; i < NK; i++) start[ids[i] + 1]++;                                                      \
            for (int64_t e = 0; e < E; e++) rows = start[e + 1] > rows ? start[e + 1] : rows;                          \
            for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];                                                  \
            xs = malloc((size_t)(rows * (2 * C + 3 * F) + 1) * sizeof(T)); /* gathered x, gate|up, act, y */         \
        }                                                                                                              \
        if (!xs) {                                                                                                     \
            free(start), free(order), free(seen);                                                                      \
            return -2;                                                                                                 \
        }                                                                                                              \
        T *h = xs + rows * C, *a = h + rows * 2 * F, *y = a + rows * F;                                                \
        for (int64_t i = 0; i < NK; i++) order[start[ids[i]]++] = i; /* start[e] is now the end of e */                \
        for (int64_t e = 0, lo = 0; e < E; lo = start[e], e++) {                                                       \
            int64_t m = start[e] - lo;                                                                                 \
            if (m == 0) continue;                                                                                      \
            for (int64_t r = 0; r < m; r++) memcpy(xs + r * C, x + order[lo + r] / K * ldx, (size_t)C * sizeof(T));    \
            mc_gemm_##SUFFIX(xs, C, w13 + e * 2 * F * C, C, NULL, h, 2 * F, m, 2 * F, C);                              \
            for (int64_t r = 0; r < m; r++)                                                                            \
                for (int64_t f = 0; f < F; f++) a[r * F + f] = SWIGLU(h[r * 2 * F + f], h[r * 2 * F + F + f]);         \
            mc_gemm_##SUFFIX(a, F, w2 + e * C * F, F, NULL, y, C, m, C, F);                                            \
            for (int64_t r = 0; r < m; r++) {                                                                          \
                int64_t i = order[lo + r], n = i / K;                                                                  \
                T *o = out + n * ldo;                                                                                  \
                for (int64_t c = 0; c < C; c++) {                                                                      \
                    T v = MUL(y[r * C + c], wts[i]);                                                                   \
                    o[c] = seen[n] ? ADD(o[c], v) : v;                                                                 \
                }                                                                                                      \
                seen[n] = 1;                                                                                           \
            }                                                                                                          \
        }                                                                                                              \
        for (int64_t n = 0; n < N; n++) /* K == 0: no expert, zero output (as the dispatch gives) */                  \
            if (!seen[n]) memset(out + n * ldo, 0, (size_t)C * sizeof(T));                                             \
        free(start), free(order), free(seen), free(xs);                                                                \
        return 0;                                                                                                      \
    }
DEFINE_MOE(bf16, uint16_t, bf16_swiglu, bf16_mul, bf16_add)
DEFINE_MOE(f32, float, f32_swiglu, f32_mul, f32_add)

/* Which code path this build took (for logs and tests). */
const char *mc_isa(void) {
#if defined(__AVX512BF16__)
    return "avx512_bf16";
#elif defined(__AVX512F__)
    return "avx512f";
#else
    return "portable";
#endif
}
