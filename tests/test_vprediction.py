"""v-prediction on a zero-terminal-SNR schedule: the schedule reaches a_T ~ 0,
the eps the denoiser hands the sampler gives back the exact x0 (also at t = T,
where an epsilon head could not), and noise correction stays exact there."""
import dataclasses

import pytest
import torch
from torch import nn

from flashcore.models import Denoiser, ModelConfig, load_pretrained, save_pretrained
from flashcore.plan import StepPlan, apply
from flashcore.schedule import A_FLOOR, NoiseSchedule, ScheduleConfig

from _fixtures import TINY_UNET

ZT = ScheduleConfig(kind="scaled_linear", zero_terminal_snr=True)


class OracleV(nn.Module):
    """Returns the true v = a_t eps - s_t x0 for one fixed (x0, eps) pair."""

    def __init__(self, sched, x0, eps):
        super().__init__()
        self.sched, self.x0, self.eps = sched, x0, eps

    def forward(self, x, t, class_labels=None):
        a, s = self.sched.gather(t, x.ndim)
        return type("Out", (), {"sample": a * self.eps - s * self.x0})()


def cancellation_tol(x_t, a):
    """float32 bound for x0 = (x_t - s eps) / a: x_t - s eps cancels to ~a^2 x_t, leaving the
    few roundings of the operands (2^-24 |x_t| each; 8 of them as margin) divided by a."""
    return 8 * 2.0 ** -24 * x_t.abs().max().item() / a


def test_zero_terminal_snr_reaches_alpha_zero():
    sch = NoiseSchedule(ZT)
    assert sch.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    a_T, s_T = sch.alpha_sigma(sch.T)
    assert a_T == A_FLOOR and a_T ** 2 + s_T ** 2 == pytest.approx(1.0, abs=1e-15)
    plain = NoiseSchedule(ScheduleConfig(kind="scaled_linear"))
    assert plain.alpha_sigma(plain.T)[0] > 0.05          # the leak the rescale removes
    assert sch.alpha_sigma(0)[0] == pytest.approx(plain.alpha_sigma(0)[0], rel=1e-12)


@pytest.mark.parametrize("t", [999, 900, 500, 20])
def test_v_model_eps_gives_the_exact_x0(t):
    sch = NoiseSchedule(ZT)
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.randn(3, 1, 8, 8, generator=g)
    cfg = dataclasses.replace(TINY_UNET, prediction_type="v_prediction", sample_size=8)
    model = Denoiser(cfg, net=OracleV(sch, x0, eps), schedule=sch)
    tt = torch.full((3,), t)
    x_t = sch.add_noise(x0, eps, tt)
    eps_hat = model(x_t, tt, torch.zeros(3, dtype=torch.long))
    a, s = sch.alpha_sigma(t)
    x0_hat = (x_t - s * eps_hat) / a
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=cancellation_tol(x_t, a))


def test_noise_correction_is_exact_at_zero_terminal_snr():
    sch = NoiseSchedule(ZT)
    g = torch.Generator().manual_seed(0)
    x0, x_T = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1, torch.randn(2, 1, 8, 8, generator=g)
    plan = StepPlan.build(sch, 3, noise_correction=True)
    cfg = dataclasses.replace(TINY_UNET, prediction_type="v_prediction", sample_size=8)
    model = Denoiser(cfg, net=OracleV(sch, x0, x_T), schedule=sch)
    lab = torch.zeros(2, dtype=torch.long)
    x_t = sch.add_noise(x0, x_T, torch.full((2,), sch.T))   # = A_FLOOR x0 + x_T
    eps_hat = model(x_t, torch.full((2,), sch.T), lab)
    x_s, x0_hat = apply(plan[0], x_t, eps_hat, x_T=x_T)
    a_s, s_s = sch.alpha_sigma(plan.grid[1])
    tol = cancellation_tol(x_t, sch.alpha_sigma(sch.T)[0])
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=tol)
    torch.testing.assert_close(x_s, a_s * x0 + s_s * x_T, rtol=0, atol=tol)


def test_v_model_round_trips_and_needs_its_schedule(tmp_path):
    sch = NoiseSchedule(ZT)
    cfg = dataclasses.replace(TINY_UNET, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="needs its noise schedule"):
        Denoiser(cfg)
    with pytest.raises(ValueError, match="not supported"):
        dataclasses.replace(TINY_UNET, prediction_type="sample_x0")
    torch.manual_seed(0)
    m = Denoiser(cfg, schedule=sch).eval()
    save_pretrained(m, str(tmp_path / "v"), {"kind": "teacher", "guidance": 2.0, "data": "digits",
                                             "schedule": dataclasses.asdict(ZT)})
    back, meta = load_pretrained(str(tmp_path / "v"))
    assert back.cfg.prediction_type == "v_prediction"
    x, t, lab = torch.randn(2, 1, 16, 16), torch.tensor([999, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, lab), m(x, t, lab))
    assert "_a" not in dict(back.named_parameters()) and not any(k.endswith("_a") for k in back.state_dict())


def test_v_teacher_trains_and_distills_end_to_end(tmp_path):
    """A v-prediction, zero-terminal-SNR teacher through train-teacher, then one
    distillation iteration (rollout with noise correction, SRL target, loss)."""
    from flashcore.train.distill import DistillConfig, Distiller
    from flashcore.train.teacher import TeacherConfig, train_teacher
    cfg = TeacherConfig(data="digits", steps=2, batch_size=8, warmup=1, checkpoint_every=2, sample_steps=2,
                        schedule=ZT, model=dataclasses.replace(TINY_UNET, prediction_type="v_prediction"))
    teacher = train_teacher(cfg, str(tmp_path / "run"), progress=False)
    model, meta = load_pretrained(teacher)
    assert model.cfg.prediction_type == "v_prediction" and meta["schedule"]["zero_terminal_snr"]
    d = Distiller(DistillConfig(teacher=teacher, steps=2, iters=1, batch_size=2, val_every=0,
                                sample_every_checkpoint=False, adversarial=False))
    assert d.student.cfg.prediction_type == "v_prediction"
    out = d.iteration()
    assert all(torch.isfinite(torch.tensor(v)) for v in (out["srl"], out["d"]))
