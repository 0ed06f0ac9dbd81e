"""Imagine Flash distillation on a tiny random teacher: the contracts, not quality."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flashcore import cli
from flashcore.checkpoint import CheckpointError
from flashcore.models import Denoiser, save_pretrained
from flashcore.sampler import denoise_step
from flashcore.plan import StepPlan
from flashcore.train.distill import DistillConfig, Distiller, distill, rollout, teacher_grid

from _fixtures import TINY_UNET, tiny_teacher  # noqa: F401  (fixture)


def cfg_for(teacher, **kw):
    base = DistillConfig(teacher=teacher, steps=3, iters=4, batch_size=4, checkpoint_every=2, val_every=0,
                         sample_every_checkpoint=False)
    return dataclasses.replace(base, **kw)


def test_teacher_grid():
    assert teacher_grid(749, 1) == [749]
    assert teacher_grid(750, 2) == [750, 375]
    assert teacher_grid(1, 3) == [1, 1, 1]


def test_backward_mode_never_feeds_real_images_to_the_student(tiny_teacher, monkeypatch):
    d = Distiller(cfg_for(tiny_teacher, adversarial=False))
    assert d._real is None                        # no data set is even loaded
    d = Distiller(cfg_for(tiny_teacher))          # with the discriminator: real images for D only
    d._real = (torch.full_like(d._real[0], 1e4), d._real[1])
    seen = []
    real_forward = Denoiser.forward
    monkeypatch.setattr(Denoiser, "forward", lambda self, x, t, y: (seen.append((self is d.student, x.abs().max().item())),
                                                                    real_forward(self, x, t, y))[1])
    for it in range(4):
        d.iteration(it)
    student_inputs = [m for is_student, m in seen if is_student]
    assert student_inputs and max(student_inputs) < 50     # a 1e4 image would show at any t


def test_forward_mode_uses_real_images(tiny_teacher):
    d = Distiller(cfg_for(tiny_teacher, backward=False, adversarial=False))
    x_t, t, labels, i, used_real = d.student_state(4)
    assert used_real == "fwd" and d._real is not None


@pytest.mark.parametrize("nc", [True, False])
def test_rollout_is_noise_corrected(tiny_teacher, nc):
    d = Distiller(cfg_for(tiny_teacher, noise_correction=nc))
    x_T, lab = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    x1 = rollout(d.student, d.plan, 1, x_T, lab)
    plain = StepPlan.build(d.sched, grid=d.grid, noise_correction=False)
    with torch.no_grad():
        _, x0 = denoise_step(d.student, plain[0], x_T, lab, x_T)
        eps = d.student(x_T, torch.full((2,), 999), lab)
    a_s, s_s = d.sched.alpha_sigma(d.grid[1])
    expect = a_s * x0 + s_s * (x_T if nc else eps)
    torch.testing.assert_close(x1, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise", ["fresh", "student"])
def test_srl_target_renoises_with_the_chosen_noise(tiny_teacher, noise):
    from flashcore.sampler import sample
    d = Distiller(cfg_for(tiny_teacher, srl_noise=noise, gamma_ratio=0.5, teacher_steps=1))
    g = torch.Generator().manual_seed(3)
    x_t, x0_s, eps_s = (torch.randn(2, 1, 16, 16, generator=g) for _ in range(3))
    lab, t = torch.tensor([1, 2]), 666
    state = d.gen.get_state()
    got = d.target(x_t, x0_s, t, lab, eps_s)
    drew = not torch.equal(state, d.gen.get_state())
    d.gen.set_state(state)
    eps_fresh = d._randn(x0_s.shape)
    used = eps_s if noise == "student" else eps_fresh
    a, s = d.sched.alpha_sigma(333)
    expect = sample(d.teacher, lab, schedule=d.sched, steps=1, shape=d.shape, guidance=d.guidance,
                    noise_correction=False, x_T=a * x0_s + s * used, grid=[333])
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # "student" is a function of the state alone: it draws nothing from the run's generators
    assert drew == (noise == "fresh")


def test_srl_noise_must_be_known(tiny_teacher):
    with pytest.raises(ValueError, match="srl-noise"):
        cfg_for(tiny_teacher, srl_noise="other")


def test_srl_gradient_reaches_only_the_student(tiny_teacher):
    d = Distiller(cfg_for(tiny_teacher, adversarial=False))
    t_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    d.iteration(0)
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert all(torch.equal(t_before[k], v) for k, v in d.teacher.state_dict().items())
    assert any(not torch.equal(s_before[k], v) for k, v in d.student.state_dict().items())
    assert any(p.grad is not None for p in d.student.parameters())


def test_resume_is_exact(tiny_teacher, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    distill(cfg_for(tiny_teacher), a, progress=False)
    distill(cfg_for(tiny_teacher), b, progress=False, max_iters_this_call=2)
    distill(cfg_for(tiny_teacher), b, resume=True, progress=False)
    wa = load_file(os.path.join(a, "state", "weights.safetensors"))
    wb = load_file(os.path.join(b, "state", "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert os.path.exists(os.path.join(b, "student", "config.json"))


def test_bad_inputs(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="--steps must be 1..4"):
        DistillConfig(teacher=tiny_teacher, steps=5)
    with pytest.raises(ValueError, match="step_weights"):
        DistillConfig(teacher=tiny_teacher, steps=3, step_weights=(1.0, 2.0))
    student = str(tmp_path / "student")
    save_pretrained(Denoiser(TINY_UNET), student, {"kind": "student", "schedule": {}})
    with pytest.raises(CheckpointError, match="'student' checkpoint"):
        Distiller(cfg_for(student))
    with pytest.raises(SystemExit):
        cli.main(["distill", "--teacher", tiny_teacher, "--steps", "7", "--out", str(tmp_path / "o")])
    assert cli.main(["distill", "--teacher", str(tmp_path / "nope"), "--steps", "3",
                     "--out", str(tmp_path / "o")]) == 1


# -- more than one process ------------------------------------------------------------------

def _torchrun(nproc: int, args: list[str]) -> None:
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "flashcore.cli", "distill"] + args
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _ddp_args(teacher: str, out: str, iters: int) -> list[str]:
    return ["--teacher", teacher, "--steps", "3", "--out", out, "--iters", str(iters), "--batch-size", "4",
            "--lr", "1e-3", "--checkpoint-every", "1", "--val-every", "0", "--seed", "3"]


def _reference_two_ranks(teacher: str, iters: int):
    """What a 2-process run must compute, in one process: each rank's share of the
    batch from its own generators, the gradients averaged, one update for both."""
    cfg = cfg_for(teacher, iters=iters, lr=1e-3, seed=3)
    ranks = [Distiller(cfg, rank=r, world=2) for r in range(2)]
    srl = []
    for it in range(iters):
        outs = [d.losses(it) for d in ranks]
        for d, o in zip(ranks, outs):
            d.opt.zero_grad(set_to_none=True)
            d.disc.zero_grad(set_to_none=True)
            o["loss"].backward()
        assert outs[0]["i"] == outs[1]["i"]          # the grid time is a batch-level draw
        for ps in zip(*(d.student.parameters() for d in ranks)):
            g = (ps[0].grad + ps[1].grad) / 2
            for p in ps:
                p.grad = g.clone()
        for d in ranks:
            torch.nn.utils.clip_grad_norm_(d.student.parameters(), 1.0)
            d.opt.step()
        lds = [d.d_loss(o["d_inputs"]) for d, o in zip(ranks, outs)]
        for d, ld in zip(ranks, lds):
            d.d_opt.zero_grad(set_to_none=True)
            ld.backward()
        for ps in zip(*(d.disc.parameters() for d in ranks)):
            g = (ps[0].grad + ps[1].grad) / 2
            for p in ps:
                p.grad = g.clone()
        for d in ranks:
            d.d_opt.step()
            from flashcore.train.common import ema_update
            ema_update(d.ema, d.student, cfg.ema_decay)
        srl.append(float(sum(o["srl"] for o in outs) / 2))
    return ranks[0], srl


@pytest.mark.slow
def test_two_processes_match_the_one_process_contract(tiny_teacher, tmp_path):
    """torchrun, 2 processes, gloo: the update is the global batch's mean-loss
    gradient (checked against the same arithmetic done in one process), rank 0
    alone writes, and a resume on 2 processes continues exactly."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _torchrun(2, _ddp_args(tiny_teacher, a, 2))
    ref, ref_srl = _reference_two_ranks(tiny_teacher, 2)
    w = load_file(os.path.join(a, "state", "weights.safetensors"))
    for name, m in (("student", ref.student), ("ema", ref.ema), ("disc", ref.disc)):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(w[f"{name}/{k}"], v, rtol=1e-4, atol=1e-6, msg=f"{name}/{k}")
    assert "rng/data_rank1" in w and "rng/shared" in w
    rows = open(os.path.join(a, "loss.csv")).read().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2]          # one writer: no duplicate rows
    torch.testing.assert_close(torch.tensor([float(r.split(",")[1]) for r in rows]),
                               torch.tensor(ref_srl), rtol=1e-4, atol=1e-6)
    # resume: 2 iterations, stop, 1 more == 3 in one go
    _torchrun(2, _ddp_args(tiny_teacher, b, 3))
    _torchrun(2, _ddp_args(tiny_teacher, a, 3) + ["--resume"])
    wa = load_file(os.path.join(a, "state", "weights.safetensors"))
    wb = load_file(os.path.join(b, "state", "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    # a 2-process run resumed on 1 process would not be the same run: refused
    with pytest.raises(ValueError, match="same number"):
        distill(cfg_for(tiny_teacher, iters=4), a, resume=True, progress=False)


def test_batch_must_split_over_processes(tiny_teacher):
    with pytest.raises(ValueError, match="does not split"):
        Distiller(cfg_for(tiny_teacher, batch_size=5), rank=0, world=2)


def test_bf16_autocast_only_where_the_cpu_computes_bf16(tiny_teacher, tmp_path, monkeypatch, capsys):
    """On a CPU without oneDNN's bf16 path (AVX2 only) autocast would emulate bf16
    several times slower than float32: the run trains in float32, says so once, and
    its saved config records it; elsewhere bf16 stays, and so does a resumed bf16 run."""
    from flashcore.ops import _onednn
    for native in (False, True):
        monkeypatch.setattr(_onednn, "bf16_native", lambda native=native: native)
        run = str(tmp_path / f"run-{native}")
        distill(cfg_for(tiny_teacher, iters=1, checkpoint_every=1), run, progress=False)
        assert json.load(open(os.path.join(run, "config.json")))["bf16"] is native
        assert ("no native bfloat16" in capsys.readouterr().err) is (not native)
    # a bf16 run resumed on a CPU without native bf16 stays bf16 (exact), saying so
    monkeypatch.setattr(_onednn, "bf16_native", lambda: False)
    run = str(tmp_path / "run-True")
    distill(cfg_for(tiny_teacher, iters=2, checkpoint_every=1), run, resume=True, progress=False)
    assert json.load(open(os.path.join(run, "config.json")))["bf16"] is True
    assert "resuming in bf16 to keep the run exact" in capsys.readouterr().err


# -- validation and ablate ------------------------------------------------------------------

@pytest.fixture
def tiny_classifier(tmp_path):
    from flashcore.metrics import Classifier, ClassifierConfig, save_classifier
    torch.manual_seed(0)
    path = str(tmp_path / "clf")
    save_classifier(Classifier(ClassifierConfig(size=16)).eval(), path, {"data": "digits"})
    return path


def test_validation_exports_the_best_student(tiny_teacher, tiny_classifier, tmp_path):
    run = str(tmp_path / "run")
    distill(cfg_for(tiny_teacher, iters=4, val_every=1, val_samples=20, classifier=tiny_classifier), run,
            progress=False)
    rows = [r.split(",") for r in open(os.path.join(run, "val.csv")).read().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    best = min(rows, key=lambda r: float(r[1]))
    meta = json.load(open(os.path.join(run, "student", "config.json")))
    assert meta["validation"]["iter"] == int(best[0])
    assert meta["validation"]["fd"] == pytest.approx(float(best[1]), rel=1e-5)
    assert json.load(open(os.path.join(run, "student-last", "config.json")))["train_iters"] == 4


def test_validation_refuses_a_classifier_for_other_data(tiny_teacher, tmp_path):
    from flashcore.metrics import Classifier, ClassifierConfig, save_classifier
    save_classifier(Classifier(ClassifierConfig(size=16)), str(tmp_path / "c"), {"data": "mnist"})
    with pytest.raises(ValueError, match="trained on 'mnist'"):
        distill(cfg_for(tiny_teacher, val_every=1, classifier=str(tmp_path / "c")), str(tmp_path / "r"),
                progress=False)


@pytest.mark.slow
def test_ablate_writes_table_and_picture_and_does_not_retrain(tiny_teacher, tiny_classifier, tmp_path, capsys):
    out = str(tmp_path / "abl")
    args = ["ablate", "--teacher", tiny_teacher, "--steps", "2", "--out", out, "--iters", "2", "--batch-size", "4",
            "--val-every", "1", "--val-samples", "20", "--classifier", tiny_classifier, "--samples", "20",
            "--features", tiny_classifier, "--seed", "1", "--variants", "full,no-srl"]
    assert cli.main(args) == 0
    md = open(os.path.join(out, "ablation.md")).read()
    res = json.load(open(os.path.join(out, "ablation.json")))
    assert [r["name"] for r in res["rows"]] == ["full", "no-srl"]
    for r in res["rows"]:
        assert f"| {r['name']} |" in md and r["command"] in md
        assert set(r["eval"]) == {"1", "2"}
        assert {e["seed"] for e in r["eval"].values()} == {1}     # sampled with the distillation seed
    assert {e["seed"] for e in res["teacher_rows"].values()} == {1}
    assert "sampling seed 1" in md
    assert "--no-srl" in res["rows"][1]["command"] and "--no-srl" not in res["rows"][0]["command"]
    assert "teacher 50 steps" in md
    assert os.path.getsize(os.path.join(out, "ablation.png")) > 1000
    state = os.path.join(out, "runs", "full", "state", "state.json")
    before = os.path.getmtime(state)
    assert cli.main(args) == 0                       # a second call reuses the finished runs
    assert os.path.getmtime(state) == before
    assert cli.main(args[:-1] + ["full,nope"]) == 1
    assert "unknown variant" in capsys.readouterr().err


def test_student_teacher_shape_mismatch_is_a_clear_error(tiny_teacher, tmp_path, capsys):
    """Resuming a run after its teacher was replaced by another architecture, and a
    demo given a student of another shape than its teacher, both say so."""
    run = str(tmp_path / "run")
    distill(cfg_for(tiny_teacher), run, progress=False, max_iters_this_call=2)
    other = dataclasses.replace(TINY_UNET, block_out_channels=(16, 32))
    save_pretrained(Denoiser(other), tiny_teacher, {"kind": "teacher", "guidance": 2.0, "data": "digits",
                                                    "schedule": {"kind": "scaled_linear"}})
    with pytest.raises(CheckpointError, match="do not fit the model"):
        distill(cfg_for(tiny_teacher), run, resume=True, progress=False)
    small_student = str(tmp_path / "student")
    save_pretrained(Denoiser(TINY_UNET), small_student, {"kind": "student", "data": "digits", "steps": 3,
                                                         "schedule": {"kind": "scaled_linear"}})
    assert cli.main(["demo", "--teacher", tiny_teacher, "--student", small_student, "--student-1step", "",
                     "--student-2step", "", "--teacher-steps", "2", "--out", str(tmp_path / "d.png")]) == 1
    assert "does not have the teacher's architecture" in capsys.readouterr().err


def test_demo_puts_teacher_and_students_side_by_side(tiny_teacher, tmp_path, capsys):
    student = str(tmp_path / "student")
    save_pretrained(Denoiser(TINY_UNET), student, {"kind": "student", "data": "digits", "steps": 3,
                                                   "schedule": {"kind": "scaled_linear"}})
    out = str(tmp_path / "demo.png")
    assert cli.main(["demo", "--teacher", tiny_teacher, "--student", student, "--student-1step", student,
                     "--student-2step", "", "--teacher-steps", "2", "--per-class", "1", "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[:4]] == ["teacher,", "3-step", "3-step", "1-step"]
    assert all("ms/image" in ln for ln in lines[:4])
    # a student distilled for 2 steps takes the 2-step row
    assert cli.main(["demo", "--teacher", tiny_teacher, "--student", student, "--student-1step", student,
                     "--student-2step", student, "--teacher-steps", "2", "--per-class", "1", "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[:4]] == ["teacher,", "3-step", "2-step", "1-step"]
    assert os.path.getsize(out) > 1000
