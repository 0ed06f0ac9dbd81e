"""The inference engine: teacher/student steps and the few-step sampler under torch.compile.

``Engine(model, schedule, steps=3).sample(labels)`` returns what
``flashcore.sampler.sample`` returns for the same noise, with:

- one compiled graph per batch bucket, reused at every grid position and every
  call (schedule values and t are tensor inputs, see ``step.py``); no graph
  breaks (``fullgraph=True``) and static shapes (``dynamic=False``): a batch is
  padded up to the next bucket and the result sliced, so a new batch size in
  the same bucket costs nothing;
- optional bf16 autocast of the network (the state and the update stay float32);
- optional inductor freezing (weights folded as constants): the big win for
  bf16, where it removes the per-call weight casts (docs/cpu_performance.md: 25 ms against
  40 ms eager for a DiT-S/2 forward); in fp32 it gains nothing by itself but
  lets the q/k/v projections fuse (below), hence ``freeze="auto"``: on for
  bf16, and for fp32 where the flashcore linear layers run;
- optional flashcore linear layers (``flashcore.ops.linear``, ``linear.py``): in
  float32 PyTorch's GEMMs run on MKL, the slow path on this AMD CPU; the
  ``cpp`` row runs oneDNN's inner product, and a GEMV of its own for the
  one-row conditioning projections (DiT-S/2 forward at batch 1: 90 -> 52 ms
  eager, 80 -> 47 ms compiled with oneDNN alone). The model is
  not touched: the steps call a copy of its module tree that shares every
  parameter. ``linear="auto"`` turns it on for compiled float32 engines only,
  so the eager engine stays bit-equal to ``sampler.sample`` (oneDNN sums in
  another order: ~1e-6 apart) and bf16 keeps inductor's own oneDNN packing
  of the frozen weights;
  with ``freeze`` on as well, self-attention's q/k/v projections also become
  one GEMM on stacked copies of their weights (``linear.py``, "Fused QKV"),
  and the token layers' weights are prepacked in oneDNN's layout (found by one
  eager probe step at construction; ``pack_linear_weights``): a frozen graph
  keeps its first call's weights anyway, and only there may such copies stop
  following the model's parameters;
- compile time kept apart: ``engine.compile_seconds`` sums the first call of
  every (bucket, graph) pair, which is where dynamo and inductor do their work;
- dynamo's guards not evaluated after that first call
  (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): they check every
  parameter tensor of the model on every call, ~1 ms a step for the shipped
  UNet (student step at batch 1: bf16 6.86 -> 5.92 ms, fp32 7.43 -> 6.45 ms).
  Safe here because each (graph, bucket) has its own code object holding one
  graph, and the engine checks and normalises what it passes in (shape,
  float32, contiguous, labels as int64) instead of leaving that to the guards.

Designed after gpt-fast's ``generate.py``: small fixed-shape step functions,
compiled once, compile time reported on its own.
"""
from __future__ import annotations

import contextlib
import os
import time
import types

import torch

from ..schedule import NoiseSchedule
from .config import BUCKETS, GRAPHS, EngineConfig  # noqa: F401  (re-exported)
from .linear import flashcore_linear_copy, pack_linear_weights
from .step import coefficient_table, make_sampler, make_step



def bucket_for(n: int, buckets: tuple[int, ...] | None) -> int:
    """Smallest bucket >= n; n itself without buckets or beyond the largest."""
    if not buckets:
        return n
    for b in buckets:
        if b >= n:
            return b
    return n


def enable_compile_cache(cache_dir: str | None = None) -> None:
    """Inductor's on-disk FX-graph cache, so a second process skips most of the compile.

    Inductor also writes precompiled headers under the system temp folder even
    with ``TORCHINDUCTOR_CACHE_DIR`` set (docs/cpu_performance.md), so set ``TMPDIR`` too if
    everything must live in one place.
    """
    import torch._inductor.config as inductor_config
    if cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    inductor_config.fx_graph_cache = True


class Engine:
    """Compiled few-step sampler for a ``Denoiser``-like model.

    ``Engine(model, schedule, config=EngineConfig(...), **options)``: the options
    are ``EngineConfig`` fields and override ``config``; ``EngineConfig.resolve``
    turns every "auto" into a decision (``engine.resolved``). Tensors follow the
    model's device.

    Args:
        model: ``forward(x, t, labels) -> eps`` and, for guidance != 1,
            ``eps_cfg(x, t, labels) -> (eps_c, eps_u)``; ``model.cfg`` gives the
            sample shape unless ``shape`` is passed. Put in eval mode.
        schedule: the model's noise schedule.
        steps: sampler steps on the trailing grid (or pass ``grid``).
        guidance: CFG scale; 1.0 means a student (1 NFE a step).
        noise_correction, clip: as in ``flashcore.sampler.sample``.
        dtype: float32, or bfloat16 (or float16 on CUDA) to run the network under autocast.
        compile: torch.compile the step (or the whole sampler, ``graph="sampler"``).
        freeze: inductor freezing; "auto" turns it on for bfloat16, and for
            compiled float32 with ``linear`` on (for the fused q/k/v). Frozen
            graphs keep the weights of their first call (the fused q/k/v copies,
            see ``linear``: of construction): build a new Engine after changing
            the model's weights (e.g. between training rounds).
        buckets: batch sizes to pad up to; default ``BUCKETS`` when compiled,
            none in eager mode (where padding buys nothing).
        graph: "step" compiles one step, reused at every grid position (the
            right choice for a 50-step teacher); "sampler" compiles the unrolled
            loop as one graph (few-step students: no Python between steps).
        linear: route the network's ``nn.Linear`` layers through
            ``flashcore.ops.linear`` (oneDNN on the CPU), with diffusers'
            feed-forward GELU fused in. "auto": on for compiled float32 engines
            when oneDNN is built (see the module docstring for why not eager).
            Compiled with ``freeze`` too, self-attention q/k/v run as one fused GEMM.
        mode: torch.compile mode; "auto": "reduce-overhead" (CUDA graphs, static
            buffers) for a compiled engine on a CUDA model, inductor's default elsewhere.
        backend: flashcore backend for the update (None: context, env, auto).
        cache_dir: inductor cache directory (the cache is on either way).
    """

    def __init__(self, model, schedule: NoiseSchedule, config: EngineConfig | None = None, **options):
        self.config = (config or EngineConfig()).replace(**options)
        self.resolved = r = self.config.resolve(model, schedule)
        self.model = model.eval()
        self.schedule, self.plan, self.grid = schedule, r.plan, list(r.plan.grid)
        self.guidance, self.clip, self.dtype = r.guidance, r.clip, r.dtype
        self.noise_correction = any(s.noise_correction for s in r.plan)
        self.compiled, self.graph, self.freeze, self.buckets = r.compiled, r.graph, r.freeze, r.buckets
        self.linear, self.linear_backend, self.fuse_qkv, self.shape = r.linear, r.linear_backend, r.fuse_qkv, r.shape
        # every tensor the engine makes lives where the model's weights are
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # what the steps call: the model, or a copy of its module tree sharing every parameter
        # (but for the stacked q/k/v copies, made only where the weights are frozen anyway)
        self.net = net = (flashcore_linear_copy(self.model, fuse_qkv=r.fuse_qkv, backend=r.linear_backend)
                          if r.linear else self.model)
        self.null_label = int(getattr(model, "null_label", 0))
        self.coefs = coefficient_table(r.plan)
        self._eager = {"step": make_step(net, guidance=r.guidance, clip=r.clip, autocast_dtype=r.autocast,
                                         backend=r.backend)}
        self._eager["sampler"] = make_sampler(self._eager["step"])
        # frozen fp32 on the native row: token-layer weights prepacked (module docstring)
        self.packed_layers = 0
        if r.fuse_qkv and r.dtype == torch.float32 and r.linear_backend == "cpp":
            x0 = torch.zeros((1,) + self.shape, device=self.device)
            t0 = torch.full((1,), self.grid[0], dtype=torch.long, device=self.device)
            l0 = torch.full((1,), self.null_label, device=self.device)
            self.packed_layers = pack_linear_weights(net, lambda: self._eager["step"](x0, x0, t0, l0, self.coefs[0]))
        self._compile_kw = dict(fullgraph=True, dynamic=False, mode=r.mode)
        if self.compiled:
            enable_compile_cache(r.cache_dir)
        self._fns: dict[tuple[str, int], object] = {}
        self.compile_seconds = 0.0

    # ------------------------------------------------------------ inputs --
    def _ts(self, n: int) -> list[torch.Tensor]:
        return [torch.full((n,), t, dtype=torch.long, device=self.device) for t in self.grid]

    def _pad(self, x_T: torch.Tensor, labels: torch.Tensor, n: int):
        b = x_T.shape[0]
        if n == b:
            return x_T, labels
        # padding rows: zero noise and the null label; each sample is computed
        # independently (no batch statistics in eval mode), so they never leak in
        x_pad = torch.cat([x_T, x_T.new_zeros((n - b,) + tuple(x_T.shape[1:]))])
        l_pad = torch.cat([labels, labels.new_full((n - b,), self.null_label)])
        return x_pad, l_pad

    def _fn(self, graph: str, n: int):
        """The callable for (graph, batch n), compiled on first use.

        Each (graph, bucket) gets its own compiled function with its own copy of
        the code object: dynamo keeps its cache per code object, so sharing one
        would make engines and buckets count against each other's recompile
        limit (8), and ``error_on_recompile`` could not tell a real re-trace from
        a new bucket.
        """
        key = (graph, n)
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        if not self.compiled:
            fn = self._fns[key] = self._eager[graph]
            return fn
        fn = torch.compile(fresh_function(self._eager[graph]), **self._compile_kw)
        self._fns[key] = _SkipGuards(fn)
        return _FirstCall(self, fn)

    # ----------------------------------------------------------- public --
    @torch.no_grad()
    def step(self, i: int, x: torch.Tensor, x_T: torch.Tensor, labels: torch.Tensor):
        """Grid step ``i`` on a batch as given (no padding): returns (x_next, x0).

        One student step is 1 NFE plus the fused update; a teacher step (guidance
        != 1) is 2 NFE batched as 2B plus the update. The benchmarks time this.
        """
        b = x.shape[0] if x.dim() else 0
        x, x_T = self._state(x, b, "x"), self._state(x_T, b, "x_T")
        if x_T.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            x_T = x_T.clone()                 # the graphs were traced with x and x_T apart (see _sample_chunk)
        labels = self._labels(labels, b)
        t = torch.full((b,), self.grid[i], dtype=torch.long, device=self.device)
        return self._fn("step", b)(x, x_T, t, labels, self.coefs[i])

    def _state(self, x: torch.Tensor, b: int, name: str) -> torch.Tensor:
        """``x`` as the compiled graphs take it (they skip dynamo's guards): (b, *shape), float32, dense."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (b,) + self.shape:
            raise ValueError(f"engine: {name} must have shape {(b,) + self.shape}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return x.to(device=self.device, dtype=torch.float32).contiguous()

    def _labels(self, labels: torch.Tensor, b: int) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if tuple(labels.shape) != (b,) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"engine: labels must be {b} integer class ids, got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        return labels.to(device=self.device, dtype=torch.long).contiguous()

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, x_T: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 (B, C, H, W) float32 for ``labels`` (B,); ``x_T`` defaults to N(0, I) from ``generator``.

        Same noise draw as ``flashcore.sampler.sample``, so equal inputs give equal outputs.
        """
        labels = self._labels(labels, torch.as_tensor(labels).numel())
        if x_T is None:
            x_T = torch.randn((len(labels),) + self.shape, generator=generator)   # drawn on the CPU: same noise on every device
        if x_T.dim() and x_T.shape[0] != len(labels):
            raise ValueError(f"engine: x_T has batch {x_T.shape[0]} but there are {len(labels)} labels")
        x_T = self._state(x_T, len(labels), "x_T")
        chunk = self.buckets[-1] if self.buckets else max(len(labels), 1)
        outs = [self._sample_chunk(x_T[i:i + chunk], labels[i:i + chunk]) for i in range(0, len(labels), chunk)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _sample_chunk(self, x_T: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = x_T.shape[0]
        n = bucket_for(b, self.buckets)
        x_T, labels = self._pad(x_T, labels, n)
        ts = self._ts(n)
        if self.resolved.cuda_graphs:
            # CUDA graphs replay into static output buffers: start a new generation of them
            # per call, and hand the caller a copy (the next call overwrites the buffers)
            torch.compiler.cudagraph_mark_step_begin()
        if self.graph == "sampler":
            x0 = self._fn("sampler", n)(x_T, labels, ts, self.coefs)
        else:
            # a copy, so that no step sees x aliasing x_T: dynamo guards on aliasing and
            # would otherwise compile the first step apart from the others
            x = x_T.clone()
            for i in range(len(self.grid)):
                x, x0 = self._fn("step", n)(x, x_T, ts[i], labels, self.coefs[i])
        return x0[:b].clone() if self.resolved.cuda_graphs else x0[:b]

    @torch.no_grad()
    def warmup(self, batch_sizes=(1,)) -> float:
        """Compile for the buckets of ``batch_sizes`` now; returns ``compile_seconds``."""
        for b in batch_sizes:
            self.sample(torch.zeros(b, dtype=torch.long), x_T=torch.zeros((b,) + self.shape, device=self.device))
        return self.compile_seconds

    def __repr__(self) -> str:
        return (f"Engine(steps={len(self.grid)}, guidance={self.guidance}, dtype={self.dtype}, "
                f"compile={self.compiled}, graph={self.graph!r}, freeze={self.freeze}, linear={self.linear}, "
                f"buckets={self.buckets})")


def fresh_function(fn):
    """``fn`` with a private copy of its code object (same closure and globals)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)


class _SkipGuards:
    """Calls a compiled function without evaluating dynamo's guards (module docstring).

    Dynamo still checks global state in this mode (e.g. ``torch.set_num_threads``
    changed since the compile) and then refuses to recompile; the call is then
    made again with the guards on, which recompiles what changed."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.fn(*args)
        except RuntimeError as e:          # raised before the graph runs: nothing was done twice
            if "skip_guard_eval_unsafe" not in str(e):
                raise
        return self.fn(*args)


class _FirstCall:
    """Runs a freshly compiled function once (that is when it compiles) and books
    the time as compile time.

    Freezing is switched on around this call only: in torch 2.13
    ``torch.compile(options={"freezing": True})`` is silently ignored (the
    weights stay graph inputs; tests/test_engine.py checks that they are folded),
    while the global inductor flag is read when the graph is compiled.
    """

    def __init__(self, engine: Engine, fn):
        self.engine, self.fn = engine, fn

    def __call__(self, *args):
        import torch._inductor.config as inductor_config
        ctx = inductor_config.patch(freezing=True) if self.engine.freeze else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            out = self.fn(*args)
        self.engine.compile_seconds += time.perf_counter() - t0
        return out
