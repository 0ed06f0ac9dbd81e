"""DDIL on top of Imagine Flash distillation (Garrepalli et al., arXiv 2410.11971):
the state mixture's priors and sources, reflection (x0 thresholding) everywhere it
applies, old ``fwd_share`` runs, and the command line. Tiny random teacher."""
import dataclasses
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import flashcore.plan
from flashcore import cli
from flashcore.cli_checks import sampling_clip
from flashcore.models import Denoiser
from flashcore.sampler import run_plan, sample
from flashcore.train import distill as D
from flashcore.train.distill import DistillConfig, Distiller, distill, teacher_rollout, teacher_rollout_grid

from _fixtures import tiny_teacher  # noqa: F401  (fixture)


def cfg_for(teacher, **kw):
    base = DistillConfig(teacher=teacher, steps=3, iters=4, batch_size=4, checkpoint_every=2, val_every=0,
                         sample_every_checkpoint=False, adversarial=False)
    return dataclasses.replace(base, **kw)


# ---- priors ------------------------------------------------------------------------------------

def test_priors_resolve_and_validate(tiny_teacher):
    c = lambda **kw: cfg_for(tiny_teacher, **kw).priors()
    assert c() == (0.0, 0.0, 1.0)                                   # Imagine Flash: student rollouts only
    assert c(backward=False) == (1.0, 0.0, 0.0)                     # forward distillation
    assert c(fwd_share=0.3) == pytest.approx((0.3, 0.0, 0.7))       # the older spelling
    assert c(beta_fwd=0.2, beta_teacher=0.3) == pytest.approx((0.2, 0.3, 0.5))
    assert c(beta_fwd=0.3, fwd_share=0.3) == pytest.approx((0.3, 0.0, 0.7))
    for bad in ({"beta_fwd": 0.6, "beta_teacher": 0.6}, {"beta_fwd": 0.2, "beta_student": 0.5},
                {"fwd_share": 0.3, "beta_fwd": 0.4}, {"backward": False, "beta_teacher": 0.5},
                {"beta_fwd": 1.5}, {"beta_student": -0.1}, {"teacher_substeps": 0}, {"clip": -1.0}):
        with pytest.raises(ValueError):
            cfg_for(tiny_teacher, **bad)


def test_mixture_proportions_are_honoured():
    priors, n = (0.2, 0.3, 0.5), 2000
    fake = SimpleNamespace(priors=priors, shared=torch.Generator().manual_seed(0))
    draws = [Distiller.choose_source(fake) for _ in range(n)]
    for src, p in zip(D.SOURCES, priors):
        share = draws.count(src) / n
        assert abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n), (src, share)


def test_one_source_draws_nothing_and_fwd_share_keeps_the_old_stream():
    """A pure run consumes no random number for the source; a fwd_share run the same one the
    code before the priors did (rand < fwd_share after the grid index), so old runs resume exactly."""
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    assert Distiller.choose_source(SimpleNamespace(priors=(0.0, 0.0, 1.0), shared=g)) == "student"
    assert torch.equal(g.get_state(), before)
    new, old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    fake = SimpleNamespace(priors=(0.3, 0.0, 0.7), shared=new)
    for _ in range(200):
        assert int(torch.randint(0, 3, (1,), generator=new)) == int(torch.randint(0, 3, (1,), generator=old))
        legacy = "fwd" if float(torch.rand(1, generator=old)) < 0.3 else "student"
        assert Distiller.choose_source(fake) == legacy


# ---- what each source produces ------------------------------------------------------------------

def _calls(monkeypatch, d):
    """Records (which model, batch size) for every network call."""
    seen = []
    real = Denoiser.forward

    def spy(self, x, t, y):
        seen.append(("teacher" if self is d.teacher else "student" if self is d.student else "other", x.shape[0]))
        return real(self, x, t, y)
    monkeypatch.setattr(Denoiser, "forward", spy)
    return seen


def test_fwd_states_carry_the_real_images(tiny_teacher):
    d = Distiller(cfg_for(tiny_teacher, backward=False))
    replay = torch.Generator()
    replay.set_state(d.gen.get_state())
    x_t, t, labels, i, source = d.student_state(4)
    assert source == "fwd"
    assert int(torch.randint(0, 3, (1,), generator=replay)) == i          # the grid index, no source draw
    idx = torch.randint(0, len(d._real[0]), (4,), generator=replay)
    eps = torch.randn((4,) + d.shape, generator=replay)
    a_t, s_t = d.sched.alpha_sigma(t)
    torch.testing.assert_close(x_t, a_t * d._real[0][idx] + s_t * eps, rtol=0, atol=0)
    assert torch.equal(labels, d._real[1][idx])


@pytest.mark.parametrize("substeps", [1, 2])
def test_teacher_states_come_from_teacher_rollouts(tiny_teacher, monkeypatch, substeps):
    d = Distiller(cfg_for(tiny_teacher, beta_teacher=1.0, teacher_substeps=substeps))
    seen = _calls(monkeypatch, d)
    d.shared.manual_seed(1)                 # a grid index > 0: a rollout of at least one step
    for _ in range(20):
        replay = torch.Generator()
        replay.set_state(d.gen.get_state())
        seen.clear()
        x_t, t, labels, i, source = d.student_state(4)
        if i > 0:
            break
    assert source == "teacher" and i > 0
    # the teacher alone, with CFG (a batch of 2B), i * substeps DDIM steps; the student never
    assert seen == [("teacher", 8)] * (i * substeps)
    # the same x_T and labels (replayed: grid index, no source draw, labels, noise) rolled out by the teacher
    assert int(torch.randint(0, 3, (1,), generator=replay)) == i
    lab = torch.randint(0, 10, (4,), generator=replay)
    x_T = torch.randn((4,) + d.shape, generator=replay)
    want = teacher_rollout(d.teacher, d.sched, d.grid, i, substeps, x_T, lab, guidance=2.0, noise_correction=True)
    assert torch.equal(labels, lab)
    torch.testing.assert_close(x_t, want, rtol=0, atol=0)


def test_teacher_rollout_is_the_teachers_cfg_sampler(tiny_teacher):
    d = Distiller(cfg_for(tiny_teacher))
    x_T, lab = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    got = teacher_rollout(d.teacher, d.sched, d.grid, 2, 1, x_T, lab, guidance=2.0, noise_correction=True)
    with torch.no_grad():
        want = run_plan(d.teacher, d.plan, x_T, lab, stop=2, guidance=2.0)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(teacher_rollout(d.teacher, d.sched, d.grid, 0, 3, x_T, lab, guidance=2.0,
                                       noise_correction=True), x_T)


def test_teacher_rollout_grid():
    grid = [999, 666, 333]
    assert teacher_rollout_grid(grid, 0, 4) == [999]
    assert teacher_rollout_grid(grid, 2, 1) == [999, 666, 333]
    fine = teacher_rollout_grid(grid, 2, 3)
    assert fine == [999, 888, 777, 666, 555, 444, 333]


def test_student_states_come_from_student_rollouts(tiny_teacher, monkeypatch):
    d = Distiller(cfg_for(tiny_teacher))
    seen = _calls(monkeypatch, d)
    d.shared.manual_seed(1)
    for _ in range(20):
        seen.clear()
        _, _, _, i, source = d.student_state(4)
        if i > 0:
            break
    assert source == "student" and i > 0 and seen == [("student", 4)] * i


# ---- reflection -------------------------------------------------------------------------------

def _x0_spy(monkeypatch):
    """max |x0| of every fused sampler step (rollouts, targets, sampling all go through plan.apply)."""
    seen = []
    real = flashcore.plan.sampler_step

    def spy(*a, **k):
        x_s, x0 = real(*a, **k)
        seen.append(float(x0.abs().max()))
        return x_s, x0
    monkeypatch.setattr(flashcore.plan, "sampler_step", spy)
    return seen


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_reflection_keeps_every_x0_in_range(tiny_teacher, monkeypatch, clip):
    d = Distiller(cfg_for(tiny_teacher, beta_fwd=0.2, beta_teacher=0.4, clip=clip, teacher_steps=2))
    steps = _x0_spy(monkeypatch)
    renoised = []
    real_renoise = D.srl_renoise
    monkeypatch.setattr(D, "srl_renoise", lambda x0, *a, **k: (renoised.append(float(x0.abs().max())),
                                                              real_renoise(x0, *a, **k))[1])
    sources = set()
    for it in range(8):
        sources.add(d.iteration(it)["source"])
    with torch.no_grad():
        sample(d.ema, torch.arange(4), schedule=d.sched, steps=3, shape=d.shape, clip=clip,
               generator=torch.Generator().manual_seed(0))
    assert sources == {"fwd", "teacher", "student"} and steps and renoised
    if clip:
        assert max(steps) <= clip and max(renoised) <= clip
    else:                                   # the random teacher's x0 leave the range: the test can fail
        assert max(steps) > 1.0 and max(renoised) > 1.0


def test_the_exported_student_carries_its_clip(tiny_teacher, tmp_path):
    run = str(tmp_path / "r")
    out = distill(cfg_for(tiny_teacher, iters=2, clip=1.0, beta_teacher=0.5), run, progress=False)
    meta = json.load(open(os.path.join(out, "config.json")))
    assert meta["clip"] == 1.0 and meta["distill_config"]["beta_teacher"] == 0.5
    assert sampling_clip(meta, None) == 1.0          # generate/eval's default for this student
    assert sampling_clip(meta, 0.0) == 0.0           # a flag overrides
    assert sampling_clip({"kind": "teacher"}, None) == 0.0


# ---- old runs and the command line --------------------------------------------------------------

def test_an_old_fwd_share_run_resumes_exactly(tiny_teacher, tmp_path):
    """A run whose state.json predates the priors (fwd_share, no beta_* fields) resumes
    and ends where an uninterrupted run ends."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = cfg_for(tiny_teacher, fwd_share=0.5)
    distill(cfg, a, progress=False)
    distill(cfg, b, progress=False, max_iters_this_call=2)
    state = os.path.join(b, "state", "state.json")
    s = json.load(open(state))
    for k in ("beta_fwd", "beta_teacher", "beta_student", "teacher_substeps"):
        del s["config"][k]
    json.dump(s, open(state, "w"))
    distill(cfg, b, resume=True, progress=False)
    wa = load_file(os.path.join(a, "state", "weights.safetensors"))
    wb = load_file(os.path.join(b, "state", "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("flags,expect", [
    (["--beta-fwd", "1.5"], "argument --beta-fwd"),
    (["--beta-student", "-0.1"], "argument --beta-student"),
    (["--teacher-substeps", "0"], "argument --teacher-substeps"),
    (["--clip", "-1"], "argument --clip"),
    (["--beta-fwd", "0.6", "--beta-teacher", "0.6"], "must sum to 1"),
    (["--no-backward", "--beta-teacher", "0.5"], "--no-backward"),
    (["--fwd-share", "0.3", "--beta-fwd", "0.4"], "older name"),
])
def test_bad_priors_on_the_command_line_exit_2(tiny_teacher, tmp_path, capsys, flags, expect):
    with pytest.raises(SystemExit) as e:
        cli.main(["distill", "--teacher", tiny_teacher, "--steps", "2", "--out", str(tmp_path / "r")] + flags)
    assert e.value.code == 2
    assert expect in capsys.readouterr().err


def test_the_flags_reach_the_config(tiny_teacher, tmp_path, monkeypatch):
    got = []
    monkeypatch.setattr(D, "distill", lambda cfg, out, **k: (got.append(cfg), out)[1])
    cli.main(["distill", "--teacher", tiny_teacher, "--steps", "2", "--out", str(tmp_path / "r"), "--val-every", "0",
              "--beta-fwd", "0.25", "--beta-teacher", "0.25", "--teacher-substeps", "2", "--clip", "1"])
    cfg = got[-1]
    assert cfg.priors() == (0.25, 0.25, 0.5) and cfg.teacher_substeps == 2 and cfg.clip == 1.0
