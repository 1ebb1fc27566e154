# Code helpers shared by the storage kernels (``src/_quant.pyx``) and the batch-norm
# kernels (``src/_bn.pyx``, whose fused passes pack and unpack paper codes in place):
# bit packing of K-bit codes (8/K per byte, first code in the low bits) and the
# paper scheme's code of one value. Included textually (``include "_codes.pxi"``);
# the including module cimports ``uint8_t``, ``uint32_t`` and ``memcpy``.


cdef inline void _pack(const uint8_t* c, Py_ssize_t nbytes, int bits, uint8_t* out) noexcept nogil:
    """out[b] = OR_j c[b*V + j] << (j*bits); c holds nbytes*V codes (zero padded)."""
    cdef Py_ssize_t b
    if bits == 8:
        memcpy(out, c, nbytes)
    elif bits == 4:
        for b in range(nbytes):
            out[b] = <uint8_t>(c[2 * b] | (c[2 * b + 1] << 4))
    elif bits == 2:
        for b in range(nbytes):
            out[b] = <uint8_t>(c[4 * b] | (c[4 * b + 1] << 2) | (c[4 * b + 2] << 4) | (c[4 * b + 3] << 6))
    else:
        for b in range(nbytes):
            out[b] = <uint8_t>(c[8 * b] | (c[8 * b + 1] << 1) | (c[8 * b + 2] << 2) | (c[8 * b + 3] << 3)
                               | (c[8 * b + 4] << 4) | (c[8 * b + 5] << 5) | (c[8 * b + 6] << 6)
                               | (c[8 * b + 7] << 7))


cdef inline void _unpack(const uint8_t* p, Py_ssize_t nbytes, int bits, uint8_t* c) noexcept nogil:
    """c[b*V + j] = (p[b] >> (j*bits)) & (2**bits - 1) for b < nbytes, j < V."""
    cdef Py_ssize_t b, j
    cdef uint8_t x
    if bits == 8:
        memcpy(c, p, nbytes)
    elif bits == 4:
        for b in range(nbytes):
            x = p[b]
            c[2 * b] = x & 15
            c[2 * b + 1] = x >> 4
    elif bits == 2:
        for b in range(nbytes):
            x = p[b]
            c[4 * b] = x & 3
            c[4 * b + 1] = (x >> 2) & 3
            c[4 * b + 2] = (x >> 4) & 3
            c[4 * b + 3] = x >> 6
    else:
        for b in range(nbytes):
            x = p[b]
            for j in range(8):
                c[8 * b + j] = (x >> j) & 1


cdef extern from *:
    """
    #include <math.h>
    /* ceil(u) for |u| < 2^31: one instruction with SSE4.1 (or on ARM); without it,
       ceilf is a call per value, and truncation then a step up vectorises. */
    static inline int npa_ceil(float u) {
    #if defined(__SSE4_1__) || defined(__aarch64__)
        return (int)ceilf(u);
    #else
        int t = (int)u;
        return t + ((float)t < u);
    #endif
    }
    """
    int npa_ceil(float u) noexcept nogil


cdef struct PaperBounds:
    # one channel's constants of ``_paper_code``: the clamp bounds (floats) and s - 1
    float k, pos_hi, neg_lo
    int sm1


cdef inline PaperBounds _paper_bounds(float k, int s, int nb) noexcept nogil:
    cdef PaperBounds b
    b.k, b.pos_hi, b.neg_lo, b.sm1 = k, <float>(nb - s), <float>(1 - s), s - 1
    return b


cdef inline uint8_t _paper_code(float v, const PaperBounds* b) noexcept nogil:
    """The paper code of v (see reference.paper_pack), with fewer operations than the
    reference's sequence of clamps:

        code = s - 1 + ceil(clamp(v * k, lower, upper))
        lower, upper = (1, NB - s) if v > 0 else (1 - s, 0)     # clamp: NaN -> lower

    Why equal: for integer bounds ``a <= b``, ``ceil(clamp(u, a, b)) ==
    clamp(ceil(u), a, b)``; the reference clamps ``ceil(u)`` to ``[-(NB+1), NB+1]``
    (through u), then to ``[1-s, NB-s]`` (code in ``[0, NB-1]``), then to
    ``[1, NB-s]`` or ``[1-s, 0]`` (the mask step); nested clamps compose to the
    innermost interval, each non-empty because ``1 <= s <= NB-1``. A NaN product
    (NaN or inf * 0) lands on ``lower`` in both (the reference: ``-(NB+1)``,
    clamped up to ``1-s`` or ``1``). The parity tests check it bit for bit.
    """
    cdef float zero = 0, one = 1
    cdef float lower = one if v > zero else b.neg_lo   # exact mask: code >= s  <=>  v > 0
    cdef float upper = b.pos_hi if v > zero else zero
    cdef float u = v * b.k
    u = u if u > lower else lower            # NaN -> lower (like fmaxf)
    u = u if u < upper else upper
    return <uint8_t>(b.sm1 + npa_ceil(u))


cdef inline uint32_t _nonfinite(float v) noexcept nogil:
    """1 when v is NaN or +-inf, else 0, in integer operations (a sum or an OR of these
    vectorises on every x86 vector unit, where a float reduction would not): the bits of
    |v| are >= 0x7f800000 exactly then, and adding 0x00800000 carries into bit 31."""
    cdef uint32_t bits
    memcpy(&bits, &v, 4)
    return ((bits & 0x7fffffff) + 0x00800000) >> 31


cdef inline int _count_nonfinite(const float* y, Py_ssize_t m) noexcept nogil:
    """#NaN and +-inf in y[0:m] (called when ``_nonfinite`` found a block holding some)."""
    cdef Py_ssize_t j
    cdef int nf = 0
    for j in range(m):
        nf += _nonfinite(y[j])
    return nf


cdef inline Py_ssize_t _paper_codes(const float* y, Py_ssize_t m, float k, int s, int nb,
                                    uint8_t* codes) noexcept nogil:
    """codes[j] = the paper code of y[j] (``_paper_code``); returns #non-finite."""
    cdef Py_ssize_t j
    cdef uint32_t bad = 0
    cdef PaperBounds b = _paper_bounds(k, s, nb)
    for j in range(m):
        bad |= _nonfinite(y[j])
        codes[j] = _paper_code(y[j], &b)
    return _count_nonfinite(y, m) if bad else 0
