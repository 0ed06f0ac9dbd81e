"""One sampler step of a DiT-S/2 (diffusers DiTTransformer2DModel, random weights).

Student step: 1 NFE + the fused update. Teacher step: 2 NFE with CFG (one 2B
batch) + the update. DiT-S/2 size: hidden 384 = 6 heads x 64, 12 layers,
patch 2, on a 32x32x4 latent (256 tokens); batch 1 and 8; fp32 and bf16.

Providers:
  eager            diffusers' own attention (SDPA) + the eager reference update
  compile          torch.compile (default mode) of that same step
  flashcore-eager  flashcore's attention and update kernels, no compile; in fp32
                   the linear layers on oneDNN (flashcore.ops.linear, GELU fused)
  flashcore        the Engine: compiled step (fullgraph, static shapes), flashcore
                   kernels, oneDNN linear layers in fp32 (MKL is the slow fp32
                   GEMM here), inductor freezing for bf16 (where it helps)
  onnxruntime      the eager step exported with torch.onnx.export, CPU execution
                   provider (fp32 only: ORT's CPU kernels have no bf16 GEMM path)
Compile (and export) time is its own row (unit s). Every provider's output is
checked against eager fp32 (``rel_err`` in the markdown).

    python bench/bench_step.py [--quick] [--providers eager,flashcore,onnxruntime]
"""
from __future__ import annotations

import contextlib
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from flashcore import benchmarking as B
from flashcore.engine import Engine, coefficient_table
from flashcore.models import Denoiser, ModelConfig
from flashcore.ops import sampler_step_ref
from flashcore.plan import StepPlan
from flashcore.schedule import NoiseSchedule

NAME = "step"
TITLE = "One sampler step, DiT-S/2 on a 32x32x4 latent (CPU)"
DIT_S2 = ModelConfig(arch="dit", sample_size=32, channels=4, num_classes=1000, patch_size=2, num_layers=12,
                     num_heads=6, head_dim=64)
QUICK = ModelConfig(arch="dit", sample_size=16, channels=4, num_classes=10, patch_size=2, num_layers=2,
                    num_heads=2, head_dim=32)
ROLES = {"student_step": (1.0, 3), "teacher_step": (4.0, 50)}      # guidance, grid steps
NOTES = ("random weights (latency does not depend on them); step 0 of the grid (t = 999, noise correction on)",
         "value: ms per step call; p50 over every timed call; a case's providers are timed side by side "
         "(5 rounds, each a block of calls per provider in rotating order); compile/export rows in seconds",
         "bf16: the network under CPU autocast, the state and update in fp32",
         "--quick runs a 2-layer DiT on a 16x16x4 latent instead (a smoke run, not DiT-S/2)")


def build_models(cfg: ModelConfig):
    """(flashcore model, diffusers-default-attention copy), same weights, eval mode."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    torch.manual_seed(0)
    fc = Denoiser(cfg).eval()
    base = copy.deepcopy(fc)
    for m in base.net.modules():      # DiTTransformer2DModel has no set_attn_processor
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0())
    return fc, base


def ref_step(model, guidance: float, coef: list[float], autocast: torch.dtype | None):
    """The baseline step: the model's eps then the eager reference update (floats baked in)."""
    a_t, s_t, a_s, s_s, nc = coef

    def step(x, x_T, t, labels):
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            if guidance != 1.0:
                eps_c, eps_u = model.eps_cfg(x, t, labels)
            else:
                eps_c, eps_u = model(x, t, labels), None
        eps_u = None if eps_u is None else eps_u.float()
        return sampler_step_ref(x, eps_c.float(), eps_u, x_T, a_t, s_t, a_s, s_s, guidance, bool(nc), 0.0)

    return step


class OnnxStep(nn.Module):
    """The step for export: the update written with tensor coefficients (no custom ops)."""

    def __init__(self, model, guidance: float):
        super().__init__()
        self.model, self.guidance = model, guidance

    def forward(self, x, x_T, t, labels, coef):
        if self.guidance != 1.0:
            eps_c, eps_u = self.model.eps_cfg(x, t, labels)
            eps = eps_u + self.guidance * (eps_c - eps_u)
        else:
            eps = self.model(x, t, labels)
        a_t, s_t, a_s, s_s, nc = coef[0], coef[1], coef[2], coef[3], coef[4]
        x0 = (x - s_t * eps) / a_t
        d = nc * x_T + (1 - nc) * eps
        return a_s * x0 + s_s * d, x0


def onnx_session(model, guidance: float, inputs: tuple, path: str):
    """Export ``OnnxStep`` to ``path`` and open it on ORT's CPU execution provider."""
    import onnxruntime as ort
    mod = OnnxStep(model, guidance).eval()
    names = ["x", "x_T", "t", "labels", "coef"]
    with torch.no_grad():
        torch.onnx.export(mod, inputs, path, input_names=names, output_names=["x_next", "x0"], opset_version=17,
                          dynamo=False)
    model.eval()        # the legacy exporter leaves the model in training mode (docs/cpu_performance.md)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {n: v.numpy() for n, v in zip(names, inputs)}
    return lambda: sess.run(None, feeds)


def _rel_err(out, ref) -> float:
    o = torch.as_tensor(out[0]).double()
    r = ref[0].double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def case_inputs(cfg: ModelConfig, role: str, b: int):
    """(x, x_T, t, labels) and the step-0 coefficients [a_t, s_t, a_s, s_s, nc] of ``role``."""
    guidance, steps = ROLES[role]
    sched = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(b, cfg.channels, cfg.sample_size, cfg.sample_size, generator=g)
    labels = torch.randint(0, cfg.num_classes, (b,), generator=g)
    t = torch.full((b,), sched.T, dtype=torch.long)
    coef = coefficient_table(StepPlan.build(sched, steps, noise_correction=True))[0].tolist()
    return (x_T.clone(), x_T, t, labels), coef


def case_providers(fc, base, role: str, b: int, dtype: torch.dtype, tmp: str, providers) -> dict:
    """name -> (setup seconds, "first" (time the first call) or None; zero-arg callable)."""
    guidance, steps = ROLES[role]
    (x, x_T, t, labels), coef = case_inputs(fc.cfg, role, b)
    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None
    want = lambda p: B.keep_provider(p, providers)                       # noqa: E731
    eng_kw = dict(steps=steps, guidance=guidance, dtype=dtype, noise_correction=True)
    out = {}
    if want("eager"):
        step = ref_step(base, guidance, coef, autocast)
        out["eager"] = (None, lambda: step(x, x_T, t, labels))
    if want("compile"):
        cstep = B.compile_fresh(ref_step(base, guidance, coef, autocast))
        out["compile"] = ("first", lambda: cstep(x, x_T, t, labels))
    if want("flashcore-eager"):
        # the eager Engine keeps nn.Linear unless asked (it stays bit-equal to sampler.sample)
        e0 = Engine(fc, NoiseSchedule(), compile=False, linear=dtype == torch.float32, **eng_kw)
        out["flashcore-eager"] = (None, lambda: e0.step(0, x, x_T, labels))
    if want("flashcore"):
        e1 = Engine(fc, NoiseSchedule(), compile=True, linear=dtype == torch.float32, **eng_kw)
        e1.step(0, x, x_T, labels)
        out["flashcore"] = (e1.compile_seconds, lambda: e1.step(0, x, x_T, labels))
    if want("onnxruntime") and dtype == torch.float32:
        t0 = time.perf_counter()
        run = onnx_session(base, guidance, (x, x_T, t, labels, torch.tensor(coef, dtype=torch.float32)),
                           str(Path(tmp) / f"{role}_{b}.onnx"))
        out["onnxruntime"] = (time.perf_counter() - t0, run)
    return out


def run(quick: bool = False, providers=None, log=None) -> list[dict]:
    cfg = QUICK if quick else DIT_S2
    fc, base = build_models(cfg)
    batches = (1,) if quick else (1, 8)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    timing = (dict(rounds=2, per_round=2, warmup=1, pause=0.0) if quick else
              dict(rounds=5, per_round=6, seconds_per_provider=12.0, warmup=3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for role, (guidance, _) in ROLES.items():
            for b in batches:
                shape = (b, cfg.channels, cfg.sample_size, cfg.sample_size)
                inputs, coef = case_inputs(cfg, role, b)
                ref = ref_step(base, guidance, coef, None)(*inputs)      # eager fp32: every provider's yardstick
                for dtype in dtypes:
                    fns, errs, setups = {}, {}, {}
                    for prov, (setup, fn) in case_providers(fc, base, role, b, dtype, tmp, providers).items():
                        if setup == "first":
                            setup = B.timed_first_call(fn)
                        if setup is not None:
                            label = "export" if prov == "onnxruntime" else "compile"
                            rows.append(B.make_row(f"{role}.{label}", prov, shape, dtype,
                                                   B.timing_of_seconds(setup), "s", setup))
                        fns[prov], errs[prov], setups[prov] = fn, _rel_err(fn(), ref), setup
                    # every provider of the case side by side, so their ratios share the machine's state
                    for prov, tm in B.measure_interleaved(fns, **timing).items():
                        rows.append(B.make_row(role, prov, shape, dtype, tm, "ms", tm.p50_ms, rel_err=errs[prov]))
                        if log:
                            log(f"{role:13s} {prov:16s} b={b} {B.dtype_name(dtype)} p50 {tm.p50_ms:9.2f} ms "
                                f"(p20 {tm.p20_ms:.2f}, p80 {tm.p80_ms:.2f}, n={tm.samples}) rel.err "
                                f"{errs[prov]:.1e}" + (f", setup {setups[prov]:.1f} s" if setups[prov] is not None
                                                       else ""))
                    gc.collect()
                    torch._dynamo.reset()       # drop this case's graphs before compiling the next
    return rows


if __name__ == "__main__":
    sys.exit(B.script_main(__name__))
