"""The few-step sampler: an analytic Gaussian case, noise correction, and the
diffusers-scheduler path (the scheduler against diffusers' own: test_scheduler.py)."""
import pytest
import torch

from flashcore.sampler import denoise_step, sample
from flashcore.plan import StepPlan
from flashcore.schedule import NoiseSchedule
from flashcore.scheduler import FlashcoreScheduler

from _fixtures import tiny_denoiser  # noqa: F401  (fixture)


class GaussianOracle:
    """Exact eps predictor for x0 ~ N(mu, sigma^2 I): E[eps | x_t] = s (x_t - a mu) / (a^2 sigma^2 + s^2)."""

    def __init__(self, schedule, mu, sigma):
        self.sch, self.mu, self.sigma = schedule, mu, sigma

    def __call__(self, x, t, labels):
        a, s = self.sch.gather(t, x.ndim)
        return s * (x - a * self.mu) / (a ** 2 * self.sigma ** 2 + s ** 2)


def test_many_step_sampling_reproduces_gaussian_data():
    sch = NoiseSchedule(kind="linear")          # a_T ~ 0.006: x_T ~ N(0, I) is the true marginal
    mu, sigma = 1.5, 0.5
    g = torch.Generator().manual_seed(0)
    x = sample(GaussianOracle(sch, mu, sigma), torch.zeros(4000, dtype=torch.long), schedule=sch,
               steps=200, shape=(1, 2, 2), generator=g)
    # sampling error of the mean over 16000 values ~ 0.004, of the std ~ 0.003
    assert x.mean().item() == pytest.approx(mu, abs=0.03)
    assert x.std().item() == pytest.approx(sigma, rel=0.04)


def test_one_step_with_exact_predictor_is_the_posterior_mean():
    sch = NoiseSchedule(kind="scaled_linear")
    oracle = GaussianOracle(sch, 0.7, 0.3)
    x_T = torch.randn(64, 1, 2, 2)
    x0 = sample(oracle, torch.zeros(64, dtype=torch.long), schedule=sch, steps=1, shape=(1, 2, 2), x_T=x_T)
    a, s = sch.alpha_sigma(999)
    expect = 0.7 + a * 0.09 * (x_T - a * 0.7) / (a * a * 0.09 + s * s)   # E[x0 | x_T]
    torch.testing.assert_close(x0, expect, rtol=1e-5, atol=1e-5)


class Linear:
    def __call__(self, x, t, labels):
        return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).float() / 1000

    def eps_cfg(self, x, t, labels):
        return self(x, t, labels), 0.5 * self(x, t, labels)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_noise_correction_changes_exactly_the_first_step(guidance):
    sch = NoiseSchedule()
    p_on, p_off = StepPlan.build(sch, 3, noise_correction=True), StepPlan.build(sch, 3, noise_correction=False)
    x_T, lab = torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)
    on = denoise_step(Linear(), p_on[0], x_T, lab, x_T, guidance=guidance)
    off = denoise_step(Linear(), p_off[0], x_T, lab, x_T, guidance=guidance)
    torch.testing.assert_close(on[1], off[1], rtol=0, atol=0)              # same x0
    a_s, s_s = sch.alpha_sigma(666)
    torch.testing.assert_close(on[0], a_s * on[1] + s_s * x_T)              # direction = x_T
    assert (on[0] - off[0]).abs().max() > 1e-3
    x = on[0]
    for i in (1, 2):                                                       # later steps: identical
        a = denoise_step(Linear(), p_on[i], x, lab, x_T, guidance=guidance)
        b = denoise_step(Linear(), p_off[i], x, lab, x_T, guidance=guidance)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        x = a[0]


@pytest.mark.parametrize("nc", [True, False])
def test_diffusers_scheduler_loop_equals_flashcore_sampler(tiny_denoiser, nc):
    model, sch = tiny_denoiser, NoiseSchedule()
    labels = torch.tensor([0, 1, 2, 1])
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = sample(model, labels, schedule=sch, steps=3, shape=(1, 16, 16), guidance=2.5, x_T=x_T,
                     noise_correction=nc)
        sc = FlashcoreScheduler(noise_correction=nc)
        sc.set_timesteps(3)
        x = x_T * sc.init_noise_sigma
        for t in sc.timesteps:                       # an ordinary diffusers denoising loop
            tt = torch.full((4,), int(t))
            eps_c, eps_u = model(x, tt, labels), model(x, tt, torch.full_like(labels, model.null_label))
            x = sc.step(eps_u + 2.5 * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
