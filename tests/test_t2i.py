"""The text-to-image latent teacher trained here (train/t2i.py): captions, the character
tokenizer, train-vae and train-t2i-teacher at tiny size (exact resume, the pipeline folder
diffusers loads), distillation from it, and eval's prompt accuracy."""
import json
import os

import pytest
import torch

import flashcore.pipeline  # noqa: F401  (lets diffusers resolve FlashcorePipeline)
from flashcore import data as fdata
from flashcore.train.t2i import T2ITeacherConfig, VaeConfig, char_tokenizer, longest_caption_tokens, \
    train_t2i_teacher, train_vae

from _fixtures import cli_run, offline  # noqa: F401  (offline: fixture)

pytestmark = pytest.mark.usefixtures("offline")

TINY_VAE = dict(steps=4, batch_size=4, width=8, checkpoint_every=2, bf16=False)
TINY_T2I = dict(steps=4, batch_size=4, width=16, text_width=8, text_layers=1, checkpoint_every=2, bf16=False,
                sample_steps=2)


def test_caption_banks_and_digits():
    seen, held = fdata.caption_bank(), fdata.caption_bank(held_out=True)
    n = len(fdata.PHRASINGS)
    assert len(seen) == 10 * (n - fdata.HELD_OUT_PHRASINGS) and len(held) == 10 * fdata.HELD_OUT_PHRASINGS
    assert not set(seen) & set(held)
    per = len(seen) // 10
    for i, p in enumerate(seen):
        assert fdata.caption_digit(p) == i // per
    for i, p in enumerate(held):
        assert fdata.caption_digit(p) == i // fdata.HELD_OUT_PHRASINGS
    assert fdata.caption_digit("  The   digit SEVEN ") == 7
    assert fdata.caption_digit("a handwritten 12") is None and fdata.caption_digit("a cat") is None


def test_char_tokenizer_spells_every_caption():
    tok = char_tokenizer(64)
    unk = tok.unk_token_id
    for p in fdata.caption_bank() + fdata.caption_bank(held_out=True):
        ids = tok(p).input_ids
        assert unk not in ids[1:-1], p                  # every character is in the vocabulary
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == p.replace(" ", "")
    n = longest_caption_tokens(tok)
    assert n == max(len(p.replace(" ", "")) for p in fdata.caption_bank() + fdata.caption_bank(True)) + 2


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory):
    """A tiny VAE and text-to-image teacher trained for 4 steps each on MNIST: (vae run, teacher run)."""
    root = tmp_path_factory.mktemp("t2i")
    vae_run, t2i_run = str(root / "vae"), str(root / "t2i")
    train_vae(VaeConfig(**TINY_VAE), vae_run, progress=False)
    train_t2i_teacher(T2ITeacherConfig(vae=os.path.join(vae_run, "vae"), **TINY_T2I), t2i_run, progress=False)
    return vae_run, t2i_run


def _state(run):
    from safetensors.torch import load_file
    return load_file(os.path.join(run, "state", "weights.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vae_folder_and_latent_scale(tiny_t2i):
    from flashcore.train.t2i import encode_moments, load_vae
    vae_run, _ = tiny_t2i
    vae = load_vae(os.path.join(vae_run, "vae"))
    with open(os.path.join(vae_run, "vae", "flashcore.json")) as f:
        rec = json.load(f)
    assert rec["kind"] == "vae" and rec["train_steps"] == 4
    assert set(rec["reconstruction"]) >= {"eval_l1", "eval_fd", "fd_floor"}
    x, _ = fdata.split(fdata.load("mnist"), "train")
    mu, _ = encode_moments(vae, x)
    assert vae.config.latent_channels == 4 and mu.shape[1:] == (4, 7, 7)          # 28x28 -> 7x7
    # the latent scale makes the train split's latent means unit-variance
    assert abs(float((mu * vae.config.scaling_factor).std()) - 1.0) < 1e-4


def test_vae_resume_is_exact(tiny_t2i, tmp_path):
    vae_run, _ = tiny_t2i
    run = str(tmp_path / "vae")
    train_vae(VaeConfig(**TINY_VAE), run, progress=False, max_steps_this_call=2)     # half, then the rest
    train_vae(VaeConfig(**TINY_VAE), run, resume=True, progress=False)
    _same(_state(run), _state(vae_run))


def test_t2i_teacher_resume_is_exact(tiny_t2i, tmp_path):
    vae_run, t2i_run = tiny_t2i
    run = str(tmp_path / "t2i")
    cfg = T2ITeacherConfig(vae=os.path.join(vae_run, "vae"), **TINY_T2I)
    train_t2i_teacher(cfg, run, progress=False, max_steps_this_call=2)
    train_t2i_teacher(cfg, run, resume=True, progress=False)
    _same(_state(run), _state(t2i_run))


def test_teacher_is_a_diffusers_pipeline_conditioned_by_its_prompt(tiny_t2i):
    from diffusers import DiffusionPipeline

    from flashcore.foreign import load_model
    from flashcore.models.attention_processor import FlashcoreAttnProcessor
    _, t2i_run = tiny_t2i
    path = os.path.join(t2i_run, "teacher")
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["guidance_scale"] == 2.0
    pipe = DiffusionPipeline.from_pretrained(path)
    img = pipe("a handwritten 7", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape == (1, 28, 28, 1) and float(img.min()) >= 0 and float(img.max()) <= 1
    model, meta = load_model(path, kinds=("teacher",))
    assert meta["kind"] == "teacher" and meta["data"] == "mnist" and meta["prompts"] == fdata.caption_bank()
    assert model.cfg.conditioning == "text" and model.cfg.latent and model.null_label == len(fdata.caption_bank())
    # the exported pipeline is the trained EMA: the same predictions (to float16 weights) with the
    # attention through flashcore's processor, and its null condition is the empty prompt
    from flashcore.foreign import encode_prompts
    from flashcore.train.t2i import _pipeline_model, build_t2i, load_vae
    vae_run = os.path.dirname(t2i_run) + "/vae"
    cfg = T2ITeacherConfig(vae=os.path.join(vae_run, "vae"), **TINY_T2I)
    tok = char_tokenizer(longest_caption_tokens(char_tokenizer(64)))
    ema = build_t2i(cfg, tok, 4, 7, tok.model_max_length)
    ema.load_state_dict({k[len("ema/"):]: v for k, v in _state(t2i_run).items() if k.startswith("ema/")})
    ref = _pipeline_model(ema, tok, load_vae(cfg.vae), cfg, fdata.caption_bank())
    assert all(isinstance(p, FlashcoreAttnProcessor) for p in model.net.attn_processors.values())
    x = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([999, 500, 10]), torch.tensor([0, 77, model.null_label])
    with torch.no_grad():
        ours, theirs = model(x, t, labels), ref(x, t, labels)
        null = encode_prompts(model.frozen.text_encoder, model.frozen.tokenizer, [""])[0]
    assert (ours - theirs).abs().max() <= 1e-2 * theirs.abs().max()
    assert torch.equal(model.prompt_embeds[-1], null) and not torch.equal(model.prompt_embeds[0], null)


def test_distill_from_it_needs_the_flags_then_loads_and_evaluates(tiny_t2i, tmp_path, capsys):
    _, t2i_run = tiny_t2i
    teacher, run = os.path.join(t2i_run, "teacher"), str(tmp_path / "run")
    base = ["distill", "--teacher", teacher, "--steps", "2", "--iters", "2", "--batch-size", "4", "--out", run,
            "--device", "cpu"]
    code, _, err = cli_run(base, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("flashcore: error:")]
    assert code == 1 and len(errors) == 1 and "latent or text-conditioned" in errors[0], err
    assert "--no-adversarial --val-every 0" in errors[0]
    code, _, err = cli_run(base + ["--no-adversarial", "--val-every", "0", "--checkpoint-every", "2"], capsys)
    assert code == 0, err
    student = os.path.join(run, "student")
    for part in ("unet", "vae", "text_encoder"):      # loaded from the teacher's folder: recorded, never absolute
        with open(os.path.join(student, part, "config.json")) as f:
            recorded = json.load(f).get("_name_or_path")
        assert recorded is None or not os.path.isabs(recorded), (part, recorded)
    # eval: prompt accuracy on held-out phrasings, scored on decoded images
    prompts = str(tmp_path / "held.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(fdata.caption_bank(held_out=True)) + "\n")
    out_json = str(tmp_path / "e.json")
    code, out, err = cli_run(["eval", "--model", student, "--steps", "2", "--samples", "40", "--prompts", prompts,
                              "--json", out_json], capsys)
    assert code == 0, err
    with open(out_json) as f:
        r = json.load(f)
    assert r["prompts"]["held_out"] and r["prompts"]["count"] == 20 and r["latent"]
    assert r["steps"] == 2 and r["nfe"] == 2 and "prompt accuracy (20 prompts, held-out phrasings)" in out
    assert 0 <= r["accuracy"] <= 1 and r["feature_spaces"]["mnist-features-bncnn"]["fd"] > 0
    # a prompt that names no digit cannot be scored
    with open(prompts, "w") as f:
        f.write("a cat\n")
    code, _, err = cli_run(["eval", "--model", student, "--steps", "2", "--samples", "10", "--prompts", prompts],
                           capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("flashcore: error:")]
    assert code == 1 and len(errors) == 1 and "'a cat' is not a caption of a digit" in errors[0], err


def test_eval_scores_each_image_against_its_prompts_digit(tiny_t2i, monkeypatch):
    """Prompt accuracy is the classifier's digit against the digit the image's prompt names:
    with real eval images of those digits in place of the samples it is the classifier's own
    accuracy, and with the digits shifted by one it is about zero."""
    import flashcore.evaluate as ev
    import flashcore.foreign as fo
    _, t2i_run = tiny_t2i
    x_ev, y_ev = fdata.split(fdata.load("mnist"), "eval")
    bank = fdata.caption_bank(held_out=True)
    for shift, lo, hi in ((0, 0.9, 1.0), (1, 0.0, 0.1)):
        def fake_generate(model, meta, conditions, **kw):
            digits = torch.tensor([(fdata.caption_digit(bank[int(c)]) + shift) % 10 for c in conditions])
            pick = torch.stack([torch.nonzero(y_ev == d).flatten()[i // 10 % 50] for i, d in enumerate(digits.tolist())])
            return x_ev[pick], 0.0
        monkeypatch.setattr(ev, "generate", fake_generate)
        monkeypatch.setattr(fo, "decode", lambda model, x: x)
        r = ev.evaluate(os.path.join(t2i_run, "teacher"), steps=1, samples=200, prompts=bank)
        assert lo <= r["accuracy"] <= hi, (shift, r["accuracy"])
        assert r["prompts"]["held_out"] and r["prompts"]["count"] == 20


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = cli_run(["train-t2i-teacher", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "--vae" in err
    os.makedirs(tmp_path / "notvae")
    code, _, err = cli_run(["train-t2i-teacher", "--out", str(tmp_path / "r2"), "--vae", str(tmp_path / "notvae")],
                           capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("flashcore: error:")]
    assert code == 1 and len(errors) == 1 and "not a VAE folder" in errors[0], err
    code, _, err = cli_run(["train-vae", "--out", str(tmp_path / "r3"), "--kl-weight", "-1"], capsys)
    assert code == 2 and "--kl-weight" in err


def test_generate_takes_a_prompt_and_refuses_one_for_a_class_model(tiny_t2i, tmp_path, capsys):
    _, t2i_run = tiny_t2i
    png = str(tmp_path / "g.png")
    code, out, err = cli_run(["generate", "--model", os.path.join(t2i_run, "teacher"), "--steps", "2",
                              "--prompt", "a seven drawn in ink", "--prompt", "the digit two", "--per-class", "3",
                              "--out", png], capsys)
    assert code == 0, err
    assert out.startswith("6 images, 2 steps") and os.path.getsize(png) > 0
    from PIL import Image
    assert Image.open(png).size[1] < Image.open(png).size[0]       # 2 rows of 3
    code, _, err = cli_run(["generate", "--model", "checkpoints/mnist-student-3step", "--prompt", "seven",
                            "--out", png], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("flashcore: error:")]
    assert code == 1 and len(errors) == 1 and "class-conditional model takes no prompt" in errors[0], err
