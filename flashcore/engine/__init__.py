"""Inference engine: compiled teacher/student steps and the few-step sampler.

``Engine`` (engine.py) owns buckets, compilation and timing; ``step.py`` holds
the traceable step (network + fused update with tensor schedule values).
"""
from .engine import BUCKETS, Engine, bucket_for, enable_compile_cache, fresh_function
from .step import coefficient_table, engine_update, make_sampler, make_step

__all__ = ["BUCKETS", "Engine", "bucket_for", "enable_compile_cache", "fresh_function", "coefficient_table",
           "engine_update", "make_sampler", "make_step"]
