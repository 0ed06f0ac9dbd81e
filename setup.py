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


def cuda_extension():
    """flashcore._C_cuda from csrc/cuda when torch is a CUDA build and nvcc is found.

    FLASHCORE_CUDA=0 skips it, =1 makes its absence an error. Architectures come
    from FLASHCORE_CUDA_ARCHS (torch's TORCH_CUDA_ARCH_LIST syntax), default
    "8.0;9.0a": Ampere, and Hopper with its arch-specific features (wgmma/TMA).
    """
    want = os.environ.get("FLASHCORE_CUDA", "auto")
    if want == "0":
        return None
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    if torch.version.cuda is None or CUDA_HOME is None:
        if want == "1":
            raise RuntimeError("FLASHCORE_CUDA=1 but torch is a CPU build or no CUDA toolkit was found")
        return None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("FLASHCORE_CUDA_ARCHS", "8.0;9.0a"))
    return CUDAExtension(
        "flashcore._C_cuda",
        sorted(glob.glob("csrc/cuda/*.cu")),
        # torch adds the C++ standard its headers need (C++20 for torch 2.13)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-diag-suppress", "3306"]},
        py_limited_api=False,
    )


if (cuda_ext := cuda_extension()) is not None:
    ext_modules.append(cuda_ext)

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
