"""Package layout: `kernels/` ships as the subpackage `bertfast.kernels` (never a top-level
`kernels` module: that name belongs to another PyPI package).

The C++ CPU extension is JIT-built with ninja on first use and cached (see
bertfast/dispatch/cpp.py); set BERTFAST_BUILD_EXT=1 at install time to prebuild it instead.
"""
import os

from setuptools import find_packages, setup

packages = find_packages(include=["bertfast", "bertfast.*"]) + ["bertfast.csrc"]
# kernels/ -> bertfast.kernels; csrc/ -> bertfast.csrc (data only: the C++ sources the JIT
# build compiles after a non-editable install).
package_dir = {"bertfast.csrc": "csrc"}
ext_modules, cmdclass = [], {}

if os.environ.get("BERTFAST_BUILD_EXT") == "1":
    # Prebuild the C++ CPU kernels as bertfast._C (otherwise they are JIT-built with ninja on
    # first use). The flags are the JIT build's (bertfast/dispatch/cpp.py): the instruction set of this
    # machine, or BERTFAST_CPU_CAPABILITY=avx2|avx512|default for a wheel meant for other
    # machines; the source hash baked in lets bertfast refuse a stale or too-new-ISA library.
    import glob
    import sys

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bertfast.dispatch import cpp as _cpp

    cap = _cpp.capability()
    ext_modules = [
        CppExtension(
            "bertfast._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args=_cpp.compile_flags(cap) + ["-Wno-unknown-pragmas",
                                                         f"-DBERTFAST_SOURCE_HASH={_cpp.source_hash('csrc/cpu')}"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"bertfast.csrc": ["cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh"],
                  "bertfast": ["dispatch/routing_tables/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
