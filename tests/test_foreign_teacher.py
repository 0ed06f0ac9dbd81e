"""Teachers brought from diffusers (flashcore/foreign.py): tiny random pipelines and
model folders built here, read into the Denoiser interface exactly as diffusers runs
them, distilled for 2 iterations, and the students loaded back with
``DiffusionPipeline.from_pretrained``; unsupported folders are one error line."""
import json
import os

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DiTPipeline,
                       DiTTransformer2DModel, EulerDiscreteScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel, UNet2DModel)

import flashcore.pipeline  # noqa: F401  (lets diffusers resolve FlashcorePipeline)
from flashcore.checkpoint import CheckpointError
from flashcore.foreign import ForeignDenoiser, load_model, read_scheduler
from flashcore.schedule import NoiseSchedule

from _fixtures import cli_run, offline  # noqa: F401  (offline: fixture)

PROMPTS = ["a handwritten seven", "the digit two", "zero"]


pytestmark = pytest.mark.usefixtures("offline")     # no test here may reach the network


def _jitter(*nets):
    """Move every weight off its initial value (diffusers zero-initialises some output layers)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _vae():
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16, layers_per_block=1)


def _unet(num_class_embeds=11):
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds)


def unet_pipeline(path, num_class_embeds=11, scheduler=None) -> str:
    """A class-conditional (or unconditional) pixel UNet2DModel with epsilon prediction, DDPM's linear betas."""
    torch.manual_seed(0)
    unet = _unet(num_class_embeds)
    _jitter(unet)
    from diffusers import DDPMPipeline
    DDPMPipeline(unet=unet, scheduler=scheduler or DDPMScheduler()).save_pretrained(str(path))
    return str(path)


def dit_pipeline(path) -> str:
    """A latent DiT with a learned variance (2C outputs) and a VAE, as diffusers' DiT checkpoints are."""
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    vae = _vae()
    _jitter(dit, vae)
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2")) \
        .save_pretrained(str(path))
    return str(path)


def _tokenizer():
    from transformers import CLIPTokenizer
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=12)


def text_pipeline(path, prediction_type="v_prediction") -> str:
    """UNet2DConditionModel + CLIPTextModel + CLIPTokenizer + AutoencoderKL, v-prediction on a
    zero-terminal-SNR scaled-linear schedule (trailing spacing), as a StableDiffusionPipeline folder."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tok = _tokenizer()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=12,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = _vae()
    _jitter(unet, vae)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(str(path))
    return str(path)


# ---- the wrapper predicts what the diffusers model predicts --------------------------------------

def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_unet_pipeline_prediction_matches_diffusers(tmp_path):
    path = unet_pipeline(tmp_path / "p")
    model, meta = load_model(path, kinds=("teacher",))
    assert isinstance(model, ForeignDenoiser) and meta["kind"] == "teacher" and meta["data"] is None
    assert (model.cfg.num_classes, model.null_label, model.cfg.channels, model.cfg.sample_size) == (10, 10, 1, 8)
    ref = UNet2DModel.from_pretrained(os.path.join(path, "unet")).eval()
    x, t, y = _x((3, 1, 8, 8)), torch.tensor([999, 500, 3]), torch.tensor([0, 4, 10])
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        got = model(x, t, y)
    assert (got - want).abs().max() < 1e-5
    assert float(want.abs().mean()) > 1e-2           # a prediction that can differ


def test_dit_pipeline_prediction_matches_diffusers(tmp_path):
    """A DiT's null class is diffusers' extra embedding K = num_embeds_ada_norm (DiTPipeline's
    class_null); its learned variance, the second half of the channels, is dropped."""
    path = dit_pipeline(tmp_path / "p")
    model, _ = load_model(path)
    assert (model.cfg.num_classes, model.null_label, model.cfg.channels, model.cfg.latent) == (10, 10, 4, True)
    ref = DiTTransformer2DModel.from_pretrained(os.path.join(path, "transformer")).eval()
    x, t = _x((2, 4, 8, 8)), torch.tensor([999, 10])
    with torch.no_grad():
        eps_c, eps_u = model.eps_cfg(x, t, torch.tensor([3, 9]))
        want_c = ref(x, timestep=t, class_labels=torch.tensor([3, 9])).sample[:, :4]
        want_u = ref(x, timestep=t, class_labels=torch.tensor([10, 10])).sample[:, :4]
    assert (eps_c - want_c).abs().max() < 1e-5 and (eps_u - want_u).abs().max() < 1e-5
    img = model.decode(x)
    assert img.shape == (2, 3, 16, 16)


def test_text_pipeline_prediction_matches_diffusers(tmp_path):
    """v-prediction: forward returns eps = s_t x + a_t v from the UNet's v, with the prompt's
    CLIP states (the last index: the empty prompt)."""
    from transformers import CLIPTextModel, CLIPTokenizer
    path = text_pipeline(tmp_path / "p")
    model, meta = load_model(path, prompts=PROMPTS)
    assert model.cfg.conditioning == "text" and model.null_label == 3 and meta["prompts"] == PROMPTS
    unet = UNet2DConditionModel.from_pretrained(os.path.join(path, "unet")).eval()
    te = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder")).eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    sched = DDIMScheduler.from_pretrained(os.path.join(path, "scheduler"))
    ids = tok([PROMPTS[1], ""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    x, t = _x((2, 4, 8, 8)), torch.tensor([999, 400])
    with torch.no_grad():
        v = unet(x, t, encoder_hidden_states=te(ids)[0]).sample
        got = model(x, t, torch.tensor([1, 3]))
    ac = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    a = ac.sqrt().clamp_min(1e-3)                     # flashcore's a_t floor (zero terminal SNR: a_T = 0)
    want = ((1 - a ** 2).sqrt() * x + a * v).float()
    assert (got - want).abs().max() < 1e-5
    assert model.decode(x).shape == (2, 3, 16, 16)


def test_model_folder_with_sibling_scheduler(tmp_path):
    """A bare model folder reads its schedule from ../scheduler/ (or next to config.json)."""
    path = unet_pipeline(tmp_path / "p", scheduler=DDIMScheduler(prediction_type="v_prediction"))
    model, meta = load_model(os.path.join(path, "unet"))
    assert model.cfg.prediction_type == "v_prediction" and meta["schedule"]["kind"] == "linear"
    torch.manual_seed(0)
    alone = tmp_path / "alone"
    _unet(None).save_pretrained(str(alone))
    DDPMScheduler().save_pretrained(str(alone))       # scheduler_config.json next to config.json
    model, _ = load_model(str(alone))
    assert model.cfg.conditioning == "none" and model.cfg.num_classes == 1
    ref = UNet2DModel.from_pretrained(str(alone)).eval()
    x, t = _x((2, 1, 8, 8)), torch.tensor([5, 700])
    with torch.no_grad():
        assert (model(x, t, torch.zeros(2, dtype=torch.long)) - ref(x, t).sample).abs().max() < 1e-5


@pytest.mark.parametrize("sched", [
    DDPMScheduler(),
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    DDIMScheduler(beta_schedule="squaredcos_cap_v2"),
    DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    EulerDiscreteScheduler(beta_schedule="linear", beta_start=0.0002, beta_end=0.03, num_train_timesteps=500),
], ids=["ddpm-linear", "ddim-scaled", "ddim-cosine", "ddim-zsnr", "euler-linear-500"])
def test_schedule_from_scheduler_config(tmp_path, sched):
    """The betas are the scheduler's own, whatever defaults its class has."""
    sched.save_pretrained(str(tmp_path))
    sc, _ = read_scheduler(str(tmp_path / "scheduler_config.json"))
    ours = NoiseSchedule(sc).alphas_cumprod
    want = DDIMScheduler.from_config(sched.config).alphas_cumprod.double() \
        if isinstance(sched, EulerDiscreteScheduler) else sched.alphas_cumprod.double()
    assert len(ours) == len(want)
    # float32 tables in diffusers; Euler's zero-SNR keeps 2**-24 at T (not here)
    assert torch.allclose(ours, want, rtol=1e-5, atol=1e-7)


# ---- unsupported folders: one line that says what is supported ------------------------------------

def _edit(file, **kw):
    with open(file) as f:
        c = json.load(f)
    c.update(kw)
    with open(file, "w") as f:
        json.dump(c, f)


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unsupported_prediction_type(tmp_path):
    path = unet_pipeline(tmp_path / "p")
    _edit(os.path.join(path, "scheduler", "scheduler_config.json"), prediction_type="sample")
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert "prediction_type 'sample' is not supported; supported: epsilon, v_prediction" in _one_line(e)


def test_unknown_model_class(tmp_path):
    path = unet_pipeline(tmp_path / "p")
    _edit(os.path.join(path, "model_index.json"), unet=["diffusers", "UNet3DConditionModel"])
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = _one_line(e)
    assert "network class 'UNet3DConditionModel' is not supported" in msg and "DiTTransformer2DModel" in msg


@pytest.mark.parametrize("case", ["missing-vae", "no-scheduler", "unknown-scheduler", "no-prompts", "bad-beta"])
def test_broken_folders(tmp_path, case):
    if case in ("missing-vae", "no-prompts"):
        path = text_pipeline(tmp_path / "p")
    else:
        path = unet_pipeline(tmp_path / "p")
    want = {"missing-vae": "the pipeline's 'vae' component is missing",
            "no-scheduler": "a model folder needs its noise schedule",
            "unknown-scheduler": "scheduler 'FlowMatchEulerDiscreteScheduler' is not supported",
            "no-prompts": "a text-conditioned model needs prompts",
            "bad-beta": "beta_schedule 'sigmoid' is not supported"}[case]
    if case == "missing-vae":
        import shutil
        shutil.rmtree(os.path.join(path, "vae"))
    elif case == "no-scheduler":
        import shutil
        shutil.rmtree(os.path.join(path, "scheduler"))
        path = os.path.join(path, "unet")
    elif case == "unknown-scheduler":
        _edit(os.path.join(path, "scheduler", "scheduler_config.json"), _class_name="FlowMatchEulerDiscreteScheduler")
    elif case == "bad-beta":
        _edit(os.path.join(path, "scheduler", "scheduler_config.json"), beta_schedule="sigmoid")
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert want in _one_line(e)


# ---- distilling from a diffusers folder, the student back through diffusers -------------------------

BUILDERS = {"unet-epsilon": unet_pipeline, "text-v": text_pipeline, "dit-latent": dit_pipeline}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_distill_from_pipeline_and_load_student(tmp_path, kind):
    """2 iterations of Imagine Flash from the folder; the student is a pipeline folder that
    DiffusionPipeline.from_pretrained loads and samples in one call, as flashcore does."""
    from flashcore.train.distill import DistillConfig, distill
    teacher = BUILDERS[kind](tmp_path / "teacher")
    prompts = ""
    if kind == "text-v":
        prompts = str(tmp_path / "prompts.txt")
        with open(prompts, "w") as f:
            f.write("\n".join(PROMPTS) + "\n")
    cfg = DistillConfig(teacher=teacher, prompts=prompts, steps=2, iters=2, batch_size=2, adversarial=False,
                        val_every=0, checkpoint_every=2, guidance=1.5 if kind != "unet-epsilon" else None,
                        bf16=False, sample_every_checkpoint=kind == "dit-latent")
    out = distill(cfg, str(tmp_path / "run"), progress=False, device="cpu")
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "FlashcorePipeline" and index["scheduler"][1] == "FlashcoreScheduler"
    for part in ("text_encoder", "tokenizer", "vae"):
        assert (index.get(part, [None])[0] is not None) == (kind == "text-v" or (part == "vae" and kind == "dit-latent"))
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        sc = json.load(f)
    assert sc["timesteps"] == [999, 499] and sc["noise_correction"] is True
    pipe = DiffusionPipeline.from_pretrained(out)
    g = torch.Generator().manual_seed(0)
    if kind == "text-v":
        images = pipe("a handwritten seven", num_inference_steps=2, generator=g, output_type="np").images
        assert images.shape == (1, 16, 16, 3)
    elif kind == "dit-latent":
        images = pipe(class_labels=[1, 2], generator=g, output_type="np").images
        assert images.shape == (2, 16, 16, 3)
    else:
        images = pipe(class_labels=[0, 9], generator=g, output_type="np").images
        assert images.shape == (2, 8, 8, 1)
    assert torch.isfinite(torch.as_tensor(images)).all()
    # flashcore reads the student back: same network, the student's plan, the pipeline's x0
    student, meta = load_model(out, kinds=("student",))
    assert meta["kind"] == "student" and meta["steps"] == 2 and meta["grid"] == [999, 499]
    if kind == "text-v":
        assert meta["prompts"] == PROMPTS               # the bank it was distilled on, from flashcore.json
    from flashcore.foreign import decode
    from flashcore.sampler import sample
    c = student.cfg
    x_T = torch.randn((1, c.channels, c.sample_size, c.sample_size), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = decode(student, sample(student, torch.tensor([0]), schedule=student.schedule, steps=2, shape=x_T.shape[1:],
                                      x_T=x_T, grid=meta["grid"]))
        kw = {"prompt": PROMPTS[0]} if kind == "text-v" else {"class_labels": [0]}
        theirs = pipe(latents=x_T, output_type="pt", **kw).images
    assert ((ours.clamp(-1, 1) + 1) / 2 - theirs).abs().max() < 1e-4


# ---- the command line ----------------------------------------------------------------------------

_cli = cli_run


def test_cli_distill_and_generate_from_pipeline_folder(tmp_path, capsys):
    """The commands a user types: distill from a diffusers folder (refused with the defaults
    that need a data set, in one line), then generate from the student folder."""
    teacher = unet_pipeline(tmp_path / "teacher")
    run = str(tmp_path / "run")
    code, _, err = _cli(["distill", "--teacher", teacher, "--steps", "1", "--iters", "1", "--batch-size", "2",
                         "--out", run, "--device", "cpu"], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("flashcore: error:")]
    assert code == 1 and len(errors) == 1 and "--no-adversarial --val-every 0" in errors[0], err
    code, out, err = _cli(["distill", "--teacher", teacher, "--steps", "1", "--iters", "1", "--batch-size", "2",
                           "--no-adversarial", "--val-every", "0", "--checkpoint-every", "1", "--out", run,
                           "--device", "cpu"], capsys)
    assert code == 0, err
    png = str(tmp_path / "g.png")
    code, out, err = _cli(["generate", "--model", os.path.join(run, "student"), "--per-class", "1", "--out", png],
                          capsys)
    assert code == 0, err
    assert "10 images, 1 steps" in out and os.path.getsize(png) > 0


def test_cli_unsupported_folder_is_one_line(tmp_path, capsys):
    path = unet_pipeline(tmp_path / "p")
    _edit(os.path.join(path, "scheduler", "scheduler_config.json"), prediction_type="sample")
    code, _, err = _cli(["generate", "--model", path, "--out", str(tmp_path / "g.png")], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("flashcore: error:")]
    assert code == 1 and len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert "prediction_type 'sample' is not supported; supported: epsilon, v_prediction" in errors[0]
