"""The class-conditional denoiser: a diffusers model behind one adapter, so
teacher, student and sampler see ``eps(x_t, t, labels)``.

Prediction types (``ModelConfig.prediction_type``), with x_t = a_t x0 + s_t eps:
- ``epsilon``: the network predicts eps;
- ``v_prediction`` (Salimans & Ho 2022): the network predicts v = a_t eps - s_t x0,
  and ``forward`` returns eps = s_t x_t + a_t v. The sampler then forms
  x0 = (x_t - s_t eps) / a_t = a_t x_t - s_t v (since a_t^2 + s_t^2 = 1), which
  stays well defined at a zero-terminal-SNR t = T (a_T floored, s_T = 1: x0 = -v),
  where an epsilon head would divide its error by a_T ~ 0. So every consumer of
  eps (sampler, noise correction, SRL, the fused kernels) works unchanged.

Labels ``0..K-1`` are classes; label ``K`` is the null condition of
classifier-free guidance. Label dropout for CFG is done once per sample by
the trainer (``drop_labels``); diffusers' DiT would otherwise drop labels
independently in every block, so its embedders' dropout is set to zero.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..checkpoint import (CheckpointError, check_json, config_from_json, current_dir, read_json, read_tensors,
                          tensor_problem, write_dir, write_json)
from .attention_processor import FlashcoreAttnProcessor

ARCHS = ("unet", "dit")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class ModelConfig:
    arch: str = "unet"
    sample_size: int = 28
    channels: int = 1
    num_classes: int = 10
    # UNet2DModel
    block_out_channels: tuple = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    # DiTTransformer2DModel
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"model: unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"model: prediction_type {self.prediction_type!r} is not supported; "
                             f"expected one of {PREDICTION_TYPES}")
        self.block_out_channels = tuple(self.block_out_channels)


def build_net(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "unet":
        from diffusers import UNet2DModel
        n = len(cfg.block_out_channels)
        # attention only at the lowest resolution (and the mid block): the hot path at small cost
        down = ("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",)
        up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)
        return UNet2DModel(sample_size=cfg.sample_size, in_channels=cfg.channels,
                           out_channels=cfg.channels, block_out_channels=cfg.block_out_channels,
                           layers_per_block=cfg.layers_per_block, down_block_types=down,
                           up_block_types=up, attention_head_dim=cfg.attention_head_dim,
                           norm_num_groups=min(32, cfg.block_out_channels[0]),
                           num_class_embeds=cfg.num_classes + 1)
    from diffusers import DiTTransformer2DModel
    net = DiTTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                in_channels=cfg.channels, out_channels=cfg.channels,
                                num_layers=cfg.num_layers, sample_size=cfg.sample_size,
                                patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes + 1)
    for m in net.modules():
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return net


def use_flashcore_attention(net: nn.Module, backend: str | None = None) -> int:
    """Route every diffusers ``Attention`` in ``net`` through flashcore.ops.attention."""
    from diffusers.models.attention_processor import Attention
    n = 0
    for m in net.modules():
        if isinstance(m, Attention):
            m.set_processor(FlashcoreAttnProcessor(backend))
            n += 1
    return n


class Denoiser(nn.Module):
    """``forward(x_t, t, labels) -> eps`` whatever the network predicts.

    A v-prediction model needs its noise ``schedule`` (the a_t, s_t of the
    conversion, kept as non-persistent buffers: they follow ``.to(device)`` and
    stay out of the weights file)."""

    def __init__(self, cfg: ModelConfig, net: nn.Module | None = None, schedule=None):
        super().__init__()
        self.cfg = cfg
        self.net = net if net is not None else build_net(cfg)
        self.null_label = cfg.num_classes
        self.schedule = schedule
        if cfg.prediction_type == "v_prediction":
            if schedule is None:
                raise ValueError("model: a v_prediction model needs its noise schedule")
            self.register_buffer("_a", schedule.a.float(), persistent=False)       # (T+1,)
            self.register_buffer("_s", schedule.s.float(), persistent=False)
        use_flashcore_attention(self.net)

    def raw(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network's own output (eps or v); x (B, C, H, W), t (B,) int64, labels (B,) int64."""
        if self.cfg.arch == "unet":
            return self.net(x, t, class_labels=labels).sample
        return self.net(x, timestep=t, class_labels=labels).sample

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps prediction (B, C, H, W)."""
        return self.eps_from(x, t, self.raw(x, t, labels))

    def eps_from(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """eps from the network's output ``out`` (eps or v) at x_t = ``x``, in ``x``'s dtype."""
        if self.cfg.prediction_type == "epsilon":
            return out
        a, s = self._a[t].view(-1, 1, 1, 1), self._s[t].view(-1, 1, 1, 1)          # (B, 1, 1, 1)
        return s * x + a * out.to(x.dtype)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``raw`` is trained to output for x_t = a_t x0 + s_t eps."""
        if self.cfg.prediction_type == "epsilon":
            return eps
        a, s = self._a[t].view(-1, 1, 1, 1), self._s[t].view(-1, 1, 1, 1)
        return a * eps - s * x0

    def eps_cfg(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        """(eps_c, eps_u) in one batched evaluation of 2B samples (2 NFE per step)."""
        b = x.shape[0]
        null = torch.full_like(labels, self.null_label)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        return out[:b], out[b:]

    def drop_labels(self, labels: torch.Tensor, p: float, generator=None) -> torch.Tensor:
        keep = torch.rand(labels.shape, generator=generator, device=labels.device) >= p
        return torch.where(keep, labels, torch.full_like(labels, self.null_label))


def _scheduler_kwargs(cfg: ModelConfig, meta: dict) -> dict:
    """The FlashcoreScheduler config that samples as flashcore does with ``meta``."""
    from ..scheduler import scheduler_config
    from ..schedule import ScheduleConfig
    return scheduler_config(ScheduleConfig(**(meta.get("schedule") or {})), cfg.prediction_type,
                            steps=meta.get("steps"), grid=meta.get("grid"),
                            noise_correction=meta.get("noise_correction", True))


def save_pretrained(model: Denoiser, path: str, meta: dict, dtype: torch.dtype = torch.float32) -> None:
    """A diffusers pipeline folder (``flashcore.pipeline``: model_index.json,
    scheduler/, unet/ or transformer/ in safetensors) plus ``path/config.json``
    (flashcore's), written as one unit: ``path`` is replaced whole, never left
    half-written. The scheduler carries ``meta``'s schedule and a student's
    steps, grid and noise correction; the pipeline its guidance scale."""
    from ..pipeline import NETWORK_COMPONENT, FlashcorePipeline
    from ..scheduler import FlashcoreScheduler
    net = model.net
    if dtype != torch.float32:
        import copy
        net = copy.deepcopy(net).to(dtype)
    scheduler = FlashcoreScheduler(**_scheduler_kwargs(model.cfg, meta))
    pipe = FlashcorePipeline(scheduler=scheduler, guidance_scale=float(meta.get("guidance") or 1.0),
                             **{NETWORK_COMPONENT[model.cfg.arch]: net})

    def write(d: str) -> None:
        pipe.save_pretrained(d, safe_serialization=True)
        for root, _, files in os.walk(d):         # diffusers leaves some files 0600; checkpoints are shared
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        write_json(os.path.join(d, "config.json"), {**meta, "model": asdict(model.cfg)})
    write_dir(path, write)


# the layout before pipeline folders: the network in model/ (the shipped checkpoints)
WEIGHTS = os.path.join("model", "diffusion_pytorch_model.safetensors")
# what else in config.json a loader may use; checked when present
META_FIELDS = {"kind": "str", "guidance": "number|null?", "data": "str?", "schedule": "dict?", "steps": "int?",
               "grid": "numbers?", "noise_correction": "bool?", "model": "dict"}


def read_config(path: str, kinds: tuple[str, ...]) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the whole config.json) of a saved denoiser, checked field by field."""
    file = os.path.join(path, "config.json")
    meta = read_json(file)
    check_json(meta, {"kind": "str"}, file)
    if meta["kind"] not in kinds:
        raise CheckpointError(f"checkpoint: {path!r} is a {meta['kind']!r} checkpoint; expected one of {kinds}")
    check_json(meta, META_FIELDS, file)
    cfg = config_from_json(ModelConfig, meta["model"], file, "model.",
                           required=("arch", "sample_size", "channels", "num_classes"))
    for f, v in asdict(cfg).items():            # sizes: every field that is not a name
        if isinstance(v, str):
            continue
        vals = list(v) if isinstance(v, tuple) else [v]
        if not vals or any(type(x) is not int or x < 1 for x in vals):
            want = "a list of positive integers" if isinstance(v, tuple) else "a positive integer"
            raise CheckpointError(f"checkpoint: {file}: field 'model.{f}' must be {want}, got {v!r}")
    if "schedule" in meta:                      # the samplers and the distiller build it from here
        from ..schedule import NoiseSchedule, ScheduleConfig
        sc = config_from_json(ScheduleConfig, meta["schedule"], file, "schedule.")
        try:
            NoiseSchedule(sc)
        except ValueError as e:
            raise CheckpointError(f"checkpoint: {file}: field 'schedule': {e}") from None
    return cfg, meta


def _weights_file(path: str, cfg: ModelConfig) -> tuple[str, str | None]:
    """(the network's safetensors file, its pipeline component or None in the earlier layout)."""
    if not os.path.exists(os.path.join(path, "model_index.json")):
        return os.path.join(path, WEIGHTS), None
    from ..pipeline import NETWORK_COMPONENT, WEIGHTS_NAME, check_pipeline_folder
    component = check_pipeline_folder(path)
    if component != NETWORK_COMPONENT[cfg.arch]:
        raise CheckpointError(f"checkpoint: {path}: config.json's model is a {cfg.arch!r} network, the "
                              f"pipeline holds a {component!r}")
    return os.path.join(path, component, WEIGHTS_NAME), component


def stored_dtype(path: str) -> torch.dtype:
    """The floating-point type a saved denoiser's weights are stored in (a distilled
    student's: float16), read from the safetensors header alone."""
    from safetensors import safe_open
    path = current_dir(path)
    file, _ = _weights_file(path, read_config(path, ("teacher", "student"))[0])
    try:
        with safe_open(file, "pt") as f:
            kinds = {f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception:        # a missing or broken file: load_pretrained names the problem
        return torch.float32
    for name, dtype in (("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16)):
        if name in kinds:
            return dtype
    return torch.float32


def _check_pipeline_agrees(path: str, component: str, net: nn.Module, cfg: ModelConfig, meta: dict) -> None:
    """A pipeline folder says twice what the model is (config.json for flashcore, the
    component configs for diffusers); a loader that read one would sample differently
    from one that read the other, so they must agree."""
    import json

    from ..scheduler import FlashcoreScheduler
    file = os.path.join(path, component, "config.json")
    saved = read_json(file)
    check_json(saved, {}, file)
    want = json.loads(json.dumps({k: v for k, v in net.config.items() if not k.startswith("_")}))
    for k, v in want.items():
        if saved.get(k) != v:
            raise CheckpointError(f"checkpoint: {file}: field {k!r} is {json.dumps(saved.get(k))[:40]}, "
                                  f"config.json's model gives {json.dumps(v)[:40]}")
    file = os.path.join(path, "scheduler", "scheduler_config.json")
    saved = read_json(file)
    check_json(saved, {}, file)
    try:
        got = FlashcoreScheduler.from_config(saved)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint: {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    try:
        want = FlashcoreScheduler(**_scheduler_kwargs(cfg, meta))
    except (ValueError, TypeError) as e:          # steps or grid that no scheduler can take
        raise CheckpointError(f"checkpoint: {os.path.join(path, 'config.json')}: {str(e).splitlines()[0]}") from None
    fields = ["prediction_type"]
    if saved.get("_class_name") == FlashcoreScheduler.__name__:    # (a swapped-in diffusers scheduler has no plan)
        fields += ["noise_correction", "num_inference_steps", "timesteps"]
    for k in fields:
        if got.config[k] != want.config[k]:
            raise CheckpointError(f"checkpoint: {file}: field {k!r} is {json.dumps(got.config[k])[:40]}, "
                                  f"config.json gives {json.dumps(want.config[k])[:40]}")
    if not torch.equal(got.schedule.alphas_cumprod, want.schedule.alphas_cumprod):
        raise CheckpointError(f"checkpoint: {file}: its noise schedule is not config.json's 'schedule'")


def load_pretrained(path: str, *, kinds: tuple[str, ...] = ("teacher", "student")) -> tuple[Denoiser, dict]:
    """Load a denoiser saved by ``save_pretrained`` (a pipeline folder) or in the
    earlier layout (config.json and model/); float32 weights, eval mode.

    The network is built from config.json and must take every weight as it is:
    each tensor present, of the config's shape, floating point and finite
    (diffusers' own loader would initialise a missing tensor at random)."""
    path = current_dir(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint: {path!r} is not a directory")
    cfg, meta = read_config(path, kinds)
    file, component = _weights_file(path, cfg)
    tensors = read_tensors(file)
    net = build_net(cfg)
    bad = tensor_problem(tensors, net.state_dict())
    if bad:
        raise CheckpointError(f"checkpoint: {file}: tensor {bad[0]!r} {bad[1]}"
                              + (" (the weights do not fit config.json)" if bad[2] else ""))
    net.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    if component is not None:
        _check_pipeline_agrees(path, component, net, cfg, meta)
    schedule = None
    if cfg.prediction_type != "epsilon":
        if "schedule" not in meta:
            raise CheckpointError(f"checkpoint: {path!r}: a {cfg.prediction_type} model needs 'schedule' in "
                                  "config.json")
        from ..schedule import NoiseSchedule, ScheduleConfig
        schedule = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
    model = Denoiser(cfg, net, schedule).eval()
    if cfg.arch == "dit":
        for m in model.modules():
            if hasattr(m, "dropout_prob"):
                m.dropout_prob = 0.0
    return model, meta
