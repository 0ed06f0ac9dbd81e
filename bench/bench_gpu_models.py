"""GPU benchmark of whole models: one sampler step, and the image latency it implies.

Models (diffusers networks behind flashcore.models.Denoiser; random weights but for the
UNet, whose shipped weights are used when present; latency does not depend on them):
unet-mnist (checkpoints/mnist-teacher's UNet), dit-s2-256 (DiT-S/2 on a 32x32x4 latent:
256 tokens), dit-xl2-256 and dit-xl2-1024 (DiT-XL/2: 28 layers, 16 heads x 72, patch 2,
on 32x32x4 and 64x64x4 latents). Roles: the student step is 1 NFE plus the fused update
(a 1-step student's image), the teacher step 2 NFE with CFG (one 2B batch) plus the
update, TEACHER_STEPS of them an image.

Providers, on the same weights and inputs: ``eager`` (the step as diffusers runs it:
AttnProcessor2_0, SDPA's own choice); ``eager/sdpa-flash|-efficient|-cudnn`` (one SDPA
backend forced, torch.nn.attention.sdpa_kernel); ``eager/xformers`` (when installed);
``eager/flashcore-triton|-cuda`` (flashcore's processor with that backend); ``compile``,
``compile-max-autotune``, ``compile-reduce-overhead`` (torch.compile modes of the eager
step); ``flashcore-engine`` (flashcore.engine.Engine as shipped: compiled step, CUDA
graphs by mode "auto" on a CUDA model, flashcore attention and update).

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, warm-up
first, never a synchronize per call), p50 with p20/p80. bf16/fp16: the network under CUDA
autocast, the state and update in fp32, as the Engine runs it; fp32 with TF32 off. The
first call of a compiled provider is its own row (unit s). Step rows note the model's
TFLOP/s (torch's FlopCounterMode on the eager step) against the device's dense peak
(bench_gpu.PEAKS), and each provider's error against eager fp32. Cases run in priority
order (bf16 eager first, max-autotune and fp16/fp32 compiles last); ``--budget-s`` stops
starting new ones, and the markdown lists what did not run and why.

    python bench/bench_gpu_models.py                       # the whole matrix (batches 1 and 16)
    python bench/bench_gpu_models.py --short --budget-s 90 # what make gpu-check runs (batch 8)
    python bench/bench_gpu_models.py --dry-run             # no GPU: every case built at tiny size
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from flashcore import benchmarking as B
from flashcore.devices import autocast
from flashcore.models import Denoiser, ModelConfig, load_pretrained
from flashcore.ops import backends_for, sampler_step_ref
from flashcore.plan import StepPlan
from flashcore.schedule import NoiseSchedule

NAME = "gpu_models"
TITLE = "Whole models on a GPU: one sampler step and the image latency it implies"
MD_FILE = f"{NAME}.md"
QUANTILES = [0.5, 0.2, 0.8]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEACHER_STEPS = 50
ROLES = ("student", "teacher")
ATTENTION = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers", "flashcore-triton", "flashcore-cuda")
COMPILE_MODES = {"compile": None, "compile-max-autotune": "max-autotune", "compile-reduce-overhead": "reduce-overhead"}
PROVIDERS = ("eager", *(f"eager/{a}" for a in ATTENTION), *COMPILE_MODES, "flashcore-engine")
HALF_ONLY = {"eager/sdpa-flash", "eager/sdpa-cudnn"}    # FlashAttention-2 and cuDNN take fp16/bf16 only


@dataclass(frozen=True)
class ModelSpec:
    cfg: ModelConfig
    tiny: ModelConfig              # the dry run's stand-in: same arch, a few channels
    guidance: float                # the teacher's CFG scale (the checkpoint's, when loaded)
    what: str                      # for the markdown's notes
    checkpoint: str | None = None  # checkpoints/<name>: its weights when present


_DIT = dict(arch="dit", channels=4, num_classes=1000, patch_size=2)
_TINY_DIT = ModelConfig(arch="dit", sample_size=4, channels=4, num_classes=10, patch_size=2, num_layers=1,
                        num_heads=2, head_dim=4)
MODELS = {
    "unet-mnist": ModelSpec(ModelConfig(), ModelConfig(sample_size=8, block_out_channels=(4, 8),
                                                       attention_head_dim=4), 2.0,
                            "the shipped MNIST UNet (ModelConfig() = checkpoints/mnist-teacher's), 28x28x1",
                            "mnist-teacher"),
    "dit-s2-256": ModelSpec(ModelConfig(**_DIT, sample_size=32, num_layers=12, num_heads=6, head_dim=64), _TINY_DIT,
                            4.0, "DiT-S/2: 12 layers, 6 heads x 64, 32x32x4 latent, 256 tokens"),
    "dit-xl2-256": ModelSpec(ModelConfig(**_DIT, sample_size=32, num_layers=28, num_heads=16, head_dim=72),
                             _TINY_DIT, 4.0, "DiT-XL/2: 28 layers, 16 heads x 72, 32x32x4 latent, 256 tokens"),
    "dit-xl2-1024": ModelSpec(ModelConfig(**_DIT, sample_size=64, num_layers=28, num_heads=16, head_dim=72),
                              dataclasses.replace(_TINY_DIT, sample_size=8), 4.0,
                              "DiT-XL/2 on a 64x64x4 latent, 1024 tokens"),
}


@dataclass(frozen=True)
class Case:
    model: str
    role: str
    dtype: str
    batch: int
    provider: str

    @property
    def tier(self) -> int:
        """Run order: what a short run must not miss first, the long compiles last."""
        eager = self.provider.startswith("eager")
        first_compiled = self.provider in ("flashcore-engine", "compile")
        if self.dtype == "bf16":
            return 0 if eager else 1 if first_compiled else 3
        return 2 if eager else 4 if first_compiled else 5

    @property
    def compiled(self) -> bool:
        return not self.provider.startswith("eager")


def plan(models, roles, dtypes, batches, providers=None) -> list[Case]:
    cases = [Case(m, r, d, b, p) for m in models for r in roles for d in dtypes for b in batches for p in PROVIDERS
             if B.keep_provider(p, providers)]
    order = {k: i for i, k in enumerate([*MODELS, *ROLES, *DTYPES, *PROVIDERS])}
    return sorted(cases, key=lambda c: (c.tier, order[c.model], order[c.role], c.batch, order[c.dtype],
                                        order[c.provider]))


# ------------------------------------------------------------ models and inputs --

class Models:
    """Each model built once on ``device``: (flashcore Denoiser, a copy with diffusers'
    processors, teacher guidance, where the weights come from)."""

    def __init__(self, device: torch.device, tiny: bool, weights: str):
        self.device, self.tiny, self.weights, self._built = device, tiny, weights, {}

    def get(self, name: str):
        if name not in self._built:
            spec = MODELS[name]
            guidance, what = spec.guidance, f"{spec.what}; random weights"
            ckpt = B.ROOT / "checkpoints" / spec.checkpoint if spec.checkpoint else None
            if not self.tiny and self.weights == "shipped" and ckpt is not None and ckpt.is_dir():
                fc, meta = load_pretrained(str(ckpt), kinds=("teacher",))
                fc = fc.to(self.device)
                guidance, what = float(meta.get("guidance") or guidance), f"{spec.what}; weights of {ckpt.name}"
            else:
                torch.manual_seed(0)
                with self.device:         # initialised where it runs: a DiT-XL/2 on the CPU takes seconds
                    fc = Denoiser(spec.tiny if self.tiny else spec.cfg).to(self.device)   # (buffers made from numpy)
            fc.eval()
            base = copy.deepcopy(fc)
            set_processors(base, _sdpa_processor())
            self._built[name] = (fc, base, guidance, what)
        return self._built[name]


def _sdpa_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0
    return AttnProcessor2_0()


def set_processors(model: Denoiser, proc) -> None:
    """Every diffusers Attention of ``model`` runs ``proc`` (DiTTransformer2DModel has no set_attn_processor)."""
    from diffusers.models.attention_processor import Attention
    for m in model.net.modules():
        if isinstance(m, Attention):
            m.set_processor(proc)


def case_inputs(model: Denoiser, role: str, batch: int, device):
    """(x, x_T, t, labels), the step-0 coefficients [a_t, s_t, a_s, s_s, nc] and the
    number of steps an image takes in ``role``."""
    cfg, sched = model.cfg, NoiseSchedule()
    steps = 1 if role == "student" else TEACHER_STEPS
    g = torch.Generator().manual_seed(0)             # drawn on the CPU: the same inputs on every device
    x_T = torch.randn(batch, cfg.channels, cfg.sample_size, cfg.sample_size, generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    t = torch.full((batch,), sched.T, dtype=torch.long, device=device)
    coef = StepPlan.build(sched, steps, noise_correction=True).coefs()[0].tolist()
    return (x_T.clone(), x_T, t, labels), coef, steps


def ref_step(model, guidance: float, coef: list[float], dtype: torch.dtype):
    """The baseline step: the network (autocast unless fp32), then the eager reference update."""
    a_t, s_t, a_s, s_s, nc = coef

    def step(x, x_T, t, labels):
        with autocast(x.device, dtype, enabled=dtype != torch.float32):
            eps_c, eps_u = model.eps_cfg(x, t, labels) if guidance != 1.0 else (model(x, t, labels), None)
        eps_u = None if eps_u is None else eps_u.float()
        return sampler_step_ref(x, eps_c.float(), eps_u, x_T, a_t, s_t, a_s, s_s, guidance, bool(nc), 0.0)

    return step


@dataclass
class Reference:
    out: torch.Tensor              # eager fp32 x_next: every provider's yardstick
    flops: float                   # of one step, counted on the eager step
    problems: list                 # the attention calls' (B, H, N, D)


def reference(base: Denoiser, guidance: float, inputs, coef) -> Reference:
    from diffusers.models.attention_processor import Attention
    from torch.utils.flop_counter import FlopCounterMode
    set_processors(base, _sdpa_processor())     # SDPA: the yardstick, and FLOPs the counter sees
    problems: set = set()

    def hook(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        n = h.shape[2] * h.shape[3] if h.ndim == 4 else h.shape[1]
        problems.add((h.shape[0], mod.heads, n, mod.to_q.out_features // mod.heads))
    hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in base.net.modules()
             if isinstance(m, Attention)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = ref_step(base, guidance, coef, torch.float32)(*inputs)[0]
    finally:
        for h in hooks:
            h.remove()
    return Reference(out, float(counter.get_total_flops()), sorted(problems))


def flashcore_attention_reason(backend: str | None, problems, dtype: torch.dtype, device) -> tuple[str | None, str]:
    """(why the flashcore row would not run the model's attention, the backend auto would pick).

    Probed in the processor's own layout: q, k, v are (B, N, H*D) projections viewed as
    (B, H, N, D), i.e. strided; under autocast they are in the autocast dtype."""
    picked = set()
    for (b, h, n, d) in problems:
        q = torch.empty(b, n, h * d, dtype=dtype, device=device).view(b, n, h, d).transpose(1, 2)
        ok = backends_for("attention", q, q, q, d ** -0.5)
        picked.add(ok[0])
        if backend is not None and backend not in ok:
            return (f"the {backend} row does not take the processor's q/k/v {b}x{h}x{n}x{d} "
                    f"({dtype}, strided views): it would fall back to the reference"), ""
    return None, "/".join(sorted(picked))


# ------------------------------------------------------------ providers --

@dataclass
class Built:
    fn: Callable[[], object]
    engine: object = None
    note: str = ""


def build_provider(case: Case, fc, base, guidance, inputs, coef, steps, problems, device) -> Built:
    """The timed callable of ``case``; raises NotRun when the provider cannot run here."""
    x, x_T, t, labels = inputs
    dtype, cuda, p = DTYPES[case.dtype], device.type == "cuda", case.provider
    w = 1.0 if case.role == "student" else guidance
    if p == "flashcore-engine":
        from flashcore.engine import Engine
        if dtype == torch.float16 and not cuda:
            raise NotRun("a float16 engine runs on CUDA only")
        eng = Engine(fc, NoiseSchedule(), steps=steps, guidance=w, dtype=dtype, compile=True, noise_correction=True)
        r, (_, attn) = eng.resolved, flashcore_attention_reason(None, problems, dtype, device)
        note = f"engine: mode {r.mode}, freeze {r.freeze}, linear {r.linear}, attention {attn or '-'}"

        def run_engine():
            torch.compiler.cudagraph_mark_step_begin()   # CUDA graphs: a new generation of outputs per call
            return eng.step(0, x, x_T, labels)
        return Built(run_engine, eng, note)
    attn = p.removeprefix("eager/") if p.startswith("eager/") else "sdpa"
    if p in HALF_ONLY and dtype == torch.float32:
        raise NotRun("this SDPA backend takes fp16/bf16 only")
    if attn != "sdpa" and not cuda:
        raise NotRun("needs a CUDA device" + (" (Triton on the CPU is its interpreter: no benchmark)"
                                              if attn.startswith("flashcore") else ""))
    proc, context = attention_provider(attn, problems, dtype, device)
    set_processors(base, proc)
    step, graphs = ref_step(base, w, coef, dtype), p in COMPILE_MODES
    if graphs:
        step = B.compile_fresh(step, mode=COMPILE_MODES[p])

    def run():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with context():
            return step(x, x_T, t, labels)
    return Built(run)


def attention_provider(name: str, problems, dtype: torch.dtype, device):
    """(diffusers attention processor, context factory around each call) for ``name``:
    "sdpa" (PyTorch's choice), "sdpa-<backend>", "xformers", "flashcore-<backend>"."""
    import contextlib
    if name == "xformers":
        if not _bench_gpu()._importable("xformers"):
            raise NotRun("xformers is not installed")
        from diffusers.models.attention_processor import XFormersAttnProcessor
        return XFormersAttnProcessor(), contextlib.nullcontext
    if name.startswith("flashcore-"):
        from flashcore.models import FlashcoreAttnProcessor
        backend = name.removeprefix("flashcore-")
        why, _ = flashcore_attention_reason(backend, problems, dtype, device)
        if why:
            raise NotRun(why)
        return FlashcoreAttnProcessor(backend), contextlib.nullcontext
    if name.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION}[name.removeprefix("sdpa-")]
        return _sdpa_processor(), lambda: sdpa_kernel(backend)
    return _sdpa_processor(), contextlib.nullcontext


class NotRun(Exception):
    """A provider that cannot run this case here (the reason is reported, not an error)."""


# ------------------------------------------------------------ timing and rows --

def do_bench(fn: Callable[[], object]) -> B.Timing:
    import triton.testing as tt
    p50, p20, p80 = tt.do_bench(fn, warmup=25, rep=150, quantiles=QUANTILES)
    return B.Timing(p50, p20, p80, 0, 1)


def _rel_err(out, ref: torch.Tensor) -> float:
    o = (out[0] if isinstance(out, (tuple, list)) else out).double()
    r = ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def case_rows(case: Case, shape, tm: B.Timing, steps: int, flops: float, err: float, setup: float | None,
              note: str, device_name: str) -> list[dict]:
    """The step row (ms), the image row it implies (ms/image: steps x step / batch) and,
    for compiled providers, the compile row (s)."""
    name = f"{case.model}.{case.role}"
    tflops = flops / (tm.p50_ms * 1e-3) / 1e12 if tm.p50_ms > 0 else 0.0
    pct = _bench_gpu().share_of_peak("TFLOP/s", tflops, device_name, case.dtype)
    perf = f"{tflops:.3g} TFLOP/s" + (f" ({pct:.0f}% of dense {case.dtype} peak)" if pct is not None else "")
    rows = [B.make_row(f"{name}_step", case.provider, shape, case.dtype, tm, "ms", tm.p50_ms, rel_err=err,
                       note="; ".join(s for s in (perf, note) if s))]
    k = steps / case.batch
    img = B.Timing(tm.p50_ms * k, tm.p20_ms * k, tm.p80_ms * k, tm.samples, tm.inner)
    rows.append(B.make_row(f"{name}_image", case.provider, shape, case.dtype, img, "ms/image", img.p50_ms,
                           note=f"{steps} step(s) x step p50 / batch {case.batch}"))
    if setup is not None:
        rows.append(B.make_row(f"{name}.compile", case.provider, shape, case.dtype, B.timing_of_seconds(setup),
                               "s", setup))
    return rows


@functools.lru_cache(maxsize=None)
def _bench_gpu():
    """bench/bench_gpu.py (the peak table lives there), a sibling script."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_gpu
    return bench_gpu


# ------------------------------------------------------------ the run --

NOTES = ["value: ms per step call (p50; triton.testing.do_bench, CUDA events, L2 flushed before each call); "
         "_image rows: the step p50 x steps per image / batch (student 1 step, teacher "
         f"{TEACHER_STEPS} CFG steps); compile rows: seconds of the first call",
         "bf16/fp16: the network under CUDA autocast, the state and update in fp32; fp32: TF32 off",
         "rel. err: the step's x_next against eager fp32 (SDPA) on the same inputs",
         "TFLOP/s: FLOPs of the eager step (torch.utils.flop_counter) over the p50, against the "
         "published dense peak (bench_gpu.PEAKS)"]


class Runner:
    def __init__(self, device: torch.device, tiny: bool, weights: str, out_dir: Path | None, budget_s: float | None,
                 log: Callable[[str], None], dry_run: bool):
        self.device, self.dry_run, self.out_dir, self.budget_s, self.log = device, dry_run, out_dir, budget_s, log
        self.models = Models(device, tiny, weights)
        self.refs: dict = {}
        self.rows: list[dict] = []
        self.not_run: list[tuple[Case, str]] = []
        self.built: list[tuple[Case, str]] = []   # dry run: what each case built
        self.compile_seen: dict = {}
        self.start = time.monotonic()

    def remaining(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - (time.monotonic() - self.start)

    def expected_s(self, case: Case) -> float:
        """What a case needs to finish: its compile as seen for this model (max-autotune about
        3x the default's when not seen yet), at least 30 s; 5 s for an eager case."""
        if not case.compiled:
            return 5.0
        seen = self.compile_seen.get((case.model, case.provider))
        if seen is None:
            other = [v for (m, _), v in self.compile_seen.items() if m == case.model]
            seen = max(other, default=0.0) * (3.0 if "max-autotune" in case.provider else 1.0)
        return max(30.0, 1.2 * seen)

    def run(self, cases: list[Case]) -> None:
        for case in cases:
            left = self.remaining()
            need = self.expected_s(case)
            if left < need:
                self.not_run.append((case, f"time budget ({left:.0f} s left, ~{need:.0f} s needed)"))
                continue
            try:
                self.run_case(case)
            except NotRun as e:
                self.not_run.append((case, str(e)))
            except Exception as e:  # noqa: BLE001 - a provider failing (an SDPA backend refusing a shape,
                if self.dry_run:    # out of memory, a compile error) is a case not run, with its reason;
                    raise           # in a dry run it is a bug
                self.not_run.append((case, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"))
                self.log(f"not run: {case}: {type(e).__name__}: {e}")
            finally:
                if case.compiled and not self.dry_run:
                    torch._dynamo.reset()    # drop this case's graphs (and CUDA-graph pools) before the next
                    gc.collect()
                    torch.cuda.empty_cache()
            self.write()
        self.write()

    def run_case(self, case: Case) -> None:
        fc, base, guidance, what = self.models.get(case.model)
        inputs, coef, steps = case_inputs(fc, case.role, case.batch, self.device)
        key = (case.model, case.role, case.batch)
        if key not in self.refs:
            self.refs[key] = reference(base, 1.0 if case.role == "student" else guidance, inputs, coef)
        ref = self.refs[key]
        built = build_provider(case, fc, base, guidance, inputs, coef, steps, ref.problems, self.device)
        if self.dry_run:
            if case.provider == "eager" and case.dtype == "bf16":   # the autocast path runs once (fp32 ran above)
                with torch.no_grad():
                    built.fn()
            self.built.append((case, built.note or "built"))
            return
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            out = built.fn()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            err = _rel_err(out, ref.out)
            fell = [str(w.message) for w in caught if "falling back to the reference" in str(w.message)]
            if fell:
                raise NotRun(fell[0])
            tm = do_bench(built.fn)
        setup = built.engine.compile_seconds if built.engine is not None else first if case.compiled else None
        if setup is not None:
            self.compile_seen[(case.model, case.provider)] = setup
        shape = tuple(inputs[0].shape)
        rows = case_rows(case, shape, tm, steps, ref.flops, err, setup, built.note, B.device_name())
        B.validate_rows(rows)
        self.rows += rows
        B.append_csv(self.out_dir / "results.csv", rows)      # case by case: a run cut short keeps its rows
        self.log(f"{case.model:13s} {case.role:7s} {case.dtype} b={case.batch:<3d} {case.provider:24s} "
                 f"p50 {tm.p50_ms:9.3f} ms/step  {rows[1]['value']:9.4g} ms/image  rel.err {err:.1e}"
                 + (f"  compile {setup:.1f} s" if setup is not None else ""))

    def write(self) -> None:
        """(Re)write the markdown: the rows so far, then the cases that did not run."""
        if self.out_dir is None or self.dry_run:
            return
        what = sorted({f"{m}: {v[3]}" for m, v in self.models._built.items()})
        B.write_markdown(self.out_dir / MD_FILE, TITLE, self.rows, NOTES + what)
        if self.not_run:
            with (self.out_dir / MD_FILE).open("a") as f:
                f.write("\n## Not run\n\n| model | role | dtype | batch | provider | why |\n"
                        "|---|---|---|---:|---|---|\n")
                for c, why in self.not_run:
                    f.write(f"| {c.model} | {c.role} | {c.dtype} | {c.batch} | {c.provider} | {why} |\n")


def dry_run_report(runner: Runner, cases: list[Case], out_dir: Path | None) -> str:
    """The plan as run here: each case built at tiny size on the CPU, or why not; and a
    check that rows of every case format into the CSV and the markdown table."""
    fake = []
    for c in cases:
        fake += case_rows(c, (c.batch, 4, 8, 8), B.Timing(1.0, 0.9, 1.1, 1, 1), 1 if c.role == "student" else
                          TEACHER_STEPS, 1e9, 0.0, 1.0 if c.compiled else None, "", "dry-run")
    B.validate_rows(fake)
    assert all(list(r)[:len(B.COLUMNS)] == B.COLUMNS for r in fake)
    B.markdown_table(fake)                         # the writer takes every row (not written: no timings)
    lines = ["# DRY RUN: " + TITLE, "",
             "No GPU, no timing: every case below was built at a tiny size on the CPU (the eager baseline "
             "also ran once); nothing here is a measurement.", "",
             "| order | model | role | dtype | batch | provider | status |", "|---:|---|---|---|---:|---|---|"]
    status = {c: f"built: {n}" for c, n in runner.built} | {c: f"not built here: {w}" for c, w in runner.not_run}
    for i, c in enumerate(cases):
        lines.append(f"| {i} | {c.model} | {c.role} | {c.dtype} | {c.batch} | {c.provider} | {status[c]} |")
    text = "\n".join(lines) + "\n"
    if out_dir is not None:
        B.append_csv(out_dir / "results.csv", [])    # the header only: a dry run measures nothing
        (out_dir / MD_FILE).write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="batch 8 only (make gpu-check); pair with --budget-s")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--roles", default=",".join(ROLES))
    ap.add_argument("--dtype", default=",".join(DTYPES), help="comma list of bf16,fp16,fp32")
    ap.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,16; --short: 8)")
    ap.add_argument("--providers", default=None, help="comma list of provider names or prefixes")
    ap.add_argument("--weights", choices=("shipped", "random"), default="shipped",
                    help="the UNet's weights: checkpoints/mnist-teacher when present, or random")
    ap.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    ap.add_argument("--out-dir", default=None,
                    help=f"results.csv and {MD_FILE} (default: a new folder under out/bench/)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: build every case at tiny size on the CPU, check the rows and the table writer")
    a = ap.parse_args(argv)
    models, roles, dtypes = a.models.split(","), a.roles.split(","), a.dtype.split(",")
    bad = (set(models) - set(MODELS)) | (set(roles) - set(ROLES)) | (set(dtypes) - set(DTYPES))
    if bad:
        ap.error(f"unknown model, role or dtype: {sorted(bad)}")
    try:
        batches = [int(b) for b in a.batch.split(",")] if a.batch else ([8] if a.short else [1, 16])
        batches = [2] if a.dry_run else batches            # tiny: the CPU only checks that each case builds
        if min(batches) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--batch: positive integers, got {a.batch!r}")
    providers = tuple(a.providers.split(",")) if a.providers else None
    cases = plan(models, roles, dtypes, batches, providers)
    if not a.dry_run and not torch.cuda.is_available():
        sys.stderr.write("no CUDA device: use --dry-run here\n")
        return 2
    try:
        out_dir = B.resolve_out_dir(a.out_dir, quick=a.short or a.dry_run) if (a.out_dir or not a.dry_run) else None
    except ValueError as e:
        ap.error(str(e))
    log = lambda s: (sys.stdout.write(s + "\n"), sys.stdout.flush())   # noqa: E731
    device = torch.device("cpu" if a.dry_run else "cuda")
    if not a.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = False     # fp32 rows are fp32 (NOTES)
        torch.backends.cudnn.allow_tf32 = False
    runner = Runner(device, a.dry_run, a.weights, out_dir, a.budget_s, log, a.dry_run)
    runner.run(cases)
    if a.dry_run:
        text = dry_run_report(runner, cases, out_dir)
        sys.stdout.write(text)
        sys.stdout.write(f"{len(cases)} cases ({len(runner.built)} built, {len(runner.not_run)} not buildable on "
                         f"the CPU), CSV columns: {','.join(B.COLUMNS)}\n")
        return 0
    runner.write()
    for c, why in runner.not_run:
        log(f"not run: {c.model} {c.role} {c.dtype} b={c.batch} {c.provider}: {why}")
    log(f"{len(runner.rows)} rows, {len(runner.not_run)} cases not run -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
