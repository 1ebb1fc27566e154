/* Float64 sums in 32 interleaved partial sums ("lanes"), for the batch-norm
 * kernels (src/_bn.pyx, ``cdef extern from "_lanes.h"``).
 *
 * A sum is a table acc[32] of float64 lanes: lanes_zero(acc), then any number
 * of lanes_add_*(acc, ...) calls over consecutive pieces of one sequence of
 * terms t_0, t_1, ..., each piece starting at a multiple of 32 (the first at
 * 0), then lanes_total(acc) (which may overwrite acc). Lane j accumulates the terms t_i with
 * i = j (mod 32), in order of i; lanes_total adds the lanes in a fixed halving
 * tree (lane j += lane j+16, then j+8, j+4, j+2, j+1) and returns lane 0. So
 * the result does not depend on how the sequence was cut into pieces.
 *
 * Terms (p, q: float32 or float64 values; f: float32, d: float64):
 *   lanes_add_f/d(acc, p, m)            t_i = p[i]
 *   lanes_add_dot_f/d(acc, p, q, m)     t_i = p[i] * q[i]     (the product rounded to p's precision)
 * every term widened to float64 (exact for float32) before it is added. And two sums
 * at once:
 *   lanes_add_dev_f/d(s, q, p, m, c)    with d_i = p[i] - c (widened, then the difference in
 *                                       float64): s adds d_i; q adds d_i^2 fused, each lane
 *                                       step q_j = fma(d_i, d_i, q_j) rounded once
 * (C's fma on every path, so every build still gives the same bits).
 *
 * Why 32 lanes and vector code: an addition waits 3-4 cycles for the previous
 * one of its chain, so a few chains leave the machine idle; 32 chains never
 * wait, and the widening of float32 to float64 bounds the loop. GCC does not
 * produce that loop from the plain one (it splits or reorders the widening), so
 * the float32 sums have explicit vector paths: AVX-512 (4 accumulators of 8
 * lanes) and AVX (8 of 4; the deviations' with FMA only). They perform exactly
 * the additions of the plain loop, lane by lane, so every build gives the same
 * bits.
 */
#ifndef NPAPPROX_LANES_H
#define NPAPPROX_LANES_H

#include <math.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#define LANES 32

#if defined(_MSC_VER)
#define LANES_INLINE static __inline
#else
#define LANES_INLINE static inline
#endif

LANES_INLINE void lanes_zero(double *acc) {
    int j;
    for (j = 0; j < LANES; j++)
        acc[j] = 0;
}

/* The tree: lane j += lane j+16, j+8, j+4, j+2, j+1 (in registers on the vector paths). */
LANES_INLINE double lanes_total(double *acc) {
#if defined(__AVX__)
    __m256d v[4], h;
    __m128d q;
    int k;
    for (k = 0; k < 4; k++)  /* j += j+16 */
        v[k] = _mm256_add_pd(_mm256_loadu_pd(acc + 4 * k), _mm256_loadu_pd(acc + 16 + 4 * k));
    v[0] = _mm256_add_pd(v[0], v[2]);  /* j += j+8 */
    v[1] = _mm256_add_pd(v[1], v[3]);
    h = _mm256_add_pd(v[0], v[1]);     /* j += j+4 */
    q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));  /* j += j+2 */
    return _mm_cvtsd_f64(q) + _mm_cvtsd_f64(_mm_unpackhi_pd(q, q));          /* j += j+1 */
#else
    int w, j;
    for (w = LANES / 2; w >= 1; w /= 2)
        for (j = 0; j < w; j++)
            acc[j] = acc[j] + acc[j + w];
    return acc[0];
#endif
}

/* The plain loop: acc[i % 32] += T(i) for 0 <= i < m, in order of i. */
#define LANES_PLAIN(T)                          \
    Py_ssize_t i = 0;                           \
    int j;                                      \
    for (; i + LANES <= m; i += LANES)          \
        for (j = 0; j < LANES; j++)             \
            acc[j] += (T(i + j));               \
    for (; i < m; i++)                          \
        acc[i % LANES] += (T(i));

/* The same with vectors for the whole groups of 32 terms: V8(i) is the __m512d of
 * terms i..i+7, V4(i) the __m256d of terms i..i+3; then the plain loop's tail. */
#if defined(__AVX512F__)
#define LANES_VECTOR(T, V8, V4)                                               \
    Py_ssize_t i = 0;                                                         \
    __m512d v0 = _mm512_loadu_pd(acc), v1 = _mm512_loadu_pd(acc + 8);        \
    __m512d v2 = _mm512_loadu_pd(acc + 16), v3 = _mm512_loadu_pd(acc + 24);  \
    for (; i + LANES <= m; i += LANES) {                                      \
        v0 = _mm512_add_pd(v0, V8(i));                                        \
        v1 = _mm512_add_pd(v1, V8(i + 8));                                    \
        v2 = _mm512_add_pd(v2, V8(i + 16));                                   \
        v3 = _mm512_add_pd(v3, V8(i + 24));                                   \
    }                                                                         \
    _mm512_storeu_pd(acc, v0);                                                \
    _mm512_storeu_pd(acc + 8, v1);                                            \
    _mm512_storeu_pd(acc + 16, v2);                                           \
    _mm512_storeu_pd(acc + 24, v3);                                           \
    for (; i < m; i++)                                                        \
        acc[i % LANES] += (T(i));
#elif defined(__AVX__)
#define LANES_VECTOR(T, V8, V4)                                               \
    Py_ssize_t i = 0;                                                         \
    int k;                                                                    \
    __m256d v[LANES / 4];                                                     \
    for (k = 0; k < LANES / 4; k++)                                           \
        v[k] = _mm256_loadu_pd(acc + 4 * k);                                  \
    for (; i + LANES <= m; i += LANES)                                        \
        for (k = 0; k < LANES / 4; k++)                                       \
            v[k] = _mm256_add_pd(v[k], V4(i + 4 * k));                        \
    for (k = 0; k < LANES / 4; k++)                                           \
        _mm256_storeu_pd(acc + 4 * k, v[k]);                                  \
    for (; i < m; i++)                                                        \
        acc[i % LANES] += (T(i));
#else
#define LANES_VECTOR(T, V8, V4) LANES_PLAIN(T)
#endif

/* One deviation d = d_i: lane i % 32 of s += d, of q = fma(d, d, q). */
LANES_INLINE void lanes_dev_step(double *s, double *q, Py_ssize_t i, double d) {
    s[i % LANES] += d;
    q[i % LANES] = fma(d, d, q[i % LANES]);
}

/* The plain loop of lanes_add_dev_*: whole groups of 32 (so GCC can vectorise the
 * float64 version), then the tail; the vector paths do the groups themselves. */
#define LANES_DEV_TAIL(P)                                                     \
    for (; i < m; i++)                                                        \
        lanes_dev_step(s, q, i, (double)P[i] - c);
#define LANES_DEV_PLAIN(P)                                                    \
    Py_ssize_t i = 0;                                                         \
    int j;                                                                    \
    for (; i + LANES <= m; i += LANES)                                        \
        for (j = 0; j < LANES; j++)                                           \
            lanes_dev_step(s, q, j, (double)P[i + j] - c);                    \
    LANES_DEV_TAIL(P)

/* float32 terms */
#define LANES_P(i) ((double)p[i])
#define LANES_P8(i) _mm512_cvtps_pd(_mm256_loadu_ps(p + (i)))
#define LANES_P4(i) _mm256_cvtps_pd(_mm_loadu_ps(p + (i)))
#define LANES_DOT(i) ((double)(p[i] * q[i]))
#define LANES_DOT8(i) _mm512_cvtps_pd(_mm256_mul_ps(_mm256_loadu_ps(p + (i)), _mm256_loadu_ps(q + (i))))
#define LANES_DOT4(i) _mm256_cvtps_pd(_mm_mul_ps(_mm_loadu_ps(p + (i)), _mm_loadu_ps(q + (i))))

LANES_INLINE void lanes_add_f(double *acc, const float *p, Py_ssize_t m) {
    LANES_VECTOR(LANES_P, LANES_P8, LANES_P4)
}

/* A build for any x86-64 CPU (NPAPPROX_PORTABLE=1) has no FMA instruction to inline, and
 * a call to libm's fma per value is ten times slower: GCC's target_clones adds a copy
 * of the plain loop compiled for FMA (vectorised), picked when the CPU has it. */
#if !defined(__FMA__) && defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define LANES_DEV_FN __attribute__((target_clones("fma", "default"))) static void
#else
#define LANES_DEV_FN LANES_INLINE void
#endif

LANES_DEV_FN lanes_add_dev_f(double *s, double *q, const float *p, Py_ssize_t m, double c) {
#if defined(__AVX512F__)
    Py_ssize_t i = 0;
    int k;
    __m512d vc = _mm512_set1_pd(c), vs[4], vq[4], d;
    for (k = 0; k < 4; k++) {
        vs[k] = _mm512_loadu_pd(s + 8 * k);
        vq[k] = _mm512_loadu_pd(q + 8 * k);
    }
    for (; i + LANES <= m; i += LANES)
        for (k = 0; k < 4; k++) {
            d = _mm512_sub_pd(LANES_P8(i + 8 * k), vc);
            vs[k] = _mm512_add_pd(vs[k], d);
            vq[k] = _mm512_fmadd_pd(d, d, vq[k]);
        }
    for (k = 0; k < 4; k++) {
        _mm512_storeu_pd(s + 8 * k, vs[k]);
        _mm512_storeu_pd(q + 8 * k, vq[k]);
    }
    LANES_DEV_TAIL(p)
#elif defined(__AVX__) && defined(__FMA__)
    Py_ssize_t i = 0;
    int k;
    __m256d vc = _mm256_set1_pd(c), vs[LANES / 4], vq[LANES / 4], d;
    for (k = 0; k < LANES / 4; k++) {
        vs[k] = _mm256_loadu_pd(s + 4 * k);
        vq[k] = _mm256_loadu_pd(q + 4 * k);
    }
    for (; i + LANES <= m; i += LANES)
        for (k = 0; k < LANES / 4; k++) {
            d = _mm256_sub_pd(LANES_P4(i + 4 * k), vc);
            vs[k] = _mm256_add_pd(vs[k], d);
            vq[k] = _mm256_fmadd_pd(d, d, vq[k]);
        }
    for (k = 0; k < LANES / 4; k++) {
        _mm256_storeu_pd(s + 4 * k, vs[k]);
        _mm256_storeu_pd(q + 4 * k, vq[k]);
    }
    LANES_DEV_TAIL(p)
#else
    LANES_DEV_PLAIN(p)
#endif
}

LANES_INLINE void lanes_add_dot_f(double *acc, const float *p, const float *q, Py_ssize_t m) {
    LANES_VECTOR(LANES_DOT, LANES_DOT8, LANES_DOT4)
}

/* float64 terms: the plain loop (no widening to wait for) */
LANES_INLINE void lanes_add_d(double *acc, const double *p, Py_ssize_t m) {
    LANES_PLAIN(LANES_P)
}

LANES_DEV_FN lanes_add_dev_d(double *s, double *q, const double *p, Py_ssize_t m, double c) {
    LANES_DEV_PLAIN(p)
}

LANES_INLINE void lanes_add_dot_d(double *acc, const double *p, const double *q, Py_ssize_t m) {
    LANES_PLAIN(LANES_DOT)
}

#endif
