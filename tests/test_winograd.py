"""Winograd 3x3 stride-1 convolution: transforms (compiled == reference bit for bit, adjoints),
the conv path against im2row, a float64 oracle, PyTorch and float64 central differences,
the algorithm switch and determinism.

Tolerances (float32, |diff| <= TOL[m] * max|reference| elementwise, the reference being the
im2row path, a float64 oracle or PyTorch): F(2x2,3x3) 5e-6, F(4x4,3x3) 3e-5. Measured worst
case over these tests' shapes: 6e-7 (F(2x2)) and 3e-6 (F(4x4)); at the ResNet-20 shapes, with
more channels summed, F(4x4) measured up to 2e-5 (docs/kernels.md, "Winograd convolution").
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from npapprox import Tensor, cli, ops
from npapprox.function import Context
from npapprox.kernels import winograd as WG
from npapprox.kernels.switch import use_reference
from npapprox.ops import conv as CV
from npapprox.policy import Exact, Paper

from gradcheck import directional_check
from support import SETTINGS, engine_unit, same, unit_problem

TOL = {2: 5e-6, 4: 3e-5}
SEEDS = st.integers(0, 2**32 - 1)


@pytest.fixture(autouse=True)
def _restore_switches():
    yield
    use_reference(False)
    CV.use_algorithm(None)


@st.composite
def shapes(draw, max_c=5):
    """(B, C, F, H, W, pad) of a 3x3 stride-1 conv with an output of at least 1x1."""
    pad = draw(st.integers(0, 2))
    lo = max(1, 3 - 2 * pad)
    return (draw(st.integers(1, 3)), draw(st.integers(1, max_c)), draw(st.integers(1, max_c)),
            draw(st.integers(lo, lo + 9)), draw(st.integers(lo, lo + 9)), pad)


def _data(rng, shape, dtype):
    a = rng.standard_normal(shape).astype(dtype)
    a.flat[::7] = -0.0  # signed zeros: the bit-for-bit checks must see them too
    return a


def _naive_conv(x, w, pad):
    """float64 oracle: y[n,f,i,j] = sum_{c,p,q} w[f,c,p,q] xpad[n,c,i+p,j+q]."""
    xp_ = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = xp_.shape[2] - 2, xp_.shape[3] - 2
    win = np.lib.stride_tricks.sliding_window_view(xp_, (3, 3), axis=(2, 3))[:, :, :oh, :ow]
    return np.einsum("ncijpq,fcpq->nfij", win, w.astype(np.float64))


def _conv_with_grads(x, w, b, pad, r, algorithm):
    """y = conv2d(x, w, b), then backward of sum(y * r) -> (y, gx, gw, gb), under ``algorithm``."""
    CV.use_algorithm(algorithm)
    X, W = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    B = Tensor(b, requires_grad=True) if b is not None else None
    y = ops.conv2d(X, W, B, padding=pad)
    ops.sum_all(ops.mul(y, Tensor(r))).backward()
    return y.data, X.grad, W.grad, None if b is None else B.grad


def _close(got, want, m, what):
    scale = float(np.abs(want).max()) if want.size else 0.0
    err = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
    assert got.shape == want.shape and err <= TOL[m] * scale + 1e-30, f"{what}: err {err:.2e}, scale {scale:.2e}"


# --------------------------------------------------------------------------- #
# Transforms
# --------------------------------------------------------------------------- #
def test_compiled_module_is_built():
    """The package is always built by pip install: a missing extension is a failure."""
    mod = importlib.import_module("npapprox._winograd")
    assert WG.compiled_available() and WG._compiled is mod


@SETTINGS(60)
@given(s=shapes(), m=st.sampled_from(WG.TILES), dtype=st.sampled_from([np.float32, np.float64]), seed=SEEDS)
@example(s=(2, 3, 4, 7, 9, 1), m=4, dtype=np.float32, seed=0)
@example(s=(1, 2, 2, 1, 1, 1), m=2, dtype=np.float32, seed=1)
def test_compiled_transforms_bit_identical_to_reference(s, m, dtype, seed):
    """Every transform and adjoint: the compiled kernel gives the reference's bytes
    (``out`` pre-filled with NaN: every entry is written)."""
    B, C, F, H, W, pad = s
    rng = np.random.default_rng(seed)
    a = m + 2
    x, w = _data(rng, (B, C, H, W), dtype), _data(rng, (F, C, 3, 3), dtype)
    oh, ow = H + 2 * pad - 2, W + 2 * pad - 2
    th, tw = WG.tile_grid(oh, ow, m)
    P = B * th * tw
    mt, gv = _data(rng, (a * a, P, F), dtype), _data(rng, (a * a, P, C), dtype)
    gy, gu = _data(rng, (B, F, oh, ow), dtype), _data(rng, (a * a, C, F), dtype)
    pairs = [
        (WG.filter_tiles(w, m), WG.filter_tiles_reference(w, m)),
        (WG.filter_tiles_adjoint(gu, m), WG.filter_tiles_adjoint_reference(gu, m)),
        (WG.input_tiles(x, m, pad, out=np.full((a * a, P, C), np.nan, dtype)), WG.input_tiles_reference(x, m, pad)),
        (WG.input_tiles_adjoint(gv, x.shape, m, pad, out=np.full(x.shape, np.nan, dtype)),
         WG.input_tiles_adjoint_reference(gv, x.shape, m, pad)),
        (WG.output_tiles(mt, gy.shape, m, out=np.full(gy.shape, np.nan, dtype)),
         WG.output_tiles_reference(mt, gy.shape, m)),
        (WG.output_tiles_adjoint(gy, m, out=np.full((a * a, P, F), np.nan, dtype)),
         WG.output_tiles_adjoint_reference(gy, m)),
    ]
    for i, (got, want) in enumerate(pairs):
        assert same(got, want), f"transform {i}: compiled != reference"


@SETTINGS(40)
@given(s=shapes(), m=st.sampled_from(WG.TILES), dtype=st.sampled_from([np.float32, np.float64]),
       compiled=st.booleans(), fortran=st.booleans(), seed=SEEDS)
@example(s=(2, 3, 4, 7, 9, 1), m=4, dtype=np.float32, compiled=True, fortran=True, seed=0)
def test_chunk_transforms_give_the_references_bytes(s, m, dtype, compiled, fortran, seed):
    """``ChunkTransforms`` (the conv op's per-chunk calls, dispatched once): each of the
    four writes into its ``out`` (pre-filled with NaN) and returns it, with the
    reference's bytes, compiled or not, from C- or Fortran-ordered inputs."""
    B, C, F, H, W, pad = s
    rng = np.random.default_rng(seed)
    a = m + 2
    oh, ow = H + 2 * pad - 2, W + 2 * pad - 2
    th, tw = WG.tile_grid(oh, ow, m)
    P = B * th * tw
    x, gy = _data(rng, (B, C, H, W), dtype), _data(rng, (B, F, oh, ow), dtype)
    mt, gv = _data(rng, (a * a, P, F), dtype), _data(rng, (a * a, P, C), dtype)
    order = np.asfortranarray if fortran else np.ascontiguousarray
    tf = WG.ChunkTransforms(m, dtype, compiled)
    for call, want in [
        (lambda out: tf.input_tiles(order(x), pad, out), WG.input_tiles_reference(x, m, pad)),
        (lambda out: tf.output_tiles(order(mt), out), WG.output_tiles_reference(mt, gy.shape, m)),
        (lambda out: tf.output_tiles_adjoint(order(gy), out), WG.output_tiles_adjoint_reference(gy, m)),
        (lambda out: tf.input_tiles_adjoint(order(gv), pad, out),
         WG.input_tiles_adjoint_reference(gv, x.shape, m, pad)),
    ]:
        out = np.full(want.shape, np.nan, dtype)
        assert call(out) is out and same(out, want)
    assert WG.compiled_for(x) and not WG.compiled_for(x.astype(np.float16))


@pytest.mark.parametrize("m", WG.TILES)
def test_adjoints_are_transposes(m):
    """<T(x), g> == <x, T*(g)> in float64 for the three transform pairs (reference and compiled)."""
    rng = np.random.default_rng(m)
    B, C, F, H, W, pad = 2, 3, 4, 7, 6, 1
    a, (th, tw) = m + 2, WG.tile_grid(H + 2 * pad - 2, W + 2 * pad - 2, m)
    x, w = rng.standard_normal((B, C, H, W)), rng.standard_normal((F, C, 3, 3))
    gv, gm = rng.standard_normal((a * a, B * th * tw, C)), rng.standard_normal((a * a, B * th * tw, F))
    gy, gu = rng.standard_normal((B, F, H, W)), rng.standard_normal((a * a, C, F))
    for reference in (False, True):
        use_reference(reference)
        for lhs, rhs in [
            ((WG.input_tiles(x, m, pad) * gv).sum(), (x * WG.input_tiles_adjoint(gv, x.shape, m, pad)).sum()),
            ((WG.output_tiles(gm, gy.shape, m) * gy).sum(), (gm * WG.output_tiles_adjoint(gy, m)).sum()),
            ((WG.filter_tiles(w, m) * gu).sum(), (w * WG.filter_tiles_adjoint(gu, m)).sum()),
        ]:
            assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + abs(rhs) + 1)


def test_transforms_reject_bad_shapes():
    x = np.zeros((1, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="out must be"):
        WG.input_tiles(x, 4, 1, out=np.zeros((36, 1, 3), np.float32))
    with pytest.raises(ValueError, match="shapes do not match"):
        WG._compiled.output_tiles(np.zeros((36, 2, 3), np.float32), np.zeros((1, 3, 5, 5), np.float32),
                                  WG._matrix(4, "AT", np.float32))


# --------------------------------------------------------------------------- #
# The conv path
# --------------------------------------------------------------------------- #
@SETTINGS(40)
@given(s=shapes(max_c=6), m=st.sampled_from(WG.TILES), bias=st.booleans(),
       layout=st.sampled_from(["c", "strided", "transposed"]), seed=SEEDS)
@example(s=(3, 5, 4, 9, 7, 0), m=4, bias=True, layout="strided", seed=0)
def test_winograd_matches_im2row_and_float64_oracle(s, m, bias, layout, seed):
    """float32 forward and both gradients: Winograd vs the im2row path and vs a float64
    oracle (forward: the naive sum; gradients: im2row run in float64), on C- and
    non-contiguous inputs."""
    B, C, F, H, W, pad = s
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    if layout == "strided":
        x = np.repeat(x, 2, axis=3)[..., ::2]
    elif layout == "transposed":
        x = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    w = rng.standard_normal((F, C, 3, 3)).astype(np.float32)
    b = rng.standard_normal(F).astype(np.float32) if bias else None
    r = rng.standard_normal((B, F, H + 2 * pad - 2, W + 2 * pad - 2)).astype(np.float32)
    got = _conv_with_grads(x, w, b, pad, r, f"winograd{m}")
    ref = _conv_with_grads(x, w, b, pad, r, "im2row")
    f64 = _conv_with_grads(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64),
                           pad, r.astype(np.float64), "im2row")
    want_y = _naive_conv(x, w, pad) + (0 if b is None else b.astype(np.float64)[None, :, None, None])
    _close(got[0], want_y, m, "forward vs float64")
    for name, g, want, exact in zip(("y", "gx", "gw", "gb"), got, ref, f64, strict=True):
        if want is not None:
            assert g.dtype == np.float32
            _close(g, want.astype(np.float64), m, f"{name} vs im2row")
            _close(g, exact, m, f"{name} vs float64")


@pytest.mark.parametrize("m", WG.TILES)
def test_winograd_matches_torch(torch, m):
    """float32 forward and gradients against PyTorch's conv2d, odd sizes, padding 0 and 1."""
    F_ = torch.nn.functional
    rng = np.random.default_rng(m)
    for B, C, F, H, W, pad in [(3, 7, 5, 11, 9, 1), (2, 16, 8, 8, 13, 0), (4, 32, 32, 6, 6, 1)]:
        x = rng.standard_normal((B, C, H, W)).astype(np.float32)[:, :, :, ::-1]   # not contiguous
        w = rng.standard_normal((F, C, 3, 3)).astype(np.float32)
        b = rng.standard_normal(F).astype(np.float32)
        r = rng.standard_normal((B, F, H + 2 * pad - 2, W + 2 * pad - 2)).astype(np.float32)
        got = _conv_with_grads(x, w, b, pad, r, f"winograd{m}")
        xt, wt, bt = (torch.tensor(np.ascontiguousarray(a), requires_grad=True) for a in (x, w, b))
        yt = F_.conv2d(xt, wt, bt, padding=pad)
        (yt * torch.from_numpy(r)).sum().backward()
        for name, g, want in zip(("y", "gx", "gw", "gb"), got, (yt, xt.grad, wt.grad, bt.grad), strict=True):
            _close(g, want.detach().numpy().astype(np.float64), m, f"{name} vs torch {(B, C, F, H, W, pad)}")


@st.composite
def gradcheck_cases(draw):
    B, C, F, H, W, pad = draw(shapes(max_c=3))
    return dict(B=B, C=C, F=F, H=H, W=W, pad=pad, m=draw(st.sampled_from(WG.TILES)), bias=draw(st.booleans()),
                diff=draw(st.sampled_from([(0, 1, 2), (0,), (1,)])), seed=draw(SEEDS))


@SETTINGS(30)
@given(case=gradcheck_cases())
@example(case=dict(B=2, C=3, F=2, H=7, W=6, pad=1, m=4, bias=True, diff=(0, 1, 2), seed=3))
@example(case=dict(B=1, C=2, F=3, H=5, W=9, pad=0, m=2, bias=False, diff=(0, 1), seed=4))
def test_gradcheck_float64(case):
    """Winograd's backward against float64 central differences (gradcheck.directional_check)."""
    CV.use_algorithm(f"winograd{case['m']}")
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["B"], case["C"], case["H"], case["W"]))
    w = rng.standard_normal((case["F"], case["C"], 3, 3))
    b = rng.standard_normal(case["F"]) if case["bias"] else None
    diff = tuple(i for i in case["diff"] if i < 2 or b is not None) or (0,)
    pad = case["pad"]
    assert CV.winograd_tile(x.shape, w.shape, 1, pad) == case["m"]
    directional_check(lambda x, w, b: ops.conv2d(x, w, b, padding=pad), [x, w, b], diff, seed=case["seed"])


@pytest.mark.parametrize("m", WG.TILES)
def test_forced_reference_gives_the_same_bytes(m):
    """The whole conv (forward, gx, gw) is bit-identical with the reference transforms forced:
    the transforms are, and the GEMMs between them are the same calls."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 6, 9, 10)).astype(np.float32)
    w = rng.standard_normal((7, 6, 3, 3)).astype(np.float32)
    r = rng.standard_normal((5, 7, 9, 10)).astype(np.float32)
    compiled = _conv_with_grads(x, w, None, 1, r, f"winograd{m}")
    use_reference(True)
    reference = _conv_with_grads(x, w, None, 1, r, f"winograd{m}")
    for a, b in zip(compiled[:3], reference[:3], strict=True):
        assert same(a, b)


@pytest.mark.parametrize("m", WG.TILES)
def test_empty_batch(m):
    """No sample: empty output and input gradient, zero weight and bias gradients."""
    x, w, b = np.zeros((0, 3, 5, 6), np.float32), np.ones((4, 3, 3, 3), np.float32), np.ones(4, np.float32)
    y, gx, gw, gb = _conv_with_grads(x, w, b, 1, np.zeros((0, 4, 5, 6), np.float32), f"winograd{m}")
    assert y.shape == (0, 4, 5, 6) and gx.shape == x.shape
    assert np.array_equal(gw, np.zeros_like(w)) and np.array_equal(gb, np.zeros_like(b))


def test_stored_input_is_read_chunk_by_chunk():
    """A conv whose input is stored as a unit's paper codes: Winograd's weight gradient is
    the float64 oracle's at the input the unit decodes (the one backward reads)."""
    problem = unit_problem()
    r1 = problem[5]
    CV.use_algorithm("winograd")
    out, info = engine_unit(problem, Paper(4))
    h = info["h_restored"].astype(np.float64)
    assert not np.array_equal(h, out["h"])                    # approximate: not the forward's h
    hp = np.pad(h, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(hp, (3, 3), axis=(2, 3))
    want = np.einsum("nfij,ncijpq->fcpq", r1.astype(np.float64), win)
    _close(out["gw1"], want, WG.TILES[-1], "gw1 at the decoded input")
    CV.use_algorithm("im2row")
    ref, _ = engine_unit(problem, Exact())
    _close(out["o1"], ref["o1"].astype(np.float64), WG.TILES[-1], "o1 vs im2row")


def test_backward_reads_the_input_a_chunk_at_a_time(monkeypatch):
    """The saved input is read through ``ctx.sample_reader`` in chunks smaller than the
    batch that together cover every sample once (no decoded input of the whole batch)."""
    reads = []
    reader = Context.sample_reader

    def spy(ctx, name):
        read = reader(ctx, name)

        def chunk(sl):
            reads.append((sl.start, sl.stop))
            return read(sl)
        return chunk

    monkeypatch.setattr(Context, "sample_reader", spy)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 32, 16, 16)).astype(np.float32)
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    _conv_with_grads(x, w, None, 1, np.ones((64, 32, 16, 16), np.float32), "winograd")
    assert len(reads) > 1 and all(b - a < 64 for a, b in reads)
    assert sorted(i for a, b in reads for i in range(a, b)) == list(range(64))


# --------------------------------------------------------------------------- #
# The switch and determinism
# --------------------------------------------------------------------------- #
def test_auto_rule_and_which_shapes_have_a_winograd_path():
    CV.use_algorithm("auto")
    assert CV.winograd_tile((8, 64, 8, 8), (64, 64, 3, 3), 1, 1) == CV.WINOGRAD_TILE
    assert CV.winograd_tile((8, 16, 32, 32), (16, 16, 3, 3), 1, 1) == CV.WINOGRAD_TILE
    assert CV.winograd_tile((8, 3, 32, 32), (16, 3, 3, 3), 1, 1) == 0             # few channels: im2row
    assert CV.winograd_tile((8, 8, 32, 32), (8, 8, 3, 3), 1, 1) == 0
    assert CV.winograd_tile((8, 256, 2, 2), (256, 256, 3, 3), 1, 1) == 0          # less than one 4x4 tile
    assert CV.winograd_tile((8, 256, 4, 4), (256, 256, 3, 3), 1, 0) == 0
    assert CV.winograd_tile((8, 16, 8, 8), (16, 16, 3, 3), 1, 1) == 0              # too little work per sample
    assert CV.winograd_tile((8, 32, 8, 8), (32, 32, 3, 3), 1, 1) == CV.WINOGRAD_TILE
    CV.use_algorithm("winograd")
    assert CV.winograd_tile((8, 3, 32, 32), (16, 3, 3, 3), 1, 0) == CV.WINOGRAD_TILE
    for x_shape, w_shape, stride in [((2, 64, 8, 8), (64, 64, 3, 3), 2), ((2, 64, 8, 8), (64, 64, 1, 1), 1),
                                     ((2, 64, 8, 8), (64, 64, 3, 1), 1)]:
        assert CV.winograd_tile(x_shape, w_shape, stride, 1) == 0                  # no Winograd path
    assert CV.winograd_tile((2, 64, 8, 8), (64, 64, 3, 3), 1, 1, xp=object()) == 0  # not NumPy
    CV.use_algorithm("winograd2")
    assert CV.winograd_tile((2, 64, 8, 8), (64, 64, 3, 3), 1, 1) == 2
    CV.use_algorithm("im2row")
    assert CV.winograd_tile((2, 64, 8, 8), (64, 64, 3, 3), 1, 1) == 0
    with pytest.raises(ValueError, match="conv algorithm must be one of"):
        CV.use_algorithm("fft")


def test_environment_variable_picks_the_algorithm():
    code = ("from npapprox.ops import conv; "
            "print(conv.conv_algorithm(), conv.winograd_tile((2, 64, 8, 8), (64, 64, 3, 3), 1, 1))")
    for value, want in [("winograd2", "winograd2 2"), ("IM2ROW", "im2row 0"), ("", "auto 4")]:
        env = dict(os.environ, NPAPPROX_CONV=value)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert res.stdout.strip() == want
    env = dict(os.environ, NPAPPROX_CONV="fast")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "NPAPPROX_CONV must be one of auto, im2row, winograd" in res.stderr


def test_bad_environment_value_is_a_one_line_cli_error(monkeypatch, capsys):
    """The command line checks $NPAPPROX_CONV before any work: one line, exit 2."""
    monkeypatch.setenv("NPAPPROX_CONV", "fast")
    rc = cli.main(["memory", "--model", "resnet20"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "NPAPPROX_CONV must be one of" in err, err


def test_deterministic_across_runs_and_chunkings():
    """Same bytes run to run, with 1 and 2 workers (chunks dealt differently)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((40, 32, 8, 8)).astype(np.float32)
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    r = rng.standard_normal((40, 32, 8, 8)).astype(np.float32)
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            runs = [_conv_with_grads(x, w, None, 1, r, "winograd") for _ in range(2)]
        for a, b in zip(runs[0][:3], runs[1][:3], strict=True):
            assert same(a, b)
