/* bitfold fast-QAT kernels: one pass over a tensor for the forward and one for the backward of an
 * integer quantizer ``clamp(round(r / s), lo, hi) * s`` (``r = relu(x)`` or ``x``), replacing the
 * six to twelve separate tensor operations (each a pass over memory and a dispatch) that compute the
 * same values. Every element is computed with the same IEEE single-precision operations in the same
 * order as those tensor operations (division, round-half-to-even, comparisons, products), so the
 * results are bit-identical; the reductions (the scale's gradient) are torch's, on the products written
 * here - or, where the caller has found torch's summation order (bfq_sum below), summed in the pass in
 * that order without writing the products. Compile without -ffast-math and with -ffp-contract=off.
 *
 * Layout: ``rows`` x ``inner`` contiguous floats; ``s`` holds one scale per row (per_row = 1,
 * a per-output-channel weight scale) or one for the whole tensor (per_row = 0).
 */
#include <math.h>
#include <stdint.h>

static inline float relu_of(float x) { return x > 0.0f ? x : 0.0f; }

static inline float clamp_to(float q, float lo, float hi) {
    float c = q < lo ? lo : q;
    return c > hi ? hi : c;
}

/* out = clamp(rint(r / sd), lo, hi) * sm: the scale divided by (sd) and the one multiplied by (sm)
 * are the same tensor for an integer quantizer, different for ASQ's (sd = s * beta per sample) */
void bfq_forward(const float *restrict x, float *restrict out, int64_t rows, int64_t inner,
                 const float *sd, int per_row_d, const float *sm, int per_row_m, float lo, float hi, int relu) {
    for (int64_t i = 0; i < rows; i++) {
        const float dv = sd[per_row_d ? i : 0], mv = sm[per_row_m ? i : 0];
        const float *xr = x + i * inner;
        float *o = out + i * inner;
        if (relu) {
            for (int64_t j = 0; j < inner; j++)
                o[j] = clamp_to(__builtin_rintf(relu_of(xr[j]) / dv), lo, hi) * mv;
        } else {
            for (int64_t j = 0; j < inner; j++)
                o[j] = clamp_to(__builtin_rintf(xr[j] / dv), lo, hi) * mv;
        }
    }
}

/* The backward of bfq_forward as autograd evaluates the tensor operations:
 *   gc = g * sm, set to 0 where q = rint(r / sd) is above hi (mask >= 1) or below lo (mask == 2);
 *   gx = gc / sd, set to 0 where x <= 0 (relu);                written when gx != 0
 *   p1 = g * clamp(q, lo, hi), p2 = gc * ((r / sd) / sd);     written when p1 != 0
 * (an integer quantizer's scale gradient is sum(p1) - sum(p2), each summed to the scale's shape - by
 * torch, or in the pass: bfq_backward_sums; ASQ's combines them with beta).
 * One loop per case, without branches on the pointers, so that each vectorizes. */
static inline float masked_gc(float g, float q, float mv, float lo, float hi, int mask) {
    float gc = g * mv;
    if (mask >= 1 && !(q <= hi)) gc = 0.0f;
    if (mask == 2 && !(q >= lo)) gc = 0.0f;
    return gc;
}

/* One row of the backward; want_x / want_s are constants at each call below, so the always-inlined
 * copies have no branches on them and each vectorizes. */
static inline __attribute__((always_inline)) void backward_row(
        const float *restrict x, const float *restrict g, int64_t n, float sv, float mv, float lo, float hi,
        int relu, int mask, int want_x, int want_s, float *restrict gx, float *restrict p1, float *restrict p2) {
    for (int64_t j = 0; j < n; j++) {
        const float xv = x[j], gv = g[j];
        const float r = relu ? relu_of(xv) : xv;
        const float y = r / sv;
        const float q = __builtin_rintf(y);
        const float gc = masked_gc(gv, q, mv, lo, hi, mask);
        if (want_x) {
            const float v = gc / sv;
            gx[j] = (relu & !(xv > 0.0f)) ? 0.0f : v;
        }
        if (want_s) {
            p1[j] = gv * clamp_to(q, lo, hi);
            p2[j] = gc * (y / sv);
        }
    }
}

void bfq_backward(const float *x, const float *g, int64_t rows, int64_t inner, const float *sd, int per_row_d,
                  const float *sm, int per_row_m, float lo, float hi, int relu, int mask,
                  float *gx, float *p1, float *p2) {
    for (int64_t i = 0; i < rows; i++) {
        const float sv = sd[per_row_d ? i : 0], mv = sm[per_row_m ? i : 0];
        const int64_t b = i * inner;
        if (gx && p1)
            backward_row(x + b, g + b, inner, sv, mv, lo, hi, relu, mask, 1, 1, gx + b, p1 + b, p2 + b);
        else if (gx)
            backward_row(x + b, g + b, inner, sv, mv, lo, hi, relu, mask, 1, 0, gx + b, 0, 0);
        else if (p1)
            backward_row(x + b, g + b, inner, sv, mv, lo, hi, relu, mask, 0, 1, 0, p1 + b, p2 + b);
    }
}

static inline float sgn_of(float w) { return w > 0.0f ? 1.0f : (w < 0.0f ? -1.0f : 0.0f); }

/* The sum of n contiguous floats in the order torch's CPU sum takes on one thread (ATen's cascade sum:
 * vectors of w floats in four interleaved rows, a partial sum per row and lane, those partials summed
 * in four levels - one level up after every 2^lp vectors of a row - then the vectors left over, the rows,
 * the single floats at the end and the lanes, in that order), so that a pass can sum what it computes
 * without writing it out and have torch's result bit for bit. w is torch's vector width for float,
 * found by comparison with torch (sum_width in qautograd.cpp); a caller feeds whole blocks of 4 * w
 * values (sum_block) and then the < 4 * w values left (sum_finish). */
#define BFQ_SUM_WMAX 32

typedef struct {
    float acc[4][4 * BFQ_SUM_WMAX];
    int64_t blocks, done, mask;
    int lp, w;
} bfq_sum;

static void sum_init(bfq_sum *s, int64_t n, int w) {
    __builtin_memset(s->acc, 0, sizeof s->acc);
    s->w = w;
    s->blocks = (n / w) / 4;
    s->done = 0;
    const int cl = s->blocks <= 2 ? 1 : 64 - __builtin_clzll((unsigned long long)(s->blocks - 1));
    s->lp = cl / 4 > 4 ? cl / 4 : 4;
    s->mask = ((int64_t)1 << s->lp) - 1;
}

static inline void sum_block(bfq_sum *restrict s, const float *restrict b) {
    const int bl = 4 * s->w;
    for (int t = 0; t < bl; t++) s->acc[0][t] += b[t];
    if ((++s->done & s->mask) != 0) return;
    for (int j = 1; j < 4; j++) {   /* a run of 2^lp vectors per row done: one level up */
        for (int t = 0; t < bl; t++) {
            s->acc[j][t] += s->acc[j - 1][t];
            s->acc[j - 1][t] = 0.0f;
        }
        if ((s->done & (s->mask << (j * s->lp))) != 0) break;
    }
}

static float sum_finish(bfq_sum *restrict s, const float *restrict rest, int64_t nrest) {
    const int w = s->w, bl = 4 * w;
    for (int j = 1; j < 4; j++)
        for (int t = 0; t < bl; t++) s->acc[0][t] += s->acc[j][t];
    const int64_t nv = nrest / w;   /* whole vectors left (< 4): into the first row */
    for (int64_t v = 0; v < nv; v++)
        for (int l = 0; l < w; l++) s->acc[0][l] += rest[v * w + l];
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < w; l++) s->acc[0][l] += s->acc[0][k * w + l];
    float f = 0.0f;
    for (int64_t k = nv * w; k < nrest; k++) f += rest[k];
    for (int l = 0; l < w; l++) f += s->acc[0][l];
    return 0.0f + f;   /* torch adds the sum to its zero-filled output */
}

/* The sum of n floats in torch's order (for the probe and the tests). */
float bfq_sum_ordered(const float *restrict x, int64_t n, int w) {
    bfq_sum s;
    sum_init(&s, n, w);
    const int64_t full = s.blocks * 4 * w;
    for (int64_t j = 0; j < full; j += 4 * w) sum_block(&s, x + j);
    return sum_finish(&s, x + full, n - full);
}

/* A pass that sums its products instead of writing them runs block by block: its products of a block in
 * b[k] (k < m), then each added to its sum (k >= k0; the others are not wanted) - a whole block, or, at the
 * end, the values left, the sum going to out[k]. */
typedef float bfq_block[4 * BFQ_SUM_WMAX];

static inline void sums_take(bfq_sum *s, bfq_block *b, int k0, int m, int last, int64_t len, float *out) {
    for (int k = k0; k < m; k++) {
        if (last)
            out[k] = sum_finish(&s[k], b[k], len);
        else
            sum_block(&s[k], b[k]);
    }
}

/* bfq_backward for one scale (sd = sm) with the sums of p1 and p2 (out[0], out[1]) in torch's order
 * instead of p1 and p2 themselves (sums_take). gx as bfq_backward (NULL: not wanted). */
void bfq_backward_sums(const float *x, const float *g, int64_t n, float sv, float lo, float hi, int relu, int mask,
                       int w, float *gx, float *out) {
    bfq_sum s[2];
    bfq_block b[2];
    for (int k = 0; k < 2; k++) sum_init(&s[k], n, w);
    const int64_t bl = 4 * w, full = s[0].blocks * bl;
    for (int64_t j = 0; j <= full; j += bl) {
        const int64_t len = j < full ? bl : n - j;
        bfq_backward(x + j, g + j, 1, len, &sv, 0, &sv, 0, lo, hi, relu, mask, gx ? gx + j : 0, b[0], b[1]);
        sums_take(s, b, 0, 2, j == full, len, out);
    }
}

/* ASQ's adapter statistics of each row of a rows x n matrix: mean |x| and the sample standard deviation
 * (n - 1) as two passes - the mean, then the squared deviations (x - mean, in float) - summed in double
 * over BFQ_LANES interleaved partial sums, added up in a fixed order, so the values do not depend on how
 * the loops are vectorized. out: (mean |x|, std) per row; aux: (mean, std) per row, for the backward. */
#define BFQ_LANES 16

static double lanes_total(const double *acc) {
    double t = 0.0;
    for (int k = 0; k < BFQ_LANES; k++) t += acc[k];
    return t;
}

void bfq_row_stats(const float *restrict x, int64_t rows, int64_t n, float *restrict out, float *restrict aux) {
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * n;
        double sx[BFQ_LANES] = {0.0}, sa[BFQ_LANES] = {0.0}, sq[BFQ_LANES] = {0.0};
        int64_t j = 0;
        for (; j + BFQ_LANES <= n; j += BFQ_LANES)
            for (int k = 0; k < BFQ_LANES; k++) {
                const double v = xr[j + k];
                sx[k] += v;
                sa[k] += fabs(v);
            }
        for (int k = 0; j < n; j++, k++) {
            const double v = xr[j];
            sx[k] += v;
            sa[k] += fabs(v);
        }
        const float mean = (float)(lanes_total(sx) / (double)n);
        for (j = 0; j + BFQ_LANES <= n; j += BFQ_LANES)
            for (int k = 0; k < BFQ_LANES; k++) {
                const double d = (double)(xr[j + k] - mean);
                sq[k] += d * d;
            }
        for (int k = 0; j < n; j++, k++) {
            const double d = (double)(xr[j] - mean);
            sq[k] += d * d;
        }
        /* n = 1: 0 / 0, NaN, as torch.std */
        const float sd = (float)sqrt(lanes_total(sq) / (double)(n - 1));
        out[2 * i] = (float)(lanes_total(sa) / (double)n);
        out[2 * i + 1] = sd;
        aux[2 * i] = mean;
        aux[2 * i + 1] = sd;
    }
}

/* Their backward: gx = (g_abs / n) * sgn(x) + (x - mean) * g_std / (std * (n - 1)) - mean |x|'s gradient
 * through abs (0 at x = 0) plus the std's (0 for a row of zero spread, as torch's std backward). g: the
 * (g_abs, g_std) pair of each row. */
void bfq_row_stats_backward(const float *restrict x, const float *restrict g, const float *restrict aux, int64_t rows,
                            int64_t n, float *restrict gx) {
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * n;
        float *o = gx + i * n;
        const float mean = aux[2 * i], sd = aux[2 * i + 1];
        const float a = g[2 * i] / (float)n;
        const float c = sd == 0.0f ? 0.0f : g[2 * i + 1] / (sd * (float)(n - 1));
        for (int64_t j = 0; j < n; j++) {
            const float v = xr[j];
            o[j] = a * sgn_of(v) + (v - mean) * c;
        }
    }
}

/* max |w| over n values (torch.max(torch.abs(w)): a maximum is exact in any order), with the number of
 * values whose |w| equals it and the first of them - what the backward needs to route the statistic's
 * gradient without another pass when the maximum is unique. Returns 1 (nothing written) when a value
 * is NaN (torch's maximum is NaN then: the caller runs torch's operations) or n is 0. Written with
 * GCC/Clang vector types (8 floats): the compilers do not vectorize these selects and counts alone. */
typedef float bfq_v8 __attribute__((vector_size(32)));
typedef int32_t bfq_i8 __attribute__((vector_size(32)));

static inline bfq_i8 abs_bits(const float *p) {   /* |p[0..7]| as bits (sign cleared) */
    bfq_i8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v & 0x7fffffff;
}

int bfq_absmax(const float *restrict w, int64_t n, float *maxval, int64_t *ties, int64_t *first) {
    if (n <= 0 || n >= INT32_MAX) return 1;   /* (lane indices are 32-bit) */
    bfq_v8 acc[4] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};   /* four chains, so that the selects overlap */
    int64_t j = 0;
    for (; j + 32 <= n; j += 32)
        for (int c = 0; c < 4; c++) {
            const bfq_v8 a = (bfq_v8)abs_bits(w + j + 8 * c);
            const bfq_i8 gt = a > acc[c];        /* false for a NaN: it is caught by the count below */
            acc[c] = (bfq_v8)(((bfq_i8)a & gt) | ((bfq_i8)acc[c] & ~gt));
        }
    float m = 0.0f;
    for (int c = 0; c < 4; c++)
        for (int k = 0; k < 8; k++) m = acc[c][k] > m ? acc[c][k] : m;
    for (; j < n; j++) {
        const float a = fabsf(w[j]);
        m = a > m ? a : m;
    }
    const bfq_v8 mv = {m, m, m, m, m, m, m, m};
    /* a NaN is neither at nor below the maximum: then at + below < n; pos: each lane's first index at it */
    bfq_i8 at = {0}, below = {0}, pos = {INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX};
    bfq_i8 idx = {0, 1, 2, 3, 4, 5, 6, 7};
    const bfq_i8 eight = {8, 8, 8, 8, 8, 8, 8, 8};
    for (j = 0; j + 8 <= n; j += 8, idx += eight) {
        const bfq_v8 a = (bfq_v8)abs_bits(w + j);
        const bfq_i8 hit = a >= mv;
        at -= hit;
        below -= a < mv;
        const bfq_i8 cand = (idx & hit) | (INT32_MAX & ~hit), earlier = cand < pos;
        pos = (cand & earlier) | (pos & ~earlier);
    }
    int64_t n_at = 0, n_below = 0, where = INT64_MAX;
    for (int k = 0; k < 8; k++) {
        n_at += at[k];
        n_below += below[k];
        if (pos[k] < where) where = pos[k];
    }
    for (; j < n; j++) {
        const float a = fabsf(w[j]);
        if (a >= m && j < where) where = j;
        n_at += a >= m;
        n_below += a < m;
    }
    if (n_at + n_below != n) return 1;
    *maxval = m;
    *ties = n_at;
    *first = where;
    return 0;
}

/* The weight statistic's gradient, per tensor: the maximum |w| routes ``gs`` evenly over the
 * elements equal to it (autograd's max backward), through abs (a product with sgn(w)):
 * gx += (gs / ties) * tie * sgn(w), ties counted exactly. */
void bfq_add_ties(float *restrict gx, const float *restrict w, int64_t n, float maxval, float gs) {
    int64_t ties = 0;
    for (int64_t j = 0; j < n; j++)
        ties += (w[j] < 0.0f ? -w[j] : w[j]) >= maxval;
    const float share = gs / (float)ties;
    for (int64_t j = 0; j < n; j++) {       /* addcmul's order: x + (share * tie) * sgn(w) */
        const float tie = (w[j] < 0.0f ? -w[j] : w[j]) >= maxval ? 1.0f : 0.0f;
        gx[j] = gx[j] + share * tie * sgn_of(w[j]);
    }
}

/* The same per output channel: to the element torch.max returned in each row. */
void bfq_add_at_rows(float *restrict gx, const float *restrict w, int64_t rows, int64_t inner,
                     const int64_t *restrict at, const float *restrict gs) {
    for (int64_t i = 0; i < rows; i++) {
        const int64_t k = i * inner + at[i];
        gx[k] = gx[k] + gs[i] * sgn_of(w[k]);
    }
}

/* The backward of a quantizer whose bounds are learned (AdaQAT's width): as bfq_backward with
 * mask 2 (or none, ste), and also the parts of gc = g * s cut above hi and below lo - the bounds'
 * gradients are their sums (``above`` where q > hi, ``below`` where q < lo, else 0). An output pointer
 * that is NULL is not written (p1 and p2 together): a gradient nobody needs, e.g. ``below`` after a
 * ReLU into an unsigned range, where nothing is below lo = 0. want_* are constants at each call below. */
static inline __attribute__((always_inline)) void range_row(
        const float *restrict x, const float *restrict g, int64_t n, float sv, float lo, float hi, int relu,
        int want_x, int want_s, int want_hi, int want_lo, float *restrict gx, float *restrict p1, float *restrict p2,
        float *restrict above, float *restrict below) {
    for (int64_t j = 0; j < n; j++) {
        const float xv = x[j], gv = g[j];
        const float r = relu ? relu_of(xv) : xv;
        const float y = r / sv;
        const float q = __builtin_rintf(y);
        const float g2 = gv * sv;
        const int up = q > hi, down = q < lo;
        const float gq = (up | down) ? 0.0f : g2;
        if (want_x) gx[j] = (relu & !(xv > 0.0f)) ? 0.0f : gq / sv;
        if (want_s) {
            p1[j] = gv * clamp_to(q, lo, hi);
            p2[j] = gq * (y / sv);
        }
        if (want_hi) above[j] = up ? g2 : 0.0f;
        if (want_lo) below[j] = down ? g2 : 0.0f;
    }
}

#define BFQ_RANGE_CASE(X, S, H, L)                                                                            \
    case (X) | (S) << 1 | (H) << 2 | (L) << 3:                                                                \
        range_row(x + b, g + b, inner, sv, lo, hi, relu, X, S, H, L, X ? gx + b : 0, S ? p1 + b : 0,          \
                  S ? p2 + b : 0, H ? above + b : 0, L ? below + b : 0);                                      \
        break;

void bfq_backward_range(const float *x, const float *g, int64_t rows, int64_t inner, const float *s, int per_row,
                        float lo, float hi, int relu, float *gx, float *p1, float *p2, float *above, float *below) {
    const int want = (gx != 0) | (p1 != 0 && p2 != 0) << 1 | (above != 0) << 2 | (below != 0) << 3;
    for (int64_t i = 0; i < rows; i++) {
        const int64_t b = i * inner;
        const float sv = s[per_row ? i : 0];
        switch (want) {
            BFQ_RANGE_CASE(0, 0, 0, 1) BFQ_RANGE_CASE(0, 0, 1, 0) BFQ_RANGE_CASE(0, 0, 1, 1)
            BFQ_RANGE_CASE(0, 1, 0, 0) BFQ_RANGE_CASE(0, 1, 0, 1) BFQ_RANGE_CASE(0, 1, 1, 0) BFQ_RANGE_CASE(0, 1, 1, 1)
            BFQ_RANGE_CASE(1, 0, 0, 0) BFQ_RANGE_CASE(1, 0, 0, 1) BFQ_RANGE_CASE(1, 0, 1, 0) BFQ_RANGE_CASE(1, 0, 1, 1)
            BFQ_RANGE_CASE(1, 1, 0, 0) BFQ_RANGE_CASE(1, 1, 0, 1) BFQ_RANGE_CASE(1, 1, 1, 0) BFQ_RANGE_CASE(1, 1, 1, 1)
            default: return;   /* nothing wanted */
        }
    }
}
#undef BFQ_RANGE_CASE

/* bfq_backward_range for one scale and one pair of bounds, with the sums of p1, p2, above and below
 * (out[0..3], in torch's order, bfq_sum) instead of those products; gx written when not NULL. */
void bfq_backward_range_sums(const float *x, const float *g, int64_t n, float sv, float lo, float hi, int relu, int w,
                             float *gx, float *out) {
    bfq_sum s[4];
    bfq_block b[4];
    for (int k = 0; k < 4; k++) sum_init(&s[k], n, w);
    const int64_t bl = 4 * w, full = s[0].blocks * bl;
    for (int64_t j = 0; j <= full; j += bl) {
        const int64_t len = j < full ? bl : n - j;
        bfq_backward_range(x + j, g + j, 1, len, &sv, 0, lo, hi, relu, gx ? gx + j : 0, b[0], b[1], b[2], b[3]);
        sums_take(s, b, 0, 4, j == full, len, out);
    }
}

/* bfq_backward with a scale per row to divide by (sd) and one to multiply by (sm; ASQ's s * beta and s), and
 * the sums in torch's order of p1 over the whole tensor (out1) and of p2 over each row (out2[row]) - the
 * shapes of s and of s * beta - instead of the products. A block of the whole tensor's sum may span rows:
 * its values are gathered in a buffer (feed). */
typedef struct {
    bfq_sum s;
    float buf[4 * BFQ_SUM_WMAX];
    int fill;
    int64_t left;   /* values still to come as whole blocks */
} bfq_feed;

static void feed_init(bfq_feed *f, int64_t n, int w) {
    sum_init(&f->s, n, w);
    f->fill = 0;
    f->left = f->s.blocks * 4 * w;
}

static void feed(bfq_feed *restrict f, const float *restrict v, int64_t len) {
    const int bl = 4 * f->s.w;
    for (int64_t j = 0; j < len; j++) {
        f->buf[f->fill++] = v[j];
        if (f->left > 0 && f->fill == bl) {
            sum_block(&f->s, f->buf);
            f->left -= bl;
            f->fill = 0;
        }
    }
}

void bfq_backward_rows_sums(const float *x, const float *g, int64_t rows, int64_t inner, const float *sd, float mv,
                            float lo, float hi, int mask, int w, float *gx, float *out1, float *out2) {
    bfq_feed f1;
    bfq_sum s2;
    float b1[4 * BFQ_SUM_WMAX], b2[4 * BFQ_SUM_WMAX];
    feed_init(&f1, rows * inner, w);
    const int64_t bl = 4 * w;
    for (int64_t i = 0; i < rows; i++) {
        const float sv = sd[i];
        const float *xr = x + i * inner, *gr = g + i * inner;
        float *gxr = gx ? gx + i * inner : 0;
        sum_init(&s2, inner, w);
        const int64_t full = s2.blocks * bl;
        for (int64_t j = 0; j <= full; j += bl) {
            const int64_t len = j < full ? bl : inner - j;
            bfq_backward(xr + j, gr + j, 1, len, &sv, 0, &mv, 0, lo, hi, 0, mask, gxr ? gxr + j : 0, b1, b2);
            if (j < full)
                sum_block(&s2, b2);
            else
                out2[i] = sum_finish(&s2, b2, len);
            feed(&f1, b1, len);
        }
    }
    *out1 = sum_finish(&f1.s, f1.buf, f1.fill);
}

/* torch.bucketize(w, mids) (right=False) for ascending mids: the number of mids strictly below each
 * value (ADQ's nearest codebook entry at 5-8 bits). A binary search over the mids padded with +inf to
 * 2^k - 1 entries, one level at a time over a block of values, so that the blocks' searches overlap
 * (one value's search is a chain of dependent loads). */
#include <stdlib.h>

#define BFQ_BLOCK 256
/* up to this many padded mids (a 5-bit codebook's) the search counts the mids below each value instead */
#define BFQ_COUNT_MAX 32
/* more mids: a table of BFQ_CELLS cells - equal ones over [first mid, last mid], or by the floats' leading
 * bits for log-spaced mids - gives each value the number of mids in the cells below its own, and at most
 * BFQ_CELL_K mids share a cell (else the binary search) */
#define BFQ_CELLS 4096
#define BFQ_CELL_K 4

struct bfq_cells {
    float m0, inv;
    int log;                    /* cells by the float's leading bits (log-spaced mids, e.g. ASQ's POST levels) */
    int one;                    /* no cell holds more than one mid */
    struct {
        int32_t first;          /* the number of mids whose cell is below this one */
        float mid;              /* m[first]: the cell's one mid (with ``one``), or one above the cell */
    } cell[BFQ_CELLS];
};

/* A value's cell: monotone in v (a rounded difference and product, then floor, clamped), so every mid in
 * a cell below v's is below v, and every mid in a cell above it is above v. NaN: cell 0 (no mid is below). */
static inline int32_t cell_of(float v, float m0, float inv) {
    float f = (v - m0) * inv;
    f = f >= 0.0f ? f : 0.0f;   /* NaN: 0 */
    f = f < (float)(BFQ_CELLS - 1) ? f : (float)(BFQ_CELLS - 1);
    return (int32_t)f;
}

/* The cell of v by its float's 12 leading bits, as an unsigned key that orders floats as their values
 * (negatives' bits flipped, -0 taken as +0): also monotone - 1/8 of a binade a cell. */
static inline int32_t log_cell_of(float v) {
    uint32_t u;
    const float z = v + 0.0f;   /* -0 + 0 is +0; any other value unchanged */
    __builtin_memcpy(&u, &z, sizeof u);
    u ^= (uint32_t)((int32_t)u >> 31) | 0x80000000u;   /* without a branch on the sign */
    return (int32_t)(u >> 20);
}

static inline int32_t any_cell_of(const struct bfq_cells *t, float v) {
    return t->log ? log_cell_of(v) : cell_of(v, t->m0, t->inv);
}

static int cells_fill(struct bfq_cells *t, const float *m, int64_t nb) {
    int32_t cnt[BFQ_CELLS] = {0};
    t->one = 1;
    for (int64_t i = 0; i < nb; i++) {
        const int32_t c = ++cnt[any_cell_of(t, m[i])];
        if (c > BFQ_CELL_K) return 0;
        t->one &= c == 1;
    }
    int32_t below = 0;
    for (int k = 0; k < BFQ_CELLS; k++) {   /* (m is padded with +inf past the mids) */
        t->cell[k].first = below;
        t->cell[k].mid = m[below];
        below += cnt[k];
    }
    return 1;
}

/* Equal cells over the mids' span, else cells by leading bits; 0 where neither keeps every cell to at
 * most K mids (or the span is not finite and positive): the binary search then. */
static int cells_build(struct bfq_cells *t, const float *m, int64_t nb) {
    const float span = m[nb - 1] - m[0];
    t->m0 = m[0];
    t->inv = (float)BFQ_CELLS / span;
    if (!(span > 0.0f) || !(t->inv > 0.0f) || t->inv == INFINITY || t->m0 != t->m0) return 0;
    t->log = 0;
    if (cells_fill(t, m, nb)) return 1;
    t->log = 1;
    return cells_fill(t, m, nb);
}

/* The cell of each value of a block (key[j]): a pass of its own, so that it vectorizes (no loads by index). */
__attribute__((noinline)) static void cells_keys(const struct bfq_cells *restrict t, const float *restrict v,
                                                 int64_t len, int32_t *restrict key) {
    if (t->log) {
        for (int64_t j = 0; j < len; j++) key[j] = log_cell_of(v[j]);
    } else {
        const float m0 = t->m0, inv = t->inv;
        for (int64_t j = 0; j < len; j++) key[j] = cell_of(v[j], m0, inv);
    }
}

/* pos[j] = the mids below v[j]: those of the cells below its cell, plus those of the K mids from there
 * on that are below it (the ones of its own cell; the later ones are in cells above, so not below) -
 * the same number as the search; val[j] = c[pos[j]] when c is given. The cells first (cells_keys), then
 * scalar loads: vectorized, these loops are gathers, slower here than the scalar loop (measured: 185 vs
 * 144 us over 50 k values); the keys' own pass and the entry taken in the same loop: 80 -> 39 us (ADQ's
 * 128 entries, 50 k values). */
__attribute__((optimize("no-tree-vectorize"))) static void cells_block(
        const struct bfq_cells *restrict t, const float *restrict m, const float *restrict v, int64_t len,
        const float *restrict c, int32_t *restrict pos, float *restrict val) {
    cells_keys(t, v, len, pos);
    if (t->one) {   /* one mid at most per cell: the count below it and that mid, in one load */
        if (c) {
            for (int64_t j = 0; j < len; j++) {
                const int32_t p = t->cell[pos[j]].first + (t->cell[pos[j]].mid < v[j]);
                pos[j] = p;
                val[j] = c[p];
            }
            return;
        }
        for (int64_t j = 0; j < len; j++) pos[j] = t->cell[pos[j]].first + (t->cell[pos[j]].mid < v[j]);
        return;
    }
    for (int64_t j = 0; j < len; j++) {
        const float x = v[j];
        const int32_t lo = t->cell[pos[j]].first;
        int32_t k = lo;
        for (int i = 0; i < BFQ_CELL_K; i++) k += m[lo + i] < x;
        pos[j] = k;
    }
    if (c)
        for (int64_t j = 0; j < len; j++) val[j] = c[pos[j]];
}

/* The search of a block of values over mids padded to p2 - 1 entries (m): pos[j] = the number of mids
 * strictly below v[j], and with the entries c (one more than the mids; NULL: not wanted) val[j] = c[pos[j]].
 * Up to BFQ_COUNT_MAX padded mids they are counted - one comparison per mid, each entry taken by a select
 * as its mid is passed (ascending mids: the last one below v decides) - else a binary search: the same
 * numbers; the count has no indexed loads, which some CPUs run slowly as vector gathers. */
static void search_block(const float *restrict m, int64_t p2, const float *restrict v, int64_t len,
                         const float *restrict c, int32_t *restrict pos, float *restrict val) {
    for (int64_t j = 0; j < len; j++) pos[j] = 0;
    if (p2 <= BFQ_COUNT_MAX) {
        if (c)
            for (int64_t j = 0; j < len; j++) val[j] = c[0];
        /* a mid at +inf is below no value, nor is any after it */
        for (int64_t i = 0; i < p2 - 1 && m[i] != INFINITY; i++) {
            const float mi = m[i];
            if (c) {
                const float ci = c[i + 1];
                for (int64_t j = 0; j < len; j++) {
                    const int below = mi < v[j];
                    pos[j] += below;
                    val[j] = below ? ci : val[j];
                }
            } else {
                for (int64_t j = 0; j < len; j++) pos[j] += mi < v[j];
            }
        }
        return;
    }
    for (int64_t step = p2 >> 1; step >= 1; step >>= 1)
        for (int64_t j = 0; j < len; j++)
            pos[j] += (m[pos[j] + step - 1] < v[j]) ? (int32_t)step : 0;
    if (c)
        for (int64_t j = 0; j < len; j++) val[j] = c[pos[j]];
}

/* mids padded with +inf to 2^k - 1 entries (*p2 = 2^k, the smallest above nb) and BFQ_CELL_K more (read by
 * cells_block); NULL when out of memory */
static float *padded(const float *mids, int64_t nb, int64_t *p2) {
    int64_t n2 = 1;
    while (n2 < nb + 1) n2 <<= 1;
    float *m = (float *)malloc(sizeof(float) * (size_t)(n2 + BFQ_CELL_K));
    if (m)
        for (int64_t i = 0; i < n2 + BFQ_CELL_K; i++) m[i] = i < nb ? mids[i] : INFINITY;
    *p2 = n2;
    return m;
}

/* Every w searched over ascending mids (nb of them), block by block: pos[j] is the number of mids strictly
 * below w[b + j] (torch.bucketize's index, ties left); visit(ctx, b, len, pos) is called for each block.
 * Returns -1 out of memory, else 0. */
typedef void (*bfq_visit)(void *ctx, int64_t b, int64_t len, const int32_t *pos, const float *val);

static int mids_search(const float *restrict w, int64_t n, const float *restrict mids, int64_t nb,
                       const float *restrict c, bfq_visit visit, void *ctx) {
    int64_t p2;
    float *m = padded(mids, nb, &p2);
    if (!m) return -1;
    struct bfq_cells *cells = 0;
    if (p2 > BFQ_COUNT_MAX && n >= BFQ_CELLS) {   /* the table pays for itself over many values */
        cells = (struct bfq_cells *)malloc(sizeof *cells);
        if (cells && !cells_build(cells, m, nb)) {
            free(cells);
            cells = 0;
        }
    }
    int32_t pos[BFQ_BLOCK];
    float val[BFQ_BLOCK];
    for (int64_t b = 0; b < n; b += BFQ_BLOCK) {
        const int64_t len = n - b < BFQ_BLOCK ? n - b : BFQ_BLOCK;
        if (cells)
            cells_block(cells, m, w + b, len, c, pos, val);
        else
            search_block(m, p2, w + b, len, c, pos, val);
        for (int64_t j = 0; j < len; j++)   /* NaN: after every mid, as torch.bucketize places it */
            if (w[b + j] != w[b + j]) {
                pos[j] = (int32_t)nb;
                if (c) val[j] = c[nb];
            }
        visit(ctx, b, len, pos, val);
    }
    free(cells);
    free(m);
    return 0;
}

static void index_block(void *p, int64_t b, int64_t len, const int32_t *pos, const float *val) {
    int64_t *out = (int64_t *)p;
    for (int64_t j = 0; j < len; j++) out[b + j] = pos[j];
}

int bfq_bucketize(const float *restrict w, int64_t n, const float *restrict mids, int64_t nb,
                  int64_t *restrict out) {
    return mids_search(w, n, mids, nb, 0, index_block, out);
}

#define BFQ_MAX_CODEBOOK 4096   /* entries (ADQ: 2^8); larger codebooks run torch's operations */

/* The midpoints (c[i + 1] + c[i]) / 2 of a codebook of k >= 2 entries, as torch's ``(c[1:] + c[:-1]) / 2``;
 * 1 when the codebook is not in ascending order (a NaN included): the caller sorts it with torch then. */
static int codebook_mids(const float *c, int64_t k, float *mids) {
    for (int64_t i = 0; i + 1 < k; i++) {
        if (!(c[i + 1] >= c[i])) return 1;
        mids[i] = (c[i + 1] + c[i]) / 2.0f;
    }
    return 0;
}

/* The nearest-entry search of every w against a codebook c of k entries (mids_search over its midpoints).
 * Returns 1 when c is not ascending (or k is outside 2..BFQ_MAX_CODEBOOK), -1 out of memory, else 0. */
static int codebook_search(const float *restrict w, int64_t n, const float *restrict c, int64_t k, int want_val,
                           bfq_visit visit, void *ctx) {
    if (k < 2 || k > BFQ_MAX_CODEBOOK) return 1;
    float mids[BFQ_MAX_CODEBOOK];
    if (codebook_mids(c, k, mids)) return 1;
    return mids_search(w, n, mids, k - 1, want_val ? c : 0, visit, ctx);
}

struct snap_ctx {
    const float *w, *c;
    float *out;
    uint16_t *idx;
};

static void delta_block(void *p, int64_t b, int64_t len, const int32_t *pos, const float *val) {
    const struct snap_ctx *x = (const struct snap_ctx *)p;
    for (int64_t j = 0; j < len; j++) x->out[b + j] = val[j] - x->w[b + j];
}

/* ADQ's codebook weight (CodebookWeight.forward): delta = c[i] - w, i the nearest entry's index; the caller
 * adds w + delta under autograd. Returns as codebook_search (nothing written unless 0). */
int bfq_codebook_delta(const float *restrict w, int64_t n, const float *restrict c, int64_t k, float *restrict delta) {
    struct snap_ctx x = {w, c, delta, 0};
    return codebook_search(w, n, c, k, 1, delta_block, &x);
}

struct ema_ctx {
    const float *w;
    float *sums, *cnt;
};

static void sums_block(void *p, int64_t b, int64_t len, const int32_t *pos, const float *val) {
    const struct ema_ctx *x = (const struct ema_ctx *)p;
    for (int64_t j = 0; j < len; j++) {
        x->sums[pos[j]] = x->sums[pos[j]] + x->w[b + j] * 1.0f;
        x->cnt[pos[j]] = x->cnt[pos[j]] + 1.0f * 1.0f;
    }
}

static int cmp_float(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* ADQ's codebook update (CodebookWeight.ema_update) in place: each entry's sum and count of the weights
 * nearest to it, added in element order as index_add_ adds them; upd = mom * c + (1 - mom) * sum / max(cnt, 1)
 * for an entry with weights (and not 0 under keep_zero), as the tensor operations compute it in float;
 * then sorted ascending. ``one_minus``: (float)(1 - momentum) computed in double, as Python computes it.
 * Returns 1 (nothing changed) when the codebook is not ascending or an entry would be NaN, -1 out of
 * memory. */
int bfq_codebook_ema(const float *restrict w, int64_t n, float *restrict c, int64_t k, float mom, float one_minus,
                     int keep_zero) {
    if (k < 2 || k > BFQ_MAX_CODEBOOK) return 1;
    float *acc = (float *)calloc((size_t)(2 * k), sizeof(float));
    if (!acc) return -1;
    struct ema_ctx x = {w, acc, acc + k};
    const int rc = codebook_search(w, n, c, k, 0, sums_block, &x);
    if (rc) {
        free(acc);
        return rc;
    }
    float next[BFQ_MAX_CODEBOOK];
    int ok = 1;
    for (int64_t i = 0; i < k; i++) {
        const float upd = mom * c[i] + (one_minus * x.sums[i]) / (x.cnt[i] < 1.0f ? 1.0f : x.cnt[i]);
        next[i] = x.cnt[i] > 0.0f && !(keep_zero && c[i] == 0.0f) ? upd : c[i];
        ok &= next[i] == next[i];
    }
    free(acc);
    if (!ok) return 1;     /* a NaN: torch's sort places it, not this one */
    qsort(next, (size_t)k, sizeof(float), cmp_float);
    for (int64_t i = 0; i < k; i++) c[i] = next[i];
    return 0;
}

static void snap_block(void *p, int64_t b, int64_t len, const int32_t *pos, const float *val) {
    const struct snap_ctx *x = (const struct snap_ctx *)p;
    for (int64_t j = 0; j < len; j++) {
        x->out[b + j] = val[j] + (x->w[b + j] - x->w[b + j]);
        x->idx[b + j] = (uint16_t)pos[j];
    }
}

/* ASQ's POST weight (POSTWeight.forward: ``levels[assign(w, levels)] + (w - w.detach())``): out = lv[i] + (w - w)
 * with i the nearest level's index, written to idx for the backward. Returns as codebook_search (the levels not
 * ascending: assign sorts them then, and gathers from the unsorted ones). */
int bfq_snap_levels(const float *restrict w, int64_t n, const float *restrict lv, int64_t k, float *restrict out,
                    uint16_t *restrict idx) {
    struct snap_ctx x = {w, lv, out, idx};
    return codebook_search(w, n, lv, k, 1, snap_block, &x);
}

/* The gather's backward (index_put_ with accumulate): acc[idx[j]] += g[j] in element order; acc zeroed by
 * the caller. */
void bfq_scatter_add(const float *restrict g, const uint16_t *restrict idx, int64_t n, float *restrict acc) {
    for (int64_t j = 0; j < n; j++) acc[idx[j]] = acc[idx[j]] + g[j];
}

/* AdaQAT's weight normalisation t / d (d = max(max|t|, min), t = tanh(w)), backward, in two passes around
 * torch's sum: bfq_tanhnorm_prods writes p = -g * ((t / d) / d), the products whose sum is d's gradient
 * (DivBackward0); bfq_tanhnorm_grad writes t's gradient, g / d plus the max's share routed through abs
 * (``share`` at the one maximum ``first``, 0 elsewhere, times sgn(t): autograd adds those zeros too). */
void bfq_tanhnorm_prods(const float *restrict g, const float *restrict t, int64_t n, float d, float *restrict p) {
    for (int64_t j = 0; j < n; j++) p[j] = -g[j] * ((t[j] / d) / d);
}

void bfq_tanhnorm_grad(const float *restrict g, const float *restrict t, int64_t n, float d, int64_t first,
                       float share, float *restrict gt) {
    for (int64_t j = 0; j < n; j++) gt[j] = g[j] / d + 0.0f * sgn_of(t[j]);
    if (first >= 0) gt[first] = g[first] / d + share * sgn_of(t[first]);
}

/* bfq_tanhnorm_grad followed by tanh's backward, gt * (1 - t * t), in the same pass: w's gradient. ``fused``:
 * 1 - t * t with one rounding (fmaf), as torch's kernel computes it where its compiler contracted it into a
 * fused multiply-add, else two roundings - the caller picks the one torch's tanh_backward gives on this
 * machine (bfq_tanh_backward below, compared once). */
static inline float tanh_slope(float t, int fused) { return fused ? fmaf(-t, t, 1.0f) : 1.0f - t * t; }

void bfq_tanhnorm_grad_w(const float *restrict g, const float *restrict t, int64_t n, float d, int64_t first,
                         float share, int fused, float *restrict gw) {
    if (fused)
        for (int64_t j = 0; j < n; j++) gw[j] = (g[j] / d + 0.0f * sgn_of(t[j])) * tanh_slope(t[j], 1);
    else
        for (int64_t j = 0; j < n; j++) gw[j] = (g[j] / d + 0.0f * sgn_of(t[j])) * tanh_slope(t[j], 0);
    if (first >= 0) gw[first] = (g[first] / d + share * sgn_of(t[first])) * tanh_slope(t[first], fused);
}

/* AdaQAT's tanh-normalised weight and its learned-width quantizer in one pass each way (the two nodes
 * tanh_normalize and quant_learned, whose passes are bfq_forward / bfq_backward at mask 0 - a weight's
 * straight-through clamp - and bfq_tanhnorm_*): forward x = t / d, out = clamp(rint(x / s), lo, hi) * s;
 * backward, with gx = (g * s) / s the normalised weight's gradient: p1 = g * clamp(q), p2 = (g * s) * (y / s)
 * (the scale's products, want_s), p3 = -gx * ((t / d) / d) (d's products) and gw = (gx / d + 0 * sgn(t)) *
 * tanh's slope - the element at the maximum is finished by the caller once d's gradient is summed. */
void bfq_tanhq_forward(const float *restrict t, int64_t n, float d, float s, float lo, float hi, float *restrict out) {
    for (int64_t j = 0; j < n; j++) out[j] = clamp_to(__builtin_rintf((t[j] / d) / s), lo, hi) * s;
}

static inline __attribute__((always_inline)) void tanhq_backward(
        const float *restrict t, const float *restrict g, int64_t n, float d, float s, float lo, float hi, int want_s,
        int fused, float *restrict p1, float *restrict p2, float *restrict p3, float *restrict gw) {
    for (int64_t j = 0; j < n; j++) {
        const float x = t[j] / d, y = x / s, q = __builtin_rintf(y);
        const float gc = g[j] * s, gx = gc / s;
        if (want_s) {
            p1[j] = g[j] * clamp_to(q, lo, hi);
            p2[j] = gc * (y / s);
        }
        p3[j] = -gx * ((t[j] / d) / d);
        gw[j] = (gx / d + 0.0f * sgn_of(t[j])) * tanh_slope(t[j], fused);
    }
}

void bfq_tanhq_backward(const float *restrict t, const float *restrict g, int64_t n, float d, float s, float lo,
                        float hi, int want_s, int fused, float *restrict p1, float *restrict p2, float *restrict p3,
                        float *restrict gw) {
    if (want_s && fused) tanhq_backward(t, g, n, d, s, lo, hi, 1, 1, p1, p2, p3, gw);
    else if (want_s) tanhq_backward(t, g, n, d, s, lo, hi, 1, 0, p1, p2, p3, gw);
    else if (fused) tanhq_backward(t, g, n, d, s, lo, hi, 0, 1, p1, p2, p3, gw);
    else tanhq_backward(t, g, n, d, s, lo, hi, 0, 0, p1, p2, p3, gw);
}

/* bfq_tanhq_backward with the sums of p1, p2 (want_s) and p3 in torch's order (out[0..2], bfq_sum) instead
 * of those products; gw written. */
void bfq_tanhq_backward_sums(const float *t, const float *g, int64_t n, float d, float s, float lo, float hi,
                             int want_s, int fused, int w, float *gw, float *out) {
    bfq_sum sm[3];
    bfq_block b[3];
    for (int k = 0; k < 3; k++) sum_init(&sm[k], n, w);
    out[0] = out[1] = 0.0f;   /* (not summed without want_s) */
    const int64_t bl = 4 * w, full = sm[0].blocks * bl;
    for (int64_t j = 0; j <= full; j += bl) {
        const int64_t len = j < full ? bl : n - j;
        bfq_tanhq_backward(t + j, g + j, len, d, s, lo, hi, want_s, fused, b[0], b[1], b[2], gw + j);
        sums_take(sm, b, want_s ? 0 : 2, 3, j == full, len, out);
    }
}

/* tanh's backward alone, a * (1 - t * t), for that comparison */
void bfq_tanh_backward(const float *restrict a, const float *restrict t, int64_t n, int fused, float *restrict out) {
    for (int64_t j = 0; j < n; j++) out[j] = a[j] * tanh_slope(t[j], fused);
}
