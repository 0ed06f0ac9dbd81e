"""FlashcoreScheduler against diffusers' own schedulers: the forward process,
configs in and out, custom grids, the first step of each prediction type, and
its refusals."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from flashcore.schedule import A_FLOOR
from flashcore.scheduler import FlashcoreScheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
BETAS = {"linear": dict(beta_schedule="linear"), "scaled_linear": SD,
         "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
         "zero_snr": dict(SD, rescale_betas_zero_snr=True)}


def _pair(shape=(6, 1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# -- the forward process ----------------------------------------------------------------------

@pytest.mark.parametrize("source", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("betas", list(BETAS))
def test_add_noise_matches_diffusers(source, betas):
    theirs = source(**BETAS[betas])
    ours = FlashcoreScheduler.from_config(theirs.config)
    # the tables: made in float64 here, a float32 cumprod of 1000 factors there
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-4, atol=1e-6)
    x0, noise = _pair()
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    # sqrt(1 - alphas_cumprod) at t = 0 is sqrt(beta_0) ~ 0.01-0.03: a 5e-7 table difference moves it
    # by up to 2.5e-5 (times |noise| < 4)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=0, atol=1e-4)
    # the same formula: on the same table the two agree to rounding
    theirs.alphas_cumprod = ours.alphas_cumprod.clone()
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t),
                               rtol=1e-6, atol=1e-7)
    if betas == "zero_snr":               # x_T is pure noise: the a_t floor is not part of the forward process
        assert torch.equal(ours.add_noise(x0, noise, torch.tensor(999)), noise)


def test_add_noise_one_timestep_for_the_batch_and_range_check():
    ours = FlashcoreScheduler()
    x0, noise = _pair()
    torch.testing.assert_close(ours.add_noise(x0, noise, 500), ours.add_noise(x0, noise, torch.full((6,), 500)))
    with pytest.raises(ValueError, match="0..999"):
        ours.add_noise(x0, noise, torch.tensor([1000] * 6))


# -- configs in and out ----------------------------------------------------------------------------

@pytest.mark.parametrize("source,kw", [
    (DDPMScheduler, {}),                                    # all defaults: the linear case
    (DDPMScheduler, dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")),
    (DDIMScheduler, dict(SD, prediction_type="sample")),
    (DDIMScheduler, dict(beta_start=0.0002, beta_end=0.03, num_train_timesteps=500)),
    (EulerDiscreteScheduler, dict(beta_schedule="squaredcos_cap_v2")),
    (DDPMScheduler, dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist())),
])
def test_from_config_keeps_the_betas(source, kw):
    src = source(**kw)
    ours = FlashcoreScheduler.from_config(src.config)
    for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type"):
        assert ours.config[k] == src.config[k], k
    assert ours.config.rescale_betas_zero_snr == src.config.get("rescale_betas_zero_snr", False)
    torch.testing.assert_close(ours.alphas_cumprod, src.alphas_cumprod, rtol=1e-4, atol=1e-6)
    back = source.from_config(ours.config)          # and out again: the very same table
    assert torch.equal(back.alphas_cumprod, src.alphas_cumprod)


def test_from_config_arguments_win_over_the_source():
    ours = FlashcoreScheduler.from_config(DDPMScheduler().config, beta_schedule="scaled_linear",
                                          prediction_type="v_prediction")
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.prediction_type == "v_prediction"
    assert ours.config.beta_start == 0.0001            # the source's, not this class's 0.00085


def test_compatibles_and_diffusers_schedulers_take_its_config():
    names = {c.__name__ for c in FlashcoreScheduler().compatibles}
    assert {"DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"} <= names
    ours = FlashcoreScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    ddim = DDIMScheduler.from_config(ours.config)
    assert torch.equal(ddim.alphas_cumprod, DDIMScheduler().alphas_cumprod)


def test_the_plan_in_the_config_survives_a_save(tmp_path):
    ours = FlashcoreScheduler(num_inference_steps=2, timesteps=[999, 400], noise_correction=False)
    ours.save_config(str(tmp_path))
    back = FlashcoreScheduler.from_pretrained(str(tmp_path))
    assert back.config.timesteps == [999, 400] and back.config.noise_correction is False
    back.set_timesteps()                                    # the student's own plan by default
    assert back.timesteps.tolist() == [999, 400] and not back.custom_timesteps
    back.set_timesteps(2)                                   # its own grid for its own step count
    assert back.timesteps.tolist() == [999, 400]
    back.set_timesteps(3)                                   # else trailing
    assert back.timesteps.tolist() == [999, 666, 333]
    steps_only = FlashcoreScheduler(num_inference_steps=4)
    steps_only.set_timesteps()
    assert steps_only.timesteps.tolist() == [999, 749, 499, 249]


# -- grids -------------------------------------------------------------------------------------

def test_custom_timesteps_follow_ddpm_and_step_on_them():
    grid = [999, 500, 200]
    ddpm, ours = DDPMScheduler(**SD), FlashcoreScheduler(noise_correction=False)
    ddpm.set_timesteps(timesteps=grid)
    ours.set_timesteps(timesteps=grid)
    assert ours.timesteps.tolist() == ddpm.timesteps.tolist() == grid
    assert ours.num_inference_steps == 3 and ours.custom_timesteps
    for t in grid:
        assert int(ours.previous_timestep(t)) == int(ddpm.previous_timestep(t))
    x, eps = _pair()
    ac = ddpm.alphas_cumprod
    x0 = (x - (1 - ac[999]).sqrt() * eps) / ac[999].sqrt()          # deterministic DDIM, 999 -> 500
    out = ours.step(eps, 999, x)
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.prev_sample, ac[500].sqrt() * x0 + (1 - ac[500]).sqrt() * eps,
                               rtol=1e-4, atol=1e-5)
    assert ours.step_index == 1
    last = ours.step(eps, 200, x)                                  # the last step lands on x0
    torch.testing.assert_close(last.prev_sample, last.pred_original_sample, rtol=0, atol=0)


def test_one_step_recipe_passes_its_timestep_list():
    ours = FlashcoreScheduler()
    ours.set_timesteps(timesteps=[999])          # DMD2-style: x0 from x_T in one call
    x, eps = _pair()
    out = ours.step(eps, 999, x)
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample, rtol=0, atol=0)
    assert int(ours.previous_timestep(999)) == -1


def test_begin_index_and_step_index():
    ours = FlashcoreScheduler()
    ours.set_timesteps(3)
    assert ours.begin_index is None and ours.step_index is None
    ours.set_begin_index(1)
    assert ours.begin_index == 1
    x, eps = _pair()
    ours.step(eps, 666, x)
    assert ours.step_index == 2
    ours.set_timesteps(3)                         # a new grid starts over
    assert ours.begin_index is None and ours.step_index is None


# -- the first step against DDIM -------------------------------------------------------------------

def _first_steps(betas, prediction_type, clip=False):
    ddim = DDIMScheduler(**BETAS[betas], prediction_type=prediction_type, timestep_spacing="trailing",
                         clip_sample=clip)
    ours = FlashcoreScheduler.from_config(ddim.config, noise_correction=False)
    assert ours.config.clip_sample == clip
    ddim.set_timesteps(3)
    ours.set_timesteps(3)
    # DDIM lists 999, 666, 332 but steps 999 -> 666 first, as the trailing grid does
    assert ddim.timesteps[0] == ours.timesteps[0] == 999 and ours.timesteps[1] == 666
    x, out = _pair(seed=1)
    return x, out, ddim.step(out, 999, x, eta=0.0), ours.step(out, 999, x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
def test_first_step_matches_ddim_trailing(betas, prediction_type):
    _, _, a, b = _first_steps(betas, prediction_type)
    # x0 = (x - s eps) / a_T divides table differences by a_T (0.0064 linear, 0.068 scaled_linear)
    torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-4, atol=1e-5)


def test_first_step_with_clip_matches_ddim():
    _, _, a, b = _first_steps("scaled_linear", "epsilon", clip=True)
    assert b.pred_original_sample.abs().max() == 1.0
    torch.testing.assert_close(b.pred_original_sample, a.pred_original_sample, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.prev_sample, a.prev_sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("betas", ["squaredcos_cap_v2", "zero_snr"])
def test_first_step_at_the_a_floor(betas, prediction_type):
    """Where a_T < A_FLOOR flashcore steps with a_T = A_FLOOR, s_T = sqrt(1 - A_FLOOR^2): x0 and
    eps then move by at most A_FLOOR (|x| + |out|) from DDIM's (float32 cancellation in
    x0 = (x - s eps) / a stays below that)."""
    x, out, a, b = _first_steps(betas, prediction_type)
    bound = A_FLOOR * (x.abs() + out.abs()) + 1e-5
    assert ((b.pred_original_sample - a.pred_original_sample).abs() <= bound).all()
    assert ((b.prev_sample - a.prev_sample).abs() <= bound).all()


def test_noise_correction_takes_x_T_as_the_direction():
    ours = FlashcoreScheduler()
    ours.set_timesteps(3)
    x, eps = _pair()
    out = ours.step(eps, 999, x)
    a, s = ours.schedule.alpha_sigma(666)
    torch.testing.assert_close(out.prev_sample, a * out.pred_original_sample + s * x)


# -- refusals --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(prediction_type="flow_prediction"), "prediction_type 'flow_prediction' is not supported"),
    (dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid' is not supported"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer in 1..1000"),
    (dict(num_inference_steps=2, timesteps=[999, 500, 1]), "num_inference_steps = 2 but timesteps has 3"),
    (dict(timesteps=[500, 999]), "strictly descending"),
    (dict(trained_betas=[0.01] * 10), "num_train_timesteps = 1000 values"),
])
def test_bad_configs_are_refused_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        FlashcoreScheduler(**kw)


def test_unsupported_prediction_type_from_a_source_config():
    with pytest.raises(ValueError, match="not supported"):
        FlashcoreScheduler.from_config(dict(DDPMScheduler().config, prediction_type="flow_prediction"))


@pytest.mark.parametrize("timesteps", [[999, 999, 500], [500, 999], [1000, 500], [999, -1], [], [999.0, 500.0],
                                       torch.tensor([999.5]), [True]])
def test_bad_timesteps_are_refused(timesteps):
    ours = FlashcoreScheduler()
    with pytest.raises(ValueError, match="strictly descending integers in 0..999"):
        ours.set_timesteps(timesteps=timesteps)


def test_bad_calls_are_refused():
    ours = FlashcoreScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(torch.zeros(1), 999, torch.zeros(1))
    with pytest.raises(ValueError, match="no step count of its own"):
        ours.set_timesteps()
    with pytest.raises(ValueError, match="not both"):
        ours.set_timesteps(2, timesteps=[999, 499])
    with pytest.raises(ValueError, match="1..1000"):
        ours.set_timesteps(1001)
    ours.set_timesteps(2)
    with pytest.raises(ValueError, match="not on the grid"):
        ours.step(torch.zeros(1), 500, torch.zeros(1))
    with pytest.raises(ValueError, match="deterministic"):
        ours.step(torch.zeros(1), 999, torch.zeros(1), eta=1.0)
