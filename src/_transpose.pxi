# The blocked matrix transpose shared by the layout kernels (``src/_im2col.pyx``,
# ``src/_winograd.pyx``): between a channel-major image row (C, W) and the
# channel-minor (W, C) of im2row's scratch and Winograd's tile stacks. Included
# textually (``include "_transpose.pxi"``); the including module cimports ``floating``.


cdef inline void _transpose(const floating* src, Py_ssize_t s_row, Py_ssize_t rows, Py_ssize_t cols,
                            floating* dst, Py_ssize_t d_row) noexcept nogil:
    """dst[j*d_row + i] = src[i*s_row + j] for i < rows, j < cols, in 8 x 8 blocks: a
    block touches 8 lines on each side, so strides of a whole page (a channel plane)
    on either side stay within the cache's ways."""
    cdef Py_ssize_t i0, j0, i, j
    for i0 in range(0, rows - rows % 8, 8):
        for j0 in range(0, cols - cols % 8, 8):
            for j in range(j0, j0 + 8):
                for i in range(8):                  # a fixed count: unrolled
                    dst[j * d_row + i0 + i] = src[(i0 + i) * s_row + j]
        for j in range(cols - cols % 8, cols):
            for i in range(8):
                dst[j * d_row + i0 + i] = src[(i0 + i) * s_row + j]
    for i in range(rows - rows % 8, rows):
        for j in range(cols):
            dst[j * d_row + i] = src[i * s_row + j]
