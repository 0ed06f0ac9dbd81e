"""flashcore's models, and the students it distils from diffusers models, as diffusers pipelines.

A pipeline folder (what ``flashcore.models.save_pretrained`` writes):

    model_index.json            FlashcorePipeline: its components and default guidance scale
    scheduler/scheduler_config.json   FlashcoreScheduler: schedule, prediction type, a student's plan
    unet/ | transformer/        the diffusers network (config.json, diffusion_pytorch_model.safetensors)
    config.json                 flashcore's own config (kind, model, schedule, ...): flashcore's loaders

``FlashcorePipeline.from_pretrained(path)`` (or ``DiffusionPipeline.from_pretrained``
once this module is imported) loads it, and one call samples:

    pipe(class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(0)).images

Labels ``0..K-1`` are classes; label ``K`` (the network's last class embedding,
or ``null_class_label`` where model_index.json gives it: a diffusers DiT's extra
embedding) is the null condition of classifier-free guidance, which runs as one
batched call of 2B samples when the guidance scale is not 1. A text model
(``UNet2DConditionModel`` with ``text_encoder`` and ``tokenizer``) takes prompts
instead, with the empty prompt as the null condition; an unconditional
``UNet2DModel`` takes ``batch_size``; with a ``vae`` the network samples latents,
decoded before they are returned (``flashcore/foreign.py`` reads such folders):

    pipe("a handwritten seven", num_inference_steps=3).images

Why not diffusers' own pipelines: DDPMPipeline passes no class labels, and
DiTPipeline decodes latents with a VAE and splits a learned variance off the
transformer's output; flashcore's models are pixel-space with one output per
channel. Why diffusers' namespace is extended: ``DiffusionPipeline.from_pretrained``
looks the ``_class_name`` of model_index.json up in the diffusers package only
(a list there names a ``.py`` file inside the folder, loaded only with
``trust_remote_code``), and it takes a component from a package outside
diffusers only once the caller has imported it (``flashcore.scheduler``).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from .checkpoint import CheckpointError, check_json, read_json
from .images import to_uint8
from .scheduler import FlashcoreScheduler

# flashcore's arch -> the pipeline component that holds the network (diffusers' usual names)
NETWORK_COMPONENT = {"unet": "unet", "dit": "transformer"}
COMPONENT_CONFIG = {"scheduler": "scheduler_config.json", "unet": "config.json", "transformer": "config.json"}
# the components a text or latent model adds (each optional; a folder that lists one must hold it)
EXTRA_COMPONENTS = ("text_encoder", "tokenizer", "vae")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# steps when neither the call nor the scheduler's config gives any (a teacher's folder)
DEFAULT_STEPS = 50
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _listed(entry) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def check_pipeline_folder(path: str) -> str:
    """The network component ("unet" or "transformer") of the pipeline folder ``path``,
    after checking that model_index.json names it and the scheduler and that their
    files are there; anything missing is one CheckpointError line."""
    index_file = os.path.join(path, "model_index.json")
    index = read_json(index_file)
    check_json(index, {"_class_name": "str"}, index_file)
    nets = [n for n in ("unet", "transformer") if _listed(index.get(n))]
    if len(nets) != 1:
        raise CheckpointError(f"checkpoint: {index_file}: a flashcore pipeline has one network, 'unet' or "
                              f"'transformer'; this one lists {nets or 'none'}")
    if not _listed(index.get("scheduler")):
        raise CheckpointError(f"checkpoint: {index_file}: the pipeline's 'scheduler' component is missing")
    for name in ("scheduler", nets[0]):
        f = os.path.join(name, COMPONENT_CONFIG[name])
        if not os.path.isfile(os.path.join(path, f)):
            raise CheckpointError(f"checkpoint: {path}: the pipeline's {name!r} component is missing ({f} not found)")
    f = os.path.join(nets[0], WEIGHTS_NAME)
    if not os.path.isfile(os.path.join(path, f)):
        raise CheckpointError(f"checkpoint: {path}: the pipeline's {nets[0]!r} weights are missing ({f} not found)")
    for name in EXTRA_COMPONENTS:
        if _listed(index.get(name)) and not os.path.isdir(os.path.join(path, name)):
            raise CheckpointError(f"checkpoint: {path}: the pipeline's {name!r} component is missing "
                                  f"({name}/ not found)")
    return nets[0]


class FlashcorePipeline(DiffusionPipeline):
    """Sampling with a flashcore teacher or student.

    Components: ``scheduler`` (a FlashcoreScheduler, or any diffusers scheduler
    that can take its config) and exactly one of ``unet`` (UNet2DModel with
    ``num_class_embeds = K + 1`` or none, or UNet2DConditionModel) and
    ``transformer`` (DiTTransformer2DModel); for a text model ``text_encoder`` and
    ``tokenizer``; for a latent model ``vae``. ``guidance_scale`` is the default CFG
    scale (a distilled student's is 1: one network call a step); ``null_class_label``
    the null class where it is not the last embedding."""

    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "text_encoder", "tokenizer", "vae"]

    def __init__(self, scheduler: FlashcoreScheduler, unet: UNet2DModel | UNet2DConditionModel | None = None,
                 transformer: DiTTransformer2DModel | None = None, guidance_scale: float = 1.0,
                 text_encoder=None, tokenizer=None, vae=None, null_class_label: int | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("FlashcorePipeline: pass exactly one network, unet or transformer")
        if isinstance(unet, UNet2DConditionModel) and (text_encoder is None or tokenizer is None):
            raise ValueError("FlashcorePipeline: a UNet2DConditionModel needs a text_encoder and a tokenizer")
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae)
        self.register_to_config(guidance_scale=float(guidance_scale),
                                null_class_label=None if null_class_label is None else int(null_class_label))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, after ``check_pipeline_folder`` on a local folder; safetensors only."""
        if os.path.isdir(pretrained_model_name_or_path):
            check_pipeline_folder(pretrained_model_name_or_path)
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def network(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.transformer

    @property
    def conditioning(self) -> str:
        """"text", "none" (an unconditional UNet2DModel) or "class"."""
        if isinstance(self.unet, UNet2DConditionModel):
            return "text"
        return "none" if self.unet is not None and self.unet.config.num_class_embeds is None else "class"

    @property
    def null_label(self) -> int:
        """The label of the null condition: ``null_class_label``, else the last class embedding."""
        if getattr(self.config, "null_class_label", None) is not None:
            return int(self.config.null_class_label)
        c = self.network.config
        return int(c.num_class_embeds if self.unet is not None else c.num_embeds_ada_norm) - 1

    def encode_prompt(self, prompts: list[str], device) -> torch.Tensor:
        """(B, L, D) text-encoder states of ``prompts`` (``flashcore.foreign.encode_prompts``)."""
        from .foreign import encode_prompts
        return encode_prompts(self.text_encoder, self.tokenizer, prompts).to(device)

    def _image_shape(self) -> tuple[int, int, int]:
        c = self.network.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
        h, w = (size, size) if isinstance(size, int) else size
        return int(c.in_channels), int(h), int(w)

    def _set_grid(self, num_inference_steps, timesteps, device) -> None:
        sched = self.scheduler
        if timesteps is not None:
            sched.set_timesteps(timesteps=timesteps, device=device)
        elif num_inference_steps is not None:
            sched.set_timesteps(num_inference_steps, device=device)
        elif getattr(sched, "has_default_plan", False):
            sched.set_timesteps(device=device)          # a student's own steps and grid
        else:
            sched.set_timesteps(DEFAULT_STEPS, device=device)

    def _predict(self, x: torch.Tensor, t, labels: torch.Tensor, guidance: float) -> torch.Tensor:
        """The network's output (eps, v or x0) at ``t``, CFG-combined; float32. ``labels``:
        class labels, or for a text model (B, L, D) prompt states followed by the null's."""
        net, cond = self.network, self.conditioning
        if cond == "text":
            labels, null = labels
            if guidance != 1.0:
                labels = torch.cat([labels, null])
        if guidance != 1.0:
            x = torch.cat([x, x])
            if cond == "class":
                labels = torch.cat([labels, torch.full_like(labels, self.null_label)])
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        x_in = self.scheduler.scale_model_input(x, t).to(net.dtype)
        if cond == "text":
            out = net(x_in, tt, encoder_hidden_states=labels.to(net.dtype)).sample
        elif cond == "none":
            out = net(x_in, tt).sample
        elif self.unet is not None:
            out = net(x_in, tt, class_labels=labels).sample
        else:
            out = net(x_in, timestep=tt, class_labels=labels).sample
            if out.shape[1] == 2 * x.shape[1]:          # a learned variance: the mean's half is the prediction
                out = out[:, :x.shape[1]]
        out = out.float()
        if guidance == 1.0:
            return out
        # linear in the output, so combining v or x0 predictions equals combining their eps
        cond, uncond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    @staticmethod
    def _noise(shape, generator) -> torch.Tensor:
        """x_T drawn on the generator's device (the CPU without one), as flashcore's sampler draws it."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"FlashcorePipeline: {len(generator)} generators for {shape[0]} images")
            return torch.cat([torch.randn((1,) + tuple(shape[1:]), generator=g, device=g.device).cpu()
                              for g in generator])
        dev = generator.device if generator is not None else "cpu"
        return torch.randn(shape, generator=generator, device=dev)

    def _conditions(self, class_labels, prompt, batch_size, device):
        """(the per-image conditions _predict takes, the batch size), checked."""
        cond = self.conditioning
        if cond == "text":
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("FlashcorePipeline: this is a text model; pass prompt (a string or a list of them)")
            if class_labels is not None:
                raise ValueError("FlashcorePipeline: a text model takes prompts, not class_labels")
            emb = self.encode_prompt(prompts + [""], device)
            return (emb[:-1], emb[-1:].expand(len(prompts), -1, -1)), len(prompts)
        if prompt is not None:
            raise ValueError(f"FlashcorePipeline: this {type(self.network).__name__} takes no prompt "
                             f"({'class_labels' if cond == 'class' else 'batch_size'} instead)")
        if cond == "none":
            if class_labels is not None:
                raise ValueError("FlashcorePipeline: an unconditional model takes batch_size, not class_labels")
            n = 1 if batch_size is None else int(batch_size)
            if n < 1:
                raise ValueError(f"FlashcorePipeline: batch_size must be at least 1, got {batch_size!r}")
            return torch.zeros(n, dtype=torch.long, device=device), n
        if class_labels is None:
            raise ValueError("FlashcorePipeline: pass class_labels")
        labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels).flatten()
        if labels.numel() == 0 or labels.is_floating_point() or labels.is_complex() or \
                int(labels.min()) < 0 or int(labels.max()) >= self.null_label:
            raise ValueError(f"FlashcorePipeline: class_labels must be integers in 0..{self.null_label - 1}, "
                             f"got {labels.tolist()!r}"[:200])
        return labels.to(device=device, dtype=torch.long), labels.numel()

    @torch.no_grad()
    def __call__(self, class_labels=None, num_inference_steps: int | None = None, timesteps: list[int] | None = None,
                 guidance_scale: float | None = None, generator=None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, prompt: str | list[str] | None = None,
                 batch_size: int | None = None):
        """Sample one image per label or prompt.

        Args:
            class_labels: an int, a list of ints or a tensor of labels in ``0..K-1``; for a text
                model the first argument may be the prompt(s) instead.
            num_inference_steps: steps on the trailing grid (default: the scheduler's own
                plan, a student's; else 50).
            timesteps: an explicit descending grid instead (e.g. ``[999]`` for one step).
            guidance_scale: CFG scale (default: the pipeline's ``guidance_scale``); 1 skips the null pass.
            generator: a ``torch.Generator`` (or one per image) for x_T.
            latents: x_T itself, (B, C, H, W); overrides ``generator``.
            output_type: "pil" (8-bit images, as ``flashcore generate`` writes them), "np"
                (B, H, W, C) floats in [0, 1], "pt" (B, C, H, W) in [0, 1], "latent" (x0 in
                the network's space, unclamped: latents for a model with a vae).
            prompt: a text model's prompt or prompts (the null condition is the empty prompt).
            batch_size: how many images an unconditional model draws (default 1).

        Returns ``ImagePipelineOutput(images=...)``, or ``(images,)`` with ``return_dict=False``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"FlashcorePipeline: output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if prompt is None and self.conditioning == "text" and (
                isinstance(class_labels, str) or (isinstance(class_labels, (list, tuple)) and class_labels
                                                  and all(isinstance(p, str) for p in class_labels))):
            class_labels, prompt = None, class_labels
        guidance = float(self.config.guidance_scale if guidance_scale is None else guidance_scale)
        if guidance != 1.0 and self.conditioning == "none":
            raise ValueError("FlashcorePipeline: an unconditional model has no guidance; guidance_scale must be 1")
        device = self._execution_device
        labels, n = self._conditions(class_labels, prompt, batch_size, device)
        shape = (n,) + self._image_shape()
        if latents is None:
            latents = self._noise(shape, generator)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"FlashcorePipeline: latents must have shape {shape}, got {tuple(latents.shape)}")
        self._set_grid(num_inference_steps, timesteps, device)
        x = latents.to(device=device, dtype=torch.float32) * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._predict(x, t, labels, guidance)
            x = self.scheduler.step(out, t, x).prev_sample
        if self.vae is not None and output_type != "latent":
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
        self.maybe_free_model_hooks()
        images = _to_output(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _to_output(x: torch.Tensor, output_type: str):
    if output_type == "latent":
        return x
    if output_type == "pil":
        from PIL import Image
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(x)]
    img = ((x.float().clamp(-1, 1) + 1) / 2)
    return img if output_type == "pt" else img.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def _register_with_diffusers() -> None:
    """Let ``DiffusionPipeline.from_pretrained`` resolve model_index.json's
    ``"_class_name": "FlashcorePipeline"``: it looks the name up in the diffusers package."""
    import diffusers
    if getattr(diffusers, FlashcorePipeline.__name__, None) is None:
        setattr(diffusers, FlashcorePipeline.__name__, FlashcorePipeline)


_register_with_diffusers()
