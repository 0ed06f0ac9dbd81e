"""``flashcore eval``: FD, class accuracy, blank/washed shares of a model's
samples at a given step count, next to the real-vs-real FD floor."""
from __future__ import annotations

import time

import torch

from . import data as fdata
from .metrics import blank_and_washed, features_and_logits, frechet_distance, load_classifier
from .models import load_pretrained
from .schedule import NoiseSchedule, ScheduleConfig


def generate(model, meta: dict, labels: torch.Tensor, *, steps: int, guidance: float,
             noise_correction: bool = True, clip: float = 0.0, seed: int = 0, batch: int = 250,
             compile: bool = False, dtype: torch.dtype = torch.float32):
    """Samples for ``labels`` in batches; returns (x0 (N, C, H, W), seconds).

    Runs on ``flashcore.engine.Engine``. With the defaults (eager, float32) the
    result is exactly ``flashcore.sampler.sample``'s, batch by batch. ``compile``
    and ``dtype=torch.bfloat16`` trade a compile (tens of seconds for the shipped
    UNet, counted in ``seconds``) and bf16 rounding for faster steps.

    Why eager is the default. Measured on the shipped UNet (random weights),
    3-step student, batch 16, one thread, on a busy 2-core machine: eager 2.5 s
    a sampler call, compiled 0.86 s, i.e. ~0.55 s saved per network call (~9 s
    at the eval's batch 256 if it scales with the batch), against a cold
    compile of 350 s. A 1000-sample eval makes 4 x 3 = 12 network calls for a
    3-step student (~100 s saved: no win) and 4 x 50 for a 50-step teacher (a
    clear win: pass ``compile=True``). Eager also keeps eval numbers equal to
    the reference sampler's, independent of inductor versions, and keeps the
    compile out of ``flashcore demo``'s timing. ``bench/bench_e2e.py`` gives the
    compile and per-image rows to redo this sum on a quiet machine.
    """
    from .engine import Engine
    sched = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
    shape = (model.cfg.channels, model.cfg.sample_size, model.cfg.sample_size)
    engine = Engine(model, sched, steps=steps, guidance=guidance, noise_correction=noise_correction, clip=clip,
                    dtype=dtype, compile=compile)
    g = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(labels), batch):
        lab = labels[i:i + batch]
        x_T = torch.randn((len(lab),) + shape, generator=g)
        out.append(engine.sample(lab, x_T=x_T))
    return torch.cat(out), time.perf_counter() - t0


def evaluate(model_dir: str, classifier_dir: str, *, steps: int, guidance: float | None = None,
             samples: int = 1000, seed: int = 0, noise_correction: bool = True,
             clip: float = 0.0, compile: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    model, meta = load_pretrained(model_dir)
    clf, cmeta = load_classifier(classifier_dir)
    if cmeta["data"] != meta.get("data"):
        raise ValueError(f"eval: the classifier was trained on {cmeta['data']!r} but the model on "
                         f"{meta.get('data')!r}")
    if guidance is None:
        guidance = float(meta.get("guidance") or 1.0)   # a distilled student has none: 1 NFE a step
    ds = fdata.load(meta["data"])
    k = model.cfg.num_classes
    labels = torch.arange(samples) % k
    x, secs = generate(model, meta, labels, steps=steps, guidance=guidance,
                       noise_correction=noise_correction, clip=clip, seed=seed, compile=compile,
                       dtype=dtype)
    f_gen, logits = features_and_logits(clf, x)
    x_ev, _ = fdata.split(ds, "eval")
    x_tr, _ = fdata.split(ds, "train")
    f_ev, _ = features_and_logits(clf, x_ev)
    sub = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed))[:min(samples, len(x_tr))]
    f_tr, _ = features_and_logits(clf, x_tr[sub])
    blank, washed = blank_and_washed(x)
    nfe_per_step = 2 if guidance != 1.0 else 1
    return {
        "model": model_dir, "kind": meta["kind"], "steps": steps, "guidance": guidance,
        "noise_correction": noise_correction, "nfe": steps * nfe_per_step, "samples": samples,
        "seed": seed, "fd": frechet_distance(f_gen, f_ev), "fd_floor": frechet_distance(f_tr, f_ev),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "blank_share": blank, "washed_share": washed,
        "seconds": secs, "ms_per_image": 1000 * secs / samples,
        "compile": compile, "dtype": str(dtype).replace("torch.", ""),
    }
