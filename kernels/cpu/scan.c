/* Selective scan on the CPU: the fused four-route SS2D scan and the plain 1-D scan, fp32, inference.
 * The SS2D scan also reads and writes bf16 (x, delta, B, C and the result; A, D and the bias stay fp32):
 * values are widened to fp32 as they are copied into the work item's scratch rows, the states and sums are
 * fp32, and the result is rounded to bf16 (nearest even) as it is written.
 *
 * The recurrence of mamba-ssm's selective_scan_fn, per channel d and state n, along positions t:
 *     dt = softplus(delta[d, t] + bias[d])            (softplus optional in the 1-D scan)
 *     h[n] = exp(dt * A[d, n]) * h[n] + dt * u[d, t] * B[n, t]
 *     y[d, t] = sum_n h[n] * C[n, t] + D[d] * u[d, t]     (times silu(z[d, t]) when z is given)
 *
 * 1-D scan: a block of channels walks the positions together, so each step loads B[:, t] and C[:, t] once
 * for the block and keeps every channel's state in a small array the compiler holds in vector registers;
 * the exponentials of a channel are computed over n at once, inline (exp2_poly), and the softplus over the
 * block's channels at once (glibc's vector libm).
 * SS2D scan: route k walks the row-major grid by a position table (0 rows, 1 columns, 2 and 3 the same
 * reversed: the geometry of kernels.routes) with one channel per vector lane (see ss2d_item); B and C are
 * first copied into each route's step order; the four routes are summed and the four D skips added as one
 * x * sum_k D_k term. With AVX-512 the step is written with intrinsics (exp by vscalefps, softplus inline,
 * lane blocks moved by gather and scatter); elsewhere the same arithmetic in plain C for the compiler to
 * vectorise. Work items (batch, channel block) are shared by `threads` threads (see parallel); every item
 * owns its output rows, so no two threads write the same element.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_N 16
/* 8 channels x 16 states of fp32 state: 512 B, within L1 with B/C and the position table's lines. */
#define BLOCK_D 8

static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* bf16 is the top half of an fp32: widening is exact; narrowing rounds to nearest even (NaN stays NaN). */
static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } w;
    w.u = (uint32_t)v << 16;
    return w.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } w;
    w.f = f;
    if ((w.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((w.u >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((w.u + 0x7fffu + ((w.u >> 16) & 1u)) >> 16);
}

/* Element i of an fp32 or bf16 (`bf16`) array. */
static inline float load_at(const void *src, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)src)[i]) : ((const float *)src)[i];
}

#define LOG2E 1.44269504088896341f

/* 2^f for f in [-0.5, 0.5]: a degree-5 polynomial fitted for relative error (7.5e-8 in exact arithmetic,
 * 2.4e-7 evaluated in fp32). */
#define EXP2_C5 1.3276471e-3f
#define EXP2_C4 9.6755410e-3f
#define EXP2_C3 5.5507131e-2f
#define EXP2_C2 2.4022120e-1f
#define EXP2_C1 6.9314694e-1f
#define EXP2_C0 1.0000001f

/* 2^t in a form the compiler vectorises inline (no library call per vector): t = k + f with k the nearest
 * integer, 2^f by the polynomial, 2^k written into the exponent bits. t is clamped to [-126, 127]: a state
 * decay 2^(dt·A·log2 e) with A < 0 flushes to ~1e-38 instead of a denormal. The exponentials are the scans'
 * hot loop (N per channel and step), so callers fold log2(e) into A once. */
static inline float exp2_poly(float t) {
    t = t < -126.0f ? -126.0f : (t > 127.0f ? 127.0f : t);
    const float k = nearbyintf(t), f = t - k;
    float p = EXP2_C5;
    p = p * f + EXP2_C4;
    p = p * f + EXP2_C3;
    p = p * f + EXP2_C2;
    p = p * f + EXP2_C1;
    p = p * f + EXP2_C0;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)k + 127) << 23;
    return p * scale.f;
}

/* The 1-D scan: one channel block along its rows of L positions.
 * u, dl, z, out: row bases of channel d0 (row j at + j * L); b_ptr, c_ptr: the B and C rows of the block's
 * group (b_ptr[n * L + t]); skip: D of each channel (NULL: none); state: the last states (NULL: not kept). */
static inline __attribute__((always_inline)) void walk(
    const float *u, const float *dl, const float *z, float *out, const float *b_ptr, const float *c_ptr,
    const float *A, const float *bias, const float *skip, int64_t L, int nd, const int N, int softplus_dt,
    float *state) {
    float h[BLOCK_D][MAX_N], a[BLOCK_D][MAX_N], bv[MAX_N], cv[MAX_N];
    memset(h, 0, sizeof(h));
    for (int j = 0; j < nd; ++j)
        for (int n = 0; n < N; ++n) a[j][n] = A[j * N + n] * LOG2E; /* exp(dt·A) = 2^(dt·A·log2 e) */
    float xs[BLOCK_D], dts[BLOCK_D];
    for (int64_t t = 0; t < L; ++t) {
        for (int n = 0; n < N; ++n) {
            bv[n] = b_ptr[n * L + t];
            cv[n] = c_ptr[n * L + t];
        }
        for (int j = 0; j < BLOCK_D; ++j) { /* lanes past nd stay 0: the softplus below runs on all */
            xs[j] = j < nd ? u[j * L + t] : 0.0f;
            dts[j] = j < nd ? dl[j * L + t] + (bias ? bias[j] : 0.0f) : 0.0f;
        }
        /* softplus across the block's channels at once: vectorised like the exponentials below */
        if (softplus_dt) {
#pragma omp simd
            for (int j = 0; j < BLOCK_D; ++j) dts[j] = softplus(dts[j]);
        }
        for (int j = 0; j < nd; ++j) {
            const int64_t i = j * L + t;
            const float x = xs[j], dt = dts[j], dx = dt * x;
            float y = 0.0f;
#pragma omp simd reduction(+ : y)
            for (int n = 0; n < N; ++n) {
                const float hn = exp2_poly(dt * a[j][n]) * h[j][n] + dx * bv[n];
                h[j][n] = hn;
                y += hn * cv[n];
            }
            if (skip) y += skip[j] * x;
            if (z) {
                const float g = z[i];
                y *= g / (1.0f + expf(-g));
            }
            out[i] = y;
        }
    }
    if (state)
        for (int j = 0; j < nd; ++j)
            for (int n = 0; n < N; ++n) state[j * N + n] = h[j][n];
}

typedef struct {
    int64_t items, next;
    void (*run)(const void *args, int64_t item);
    const void *args;
} Pool;

static void *worker(void *arg) {
    Pool *pool = (Pool *)arg;
    for (;;) {
        const int64_t item = __atomic_fetch_add(&pool->next, 1, __ATOMIC_RELAXED);
        if (item >= pool->items) return NULL;
        pool->run(pool->args, item);
    }
}

/* Run run(args, 0..items-1) on `threads` threads, this one included. With OpenMP the threads are the
 * process's OpenMP team (in a PyTorch process, PyTorch's own: its idle threads would otherwise spin on the
 * cores these need); without, threads started here, and one that cannot be started leaves its share to the
 * others. */
static void parallel(int64_t items, int threads, void (*run)(const void *, int64_t), const void *args) {
    Pool pool = {items, 0, run, args};
    if (threads > 64) threads = 64;
    if (threads > items) threads = (int)items;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
    worker(&pool);
#else
    pthread_t ids[64];
    int started = 0;
    for (int i = 1; i < threads; ++i)
        if (pthread_create(&ids[started], NULL, worker, &pool) == 0) ++started;
    worker(&pool);
    for (int i = 0; i < started; ++i) pthread_join(ids[i], NULL);
#endif
}

/* ---- SS2D ------------------------------------------------------------------------------------------- */

typedef struct {
    const void *x, *delta; /* fp32, or bf16 with `bf16` (as are B, C and out) */
    const float *A, *D, *bias;
    const float *Bt, *Ct; /* (batch, 4, L, N): B and C of each route in its own step order, position-major */
    void *out;
    const int32_t *pos; /* (4, L): the row-major position route k visits at step t */
    int64_t batch, dim, L;
    int N;
    int channels_last; /* x and out are (batch, H, W, dim) instead of (batch, dim, H, W) */
    int bf16;          /* x, delta, B, C and out hold bf16 */
    int failed;        /* set when a work item could not allocate its scratch rows */
} SS2DArgs;

/* The SS2D scan keeps one channel per vector lane: a work item is a block of LANES channels, copied
 * position-major into scratch rows (LANES floats per position), so each step updates the N states of every
 * channel in the block with N full-width vector operations and no horizontal sums, and reads B[n, t],
 * C[n, t] of the route's step t from one contiguous row of N floats, broadcast to all lanes. */
#define LANES 16

#if defined(__AVX512F__)
#include <immintrin.h>

/* How many steps ahead the route walk prefetches its scratch rows. */
#define PREFETCH_STEPS 8

/* exp(dt·A) = 2^(dt·A·log2 e) with A·log2 e precomputed (a2): k = round(t), 2^(t−k) by the polynomial, times
 * 2^k by vscalefps, which needs no clamp: a decay below fp32's range becomes 0 (denormals are flushed, see
 * ss2d_item), an overflow inf. 9 vector instructions per 16 exponentials. */
static inline __m512 exp2_avx512(__m512 t) {
    const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, k);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP2_C5), f, _mm512_set1_ps(EXP2_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C0));
    return _mm512_scalef_ps(p, k);
}

/* log1p(u) = u·P(u) for u in [0, 1]: P of degree 8 fitted for relative error (3e-8 exact, 2.1e-7 in fp32). */
static const float LOG1P_C[9] = {5.2326913e-3f, -2.9505227e-2f, 7.8225933e-2f, -1.3663244e-1f, 1.9106007e-1f,
                                 -2.4842982e-1f, 3.3319098e-1f, -4.9999493e-1f, 9.9999994e-1f};

/* softplus(x) = max(x, 0) + log1p(exp(−|x|)), with exp by exp2_avx512 and log1p by the polynomial: no
 * library call, ~22 vector instructions per 16 values. */
static inline __m512 softplus_avx512(__m512 x) {
    const __m512 u = exp2_avx512(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(-LOG2E)));
    __m512 p = _mm512_set1_ps(LOG1P_C[0]);
    for (int i = 1; i < 9; ++i) p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(LOG1P_C[i]));
    return _mm512_fmadd_ps(u, p, _mm512_max_ps(x, _mm512_setzero_ps()));
}

/* One route, N states per lane: h_n = exp(dt·A_n)·h_n + dt·x·B_n, y += h_n·C_n, y added to acc at the
 * step's position. Two partial sums of y shorten its dependency chain. */
static inline __attribute__((always_inline)) void ss2d_route(
    const float *xs, const float *ds, float *acc, const float *Bt, const float *Ct, const float (*a2)[LANES],
    const int32_t *pos, int64_t L, const int N) {
    __m512 h[MAX_N];
    for (int n = 0; n < N; ++n) h[n] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
        const int64_t p = pos[t];
        if (t + PREFETCH_STEPS < L) { /* a column route steps W·64 bytes: no hardware prefetcher follows it */
            const int64_t ahead = (int64_t)pos[t + PREFETCH_STEPS] * LANES;
            _mm_prefetch((const char *)(ds + ahead), _MM_HINT_T0);
            _mm_prefetch((const char *)(xs + ahead), _MM_HINT_T0);
            _mm_prefetch((const char *)(acc + ahead), _MM_HINT_T0);
        }
        const __m512 dv = _mm512_loadu_ps(ds + p * LANES);
        const __m512 dx = _mm512_mul_ps(dv, _mm512_loadu_ps(xs + p * LANES));
        const float *bt = Bt + t * N, *ct = Ct + t * N;
        __m512 y0 = _mm512_setzero_ps(), y1 = _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int n = 0; n < N; ++n) { /* unrolled for N = 16: the 16 states stay in registers */
            const __m512 e = exp2_avx512(_mm512_mul_ps(dv, _mm512_loadu_ps(a2[n])));
            h[n] = _mm512_fmadd_ps(e, h[n], _mm512_mul_ps(dx, _mm512_set1_ps(bt[n])));
            if (n & 1) y1 = _mm512_fmadd_ps(h[n], _mm512_set1_ps(ct[n]), y1);
            else y0 = _mm512_fmadd_ps(h[n], _mm512_set1_ps(ct[n]), y0);
        }
        float *o = acc + p * LANES;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_add_ps(y0, y1)));
    }
}
#else
/* Portable form of the same step (exp2_poly); the compiler vectorises the lane loops. */
static inline __attribute__((always_inline)) void ss2d_route(
    const float *xs, const float *ds, float *acc, const float *Bt, const float *Ct, const float (*a2)[LANES],
    const int32_t *pos, int64_t L, const int N) {
    float h[MAX_N][LANES];
    memset(h, 0, sizeof(h));
    for (int64_t t = 0; t < L; ++t) {
        const int64_t p = pos[t];
        const float *xv = xs + p * LANES, *dv = ds + p * LANES;
        float dx[LANES], y[LANES];
        for (int j = 0; j < LANES; ++j) {
            dx[j] = dv[j] * xv[j];
            y[j] = 0.0f;
        }
        for (int n = 0; n < N; ++n) {
            const float bn = Bt[t * N + n], cn = Ct[t * N + n];
#pragma omp simd
            for (int j = 0; j < LANES; ++j) {
                const float hn = exp2_poly(dv[j] * a2[n][j]) * h[n][j] + dx[j] * bn;
                h[n][j] = hn;
                y[j] += hn * cn;
            }
        }
        float *o = acc + p * LANES;
        for (int j = 0; j < LANES; ++j) o[j] += y[j];
    }
}
#endif

/* Denormals are flushed to zero while a work item runs (a state decaying below 1e-38 is 0 for the scan,
 * and denormal arithmetic is ~100x slower on x86); the caller's floating-point mode is restored after. */
#if defined(__SSE__)
#include <xmmintrin.h>
#define FTZ_BEGIN const unsigned int saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ | 0x8040);
#define FTZ_END _mm_setcsr(saved_csr_);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif

/* Scratch rows (3 · L · LANES floats per work item) are kept between calls in a small pool: allocating them
 * per item costs a page fault per 4 KiB (~2 ms per stage-1 block at 256²). */
#define POOL_SLOTS 64
static struct {
    float *buf;
    size_t floats;
    int busy;
} pool[POOL_SLOTS];
static pthread_mutex_t pool_mutex = PTHREAD_MUTEX_INITIALIZER;

/* A buffer of at least `floats` floats, and the pool slot it came from (-1: not pooled, free it after). */
static float *scratch_get(size_t floats, int *slot) {
    float *buf = NULL;
    *slot = -1;
    pthread_mutex_lock(&pool_mutex);
    for (int i = 0; i < POOL_SLOTS && *slot < 0; ++i)
        if (!pool[i].busy && pool[i].floats >= floats) *slot = i;
    for (int i = 0; i < POOL_SLOTS && *slot < 0; ++i)
        if (!pool[i].busy) *slot = i;
    if (*slot >= 0) {
        pool[*slot].busy = 1;
        if (pool[*slot].floats < floats) {
            free(pool[*slot].buf);
            pool[*slot].buf = (float *)aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
            pool[*slot].floats = pool[*slot].buf ? floats : 0;
        }
        buf = pool[*slot].buf;
        if (!buf) pool[*slot].busy = 0;
    }
    pthread_mutex_unlock(&pool_mutex);
    if (*slot < 0) buf = (float *)malloc(floats * sizeof(float));
    return buf;
}

static void scratch_put(float *buf, int slot) {
    if (slot < 0) {
        free(buf);
        return;
    }
    pthread_mutex_lock(&pool_mutex);
    pool[slot].busy = 0;
    pthread_mutex_unlock(&pool_mutex);
}

#if defined(__AVX512F__)
/* The offsets j·L of a lane block's 16 rows, for gathers and scatters (L·16 < 2^31: pdd_ss2d_scan checks). */
static inline __m512i lane_rows(int64_t L) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32((int)L));
}
#endif

/* rows j < nd of `src` (row j at src + j·L; fp32, or bf16 with `bf16`) + add[j], into dst position-major
 * (dst[q·LANES + j]) in fp32, through softplus if `soft`; lanes j >= nd are 0 (softplus(0) with `soft`). */
static void to_lanes(float *dst, const void *src, const float *add, int nd, int64_t L, int soft, int bf16) {
#if defined(__AVX512F__)
    const __mmask16 mask = (__mmask16)((1u << nd) - 1u);
    const __m512i rows = lane_rows(L);
    const __m512 a = _mm512_maskz_loadu_ps(mask, add);
    const uint16_t *half = (const uint16_t *)src;
    for (int64_t q = 0; q < L; ++q) {
        __m512 v;
        if (!bf16) {
            v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, rows, (const float *)src + q, 4);
        } else if (q > 0) {
            /* bf16: gather the 32-bit words ending at element q (elements q − 1 and q, both in the row), keep
             * the high half: that is element q widened to fp32. Reads nothing outside the rows. */
            const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, rows, half + q - 1, 2);
            v = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));
        } else {
            float first[LANES] = {0};
            for (int j = 0; j < nd; ++j) first[j] = bf16_to_f32(half[j * L]);
            v = _mm512_loadu_ps(first);
        }
        v = _mm512_add_ps(v, a);
        _mm512_store_ps(dst + q * LANES, soft ? softplus_avx512(v) : v);
    }
#else
    memset(dst, 0, sizeof(float) * L * LANES);
    for (int j = 0; j < nd; ++j)
        for (int64_t q = 0; q < L; ++q) dst[q * LANES + j] = load_at(src, j * L + q, bf16) + add[j];
    if (soft) {
#pragma omp simd
        for (int64_t i = 0; i < L * LANES; ++i) dst[i] = softplus(dst[i]);
    }
#endif
}

/* Channels-last rows: position q's nd channels at src + q·stride (fp32, or bf16 with `bf16`), into
 * dst[q·LANES + j] in fp32 (lanes j >= nd 0). */
static void to_lanes_cl(float *dst, const void *src, int64_t stride, int nd, int64_t L, int bf16) {
#if defined(__AVX512F__)
    const __mmask16 mask = (__mmask16)((1u << nd) - 1u);
    if (!bf16) {
        for (int64_t q = 0; q < L; ++q)
            _mm512_store_ps(dst + q * LANES, _mm512_maskz_loadu_ps(mask, (const float *)src + q * stride));
        return;
    }
#if defined(__AVX512BW__)
    for (int64_t q = 0; q < L; ++q) {
        const __m256i v = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)src + q * stride);
        _mm512_store_ps(dst + q * LANES, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
    }
    return;
#endif
#endif
    memset(dst, 0, sizeof(float) * L * LANES);
    for (int64_t q = 0; q < L; ++q)
        for (int j = 0; j < nd; ++j) dst[q * LANES + j] = load_at(src, q * stride + j, bf16);
}

static inline void store_at(void *out, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)out)[i] = f32_to_bf16(v);
    else ((float *)out)[i] = v;
}

/* Channels-last output: position q's nd channels at out + q·stride = acc + skip·xs of the lanes. */
static void from_lanes_cl(void *out, int64_t stride, const float *acc, const float *xs, const float *skip, int nd,
                          int64_t L, int bf16) {
    for (int64_t q = 0; q < L; ++q)
        for (int j = 0; j < nd; ++j) store_at(out, q * stride + j, acc[q * LANES + j] + skip[j] * xs[q * LANES + j], bf16);
}

/* out row j < nd (at out + j·L), position q: acc[q·LANES + j] + skip[j]·xs[q·LANES + j]. */
static void from_lanes(void *out, const float *acc, const float *xs, const float *skip, int nd, int64_t L, int bf16) {
#if defined(__AVX512F__)
    const __mmask16 mask = (__mmask16)((1u << nd) - 1u);
    const __m512i rows = lane_rows(L);
    const __m512 sk = _mm512_loadu_ps(skip);
    for (int64_t q = 0; q < L; ++q) {
        const __m512 v = _mm512_fmadd_ps(sk, _mm512_load_ps(xs + q * LANES), _mm512_load_ps(acc + q * LANES));
        if (!bf16) {
            _mm512_mask_i32scatter_ps((float *)out + q, mask, rows, v, 4);
        } else { /* no 16-bit scatter: the lanes one by one */
            float lanes[LANES];
            _mm512_storeu_ps(lanes, v);
            for (int j = 0; j < nd; ++j) ((uint16_t *)out)[j * L + q] = f32_to_bf16(lanes[j]);
        }
    }
#else
    for (int j = 0; j < nd; ++j)
        for (int64_t q = 0; q < L; ++q) store_at(out, j * L + q, acc[q * LANES + j] + skip[j] * xs[q * LANES + j], bf16);
#endif
}

static void ss2d_item(const void *p, int64_t item) {
    const SS2DArgs *s = (const SS2DArgs *)p;
    const int64_t blocks = (s->dim + LANES - 1) / LANES;
    const int64_t b = item / blocks, d0 = (item % blocks) * LANES;
    const int nd = (int)(s->dim - d0 < LANES ? s->dim - d0 : LANES);
    const int64_t L = s->L, dim = s->dim;
    const int N = s->N, bf16 = s->bf16;
    const int64_t size = bf16 ? 2 : 4; /* bytes per element of x, delta and out */
    int slot;
    float *buf = scratch_get((size_t)(3 * L * LANES), &slot);
    if (!buf) {
        __atomic_store_n(&((SS2DArgs *)p)->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    FTZ_BEGIN
    float *xs = buf, *ds = buf + L * LANES, *acc = buf + 2 * L * LANES;
    memset(acc, 0, sizeof(float) * L * LANES);
    float skip[LANES] = {0}, zero[LANES] = {0};
    for (int j = 0; j < nd; ++j)
        for (int k = 0; k < 4; ++k) skip[j] += s->D[k * dim + d0 + j];
    const char *x = (const char *)s->x, *delta = (const char *)s->delta;
    char *out = (char *)s->out;
    if (s->channels_last) to_lanes_cl(xs, x + (b * L * dim + d0) * size, dim, nd, L, bf16);
    else to_lanes(xs, x + (b * dim + d0) * L * size, zero, nd, L, 0, bf16);
    for (int k = 0; k < 4; ++k) {
        float a2[MAX_N][LANES], bias[LANES] = {0};
        memset(a2, 0, sizeof(a2));
        for (int j = 0; j < nd; ++j) {
            const int64_t ch = k * dim + d0 + j;
            for (int n = 0; n < N; ++n) a2[n][j] = s->A[ch * N + n] * LOG2E;
            bias[j] = s->bias[ch];
        }
        to_lanes(ds, delta + ((b * 4 + k) * dim + d0) * L * size, bias, nd, L, 1, bf16);
        const float *Bt = s->Bt + (b * 4 + k) * L * N, *Ct = s->Ct + (b * 4 + k) * L * N;
        const int32_t *pos = s->pos + k * L;
        if (N == 16) ss2d_route(xs, ds, acc, Bt, Ct, a2, pos, L, 16);
        else if (N == 1) ss2d_route(xs, ds, acc, Bt, Ct, a2, pos, L, 1);
        else ss2d_route(xs, ds, acc, Bt, Ct, a2, pos, L, N);
    }
    if (s->channels_last) from_lanes_cl(out + (b * L * dim + d0) * size, dim, acc, xs, skip, nd, L, bf16);
    else from_lanes(out + (b * dim + d0) * L * size, acc, xs, skip, nd, L, bf16);
    FTZ_END
    scratch_put(buf, slot);
}

typedef struct {
    const void *B, *C; /* fp32, or bf16 with `bf16` */
    float *Bt, *Ct;
    const int32_t *pos;
    int64_t L;
    int N, bf16;
} RouteRows;

/* Item (b, k): B and C of route k copied into its step order, position-major: Bt[t][n] = B[n][pos_k[t]]. */
static void route_rows_item(const void *p, int64_t item) {
    const RouteRows *r = (const RouteRows *)p;
    const int64_t L = r->L, N = r->N;
    const int32_t *pos = r->pos + (item % 4) * L;
    float *Bt = r->Bt + item * L * N, *Ct = r->Ct + item * L * N;
    if (r->bf16) {
        const uint16_t *B = (const uint16_t *)r->B + item * N * L, *C = (const uint16_t *)r->C + item * N * L;
        for (int64_t t = 0; t < L; ++t)
            for (int64_t n = 0; n < N; ++n) {
                Bt[t * N + n] = bf16_to_f32(B[n * L + pos[t]]);
                Ct[t * N + n] = bf16_to_f32(C[n * L + pos[t]]);
            }
        return;
    }
    const float *B = (const float *)r->B + item * N * L, *C = (const float *)r->C + item * N * L;
    for (int64_t t = 0; t < L; ++t) {
        const int64_t q = pos[t];
        for (int64_t n = 0; n < N; ++n) {
            Bt[t * N + n] = B[n * L + q];
            Ct[t * N + n] = C[n * L + q];
        }
    }
}

/* x, out: (batch, dim, H, W), or with channels_last (batch, H, W, dim); delta: (batch, 4, dim, H, W);
 * B, C: (batch, 4, N, H, W); A: (4 dim, N); D, bias: (4 dim). All contiguous; x, delta, B, C and out fp32, or
 * bf16 with `bf16`; A, D and bias fp32. Returns 0, or a negative code for bad arguments. */
int pdd_ss2d_scan(const void *x, const void *delta, const void *B, const void *C, const float *A,
                  const float *D, const float *bias, int64_t batch, int64_t dim, int64_t height, int64_t width,
                  int N, void *out, int threads, int channels_last, int bf16) {
    if (N < 1 || N > MAX_N) return -1;
    const int64_t L = height * width;
    if (L <= 0 || batch <= 0 || dim <= 0) return 0;
    if (L > INT32_MAX / LANES) return -2; /* positions, and the row offsets of a lane block, are int32 */
    int32_t *pos = (int32_t *)malloc(sizeof(int32_t) * 4 * L);
    float *rows = (float *)malloc(sizeof(float) * 2 * batch * 4 * L * N);
    if (!pos || !rows) {
        free(pos);
        free(rows);
        return -3;
    }
    for (int64_t t = 0; t < L; ++t) {
        const int64_t col = (t % height) * width + t / height; /* column-major step t, row-major index */
        pos[t] = (int32_t)t;
        pos[L + t] = (int32_t)col;
        pos[2 * L + (L - 1 - t)] = (int32_t)t;
        pos[3 * L + (L - 1 - t)] = (int32_t)col;
    }
    float *Bt = rows, *Ct = rows + batch * 4 * L * N;
    RouteRows rr = {B, C, Bt, Ct, pos, L, N, bf16 != 0};
    parallel(batch * 4, threads, route_rows_item, &rr);
    SS2DArgs args = {x, delta, A, D, bias, Bt, Ct, out, pos, batch, dim, L, N, channels_last != 0, bf16 != 0, 0};
    parallel(batch * ((dim + LANES - 1) / LANES), threads, ss2d_item, &args);
    free(rows);
    free(pos);
    return args.failed ? -3 : 0;
}

/* ---- 1-D selective scan ----------------------------------------------------------------------------- */

typedef struct {
    const float *u, *delta, *A, *B, *C, *D, *z, *bias;
    float *out, *state;
    int64_t batch, dim, groups, L;
    int N, softplus_dt;
} ScanArgs;

static void scan_item(const void *p, int64_t item) {
    const ScanArgs *s = (const ScanArgs *)p;
    const int64_t per_group = s->dim / s->groups;
    /* Blocks never straddle a group: B and C are shared within one. */
    const int64_t blocks_per_group = (per_group + BLOCK_D - 1) / BLOCK_D;
    const int64_t blocks = s->groups * blocks_per_group;
    const int64_t b = item / blocks, g = (item % blocks) / blocks_per_group;
    const int64_t d0 = g * per_group + (item % blocks_per_group) * BLOCK_D;
    const int64_t end = (g + 1) * per_group;
    const int nd = (int)(end - d0 < BLOCK_D ? end - d0 : BLOCK_D);
    const int64_t L = s->L, row = (b * s->dim + d0) * L;
    const float *u = s->u + row, *dl = s->delta + row, *z = s->z ? s->z + row : NULL;
    const float *b_ptr = s->B + (b * s->groups + g) * s->N * L, *c_ptr = s->C + (b * s->groups + g) * s->N * L;
    const float *A = s->A + d0 * s->N, *bias = s->bias ? s->bias + d0 : NULL, *skip = s->D ? s->D + d0 : NULL;
    float *out = s->out + row, *state = s->state ? s->state + (b * s->dim + d0) * s->N : NULL;
    /* N known at compile time for the common state sizes (full vectorisation), else at run time */
    if (s->N == 16) walk(u, dl, z, out, b_ptr, c_ptr, A, bias, skip, L, nd, 16, s->softplus_dt, state);
    else if (s->N == 1) walk(u, dl, z, out, b_ptr, c_ptr, A, bias, skip, L, nd, 1, s->softplus_dt, state);
    else walk(u, dl, z, out, b_ptr, c_ptr, A, bias, skip, L, nd, s->N, s->softplus_dt, state);
}

/* u, delta, z, out: (batch, dim, L); A: (dim, N); B, C: (batch, groups, N, L); D, bias: (dim) or NULL;
 * z, state (batch, dim, N) optional (NULL). dim must be a multiple of groups. */
int pdd_selective_scan(const float *u, const float *delta, const float *A, const float *B, const float *C,
                       const float *D, const float *z, const float *bias, int64_t batch, int64_t dim,
                       int64_t groups, int64_t L, int N, int softplus_dt, float *out, float *state, int threads) {
    if (N < 1 || N > MAX_N) return -1;
    if (groups < 1 || dim % groups) return -2;
    if (L <= 0 || batch <= 0 || dim <= 0) return 0;
    ScanArgs args = {u, delta, A, B, C, D, z, bias, out, state, batch, dim, groups, L, N, softplus_dt};
    const int64_t blocks = groups * ((dim / groups + BLOCK_D - 1) / BLOCK_D);
    parallel(batch * blocks, threads, scan_item, &args);
    return 0;
}

int pdd_scan_abi_version(void) { return 4; }

/* 1: parallel() runs on the process's OpenMP team; 0: on threads it starts per call. */
int pdd_scan_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}
