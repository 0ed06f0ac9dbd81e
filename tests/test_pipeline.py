"""Teachers and students as diffusers pipeline folders: diffusers loads them
offline and samples what flashcore's sampler samples; flashcore's loaders read
them and the older layout, and refuse a broken folder in one line."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

import flashcore.pipeline  # noqa: F401  (lets diffusers resolve FlashcorePipeline)
from flashcore import cli
from flashcore.checkpoint import CheckpointError
from flashcore.images import to_uint8
from flashcore.models import Denoiser, ModelConfig, load_pretrained, save_pretrained
from flashcore.models.denoiser import stored_dtype
from flashcore.pipeline import FlashcorePipeline
from flashcore.sampler import sample
from flashcore.schedule import NoiseSchedule, ScheduleConfig
from flashcore.scheduler import FlashcoreScheduler

from _fixtures import TINY_DIT, TINY_UNET, offline  # noqa: F401  (offline: fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO_SNR = {"kind": "scaled_linear", "zero_terminal_snr": True}
STUDENT = {"kind": "student", "guidance": None, "data": "digits", "steps": 3, "grid": [999, 666, 333],
           "noise_correction": True, "schedule": {}}
TEACHER = {"kind": "teacher", "guidance": 2.0, "data": "digits", "schedule": {}}


pytestmark = pytest.mark.usefixtures("offline")     # no test here may reach the network


def _model(cfg: ModelConfig, schedule: NoiseSchedule | None = None) -> Denoiser:
    """A tiny denoiser with every weight moved off its initial value, so no output is trivially zero."""
    torch.manual_seed(0)
    m = Denoiser(cfg, schedule=schedule).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


CASES = {
    "unet-student": (TINY_UNET, STUDENT, None),
    "dit-teacher": (TINY_DIT, TEACHER, None),
    "unet-v-teacher": (ModelConfig(**{**TINY_UNET.__dict__, "prediction_type": "v_prediction"}),
                       {**TEACHER, "schedule": ZERO_SNR}, ZERO_SNR),
}


@pytest.fixture(params=list(CASES))
def saved(request, tmp_path):
    cfg, meta, sched = CASES[request.param]
    schedule = NoiseSchedule(ScheduleConfig(**sched)) if sched else None
    model = _model(cfg, schedule)
    path = str(tmp_path / request.param)
    save_pretrained(model, path, meta)
    return path, model, meta, schedule or NoiseSchedule()


def test_the_folder_is_a_diffusers_pipeline(saved):
    path, model, meta, _ = saved
    net = {"unet": "unet", "dit": "transformer"}[model.cfg.arch]
    index = json.load(open(os.path.join(path, "model_index.json")))
    assert index["_class_name"] == "FlashcorePipeline"
    assert index["scheduler"] == ["flashcore.scheduler", "FlashcoreScheduler"]
    assert index[net][0] == "diffusers"
    assert os.path.isfile(os.path.join(path, net, "diffusion_pytorch_model.safetensors"))
    sc = json.load(open(os.path.join(path, "scheduler", "scheduler_config.json")))
    assert sc["prediction_type"] == model.cfg.prediction_type
    assert sc["timesteps"] == meta.get("grid") and sc["num_inference_steps"] == meta.get("steps")
    assert json.load(open(os.path.join(path, "config.json")))["kind"] == meta["kind"]   # flashcore's, kept


def test_diffusers_samples_what_flashcore_samples(saved):
    path, model, meta, schedule = saved
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, FlashcorePipeline) and isinstance(pipe.scheduler, FlashcoreScheduler)
    labels = [0, 1, 2]
    steps = meta.get("steps") or 3
    guidance = meta["guidance"] or 1.0
    # a student samples its own plan by default; a teacher is given the step count
    kw = {} if meta["kind"] == "student" else {"num_inference_steps": steps}
    got = pipe(class_labels=labels, generator=torch.Generator().manual_seed(1), output_type="latent", **kw).images
    ref = sample(model, torch.tensor(labels), schedule=schedule, steps=steps, shape=(1, 16, 16),
                 guidance=guidance, noise_correction=meta.get("noise_correction", True),
                 generator=torch.Generator().manual_seed(1))
    # network outputs differ by rounding (diffusers' attention vs flashcore's, CFG combined
    # outside vs inside the fused step); x0 = (x - s eps) / a_T scales that by 1 / a_T = 15
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert ref.abs().max() > 0.1
    pil = pipe(class_labels=labels, generator=torch.Generator().manual_seed(1), **kw).images
    assert len(pil) == 3 and pil[0].mode == "L" and pil[0].size == (16, 16)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), to_uint8(got)[..., 0])
    arr = pipe(class_labels=labels, latents=got.new_zeros(3, 1, 16, 16), output_type="np", **kw).images
    assert arr.shape == (3, 16, 16, 1) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1


def test_a_diffusers_scheduler_can_replace_flashcores(saved):
    path, model, meta, _ = saved
    pipe = FlashcorePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    assert pipe.scheduler.config.prediction_type == model.cfg.prediction_type
    x = pipe(class_labels=[3, 4], num_inference_steps=4, output_type="pt").images
    assert x.shape == (2, 1, 16, 16) and bool(torch.isfinite(x).all())


def test_load_pretrained_reads_the_pipeline_folder(saved):
    path, model, meta, _ = saved
    loaded, got = load_pretrained(path)
    assert loaded.cfg == model.cfg and got == {**meta, "model": got["model"]}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_the_pipeline_saves_and_loads_again_with_diffusers(saved, tmp_path):
    path, model, meta, _ = saved
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.save_pretrained(str(tmp_path / "again"))
    again = DiffusionPipeline.from_pretrained(str(tmp_path / "again"))
    assert again.config.guidance_scale == pipe.config.guidance_scale
    assert again.scheduler.config.timesteps == pipe.scheduler.config.timesteps


# -- broken folders -------------------------------------------------------------------------------

@pytest.fixture
def unet_folder(tmp_path):
    path = str(tmp_path / "s")
    save_pretrained(_model(TINY_UNET), path, STUDENT)
    return path


def _edit(path, file, change):
    f = os.path.join(path, file)
    c = json.load(open(f))
    change(c)
    json.dump(c, open(f, "w"))


@pytest.mark.parametrize("break_it,names", [
    (lambda p: shutil.rmtree(os.path.join(p, "scheduler")), "'scheduler' component is missing"),
    (lambda p: shutil.rmtree(os.path.join(p, "unet")), "'unet' component is missing"),
    (lambda p: os.remove(os.path.join(p, "unet", "diffusion_pytorch_model.safetensors")), "'unet' weights are missing"),
    (lambda p: _edit(p, "model_index.json", lambda c: c.pop("scheduler")), "'scheduler' component is missing"),
    (lambda p: _edit(p, "model_index.json", lambda c: c.update(unet=[None, None])), "lists none"),
    (lambda p: _edit(p, "model_index.json", lambda c: c.update(transformer=["diffusers", "DiTTransformer2DModel"])),
     "lists ['unet', 'transformer']"),
])
def test_a_missing_component_is_one_error_line(unet_folder, break_it, names):
    break_it(unet_folder)
    for load in (load_pretrained, FlashcorePipeline.from_pretrained):
        with pytest.raises(CheckpointError) as e:
            load(unet_folder)
        assert names in str(e.value) and "\n" not in str(e.value), load


@pytest.mark.parametrize("file,change,names", [
    ("scheduler/scheduler_config.json", lambda c: c.update(prediction_type="v_prediction"), "'prediction_type'"),
    ("scheduler/scheduler_config.json", lambda c: c.update(timesteps=[999, 500, 100]), "'timesteps'"),
    ("scheduler/scheduler_config.json", lambda c: c.update(beta_schedule="linear"), "noise schedule"),
    ("scheduler/scheduler_config.json", lambda c: c.update(prediction_type="flow"), "not supported"),
    ("unet/config.json", lambda c: c.update(norm_eps=1e-3), "field 'norm_eps'"),
])
def test_components_that_disagree_with_config_json_are_refused(unet_folder, file, change, names):
    _edit(unet_folder, file, change)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(unet_folder)
    assert names in str(e.value) and file.split("/")[-1] in str(e.value) and "\n" not in str(e.value)


def test_bad_calls_are_refused(unet_folder):
    pipe = FlashcorePipeline.from_pretrained(unet_folder)
    with pytest.raises(ValueError, match=r"integers in 0\.\.9"):
        pipe(class_labels=[10])                 # 10 is the null label, not a class
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], output_type="jpeg")
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(class_labels=[1], latents=torch.zeros(1, 1, 8, 8))


# -- the shipped checkpoints and the command line ---------------------------------------------------

def _earlier_layout(pipeline_dir: str, out: str) -> str:
    """A copy of a pipeline folder in the layout checkpoints had before pipelines:
    config.json beside model/ (the diffusers model folder), no model_index.json."""
    import shutil
    os.makedirs(out)
    shutil.copy(os.path.join(pipeline_dir, "config.json"), out)
    shutil.copytree(os.path.join(pipeline_dir, "unet"), os.path.join(out, "model"))
    return out


def test_shipped_checkpoints_load_and_export_as_pipelines(tmp_path, capsys):
    shipped = os.path.join(ROOT, "checkpoints", "mnist-student-3step")
    for name in ("mnist-teacher", "mnist-student-1step", "mnist-student-2step", "mnist-student-3step"):
        load_pretrained(os.path.join(ROOT, "checkpoints", name))
        assert os.path.exists(os.path.join(ROOT, "checkpoints", name, "model_index.json"))
    # the shipped checkpoints are pipeline folders; one in the earlier layout converts
    student = _earlier_layout(shipped, str(tmp_path / "earlier"))
    assert not os.path.exists(os.path.join(student, "model_index.json"))
    out = str(tmp_path / "pipe")
    assert cli.main(["export-pipeline", "--model", student, "--out", out]) == 0
    assert "student pipeline" in capsys.readouterr().out
    assert stored_dtype(student) == stored_dtype(out) == torch.float16        # the distiller's float16 kept
    weights = os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")
    assert os.stat(weights).st_mode & 0o777 == 0o644
    model, meta = load_pretrained(student)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(class_labels=[7, 3], generator=torch.Generator().manual_seed(0), output_type="latent").images
    ref = sample(model, torch.tensor([7, 3]), schedule=NoiseSchedule(ScheduleConfig(**meta["schedule"])),
                 steps=3, shape=(1, 28, 28), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_export_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path, unet_folder):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        cli.main(["export-pipeline", "--model", unet_folder, "--out", str(other)])
    assert e.value.code == 2 and (other / "keep.txt").exists()


def test_generate_takes_a_pipeline_folder(unet_folder, tmp_path, capsys):
    out = str(tmp_path / "g.png")
    assert cli.main(["generate", "--model", unet_folder, "--per-class", "1", "--out", out, "--device", "cpu"]) == 0
    assert os.path.exists(out) and "3 steps" in capsys.readouterr().out
