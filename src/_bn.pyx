"""Compiled batch-norm kernels (module ``npapprox._bn``): fused passes over NCHW.

The ``xp`` reference and the dispatch live in ``npapprox/kernels/bn.py``.
Arrays are viewed as ``(N, C, M)`` with ``M = H*W``; every kernel runs a
``prange`` over channels (each channel's reduction is done by one thread in a
fixed order, so results do not depend on the thread count).

* Element-wise results are bit-identical to the reference given the same
  per-channel constants (same float operations in the same order;
  ``-ffp-contract=off``): ``y = (x - mu) * scale + beta``, ``h = y * (y > 0)``,
  ``xhat = (src - mu) * inv_sigma``.
* Reductions accumulate in float64 over 8 interleaved partial sums (so the
  compiler can vectorise them without reassociating anything), combined in a
  fixed order. They are more accurate than the reference's float32 sums and
  differ from them in the last bits.
"""
from cython cimport floating
from cython.parallel cimport prange


cdef inline double _sum_row(const floating* p, Py_ssize_t m) noexcept nogil:
    """sum(p[0:m]) in float64: 8 interleaved partial sums, then a fixed tree."""
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef Py_ssize_t i = 0
    while i + 8 <= m:
        a0 += p[i]; a1 += p[i + 1]; a2 += p[i + 2]; a3 += p[i + 3]
        a4 += p[i + 4]; a5 += p[i + 5]; a6 += p[i + 6]; a7 += p[i + 7]
        i += 8
    while i < m:
        a0 += p[i]
        i += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


cdef inline double _sqdev_row(const floating* p, Py_ssize_t m, double mu) noexcept nogil:
    """sum((p[0:m] - mu)^2) in float64, same partial-sum scheme."""
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef double d0, d1, d2, d3, d4, d5, d6, d7
    cdef Py_ssize_t i = 0
    while i + 8 <= m:
        d0 = p[i] - mu; d1 = p[i + 1] - mu; d2 = p[i + 2] - mu; d3 = p[i + 3] - mu
        d4 = p[i + 4] - mu; d5 = p[i + 5] - mu; d6 = p[i + 6] - mu; d7 = p[i + 7] - mu
        a0 += d0 * d0; a1 += d1 * d1; a2 += d2 * d2; a3 += d3 * d3
        a4 += d4 * d4; a5 += d5 * d5; a6 += d6 * d6; a7 += d7 * d7
        i += 8
    while i < m:
        d0 = p[i] - mu
        a0 += d0 * d0
        i += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


def bn_stats(const floating[:, :, ::1] x,     # IN:  (N, C, M)
             double[::1] mean,                 # OUT: (C,)
             double[::1] var):                 # OUT: (C,) biased
    """Two passes per channel: mean = sum(x)/(N*M), var = sum((x - mean)^2)/(N*M)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2], n, c
    cdef double s, count = <double> (N * M)
    if mean.shape[0] != C or var.shape[0] != C:
        raise ValueError("mean and var must have one entry per channel")
    if N * M == 0:
        raise ValueError("batch statistics need at least one value per channel")
    with nogil:
        for c in prange(C, schedule="static"):
            s = 0
            for n in range(N):
                s = s + _sum_row(&x[n, c, 0], M)
            mean[c] = s / count
            s = 0
            for n in range(N):
                s = s + _sqdev_row(&x[n, c, 0], M, mean[c])
            var[c] = s / count


def bn_apply(const floating[:, :, ::1] x,     # IN:  (N, C, M)
             const floating[::1] mu,           # IN:  (C,)
             const floating[::1] scale,        # IN:  (C,) gamma * inv_sigma
             const floating[::1] beta,         # IN:  (C,)
             floating[:, :, ::1] y,            # OUT: (N, C, M) or None
             floating[:, :, ::1] h):           # OUT: (N, C, M) or None
    """y = (x - mu) * scale + beta and/or h = y * (y > 0), one pass over x."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2], n, c, i
    cdef floating v, m_, s_, b_
    cdef bint want_y = y is not None, want_h = h is not None
    if want_y and (y.shape[0] != N or y.shape[1] != C or y.shape[2] != M):
        raise ValueError("y shape does not match x")
    if want_h and (h.shape[0] != N or h.shape[1] != C or h.shape[2] != M):
        raise ValueError("h shape does not match x")
    if mu.shape[0] != C or scale.shape[0] != C or beta.shape[0] != C:
        raise ValueError("mu, scale and beta must have one entry per channel")
    with nogil:
        for c in prange(C, schedule="static"):
            m_ = mu[c]
            s_ = scale[c]
            b_ = beta[c]
            for n in range(N):
                if want_y and want_h:
                    for i in range(M):
                        v = (x[n, c, i] - m_) * s_ + b_
                        y[n, c, i] = v
                        h[n, c, i] = v * (v > 0)
                elif want_y:
                    for i in range(M):
                        y[n, c, i] = (x[n, c, i] - m_) * s_ + b_
                elif want_h:
                    for i in range(M):
                        v = (x[n, c, i] - m_) * s_ + b_
                        h[n, c, i] = v * (v > 0)


cdef enum:
    BLOCK = 256   # values per block: the masked gradient of a block lives on the stack


cdef inline void _masked(const floating* pg, const floating* ps, const unsigned char* pm, floating* g,
                         Py_ssize_t m, int mode, floating mu, floating scale, floating beta) noexcept nogil:
    """g = gy * mask over m values: mode 1 rebuilds the ReLU mask from src as the
    forward did, mode 2 reads it, mode 0 has none. Selects, so each loop
    vectorises; gy * 0 keeps NumPy's bits for gy * False (-0.0, NaN)."""
    cdef Py_ssize_t i
    if mode == 1:
        for i in range(m):
            g[i] = pg[i] if ((ps[i] - mu) * scale + beta) > 0 else pg[i] * 0
    elif mode == 2:
        for i in range(m):
            g[i] = pg[i] if pm[i] != 0 else pg[i] * 0
    else:
        for i in range(m):
            g[i] = pg[i]


cdef inline void _row_sums(const floating* pg, const floating* ps, const unsigned char* pm, Py_ssize_t m,
                           int mode, floating mu, floating inv_sigma, floating scale, floating beta,
                           double* sum_g, double* sum_gx) noexcept nogil:
    """Adds sum(g) and sum(g * xhat) over one row to *sum_g, *sum_gx: float64,
    8 interleaved partial sums per block, combined in a fixed order."""
    cdef floating g[BLOCK]
    cdef double ab[8]
    cdef double ag[8]
    cdef Py_ssize_t i, k, j0, nb
    for k in range(8):
        ab[k] = 0
        ag[k] = 0
    j0 = 0
    while j0 < m:
        nb = min(<Py_ssize_t> BLOCK, m - j0)
        _masked(pg + j0, ps + j0, (pm + j0) if pm != NULL else NULL, g, nb, mode, mu, scale, beta)
        for i in range(nb):
            ab[i & 7] += g[i]
            ag[i & 7] += g[i] * ((ps[j0 + i] - mu) * inv_sigma)
        j0 += BLOCK
    sum_g[0] += ((ab[0] + ab[1]) + (ab[2] + ab[3])) + ((ab[4] + ab[5]) + (ab[6] + ab[7]))
    sum_gx[0] += ((ag[0] + ag[1]) + (ag[2] + ag[3])) + ((ag[4] + ag[5]) + (ag[6] + ag[7]))


cdef inline void _row_grad(const floating* pg, const floating* ps, const unsigned char* pm, floating* out,
                           Py_ssize_t m, int mode, floating mu, floating inv_sigma, floating scale,
                           floating beta, bint batch_stats, floating a, floating k) noexcept nogil:
    """out = scale * (g - a - xhat * k) (batch statistics) or scale * g, over one row."""
    cdef Py_ssize_t i
    _masked(pg, ps, pm, out, m, mode, mu, scale, beta)        # out holds g first
    if batch_stats:
        for i in range(m):
            out[i] = scale * (out[i] - a - (ps[i] - mu) * inv_sigma * k)
    else:
        for i in range(m):
            out[i] = scale * out[i]


def bn_backward(const floating[:, :, ::1] gy,       # IN:  (N, C, M) output gradient
                const floating[:, :, ::1] src,      # IN:  (N, C, M) x, or a rebuilt xhat (mu=0, inv_sigma=1)
                const floating[::1] mu,             # IN:  (C,)
                const floating[::1] inv_sigma,      # IN:  (C,)
                const floating[::1] scale,          # IN:  (C,) gamma * inv_sigma
                const floating[::1] beta,           # IN:  (C,) used by mask_mode 1
                const unsigned char[:, :, ::1] mask,  # IN: (N, C, M) used by mask_mode 2
                int mask_mode,                      # 0: none, 1: (src-mu)*scale+beta > 0, 2: mask != 0
                bint batch_stats,
                floating[:, :, ::1] gx,             # OUT: (N, C, M) or None
                double[::1] ggamma,                 # OUT: (C,)
                double[::1] gbeta):                 # OUT: (C,)
    """With xhat = (src - mu) * inv_sigma and g = gy * mask (gy without a mask):
    gbeta = sum g, ggamma = sum g * xhat (float64), then, when gx is given,
    gx = scale * (g - gbeta/Mt - xhat * ggamma/Mt) with Mt = N*M (batch
    statistics) or gx = scale * g (running statistics); the two per-channel
    constants are rounded to the array's precision first, as the reference does."""
    cdef Py_ssize_t N = gy.shape[0], C = gy.shape[1], M = gy.shape[2], n, c
    cdef double sb, sg, count = <double> (N * M)
    cdef floating a_, k_
    cdef bint want_gx = gx is not None
    cdef const unsigned char* pm
    if src.shape[0] != N or src.shape[1] != C or src.shape[2] != M:
        raise ValueError("src shape does not match gy")
    if want_gx and (gx.shape[0] != N or gx.shape[1] != C or gx.shape[2] != M):
        raise ValueError("gx shape does not match gy")
    if mask_mode == 2 and (mask is None or mask.shape[0] != N or mask.shape[1] != C or mask.shape[2] != M):
        raise ValueError("mask shape does not match gy")
    if mask_mode not in (0, 1, 2):
        raise ValueError("mask_mode must be 0, 1 or 2")
    if mu.shape[0] != C or inv_sigma.shape[0] != C or scale.shape[0] != C or beta.shape[0] != C:
        raise ValueError("per-channel arrays must have one entry per channel")
    if ggamma.shape[0] != C or gbeta.shape[0] != C:
        raise ValueError("ggamma and gbeta must have one entry per channel")
    with nogil:
        for c in prange(C, schedule="static"):
            sb = 0
            sg = 0
            for n in range(N):
                pm = &mask[n, c, 0] if mask_mode == 2 else NULL
                _row_sums(&gy[n, c, 0], &src[n, c, 0], pm, M, mask_mode, mu[c], inv_sigma[c],
                          scale[c], beta[c], &sb, &sg)
            gbeta[c] = sb
            ggamma[c] = sg
            if want_gx:
                a_ = <floating> (sb / count) if batch_stats else 0
                k_ = <floating> (sg / count) if batch_stats else 0
                for n in range(N):
                    pm = &mask[n, c, 0] if mask_mode == 2 else NULL
                    _row_grad(&gy[n, c, 0], &src[n, c, 0], pm, &gx[n, c, 0], M, mask_mode, mu[c],
                              inv_sigma[c], scale[c], beta[c], batch_stats, a_, k_)


cdef inline void _decode_block(const unsigned char* packed, Py_ssize_t start, Py_ssize_t m, int bits, int s,
                               float step, float off, float* xh, unsigned char* mk) noexcept nogil:
    """Codes start .. start+m of a paper-scheme tensor (8/bits per byte, first in the low
    bits) -> xhat = float32(float32(code - s) + 0.5) * step + off (two roundings, as
    paper_decode) and the mask code >= s."""
    # 8 / bits codes per byte, a power of two: shifts and masks, no division per value
    cdef Py_ssize_t i, j, lv = 3 if bits == 1 else 2 if bits == 2 else 1 if bits == 4 else 0
    cdef Py_ssize_t vmask = (1 << lv) - 1
    cdef int cmask = (1 << bits) - 1, code
    cdef float t
    for i in range(m):
        j = start + i
        code = (packed[j >> lv] >> ((j & vmask) * bits)) & cmask
        t = <float> (code - s)
        t = t + <float> 0.5
        xh[i] = t * step + off
        mk[i] = code >= s


cdef void _channel_codes(const float* gy, const unsigned char* packed, Py_ssize_t N, Py_ssize_t C,
                         Py_ssize_t M, Py_ssize_t c, int bits, int s, float step, float off, float sc,
                         bint batch_stats, float* gx, double* ggamma, double* gbeta) noexcept nogil:
    """One channel of ``bn_backward_codes`` (the stack blocks are this call's own)."""
    cdef float xh[BLOCK]
    cdef unsigned char mk[BLOCK]
    cdef float g[BLOCK]
    cdef double ab[8]
    cdef double ag[8]
    cdef double sb = 0, sg = 0, count = <double> (N * M)
    cdef Py_ssize_t n, i, j0, nb, k8, row
    cdef float a_, k_
    cdef const float* pg
    cdef float* po
    for n in range(N):
        row = (n * C + c) * M
        pg = gy + row
        for k8 in range(8):
            ab[k8] = 0
            ag[k8] = 0
        j0 = 0
        while j0 < M:
            nb = min(<Py_ssize_t> BLOCK, M - j0)
            _decode_block(packed, row + j0, nb, bits, s, step, off, xh, mk)
            for i in range(nb):
                g[i] = pg[j0 + i] if mk[i] != 0 else pg[j0 + i] * 0
            for i in range(nb):
                ab[i & 7] += g[i]
                ag[i & 7] += g[i] * xh[i]
            j0 += BLOCK
        sb += ((ab[0] + ab[1]) + (ab[2] + ab[3])) + ((ab[4] + ab[5]) + (ab[6] + ab[7]))
        sg += ((ag[0] + ag[1]) + (ag[2] + ag[3])) + ((ag[4] + ag[5]) + (ag[6] + ag[7]))
    gbeta[0] = sb
    ggamma[0] = sg
    if gx == NULL:
        return
    a_ = <float> (sb / count) if batch_stats else 0
    k_ = <float> (sg / count) if batch_stats else 0
    for n in range(N):
        row = (n * C + c) * M
        pg = gy + row
        po = gx + row
        j0 = 0
        while j0 < M:
            nb = min(<Py_ssize_t> BLOCK, M - j0)
            _decode_block(packed, row + j0, nb, bits, s, step, off, xh, mk)
            for i in range(nb):
                po[j0 + i] = pg[j0 + i] if mk[i] != 0 else pg[j0 + i] * 0
            if batch_stats:
                for i in range(nb):
                    po[j0 + i] = sc * (po[j0 + i] - a_ - xh[i] * k_)
            else:
                for i in range(nb):
                    po[j0 + i] = sc * po[j0 + i]
            j0 += BLOCK


def bn_backward_codes(const float[:, :, ::1] gy,       # IN:  (N, C, M) output gradient of the unit (gh)
                      const unsigned char[::1] packed,  # IN:  paper-scheme codes of the unit's y
                      const int[::1] s,                 # IN:  (C,) first positive code
                      const float[::1] x_step,          # IN:  (C,) xhat decode map
                      const float[::1] x_off,           # IN:  (C,)
                      int bits,
                      const float[::1] scale,           # IN:  (C,) gamma * inv_sigma
                      bint batch_stats,
                      float[:, :, ::1] gx,              # OUT: (N, C, M) or None
                      double[::1] ggamma,               # OUT: (C,)
                      double[::1] gbeta):               # OUT: (C,)
    """``bn_backward`` of a BN -> ReLU unit straight from its K-bit codes: xhat and the
    mask are rebuilt per block of 256 values on the stack, never as arrays. The
    same arithmetic in the same order as decoding first (``paper_decode``,
    ``paper_mask``) and calling ``bn_backward`` with src = xhat, mu = 0,
    inv_sigma = 1, mask_mode 2, so the same bytes."""
    cdef Py_ssize_t N = gy.shape[0], C = gy.shape[1], M = gy.shape[2], c
    cdef float* pgx = NULL
    if bits not in (1, 2, 4, 8):
        raise ValueError("bits must be 1, 2, 4 or 8")
    if packed.shape[0] != (N * C * M * bits + 7) // 8:
        raise ValueError("packed does not hold N*C*M codes")
    if gx is not None and (gx.shape[0] != N or gx.shape[1] != C or gx.shape[2] != M):
        raise ValueError("gx shape does not match gy")
    if s.shape[0] != C or x_step.shape[0] != C or x_off.shape[0] != C or scale.shape[0] != C:
        raise ValueError("per-channel arrays must have one entry per channel")
    if ggamma.shape[0] != C or gbeta.shape[0] != C:
        raise ValueError("ggamma and gbeta must have one entry per channel")
    if N * C * M == 0:
        return
    if gx is not None:
        pgx = &gx[0, 0, 0]
    with nogil:
        for c in prange(C, schedule="static"):
            _channel_codes(&gy[0, 0, 0], &packed[0], N, C, M, c, bits, s[c], x_step[c], x_off[c], scale[c],
                           batch_stats, pgx, &ggamma[c], &gbeta[c])
