/* Selective scan on the CPU: the fused four-route SS2D scan and the plain 1-D scan, fp32, inference.
 *
 * The recurrence of mamba-ssm's selective_scan_fn, per channel d and state n, along positions t:
 *     dt = softplus(delta[d, t] + bias[d])            (softplus optional in the 1-D scan)
 *     h[n] = exp(dt * A[d, n]) * h[n] + dt * u[d, t] * B[n, t]
 *     y[d, t] = sum_n h[n] * C[n, t] + D[d] * u[d, t]     (times silu(z[d, t]) when z is given)
 *
 * A block of channels walks the positions together, so each step loads B[:, t] and C[:, t] once for the
 * block and keeps every channel's state in a small array the compiler holds in vector registers; the
 * exponentials of a channel are computed over n at once, inline (exp_fast), and the softplus over the
 * block's channels at once (glibc's vector libm).
 * The SS2D scan walks route k of the row-major grid by a position table (0 rows, 1 columns, 2 and 3 the
 * same reversed: the geometry of pdd.ssm.route_order) with one channel per vector lane (see ss2d_item),
 * sums the four routes and adds the four D skips as one x * sum_k D_k term. Work items (batch, channel
 * block) are shared by `threads` POSIX threads; every item owns its output rows, so no two threads write
 * the same element.
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

/* exp(x) in a form the compiler vectorises inline (no library call per vector): x·log2(e) = k + f with k an
 * integer and f in [0, 1), 2^f by a degree-5 polynomial fitted on [0, 1) (relative error 8e-8, below fp32's
 * rounding), 2^k by writing the exponent bits. The argument is clamped to [-126, 127]·ln 2: the state decay
 * exp(dt·A) with A < 0 flushes to ~1e-38 instead of a denormal. This is the kernel's hot loop: 16 per
 * channel and step. */
static inline float exp_fast(float x) {
    float t = x * 1.44269504088896341f;
    t = t < -126.0f ? -126.0f : (t > 127.0f ? 127.0f : t);
    const float k = floorf(t), f = t - k;
    float p = 1.8762329e-3f;
    p = p * f + 8.99258442e-3f;
    p = p * f + 5.58236055e-2f;
    p = p * f + 2.40154535e-1f;
    p = p * f + 6.93152964e-1f;
    p = p * f + 9.99999940e-1f;
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
        for (int n = 0; n < N; ++n) a[j][n] = A[j * N + n];
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
                const float hn = exp_fast(dt * a[j][n]) * h[j][n] + dx * bv[n];
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

/* Run run(args, 0..items-1) on `threads` threads, this one included; a thread that cannot be started leaves
 * its share to the others. */
static void parallel(int64_t items, int threads, void (*run)(const void *, int64_t), const void *args) {
    Pool pool = {items, 0, run, args};
    if (threads > 64) threads = 64;
    pthread_t ids[64];
    int started = 0;
    for (int i = 1; i < threads && i < items; ++i)
        if (pthread_create(&ids[started], NULL, worker, &pool) == 0) ++started;
    worker(&pool);
    for (int i = 0; i < started; ++i) pthread_join(ids[i], NULL);
}

/* ---- SS2D ------------------------------------------------------------------------------------------- */

typedef struct {
    const float *x, *delta, *B, *C, *A, *D, *bias;
    float *out;
    const int32_t *pos; /* (4, L) */
    int64_t batch, dim, L;
    int N;
    int failed; /* set when a work item could not allocate its scratch rows */
} SS2DArgs;

/* The SS2D scan keeps one channel per vector lane: a work item is a block of LANES channels, copied
 * position-major into scratch rows (LANES floats per position), so each step updates the N states of every
 * channel in the block with N full-width vector operations and no horizontal sums, and reads B[n, p],
 * C[n, p] as scalars broadcast to all lanes. */
#define LANES 16

static inline __attribute__((always_inline)) void ss2d_route(
    const float *xs, const float *ds, float *acc, const float *Bk, const float *Ck, const float (*at)[LANES],
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
            const float bn = Bk[n * L + p], cn = Ck[n * L + p];
#pragma omp simd
            for (int j = 0; j < LANES; ++j) {
                const float hn = exp_fast(dv[j] * at[n][j]) * h[n][j] + dx[j] * bn;
                h[n][j] = hn;
                y[j] += hn * cn;
            }
        }
        float *o = acc + p * LANES;
        for (int j = 0; j < LANES; ++j) o[j] += y[j];
    }
}

static void ss2d_item(const void *p, int64_t item) {
    const SS2DArgs *s = (const SS2DArgs *)p;
    const int64_t blocks = (s->dim + LANES - 1) / LANES;
    const int64_t b = item / blocks, d0 = (item % blocks) * LANES;
    const int nd = (int)(s->dim - d0 < LANES ? s->dim - d0 : LANES);
    const int64_t L = s->L, dim = s->dim;
    const int N = s->N;
    float *buf = (float *)calloc((size_t)(3 * L * LANES), sizeof(float));
    if (!buf) {
        __atomic_store_n(&((SS2DArgs *)p)->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *xs = buf, *ds = buf + L * LANES, *acc = buf + 2 * L * LANES;
    float skip[LANES] = {0};
    for (int j = 0; j < nd; ++j) {
        const float *row = s->x + (b * dim + d0 + j) * L;
        for (int64_t q = 0; q < L; ++q) xs[q * LANES + j] = row[q];
        for (int k = 0; k < 4; ++k) skip[j] += s->D[k * dim + d0 + j];
    }
    for (int k = 0; k < 4; ++k) {
        float at[MAX_N][LANES];
        memset(at, 0, sizeof(at));
        for (int j = 0; j < nd; ++j) {
            const int64_t ch = k * dim + d0 + j;
            for (int n = 0; n < N; ++n) at[n][j] = s->A[ch * N + n];
            const float *row = s->delta + ((b * 4 + k) * dim + d0 + j) * L;
            const float bias = s->bias[ch];
            for (int64_t q = 0; q < L; ++q) ds[q * LANES + j] = row[q] + bias;
        }
#pragma omp simd
        for (int64_t i = 0; i < L * LANES; ++i) ds[i] = softplus(ds[i]);
        const float *Bk = s->B + (b * 4 + k) * N * L, *Ck = s->C + (b * 4 + k) * N * L;
        const int32_t *pos = s->pos + k * L;
        if (N == 16) ss2d_route(xs, ds, acc, Bk, Ck, at, pos, L, 16);
        else if (N == 1) ss2d_route(xs, ds, acc, Bk, Ck, at, pos, L, 1);
        else ss2d_route(xs, ds, acc, Bk, Ck, at, pos, L, N);
    }
    for (int j = 0; j < nd; ++j) {
        float *row = s->out + (b * dim + d0 + j) * L;
        for (int64_t q = 0; q < L; ++q) row[q] = acc[q * LANES + j] + skip[j] * xs[q * LANES + j];
    }
    free(buf);
}

/* x, out: (batch, dim, H, W); delta: (batch, 4, dim, H, W); B, C: (batch, 4, N, H, W); A: (4 dim, N);
 * D, bias: (4 dim). All contiguous fp32. Returns 0, or a negative code for bad arguments. */
int pdd_ss2d_scan(const float *x, const float *delta, const float *B, const float *C, const float *A,
                  const float *D, const float *bias, int64_t batch, int64_t dim, int64_t height, int64_t width,
                  int N, float *out, int threads) {
    if (N < 1 || N > MAX_N) return -1;
    const int64_t L = height * width;
    if (L <= 0 || batch <= 0 || dim <= 0) return 0;
    if (L > INT32_MAX) return -2;
    int32_t *pos = (int32_t *)malloc(sizeof(int32_t) * 4 * L);
    if (!pos) return -3;
    for (int64_t t = 0; t < L; ++t) {
        const int64_t col = (t % height) * width + t / height; /* column-major step t, row-major index */
        pos[t] = (int32_t)t;
        pos[L + t] = (int32_t)col;
        pos[2 * L + (L - 1 - t)] = (int32_t)t;
        pos[3 * L + (L - 1 - t)] = (int32_t)col;
    }
    SS2DArgs args = {x, delta, B, C, A, D, bias, out, pos, batch, dim, L, N, 0};
    parallel(batch * ((dim + LANES - 1) / LANES), threads, ss2d_item, &args);
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

int pdd_scan_abi_version(void) { return 1; }
