"""Export a whole few-step sampler as one Python-free artifact (docs/deploy.md).

The artifact maps ``(x_T (B, C, H, W) float32, labels (B,) int64) -> x0 (B, C, H, W)
float32``: every network call and every noise-corrected update of the step plan
(Imagine Flash, Kohler et al., arXiv 2405.05224), unrolled, with the schedule values
as constants. The noise is an input, so a runner that draws it from the same
generator (``torch.randn`` on the CPU generator, mt19937) reproduces Python's images.

Formats:

- ``pt2``: torch.export, the flashcore ops rewritten to the ``flashcore_C::`` ops of
  the C++ library (``flashcore.ops._native.EXPORT``: their schemas and CPU kernels
  live in libflashcore_C.so / flashcore._C), compiled and packaged by AOTInductor.
  A C++ process that loads libflashcore_C.so runs it (csrc/runner/).
- ``onnx``: torch.export, the flashcore ops rewritten to their PyTorch references,
  then the legacy TorchScript exporter on the resulting plain-ATen module: standard
  ONNX ops only (run here on onnxruntime).

Why a rewrite at export and not C++-defined public ops: the public ``flashcore::``
ops carry a ``backend`` argument and dispatch in Python across four backends; the
C++ library owns the native contracts (``flashcore_C::``). The exported graph only
ever needs one of those, so the rewrite is one table entry per op, declared beside
the op (``_native.export_rule``).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import ops  # noqa: F401  (declares the ops and their export rules)
from .ops import _native
from .plan import StepPlan, apply
from .schedule import NoiseSchedule, ScheduleConfig

__all__ = ["ExportConfig", "SamplerModule", "export_program", "export_sampler", "metadata"]

FORMATS = ("pt2", "onnx")

# AOTInductor's options for a pt2 export (docs/deploy.md, "Speed"). freezing: the
# weights become constants, so convolutions and linear layers run on oneDNN with
# weights reordered once at export (mkldnn._convolution_pointwise, activations fused)
# instead of aten.convolution, which at batch 1 picks the im2col path for the UNet's
# small feature maps and, under layout optimisation, reorders every weight to
# channels-last on every call. The reordered weights are oneDNN's blocked layout for
# the exporting CPU's ISA (AVX-512 here, Zen 4 and Zen 5 alike): export on the kind of
# machine that runs the artifact.
AOTI_CONFIGS = {"freezing": True}


@dataclass
class ExportConfig:
    model: str                 # checkpoint directory (teacher or student)
    out: str                   # the artifact to write
    steps: int | None = None   # None: a student's distilled step count
    format: str = "pt2"
    batch: int = 1
    bf16: bool = False         # network weights and activations in bfloat16; the update stays float32
    noise_correction: bool | None = None   # None: the checkpoint's
    guidance: float | None = None          # None: the checkpoint's (1.0: a student)
    clip: float | None = None              # None: the checkpoint's saved x0 clip (0: none)


class SamplerModule(nn.Module):
    """``forward(x_T, labels) -> x0``: ``flashcore.sampler.sample``'s loop over a fixed plan."""

    def __init__(self, model: nn.Module, plan: StepPlan, *, guidance: float = 1.0, clip: float = 0.0,
                 net_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.plan, self.guidance, self.clip, self.net_dtype = model, plan, guidance, clip, net_dtype

    def _eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps at x: only the network runs in ``net_dtype``; a v-prediction's conversion to eps
        stays in x's float32 (in bfloat16 its rounding, divided by a small a_t in the update,
        grows to percents of x0)."""
        out = self.model.raw(x.to(self.net_dtype), t, labels).to(x.dtype)
        return self.model.eps_from(x, t, out)

    def forward(self, x_T: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, x0 = x_T, x_T
        b = x_T.shape[0]
        for step in self.plan:
            t = torch.full_like(labels, step.t)
            if self.guidance != 1.0:            # conditional and null in one batch of 2B, as eps_cfg
                null = torch.full_like(labels, self.model.null_label)
                eps = self._eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
                eps_c, eps_u = eps[:b], eps[b:]
            else:
                eps_c, eps_u = self._eps(x, t, labels), None
            x, x0 = apply(step, x, eps_c, eps_u, x_T, guidance=self.guidance, clip=self.clip)
        return x0


def _rewrite_table(lowering: str) -> dict:
    """run_decompositions table: each public flashcore op -> its native op or its reference."""
    table = {}
    for public, (native_name, native, reference) in _native.EXPORT.items():
        if lowering == "native" and not _native.has_kernel(native_name):
            raise RuntimeError(f"export: flashcore_C::{native_name} is not built; install flashcore with its "
                               f"C++ extension (pip install --no-build-isolation -e .)")
        table[getattr(torch.ops.flashcore, public).default] = native if lowering == "native" else reference
    return table


def load_sampler(cfg: ExportConfig):
    """(SamplerModule, metadata dict) for ``cfg``'s checkpoint."""
    from .models import load_pretrained
    model, meta = load_pretrained(cfg.model)
    steps = cfg.steps if cfg.steps is not None else meta.get("steps")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"export: {cfg.model!r} has no distilled step count; pass --steps")
    schedule = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
    nc = cfg.noise_correction if cfg.noise_correction is not None else bool(meta.get("noise_correction", True))
    guidance = cfg.guidance if cfg.guidance is not None else float(meta.get("guidance") or 1.0)
    clip = cfg.clip if cfg.clip is not None else float(meta.get("clip") or 0.0)
    plan = StepPlan.build(schedule, steps, noise_correction=nc)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = model.requires_grad_(False)               # weights traced as constants (ONNX)
    model.net.to(dtype)                               # the network's weights only: the schedule stays float32
    mod = SamplerModule(model, plan, guidance=guidance, clip=clip, net_dtype=dtype).eval()
    c, s = model.cfg.channels, model.cfg.sample_size
    info = {"batch": cfg.batch, "channels": c, "height": s, "width": s, "num_classes": model.cfg.num_classes,
            "steps": steps, "grid": list(plan.grid), "guidance": guidance, "noise_correction": nc, "clip": clip,
            "dtype": "bfloat16" if cfg.bf16 else "float32"}
    return mod, info


def example_inputs(info: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((info["batch"], info["channels"], info["height"], info["width"]), generator=g)
    labels = torch.arange(info["batch"], dtype=torch.long) % info["num_classes"]
    return x_T, labels


def export_program(mod: SamplerModule, info: dict, lowering: str) -> torch.export.ExportedProgram:
    """torch.export of ``mod`` at ``info``'s batch with the flashcore ops rewritten
    (``lowering``: "native" for pt2, "reference" for ONNX)."""
    with torch.no_grad():
        ep = torch.export.export(mod, example_inputs(info), strict=False)
        # only the flashcore ops are rewritten: the rest stays the ATen that torch.export traced
        return ep.run_decompositions(_rewrite_table(lowering))


def metadata(info: dict) -> dict[str, str]:
    """What the C++ runner reads from a pt2 package (string values, AOTInductor's metadata)."""
    return {f"flashcore.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in info.items()}


def export_sampler(cfg: ExportConfig) -> dict:
    """Write the artifact; returns ``info`` plus ``seconds`` (the export's wall time) and ``path``."""
    if cfg.format not in FORMATS:
        raise ValueError(f"export: format must be one of {FORMATS}, got {cfg.format!r}")
    if cfg.format == "pt2" and not cfg.out.endswith(".pt2"):
        raise ValueError(f"export: a pt2 package's name must end in .pt2, got {cfg.out!r}")
    if cfg.batch < 1:
        raise ValueError(f"export: batch must be >= 1, got {cfg.batch}")
    t0 = time.perf_counter()
    mod, info = load_sampler(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    # beside ``out`` (one file system for the rename), ending as AOTInductor wants it
    head, name = os.path.split(os.path.abspath(cfg.out))
    tmp = os.path.join(head, f".{name}.tmp-{os.getpid()}.{cfg.format}")
    try:
        if cfg.format == "pt2":
            ep = export_program(mod, info, "native")
            # no_grad: inductor freezes only when grad mode is off (compile_fx checks it)
            with torch.no_grad():
                torch._inductor.aoti_compile_and_package(
                    ep, package_path=tmp, inductor_configs={**AOTI_CONFIGS, "aot_inductor.metadata": metadata(info)})
        else:
            ep = export_program(mod, info, "reference")
            _write_onnx(ep, info, tmp)
        os.replace(tmp, cfg.out)           # never a half-written artifact at ``out``
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {**info, "path": cfg.out, "format": cfg.format, "seconds": time.perf_counter() - t0}


def _cast(x, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    return x.to(dtype=dtype or x.dtype, copy=True)


def _logsumexp(x, dim, keepdim=False):
    # max-shifted, in ReduceMax/Exp/ReduceSum/Log: OpenVINO 2026.4's CPU plugin computes
    # the ReduceLogSumExp node that torch.logsumexp exports to wrongly here (the
    # attention reference's softmax came out at 0.4 relative error, in f32 too)
    m = torch.amax(x, dim, keepdim=True)
    out = torch.log(torch.sum(torch.exp(x - m), dim, keepdim=True)) + m
    return out if keepdim else torch.squeeze(out, dim)


def _plain_casts(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The ATen ops torch.export records that the legacy exporter has no symbolic for,
    as the public calls it has one for (``_to_copy`` -> ``Tensor.to``: a Cast;
    ``_unsafe_view`` -> ``reshape``), and logsumexp in plain reductions (``_logsumexp``)."""
    plain = {torch.ops.aten._to_copy.default: _cast, torch.ops.aten._unsafe_view.default: torch.reshape,
             torch.ops.aten.logsumexp.default: _logsumexp}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in plain:
            node.target = plain[node.target]
    gm.recompile()
    return gm


class _Unlifted(nn.Module):
    """The exported program's module for the legacy exporter, which calls
    ``train(False)``: an unlifted ExportedProgram module refuses any ``train`` call
    (it is in eval mode for good), so this one does not pass it on. Held as a child,
    its weights export once as initializers, not once per step as constants."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def train(self, mode: bool = True):
        return self

    def forward(self, x_T, labels):
        return self.gm(x_T, labels)


def _write_onnx(ep: torch.export.ExportedProgram, info: dict, path: str) -> None:
    # the legacy (TorchScript) exporter on the plain-ATen module: the dynamo exporter
    # needs onnxscript, which is not a dependency
    with torch.no_grad():
        torch.onnx.export(_Unlifted(_plain_casts(ep.module())), example_inputs(info), path, input_names=["x_T", "labels"], output_names=["x0"],
                          opset_version=17, dynamo=False)
    import onnx
    m = onnx.load(path)
    for k, v in metadata(info).items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, path)
