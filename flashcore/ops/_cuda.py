"""Rows for the CUDA C++ backend (csrc/cuda, built only with a CUDA torch).

Filled in by the GPU-kernel work; until then no CUDA row is registered and
dispatch never picks CUDA C++.
"""
