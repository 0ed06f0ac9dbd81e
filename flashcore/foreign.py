"""Models brought from diffusers: a pipeline folder or a model folder read into the
``Denoiser`` interface the distiller, the samplers and the engine use.

Accepted folders (docs/diffusers.md has the whole list and the error lines):

* flashcore's own checkpoints (``config.json`` with a ``kind``): ``flashcore.models.load_pretrained``;
* a diffusers pipeline folder (``model_index.json``): its ``unet`` or ``transformer``, its
  ``scheduler``, and where it has them its ``text_encoder``, ``tokenizer`` and ``vae``;
* a diffusers model folder (``config.json`` with a ``_class_name``) with its
  ``scheduler_config.json`` next to it or in a sibling ``scheduler/`` folder.

The network is one of ``UNet2DModel`` (class-conditional through its class embedding,
or unconditional), ``DiTTransformer2DModel`` (class-conditional) and
``UNet2DConditionModel`` with a CLIP text encoder and tokenizer; an ``AutoencoderKL``
puts it in latent space. Everything else is one ``CheckpointError`` line that says
what is supported: nothing is guessed or silently replaced.

Conditioning is an integer for every model, as the distiller draws it: a class
label, or for a text model the index of a prompt in the bank of prompts encoded
once at load time (``ForeignDenoiser.prompt_embeds``); the last index, K, is the
null condition of classifier-free guidance (the null class, or the empty prompt).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from .checkpoint import CheckpointError, check_json, read_json
from .models.denoiser import Denoiser
from .schedule import NoiseSchedule, ScheduleConfig

NETWORKS = ("UNet2DModel", "DiTTransformer2DModel", "UNet2DConditionModel")
TEXT_ENCODERS = ("CLIPTextModel",)
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
VAES = ("AutoencoderKL",)
PREDICTION_TYPES = ("epsilon", "v_prediction")
# components a pipeline folder may list that sampling does not need (Stable Diffusion's safety checker)
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
SUPPORTED = ("supported: a diffusers pipeline folder (model_index.json) or model folder with its "
             "scheduler_config.json holding UNet2DModel (class-conditional or unconditional), "
             "DiTTransformer2DModel, or UNet2DConditionModel with a CLIPTextModel, a CLIPTokenizer and an "
             "AutoencoderKL; epsilon or v_prediction; or a flashcore checkpoint")


def _fail(path: str, msg: str, supported: bool = False) -> CheckpointError:
    return CheckpointError(f"checkpoint: {path}: {msg}" + (f" ({SUPPORTED})" if supported else ""))


def is_flashcore(path: str) -> bool:
    """Whether ``path`` is one of flashcore's own checkpoints: a top-level config.json that is
    not a diffusers model's (those name their ``_class_name``). A broken or foreign-looking
    flashcore config.json stays flashcore's, whose loader names what is wrong with it,
    rather than falling back to reading the folder's diffusers components."""
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        return False
    try:
        c = read_json(f)
    except CheckpointError:
        return True
    return not isinstance(c, dict) or "kind" in c or "_class_name" not in c


# ---- reading a folder ------------------------------------------------------------------------

@dataclass
class Folder:
    """Where each component of a diffusers model lives: name -> (folder, class name)."""
    path: str
    network: tuple[str, str, str]            # (component name, folder, class name)
    scheduler_file: str
    parts: dict[str, tuple[str, str]]        # text_encoder, tokenizer, vae -> (folder, class name)
    index: dict


def _listed(entry) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def read_folder(path: str) -> Folder:
    """The components of a pipeline or model folder, each checked to be there."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise _fail(path, "is not a directory", supported=True)
    index_file = os.path.join(path, "model_index.json")
    if os.path.isfile(index_file):
        index = read_json(index_file)
        check_json(index, {}, index_file)
        nets = [n for n in ("unet", "transformer") if _listed(index.get(n))]
        if len(nets) != 1:
            raise _fail(index_file, f"a pipeline needs one network, 'unet' or 'transformer'; it lists "
                                    f"{nets or 'none'}", supported=True)
        unknown = sorted(k for k, v in index.items() if _listed(v) and k not in
                         ("unet", "transformer", "scheduler", "text_encoder", "tokenizer", "vae")
                         + IGNORED_COMPONENTS)
        if unknown:
            raise _fail(index_file, f"component {unknown[0]!r} is not supported", supported=True)
        for name, cfg_name in [(nets[0], "config.json"), ("scheduler", "scheduler_config.json")] + \
                [(n, None) for n in ("text_encoder", "tokenizer", "vae") if _listed(index.get(n))]:
            if not _listed(index.get(name)):
                raise _fail(index_file, f"the pipeline's {name!r} component is missing")
            d = os.path.join(path, name)
            if not os.path.isdir(d) or (cfg_name and not os.path.isfile(os.path.join(d, cfg_name))):
                raise _fail(path, f"the pipeline's {name!r} component is missing "
                                  f"({os.path.join(name, cfg_name or '')} not found)")
        parts = {n: (os.path.join(path, n), index[n][1]) for n in ("text_encoder", "tokenizer", "vae")
                 if _listed(index.get(n))}
        return Folder(path, (nets[0], os.path.join(path, nets[0]), index[nets[0]][1]),
                      os.path.join(path, "scheduler", "scheduler_config.json"), parts, index)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise _fail(path, "has neither model_index.json nor config.json", supported=True)
    cfg = read_json(cfg_file)
    check_json(cfg, {"_class_name": "str"}, cfg_file)
    for f in (os.path.join(path, "scheduler_config.json"),
              os.path.join(os.path.dirname(path), "scheduler", "scheduler_config.json")):
        if os.path.isfile(f):
            name = "transformer" if cfg["_class_name"].startswith("DiT") else "unet"
            return Folder(path, (name, path, cfg["_class_name"]), f, {}, {})
    raise _fail(path, "a model folder needs its noise schedule: scheduler_config.json next to config.json "
                      "or in ../scheduler/")


# ---- the noise schedule ---------------------------------------------------------------------

def read_scheduler(file: str) -> tuple[ScheduleConfig, dict]:
    """(the schedule, the scheduler's full config with its class's defaults filled in) of a
    diffusers scheduler config. Only what defines the noise process is taken: betas,
    zero-terminal-SNR rescale, prediction type; sampling settings (timestep_spacing,
    steps_offset, clip_sample, ...) belong to a sampler, and flashcore's is its own."""
    import diffusers

    from .scheduler import BETA_SCHEDULES, FlashcoreScheduler
    raw = read_json(file)
    check_json(raw, {"_class_name": "str", "prediction_type": "str?", "beta_schedule": "str?"}, file)
    name = raw["_class_name"]
    known = (FlashcoreScheduler.__name__,) + tuple(FlashcoreScheduler._compatibles)
    if name not in known:
        raise _fail(file, f"scheduler {name!r} is not supported; supported: {', '.join(known)} (discrete "
                          "timesteps on a beta schedule)")
    pred = raw.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise _fail(file, f"prediction_type {pred!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}")
    if raw.get("beta_schedule", "linear") not in BETA_SCHEDULES and not raw.get("trained_betas"):
        raise _fail(file, f"beta_schedule {raw['beta_schedule']!r} is not supported; supported: "
                          f"{', '.join(BETA_SCHEDULES)} or trained_betas")
    if raw.get("timestep_type", "discrete") != "discrete":
        raise _fail(file, f"timestep_type {raw['timestep_type']!r} is not supported; supported: discrete")
    cls = FlashcoreScheduler if name == FlashcoreScheduler.__name__ else getattr(diffusers, name)
    try:
        sched = cls.from_config(raw)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise _fail(file, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    c = dict(sched.config)
    kind = BETA_SCHEDULES.get(c.get("beta_schedule"), "linear")
    sc = ScheduleConfig(kind=kind, num_train_timesteps=int(c["num_train_timesteps"]),
                        zero_terminal_snr=bool(c.get("rescale_betas_zero_snr", False)),
                        beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]),
                        trained_betas=tuple(c.get("trained_betas") or ()))
    try:
        NoiseSchedule(sc)
    except ValueError as e:
        raise _fail(file, str(e)) from None
    return sc, c


# ---- the wrapper -------------------------------------------------------------------------------

@dataclass
class ForeignConfig:
    """What the distiller and samplers read of a model (``Denoiser.cfg``'s fields), and what it is."""
    arch: str                      # the diffusers class name
    sample_size: int               # of the network's input (latents in latent space)
    channels: int
    num_classes: int               # classes, prompts in the bank, or 1 (unconditional); K is the null condition
    prediction_type: str = "epsilon"
    conditioning: str = "class"    # "class", "text" or "none"
    learned_sigma: bool = False    # a DiT with 2C outputs: the second half (its variance) is dropped
    latent: bool = False


class _Frozen:
    """Components the distiller never trains (text encoder, tokenizer, VAE): kept outside
    the module tree (not in state dicts, not moved by ``.to``), shared by ``deepcopy``."""

    def __init__(self, **parts):
        self.__dict__.update(parts)

    def __deepcopy__(self, memo):
        return self


class ForeignDenoiser(Denoiser):
    """A diffusers network behind ``Denoiser``'s calls: ``forward(x_t, t, labels) -> eps``,
    ``eps_cfg``, ``raw``, ``target``. ``labels`` are class labels or indices into
    ``prompt_embeds`` (the last row is the empty prompt)."""

    def __init__(self, cfg: ForeignConfig, net: torch.nn.Module, schedule: NoiseSchedule,
                 prompt_embeds: torch.Tensor | None = None, frozen: _Frozen | None = None,
                 null_label: int | None = None):
        super().__init__(cfg, net, schedule)
        self.null_label = cfg.num_classes if null_label is None else null_label
        self.frozen = frozen or _Frozen()
        if prompt_embeds is not None:
            self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)      # (K + 1, L, D)

    def raw(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.conditioning == "text":
            return self.net(x, t, encoder_hidden_states=self.prompt_embeds[labels].to(x.dtype)).sample
        if cfg.arch == "DiTTransformer2DModel":
            out = self.net(x, timestep=t, class_labels=labels).sample
            return out[:, :cfg.channels] if cfg.learned_sigma else out
        if cfg.conditioning == "none":
            return self.net(x, t).sample
        return self.net(x, t, class_labels=labels).sample

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from samples of the network's space (latents: through the VAE)."""
        vae = getattr(self.frozen, "vae", None)
        if vae is None:
            return x
        vae.to(x.device)
        return vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample.float()


def decode(model, x: torch.Tensor) -> torch.Tensor:
    """``model.decode(x)`` for a latent model, ``x`` itself for a pixel one."""
    return model.decode(x) if isinstance(model, ForeignDenoiser) else x


# ---- loading -----------------------------------------------------------------------------------

def _load_diffusers(folder: str, cls_name: str, allowed: tuple[str, ...], what: str):
    import diffusers
    if cls_name not in allowed:
        raise _fail(folder, f"{what} class {cls_name!r} is not supported", supported=True)
    try:
        return getattr(diffusers, cls_name).from_pretrained(folder, use_safetensors=True).float().eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise _fail(folder, f"cannot load the {what} ({' '.join(str(e).split())[:300]})") from None


def _load_transformers(folder: str, cls_name: str, allowed: tuple[str, ...], what: str):
    import transformers
    if cls_name not in allowed:
        raise _fail(folder, f"{what} class {cls_name!r} is not supported (supported: {', '.join(allowed)})")
    try:
        cls = getattr(transformers, cls_name)
        if what == "tokenizer":
            return cls.from_pretrained(folder)
        return cls.from_pretrained(folder, use_safetensors=True).float().eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise _fail(folder, f"cannot load the {what} ({' '.join(str(e).split())[:300]})") from None


def _size(path: str, c) -> int:
    s = c.sample_size
    if isinstance(s, (list, tuple)):
        if len(set(s)) != 1:
            raise _fail(path, f"sample_size {list(s)} is not square; only square images are supported")
        s = s[0]
    return int(s)


def describe(path: str, net, prediction_type: str, text: bool, latent: bool) -> tuple[ForeignConfig, int]:
    """The ForeignConfig of a loaded network and its null label; unsupported settings are errors."""
    c, name = net.config, type(net).__name__
    if c.in_channels != (c.out_channels // 2 if name == "DiTTransformer2DModel" and
                         c.out_channels == 2 * c.in_channels else c.out_channels):
        raise _fail(path, f"{name} with in_channels {c.in_channels} and out_channels {c.out_channels} is not "
                          "supported; the network must predict one value per input channel")
    base = dict(arch=name, sample_size=_size(path, c), channels=int(c.in_channels),
                prediction_type=prediction_type, latent=latent)
    if name == "UNet2DConditionModel":
        if not text:
            raise _fail(path, "a UNet2DConditionModel needs a text_encoder and a tokenizer: pass its pipeline "
                              "folder", supported=True)
        for key in ("class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim_type"):
            if c.get(key) is not None:
                raise _fail(path, f"UNet2DConditionModel with {key} {c.get(key)!r} is not supported; only "
                                  "text conditioning through cross-attention is")
        return ForeignConfig(num_classes=0, conditioning="text", **base), 0
    if text:
        raise _fail(path, f"a {name} takes no prompt: the folder's text_encoder cannot condition it",
                    supported=True)
    if name == "DiTTransformer2DModel":
        if c.num_embeds_ada_norm is None or c.norm_type != "ada_norm_zero":
            raise _fail(path, "only a class-conditional DiTTransformer2DModel (norm_type ada_norm_zero, "
                              "num_embeds_ada_norm classes) is supported")
        k = int(c.num_embeds_ada_norm)          # classes 0..K-1; K: diffusers' extra null embedding
        return ForeignConfig(num_classes=k, learned_sigma=c.out_channels == 2 * c.in_channels, **base), k
    if c.class_embed_type is not None:
        raise _fail(path, f"UNet2DModel with class_embed_type {c.class_embed_type!r} is not supported; "
                          "supported: a class embedding table (num_class_embeds) or none")
    if c.num_class_embeds is None:
        return ForeignConfig(num_classes=1, conditioning="none", **base), 1
    if c.num_class_embeds < 2:
        raise _fail(path, "a class-conditional UNet2DModel needs num_class_embeds >= 2 (the classes and the "
                          "null class, which is the last)")
    k = int(c.num_class_embeds) - 1             # flashcore's convention: the last embedding is the null class
    return ForeignConfig(num_classes=k, **base), k


def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(len(prompts), L, D) text-encoder states, padded to the tokenizer's length, as
    Stable Diffusion conditions its UNet (the last hidden state, no attention mask)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0].float()


def read_prompts(file: str) -> list[str]:
    """The prompts of a text file, one a line (blank lines skipped)."""
    try:
        with open(file) as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise CheckpointError(f"prompts: {file} cannot be read ({e.strerror})") from None
    if not prompts:
        raise CheckpointError(f"prompts: {file} holds no prompt")
    return prompts


def load_foreign(path: str, *, kinds: tuple[str, ...] = ("teacher", "student"),
                 prompts: list[str] | None = None) -> tuple[ForeignDenoiser, dict]:
    """A diffusers pipeline or model folder as (ForeignDenoiser, meta); meta as flashcore's
    config.json has it (kind, guidance, schedule, a student's steps, grid, noise correction).
    A text model needs ``prompts``: its conditions are their indices."""
    import json

    from .scheduler import FlashcoreScheduler
    folder = read_folder(path)
    sc, sched = read_scheduler(folder.scheduler_file)
    _, net_dir, net_cls = folder.network
    net = _load_diffusers(net_dir, net_cls, NETWORKS, "network")
    parts = {}
    for name, allowed, load in (("text_encoder", TEXT_ENCODERS, _load_transformers),
                                ("tokenizer", TOKENIZERS, _load_transformers), ("vae", VAES, _load_diffusers)):
        if name in folder.parts:
            d, cls_name = folder.parts[name]
            parts[name] = load(d, cls_name, allowed, name.replace("_", " "))
    if ("text_encoder" in parts) != ("tokenizer" in parts):
        raise _fail(folder.path, "a text model needs both a text_encoder and a tokenizer", supported=True)
    provenance = os.path.join(folder.path, "flashcore.json")       # a student flashcore distilled: its run
    saved = read_json(provenance) if os.path.isfile(provenance) else {}
    check_json(saved, {"prompts": "list|null?"}, provenance)
    prompts = prompts or saved.get("prompts")
    cfg, null = describe(folder.path, net, sched["prediction_type"], "text_encoder" in parts, "vae" in parts)
    if "vae" in parts and parts["vae"].config.latent_channels != cfg.channels:
        raise _fail(folder.path, f"the vae has {parts['vae'].config.latent_channels} latent channels, the "
                                 f"network takes {cfg.channels}")
    embeds = None
    if cfg.conditioning == "text":
        te = parts["text_encoder"]
        if te.config.hidden_size != net.config.cross_attention_dim:
            raise _fail(folder.path, f"the text encoder's hidden_size {te.config.hidden_size} is not the unet's "
                                     f"cross_attention_dim {net.config.cross_attention_dim}")
        if not prompts:
            raise CheckpointError(f"checkpoint: {folder.path}: a text-conditioned model needs prompts "
                                  "(--prompts FILE, one a line)")
        embeds = encode_prompts(te, parts["tokenizer"], list(prompts) + [""])
        cfg.num_classes = null = len(prompts)
    plan = sched.get("num_inference_steps") is not None or sched.get("timesteps") is not None
    is_student = sched.get("_class_name", FlashcoreScheduler.__name__) == FlashcoreScheduler.__name__ and plan
    kind = "student" if is_student else "teacher"
    if kind not in kinds:
        raise CheckpointError(f"checkpoint: {folder.path!r} is a {kind!r} pipeline; expected one of {kinds}")
    meta = {**saved, "kind": kind, "guidance": folder.index.get("guidance_scale"), "data": saved.get("data"),
            "schedule": json.loads(json.dumps(asdict(sc))), "source": "diffusers", "model": asdict(cfg),
            "prompts": list(prompts) if cfg.conditioning == "text" else None}
    if is_student:
        meta["noise_correction"] = bool(sched.get("noise_correction", True))
        meta["grid"] = list(sched["timesteps"]) if sched.get("timesteps") else None
        meta["steps"] = len(meta["grid"]) if meta["grid"] else int(sched["num_inference_steps"])
    schedule = NoiseSchedule(sc)
    frozen = _Frozen(folder=folder, scheduler_config=sched, prompts=meta["prompts"], **parts)
    model = ForeignDenoiser(cfg, net, schedule, embeds, frozen, null_label=null).eval()
    for m in model.modules():          # diffusers' DiT drops labels in every block while training
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return model, meta


def load_model(path: str, *, kinds: tuple[str, ...] = ("teacher", "student"),
               prompts: list[str] | str | None = None) -> tuple[Denoiser, dict]:
    """Any model folder flashcore takes: its own checkpoints (``load_pretrained``), or a
    diffusers pipeline or model folder (``load_foreign``). ``prompts``: a list or a file."""
    from .checkpoint import current_dir
    from .models import load_pretrained
    if is_flashcore(current_dir(path)) or not os.path.isdir(path):
        model, meta = load_pretrained(path, kinds=kinds)
    else:
        if isinstance(prompts, str):
            prompts = read_prompts(prompts) if prompts else None
        model, meta = load_foreign(path, kinds=kinds, prompts=prompts)
    cond = getattr(model.cfg, "conditioning", "class")
    if prompts and cond != "text":
        # a prompt given to a model that cannot read it would be dropped without a word
        what = "an unconditional" if cond == "none" else "a class-conditional"
        raise CheckpointError(f"checkpoint: {path}: {what} model takes no prompt (--prompts and --prompt are for "
                              "text-conditioned models)")
    return model, meta


# ---- distilling and saving -----------------------------------------------------------------------

def student_from(teacher: Denoiser, cfg) -> Denoiser:
    """The student a distillation starts from: a trainable copy of the teacher."""
    if isinstance(teacher, ForeignDenoiser):
        import copy
        return copy.deepcopy(teacher).requires_grad_(True)
    # built where the teacher is: a state dict does not copy across devices such as meta
    student = Denoiser(cfg, schedule=teacher.schedule).to(next(teacher.parameters()).device)
    student.load_state_dict(teacher.state_dict())
    return student


def check_distill(cfg, meta: dict) -> None:
    """The parts of a run that need real images in the teacher's space (the discriminator,
    forward-noised states, validation FD) must be switched off, not silently skipped, for a
    teacher without a data set (a diffusers folder) and for a latent or text-conditioned one
    (its data set's images are pixels with class labels, not latents with prompts)."""
    model = meta.get("model") or {}
    latent_or_text = bool(model.get("latent")) or model.get("conditioning") == "text"
    if meta.get("data") and not latent_or_text:
        return
    need = [flag for on, flag in ((cfg.adversarial, "--no-adversarial"), (cfg.priors()[0] > 0, "--beta-fwd 0"),
                                  (bool(cfg.val_every), "--val-every 0")) if on]
    if need:
        why = ("is a latent or text-conditioned model: its data set holds pixel images with class labels, not "
               "latents with prompts" if meta.get("data") else "comes with no data set")
        raise ValueError(f"distill: the teacher {cfg.teacher!r} {why}, so there are no real "
                         f"images for the discriminator, forward states or validation; pass {' '.join(need)}")


def save_model(model: Denoiser, path: str, meta: dict, dtype: torch.dtype = torch.float32) -> None:
    """``flashcore.models.save_pretrained`` for flashcore's own models; a model from diffusers
    is written as a FlashcorePipeline folder (model_index.json, scheduler/ with the
    FlashcoreScheduler config holding ``meta``'s plan, the network in safetensors, the
    teacher's text encoder, tokenizer and VAE) plus ``flashcore.json`` (``meta``: the
    run's record), replaced whole (``write_dir``)."""
    from .checkpoint import portable_path, write_dir, write_json
    from .models import save_pretrained
    if not isinstance(model, ForeignDenoiser):
        return save_pretrained(model, path, meta, dtype)
    import copy

    from .pipeline import FlashcorePipeline
    from .scheduler import FlashcoreScheduler, scheduler_config
    net = model.net if dtype == torch.float32 else copy.deepcopy(model.net).to(dtype)
    sched = FlashcoreScheduler(**scheduler_config(ScheduleConfig(**meta["schedule"]), model.cfg.prediction_type,
                                                  steps=meta.get("steps"), grid=meta.get("grid"),
                                                  noise_correction=meta.get("noise_correction", True)))
    parts = {("transformer" if model.cfg.arch == "DiTTransformer2DModel" else "unet"): net}
    parts.update({n: getattr(model.frozen, n) for n in ("text_encoder", "tokenizer", "vae")
                  if getattr(model.frozen, n, None) is not None})
    null = model.null_label if model.cfg.conditioning == "class" else None
    pipe = FlashcorePipeline(scheduler=sched, guidance_scale=float(meta.get("guidance") or 1.0),
                             null_class_label=null, **parts)
    # the prompt bank it was distilled on: what flashcore's loader conditions it on unless told otherwise
    record = {**{k: v for k, v in meta.items() if k != "source"}, "model": asdict(model.cfg),
              "prompts": getattr(model.frozen, "prompts", None)}

    def write(d: str) -> None:
        pipe.save_pretrained(d, safe_serialization=True)
        for root, _, files in os.walk(d):         # diffusers leaves some files 0600; checkpoints are shared
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
            # a component loaded from a folder records it (_name_or_path): as a shipped file does, never
            # as this machine's absolute path
            cfg_file = os.path.join(root, "config.json")
            if "config.json" in files and root != d:
                c = read_json(cfg_file)
                if isinstance(c, dict) and isinstance(c.get("_name_or_path"), str) and os.path.isabs(c["_name_or_path"]):
                    c["_name_or_path"] = portable_path(c["_name_or_path"], path)
                    write_json(cfg_file, c)
        write_json(os.path.join(d, "flashcore.json"), record)
    write_dir(path, write)
