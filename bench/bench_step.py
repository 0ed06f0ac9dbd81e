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
  openvino         the same ONNX file (exported once per case) on OpenVINO's CPU
                   plugin, configured as the deploy suite does (deploy_child.py:
                   latency mode, the inference precision hint f32 or bf16); on a CPU
                   without native bf16 OpenVINO computes the bf16 hint in f32, and
                   that row's note says so
Compile (and export) time is its own row (unit s). Every provider's output is
checked against eager fp32 (``rel_err`` in the markdown). onnxruntime and openvino
are optional: a package that does not import leaves its provider out, with a note.

    python bench/bench_step.py [--quick] [--providers eager,flashcore,onnxruntime,openvino]
"""
from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

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
BASE_NOTES = ("random weights (latency does not depend on them); step 0 of the grid (t = 999, noise correction on)",
              "value: ms per step call; p50 over every timed call; a case's providers are timed side by side "
              "(5 rounds, each a block of calls per provider in rotating order); compile/export rows in seconds",
              "bf16: the network under CPU autocast, the state and update in fp32; openvino runs the fp32 ONNX file "
              "under its bf16 inference precision hint, which it honours only where the CPU has native bf16 "
              "(the row's note says when it computed in f32)",
              "export rows of onnxruntime and openvino: the one torch.onnx.export of the case (shared by both and "
              "by both dtypes) plus that provider's own session creation or compile",
              "--quick runs a 2-layer DiT on a 16x16x4 latent instead (a smoke run, not DiT-S/2)")
NOTES: list[str] = list(BASE_NOTES)      # run() adds why an optional provider was left out
OPTIONAL = {"onnxruntime": "onnxruntime", "openvino": "openvino"}     # provider -> the package it needs
ONNX_PROVIDERS = ("onnxruntime", "openvino")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


class OnnxFile:
    """One case's ONNX export, made on first use and then shared by every ONNX provider
    and dtype of the case: they all run the same file, and it is exported once."""

    NAMES = ["x", "x_T", "t", "labels", "coef"]

    def __init__(self, model, guidance: float, inputs: tuple, path: str):
        self.model, self.guidance, self.inputs, self.path = model, guidance, inputs, path
        self.seconds: float | None = None          # of the export, once made
        self.feeds = {n: v.numpy() for n, v in zip(self.NAMES, inputs)}

    def export(self) -> float:
        """Seconds the export took (the first call makes it; later calls reuse the file)."""
        if self.seconds is None:
            t0 = time.perf_counter()
            mod = OnnxStep(self.model, self.guidance).eval()
            with torch.no_grad():
                torch.onnx.export(mod, self.inputs, self.path, input_names=self.NAMES,
                                  output_names=["x_next", "x0"], opset_version=17, dynamo=False)
            self.model.eval()   # the legacy exporter leaves the model in training mode (docs/cpu_performance.md)
            self.seconds = time.perf_counter() - t0
        return self.seconds


def ort_session(onnx: OnnxFile) -> Callable[[], object]:
    """The case's ONNX file on ORT's CPU execution provider, torch's thread count."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx.path, so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, onnx.feeds)


def openvino_session(onnx: OnnxFile, dtype: torch.dtype) -> tuple[Callable[[], object], str]:
    """The case's ONNX file on OpenVINO's CPU plugin with the deploy suite's settings
    (one configuration for both suites), torch's thread count; also the precision
    OpenVINO computes in, which is f32 under the bf16 hint on a CPU without native bf16."""
    from deploy_child import openvino_request
    req, precision = openvino_request(onnx.path, B.dtype_name(dtype), torch.get_num_threads())
    return (lambda: req.infer(onnx.feeds, share_inputs=True)), precision


def importable(provider: str) -> bool:
    """Whether an optional provider's package imports; if not, the provider is left out
    with a note in the table rather than failing the suite (as bench_deploy.py does for
    an unbuilt flashcore-run)."""
    try:
        importlib.import_module(OPTIONAL[provider])
    except ImportError as e:
        why = f"{provider} left out: {OPTIONAL[provider]} does not import here ({e})"
        if why not in NOTES:
            NOTES.append(why)
        return False
    return True


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


class Provider(NamedTuple):
    fn: Callable[[], object]                 # one step call
    setup: float | str | None = None         # seconds, "first" (time the first call) or None (no setup row)
    setup_note: str = ""                     # what the setup row's seconds are made of
    note: str = ""                           # rides on the timed row (markdown)
    extra: dict | None = None                # more keys for the timed row (JSON)


def onnx_file(fc, base, role: str, b: int, tmp: str) -> OnnxFile:
    """The case's ONNX file (not exported until a provider asks for it)."""
    (x, x_T, t, labels), coef = case_inputs(fc.cfg, role, b)
    return OnnxFile(base, ROLES[role][0], (x, x_T, t, labels, torch.tensor(coef, dtype=torch.float32)),
                    str(Path(tmp) / f"{role}_{b}.onnx"))


def case_providers(fc, base, role: str, b: int, dtype: torch.dtype, onnx: OnnxFile, want) -> dict[str, Provider]:
    """name -> Provider for one case; ``want(name)`` picks the providers to build."""
    guidance, steps = ROLES[role]
    (x, x_T, t, labels), coef = case_inputs(fc.cfg, role, b)
    autocast = torch.bfloat16 if dtype == torch.bfloat16 else None
    eng_kw = dict(steps=steps, guidance=guidance, dtype=dtype, noise_correction=True)
    out = {}
    if want("eager"):
        step = ref_step(base, guidance, coef, autocast)
        out["eager"] = Provider(lambda: step(x, x_T, t, labels))
    if want("compile"):
        cstep = B.compile_fresh(ref_step(base, guidance, coef, autocast))
        out["compile"] = Provider(lambda: cstep(x, x_T, t, labels), "first")
    if want("flashcore-eager"):
        # the eager Engine keeps nn.Linear unless asked (it stays bit-equal to sampler.sample)
        e0 = Engine(fc, NoiseSchedule(), compile=False, linear=dtype == torch.float32, **eng_kw)
        out["flashcore-eager"] = Provider(lambda: e0.step(0, x, x_T, labels))
    if want("flashcore"):
        e1 = Engine(fc, NoiseSchedule(), compile=True, linear=dtype == torch.float32, **eng_kw)
        e1.step(0, x, x_T, labels)
        out["flashcore"] = Provider(lambda: e1.step(0, x, x_T, labels), e1.compile_seconds)
    if want("onnxruntime") and dtype == torch.float32:
        export_s = onnx.export()
        t0 = time.perf_counter()
        fn = ort_session(onnx)
        load_s = time.perf_counter() - t0
        out["onnxruntime"] = Provider(fn, export_s + load_s,
                                      f"torch.onnx.export {export_s:.2f} s + session {load_s:.2f} s")
    if want("openvino"):
        export_s = onnx.export()
        t0 = time.perf_counter()
        fn, precision = openvino_session(onnx, dtype)
        load_s = time.perf_counter() - t0
        note = ""
        if precision != ("bf16" if dtype == torch.bfloat16 else "f32"):
            # OpenVINO drops a bf16 hint it cannot honour without a word: the row would
            # otherwise pass an fp32 computation off as bf16
            from flashcore.ops._onednn import bf16_native
            why = "this CPU has no native bf16" if not bf16_native() else "its CPU plugin declined the hint"
            note = (f"computed in {precision}, not {B.dtype_name(dtype)}: {why} "
                    f"({torch.backends.cpu.get_cpu_capability()});")
        out["openvino"] = Provider(fn, export_s + load_s,
                                   f"torch.onnx.export {export_s:.2f} s + compile_model {load_s:.2f} s", note,
                                   {"precision": precision})
    return out


def run(quick: bool = False, providers=None, log=None, dtypes: tuple[str, ...] | None = None) -> list[dict]:
    """The suite's rows; ``dtypes`` names the dtypes to run (default fp32 and bf16; --quick fp32)."""
    NOTES[:] = BASE_NOTES
    cfg = QUICK if quick else DIT_S2
    fc, base = build_models(cfg)
    batches = (1,) if quick else (1, 8)
    unknown = set(dtypes or ()) - set(DTYPES)
    if unknown:
        raise ValueError(f"bench_step: unknown dtypes {sorted(unknown)}; pick from {sorted(DTYPES)}")
    dtypes = tuple(DTYPES[d] for d in dtypes) if dtypes else (
        (torch.float32,) if quick else (torch.float32, torch.bfloat16))
    missing = {p for p in OPTIONAL if B.keep_provider(p, providers) and not importable(p)}
    want = lambda p: B.keep_provider(p, providers) and p not in missing      # noqa: E731
    if log:
        for why in NOTES[len(BASE_NOTES):]:
            log(why)
    timing = (dict(rounds=2, per_round=2, warmup=1, pause=0.0) if quick else
              dict(rounds=5, per_round=6, seconds_per_provider=12.0, warmup=3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for role, (guidance, _) in ROLES.items():
            for b in batches:
                shape = (b, cfg.channels, cfg.sample_size, cfg.sample_size)
                inputs, coef = case_inputs(cfg, role, b)
                ref = ref_step(base, guidance, coef, None)(*inputs)      # eager fp32: every provider's yardstick
                onnx = onnx_file(fc, base, role, b, tmp)                 # one export for every dtype
                for dtype in dtypes:
                    fns, errs, setups, provs = {}, {}, {}, case_providers(fc, base, role, b, dtype, onnx, want)
                    for prov, pv in provs.items():
                        setup = B.timed_first_call(pv.fn) if pv.setup == "first" else pv.setup
                        if setup is not None:
                            label = "export" if prov in ONNX_PROVIDERS else "compile"
                            rows.append(B.make_row(f"{role}.{label}", prov, shape, dtype,
                                                   B.timing_of_seconds(setup), "s", setup,
                                                   **({"note": pv.setup_note} if pv.setup_note else {})))
                        fns[prov], errs[prov], setups[prov] = pv.fn, _rel_err(pv.fn(), ref), setup
                    # every provider of the case side by side, so their ratios share the machine's state
                    for prov, tm in B.measure_interleaved(fns, **timing).items():
                        pv = provs[prov]
                        rows.append(B.make_row(role, prov, shape, dtype, tm, "ms", tm.p50_ms, rel_err=errs[prov],
                                               **({"note": pv.note} if pv.note else {}), **(pv.extra or {})))
                        if log:
                            log(f"{role:13s} {prov:16s} b={b} {B.dtype_name(dtype)} p50 {tm.p50_ms:9.2f} ms "
                                f"(p20 {tm.p20_ms:.2f}, p80 {tm.p80_ms:.2f}, n={tm.samples}) rel.err "
                                f"{errs[prov]:.1e}" + (f", setup {setups[prov]:.1f} s" if setups[prov] is not None
                                                       else "") + (f"; {pv.note}" if pv.note else ""))
                    gc.collect()
                    torch._dynamo.reset()       # drop this case's graphs before compiling the next
    return rows


if __name__ == "__main__":
    sys.exit(B.script_main(__name__))
