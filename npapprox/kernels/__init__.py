"""Low-level data-movement kernels (``im2col`` / ``col2im`` for convolutions).

Each kernel has one dispatch point that picks the compiled Cython module when
it is built and the input is a NumPy array, and a pure ``xp`` reference
implementation otherwise (CuPy arrays, ``NPAPPROX_REFERENCE_KERNELS=1``).

Import from the submodule: ``from npapprox.kernels.im2col import im2col, col2im``
(nothing is re-exported here, so ``npapprox.kernels.im2col`` stays the module).
"""
