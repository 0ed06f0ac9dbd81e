"""Builds flashcore: the CPU extension always, the CUDA one when a CUDA build
of torch and a toolkit are present. Install with ``--no-build-isolation``
against the torch already installed (isolation would pull a CUDA torch)."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

cxx = ["-O3", "-std=c++17", "-fopenmp", "-march=native" if os.environ.get("FLASHCORE_NATIVE", "1") == "1" else "-O3"]
ext_modules = [CppExtension(
    "flashcore._C",
    sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
    extra_compile_args={"cxx": cxx},
    define_macros=[("FLASHCORE_PYTHON_MODULE", None)],
    extra_link_args=["-fopenmp"],
    py_limited_api=False,
)]

setup(
    name="flashcore",
    version="0.1.0",
    packages=find_packages(include=["flashcore", "flashcore.*"]) + ["flashcore.triton_kernels", "flashcore.train"],
    package_dir={"flashcore.triton_kernels": "kernels", "flashcore.train": "train"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["flashcore = flashcore.cli:main"]},
    python_requires=">=3.10",
)
