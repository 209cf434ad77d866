"""Package layout: `kernels/` ships as the subpackage `bertfast.kernels` (never a top-level
`kernels` module: that name belongs to another PyPI package).

The C++ CPU extension is JIT-built with ninja on first use and cached (see
bertfast/_cpp.py); set BERTFAST_BUILD_EXT=1 at install time to prebuild it instead.
"""
import os

from setuptools import setup

packages = ["bertfast", "bertfast.ops", "bertfast.models", "bertfast.kernels", "bertfast.csrc"]
# kernels/ -> bertfast.kernels; csrc/ -> bertfast.csrc (data only: the C++ sources the JIT
# build compiles after a non-editable install).
package_dir = {"bertfast.kernels": "kernels", "bertfast.csrc": "csrc"}
ext_modules, cmdclass = [], {}

if os.environ.get("BERTFAST_BUILD_EXT") == "1":
    import glob

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [
        CppExtension(
            "bertfast._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-march=native"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"bertfast.csrc": ["cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
