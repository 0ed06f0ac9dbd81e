"""DisBack on a tiny teacher: the path, who trains on what, the switching rule, resume, CLI."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from flashcore import data as fdata
from flashcore.models import Denoiser, load_pretrained, save_pretrained
from flashcore.schedule import NoiseSchedule
from flashcore.train import disback as db
from flashcore.train.disback import DisBackConfig, DisBackTrainer, disback
from flashcore.train.disback_path import RawNet, dsm_loss, load_path_weights, path_dir, target_index

from _fixtures import TINY_UNET


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """TINY_UNET after 10 steps on digits: enough that real digits have a much lower
    diffusion loss (about 0.2) than the 1-step generator's samples (about 1.0), so the
    path has somewhere to go. A random teacher would not do: fine-tuning it on anything
    lowers its loss on real digits too."""
    torch.manual_seed(0)
    model = Denoiser(TINY_UNET).train()
    x, y = fdata.split(fdata.load("digits", size=16, channels=1), "train")
    sched = NoiseSchedule()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        idx = torch.randint(0, len(x), (16,), generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        eps = torch.randn((16, 1, 16, 16), generator=g)
        loss = (model(sched.add_noise(x[idx], eps, t), t, y[idx]) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = str(tmp_path_factory.mktemp("disback") / "teacher")
    save_pretrained(model, path, {"kind": "teacher", "guidance": 2.0, "data": "digits",
                                  "schedule": {"kind": "scaled_linear"}})
    return path


def cfg_for(teacher, **kw):
    base = DisBackConfig(teacher=teacher, iters=2, batch_size=4, path_checkpoints=2, path_every=1,
                         switch_every=1, fake_updates=1, checkpoint_every=2, val_every=0, bf16=False,
                         sample_every_checkpoint=False)
    return dataclasses.replace(base, **kw)


def rows(path):
    """A CSV log's rows without the wall-clock column."""
    return [r.split(",")[:-1] for r in open(path).read().splitlines()[1:]]


@pytest.mark.slow    # 25-35 s on a loaded 2-core machine: in make test-slow
def test_degradation_path_moves_from_the_teacher_to_the_initial_generator(teacher, tmp_path):
    """Fixed batches, fixed noise and times: along s_0 (teacher) .. s_3 the diffusion loss
    falls on the initial generator's samples and rises on real digits."""
    cfg = cfg_for(teacher, path_checkpoints=3, path_every=3, path_lr=1e-3, batch_size=8)
    run = str(tmp_path / "run")
    probe = DisBackTrainer(cfg, run)
    probe.student.eval()
    x_gen, y_gen = probe.generator_samples(16, grad=False)                  # G_0's samples
    x, y = fdata.split(fdata.load("digits", size=16, channels=1), "train")
    x_real, y_real = x[:800:50], y[:800:50]
    t = torch.linspace(50, 950, 16).long()
    eps = torch.randn((16, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    disback(cfg, run, progress=False, max_iters_this_call=9, device="cpu")   # stage 1 only
    assert len(rows(os.path.join(run, "path.csv"))) == 9
    on_gen, on_real = [], []
    for k in range(4):
        load_path_weights(probe.aux, run, k, probe.teacher)
        with torch.no_grad():
            on_gen.append(float(dsm_loss(RawNet(probe.aux), probe.aux, probe.sched, x_gen, y_gen, t, eps, False)))
            on_real.append(float(dsm_loss(RawNet(probe.aux), probe.aux, probe.sched, x_real, y_real, t, eps, False)))
    assert all(a > b for a, b in zip(on_gen, on_gen[1:])), on_gen
    assert all(a < b for a, b in zip(on_real, on_real[1:])), on_real
    # seeds 0-3 of this set-up (teacher and path): real x1.36 to x1.75, generator x0.81 to x0.86
    assert on_real[-1] > 1.2 * on_real[0] and on_gen[-1] < 0.95 * on_gen[0]
    _, meta = load_pretrained(path_dir(run, 2), kinds=("teacher",))
    assert meta["disback_path"] == {"index": 2, "checkpoints": 3, "degradation_iters": 6}


@pytest.mark.slow    # 25-35 s on a loaded 2-core machine: in make test-slow
def test_fake_model_trains_only_on_generator_samples(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(fdata, "load", lambda *a, **k: pytest.fail("DisBack loaded a data set"))
    trainers, made, seen = [], [], []
    init, samples, real_dsm = DisBackTrainer.__init__, DisBackTrainer.generator_samples, db.dsm_loss

    def spy_init(self, *a, **k):
        init(self, *a, **k)
        trainers.append(self)

    def spy_samples(self, b, grad):
        x0, labels = samples(self, b, grad)
        made.append(x0.detach().clone())
        return x0, labels

    def spy_dsm(raw, model, *a):
        seen.append((model, a[1].clone()))                      # a[1]: the clean samples x0
        return real_dsm(raw, model, *a)
    monkeypatch.setattr(DisBackTrainer, "__init__", spy_init)
    monkeypatch.setattr(DisBackTrainer, "generator_samples", spy_samples)
    monkeypatch.setattr(db, "dsm_loss", spy_dsm)
    disback(cfg_for(teacher, fake_updates=3), str(tmp_path / "run"), progress=False, device="cpu")
    tr = trainers[0]
    fake_inputs = [x for m, x in seen if m is tr.fake]
    assert len(fake_inputs) == 2 * 3                            # iters x fake_updates
    assert {id(m) for m, _ in seen} == {id(tr.fake), id(tr.aux)}
    for x0 in fake_inputs:
        assert any(torch.equal(x0, g) for g in made)


def test_target_index_rules():
    fixed = [target_index(it, 5, "fixed", 10, 10) for it in range(0, 60, 10)]
    assert fixed == [4, 3, 2, 1, 0, 0]
    assert [target_index(it, 5, "fixed", 10, 10) for it in (9, 10, 39, 40)] == [4, 3, 1, 0]
    # the released code compares k * path_every with the iteration: it stalls at s_2 here
    released = [target_index(it, 5, "released", 10, 10) for it in range(0, 60, 10)]
    assert released == [4, 3, 2, 2, 2, 2]
    assert [target_index(it, 3, "released", 10, 20) for it in range(0, 40, 10)] == [2, 1, 0, 0]


def test_backtracking_walks_the_path_in_reverse(teacher, tmp_path, monkeypatch):
    """The real score model at each iteration: s_2, s_2, s_1, s_1, s_0 (the teacher), s_0,
    loaded from the path's files, and the log says the same."""
    run = str(tmp_path / "run")
    visited = []
    iteration = DisBackTrainer.iteration

    def spy(self, it):
        r = iteration(self, it)
        visited.append((r["path_index"], {k: v.clone() for k, v in self.real.state_dict().items()}))
        return r
    monkeypatch.setattr(DisBackTrainer, "iteration", spy)
    disback(cfg_for(teacher, path_checkpoints=3, switch_every=2, iters=6, checkpoint_every=6), run,
            progress=False, device="cpu")
    assert [k for k, _ in visited] == [2, 2, 1, 1, 0, 0]
    assert [int(r[3]) for r in rows(os.path.join(run, "loss.csv"))] == [2, 2, 1, 1, 0, 0]
    teacher_sd = load_pretrained(teacher)[0].state_dict()
    for k, sd in visited:
        want = teacher_sd if k == 0 else load_pretrained(path_dir(run, k))[0].state_dict()
        assert all(torch.equal(sd[n], want[n]) for n in want)
    assert json.load(open(os.path.join(run, "state", "state.json")))["extra"]["path_index"] == 0


def test_resume_is_exact(teacher, tmp_path):
    """2 path + 2 backtracking iterations in one go, or stopped inside stage 1 and again
    inside stage 2: the same weights, optimiser states, RNG states and logs."""
    cfg = cfg_for(teacher, fake_updates=2)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    disback(cfg, a, progress=False, device="cpu")
    disback(cfg, b, progress=False, device="cpu", max_iters_this_call=1)          # inside stage 1
    assert json.load(open(os.path.join(b, "state", "state.json")))["extra"]["stage"] == "path"
    disback(cfg, b, resume=True, progress=False, device="cpu", max_iters_this_call=2)   # 1 + 1
    st = json.load(open(os.path.join(b, "state", "state.json")))
    assert (st["extra"]["stage"], st["step"]) == ("backtrack", 1)
    disback(cfg, b, resume=True, progress=False, device="cpu")
    wa = load_file(os.path.join(a, "state", "weights.safetensors"))
    wb = load_file(os.path.join(b, "state", "weights.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("fake/") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for log in ("path.csv", "loss.csv"):
        assert rows(os.path.join(a, log)) == rows(os.path.join(b, log))


def test_bad_configs(teacher):
    with pytest.raises(ValueError, match="--steps must be 1..4"):
        DisBackConfig(teacher=teacher, steps=5)
    with pytest.raises(ValueError, match="t_min"):
        DisBackConfig(teacher=teacher, t_min=600, t_max=500)
    with pytest.raises(ValueError, match="switch_rule"):
        DisBackConfig(teacher=teacher, switch_rule="sometimes")
    with pytest.raises(ValueError, match="fake_updates"):
        DisBackConfig(teacher=teacher, fake_updates=0)
    with pytest.raises(ValueError, match="beyond the teacher's last timestep"):
        DisBackTrainer(cfg_for(teacher, t_max=1000), "unused")


def test_cli_end_to_end(teacher, tmp_path, capsys):
    from flashcore import cli
    run, conf = str(tmp_path / "run"), tmp_path / "c.json"
    conf.write_text(json.dumps({"bf16": False, "sample_every_checkpoint": False}))     # fields without flags
    args = ["disback", "--teacher", teacher, "--out", run, "--iters", "2", "--path-checkpoints", "1",
            "--path-every", "1", "--fake-updates", "1", "--batch-size", "4", "--val-every", "0",
            "--config", str(conf), "--device", "cpu"]
    assert cli.main(args) == 0
    model, meta = load_pretrained(os.path.join(run, "student"), kinds=("student",))
    assert (meta["steps"], meta["method"], meta["train_iters"]) == (1, "disback", 2)
    assert isinstance(model, Denoiser)
    assert json.load(open(os.path.join(run, "config.json")))["fake_updates"] == 1
    assert "student saved to" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:                    # usage errors: exit 2 before anything runs
        cli.main(["disback", "--teacher", teacher, "--out", str(tmp_path / "x"), "--switch-rule", "often"])
    assert e.value.code == 2
    assert cli.main(["disback", "--teacher", teacher, "--out", run, "--lr", "1e-3", "--resume"]) == 1
    assert "was started with --lr" in capsys.readouterr().err


# -- more than one process ------------------------------------------------------------------------

def _torchrun_disback(args: list[str]) -> None:
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "flashcore.cli", "disback"] + args
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _ddp_cfg(teacher):
    return cfg_for(teacher, iters=2, path_checkpoints=2, path_every=1, switch_every=1, fake_updates=2,
                   checkpoint_every=1, lr=1e-3, fake_lr=1e-3, path_lr=1e-3, seed=3)


def _ddp_args(teacher, out: str, conf, iters: int) -> list[str]:
    return ["--teacher", teacher, "--out", out, "--iters", str(iters), "--batch-size", "4", "--path-checkpoints",
            "2", "--path-every", "1", "--switch-every", "1", "--fake-updates", "2", "--checkpoint-every", "1",
            "--lr", "1e-3", "--fake-lr", "1e-3", "--path-lr", "1e-3", "--val-every", "0", "--seed", "3",
            "--config", str(conf), "--device", "cpu"]


def _reference_two_ranks(cfg, run_dir: str):
    """What a 2-process run must compute, in one process: a trainer per rank (its own
    per-rank generator and half the batch), each in a thread, averaging the gradients of
    every update where DDP does and the logged figures where the all-reduce does."""
    import threading
    trs = [DisBackTrainer(cfg, run_dir, rank=r, world=2, device="cpu") for r in range(2)]
    barrier = threading.Barrier(2, timeout=300)
    box, logs, failed = [None, None], [[], []], []

    def mean(rank, tensors):
        box[rank] = tensors
        barrier.wait()
        out = [(a + b) / 2 for a, b in zip(*box)]
        barrier.wait()                   # both have read the other's before either moves on
        return out

    def update(self, loss, model, opt, it):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(model.parameters())
        for p, g in zip(params, mean(self.rank, [p.grad for p in params])):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, db.GRAD_CLIP)
        opt.step()

    def over_ranks(self, xs):
        return [float(v) for v in mean(self.rank, [torch.tensor(x, dtype=torch.float64) for x in xs])]

    def rank_body(r):
        tr = trs[r]
        try:
            tr.student.eval()                                      # G_0 while degrading, as disback()
            for it in range(cfg.path_checkpoints * cfg.path_every):
                tr.degradation_iteration(it)
                if (it + 1) % cfg.path_every == 0 and r == 0:
                    tr.save_path((it + 1) // cfg.path_every, it + 1)
            barrier.wait()                                         # the path is on disk for both
            tr.student.train()
            tr.start_backtracking()
            for it in range(cfg.iters):
                logs[r].append(tr.iteration(it))
        except BaseException as e:       # noqa: BLE001  re-raised by the main thread
            failed.append(e)
            barrier.abort()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DisBackTrainer, "_update", update)
        mp.setattr(DisBackTrainer, "_mean_over_ranks", over_ranks)
        threads = [threading.Thread(target=rank_body, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if failed:
        raise failed[0]
    assert logs[0] == logs[1]
    return trs[0], logs[0]


@pytest.mark.slow    # two torchrun launches of 2 processes: minutes on a loaded 2-core machine
def test_two_processes_match_the_one_process_contract(teacher, tmp_path):
    """torchrun, 2 processes, gloo: the path, the generator, its EMA and the fake model
    are the gradient-averaged updates of the global batch (checked against the same
    arithmetic in one process), rank 0 alone writes, and a resume on 2 processes
    continues exactly."""
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"bf16": False, "sample_every_checkpoint": False}))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _torchrun_disback(_ddp_args(teacher, a, conf, 2))
    ref, ref_logs = _reference_two_ranks(_ddp_cfg(teacher), str(tmp_path / "ref"))
    w = load_file(os.path.join(a, "state", "weights.safetensors"))
    for name, m in (("student", ref.student), ("ema", ref.ema), ("fake", ref.fake)):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(w[f"{name}/{k}"], v, rtol=1e-4, atol=1e-6, msg=f"{name}/{k}")
    for k in (1, 2):
        got = load_pretrained(path_dir(a, k))[0].state_dict()
        want = load_pretrained(path_dir(str(tmp_path / "ref"), k))[0].state_dict()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=f"path {k} {n}")
    assert "rng/data_rank1" in w and "rng/shared" in w
    logged = rows(os.path.join(a, "loss.csv"))
    assert [int(r[0]) for r in logged] == [1, 2]                     # one writer: no duplicate rows
    torch.testing.assert_close(torch.tensor([[float(r[1]), float(r[2])] for r in logged]),
                               torch.tensor([[x["gap"], x["fake"]] for x in ref_logs]), rtol=1e-4, atol=1e-6)
    # resume on 2 processes: 1 update, stop, 1 more == 2 in one go
    _torchrun_disback(_ddp_args(teacher, b, conf, 1))
    _torchrun_disback(_ddp_args(teacher, b, conf, 2) + ["--resume"])
    wb = load_file(os.path.join(b, "state", "weights.safetensors"))
    assert w.keys() == wb.keys() and all(torch.equal(w[k], wb[k]) for k in w)
    with pytest.raises(ValueError, match="same number"):              # resumed on 1 process: refused
        disback(_ddp_cfg(teacher), b, resume=True, progress=False, device="cpu")
