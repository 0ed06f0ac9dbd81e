"""A text-to-image latent teacher for the captioned digits, trained here from nothing:
``flashcore train-vae`` (an ``AutoencoderKL``) and then ``flashcore train-t2i-teacher``
(a ``UNet2DConditionModel`` and a CLIP text encoder in that VAE's latent space). The
teacher is written as a FlashcorePipeline folder, so ``distill --teacher``, ``generate``,
``eval`` and diffusers' ``DiffusionPipeline.from_pretrained`` take it as they take any
pipeline brought from diffusers (docs/text_to_image.md).

VAE (Kingma & Welling 2014; the KL-regularised autoencoder of latent diffusion, Rombach
et al. 2022), on the train split's images x in [-1, 1]:

    mu, logvar = E(x);  z = mu + exp(logvar / 2) n,  n ~ N(0, I);  x' = D(z)
    loss = mean |x' - x| + kl_weight * mean(0.5 (mu^2 + exp(logvar) - 1 - logvar))

and at export a latent scale as latent diffusion sets one: ``scaling_factor = 1 / std(mu)``,
the posterior means over the train split (latent diffusion takes the std of sampled
latents; with the small KL weight the posterior std is small beside the means), so the
diffusion model sees latents of about unit variance.

Teacher: the class teacher's objective (train/teacher.py) in latent space with a prompt
in place of the label. Each image gets a caption of its digit in one of the trained
phrasings (``flashcore.data.caption_bank``), drawn afresh every step; with probability
``p_uncond`` the empty prompt, the null condition of classifier-free guidance:

    z0 = scaling_factor * (mu + exp(logvar / 2) n)        (mu, logvar of the frozen VAE)
    loss = mean((unet(a_t z0 + s_t eps, t, text_encoder(prompt)) - target)^2)

The text encoder is a ``CLIPTextModel`` trained from random initialisation together with
the UNet (nothing can be downloaded here, so there is no pretrained one), on a character
tokenizer: a ``CLIPTokenizer`` whose vocabulary is single characters and no merges.
Trained rather than frozen: a random encoder has no reason to map two wordings of a digit
near each other, and the diffusion loss is what teaches it to; the held-out phrasings
measure how far that carries. After the teacher's training it is frozen: students keep it.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field

import torch

from flashcore import checkpoint as ck
from flashcore import data as fdata
from flashcore.images import grid, save_png
from flashcore.schedule import NoiseSchedule, ScheduleConfig
from flashcore.validation import COUNT, DECAY, GUIDANCE, LR, SEED, Range, check_bool, check_choice, \
    check_fields, check_str

from . import common

# the tokenizer's characters: every one a caption of flashcore.data.PHRASINGS uses, and the rest of
# a-z 0-9 so that a new wording is spelled in known tokens (anything else is CLIP's unknown token)
TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.'-"


def char_tokenizer(max_length: int):
    """A CLIPTokenizer over single characters (no BPE merges): ``<|startoftext|>``, the
    characters of each word (the last one as ``c</w>``), ``<|endoftext|>``, padded with
    ``<|endoftext|>`` to ``max_length``."""
    from transformers import CLIPTokenizer
    vocab = {c: i for i, c in enumerate(TOKEN_CHARS)}
    vocab.update({c + "</w>": len(TOKEN_CHARS) + i for i, c in enumerate(TOKEN_CHARS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def longest_caption_tokens(tok) -> int:
    """Tokens of the longest caption of any phrasing, start and end tokens included."""
    bank = fdata.caption_bank(False) + fdata.caption_bank(True)
    return max(len(tok(p).input_ids) for p in bank)


# ---- the VAE -------------------------------------------------------------------------------------

@dataclass
class VaeConfig:
    data: str = "mnist"
    steps: int = 2500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-4        # against the mean absolute pixel error; small: a sharp decoder first
    weight_decay: float = 0.01     # AdamW's (torch's default, which the shipped VAE trained with)
    latent_channels: int = 4
    width: int = 32                # block_out_channels (w, 2w, 2w): 28x28 -> 7x7 latents
    checkpoint_every: int = 500
    seed: int = 0
    bf16: bool = True
    threads: int = 0

    def __post_init__(self):
        check_fields(self, VAE_RANGES, "train-vae")
        check_str("train-vae", "data", self.data)
        check_bool("train-vae", self, ("bf16",))
        if self.width % min(16, self.width):
            raise ValueError(f"train-vae: width must be a multiple of 16 (group norm) or below 16; got {self.width}")


VAE_RANGES = {
    "steps": COUNT, "batch_size": COUNT, "lr": LR, "warmup": Range(int, 0, 10 ** 9),
    "kl_weight": Range(float, 0, 1), "weight_decay": Range(float, 0, 10), "latent_channels": Range(int, 1, 64), "width": Range(int, 8, 1024),
    "checkpoint_every": COUNT, "seed": SEED, "threads": Range(int, 0, 4096),
}


def build_vae(cfg: VaeConfig, channels: int, size: int):
    from diffusers import AutoencoderKL
    w = cfg.width
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=cfg.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(w, 2 * w, 2 * w), layers_per_block=1, norm_num_groups=min(16, w),
                         sample_size=size)


@torch.no_grad()
def encode_moments(vae, x: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, logvar) of the VAE's posterior for every image of ``x``, in float32 on the CPU."""
    mus, logvars = [], []
    for i in range(0, len(x), batch):
        d = vae.encode(x[i:i + batch].to(vae.dtype)).latent_dist
        mus.append(d.mean.float())
        logvars.append(d.logvar.float())
    return torch.cat(mus), torch.cat(logvars)


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Images in [-1, 1] (unclamped) of latents ``z`` in the diffusion model's scale."""
    return torch.cat([vae.decode(z[i:i + batch].to(vae.dtype) / vae.config.scaling_factor).sample.float()
                      for i in range(0, len(z), batch)])


def _reconstruction_figures(vae, ds) -> dict:
    """The VAE's reconstructions of the eval split (never trained on): mean absolute pixel
    error, and FD in the first headline feature space against the eval split itself (what
    a latent model's samples cannot beat), next to the floor of the train split's images."""
    from flashcore.evaluate import HEADLINE_FEATURES
    from flashcore.metrics import features_and_logits, frechet_distance, load_classifier, user_images
    x_ev, _ = fdata.split(ds, "eval")
    x_tr, _ = fdata.split(ds, "train")
    mu, _ = encode_moments(vae, x_ev)
    rec = decode_latents(vae, mu * vae.config.scaling_factor)
    out = {"eval_l1": float((rec.clamp(-1, 1) - x_ev).abs().mean())}
    if ds.name == "mnist" and os.path.isdir(HEADLINE_FEATURES[0]):
        clf, _ = load_classifier(HEADLINE_FEATURES[0])
        f_ref, _ = features_and_logits(clf, user_images(x_ev))
        f_rec, _ = features_and_logits(clf, user_images(rec))
        pick = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))[:len(x_ev)]
        f_flo, _ = features_and_logits(clf, user_images(x_tr[pick]))
        out.update({"space": os.path.basename(HEADLINE_FEATURES[0]), "eval_fd": frechet_distance(f_rec, f_ref),
                    "fd_floor": frechet_distance(f_flo, f_ref)})
    return out


def export_vae(run_dir: str, vae, cfg: VaeConfig, step: int, x_train: torch.Tensor, ds) -> str:
    """The VAE with its latent scale as a diffusers model folder (safetensors) plus
    ``flashcore.json`` (its training config and reconstruction figures)."""
    out = os.path.join(run_dir, "vae")
    vae = copy.deepcopy(vae).float().eval()
    mu, _ = encode_moments(vae, x_train)
    vae.register_to_config(scaling_factor=float(1.0 / mu.std()))
    record = {"kind": "vae", "data": cfg.data, "train_steps": step, "train_config": dataclasses.asdict(cfg),
              "reconstruction": _reconstruction_figures(vae, ds)}

    def write(d: str) -> None:
        vae.save_pretrained(d, safe_serialization=True)
        ck.write_json(os.path.join(d, "flashcore.json"), record)
    ck.write_dir(out, write)
    return out


def train_vae(cfg: VaeConfig, run_dir: str, resume: bool = False, progress: bool = True,
              max_steps_this_call: int | None = None) -> str:
    """Train (or resume) the VAE in ``run_dir``; returns the exported folder (``run_dir/vae``)."""
    with common.run_folder(run_dir, resume=resume, what="train-vae"):
        return _train_vae(cfg, run_dir, resume, progress, max_steps_this_call)


def _train_vae(cfg: VaeConfig, run_dir: str, resume: bool, progress: bool, max_steps_this_call) -> str:
    cfg = common.start_config(cfg, VaeConfig, run_dir, resume, "train-vae")
    ds = fdata.load(cfg.data)
    x_train, _ = fdata.split(ds, "train")
    c, h, w = ds.shape
    if h % 4 or w % 4:
        raise ValueError(f"train-vae: the images must be a multiple of 4 on a side (two halvings); "
                         f"{cfg.data!r} has {h}x{w}")
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg, c, h).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume:
        step = common.load_state(run_dir, {"vae": vae}, {"opt": opt}, {"data": gen}, "VaeConfig")["step"]
    log = common.LossLog(run_dir, step if resume else None)
    log.set_header(["loss", "l1", "kl"])

    def checkpoint(s: int) -> None:
        common.save_state(run_dir, s, {"vae": vae}, {"opt": opt}, {"data": gen}, cfg)
        with torch.no_grad():                 # a picture: real images over their reconstructions
            x = x_train[::max(1, len(x_train) // 32)][:32]          # every class (the split is sorted)
            rec = vae.eval()(x).sample
            vae.train()
        save_png(grid(torch.cat([x, rec.clamp(-1, 1)]), nrow=16), os.path.join(run_dir, "samples",
                                                                            f"step_{s:06d}.png"), scale=2)

    def body(step: int) -> dict:
        x = x_train[torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)]
        n = torch.randn((cfg.batch_size, cfg.latent_channels, h // 4, w // 4), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            post = vae.encode(x).latent_dist
            mu, logvar = post.mean.float(), post.logvar.float()
            rec = vae.decode(mu + torch.exp(0.5 * logvar) * n).sample
        l1 = (rec.float() - x).abs().mean()
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
        loss = l1 + cfg.kl_weight * kl
        common.descend(loss, vae.parameters(), opt, step)
        return {"loss": loss.item(), "l1": l1.item(), "kl": kl.item()}

    common.run_steps("train-vae", cfg, run_dir, step, max_steps_this_call, progress, log, opt, body, checkpoint,
                     last=lambda s: export_vae(run_dir, vae, cfg, s, x_train, ds))
    return os.path.join(run_dir, "vae")


def load_vae(path: str):
    """A VAE folder that ``train-vae`` wrote (or any AutoencoderKL folder), in float32, frozen."""
    from diffusers import AutoencoderKL
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ck.CheckpointError(f"checkpoint: {path}: not a VAE folder (config.json is missing); "
                                 "train one with flashcore train-vae")
    cfg = ck.read_json(os.path.join(path, "config.json"))
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "AutoencoderKL":
        raise ck.CheckpointError(f"checkpoint: {path}: not an AutoencoderKL folder")
    try:
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ck.CheckpointError(f"checkpoint: {path}: cannot load the VAE ({' '.join(str(e).split())[:300]})") \
            from None
    return vae.float().eval().requires_grad_(False)


# ---- the text-to-image teacher ----------------------------------------------------------------------

@dataclass
class T2ITeacherConfig:
    vae: str = ""                  # the folder train-vae wrote
    data: str = "mnist"
    steps: int = 4000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01     # AdamW's (torch's default, which the shipped teacher trained with)
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    guidance: float = 2.0          # saved with the pipeline: its default CFG scale
    width: int = 64                # UNet block_out_channels (w, 2w)
    text_width: int = 64           # the text encoder's hidden size (= the UNet's cross_attention_dim)
    text_layers: int = 2
    prediction_type: str = "epsilon"
    sample_steps: int = 25
    checkpoint_every: int = 500
    seed: int = 0
    bf16: bool = True
    threads: int = 0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        check_fields(self, T2I_RANGES, "train-t2i-teacher")
        check_str("train-t2i-teacher", "vae", self.vae)
        check_str("train-t2i-teacher", "data", self.data)
        check_bool("train-t2i-teacher", self, ("bf16",))
        check_choice("train-t2i-teacher", "prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        if self.width % 16 or self.text_width % 4:
            raise ValueError(f"train-t2i-teacher: width must be a multiple of 16 (group norm) and text_width of 4 "
                             f"(attention heads); got {self.width} and {self.text_width}")
        if not isinstance(self.schedule, ScheduleConfig):
            self.schedule = ScheduleConfig(**self.schedule)


T2I_RANGES = {
    "steps": COUNT, "batch_size": COUNT, "lr": LR, "warmup": Range(int, 0, 10 ** 9), "ema_decay": DECAY,
    "weight_decay": Range(float, 0, 10), "p_uncond": Range(float, 0, 1, hi_open=True), "guidance": GUIDANCE, "width": Range(int, 16, 1024),
    "text_width": Range(int, 8, 1024), "text_layers": Range(int, 1, 24), "sample_steps": Range(int, 1, 1000),
    "checkpoint_every": COUNT, "seed": SEED, "threads": Range(int, 0, 4096),
}


class TextToImage(torch.nn.Module):
    """What the teacher's training updates: the UNet and the text encoder."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


def build_t2i(cfg: T2ITeacherConfig, tok, latent_channels: int, latent_size: int, max_length: int) -> TextToImage:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from flashcore.models.attention_processor import FlashcoreAttnProcessor
    w = cfg.width
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=(w, 2 * w), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cfg.text_width,
        attention_head_dim=4, norm_num_groups=min(16, w))      # diffusers' attention_head_dim: the head count
    unet.set_attn_processor(FlashcoreAttnProcessor())
    vocab = tok.get_vocab()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=max_length,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    return TextToImage(unet, te)


def _pipeline_model(m: TextToImage, tok, vae, cfg: T2ITeacherConfig, bank: list[str]):
    """The teacher as flashcore's ForeignDenoiser (prompt bank ``bank``), ready for save_model."""
    from flashcore.foreign import ForeignConfig, ForeignDenoiser, _Frozen, encode_prompts
    unet, te = copy.deepcopy(m.unet).float().eval(), copy.deepcopy(m.text_encoder).float().eval()
    embeds = encode_prompts(te, tok, bank + [""])
    fc = ForeignConfig(arch="UNet2DConditionModel", sample_size=int(unet.config.sample_size),
                       channels=int(unet.config.in_channels), num_classes=len(bank),
                       prediction_type=cfg.prediction_type, conditioning="text", latent=True)
    return ForeignDenoiser(fc, unet, NoiseSchedule(cfg.schedule), embeds,
                           _Frozen(text_encoder=te, tokenizer=tok, vae=vae, prompts=list(bank)),
                           null_label=len(bank)).eval()


def export_t2i(run_dir: str, ema: TextToImage, tok, vae, cfg: T2ITeacherConfig, step: int) -> str:
    from flashcore.foreign import save_model
    out = os.path.join(run_dir, "teacher")
    model = _pipeline_model(ema, tok, vae, cfg, fdata.caption_bank())
    train_config = {**dataclasses.asdict(cfg), "vae": ck.portable_path(cfg.vae, out)}     # no machine's paths
    save_model(model, out, {"kind": "teacher", "guidance": cfg.guidance, "data": cfg.data,
                            "schedule": dataclasses.asdict(cfg.schedule), "train_steps": step,
                            "train_config": train_config}, dtype=torch.float16)
    return out


def sample_grid_t2i(ema: TextToImage, tok, vae, cfg: T2ITeacherConfig, path: str) -> None:
    """8 samples of each digit, in the first trained phrasing, a row a digit."""
    from flashcore.sampler import sample
    bank = fdata.caption_bank()
    per_digit = len(bank) // 10
    model = _pipeline_model(ema, tok, vae, cfg, bank)
    labels = (torch.arange(10) * per_digit).repeat_interleave(8)
    c = model.cfg
    x = sample(model, labels, schedule=model.schedule, steps=cfg.sample_steps,
               shape=(c.channels, c.sample_size, c.sample_size), guidance=cfg.guidance,
               generator=torch.Generator().manual_seed(1234))
    save_png(grid(decode_latents(vae, x).clamp(-1, 1), nrow=8), path, scale=2)


def train_t2i_teacher(cfg: T2ITeacherConfig, run_dir: str, resume: bool = False, progress: bool = True,
                      max_steps_this_call: int | None = None) -> str:
    """Train (or resume) the text-to-image teacher in ``run_dir``; returns the pipeline folder."""
    with common.run_folder(run_dir, resume=resume, what="train-t2i-teacher"):
        return _train_t2i(cfg, run_dir, resume, progress, max_steps_this_call)


def _train_t2i(cfg: T2ITeacherConfig, run_dir: str, resume: bool, progress: bool, max_steps_this_call) -> str:
    cfg = common.start_config(cfg, T2ITeacherConfig, run_dir, resume, "train-t2i-teacher")
    vae = load_vae(cfg.vae)
    ds = fdata.load(cfg.data)
    if ds.shape[0] != vae.config.in_channels:
        raise ValueError(f"train-t2i-teacher: the VAE takes {vae.config.in_channels} channels, {cfg.data!r} "
                         f"has {ds.shape[0]}")
    if ds.classes != [str(i) for i in range(10)]:
        raise ValueError(f"train-t2i-teacher: captions name digits 0-9; {cfg.data!r} has classes {ds.classes[:12]}")
    x_train, y_train = fdata.split(ds, "train")
    bank = fdata.caption_bank()                 # digit d's captions are bank[d * per_digit: (d + 1) * per_digit]
    per_digit = len(bank) // len(fdata.DIGIT_WORDS)
    tok = char_tokenizer(64)
    max_length = longest_caption_tokens(tok)
    tok = char_tokenizer(max_length)
    ids = tok(bank + [""], padding="max_length", max_length=max_length, truncation=True,
              return_tensors="pt").input_ids                                   # (K + 1, L); row K: null
    null = len(bank)
    mu, logvar = encode_moments(vae, x_train)
    scale = float(vae.config.scaling_factor)
    sched = NoiseSchedule(cfg.schedule)

    torch.manual_seed(cfg.seed)
    model = build_t2i(cfg, tok, mu.shape[1], mu.shape[2], max_length).train()
    ema = common.make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    # the latent space the run trains in: a resumed run must find the same VAE weights and scale
    vae_id = {"vae_sha256": ck.sha256(os.path.join(cfg.vae, "diffusion_pytorch_model.safetensors")),
              "scaling_factor": scale}
    if resume:
        step = common.load_state(run_dir, {"model": model, "ema": ema}, {"opt": opt}, {"data": gen},
                                 "T2ITeacherConfig")["step"]
        was = common.saved_extra(run_dir)
        if was and was != vae_id:
            raise ValueError(f"train-t2i-teacher: the VAE in {cfg.vae!r} is not the one the run in {run_dir!r} "
                             f"started with (weights or scaling factor changed); a resumed run must keep its "
                             f"latent space")
    log = common.LossLog(run_dir, step if resume else None)

    def target(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cfg.prediction_type == "epsilon":                    # as Denoiser.target
            return eps
        a, s = sched.gather(t)
        return a * eps - s * z0

    def checkpoint(s: int) -> None:
        common.save_state(run_dir, s, {"model": model, "ema": ema}, {"opt": opt}, {"data": gen}, cfg, vae_id)
        export_t2i(run_dir, ema, tok, vae, cfg, s)
        sample_grid_t2i(ema, tok, vae, cfg, os.path.join(run_dir, "samples", f"step_{s:06d}.png"))

    def body(step: int) -> dict:
        b = cfg.batch_size
        idx = torch.randint(0, len(x_train), (b,), generator=gen)
        n = torch.randn((b,) + mu.shape[1:], generator=gen)
        z0 = scale * (mu[idx] + torch.exp(0.5 * logvar[idx]) * n)
        phr = torch.randint(0, per_digit, (b,), generator=gen)
        cond = y_train[idx] * per_digit + phr
        cond = torch.where(torch.rand(b, generator=gen) < cfg.p_uncond, torch.full_like(cond, null), cond)
        t = torch.randint(0, sched.T + 1, (b,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        z_t = sched.add_noise(z0, eps, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            states = model.text_encoder(ids)[0]                            # the bank once a step
            pred = model.unet(z_t, t, encoder_hidden_states=states[cond]).sample
        loss = (pred.float() - target(z0, eps, t)).square().mean()
        common.descend(loss, model.parameters(), opt, step)
        common.ema_update(ema, model, cfg.ema_decay if step >= cfg.warmup else 0.0)
        return {"loss": loss.item()}

    common.run_steps("train-t2i-teacher", cfg, run_dir, step, max_steps_this_call, progress, log, opt, body,
                     checkpoint)
    return os.path.join(run_dir, "teacher")
