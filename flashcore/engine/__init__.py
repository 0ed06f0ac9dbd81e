"""Inference engine: compiled teacher/student steps and the few-step sampler.

``Engine`` (engine.py) owns buckets, compilation and timing; ``config.py`` its
options and the one step that resolves their "auto" values; ``step.py`` holds
the traceable step (network + fused update with tensor schedule values);
``linear.py`` routes a model's linear layers through ``flashcore.ops.linear``.
"""
from .config import EngineConfig, ResolvedEngine
from .engine import BUCKETS, Engine, bucket_for, enable_compile_cache, fresh_function
from .linear import (FlashcoreGELU, FlashcoreLinear, flashcore_linear_copy, pack_linear_weights,
                     use_flashcore_linear)
from .step import coefficient_table, engine_update, make_sampler, make_step

__all__ = ["BUCKETS", "Engine", "EngineConfig", "ResolvedEngine", "bucket_for", "enable_compile_cache", "fresh_function", "coefficient_table",
           "engine_update", "make_sampler", "make_step", "FlashcoreGELU", "FlashcoreLinear",
           "flashcore_linear_copy", "pack_linear_weights", "use_flashcore_linear"]
