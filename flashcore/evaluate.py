"""``flashcore eval``: a model's samples at a given step count, scored as the
8-bit images a user gets, in feature spaces that never picked the model,
every figure next to its real-vs-real floor (docs/evaluation.md).

Sets (``samples`` = N generated images, labels 0..K-1 in turn):
- reference: the held-out eval split (all of it, 1,000 MNIST images), for
  FD, precision/recall, density/coverage, diversity and the pixel figures;
- floor: a class-balanced subset of the train split with N images (all of
  the train split's images of a class when N asks for more), scored against
  the same reference: what a perfect generator would score at this size.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from . import checkpoint as ck
from . import data as fdata
from .metrics import blank_and_washed, class_diversity, features_and_logits, frechet_distance, load_classifier, \
    manifold_metrics, out_of_range_share, pixel_stats, user_images
from .schedule import NoiseSchedule, ScheduleConfig

_HOME = os.environ.get("FLASHCORE_HOME", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the headline feature spaces: trained apart from each other and from the validation classifier
HEADLINE_FEATURES = (os.path.join(_HOME, "checkpoints", "mnist-features-bncnn"),
                     os.path.join(_HOME, "checkpoints", "mnist-features-mlp"))
# the space distillation selects its exported student in (validation FD on the train split)
VALIDATION_FEATURES = os.path.join(_HOME, "checkpoints", "mnist-classifier")


def generate(model, meta: dict, labels: torch.Tensor, *, steps: int, guidance: float,
             noise_correction: bool = True, clip: float = 0.0, seed: int = 0, batch: int = 250,
             compile: bool = False, dtype: torch.dtype = torch.float32, progress: bool = False,
             device: str | torch.device | None = None):
    """Samples for ``labels`` in batches; returns (x0 (N, C, H, W) on the CPU, seconds).

    ``device`` moves the model there first (None: where it is); the noise is
    drawn on the CPU from ``seed``, so every device samples from the same x_T.

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
    from tqdm import tqdm

    from .devices import resolve_device
    from .engine import Engine
    if device is not None:
        model = model.to(resolve_device(device))
    sched = NoiseSchedule(ScheduleConfig(**meta["schedule"]))
    shape = (model.cfg.channels, model.cfg.sample_size, model.cfg.sample_size)
    engine = Engine(model, sched, steps=steps, guidance=guidance, noise_correction=noise_correction, clip=clip,
                    dtype=dtype, compile=compile)
    g = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    with tqdm(total=len(labels), desc="sampling", unit="img", disable=not progress, file=sys.stderr,
              leave=False) as bar:
        for i in range(0, len(labels), batch):
            lab = labels[i:i + batch]
            x_T = torch.randn((len(lab),) + shape, generator=g)
            out.append(engine.sample(lab, x_T=x_T).cpu())
            bar.update(len(lab))
    return torch.cat(out), time.perf_counter() - t0


def _weights_sha(path: str) -> str | None:
    f = os.path.join(path, "model.safetensors")
    return ck.sha256(f) if os.path.exists(f) else None


def _resolve(recorded: str, model_dir: str) -> str:
    """A path a checkpoint recorded: absolute, or relative to the repository root
    or to the checkpoint (``checkpoint.portable_path``)."""
    for cand in (recorded, os.path.join(_HOME, recorded), os.path.join(model_dir, recorded)):
        if os.path.exists(os.path.join(cand, "model.safetensors")):
            return cand
    return recorded


def validation_path(meta: dict, model_dir: str = ".") -> str:
    """The feature network that selected this model: a student's recorded
    validation classifier, else the default one distillation uses."""
    recorded = (meta.get("distill_config") or {}).get("classifier")
    return _resolve(recorded, model_dir) if recorded else VALIDATION_FEATURES


def validation_space(meta: dict, model_dir: str = ".") -> dict:
    """The eval JSON's record of the validation space (path as a shipped JSON names it)."""
    path = validation_path(meta, model_dir)
    recorded = (meta.get("distill_config") or {}).get("classifier")
    return {"path": ck.portable_path(path, "."), "sha256": _weights_sha(path),
            "source": "the student's distill_config" if recorded else "distillation's default",
            "use": "validation FD on the train split picks the exported student; never a headline figure"}


def _same_network(path: str, others) -> bool:
    """``path`` is one of ``others``: the same directory or the same weights."""
    sha = _weights_sha(path)
    return any(os.path.realpath(path) == os.path.realpath(o) or (sha is not None and sha == _weights_sha(o))
               for o in others)


def is_validation_space(path: str, validation: str) -> bool:
    """Whether a feature network is the model's validation space (``validation_path``),
    or distillation's default one."""
    return _same_network(path, (validation, VALIDATION_FEATURES))


def is_headline_space(path: str) -> bool:
    """Whether a feature network is one of eval's default headline spaces (distillation must not select on it)."""
    return _same_network(path, HEADLINE_FEATURES)


def class_balanced_subset(y_train: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Train-split indices with the class counts of ``labels`` (capped at what a class has)."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(int(labels.max()) + 1):
        pool = torch.nonzero(y_train == c).flatten()
        idx.append(pool[torch.randperm(len(pool), generator=g)][:int((labels == c).sum())])
    return torch.cat(idx)


def _space_figures(clf, x, labels, x_ref, y_ref, x_floor, y_floor, k: int) -> dict:
    f_gen, logits = features_and_logits(clf, x)
    f_ref, _ = features_and_logits(clf, x_ref)
    f_flo, logits_flo = features_and_logits(clf, x_floor)
    nc = clf.cfg.num_classes
    out = {"fd": frechet_distance(f_gen, f_ref), "fd_floor": frechet_distance(f_flo, f_ref)}
    m_gen, m_flo = manifold_metrics(f_ref, f_gen, k), manifold_metrics(f_ref, f_flo, k)
    for name in ("precision", "recall", "density", "coverage"):
        out[name], out[name + "_floor"] = m_gen[name], m_flo[name]
    out["accuracy"] = float((logits.argmax(1) == labels).double().mean())
    out["accuracy_floor"] = float((logits_flo.argmax(1) == y_floor).double().mean())
    per_class = class_diversity(f_gen, labels, f_ref, y_ref, nc)
    per_class_floor = class_diversity(f_flo, y_floor, f_ref, y_ref, nc)
    out["diversity_per_class"] = per_class
    out["diversity"] = _mean(per_class)
    out["diversity_floor"] = _mean(per_class_floor)
    return out


def _mean(values):
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def evaluate(model_dir: str, features: str | list[str] | tuple[str, ...] | None = None, *, steps: int,
             guidance: float | None = None, samples: int = 1000, seed: int = 0, k: int = 5,
             noise_correction: bool = True, clip: float = 0.0, compile: bool = False,
             dtype: torch.dtype = torch.float32, progress: bool = False,
             refuse_validation_space: bool = False, device: str | torch.device | None = None,
             prompts: list[str] | str | None = None) -> dict:
    """Every figure of ``flashcore eval`` as a JSON-ready dict.

    ``features``: the headline feature networks (default ``HEADLINE_FEATURES``);
    the first also gives the top-level ``fd`` and ``accuracy``. A network that is
    the model's validation space is flagged (``is_validation_space``), or refused
    with ``refuse_validation_space``.

    A text-to-image model of the captioned digits is conditioned on ``prompts`` (a list
    or a file; default: the prompts it was trained or distilled on), in turn; each must
    be a caption of ``flashcore.data.PHRASINGS``, whose digit is the class its image is
    scored against: ``accuracy`` is then prompt accuracy. A latent model's samples are
    decoded by its VAE before anything is scored."""
    from .foreign import decode, load_model
    model, meta = load_model(model_dir, prompts=prompts)
    if not meta.get("data"):
        raise ValueError(f"eval: {model_dir!r} comes from a diffusers folder with no data set; eval scores models "
                         "of flashcore's data sets (its feature networks and reference split)")
    dirs = [features] if isinstance(features, str) else list(features or HEADLINE_FEATURES)
    validation = validation_path(meta, model_dir)
    spaces = []
    for d in dirs:
        clf, cmeta = load_classifier(d)
        if cmeta["data"] != meta.get("data"):
            raise ValueError(f"eval: the feature network {d!r} was trained on {cmeta['data']!r} but the model "
                             f"on {meta.get('data')!r}")
        sha = _weights_sha(d)
        leak = is_validation_space(d, validation)
        if leak and refuse_validation_space:
            raise ValueError(f"eval: {d!r} is the validation space that selected this model during distillation; "
                             "pass headline feature networks instead (--features)")
        name = os.path.basename(os.path.normpath(d))
        if name in {n for n, _, _ in spaces}:
            name = f"{name}-{len(spaces)}"
        spaces.append((name, clf, {
            "path": ck.portable_path(d, "."), "sha256": sha, "arch": clf.cfg.arch, "seed": (cmeta.get("train_config") or {}).get("seed"),
            "eval_accuracy": cmeta.get("eval_accuracy"), "is_validation_space": leak}))
    if guidance is None:
        guidance = float(meta.get("guidance") or 1.0)   # a distilled student has none: 1 NFE a step
    ds = fdata.load(meta["data"])
    conditions = torch.arange(samples) % model.cfg.num_classes
    labels, prompt_info = conditions, None
    if getattr(model.cfg, "conditioning", "class") == "text":
        bank = list(meta["prompts"])
        digits = [fdata.caption_digit(p) for p in bank]
        bad = [p for p, d in zip(bank, digits) if d is None]
        if bad:
            raise ValueError(f"eval: the prompt {bad[0]!r} is not a caption of a digit in one of flashcore.data's "
                             "phrasings; eval scores a text model by the digit its prompt names")
        labels = torch.tensor(digits)[conditions]
        held_out = set(fdata.caption_bank(held_out=True))
        held = [fdata.normalise_caption(p) in held_out for p in bank]
        prompt_info = {"count": len(bank), "file": prompts if isinstance(prompts, str) else None,
                       "held_out": all(held),
                       "phrasings": "held-out" if all(held) else "trained" if not any(held) else "mixed",
                       "prompts": bank}
    x_ref, y_ref = fdata.split(ds, "eval")
    x_tr, y_tr = fdata.split(ds, "train")
    sub = class_balanced_subset(y_tr, labels, seed)
    if not 1 <= k < min(samples, len(x_ref), len(sub)):
        raise ValueError(f"eval: k = {k} needs 1 <= k < every set's size: {samples} samples, "
                         f"{len(x_ref)} reference images, {len(sub)} floor images")
    x_ref, x_floor, y_floor = user_images(x_ref), user_images(x_tr[sub]), y_tr[sub]
    raw, secs = generate(model, meta, conditions, steps=steps, guidance=guidance,
                         noise_correction=noise_correction, clip=clip, seed=seed, compile=compile, dtype=dtype,
                         progress=progress, device=device)
    raw = decode(model, raw).cpu()                  # a latent model's samples as images
    x = user_images(raw)
    per_space = {}
    for name, clf, info in spaces:
        per_space[name] = {**info, **_space_figures(clf, x, labels, x_ref, y_ref, x_floor, y_floor, k)}
    first = per_space[spaces[0][0]]
    px_gen, px_ref, px_flo = pixel_stats(x), pixel_stats(x_ref), pixel_stats(x_floor)
    blank, washed = blank_and_washed(x)
    blank_flo, washed_flo = blank_and_washed(x_floor)
    nfe_per_step = 2 if guidance != 1.0 else 1
    return {
        "model": model_dir, "kind": meta["kind"], "steps": steps, "guidance": guidance,
        "noise_correction": noise_correction, "clip": clip, "nfe": steps * nfe_per_step, "samples": samples,
        "seed": seed, "k": k,
        "images": "clamped to [-1, 1] and rounded to 8 bits, the pixels flashcore generate writes",
        "reference": {"set": "eval split", "size": len(x_ref)},
        "floor": {"set": "train split, class-balanced subset", "size": len(x_floor), "seed": seed},
        "validation_space": validation_space(meta, model_dir),
        "feature_spaces": per_space,
        "fd": first["fd"], "fd_floor": first["fd_floor"],
        "accuracy": first["accuracy"], "accuracy_floor": first["accuracy_floor"], "headline_space": spaces[0][0],
        "pixels": {name: {"value": px_gen[name], "real": px_ref[name], "floor": px_flo[name]} for name in px_gen},
        "raw_out_of_range": out_of_range_share(raw),
        "blank_share": blank, "blank_share_floor": blank_flo, "washed_share": washed, "washed_share_floor": washed_flo,
        "seconds": secs, "ms_per_image": 1000 * secs / samples,
        "compile": compile, "dtype": str(dtype).replace("torch.", ""),
        "prompts": prompt_info, "latent": bool(getattr(model.cfg, "latent", False)),
    }


def summary(r: dict) -> str:
    """A few lines for the terminal; the JSON has every figure."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = [f"{os.path.basename(os.path.normpath(r['model']))}: {r['steps']} steps, {r['nfe']} NFE, "
             f"{r['samples']} samples, {r['ms_per_image']:.1f} ms/image; raw values outside [-1, 1]: "
             f"{100 * r['raw_out_of_range']:.1f}% (clamped)",
             f"{'feature space (floor)':26s} {'FD':>13s} {'precision':>13s} {'recall':>13s} {'diversity':>13s} "
             f"{'accuracy':>13s}"]
    for name, s in r["feature_spaces"].items():
        cells = [f"{f(s[m], fmt)} ({f(s[m + '_floor'], fmt)})" for m, fmt in
                 (("fd", ".1f"), ("precision", ".3f"), ("recall", ".3f"), ("diversity", ".2f"), ("accuracy", ".3f"))]
        mark = "  VALIDATION SPACE: not a headline figure" if s["is_validation_space"] else ""
        lines.append(f"{name:26s} " + " ".join(f"{c:>13s}" for c in cells) + mark)
    p = r["pixels"]
    lines.append("pixels (real): " + ", ".join(
        f"{label} {f(p[n]['value'], '.3f')} ({f(p[n]['real'], '.3f')})"
        for n, label in (("background", "background"), ("midtone_share", "mid-tone share"), ("stroke", "stroke"))))
    if r.get("prompts"):
        lines.append(f"prompt accuracy ({r['prompts']['count']} prompts, "
                     f"{r['prompts']['phrasings']} phrasings): {r['accuracy']:.3f}")
    lines.append(f"validation space (picks students, not reported): {r['validation_space']['path']}")
    return "\n".join(lines)
