"""The engine: eager == flashcore.sampler.sample exactly, compiled close to it,
no recompiles across the steps of a call or across calls, bf16 within the
error of eager bf16, generate() unchanged in eager mode.

Compiles are the slow part of this file, so the compiled tests use a small
conv denoiser (seconds to compile) except one that runs the real diffusers DiT
with flashcore attention through torch.compile(fullgraph=True).
"""
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from flashcore.engine import BUCKETS, Engine, FlashcoreLinear, bucket_for, coefficient_table, engine_update
from flashcore.evaluate import generate
from flashcore.models import Denoiser
from flashcore.ops import _dispatch, backends_for
from flashcore.ops.linear import pack_weight
from flashcore.sampler import sample
from flashcore.testing import spy_backends
from flashcore.plan import StepPlan
from flashcore.schedule import NoiseSchedule

from _fixtures import TINY_DIT, TINY_UNET, tiny_denoiser  # noqa: F401  (fixture)


class ConvDenoiser(nn.Module):
    """eps(x, t, labels) of the Denoiser interface, small enough to compile in seconds."""

    def __init__(self, classes: int = 10, ch: int = 8):
        super().__init__()
        self.cfg = SimpleNamespace(channels=1, sample_size=8)
        self.null_label = classes
        self.emb = nn.Embedding(classes + 1, ch)
        self.inp, self.out = nn.Conv2d(1, ch, 3, padding=1), nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, t, labels):
        h = self.inp(x) + self.emb(labels)[:, :, None, None] + (t.float() / 1000)[:, None, None, None]
        return self.out(torch.nn.functional.silu(h))

    def eps_cfg(self, x, t, labels):
        b = x.shape[0]
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, self.null_label)]))
        return out[:b], out[b:]


@pytest.fixture
def conv():
    torch.manual_seed(0)
    return ConvDenoiser().eval()


def _noise(b, shape, seed=0):
    return torch.randn((b,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


def test_bucket_for():
    assert [bucket_for(n, BUCKETS) for n in (1, 2, 3, 5, 8, 9, 250, 256)] == [1, 2, 4, 8, 8, 16, 256, 256]
    assert bucket_for(300, BUCKETS) == 300 and bucket_for(3, None) == 3


def test_coefficients_follow_the_sampler_rule():
    sch = NoiseSchedule()
    c = coefficient_table(StepPlan.build(sch, 3, noise_correction=True))
    assert c[0].dtype == torch.float64
    assert c[0].tolist() == [*sch.alpha_sigma(999), *sch.alpha_sigma(666), 1.0]
    assert c[2].tolist() == [*sch.alpha_sigma(333), 1.0, 0.0, 0.0]      # last step lands on x0
    assert coefficient_table(StepPlan.build(sch, 3, noise_correction=False))[0][4].item() == 0.0


@pytest.mark.parametrize("cfg,guidance,nc,clip", [(TINY_UNET, 2.5, True, 0.0), (TINY_DIT, 1.0, True, 1.0),
                                                  (TINY_DIT, 3.0, False, 0.0)])
def test_eager_engine_equals_sampler_exactly(cfg, guidance, nc, clip):
    torch.manual_seed(0)
    model = Denoiser(cfg).eval()
    sch, labels = NoiseSchedule(), torch.tensor([0, 3, 7])
    x_T = _noise(3, (1, 16, 16))
    ref = sample(model, labels, schedule=sch, steps=3, shape=(1, 16, 16), guidance=guidance, noise_correction=nc,
                 clip=clip, x_T=x_T)
    eng = Engine(model, sch, steps=3, guidance=guidance, noise_correction=nc, clip=clip, compile=False)
    assert torch.equal(eng.sample(labels, x_T=x_T), ref)
    # the default noise is sampler.sample's draw from the same generator
    a = eng.sample(labels, generator=torch.Generator().manual_seed(5))
    b = sample(model, labels, schedule=sch, steps=3, shape=(1, 16, 16), guidance=guidance, noise_correction=nc,
               clip=clip, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_linear_option_runs_the_fast_linear_on_a_copy_and_stays_close(monkeypatch):
    """``linear="auto"`` is on for compiled float32 only (the eager engine above stays
    bit-equal), on the native row where built (else oneDNN); compiled, it also freezes
    (for the fused q/k/v). Forced on in eager mode the fast GEMMs (another summation
    order, ~1e-6 apart per layer) keep the samples within the compiled engine's
    tolerance, and the model itself keeps its nn.Linear layers."""
    built = backends_for("linear")
    if "cpp" not in built and "onednn" not in built:
        pytest.skip("neither the native extension nor oneDNN is built")
    torch.manual_seed(0)
    model = Denoiser(TINY_DIT).eval()
    sch, labels = NoiseSchedule(), torch.tensor([0, 3, 7])
    auto = Engine(model, sch, steps=3)
    assert auto.linear and auto.freeze and auto.fuse_qkv
    assert auto.linear_backend == ("cpp" if "cpp" in built else "onednn")
    assert not Engine(model, sch, steps=3, compile=False).linear
    assert not Engine(model, sch, steps=3, dtype=torch.bfloat16).linear
    assert not Engine(model, sch, steps=3, freeze=False).fuse_qkv      # unfrozen: the copy shares every weight
    x_T = _noise(3, (1, 16, 16))
    ref = sample(model, labels, schedule=sch, steps=3, shape=(1, 16, 16), guidance=2.0, x_T=x_T)
    calls = spy_backends(monkeypatch, "linear")
    eng = Engine(model, sch, steps=3, guidance=2.0, compile=False, linear=True)
    torch.testing.assert_close(eng.sample(labels, x_T=x_T), ref, rtol=1e-4, atol=1e-4)
    assert calls and set(calls) == {auto.linear_backend}
    assert not any(isinstance(m, FlashcoreLinear) for m in model.modules())
    with pytest.raises(ValueError, match="linear"):
        Engine(model, sch, steps=3, linear="onednn")


def test_padding_to_a_bucket_does_not_leak_between_samples(conv):
    sch, labels = NoiseSchedule(), torch.tensor([1, 2, 3])
    x_T = _noise(3, (1, 8, 8))
    ref = sample(conv, labels, schedule=sch, steps=4, shape=(1, 8, 8), guidance=2.0, x_T=x_T)
    eng = Engine(conv, sch, steps=4, guidance=2.0, compile=False, buckets=(2, 8))
    torch.testing.assert_close(eng.sample(labels, x_T=x_T), ref)
    small = Engine(conv, sch, steps=4, guidance=2.0, compile=False, buckets=(2,))   # chunks of 2, padded
    torch.testing.assert_close(small.sample(labels, x_T=x_T), ref)


def test_engine_update_op_contract():
    x, e_c, e_u, x_T = (torch.randn(2, 1, 4, 4, dtype=torch.float64) for _ in range(4))
    coef = coefficient_table(StepPlan.build(NoiseSchedule(), 2))[0]
    torch.library.opcheck(engine_update, (x, e_c, e_u, x_T, coef, 2.0, 0.0, ""))
    torch.library.opcheck(engine_update, (x, e_c, None, x_T, coef, 1.0, 1.0, "reference"))


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_dit_step_is_one_graph_across_steps_and_calls():
    """The real diffusers DiT with flashcore attention, fullgraph: one graph per bucket."""
    torch.manual_seed(0)
    model = Denoiser(TINY_DIT).eval()
    sch, labels = NoiseSchedule(), torch.tensor([0, 5, 9])
    x_T = _noise(3, (1, 16, 16))
    ref = sample(model, labels, schedule=sch, steps=3, shape=(1, 16, 16), guidance=2.0, x_T=x_T)
    counters.clear()
    eng = Engine(model, sch, steps=3, guidance=2.0, compile=True)
    out = eng.sample(labels, x_T=x_T)                                      # batch 3 -> bucket 4
    assert _graphs() == 1                                                  # all three steps: one graph
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    first = eng.compile_seconds
    assert first > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = eng.sample(torch.tensor([1, 2, 3, 4]), x_T=_noise(4, (1, 16, 16), seed=1))   # same bucket
    assert _graphs() == 1 and eng.compile_seconds == first
    ref4 = sample(model, torch.tensor([1, 2, 3, 4]), schedule=sch, steps=3, shape=(1, 16, 16), guidance=2.0,
                  x_T=_noise(4, (1, 16, 16), seed=1))
    torch.testing.assert_close(again, ref4, rtol=1e-4, atol=1e-4)


def test_frozen_float32_engine_fuses_qkv_and_stays_close(monkeypatch):
    """Compiled with freeze and the fast linear, self-attention's q/k/v run as one
    GEMM on stacked copies of the weights (N = 3C), within the compiled tolerance."""
    if not {"cpp", "onednn"} & set(backends_for("linear")):
        pytest.skip("neither the native extension nor oneDNN is built")
    torch.manual_seed(0)
    model = Denoiser(TINY_DIT).eval()
    sch, labels = NoiseSchedule(), torch.tensor([0, 5, 9])
    x_T = _noise(3, (1, 16, 16))
    ref = sample(model, labels, schedule=sch, steps=3, shape=(1, 16, 16), guidance=2.0, x_T=x_T)
    eng = Engine(model, sch, steps=3, guidance=2.0, freeze=True)
    assert eng.linear and eng.fuse_qkv
    if eng.linear_backend == "cpp" and pack_weight(torch.ones(2, 2), 8) is not None:
        # prepacked: the token layers (fused q/k/v, out, both FF) of every block, not the
        # one-row conditioning projections, which stay on the GEMV
        packed = {n for n, m in eng.net.named_modules() if isinstance(m, FlashcoreLinear) and m.packed is not None}
        assert eng.packed_layers == len(packed) >= 4 * TINY_DIT.num_layers
        assert any(n.endswith("to_qkv") for n in packed) and not any(".norm1." in n for n in packed)
    row = _dispatch.table("linear")[eng.linear_backend]
    outs = []
    monkeypatch.setattr(row, "impl", lambda x, w, *a, _impl=row.impl: outs.append(w.shape[0]) or _impl(x, w, *a))
    torch.testing.assert_close(eng.sample(labels, x_T=x_T), ref, rtol=1e-4, atol=1e-4)
    assert 3 * TINY_DIT.num_heads * TINY_DIT.head_dim in outs


def test_compiled_whole_sampler_is_one_graph(conv):
    sch, labels = NoiseSchedule(), torch.tensor([1, 2])
    counters.clear()
    eng = Engine(conv, sch, steps=3, guidance=1.0, compile=True, graph="sampler")
    out = eng.sample(labels, x_T=_noise(2, (1, 8, 8)))
    assert _graphs() == 1
    torch.testing.assert_close(out, sample(conv, labels, schedule=sch, steps=3, shape=(1, 8, 8),
                                           x_T=_noise(2, (1, 8, 8))), rtol=1e-4, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        eng.sample(torch.tensor([7, 8]), x_T=_noise(2, (1, 8, 8), seed=2))
    assert _graphs() == 1


def test_bf16_engine_error_is_within_twice_eager_bf16(conv):
    """FlashAttention's rule applied to the whole sampler: compiled bf16 (frozen
    weights) against fp32 may err at most about twice as much as eager bf16."""
    sch, labels = NoiseSchedule(), torch.arange(4)
    x_T = _noise(4, (1, 8, 8))
    ref = sample(conv, labels, schedule=sch, steps=3, shape=(1, 8, 8), guidance=2.0, x_T=x_T)
    eager = Engine(conv, sch, steps=3, guidance=2.0, dtype=torch.bfloat16, compile=False).sample(labels, x_T=x_T)
    eng = Engine(conv, sch, steps=3, guidance=2.0, dtype=torch.bfloat16, compile=True)
    assert eng.freeze                                                     # "auto": on for bf16
    out = eng.sample(labels, x_T=x_T)
    assert out.dtype == torch.float32
    err_eager = (eager - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    assert 0 < err_eager and err <= 2 * err_eager + 1e-3
    # freezing really folded the (bf16-cast) weights into the graph: changing them no longer matters
    with torch.no_grad():
        conv.out.weight.mul_(0.5)
    assert torch.equal(eng.sample(labels, x_T=x_T), out)


def test_engine_rejects_bad_arguments(conv):
    sch = NoiseSchedule()
    with pytest.raises(ValueError, match="dtype"):
        Engine(conv, sch, steps=2, dtype=torch.float16)
    with pytest.raises(ValueError, match="graph"):
        Engine(conv, sch, steps=2, graph="loop")
    with pytest.raises(ValueError, match="steps or grid"):
        Engine(conv, sch)
    with pytest.raises(ValueError, match="labels"):
        Engine(conv, sch, steps=2, compile=False).sample(torch.arange(3), x_T=torch.zeros(2, 1, 8, 8))
    eng = Engine(conv, sch, steps=2, compile=False)
    with pytest.raises(ValueError, match=r"x_T must have shape \(2, 1, 8, 8\)"):
        eng.sample(torch.arange(2), x_T=torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match=r"x must have shape \(2, 1, 8, 8\)"):
        eng.step(0, torch.zeros(2, 8, 8), torch.zeros(2, 1, 8, 8), torch.arange(2))
    with pytest.raises(ValueError, match="labels must be 2 integer class ids"):
        eng.step(0, torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(2))


def test_compiled_calls_skip_guards_on_checked_inputs(conv):
    """After its first (compiling) call a graph runs with dynamo's guard evaluation
    skipped; what the guards would have caught the engine checks or normalises: a
    bf16 or non-contiguous x_T gives the float32 result, x aliasing x_T is split, a
    wrong shape is refused before the graph sees it."""
    sch, labels = NoiseSchedule(), torch.tensor([1, 2])
    x_T = _noise(2, (1, 8, 8))
    eng = Engine(conv, sch, steps=3, guidance=2.0, compile=True)
    ref = eng.sample(labels, x_T=x_T)
    assert all(type(f).__name__ == "_SkipGuards" for f in eng._fns.values())
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = eng.sample(labels, x_T=x_T.bfloat16())
        torch.testing.assert_close(out, eng.sample(labels, x_T=x_T.bfloat16().float()), rtol=0, atol=0)
        wide = torch.zeros(2, 1, 8, 16)
        wide[..., ::2] = x_T
        torch.testing.assert_close(eng.sample(labels, x_T=wide[..., ::2]), ref, rtol=0, atol=0)
        x = x_T.clone()
        a = eng.step(0, x, x, labels)                                   # aliased: x_T is copied first
        b = eng.step(0, x, x.clone(), labels)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        with pytest.raises(ValueError, match="x_T must have shape"):
            eng.sample(labels, x_T=torch.zeros(2, 1, 4, 4))
    # global state the compiled graph was specialised on changed: dynamo refuses to recompile
    # under the skipping stance, and the engine calls again with the guards on
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        torch.testing.assert_close(eng.sample(labels, x_T=x_T), ref, rtol=1e-4, atol=1e-4)   # other sum order
    finally:
        torch.set_num_threads(threads)


def test_generate_in_eager_mode_is_the_batched_sampler(tiny_denoiser):
    meta = {"schedule": {"kind": "scaled_linear"}}
    labels = torch.arange(5)
    x, secs = generate(tiny_denoiser, meta, labels, steps=2, guidance=2.0, seed=3, batch=2)
    g, sch, parts = torch.Generator().manual_seed(3), NoiseSchedule(), []
    for i in range(0, 5, 2):
        x_T = torch.randn((len(labels[i:i + 2]), 1, 16, 16), generator=g)
        parts.append(sample(tiny_denoiser, labels[i:i + 2], schedule=sch, steps=2, shape=(1, 16, 16),
                            guidance=2.0, x_T=x_T))
    assert torch.equal(x, torch.cat(parts)) and secs > 0


def test_engine_config_resolves_every_auto_once(tiny_denoiser):
    from flashcore.engine import EngineConfig
    sch = NoiseSchedule()
    eager = EngineConfig(steps=3, compile=False).resolve(tiny_denoiser, sch)
    assert (eager.linear, eager.freeze, eager.buckets, eager.fuse_qkv) == (False, False, None, False)
    assert eager.plan.grid == (999, 666, 333) and eager.shape == (1, 16, 16)
    bf16 = EngineConfig(steps=1, dtype=torch.bfloat16).resolve(tiny_denoiser, sch)
    assert bf16.freeze and not bf16.linear and bf16.buckets == BUCKETS and bf16.autocast == torch.bfloat16
    forced = EngineConfig(steps=2, compile=False, linear=True, buckets=(4,)).resolve(tiny_denoiser, sch)
    assert forced.linear and forced.buckets == (4,) and not forced.fuse_qkv
    with pytest.raises(TypeError, match="unknown option"):
        Engine(tiny_denoiser, sch, steps=1, compiled=True)
    with pytest.raises(ValueError, match="pass steps or grid"):
        Engine(tiny_denoiser, sch, compile=False)
    with pytest.raises(ValueError, match="descending"):
        Engine(tiny_denoiser, sch, grid=[333, 999], compile=False)


def test_engine_overrides_a_shared_config(tiny_denoiser):
    from flashcore.engine import EngineConfig
    base = EngineConfig(steps=3, compile=False, guidance=2.0)
    eng = Engine(tiny_denoiser, NoiseSchedule(), base, steps=2)
    assert eng.grid == [999, 499] and eng.guidance == 2.0 and base.steps == 3
    assert eng.device == next(tiny_denoiser.parameters()).device


def test_engine_mode_auto_follows_the_device():
    """CUDA graphs (reduce-overhead) for a compiled engine on a CUDA model; inductor's
    default on the CPU; float16 only on CUDA. Resolved without a GPU (a stand-in model)."""
    from flashcore.engine import EngineConfig

    def fake(device):
        cfg = SimpleNamespace(channels=1, sample_size=8)
        return SimpleNamespace(cfg=cfg, parameters=lambda: iter([SimpleNamespace(device=torch.device(device))]))
    sch = NoiseSchedule()
    assert EngineConfig(steps=2).resolve(fake("cpu"), sch).mode is None
    gpu = EngineConfig(steps=2).resolve(fake("cuda"), sch)
    assert gpu.mode == "reduce-overhead" and gpu.cuda_graphs
    assert (gpu.linear, gpu.linear_backend, gpu.freeze) == (False, None, False)     # the linear rows are CPU kernels
    assert EngineConfig(steps=2, compile=False).resolve(fake("cuda"), sch).mode is None
    assert EngineConfig(steps=2, mode="max-autotune").resolve(fake("cuda"), sch).mode == "max-autotune"
    assert EngineConfig(steps=2, dtype=torch.float16).resolve(fake("cuda"), sch).autocast == torch.float16
    with pytest.raises(ValueError, match="float16 is for CUDA"):
        EngineConfig(steps=2, dtype=torch.float16).resolve(fake("cpu"), sch)
