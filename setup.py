"""Build script: compiles every ``src/*.pyx`` into the extension ``npapprox.<name>``.

Project metadata lives in pyproject.toml; this file only adds the compiled
extensions.  Cython directives and compiler flags are set here, once, for all
kernels.  Never add -ffast-math (or anything that lets the compiler reassociate
or contract floating-point arithmetic): the kernels must stay bit-identical to
the NumPy reference implementations.  OpenMP is used when the compiler supports
it (probed by compiling and linking a tiny program) and silently dropped
otherwise; set NPAPPROX_NO_OPENMP=1 to build without it.
"""
import glob
import os
import shutil
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

COMPILER_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}

# (compile args, OpenMP compile args, OpenMP link args) per compiler family
# -fno-trapping-math: the kernels never read floating-point exception flags; without it
# GCC keeps a select on a comparison (ReLU's y > 0, the masks) as a branch where it
# has no masked vector instructions (AVX2: the BN passes ran 10x slower). It changes
# no value: reassociation and contraction stay off.
UNIX_FLAGS = (["-O3", "-ffp-contract=off", "-fno-trapping-math"], ["-fopenmp"], ["-fopenmp"])
MSVC_FLAGS = (["/O2", "/fp:precise"], ["/openmp"], [])

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
}
"""


_TRUE = {"1", "true", "yes", "on"}


def _compiles(compiler, source, compile_args, link_args):
    """True when ``compiler`` compiles and links ``source`` with these flags."""
    tmp = tempfile.mkdtemp(prefix="npapprox-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=compile_args)
        compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=link_args)
        return True
    except Exception:  # CompileError, LinkError, missing compiler pieces
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """Adds optimisation flags, OpenMP when the compiler supports it, and
    ``-march=native`` (the vector units of the building machine: the storage
    kernels need AVX2 to reach memory bandwidth) unless NPAPPROX_PORTABLE=1 asks
    for a build that runs on any CPU of the architecture; NPAPPROX_MARCH=<cpu>
    (e.g. ``haswell``: AVX2, no AVX-512) builds for that CPU instead of this one.
    The bytes are the same either way: ``-ffp-contract=off`` forbids the fused
    multiply-adds the source does not spell out (the one it does, in the BN
    statistics, is C's ``fma`` on every path, linked from libm where the CPU has
    none). ``npapprox._quant.SIMD`` says which vector unit a build targets."""

    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        base, omp_compile, omp_link = MSVC_FLAGS if msvc else UNIX_FLAGS
        openmp = (os.environ.get("NPAPPROX_NO_OPENMP", "").strip().lower() not in _TRUE
                  and _compiles(self.compiler, OPENMP_PROBE, omp_compile, omp_link))
        if not openmp:
            print("npapprox: OpenMP not available, building the kernels single-threaded")
        portable = os.environ.get("NPAPPROX_PORTABLE", "").strip().lower() in _TRUE
        march = "-march=" + (os.environ.get("NPAPPROX_MARCH", "").strip() or "native")
        if not msvc and not portable and _compiles(self.compiler, "int main(void){return 0;}", [march], []):
            base = base + [march]
        for ext in self.extensions:
            ext.extra_compile_args = base + (omp_compile if openmp else []) + list(ext.extra_compile_args or [])
            ext.extra_link_args = (omp_link if openmp else []) + list(ext.extra_link_args or [])
            if not msvc:
                ext.libraries = list(ext.libraries or []) + ["m"]
        super().build_extensions()


def _extensions():
    here = os.path.dirname(os.path.abspath(__file__))
    exts = []
    for pyx in sorted(glob.glob(os.path.join(here, "src", "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(Extension(
            f"npapprox.{name}",
            sources=[os.path.relpath(pyx, here)],
            depends=[os.path.relpath(h, here) for h in glob.glob(os.path.join(here, "src", "*.h"))],
            include_dirs=[np.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        ))
    return cythonize(exts, compiler_directives=COMPILER_DIRECTIVES)


setup(
    packages=find_packages(include=["npapprox", "npapprox.*"]),
    package_data={"npapprox.kernels": ["*.cu", "*.h"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
