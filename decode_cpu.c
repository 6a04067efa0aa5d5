/*
 * ZipCache decode attention on the CPU, fused: one new query token per sequence attends to
 * [4-bit blocks | 2-bit blocks | fp16 buffer] reading the codes and statistics where ZipCache stores them
 * (README "The decode kernel"). It is the algebra of decode_kernel.py's docstring, in loops:
 *
 *     q·K̂_t      = (q ⊙ a_k)·x_t + q·μ_k                  key scale folded into q, once per key group k
 *     Σ_t p_t V̂_t = c_P ⊙ Σ_t (p_t σ_t y_t + p_t ν_t)        value scale folded into p, c once per block P
 *
 * so a key group costs D multiplies to fold, and a row costs one pass over its packed bytes per query and no
 * dequantized copy. decode_cpu.py compiles this file once per machine and calls zip_decode below; without a C
 * compiler decode_kernel.zip_decode_attention_torch runs instead (the same numbers to fp32 rounding).
 *
 * Layout (decode_kernel.ZipLayerView, strides in elements): codes uint8 [B, H, rows, W], planar (channel
 * i·W + j is bits [bits·i, bits·i + bits) of byte j, quant.pack); rows of a segment in block order, block k of
 * sequence b = rows [rows[b][k], rows[b][k+1]); fp16 statistics as ZipCache stores them (nested key statistics:
 * 4-bit codes under a per-block (base, step), quant.quantize_nested).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef _Float16 f16;
#define MAX_D 256
#define MAX_G 64

typedef struct {            /* one precision group (hi or lo) of one layer */
    int64_t bits, v_bits, nested;               /* key and value code widths */
    const uint8_t *k_codes, *v_codes;
    int64_t c_sb, c_sh, c_st;                   /* key codes [B, H, CAP, D·bits/8] */
    int64_t w_sb, w_sh, w_st;                   /* value codes [B, H, CAP, D·v_bits/8] */
    const f16 *v_scale, *v_min;
    int64_t v_sb, v_sh, v_st;                   /* [B, Hv, CAP]; v_sh = 0 when one scale per row serves all heads */
    const int32_t *rows;
    int64_t r_sb;                               /* [B, NB_CAP + 1] */
    const uint8_t *k_stat;                      /* nested: [Bs, NB_CAP, H, D], min code | scale code << 4 */
    const f16 *k_base;                          /* nested: [Bs, NP_CAP, H, 4, D], (min0, d_min, s0, d_s) */
    const f16 *k_scale, *k_min;                 /* fp16 statistics: [Bs, NB_CAP, H, D] */
    int64_t s_sb, s_sk, s_sh;                   /* strides of k_stat or k_scale/k_min */
    int64_t b_sb, b_sp, b_sh, b_s4;             /* strides of k_base */
} Segment;

typedef struct {            /* one layer's view plus the query and the outputs */
    int64_t B, H, G, D, n_blocks, n_buf;
    const float *q;                             /* [B, H, G, D] fp32, softmax scale folded in */
    const int32_t *parent;                      /* [n_blocks]: the cache block of each block (NULL: itself) */
    const f16 *v_chan;                          /* [Bs, NP_CAP, H, D] */
    int64_t vc_sb, vc_sp, vc_sh;
    const f16 *k_buf, *v_buf;                   /* [B, H, CAP, D] */
    int64_t kb_sb, kb_sh, kb_st;
    float *out;                                 /* [B, H, G, D] */
    float *lse;                                 /* [B, H, G], natural log */
    Segment seg[2];
} Layer;

/* the channel-order codes of one packed row: D values from its W = D·bits/8 bytes, one pass per part (each a
   straight vector loop; the bytes are copied first so that the compiler sees no aliasing) */
#define INLINE static inline __attribute__((always_inline))
INLINE void unpack_row(const uint8_t *restrict src, int64_t bits, int64_t D, float *restrict x) {
    const int64_t parts = 8 / bits, W = D / parts;
    const unsigned mask = (1u << bits) - 1;
    uint8_t b[MAX_D];
    memcpy(b, src, (size_t)W);
    for (int64_t i = 0; i < parts; i++)
        for (int64_t j = 0; j < W; j++) x[i * W + j] = (float)((b[j] >> (bits * i)) & mask);
}

/* key group k's (scale a, min μ) per channel: stored fp16, or nested, decoded exactly as quant.dequantize_nested
   does (fp16(base + code·step); code·step is exact in fp32, so a fused multiply-add rounds alike) */
INLINE void key_stats(const Segment *s, int64_t b, int64_t k, int64_t p, int64_t h, int64_t D, float *a, float *mu) {
    if (s->nested) {
        const uint8_t *st = s->k_stat + b * s->s_sb + k * s->s_sk + h * s->s_sh;
        const f16 *base = s->k_base + b * s->b_sb + p * s->b_sp + h * s->b_sh;
        const f16 *m0 = base, *dm = base + s->b_s4, *s0 = base + 2 * s->b_s4, *ds = base + 3 * s->b_s4;
        for (int64_t d = 0; d < D; d++) {
            a[d] = (float)(f16)((float)s0[d] + (float)(st[d] >> 4) * (float)ds[d]);
            mu[d] = (float)(f16)((float)m0[d] + (float)(st[d] & 15) * (float)dm[d]);
        }
    } else {
        const int64_t o = b * s->s_sb + k * s->s_sk + h * s->s_sh;
        for (int64_t d = 0; d < D; d++) { a[d] = (float)s->k_scale[o + d]; mu[d] = (float)s->k_min[o + d]; }
    }
}

/* scores of one segment's rows of sequence b, head h: s[g·N + t] for its rows t */
INLINE void segment_scores(const Layer *L, const Segment *s, int64_t b, int64_t h, const float *q, float *sc,
                           int64_t N, const int64_t D, const int64_t bits) {
    const int64_t G = L->G;
    const int32_t *rows = s->rows + b * s->r_sb;
    float a[MAX_D], mu[MAX_D], qa[MAX_G][MAX_D], qmu[MAX_G], x[MAX_D];
    for (int64_t k = 0; k < L->n_blocks; k++) {
        const int64_t r0 = rows[k], r1 = rows[k + 1];
        if (r1 == r0) continue;
        const int64_t p = L->parent ? L->parent[k] : k;
        key_stats(s, b, k, p, h, D, a, mu);       /* stride 0 over b: pooled, Bs = 1 */
        for (int64_t g = 0; g < G; g++) {                         /* fold: q ⊙ a and q·μ, once per key group */
            float acc = 0.f;
            for (int64_t d = 0; d < D; d++) { qa[g][d] = q[g * D + d] * a[d]; acc += q[g * D + d] * mu[d]; }
            qmu[g] = acc;
        }
        const uint8_t *row = s->k_codes + b * s->c_sb + h * s->c_sh + r0 * s->c_st;
        for (int64_t t = r0; t < r1; t++, row += s->c_st) {
            unpack_row(row, bits, D, x);
            for (int64_t g = 0; g < G; g++) {
                float acc = 0.f;
                for (int64_t d = 0; d < D; d++) acc += qa[g][d] * x[d];
                sc[g * N + t] = acc + qmu[g];
            }
        }
    }
}

/* Σ_t p_t V̂_t of one segment's rows into acc [G, D]: per cache block P, w = Σ p σ y and n = Σ p ν, then c_P ⊙ (w + n) */
INLINE void segment_values(const Layer *L, const Segment *s, int64_t b, int64_t h, const float *p, int64_t N,
                           float *acc, const int64_t D, const int64_t bits) {
    const int64_t G = L->G;
    const int32_t *rows = s->rows + b * s->r_sb;
    float w[MAX_G][MAX_D], nu[MAX_G], y[MAX_D], ps[MAX_G];
    int64_t k = 0;
    while (k < L->n_blocks) {
        const int64_t P = L->parent ? L->parent[k] : k;
        int64_t k1 = k + 1;                                       /* the blocks of cache block P: k .. k1 - 1 */
        while (k1 < L->n_blocks && (L->parent ? L->parent[k1] : k1) == P) k1++;
        const int64_t r0 = rows[k], r1 = rows[k1];
        k = k1;
        if (r1 == r0) continue;
        for (int64_t g = 0; g < G; g++) { nu[g] = 0.f; for (int64_t d = 0; d < D; d++) w[g][d] = 0.f; }
        const uint8_t *row = s->v_codes + b * s->w_sb + h * s->w_sh + r0 * s->w_st;
        const f16 *sig = s->v_scale + b * s->v_sb + h * s->v_sh, *vmn = s->v_min + b * s->v_sb + h * s->v_sh;
        for (int64_t t = r0; t < r1; t++, row += s->w_st) {
            unpack_row(row, bits, D, y);
            const float st = (float)sig[t * s->v_st], nt = (float)vmn[t * s->v_st];
            for (int64_t g = 0; g < G; g++) { ps[g] = p[g * N + t] * st; nu[g] += p[g * N + t] * nt; }
            for (int64_t g = 0; g < G; g++)
                for (int64_t d = 0; d < D; d++) w[g][d] += ps[g] * y[d];
        }
        const f16 *c = L->v_chan + b * L->vc_sb + P * L->vc_sp + h * L->vc_sh;
        for (int64_t g = 0; g < G; g++)
            for (int64_t d = 0; d < D; d++) acc[g * D + d] += (float)c[d] * (w[g][d] + nu[g]);
    }
}

INLINE void scores_any(const Layer *L, const Segment *s, int64_t b, int64_t h, const float *q, float *sc,
                       int64_t N, const int64_t D) {            /* the bit width as a constant: fixed unpack loops */
    if (s->bits == 4) segment_scores(L, s, b, h, q, sc, N, D, 4);
    else if (s->bits == 2) segment_scores(L, s, b, h, q, sc, N, D, 2);
    else segment_scores(L, s, b, h, q, sc, N, D, 8);
}

INLINE void values_any(const Layer *L, const Segment *s, int64_t b, int64_t h, const float *p, int64_t N,
                       float *acc, const int64_t D) {
    if (s->v_bits == 4) segment_values(L, s, b, h, p, N, acc, D, 4);
    else if (s->v_bits == 2) segment_values(L, s, b, h, p, N, acc, D, 2);
    else segment_values(L, s, b, h, p, N, acc, D, 8);
}

/* e^x for x <= 0 in a form the compiler vectorizes (libm's expf is a call per element): x = n·ln2 + r with
   |r| <= ln2/2 (ln2 in two parts, Cody-Waite), e^r by Cephes' expf polynomial (about 1 ulp), 2^n by the exponent
   bits; x below -87.3 gives e^-87.3 ~ 1e-38 instead of a subnormal or 0 */
INLINE float exp_nonpositive(float x) {
    x = x < -87.3f ? -87.3f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* one (sequence b, KV head h): scores of hi | lo | buffer into sc [G, N], softmax, the weighted values into out */
INLINE void attend_head(const Layer *L, int64_t b, int64_t h, float *sc, int64_t n0, int64_t n1, const int64_t D) {
    const int64_t G = L->G, N = n0 + n1 + L->n_buf;
    const float *q = L->q + (b * L->H + h) * G * D;
    float *out = L->out + (b * L->H + h) * G * D, *lse = L->lse + (b * L->H + h) * G;
    scores_any(L, &L->seg[0], b, h, q, sc, N, D);                   /* hi rows at [0, n0) */
    scores_any(L, &L->seg[1], b, h, q, sc + n0, N, D);              /* lo rows at [n0, n0 + n1) */
    const f16 *kb = L->k_buf + b * L->kb_sb + h * L->kb_sh, *vb = L->v_buf + b * L->kb_sb + h * L->kb_sh;
    for (int64_t t = 0; t < L->n_buf; t++)                           /* the fp16 buffer after them */
        for (int64_t g = 0; g < G; g++) {
            float acc = 0.f;
            for (int64_t d = 0; d < D; d++) acc += q[g * D + d] * (float)kb[t * L->kb_st + d];
            sc[g * N + n0 + n1 + t] = acc;
        }
    float l[MAX_G];                                                  /* softmax numerators in place: p = e^(s - max) */
    for (int64_t g = 0; g < G; g++) {
        float m = -INFINITY, sum = 0.f;
        float *r = sc + g * N;
        for (int64_t t = 0; t < N; t++) m = r[t] > m ? r[t] : m;
        for (int64_t t = 0; t < N; t++) { r[t] = exp_nonpositive(r[t] - m); sum += r[t]; }
        l[g] = sum;
        lse[g] = N ? m + logf(sum) : -INFINITY;
    }
    for (int64_t i = 0; i < G * D; i++) out[i] = 0.f;
    values_any(L, &L->seg[0], b, h, sc, N, out, D);
    values_any(L, &L->seg[1], b, h, sc + n0, N, out, D);
    for (int64_t t = 0; t < L->n_buf; t++)
        for (int64_t g = 0; g < G; g++) {
            const float pt = sc[g * N + n0 + n1 + t];
            for (int64_t d = 0; d < D; d++) out[g * D + d] += pt * (float)vb[t * L->kb_st + d];
        }
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) out[g * D + d] = N ? out[g * D + d] / l[g] : 0.f;
}

/* returns 0, or -1 for a shape this file does not take, -2 out of memory (the caller raises) */
int zip_decode(const Layer *L) {
    const int64_t G = L->G, D = L->D;
    if (D > MAX_D || G > MAX_G) return -1;
    for (int64_t b = 0; b < L->B; b++) {
        const int64_t n0 = L->seg[0].rows[b * L->seg[0].r_sb + L->n_blocks];
        const int64_t n1 = L->seg[1].rows[b * L->seg[1].r_sb + L->n_blocks];
        const int64_t N = n0 + n1 + L->n_buf;                    /* this sequence's rows: hi | lo | buffer */
        float *sc = malloc(sizeof(float) * (size_t)(G * N > 0 ? G * N : 1));
        if (!sc) return -2;
        for (int64_t h = 0; h < L->H; h++) {                      /* head sizes as constants where they are common */
            if (D == 64) attend_head(L, b, h, sc, n0, n1, 64);
            else if (D == 128) attend_head(L, b, h, sc, n0, n1, 128);
            else attend_head(L, b, h, sc, n0, n1, D);
        }
        free(sc);
    }
    return 0;
}
