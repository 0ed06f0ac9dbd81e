"""flashcore: few-step diffusion distillation and the kernels that run it fast."""
from . import ops, schedule  # noqa: F401

__version__ = "0.1.0"
