"""Average pooling: the compiled kernels (src/_pool.pyx) against the slice reference
(``NPAPPROX_REFERENCE_KERNELS``'s path) bit for bit, and both against a naive loop."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npapprox import ops
from npapprox.kernels.switch import compiled_applies, use_reference
from npapprox.ops import pool
from npapprox.tensor import Tensor

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def test_the_extension_is_built():
    """The package is built for the tests (``pip install -e .``): the compiled kernels run below."""
    assert pool._compiled is not None and compiled_applies(pool._compiled, np.zeros(1, np.float32))


@st.composite
def cases(draw):
    """(N, C, H, W, k, s, dtype); k == s == 2 with even sizes often (the fused path)."""
    if draw(st.booleans()):
        k = s = 2
        H, W = 2 * draw(st.integers(1, 5)), 2 * draw(st.integers(1, 5))
    else:
        k, s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        H, W = draw(st.integers(k, 9)), draw(st.integers(k, 9))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), H, W, k, s,
            draw(st.sampled_from([np.float32, np.float64])))


def _data(rng, shape, dtype):
    a = rng.standard_normal(shape).astype(dtype)
    a.flat[::7] = -0.0                      # signed zeros, and the special values
    a.flat[3::11] = np.inf
    a.flat[5::13] = np.nan
    a.flat[2::17] = np.finfo(dtype).tiny / 3   # subnormal
    return a


def _naive(x, k, s):
    """y[n, c, i, j] = (((0 + x[.., i*s, j*s]) + ...) in row-major window order) * (1/k^2)."""
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    inv = x.dtype.type(1 / k**2)
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    for idx in np.ndindex(n, c, oh, ow):
        acc = x.dtype.type(0)
        for p in range(k):
            for q in range(k):
                acc = acc + x[idx[0], idx[1], idx[2] * s + p, idx[3] * s + q]
        y[idx] = acc * inv
    return y


def _forward_backward(x, gy, k, s, reference):
    use_reference(reference)
    try:
        t = Tensor(x, requires_grad=True)
        y = ops.avg_pool2d(t, k, s)
        y.backward(gy)
        return y.data, t.grad
    finally:
        use_reference(False)


@SETTINGS
@given(case=cases(), seed=st.integers(0, 2**16))
def test_compiled_equals_reference_bit_for_bit(case, seed):
    n, c, h, w, k, s, dtype = case
    rng = np.random.default_rng(seed)
    x = _data(rng, (n, c, h, w), dtype)
    gy = _data(rng, (n, c, (h - k) // s + 1, (w - k) // s + 1), dtype)
    y_c, gx_c = _forward_backward(x, gy, k, s, reference=False)
    y_r, gx_r = _forward_backward(x, gy, k, s, reference=True)
    assert y_c.dtype == y_r.dtype == gx_c.dtype == dtype
    assert y_c.tobytes() == y_r.tobytes()
    assert gx_c.tobytes() == gx_r.tobytes()
    assert y_c.tobytes() == _naive(x, k, s).tobytes()


def test_backward_is_the_adjoint_of_forward():
    """<avg_pool(x), gy> == <x, avg_pool^T(gy)> in float64 (overlapping and uncovered positions)."""
    rng = np.random.default_rng(0)
    for k, s, h in [(2, 2, 8), (3, 2, 9), (3, 1, 7), (2, 3, 8)]:
        x = rng.standard_normal((2, 3, h, h))
        gy = rng.standard_normal((2, 3, (h - k) // s + 1, (h - k) // s + 1))
        y, gx = _forward_backward(x, gy, k, s, reference=False)
        assert np.isclose(np.vdot(y, gy), np.vdot(x, gx), rtol=1e-12)


def test_non_contiguous_input_and_the_worker_split():
    """A transposed view and a batch split over workers give the reference's bytes."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 4, 16, 16)).astype(np.float32).transpose(0, 1, 3, 2)
    gy = rng.standard_normal((8, 4, 8, 8)).astype(np.float32)
    got = _forward_backward(x, gy, 2, 2, reference=False)
    want = _forward_backward(x, gy, 2, 2, reference=True)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want, strict=True))


def test_bad_shapes_are_refused():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="shapes do not match"):
        pool._compiled.avg_pool_forward(x, np.zeros((1, 1, 3, 3), np.float32), 2, 2, 0.25, 0, 1)
    with pytest.raises(ValueError, match="differ in samples or channels"):
        pool._compiled.avg_pool_backward(np.zeros((1, 2, 2, 2), np.float32), x, 2, 2, 0.25, 0, 1)
    with pytest.raises(ValueError, match="sample range"):
        pool._compiled.avg_pool_forward(x, np.zeros((1, 1, 2, 2), np.float32), 2, 2, 0.25, 0, 2)
