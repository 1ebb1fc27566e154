"""Shared test configuration.

* A Hypothesis profile ``npapprox`` (the default) with ``derandomize=True``, so every
  run (local or CI) draws the same examples; ``HYPOTHESIS_PROFILE=thorough`` draws more.
* ``require_torch()`` / the ``torch`` fixture: the PyTorch oracle. Without torch the
  oracle tests are *skipped* (visibly), except when ``NPAPPROX_REQUIRE_ORACLE=1``:
  then a missing torch makes every oracle test *fail*, so CI cannot pass by skipping.
* ``require_openmp()``: the kernels' OpenMP runtime. A build without OpenMP (which
  setup.py makes when the compiler has none) skips the tests of OpenMP teams, visibly,
  except when ``NPAPPROX_REQUIRE_OPENMP=1`` (CI): then they fail.
* ``require_gpu()``: the GPU tests' rule. No CuPy or no device: skip, saying why; CuPy
  installed but unusable (it does not import, or cannot compile a kernel): fail, an
  installation to repair, never a silent skip.
* ``host_lib``: ``quant.cu`` compiled for the host with cuda_shim.h (tests/support.py),
  built once per session for the parity suite and the CUDA tests.
"""
from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# the helper module tests/gradcheck.py is imported as ``gradcheck`` whatever the import mode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("npapprox", derandomize=True, database=None, deadline=None, max_examples=30,
                          suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("thorough", derandomize=False, deadline=None, max_examples=200,
                          suppress_health_check=_HEALTH, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "npapprox"))

REQUIRE_ORACLE_ENV = "NPAPPROX_REQUIRE_ORACLE"


def oracle_required() -> bool:
    return os.environ.get(REQUIRE_ORACLE_ENV, "").strip() == "1"


def require_torch():
    """The ``torch`` module; skip without it, or fail when NPAPPROX_REQUIRE_ORACLE=1."""
    if oracle_required():
        try:
            import torch
        except ImportError as e:
            pytest.fail(f"torch is required ({REQUIRE_ORACLE_ENV}=1): {e}")
        return torch
    return pytest.importorskip(
        "torch", reason=f"PyTorch oracle not installed (set {REQUIRE_ORACLE_ENV}=1 to fail instead)")


REQUIRE_OPENMP_ENV = "NPAPPROX_REQUIRE_OPENMP"


def require_openmp() -> str:
    """Path of the OpenMP runtime the compiled kernels run on; skip for a build without
    OpenMP, or fail when NPAPPROX_REQUIRE_OPENMP=1."""
    from npapprox import _quant

    lib = _quant.omp_library()
    if not lib:
        if os.environ.get(REQUIRE_OPENMP_ENV, "").strip() == "1":
            pytest.fail(f"the kernels were built without OpenMP ({REQUIRE_OPENMP_ENV}=1)", pytrace=False)
        pytest.skip(f"the kernels were built without OpenMP (set {REQUIRE_OPENMP_ENV}=1 to fail instead)")
    return lib


def require_gpu():
    """CuPy's module when a CUDA device runs its kernels; skip (no CuPy or no device) or
    fail (CuPy installed but unusable) otherwise, with the reason."""
    from npapprox import backend

    status = backend.gpu_status()
    if status.broken:
        pytest.fail(f"CuPy is installed but unusable: {status.reason}", pytrace=False)
    if not status.available:
        pytest.skip(f"no usable CUDA device: {status.reason}")
    return backend.cupy()


@pytest.fixture(scope="session")
def torch():
    t = require_torch()
    t.manual_seed(0)
    return t


@pytest.fixture(scope="session")
def host_lib(tmp_path_factory):
    """The host build of quant.cu, loaded with ctypes (a missing g++ fails, it does not skip)."""
    import support
    return support.build_host_lib(tmp_path_factory.mktemp("cuda_host"))
