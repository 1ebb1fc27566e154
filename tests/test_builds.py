"""The BN kernels give the same bits on every build (src/_lanes.h, src/_codes.pxi).

The batch-norm extension is compiled again here, by setup.py's own build command, for the
baseline x86-64 ISA (``NPAPPROX_PORTABLE=1``: no vector paths of ``_lanes.h``; FMA only
through ``target_clones`` or libm; ceil by truncation) and for AVX2 (``NPAPPROX_MARCH=
haswell``: the AVX paths), and each build's outputs are compared byte for byte with the
installed build's (AVX-512 on the development machines): the row moments (float32 and
float64), the fused forward of a unit with its codes, and the backward from x and from the
codes, on rows long enough for the vector loops and with tails.
"""
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from bn_outputs import outputs

from npapprox import _bn, quant
from npapprox.kernels import bn as B
from npapprox.kernels import paper_pack

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                 reason="the builds compared are x86-64 ISA levels")

BUILD = textwrap.dedent("""
    # setup.py's build_ext (its flags, its BuildExt) for npapprox._bn only, into argv[1]
    import logging, runpy, sys, setuptools
    from setuptools.dist import Distribution
    logging.basicConfig(level=logging.INFO)   # the compiler's command lines on stderr
    got = {}
    setuptools.setup = lambda **kw: got.update(kw)
    runpy.run_path("setup.py", run_name="__main__")
    ext = [e for e in got["ext_modules"] if e.name == "npapprox._bn"]
    dist = Distribution({"ext_modules": ext, "cmdclass": got["cmdclass"]})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = sys.argv[1], sys.argv[1] + "/tmp"
    cmd.ensure_finalized()
    cmd.run()
""")

RUN = textwrap.dedent("""
    # the kernels of the .so in argv[1] on the inputs in argv[2] -> argv[3] (argv[4]: tests/)
    import sys, importlib.util, numpy as np
    spec = importlib.util.spec_from_file_location("_bn", sys.argv[1])
    bn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bn)
    sys.path.insert(0, sys.argv[4])
    from bn_outputs import outputs
    np.savez(sys.argv[3], **outputs(bn, dict(np.load(sys.argv[2]))))
""")


def _inputs(path):
    """Values spread over 40 binades around an offset for the moments; BN-sized values for
    the unit, with a NaN and an inf in the pack's input for its count; rows of 1100 values
    (whole groups of 32 and of 16, and tails)."""
    rng = np.random.default_rng(7)
    n, c, m = 3, 4, 1100
    x = (rng.standard_normal((n, c, m)) * 2.0 ** rng.integers(-20, 20, (n, c, m)) + 3).astype(np.float32)
    xb = rng.standard_normal((n, c, m)).astype(np.float32)
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    beta = rng.uniform(-1, 1, c).astype(np.float32)
    mu, _, inv = B.bn_batch_stats(xb, 1e-5)
    scale = gamma * inv
    p = quant.paper_params(gamma, beta, 4)
    codes, _ = paper_pack(B.bn_apply(xb, mu, scale, beta)[0], p["k"], p["s"], 4)
    xu = xb.copy()
    xu[0, 1, 5], xu[2, 3, 1099] = np.nan, np.inf
    np.savez(path, x32=x, x64=x.astype(np.float64) * 1.5, xb=xb, xu=xu,
             gy=rng.standard_normal((n, c, m)).astype(np.float32), mu=mu, inv=inv, scale=scale, beta=beta,
             k=p["k"], s=p["s"].astype(np.int32), x_step=p["x_step"], x_off=p["x_off"], codes=codes)


def _run(script, *args, env=None) -> str:
    """Runs ``script`` with ``args`` in the repository -> its output (stdout and stderr)."""
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


@pytest.mark.parametrize("variant, march", [({"NPAPPROX_PORTABLE": "1"}, None),
                                            ({"NPAPPROX_MARCH": "haswell"}, "-march=haswell")],
                         ids=["baseline-isa", "avx2"])
def test_other_builds_give_the_same_bits(tmp_path, variant, march):
    inputs = tmp_path / "inputs.npz"
    _inputs(inputs)
    env = {k: v for k, v in os.environ.items() if k not in ("NPAPPROX_PORTABLE", "NPAPPROX_MARCH")} | variant
    log = _run(BUILD, tmp_path / "lib", env=env)
    compiles = [line for line in log.splitlines() if "_bn.c" in line and " -c " in line]
    assert len(compiles) == 1 and all(f in compiles[0] for f in ("-O3", "-ffp-contract=off")), log[-3000:]
    assert ("-march=" in compiles[0]) == (march is not None) and (march is None or march in compiles[0])
    so = next((tmp_path / "lib" / "npapprox").glob("_bn*"))
    _run(RUN, so, inputs, tmp_path / "out.npz", Path(__file__).parent)
    want = outputs(_bn, dict(np.load(inputs)))
    got = dict(np.load(tmp_path / "out.npz"))
    assert want["nf"] == 2
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes(), name
