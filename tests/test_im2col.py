"""im2row / row2im: reference vs a naive oracle, adjointness, compiled == reference bit for bit."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npapprox.kernels import im2col as K

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (np.float32, np.float64)


@st.composite
def geometries(draw):
    """(N, C, H, W, kh, kw, stride, pad) with OH, OW >= 1; sometimes a fixed 7x7 kernel."""
    N = draw(st.integers(1, 3))
    C = draw(st.integers(1, 4))
    H = draw(st.integers(1, 9))
    W = draw(st.integers(1, 9))
    if draw(st.integers(0, 9)) == 0:
        kh = kw = 7
    else:
        kh = draw(st.integers(1, 3))
        kw = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 3))
    pad = draw(st.integers(0, 3))
    OH, OW = K.output_size(H, W, kh, kw, stride, pad)
    if OH < 1 or OW < 1:  # make the window fit by padding more (stays within 0..3 for 7x7 too)
        pad = max(pad, (kh - H + 1) // 2, (kw - W + 1) // 2)
    return N, C, H, W, kh, kw, stride, pad


def _data(rng, shape, dtype):
    a = rng.standard_normal(shape).astype(dtype)
    a.flat[:: 7] = -0.0  # signed zeros: the bit-for-bit checks must see them too
    return a


def naive_im2row(x, kh, kw, stride, pad):
    N, C, H, W = x.shape
    OH, OW = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    rows = np.zeros((N * OH * OW, kh * kw * C), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for p in range(kh):
                for q in range(kw):
                    for i in range(OH):
                        for j in range(OW):
                            ih, iw = i * stride + p - pad, j * stride + q - pad
                            if 0 <= ih < H and 0 <= iw < W:
                                rows[(n * OH + i) * OW + j, (p * kw + q) * C + c] = x[n, c, ih, iw]
    return rows


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.fixture(autouse=True)
def _restore_dispatch():
    yield
    K.use_reference(False)


@SETTINGS
@given(g=geometries(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_reference_matches_naive_oracle(g, dtype, seed):
    N, C, H, W, kh, kw, stride, pad = g
    x = _data(np.random.default_rng(seed), (N, C, H, W), dtype)
    got = K.im2row_reference(x, kh, kw, stride, pad)
    want = naive_im2row(x, kh, kw, stride, pad)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(_bits(got), _bits(want))


@SETTINGS
@given(g=geometries(), seed=st.integers(0, 2**32 - 1), reference=st.booleans())
def test_row2im_is_the_adjoint(g, seed, reference):
    N, C, H, W, kh, kw, stride, pad = g
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    K.use_reference(reference)
    cols = K.im2row(x, kh, kw, stride, pad)
    c = rng.standard_normal(cols.shape)
    gx = K.row2im(c, x.shape, kh, kw, stride, pad)
    assert gx.shape == x.shape and gx.dtype == np.float64
    lhs = float(np.vdot(cols, c))
    rhs = float(np.vdot(x, gx))
    scale = float(np.vdot(np.abs(cols), np.abs(c))) + 1e-300
    assert abs(lhs - rhs) <= 1e-10 * scale


def test_compiled_module_is_built():
    """The package is always built by pip install: a missing extension is a failure."""
    mod = importlib.import_module("npapprox._im2col")
    assert K.compiled_available() and K._compiled is mod


@SETTINGS
@given(g=geometries(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_compiled_bit_identical_to_reference(g, dtype, seed):
    compiled = importlib.import_module("npapprox._im2col")
    N, C, H, W, kh, kw, stride, pad = g
    rng = np.random.default_rng(seed)
    x = _data(rng, (N, C, H, W), dtype)
    ref = K.im2row_reference(x, kh, kw, stride, pad)

    out = np.full(ref.shape, np.nan, dtype=dtype)  # the kernel must overwrite every entry
    compiled.im2row(x, out, kh, kw, stride, pad)
    assert np.array_equal(_bits(out), _bits(ref))
    assert np.array_equal(_bits(K.im2row(x, kh, kw, stride, pad)), _bits(ref))

    c = _data(rng, ref.shape, dtype)
    gref = K.row2im_reference(c, x.shape, kh, kw, stride, pad)
    gx = np.full(x.shape, np.nan, dtype=dtype)
    compiled.row2im(c, gx, kh, kw, stride, pad)
    assert gref.dtype == gx.dtype == dtype
    assert np.array_equal(_bits(gx), _bits(gref))
    assert np.array_equal(_bits(K.row2im(c, x.shape, kh, kw, stride, pad)), _bits(gref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_handles_views_out_and_reference_switch(dtype):
    rng = np.random.default_rng(0)
    base = _data(rng, (2, 6, 10, 12), dtype)
    x = base[:, ::2, 1:, ::-1]  # not contiguous
    ref = K.im2row_reference(np.ascontiguousarray(x), 3, 3, 2, 1)
    assert np.array_equal(_bits(K.im2row(x, 3, 3, 2, 1)), _bits(ref))
    out = np.empty_like(ref)
    assert K.im2row(x, 3, 3, 2, 1, out=out) is out and np.array_equal(_bits(out), _bits(ref))
    cols_t = np.asfortranarray(ref)  # not C-contiguous
    gref = K.row2im_reference(ref, x.shape, 3, 3, 2, 1)
    assert np.array_equal(_bits(K.row2im(cols_t, x.shape, 3, 3, 2, 1)), _bits(gref))
    K.use_reference(True)
    assert not K._use_compiled(x)
    assert np.array_equal(_bits(K.im2row(x, 3, 3, 2, 1)), _bits(ref))
    with pytest.raises(ValueError):
        K.im2row(x, 3, 3, 2, 1, out=np.empty(ref.shape[:-1] + (1,), dtype))
    with pytest.raises(ValueError):
        K.row2im(ref[:, :-1], x.shape, 3, 3, 2, 1)
    with pytest.raises(ValueError):
        K.row2im(ref[:-1], x.shape, 3, 3, 2, 1)


def test_fixed_large_kernel_and_other_dtypes():
    rng = np.random.default_rng(1)
    x = _data(rng, (2, 3, 9, 9), np.float32)
    for stride, pad in ((1, 3), (2, 3), (3, 0)):
        want = naive_im2row(x, 7, 7, stride, pad)
        assert np.array_equal(_bits(K.im2row(x, 7, 7, stride, pad)), _bits(want))
    # dtypes without a compiled kernel go to the reference
    x16 = x.astype(np.float16)
    assert np.array_equal(K.im2row(x16, 3, 3, 1, 1), naive_im2row(x16, 3, 3, 1, 1))
    with pytest.raises(ValueError):
        K.im2row(x, 11, 11, 1, 0)


def test_environment_variable_forces_reference():
    code = ("from npapprox.kernels import im2col as K; import numpy as np; "
            "print(K._use_compiled(np.zeros((1, 1, 1, 1), np.float32)))")
    env = dict(os.environ, NPAPPROX_REFERENCE_KERNELS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


@SETTINGS
@given(n=st.integers(0, 3), r=st.integers(1, 21), s=st.integers(1, 21), dtype=st.sampled_from(DTYPES),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_transpose_samples_is_numpys_transpose(n, r, s, dtype, transposed, seed):
    """The compiled blocked transpose (rows of 8 plus a remainder) == a naive loop, bit for bit,
    from a contiguous or a transposed (non-contiguous) source."""
    src = _data(np.random.default_rng(seed), (n, s, r) if transposed else (n, r, s), dtype)
    src = src.transpose(0, 2, 1) if transposed else src
    out = np.full((n, s, r), np.nan, dtype)
    assert K.transpose_samples(src, out) is out
    want = np.empty_like(out)
    for i, j in np.ndindex(r, s):
        want[:, j, i] = src[:, i, j]
    assert np.array_equal(_bits(out), _bits(want))
    with pytest.raises(ValueError, match="transpose_samples"):
        K._compiled.transpose_samples(np.ascontiguousarray(src), np.empty((n, s, r + 1), dtype))
