# Code helpers shared by the storage kernels (``src/_quant.pyx``) and the batch-norm
# kernels (``src/_bn.pyx``, whose fused passes pack and unpack paper codes in place):
# bit packing of K-bit codes (8/K per byte, first code in the low bits) and the
# paper scheme's code of one value. Included textually (``include "_codes.pxi"``);
# the including module cimports ``uint8_t`` and ``memcpy``.


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


cdef inline Py_ssize_t _paper_codes(const float* y, Py_ssize_t m, float k, int s, int nb,
                                    uint8_t* codes) noexcept nogil:
    """codes[j] = the paper code of y[j] (see reference.paper_pack); returns #non-finite.

    Same codes as the reference's sequence of clamps, with fewer operations:

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
    cdef Py_ssize_t j
    cdef int nf = 0                          # m <= PIECE: an int cannot overflow
    cdef float v, u, lower, upper, zero = 0
    cdef float pos_lo = 1, pos_hi = <float>(nb - s)
    cdef float neg_lo = <float>(1 - s), neg_hi = 0
    cdef int t, sm1 = s - 1
    for j in range(m):
        v = y[j]
        nf += not (v - v == zero)            # NaN or +-inf (v - v is NaN exactly then)
        lower = pos_lo if v > zero else neg_lo   # exact mask: code >= s  <=>  v > 0
        upper = pos_hi if v > zero else neg_hi
        u = v * k
        u = u if u > lower else lower        # NaN -> lower (like fmaxf)
        u = u if u < upper else upper
        t = <int>u                           # truncation; |u| < NB so no overflow
        t = t + (<float>t < u)               # == ceil(u) (also for -0.0 and integers)
        codes[j] = <uint8_t>(sm1 + t)
    return nf
