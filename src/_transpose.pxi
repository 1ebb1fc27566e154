# The blocked matrix transpose shared by the layout kernels (``src/_im2col.pyx``,
# ``src/_winograd.pyx``): between a channel-major image row (C, W) and the
# channel-minor (W, C) of im2row's scratch and Winograd's tile stacks. Included
# textually (``include "_transpose.pxi"``); the including module cimports ``floating``.


cdef inline void _transpose(const floating* src, Py_ssize_t s_row, Py_ssize_t rows, Py_ssize_t cols,
                            floating* dst, Py_ssize_t d_row) noexcept nogil:
    """dst[j*d_row + i] = src[i*s_row + j] for i < rows, j < cols. Rows of 8 at a
    time, so each strided write stream fills whole cache lines."""
    cdef Py_ssize_t i0 = 0, i, j
    while i0 + 8 <= rows:
        for j in range(cols):
            for i in range(8):                  # a fixed count: unrolled
                dst[j * d_row + i0 + i] = src[(i0 + i) * s_row + j]
        i0 += 8
    for j in range(cols):
        for i in range(i0, rows):
            dst[j * d_row + i] = src[i * s_row + j]
