"""Rows for the Triton backend (kernels in flashcore.triton_kernels).

Filled in by the GPU-kernel work; until then no Triton row is registered and
dispatch never picks Triton.
"""
