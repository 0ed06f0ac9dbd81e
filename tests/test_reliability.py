"""Files and runs: a checkpoint survives a crash at any point of its save, one run
folder has one writer, broken checkpoints are refused in one line, concurrent
PNG writes never collide, a failed run leaves no folder behind."""
import builtins
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashcore import checkpoint as ck
from flashcore import cli
from flashcore.checkpoint import CheckpointError
from flashcore.models import Denoiser, load_pretrained, save_pretrained
from flashcore.train import common

from _fixtures import TINY_UNET


# -- crash at every file operation of a save ----------------------------------------------------

class Crash(BaseException):
    """The process dies here (BaseException: no ``except Exception`` handler sees it)."""


@contextlib.contextmanager
def filesystem_faults(crash_at: int | None):
    """Count the filesystem calls a save makes; with ``crash_at = k`` the k-th call (from 0)
    does not happen and raises Crash, and so does every later one, as after a kill -9:
    no clean-up code gets to touch the disk. ``safetensors`` writes are torn: half the
    file is on disk when the crash comes."""
    state = {"n": 0, "dead": False}

    def wrap(fn, name, torn=False):
        def call(*a, **kw):
            if state["dead"]:
                raise Crash(f"after the crash: {name}")
            if state["n"] == crash_at:
                state["dead"] = True
                if torn:
                    fn(*a, **kw)
                    path = a[1]
                    with real_open(path, "r+b") as f:
                        f.truncate(os.path.getsize(path) // 2)
                raise Crash(f"call {crash_at}: {name}")
            state["n"] += 1
            return fn(*a, **kw)
        return call

    real_open = builtins.open
    with pytest.MonkeyPatch.context() as mp:
        for name in ("replace", "rename", "fsync", "open", "mkdir", "remove", "unlink", "rmdir", "chmod",
                     "ftruncate", "write"):
            mp.setattr(os, name, wrap(getattr(os, name), f"os.{name}"))
        mp.setattr(ck, "save_file", wrap(ck.save_file, "save_file", torn=True))
        # (the torn write itself uses the unpatched open)
        mp.setattr(builtins, "open", wrap(real_open, "open"))
        yield state


@dataclasses.dataclass
class TinyConfig:
    lr: float = 1e-2
    width: int = 4


def tiny_run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    ema = common.make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    return model, ema, opt, gen


def train_step(model, ema, opt, gen):
    x = torch.randn(8, 4, generator=gen)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    common.ema_update(ema, model, 0.5)


def save(run, step, model, ema, opt, gen):
    common.save_state(run, step, {"model": model, "ema": ema}, {"opt": opt}, {"data": gen}, TinyConfig())


def snapshot(model, ema, opt):
    out = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    out.update({f"ema/{k}": v.clone() for k, v in ema.state_dict().items()})
    for i, st in opt.state_dict()["state"].items():
        out.update({f"opt/{i}/{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def resume(run):
    """What --resume does: hold the folder, then load the state into fresh objects."""
    model, ema, opt, gen = tiny_run()
    with common.run_folder(run, resume=True, what="test"):
        st = common.load_state(run, {"model": model, "ema": ema}, {"opt": opt}, {"data": gen}, "TinyConfig")
    return st["step"], snapshot(model, ema, opt)


def test_a_crash_anywhere_in_a_save_leaves_a_loadable_checkpoint(tmp_path):
    model, ema, opt, gen = tiny_run()
    train_step(model, ema, opt, gen)
    expect = {1: snapshot(model, ema, opt)}
    train_step(model, ema, opt, gen)
    expect[2] = snapshot(model, ema, opt)
    assert any(not torch.equal(expect[1][k], expect[2][k]) for k in expect[1])

    def prepared(run):                  # a run with step 1 saved, its objects at step 2
        m, e, o, g = tiny_run()
        train_step(m, e, o, g)
        save(run, 1, m, e, o, g)
        train_step(m, e, o, g)
        return m, e, o, g

    objs = prepared(str(tmp_path / "count"))
    with filesystem_faults(None) as count:
        save(str(tmp_path / "count"), 2, *objs)
    n_ops = count["n"]
    assert n_ops >= 10                   # tensors, json, fsyncs, renames: every one is a crash point

    seen = set()
    for k in range(n_ops):
        run = str(tmp_path / f"k{k}")
        objs = prepared(run)
        with pytest.raises(Crash), filesystem_faults(k):
            save(run, 2, *objs)
        step, got = resume(run)          # never an error
        assert step in (1, 2), k
        assert got.keys() == expect[step].keys()
        assert all(torch.equal(got[n], expect[step][n]) for n in got), (k, step)
        seen.add(step)
        # the run goes on: the next save works, and the stale pieces are gone
        with common.run_folder(run, resume=True, what="test"):
            save(run, 3, *objs)
        assert resume(run)[0] == 3
        assert sorted(os.listdir(run)) == ["state"], (k, os.listdir(run))
    assert seen == {1, 2}                # early crashes keep the old state, late ones the new


def test_a_crash_anywhere_in_an_export_leaves_a_loadable_model(tmp_path):
    torch.manual_seed(0)
    a, b = Denoiser(TINY_UNET).eval(), Denoiser(TINY_UNET).eval()
    meta = {"kind": "teacher", "schedule": {}}
    key = "conv_in.weight"
    save_pretrained(a, str(tmp_path / "count"), meta)
    with filesystem_faults(None) as count:              # over an existing export, as in a run
        save_pretrained(b, str(tmp_path / "count"), meta)
    n_ops = count["n"]
    seen = set()
    for k in range(n_ops):
        path = str(tmp_path / f"k{k}" / "teacher")
        save_pretrained(a, path, meta)
        with pytest.raises(Crash), filesystem_faults(k):
            save_pretrained(b, path, meta)
        got = load_pretrained(path)[0].net.state_dict()[key]
        which = [n for n, m in (("a", a), ("b", b)) if torch.equal(got, m.net.state_dict()[key])]
        assert len(which) == 1, k
        seen.add(which[0])
    assert seen == {"a", "b"}


# -- one writer per run folder --------------------------------------------------------------

def test_a_second_holder_gets_one_clear_error_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    with common.run_folder(run, resume=None, what="train-teacher"):
        assert open(os.path.join(run, ".lock")).read().strip() == str(os.getpid())
        with pytest.raises(common.RunLocked, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            with common.run_folder(run, resume=None, what="distill"):
                pass
        # through the CLI: exit 1, one line, and the held folder is left alone
        assert cli.main(["train-teacher", "--out", run, "--data", "digits", "--steps", "1"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("flashcore: error: train-teacher:") and "in use by another run" in err
        assert err.count("\n") == 1
        assert os.path.exists(os.path.join(run, ".lock"))
    assert not os.path.exists(os.path.join(run, ".lock"))          # released on exit
    with common.run_folder(run, resume=None, what="distill"):       # and free again
        pass


def test_a_lock_file_left_by_a_dead_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(f"{dead.pid}\n")
    with common.run_folder(str(run), resume=None, what="test"):
        assert (run / ".lock").read_text().strip() == str(os.getpid())


def test_a_killed_holder_releases_the_folder(tmp_path):
    run = str(tmp_path / "run")
    code = ("import sys, time\nfrom flashcore.train import common\n"
            f"with common.run_folder({run!r}, resume=None, what='holder'):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(common.RunLocked, match=f"pid {p.pid}"):
            with common.run_folder(run, resume=None, what="test"):
                pass
    finally:
        p.kill()                                                    # SIGKILL: no clean-up runs
        p.wait()
    assert os.path.exists(os.path.join(run, ".lock"))               # the stale file is still there
    with common.run_folder(run, resume=None, what="test"):
        pass


# -- the run folder's life cycle ----------------------------------------------------------------

def test_a_failed_run_removes_only_a_folder_it_created(tmp_path):
    new = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError):
        with common.run_folder(str(new), resume=False, what="test"):
            (new / "loss.csv").write_text("step\n")
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()                            # its created parents too

    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with common.run_folder(str(old), resume=False, what="test"):
            raise RuntimeError("boom")
    assert (old / "notes.txt").read_text() == "mine"

    kept = tmp_path / "kept"                                        # a run with a checkpoint stays resumable
    with pytest.raises(RuntimeError):
        with common.run_folder(str(kept), resume=False, what="test"):
            save(str(kept), 1, *tiny_run())
            raise RuntimeError("NaN later")
    assert common.saved_step(str(kept)) == 1


def test_resume_and_overwrite_checks(tmp_path):
    run = str(tmp_path / "run")
    with pytest.raises(common.RunError, match="nothing to resume"):
        with common.run_folder(run, resume=True, what="test"):
            pass
    assert not os.path.exists(run)                                  # a failed --resume leaves nothing
    with common.run_folder(run, resume=False, what="test"):
        save(run, 1, *tiny_run())
    with pytest.raises(common.RunError, match="already holds a run"):
        with common.run_folder(run, resume=False, what="test"):
            pass
    assert common.has_state(run)


def test_an_interrupted_run_says_so_and_resumes(tmp_path, monkeypatch):
    from flashcore.train.teacher import TeacherConfig, train_teacher
    cfg = TeacherConfig(data="digits", steps=2, batch_size=2, warmup=1, checkpoint_every=10, sample_steps=1,
                        bf16=False, model=dataclasses.replace(TINY_UNET))
    calls = []
    real = common.ema_update

    def ema_then_sigterm(*a):
        real(*a)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(common, "ema_update", ema_then_sigterm)
    run = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(common.Interrupted) as e:
        train_teacher(cfg, run, progress=False)
    msg = str(e.value)
    assert "interrupted by SIGTERM at step 1 of 2" in msg and "resume with --resume" in msg and "\n" not in msg
    assert common.saved_step(run) == 1
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(common, "ema_update", real)
    train_teacher(cfg, run, resume=True, progress=False)
    assert common.saved_step(run) == 2


# -- strict loading -----------------------------------------------------------------------------

@pytest.fixture
def saved_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m"
    save_pretrained(Denoiser(TINY_UNET), str(path), {"kind": "teacher", "guidance": 2.0, "schedule": {}})
    return path


def _rewrite_weights(path, change):
    f = str(path / "unet" / "diffusion_pytorch_model.safetensors")
    w = load_file(f)
    change(w)
    save_file(w, f)


def _rewrite_config(path, change):
    f = path / "config.json"
    c = json.loads(f.read_text())
    change(c)
    f.write_text(json.dumps(c))


def _set(d, keys, v):
    for k in keys[:-1]:
        d = d[k]
    if v is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = v


@pytest.mark.parametrize("what,change,names", [
    ("missing tensor", lambda w: w.pop("conv_in.weight"), "'conv_in.weight' is missing"),
    ("NaN weights", lambda w: w["conv_in.bias"].fill_(float("nan")), "'conv_in.bias' holds NaN"),
    ("int32 weights", lambda w: w.__setitem__("conv_out.weight", w["conv_out.weight"].to(torch.int32)),
     "'conv_out.weight' is int32"),
    ("extra tensor", lambda w: w.__setitem__("stray", torch.zeros(1)), "'stray' is not in the model"),
])
def test_broken_weights_are_one_error_line(saved_model, what, change, names):
    _rewrite_weights(saved_model, change)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(str(saved_model))
    msg = str(e.value)
    assert names in msg and "diffusion_pytorch_model.safetensors" in msg and "\n" not in msg, what


@pytest.mark.parametrize("keys,value,names", [
    (["model", "num_classes"], 5, "'class_embedding.weight' has shape (11,"),      # config and weights disagree
    (["model"], KeyError, "field 'model' is missing"),
    (["model", "arch"], KeyError, "field 'model.arch' is missing"),
    (["model", "sample_size"], "16", "field 'model.sample_size' must be an integer"),
    (["model", "block_out_channels"], {"a": 1}, "field 'model.block_out_channels' must be a list of numbers"),
    (["model", "layers_per_block"], 0, "field 'model.layers_per_block' must be a positive integer"),
    (["model", "arch"], "vit", "field 'model': model: unknown arch 'vit'"),
    (["model", "depth"], 3, "field 'model.depth' is not a ModelConfig field"),
    (["kind"], 3, "field 'kind' must be a string"),
    (["guidance"], "high", "field 'guidance' must be a number or null"),
    (["schedule", "kind"], "zigzag", "field 'schedule': schedule: unknown kind 'zigzag'"),
    (["schedule", "num_train_timesteps"], 1.5, "field 'schedule.num_train_timesteps' must be an integer"),
])
def test_broken_configs_are_one_error_line(saved_model, keys, value, names):
    _rewrite_config(saved_model, lambda c: _set(c, keys, value))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(str(saved_model))
    msg = str(e.value)
    assert names in msg and str(saved_model) in msg and "\n" not in msg


@pytest.mark.parametrize("text,names", [("[1, 2]", "must be a JSON object"),
                                        ("[" * 100000 + "]" * 100000, "not valid JSON")])
def test_config_json_that_is_not_an_object(saved_model, text, names, capsys):
    (saved_model / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=names):
        load_pretrained(str(saved_model))
    assert cli.main(["generate", "--model", str(saved_model), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flashcore: error: checkpoint:") and err.count("\n") == 1 and "config.json" in err


def _saved_state(tmp_path):
    run = str(tmp_path / "run")
    objs = tiny_run()
    train_step(*objs)
    save(run, 1, *objs)
    return run


def _load(run):
    model, ema, opt, gen = tiny_run()
    return common.load_state(run, {"model": model, "ema": ema}, {"opt": opt}, {"data": gen}, "TinyConfig")


def _edit_state(run, weights=None, state=None):
    sdir = os.path.join(run, "state")
    wf, sf = os.path.join(sdir, "weights.safetensors"), os.path.join(sdir, "state.json")
    st = json.load(open(sf))
    if weights:
        w = load_file(wf)
        weights(w)
        save_file(w, wf)
        st["sha256"] = ck.sha256(wf)          # a consistent checkpoint, not a torn one
    if state:
        state(st)
    json.dump(st, open(sf, "w"))


@pytest.mark.parametrize("weights,state,names", [
    (lambda w: w.pop("model/0.weight"), None, "'model/0.weight' is missing"),
    (lambda w: w["ema/2.bias"].fill_(float("inf")), None, "'ema/2.bias' holds NaN or infinite"),
    (lambda w: w.__setitem__("model/1.weight", w["model/1.weight"].to(torch.int32)), None,
     "'model/1.weight' is int32"),
    (lambda w: w["opt_opt.0.exp_avg"].fill_(float("nan")), None, "'opt_opt.0.exp_avg' holds NaN"),
    (lambda w: w.pop("opt_opt.1.exp_avg_sq"), None, "'opt_opt.1.exp_avg_sq' is missing"),
    (lambda w: w.pop("rng/data"), None, "'rng/data' is missing"),
    (None, lambda s: s.pop("step"), "field 'step' is missing"),
    (None, lambda s: s.__setitem__("step", "1"), "field 'step' must be an integer"),
    (None, lambda s: s.__setitem__("config", []), "field 'config' must be an object"),
    (None, lambda s: s["optimizers"].pop("opt"), "field 'optimizers.opt' is missing"),
    (None, lambda s: s["optimizers"]["opt"].__setitem__("param_groups", 7),
     "field 'optimizers.opt.param_groups' must be a list"),
    (None, lambda s: s["optimizers"]["opt"]["param_groups"][0]["params"].pop(), "optimizer state does not fit"),
])
def test_broken_training_state_is_one_error_line(tmp_path, weights, state, names):
    run = _saved_state(tmp_path)
    _edit_state(run, weights, state)
    with pytest.raises(CheckpointError) as e:
        _load(run)
    msg = str(e.value)
    assert names in msg and os.path.join(run, "state") in msg and "\n" not in msg


def test_saved_config_is_checked_field_by_field(tmp_path):
    run = _saved_state(tmp_path)
    assert common.saved_config_as(run, TinyConfig) == TinyConfig()
    _edit_state(run, state=lambda s: s["config"].__setitem__("width", "wide"))
    with pytest.raises(CheckpointError, match="state.json: field 'config.width' must be an integer"):
        common.saved_config_as(run, TinyConfig)
    _edit_state(run, state=lambda s: s["config"].__setitem__("depth", 2))
    with pytest.raises(CheckpointError, match="field 'config.depth' is not a TinyConfig field"):
        common.saved_config_as(run, TinyConfig)


# -- concurrent PNG writes ----------------------------------------------------------------------

def test_concurrent_png_writes_never_collide(tmp_path):
    import numpy as np
    from PIL import Image

    from flashcore.images import save_png
    path = str(tmp_path / "grid.png")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 1), dtype=np.uint8) for _ in range(4)]
    save_png(images[0], path)
    errors, bad_reads, reads = [], [], [0]
    done = threading.Event()

    def writer(i):
        try:
            for _ in range(100):
                save_png(images[i], path)
        except Exception as e:          # noqa: BLE001 - every failure is counted
            errors.append(repr(e))

    def reader():
        while not done.is_set():
            try:
                with Image.open(path) as im:
                    a = np.asarray(im)
                if not any(np.array_equal(a, img[..., 0]) for img in images):
                    bad_reads.append("not one of the written images")
            except Exception as e:      # noqa: BLE001
                bad_reads.append(repr(e))
            reads[0] += 1

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert errors == [] and bad_reads == [] and reads[0] > 0
    assert os.listdir(tmp_path) == ["grid.png"]          # no temporary file left behind
