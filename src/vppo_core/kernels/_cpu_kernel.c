/* Row statistics of [rows, vocab] logits in one read, for the "cpu" backend (see _cpu.py), and at the
 * end of the file the gradients from them.
 *
 * Built at first use by the system C compiler (-O3 -march=native); loaded with ctypes. Each thread
 * takes a contiguous range of rows. A row is read in blocks of BLOCK entries: bf16/fp16 blocks are
 * widened into an L1-resident float32 buffer (fp32 rows are read in place) while the block maxima are
 * taken, then one pass computes the block's float32 sums, which are merged into the row's float64
 * sums with the log-sum-exp rescaling. The next block is prefetched during the current one's
 * arithmetic, so the memory stream and the exponentials overlap.
 *
 * With c = log2(e) / T, a block maximum m and e_j = 2^{c (x_j - m)}, the sums are
 *   s = sum e_j,  h = sum e_j (x_j - m),  d = sum_{x_j > -inf} e_j (x_j - y_j),  b = sum sqrt(e^x_j e^y_j),
 * (d is formed centred, as sum e_j ((x_j - m_x) - (y_j - m_y)), and the block's m_x - m_y is added back
 * in float64 when the blocks are merged), and per row the output is (double, 7 columns; unused ones 0):
 *   mode 0, KL:        M_x, S_x, D,   M_y, S_y
 *   mode 1, Hellinger: M_x, S_x, M_y, S_y, B      (B at the shift (M_x + M_y) / 2)
 *   mode 2, entropy:   M_x, S_x, H_x              (y is not read)
 *   mode 3, joint:     M_x, S_x, D,   M_y, S_y, H_x, H_y
 * A NaN entry makes the row's sums NaN. An all -inf row gives M = -inf and S = 0.
 *
 * Two implementations of the block pass: AVX-512 intrinsics (2^t from a 16-entry table of 2^{j/16}
 * and a cubic, relative error < 4e-8), and a portable one (round-to-nearest and a degree-6
 * polynomial, relative error < 1e-8 before float rounding) that the compiler vectorises for the
 * target it has; VPPO_PORTABLE forces the latter.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    !defined(VPPO_PORTABLE)
#include <immintrin.h>
#define VPPO_AVX512 1
#else
#define VPPO_AVX512 0
#endif

#define BLOCK 2048
#define NCOL 7

enum { MODE_KL = 0, MODE_HELLINGER = 1, MODE_ENTROPY = 2, MODE_JOINT = 3, MODE_JSD = 4, MODE_JSD_SUMS = 5 };
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* Block sums, float32. */
typedef struct {
    float sx, d, hx, sy, hy, b;
} sums_t;

int vppo_cpu_simd_width(void) { return VPPO_AVX512 ? 16 : 1; }

/* ---------------------------------------------------------------------------------------- portable */
#if !VPPO_AVX512

/* 2^t for t <= 0 (NaN stays NaN; t < -126 and -inf give 0). */
static inline float exp2_neg(float t) {
    float tc = t < -200.0f ? -200.0f : t; /* keeps NaN */
    float r = tc + 12582912.0f;           /* 1.5 * 2^23: rounds tc to an integer in the low mantissa bits */
    int32_t ri;
    memcpy(&ri, &r, 4);
    float f = tc - (r - 12582912.0f);
    float p = 1.4990877805142751e-4f;
    p = p * f + 1.3393085696855318e-3f;
    p = p * f + 9.61967356616383e-3f;
    p = p * f + 5.550347346343762e-2f;
    p = p * f + 2.4022637389912865e-1f;
    p = p * f + 6.931471961626714e-1f;
    p = p * f + 1.0000000016029804f;
    int32_t e = ri - (0x4B400000 - 127); /* the biased exponent of 2^round(tc) */
    e = e < 1 ? 0 : e;                    /* below 2^-126: 0 */
    int32_t bits = e << 23;
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13); /* inf, NaN */
    } else if (exp == 0) {                    /* zero, subnormal */
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float widen(const void *src, int dtype, int64_t i) {
    if (dtype == DT_F32) return ((const float *)src)[i];
    uint16_t h = ((const uint16_t *)src)[i];
    if (dtype == DT_F16) return half_to_float(h);
    uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* Widen n entries into dst (fp32 rows are read in place) and return their maximum. A NaN entry may or
 * may not show in the maximum; either way it makes the block's sums NaN (2^NaN = NaN), hence the row's. */
static float load_portable(const void *src, int dtype, int64_t n, float *dst, const float **out) {
    float m = -INFINITY;
    if (dtype == DT_F32) {
        const float *s = (const float *)src;
#pragma omp simd reduction(max : m)
        for (int64_t i = 0; i < n; i++) m = s[i] > m ? s[i] : m;
        *out = s;
        return m;
    }
    if (dtype == DT_BF16) {
        const uint16_t *h = (const uint16_t *)src;
#pragma omp simd reduction(max : m)
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)h[i] << 16;
            float v;
            memcpy(&v, &u, 4);
            dst[i] = v;
            m = v > m ? v : m;
        }
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = widen(src, dtype, i);
#pragma omp simd reduction(max : m)
        for (int64_t i = 0; i < n; i++) m = dst[i] > m ? dst[i] : m;
    }
    *out = dst;
    return m;
}

static inline sums_t block_portable(const float *x, const float *y, int64_t n, float mx, float my, float c, int mode,
                                    const char *pfx, const char *pfy, int64_t pf_step) {
    for (int64_t off = 0; off < n * pf_step; off += 64) { /* the next block, before this one's arithmetic */
        __builtin_prefetch(pfx + off);
        if (mode != MODE_ENTROPY) __builtin_prefetch(pfy + off);
    }
    /* (x - m) c, not x c - m c: a rounded m c would shift each block by a different error */
    float sx_ = mx == -INFINITY ? 0.0f : mx, sy_ = my == -INFINITY ? 0.0f : my;
    float sx = 0, d = 0, hx = 0, sy = 0, hy = 0, b = 0;
    if (mode == MODE_ENTROPY) {
#pragma omp simd reduction(+ : sx, hx)
        for (int64_t i = 0; i < n; i++) {
            float t = (x[i] - sx_) * c, e = exp2_neg(t);
            sx += e;
            hx += e > 0.0f ? e * t : 0.0f;
        }
    } else {
#pragma omp simd reduction(+ : sx, d, hx, sy, hy, b)
        for (int64_t i = 0; i < n; i++) {
            float tx = (x[i] - sx_) * c, ty = (y[i] - sy_) * c;
            float ex = exp2_neg(tx), ey = exp2_neg(ty);
            sx += ex;
            sy += ey;
            if (mode == MODE_HELLINGER) {
                b += sqrtf(ex * ey);
            } else {
                d += x[i] != -INFINITY ? ex * (tx - ty) : 0.0f; /* centred: see the merge */
                if (mode == MODE_JOINT) {
                    hx += ex > 0.0f ? ex * tx : 0.0f;
                    hy += ey > 0.0f ? ey * ty : 0.0f;
                }
            }
        }
    }
    sums_t r = {sx, d / c, hx / c, sy, hy / c, b};
    return r;
}

#endif

/* ------------------------------------------------------------------------------------------ AVX-512 */
#if VPPO_AVX512
static const int32_t EXP2_16THS[16] = {
    0x3f800000, 0x3f85aac3, 0x3f8b95c2, 0x3f91c3d3, 0x3f9837f0, 0x3f9ef532, 0x3fa5fed7, 0x3fad583f,
    0x3fb504f3, 0x3fbd08a4, 0x3fc5672a, 0x3fce248c, 0x3fd744fd, 0x3fe0ccdf, 0x3feac0c7, 0x3ff5257d,
};

/* 2^t for t <= 0, and the mask of t >= -126 (true for NaN): the table 2^{j/16} times a cubic on
 * [-1/32, 1/32], with the exponent added to the table entry's bits. Outside the mask the result is 0. */
static inline __m512 exp2_v(__m512 t, __m512i table, __mmask16 *live) {
    __m512 r = _mm512_add_ps(t, _mm512_set1_ps(786432.0f)); /* 1.5 * 2^19: round to a multiple of 1/16 */
    __m512 f = _mm512_reduce_ps(t, (4 << 4) | _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* t - that */
    __m512i k = _mm512_castps_si512(r); /* low bits: 16 t rounded (two's complement) */
    __m512i scale = _mm512_add_epi32(_mm512_permutexvar_epi32(k, table),
                                     _mm512_and_si512(_mm512_slli_epi32(k, 19), _mm512_set1_epi32(-8388608)));
    __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.055358467750832585f), _mm512_set1_ps(0.2402348232317483f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931472692489311f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999999991581676f));
    *live = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
    return _mm512_maskz_mul_ps(*live, p, _mm512_castsi512_ps(scale));
}

/* Widen n entries into dst (fp32 rows are read in place) and return their maximum. A NaN entry may or
 * may not show in the maximum; either way it makes the block's sums NaN (2^NaN = NaN), hence the row's. */
static float load_avx512(const void *src, int dtype, int64_t n, float *dst, const float **out) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    if (dtype == DT_BF16) {
        /* 32 entries at a time: interleaving with zeros widens bf16 to float32 in one shuffle per 16
         * (the order within the block changes, the same for x and y, which the sums do not see) */
        const __m512i zero = _mm512_setzero_si512();
        for (; i + 32 <= n; i += 32) {
            __m512i h = _mm512_loadu_si512((const uint16_t *)src + i);
            __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, h));
            __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, h));
            _mm512_store_ps(dst + i, lo);
            _mm512_store_ps(dst + i + 16, hi);
            m = _mm512_max_ps(m, _mm512_max_ps(lo, hi));
        }
    }
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 v;
        if (dtype == DT_F32) {
            v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, (const float *)src + i);
        } else {
            __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)src + i);
            v = dtype == DT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                 : _mm512_cvtph_ps(h);
            _mm512_store_ps(dst + i, v);
        }
        m = _mm512_mask_max_ps(m, k, m, v); /* the tail's missing lanes (0.0 for 16-bit loads) stay out */
    }
    *out = dtype == DT_F32 ? (const float *)src : dst;
    return _mm512_reduce_max_ps(m);
}

typedef struct {
    __m512 sx, d, hx, sy, hy, b;
} acc_t;

/* One vector of 16 entries (the lanes outside k are -inf, which add nothing). */
static inline __attribute__((always_inline)) void step_avx512(acc_t *a, const float *x, const float *y, __mmask16 k,
                                                             __m512 vmx, __m512 vmy, __m512 vc, __m512i table,
                                                             int mode) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __mmask16 lx, ly;
    __m512 xv = _mm512_mask_loadu_ps(ninf, k, x);
    __m512 tx = _mm512_mul_ps(_mm512_sub_ps(xv, vmx), vc);
    __m512 ex = exp2_v(tx, table, &lx);
    a->sx = _mm512_add_ps(a->sx, ex);
    if (mode == MODE_ENTROPY) {
        a->hx = _mm512_mask3_fmadd_ps(ex, tx, a->hx, lx);
        return;
    }
    __m512 yv = _mm512_mask_loadu_ps(ninf, k, y);
    __m512 ty = _mm512_mul_ps(_mm512_sub_ps(yv, vmy), vc);
    __m512 ey = exp2_v(ty, table, &ly);
    a->sy = _mm512_add_ps(a->sy, ey);
    if (mode == MODE_HELLINGER) {
        a->b = _mm512_add_ps(a->b, _mm512_sqrt_ps(_mm512_mul_ps(ex, ey)));
        return;
    }
    __mmask16 finite_x = _mm512_cmp_ps_mask(xv, ninf, _CMP_NEQ_UQ);
    a->d = _mm512_mask3_fmadd_ps(ex, _mm512_sub_ps(tx, ty), a->d, finite_x); /* centred: see the merge */
    if (mode == MODE_JOINT) {
        a->hx = _mm512_mask3_fmadd_ps(ex, tx, a->hx, lx);
        a->hy = _mm512_mask3_fmadd_ps(ey, ty, a->hy, ly);
    }
}

static inline sums_t block_avx512(const float *x, const float *y, int64_t n, float mx, float my, float c, int mode,
                                  const char *pfx, const char *pfy, int64_t pf_step) {
    const __m512i table = _mm512_loadu_si512(EXP2_16THS);
    const __m512 vc = _mm512_set1_ps(c);
    /* (x - m) c, not x c - m c: a rounded m c would shift each block by a different error */
    const __m512 vmx = _mm512_set1_ps(mx == -INFINITY ? 0.0f : mx), vmy = _mm512_set1_ps(my == -INFINITY ? 0.0f : my);
    acc_t a = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
               _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) { /* full vectors: no lane mask to build */
        _mm_prefetch(pfx + i * pf_step, _MM_HINT_T0);
        if (mode != MODE_ENTROPY) _mm_prefetch(pfy + i * pf_step, _MM_HINT_T0);
        step_avx512(&a, x + i, y + i, (__mmask16)0xFFFF, vmx, vmy, vc, table, mode);
    }
    if (i < n) step_avx512(&a, x + i, y + i, (__mmask16)((1u << (n - i)) - 1), vmx, vmy, vc, table, mode);
    sums_t r = {_mm512_reduce_add_ps(a.sx), _mm512_reduce_add_ps(a.d) / c, _mm512_reduce_add_ps(a.hx) / c,
                _mm512_reduce_add_ps(a.sy), _mm512_reduce_add_ps(a.hy) / c, _mm512_reduce_add_ps(a.b)};
    return r;
}
#endif

#if VPPO_AVX512
#define load_block load_avx512
#define block_pass block_avx512
#else
#define load_block load_portable
#define block_pass block_portable
#endif

/* ------------------------------------------------------------------------------------- row merging */

/* 2^{c (from - to)}, the weight that moves sums at shift `from` to shift `to` >= from; 0 if from = -inf. */
static inline double weight(double from, double to, double c) { return from == -INFINITY ? 0.0 : exp2(c * (from - to)); }

typedef struct {
    double m, s, h; /* running maximum, sum and entropy sum of one input */
} side_t;

/* Merge a block (maximum mb, sums sb, hb) into a running side; returns the weights (old, block). */
static inline void merge_side(side_t *r, float mb, float sb, float hb, double c, double *w_old, double *w_blk) {
    double m = r->m, mn;
    if (mb != mb || m != m) { /* NaN block maximum: the row is NaN */
        r->m = NAN, r->s = NAN, r->h = NAN, *w_old = NAN, *w_blk = NAN;
        return;
    }
    mn = (double)mb > m ? (double)mb : m;
    *w_old = weight(m, mn, c), *w_blk = weight(mb, mn, c);
    double h = (*w_old > 0 ? *w_old * (r->h + (m - mn) * r->s) : 0.0) +
               (*w_blk > 0 ? *w_blk * ((double)hb + ((double)mb - mn) * (double)sb) : 0.0);
    r->s = *w_old * r->s + *w_blk * (double)sb;
    r->h = h, r->m = mn;
}

typedef struct {
    const char *x, *y;
    int64_t row0, row1, vocab, stride_x, stride_y;
    int dtype, mode;
    double c;
    double *out;
} job_t;

static void *run_rows(void *arg) {
    const job_t *j = (const job_t *)arg;
    const int64_t es = j->dtype == DT_F32 ? 4 : 2;
    const float c = (float)j->c;
    float bx[BLOCK] __attribute__((aligned(64))), by[BLOCK] __attribute__((aligned(64)));
    for (int64_t row = j->row0; row < j->row1; row++) {
        const char *xr = j->x + row * j->stride_x * es, *yr = j->y + row * j->stride_y * es;
        side_t sx = {-INFINITY, 0, 0}, sy = {-INFINITY, 0, 0};
        double d = 0, b = 0;
        for (int64_t b0 = 0; b0 < j->vocab; b0 += BLOCK) {
            int64_t n = j->vocab - b0 < BLOCK ? j->vocab - b0 : BLOCK;
            const float *x, *y = NULL;
            float mx, my = -INFINITY;
            sums_t s;
            mx = load_block(xr + b0 * es, j->dtype, n, bx, &x);
            if (j->mode != MODE_ENTROPY) my = load_block(yr + b0 * es, j->dtype, n, by, &y);
            /* the next block is prefetched during this one's arithmetic */
            const char *px = xr + (b0 + BLOCK) * es, *py = yr + (b0 + BLOCK) * es;
            switch (j->mode) { /* a constant mode per call site: each is compiled for its mode */
            case MODE_KL: s = block_pass(x, y, n, mx, my, c, MODE_KL, px, py, es); break;
            case MODE_HELLINGER: s = block_pass(x, y, n, mx, my, c, MODE_HELLINGER, px, py, es); break;
            case MODE_ENTROPY: s = block_pass(x, x, n, mx, mx, c, MODE_ENTROPY, px, px, es); break;
            default: s = block_pass(x, y, n, mx, my, c, MODE_JOINT, px, py, es); break;
            }
            double mx_old = sx.m, my_old = sy.m, wxo, wxb, wyo = 0, wyb = 0;
            merge_side(&sx, mx, s.sx, s.hx, j->c, &wxo, &wxb);
            /* the block's d is centred, sum e_j ((x_j - m_x) - (y_j - m_y)), so that no rounding of x - y
             * proportional to a common offset of the inputs enters; the shift m_x - m_y is added back here,
             * in float64, against the same float64 weights as S_x (so D / S_x keeps it exactly) */
            double shift = (mx == -INFINITY ? 0.0 : (double)mx) - (my == -INFINITY ? 0.0 : (double)my);
            /* a block whose weight underflowed adds nothing, except a non-finite d: +inf (a finite x_j
             * against y_j = -inf) or NaN (0 * inf) must still reach the row, which `kl_sum` reads as +inf */
            d = wxo * d + (wxb > 0 ? wxb * ((double)s.d + shift * (double)s.sx) : (isfinite(s.d) ? 0.0 : (double)s.d));
            if (j->mode != MODE_ENTROPY) merge_side(&sy, my, s.sy, s.hy, j->c, &wyo, &wyb);
            if (j->mode == MODE_HELLINGER) {
                /* B is kept at the shift (M_x + M_y) / 2: each part moves by half of each maximum's move */
                double wo = mx_old == -INFINITY || my_old == -INFINITY ? 0.0 : sqrt(wxo * wyo);
                double wb = mx == -INFINITY || my == -INFINITY ? 0.0 : sqrt(wxb * wyb);
                b = (wo > 0 ? wo * b : 0.0) + (wb > 0 ? wb * (double)s.b : 0.0);
                if (mx != mx || my != my) b = NAN;
            }
        }
        double *o = j->out + row * NCOL;
        memset(o, 0, NCOL * sizeof(double));
        o[0] = sx.m, o[1] = sx.s;
        if (j->mode == MODE_KL || j->mode == MODE_JOINT) o[2] = d, o[3] = sy.m, o[4] = sy.s;
        if (j->mode == MODE_HELLINGER) o[2] = sy.m, o[3] = sy.s, o[4] = b;
        if (j->mode == MODE_ENTROPY) o[2] = sx.h;
        if (j->mode == MODE_JOINT) o[5] = sx.h, o[6] = sy.h;
    }
    return NULL;
}

#define MAX_THREADS 256

/* The number of threads to use for `rows` rows: 1 to MAX_THREADS, at most one a row. */
static int thread_count(int threads, int64_t rows) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)(rows > 0 ? rows : 1);
    return threads;
}

/* Run fn on each of the n jobs (`size` bytes apart): jobs 1.. on new threads, job 0 on this one; the
 * jobs of threads that could not start run here afterwards. */
static void run_jobs(void *(*fn)(void *), char *jobs, size_t size, int n) {
    pthread_t ids[MAX_THREADS];
    int started = 0, rc = 0;
    for (int t = 1; t < n; t++) {
        if (pthread_create(&ids[t], NULL, fn, jobs + (size_t)t * size) != 0) {
            rc = 1;
            break;
        }
        started = t;
    }
    fn(jobs);
    for (int t = 1; t <= started; t++) pthread_join(ids[t], NULL);
    if (rc)
        for (int t = started + 1; t < n; t++) fn(jobs + (size_t)t * size);
}

/* Fill out[rows, 7] (float64) for the rows of x (and y), row i at x + i * stride_x elements. */
int vppo_cpu_row_stats(const void *x, const void *y, int64_t rows, int64_t vocab, int64_t stride_x, int64_t stride_y,
                       int dtype, int mode, double c, double *out, int threads) {
    job_t jobs[MAX_THREADS];
    threads = thread_count(threads, rows);
    for (int t = 0; t < threads; t++) {
        job_t j = {(const char *)x, (const char *)y, rows * t / threads, rows * (t + 1) / threads, vocab,
                   stride_x, stride_y, dtype, mode, c, out};
        jobs[t] = j;
    }
    run_jobs(run_rows, (char *)jobs, sizeof(job_t), threads);
    return 0;
}

/* ======================================================================================= backward
 *
 * Gradients of [rows, vocab] logits from the row statistics the forward saved, one read of each input
 * and one write of each gradient (see _cpu.py for the formulas and how the row constants are formed).
 * Per row, float32 constants (GCOL columns, unused ones ignored):
 *   G_KX, G_RX: p_j = 2^{(x_j - KX) c - RX}  (KX = lse_x T rounded, RX the base-2 remainder), same for q
 *   G_G:        the upstream gradient over T of the KL (mode 0), Hellinger (1) or entropy (2) term
 *   G_RS:       the remainders' difference in natural units: log(p_j/q_j) = ((x_j - KX) - (y_j - KY))/T - RS
 *   G_AM:       the KL, a_x - (lse_x - lse_y); Hellinger: G_BC, the Bhattacharyya coefficient
 *   G_KA*, G_RA*, G_GH*: the entropy's centre (x_j - KA)/T - RA = log-mean shift, and its gradient scale
 *   JSD (mode 4): G_AM and G_AY hold a_x = sum p log(p/m) and a_y = sum q log(q/m), m = (p + q)/2
 * Mode 5 (MODE_JSD_SUMS) is the JSD's second forward sweep: it writes (a_x, a_y) per row (float64, into
 * `sums`) from G_KX..G_RY instead of gradients. log(p/m) is formed as log(2p / (p + q)), exactly 0 where
 * p == q, as the other backends form it.
 * A row whose gradient scales are all exactly 0 gets exactly 0, without reading it.
 */
#define GCOL 16
enum { G_KX, G_RX, G_KY, G_RY, G_G, G_RS, G_AM, G_KAX, G_RAX, G_GHX, G_KAY, G_RAY, G_GHY, G_AY };
#define G_BC G_AM

typedef struct {
    const char *x, *y;
    char *gx, *gy; /* NULL where that gradient is not needed */
    int64_t row0, row1, seq, vocab, sxb, sxs, syb, sys;
    int dtype, mode;
    float c, inv_t;
    const float *k;
    double *sums; /* MODE_JSD_SUMS: [rows, 2] */
} gjob_t;

#if VPPO_AVX512
static inline __m512 load16(const void *src, int dtype, int64_t i, __mmask16 m) {
    if (dtype == DT_F32) return _mm512_maskz_loadu_ps(m, (const float *)src + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)src + i);
    if (dtype == DT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* float32 -> the dtype, rounded to nearest even (bf16: NaN -> 0x7FC0, as torch converts) */
static inline void store16(void *dst, int dtype, int64_t i, __mmask16 m, __m512 v) {
    if (dtype == DT_F32) {
        _mm512_mask_storeu_ps((float *)dst + i, m, v);
        return;
    }
    __m256i h;
    if (dtype == DT_F16) {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_mask_storeu_epi16((uint16_t *)dst + i, m, h);
}

static void grad_row_avx512(const gjob_t *j, const char *xr, const char *yr, char *gxr, char *gyr, const float *k) {
    const __m512i table = _mm512_loadu_si512(EXP2_16THS);
    const __m512 c = _mm512_set1_ps(j->c), it = _mm512_set1_ps(j->inv_t), zero = _mm512_setzero_ps();
    const __m512 kx = _mm512_set1_ps(k[G_KX]), rx = _mm512_set1_ps(k[G_RX]), ky = _mm512_set1_ps(k[G_KY]),
                 ry = _mm512_set1_ps(k[G_RY]), g = _mm512_set1_ps(k[G_G]), rs = _mm512_set1_ps(k[G_RS]), am = _mm512_set1_ps(k[G_AM]), kax = _mm512_set1_ps(k[G_KAX]),
                 rax = _mm512_set1_ps(k[G_RAX]), ghx = _mm512_set1_ps(k[G_GHX]), kay = _mm512_set1_ps(k[G_KAY]),
                 ray = _mm512_set1_ps(k[G_RAY]), ghy = _mm512_set1_ps(k[G_GHY]);
    const __mmask16 live = k[G_G] != 0.0f ? 0xFFFF : 0, live_hx = k[G_GHX] != 0.0f ? 0xFFFF : 0,
                    live_hy = k[G_GHY] != 0.0f ? 0xFFFF : 0;
    const int mode = j->mode, dt = j->dtype;
    for (int64_t i = 0; i < j->vocab; i += 16) {
        __mmask16 m = j->vocab - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (j->vocab - i)) - 1), lv;
        __m512 xv = load16(xr, dt, i, m), dx = _mm512_sub_ps(xv, kx); /* exact near the row's top */
        __m512 p = exp2_v(_mm512_fmsub_ps(dx, c, rx), table, &lv);
        __mmask16 px = _mm512_cmp_ps_mask(p, zero, _CMP_GT_OQ); /* p > 0 (false for NaN) */
        if (mode == MODE_ENTROPY) { /* (gxr is never NULL here) */
            /* -g p ((x - KA)/T - RA) */
            __m512 cx = _mm512_fmsub_ps(_mm512_sub_ps(xv, kax), it, rax);
            store16(gxr, dt, i, m, _mm512_maskz_mul_ps(live & px, _mm512_mul_ps(g, p), _mm512_sub_ps(zero, cx)));
            continue;
        }
        __m512 yv = load16(yr, dt, i, m), dy = _mm512_sub_ps(yv, ky);
        /* q: for gy, and for Hellinger's gx (the KL's gx needs only log q, from dy) */
        __m512 q = gyr || mode == MODE_HELLINGER ? exp2_v(_mm512_fmsub_ps(dy, c, ry), table, &lv) : zero;
        __m512 gxv, gyv;
        if (mode == MODE_HELLINGER) {
            __m512 root = _mm512_sqrt_ps(_mm512_mul_ps(p, q)), hg = _mm512_mul_ps(_mm512_set1_ps(0.5f), g);
            gxv = _mm512_maskz_mul_ps(live & px, hg, _mm512_fmsub_ps(am, p, root));
            gyv = _mm512_maskz_mul_ps(live, hg, _mm512_fmsub_ps(am, q, root));
        } else {
            __m512 cv = _mm512_fmsub_ps(_mm512_sub_ps(dx, dy), it, rs); /* log(p/q), no x - y rounding */
            gxv = _mm512_maskz_mul_ps(live & px, _mm512_mul_ps(g, p), _mm512_sub_ps(cv, am));
            gyv = _mm512_maskz_mul_ps(live, g, _mm512_sub_ps(q, p));
            if (mode == MODE_JOINT) {
                __mmask16 qy = _mm512_cmp_ps_mask(q, zero, _CMP_GT_OQ);
                __m512 cx = _mm512_fmsub_ps(_mm512_sub_ps(xv, kax), it, rax);
                __m512 cy = _mm512_fmsub_ps(_mm512_sub_ps(yv, kay), it, ray);
                gxv = _mm512_add_ps(gxv, _mm512_maskz_mul_ps(live_hx & px, _mm512_mul_ps(ghx, p), _mm512_sub_ps(zero, cx)));
                gyv = _mm512_add_ps(gyv, _mm512_maskz_mul_ps(live_hy & qy, _mm512_mul_ps(ghy, q), _mm512_sub_ps(zero, cy)));
            }
        }
        if (gxr) store16(gxr, dt, i, m, gxv);
        if (gyr) store16(gyr, dt, i, m, gyv);
    }
}
#define grad_row grad_row_avx512

/* Natural log of r > 0: r = m 2^e with m in [0.75, 1.5), log m = 2 atanh(s), s = (m - 1)/(m + 1),
 * |s| <= 0.2, a series to s^11 (truncation 3e-10 relative); exactly 0 at r = 1. 0 gives -inf, NaN NaN. */
static inline __m512 log_v(__m512 r) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 m = _mm512_getmant_ps(r, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero), e = _mm512_getexp_ps(r);
    __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.5f), _CMP_GE_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, one);
    __m512 s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one)), s2 = _mm512_mul_ps(s, s);
    __m512 poly = _mm512_fmadd_ps(s2, _mm512_set1_ps(1.0f / 11), _mm512_set1_ps(1.0f / 9));
    poly = _mm512_fmadd_ps(poly, s2, _mm512_set1_ps(1.0f / 7));
    poly = _mm512_fmadd_ps(poly, s2, _mm512_set1_ps(1.0f / 5));
    poly = _mm512_fmadd_ps(poly, s2, _mm512_set1_ps(1.0f / 3));
    __m512 s_2 = _mm512_add_ps(s, s), log_m = _mm512_fmadd_ps(_mm512_mul_ps(s_2, s2), poly, s_2);
    /* e ln 2 in two parts (the first exact for |e| < 2^9) */
    return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), log_m));
}

/* The JSD's terms of one row: its second forward sweep (sums != NULL: the row's a_x, a_y) or its
 * gradients dx = g/2 (p log(p/m) - p a_x), dy = g/2 (q log(q/m) - q a_y) (dx 0 where p = 0). */
static void jsd_row_avx512(const gjob_t *j, const char *xr, const char *yr, char *gxr, char *gyr, const float *k,
                           double *sums) {
    const __m512i table = _mm512_loadu_si512(EXP2_16THS);
    const __m512 c = _mm512_set1_ps(j->c), zero = _mm512_setzero_ps(), two = _mm512_set1_ps(2.0f);
    const __m512 kx = _mm512_set1_ps(k[G_KX]), rx = _mm512_set1_ps(k[G_RX]), ky = _mm512_set1_ps(k[G_KY]),
                 ry = _mm512_set1_ps(k[G_RY]), hg = _mm512_set1_ps(0.5f * k[G_G]), ax = _mm512_set1_ps(k[G_AM]),
                 ay = _mm512_set1_ps(k[G_AY]);
    const __mmask16 live = k[G_G] != 0.0f ? 0xFFFF : 0;
    const int dt = j->dtype;
    __m512 sx = zero, sy = zero;
    double tx = 0, ty = 0;
    for (int64_t i = 0; i < j->vocab; i += 16) {
        __mmask16 m = j->vocab - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (j->vocab - i)) - 1), lv;
        __m512 p = exp2_v(_mm512_fmsub_ps(_mm512_sub_ps(load16(xr, dt, i, m), kx), c, rx), table, &lv);
        __m512 q = exp2_v(_mm512_fmsub_ps(_mm512_sub_ps(load16(yr, dt, i, m), ky), c, ry), table, &lv);
        __m512 pq = _mm512_add_ps(p, q);
        /* p log(2p / (p + q)): 0 where p = 0 (kept NaN where p is NaN) */
        __mmask16 pz = _mm512_cmp_ps_mask(p, zero, _CMP_NEQ_UQ) & m, qz = _mm512_cmp_ps_mask(q, zero, _CMP_NEQ_UQ) & m;
        __m512 wp = _mm512_maskz_mul_ps(pz, p, log_v(_mm512_div_ps(_mm512_mul_ps(two, p), pq)));
        __m512 wq = _mm512_maskz_mul_ps(qz, q, log_v(_mm512_div_ps(_mm512_mul_ps(two, q), pq)));
        if (sums) {
            sx = _mm512_add_ps(sx, wp), sy = _mm512_add_ps(sy, wq);
            if ((i & (BLOCK - 1)) == BLOCK - 16) { /* float32 sums over blocks of BLOCK, then float64 */
                tx += _mm512_reduce_add_ps(sx), ty += _mm512_reduce_add_ps(sy);
                sx = zero, sy = zero;
            }
            continue;
        }
        __mmask16 px = _mm512_cmp_ps_mask(p, zero, _CMP_GT_OQ);
        if (gxr) store16(gxr, dt, i, m, _mm512_maskz_mul_ps(live & px, hg, _mm512_fnmadd_ps(p, ax, wp)));
        if (gyr) store16(gyr, dt, i, m, _mm512_maskz_mul_ps(live, hg, _mm512_fnmadd_ps(q, ay, wq)));
    }
    if (sums) sums[0] = tx + _mm512_reduce_add_ps(sx), sums[1] = ty + _mm512_reduce_add_ps(sy);
}
#define jsd_row jsd_row_avx512

#else

static inline uint16_t narrow_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if (v != v) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t narrow_f16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;   /* NaN */
    if (a >= 0x477FF000u) return sign | 0x7C00u;  /* rounds to infinity */
    if (a < 0x38800000u) {                         /* below 2^-14: a subnormal (or 0), in units of 2^-24 */
        float f;
        memcpy(&f, &a, 4);
        return sign | (uint16_t)lrintf(f * 16777216.0f); /* exact scaling; rint rounds to nearest even */
    }
    return sign | (uint16_t)((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13);
}

static void narrow(const float *src, int dtype, int64_t n, void *dst) {
    if (dtype == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == DT_BF16) {
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = narrow_bf16(src[i]);
    } else {
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = narrow_f16(src[i]);
    }
}

static void widen_block(const void *src, int dtype, int64_t n, float *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = widen(src, dtype, i);
}

static void grad_row_portable(const gjob_t *j, const char *xr, const char *yr, char *gxr, char *gyr, const float *k) {
    const int64_t es = j->dtype == DT_F32 ? 4 : 2;
    const float c = j->c, it = j->inv_t, kx = k[G_KX], rx = k[G_RX], ky = k[G_KY], ry = k[G_RY], g = k[G_G],
                rs = k[G_RS], am = k[G_AM], kax = k[G_KAX], rax = k[G_RAX], ghx = k[G_GHX],
                kay = k[G_KAY], ray = k[G_RAY], ghy = k[G_GHY];
    const int live = g != 0.0f, live_hx = ghx != 0.0f, live_hy = ghy != 0.0f, mode = j->mode;
    float bx[BLOCK] __attribute__((aligned(64))), by[BLOCK] __attribute__((aligned(64)));
    float ox[BLOCK] __attribute__((aligned(64))), oy[BLOCK] __attribute__((aligned(64)));
    for (int64_t b0 = 0; b0 < j->vocab; b0 += BLOCK) {
        int64_t n = j->vocab - b0 < BLOCK ? j->vocab - b0 : BLOCK;
        widen_block(xr + b0 * es, j->dtype, n, bx);
        if (mode != MODE_ENTROPY) widen_block(yr + b0 * es, j->dtype, n, by);
        if (mode == MODE_ENTROPY) {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                float p = exp2_neg((bx[i] - kx) * c - rx);
                ox[i] = live && p > 0.0f ? g * p * -((bx[i] - kax) * it - rax) : 0.0f;
            }
        } else if (mode == MODE_HELLINGER) {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                float p = exp2_neg((bx[i] - kx) * c - rx), q = exp2_neg((by[i] - ky) * c - ry);
                float root = sqrtf(p * q);
                ox[i] = live && p > 0.0f ? 0.5f * g * (am * p - root) : 0.0f;
                oy[i] = live ? 0.5f * g * (am * q - root) : 0.0f;
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < n; i++) {
                float dx = bx[i] - kx, dy = by[i] - ky; /* exact near each row's top */
                float p = exp2_neg(dx * c - rx), q = exp2_neg(dy * c - ry);
                float cv = (dx - dy) * it - rs; /* log(p/q), no rounding of x - y */
                float gx = live && p > 0.0f ? g * p * (cv - am) : 0.0f;
                float gy = live ? g * (q - p) : 0.0f;
                if (mode == MODE_JOINT) {
                    gx += live_hx && p > 0.0f ? ghx * p * -((bx[i] - kax) * it - rax) : 0.0f;
                    gy += live_hy && q > 0.0f ? ghy * q * -((by[i] - kay) * it - ray) : 0.0f;
                }
                ox[i] = gx, oy[i] = gy;
            }
        }
        if (gxr) narrow(ox, j->dtype, n, gxr + b0 * es);
        if (gyr) narrow(oy, j->dtype, n, gyr + b0 * es);
    }
}
#define grad_row grad_row_portable

static void jsd_row_portable(const gjob_t *j, const char *xr, const char *yr, char *gxr, char *gyr, const float *k,
                             double *sums) {
    const int64_t es = j->dtype == DT_F32 ? 4 : 2;
    const float c = j->c, kx = k[G_KX], rx = k[G_RX], ky = k[G_KY], ry = k[G_RY], hg = 0.5f * k[G_G], ax = k[G_AM],
                ay = k[G_AY];
    const int live = k[G_G] != 0.0f;
    float bx[BLOCK] __attribute__((aligned(64))), by[BLOCK] __attribute__((aligned(64)));
    float ox[BLOCK] __attribute__((aligned(64))), oy[BLOCK] __attribute__((aligned(64)));
    double tx = 0, ty = 0;
    for (int64_t b0 = 0; b0 < j->vocab; b0 += BLOCK) {
        int64_t n = j->vocab - b0 < BLOCK ? j->vocab - b0 : BLOCK;
        float sx = 0, sy = 0;
        widen_block(xr + b0 * es, j->dtype, n, bx);
        widen_block(yr + b0 * es, j->dtype, n, by);
        for (int64_t i = 0; i < n; i++) {
            float p = exp2_neg((bx[i] - kx) * c - rx), q = exp2_neg((by[i] - ky) * c - ry), pq = p + q;
            float wp = p != 0.0f ? p * logf(2.0f * p / pq) : 0.0f, wq = q != 0.0f ? q * logf(2.0f * q / pq) : 0.0f;
            sx += wp, sy += wq;
            ox[i] = live && p > 0.0f ? hg * (wp - p * ax) : 0.0f;
            oy[i] = live ? hg * (wq - q * ay) : 0.0f;
        }
        tx += sx, ty += sy;
        if (!sums && gxr) narrow(ox, j->dtype, n, gxr + b0 * es);
        if (!sums && gyr) narrow(oy, j->dtype, n, gyr + b0 * es);
    }
    if (sums) sums[0] = tx, sums[1] = ty;
}
#define jsd_row jsd_row_portable
#endif

static void *run_grad_rows(void *arg) {
    const gjob_t *j = (const gjob_t *)arg;
    const int64_t es = j->dtype == DT_F32 ? 4 : 2;
    for (int64_t row = j->row0; row < j->row1; row++) {
        const float *k = j->k + row * GCOL;
        int64_t b = row / j->seq, s = row % j->seq;
        char *gxr = j->gx ? j->gx + row * j->vocab * es : NULL, *gyr = j->gy && j->mode != MODE_ENTROPY ? j->gy + row * j->vocab * es : NULL;
        const char *xin = j->x + (b * j->sxb + s * j->sxs) * es, *yin = j->y + (b * j->syb + s * j->sys) * es;
        if (j->mode == MODE_JSD_SUMS) {
            jsd_row(j, xin, yin, NULL, NULL, k, j->sums + 2 * row);
            continue;
        }
        int zero = k[G_G] == 0.0f && (j->mode != MODE_JOINT || (k[G_GHX] == 0.0f && k[G_GHY] == 0.0f));
        if (zero) { /* a masked row: exactly 0, whatever it holds */
            if (gxr) memset(gxr, 0, (size_t)(j->vocab * es));
            if (gyr) memset(gyr, 0, (size_t)(j->vocab * es));
            continue;
        }
        if (j->mode == MODE_JSD)
            jsd_row(j, xin, yin, gxr, gyr, k, NULL);
        else
            grad_row(j, xin, yin, gxr, gyr, k);
    }
    return NULL;
}

/* Fill gx and gy, contiguous [batch * seq, vocab] in the inputs' dtype, for inputs [batch, seq, vocab]
 * with unit vocabulary stride and element strides (sxb, sxs), (syb, sys). A NULL gx or gy (gy always in
 * mode 2) is not computed: a caller that differentiates one input only writes (and maps) one gradient. */
int vppo_cpu_row_grads(const void *x, const void *y, void *gx, void *gy, int64_t batch, int64_t seq, int64_t vocab,
                       int64_t sxb, int64_t sxs, int64_t syb, int64_t sys, int dtype, int mode, double c, double inv_t,
                       const float *k, double *sums, int threads) {
    const int64_t rows = batch * seq;
    gjob_t jobs[MAX_THREADS];
    threads = thread_count(threads, rows);
    for (int t = 0; t < threads; t++) {
        gjob_t j = {(const char *)x, (const char *)y, (char *)gx, (char *)gy, rows * t / threads,
                    rows * (t + 1) / threads, seq, vocab, sxb, sxs, syb, sys, dtype, mode, (float)c, (float)inv_t, k, sums};
        jobs[t] = j;
    }
    run_jobs(run_grad_rows, (char *)jobs, sizeof(gjob_t), threads);
    return 0;
}
